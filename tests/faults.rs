//! Faults end to end, with real processes on loopback (a `spa-coordinator serve` process, one
//! `spa-client run` agent per device): a network partition between one device and the
//! coordinator (a proxy holding every byte, both ways, then healing), latency, devices silent
//! at each phase, devices sending malformed answers mid-protocol, raw garbage on the
//! coordinator's port, a device whose clock is off and a peer whose network goes silent
//! (dropped by the coordinator's keepalive). The rounds go on with the others, each
//! fault shows as that device's dropout with its reason, every committed sum is the plaintext
//! mean of its contributors', and every device takes part again once its fault is gone.
//! The coordinator killed at each phase is in client/tests/rounds.rs.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use spa::netdelay::DelayProxy;
use spa_testkit::procs::{Coordinator, Device, check_aggregate, coordinator_bin, ids};

/// Round `r`'s dropout record of device `d` (null when it is not a dropout).
fn dropout<'a>(r: &'a Value, d: &Device) -> &'a Value {
    &r["dropouts"][d.id.as_str()]
}

fn assert_dropout(r: &Value, d: &Device, phase: Option<&str>, reason: &str) {
    let x = dropout(r, d);
    assert_eq!(x["reason"]["kind"], reason, "{}: {r}", d.id);
    if let Some(p) = phase {
        assert_eq!(x["phase"], p, "{}: {r}", d.id);
    }
    assert!(!ids(&r["contributors"]).contains(&d.id), "a dropout's update must not be in the sum: {r}");
}

fn agent_log(d: &Device) -> String {
    std::fs::read_to_string(d.home.join("agent.log")).unwrap_or_default()
}

#[test]
fn rounds_go_on_through_partitions_silent_and_malformed_devices() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Selection waits (up to 60 s) for every device, so each round's cohort is all ten.
    let mut coord = Coordinator::init(dir, 60);
    coord.edit_config(|c| c.rounds.phase_timeout_secs = 8);
    coord.start(None);
    let upstream: SocketAddr = coord.url.trim_start_matches("https://").parse().unwrap();
    let (slow, flaky) = rt.block_on(async {
        (DelayProxy::start(upstream, Duration::from_millis(50)).await.unwrap(), DelayProxy::start(upstream, Duration::ZERO).await.unwrap())
    });
    let n = 10;
    let mut devices: Vec<Device> = (0..n)
        .map(|i| match i {
            0 => Device::enroll_via(dir, &coord, &format!("https://{}", slow.addr), i, 24),
            1 => Device::enroll_via(dir, &coord, &format!("https://{}", flaky.addr), i, 24),
            _ => Device::enroll(dir, &coord, i, 24),
        })
        .collect();
    let faults: [&[(&str, &str)]; 10] = [
        &[],
        &[],
        &[("SPA_FAULT_SILENT_AT", "share_keys@1")],
        &[("SPA_FAULT_GARBAGE_AT", "masked_input@1")],
        &[("SPA_FAULT_SILENT_AT", "unmask@2")],
        &[("SPA_FAULT_SILENT_AT", "training@2")],
        &[("SPA_FAULT_GARBAGE_AT", "share_keys@2")],
        &[],
        &[],
        &[],
    ];
    for (i, d) in devices.iter().enumerate() {
        eprintln!("device {i}: {}", d.id);
    }
    for (d, f) in devices.iter_mut().zip(faults) {
        d.run(f);
    }
    coord.admin(&["round", "start", "--rounds", "3", "--min-clients", "6", "--max-clients", "10", "--deadline", "40", "--local-epochs", "1", "--lr", "0.01"]);

    // Round 1: device 1 is cut off from the coordinator once training began, and raw bytes
    // that are not HTTP/2 arrive on the coordinator's port.
    coord.wait_round_state(1, &["training"], Duration::from_secs(120));
    flaky.partition();
    let mut raw = std::net::TcpStream::connect(upstream).unwrap();
    let _ = raw.write_all(&(0..65_536u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect::<Vec<_>>());
    let r1 = coord.wait_round(1, Duration::from_secs(300));
    flaky.heal();
    assert_eq!(r1["state"], "committed", "{r1}");
    eprintln!("round 1: contributors {}, dropouts {}, phases (ms) {}", ids(&r1["contributors"]).len(), r1["dropouts"], r1["phase_ms"]);
    assert_eq!(r1["cohort"].as_array().unwrap().len(), n, "{r1}");
    assert_dropout(&r1, &devices[1], None, "timed_out");
    assert_dropout(&r1, &devices[2], Some("share_keys"), "timed_out");
    assert_dropout(&r1, &devices[3], Some("masked_input"), "broken_upload");
    assert!(dropout(&r1, &devices[3])["reason"]["detail"].as_str().unwrap().contains("SHA-256"), "{r1}");
    assert_eq!(ids(&r1["contributors"]).len(), 7, "{r1}");
    assert!(ids(&r1["contributors"]).contains(&devices[0].id), "50 ms of latency is no fault: {r1}");
    check_aggregate(&coord, &devices, &r1);
    // The silent device is stuck for good: restarted, it comes back.
    devices[2].stop();
    devices[2].run(&[]);

    // Round 2: silent at training, a share missing, silent at unmask (after its masked input
    // is in: its update counts, its mask is removed through the others' shares).
    let r2 = coord.wait_round(2, Duration::from_secs(300));
    assert_eq!(r2["state"], "committed", "{r2}");
    eprintln!("round 2: contributors {}, dropouts {}, phases (ms) {}", ids(&r2["contributors"]).len(), r2["dropouts"], r2["phase_ms"]);
    assert_eq!(r2["cohort"].as_array().unwrap().len(), n, "the partitioned and the restarted device are back: {r2}");
    assert_dropout(&r2, &devices[5], Some("training"), "timed_out");
    assert_dropout(&r2, &devices[6], Some("share_keys"), "refused");
    assert!(dropout(&r2, &devices[6])["reason"]["detail"].as_str().unwrap().contains("neighbours"), "{r2}");
    assert_eq!(dropout(&r2, &devices[4])["phase"], "unmask", "{r2}");
    let c2 = ids(&r2["contributors"]);
    assert_eq!(c2.len(), 8, "{r2}");
    assert!(c2.contains(&devices[4].id) && c2.contains(&devices[1].id), "{r2}");
    check_aggregate(&coord, &devices, &r2);
    for k in [4, 5] {
        devices[k].stop();
        devices[k].run(&[]);
    }

    // Round 3: every device contributes again.
    let r3 = coord.wait_round(3, Duration::from_secs(300));
    assert_eq!(r3["state"], "committed", "{r3}");
    eprintln!("round 3: contributors {}, dropouts {}, phases (ms) {}", ids(&r3["contributors"]).len(), r3["dropouts"], r3["phase_ms"]);
    assert_eq!(ids(&r3["contributors"]).len(), n, "{r3}");
    assert!(r3["dropouts"].as_object().is_none_or(|d| d.is_empty()), "{r3}");
    check_aggregate(&coord, &devices, &r3);
    let metrics = coord.metrics();
    for reason in ["timed_out", "refused", "broken_upload"] {
        assert!(metrics.contains(&format!("spa_dropouts_total{{reason=\"{reason}\"}}")), "{reason}: {metrics}");
    }

    // A device whose clock is ten minutes fast is refused with the reason, keeps retrying
    // (a clock gets fixed; an identity does not) and does not take the coordinator down.
    devices[7].stop();
    devices[7].run(&[("SPA_FAULT_CLOCK_SKEW_SECS", "600")]);
    let t = Instant::now();
    while agent_log(&devices[7]).matches("coordinator's clock").count() < 2 {
        assert!(t.elapsed() < Duration::from_secs(60), "{}", agent_log(&devices[7]));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!devices[7].agent_exited(), "the agent gave up on a clock error: {}", agent_log(&devices[7]));
    assert_eq!(coord.admin(&["status"])["global_version"], 3);
    for d in devices.iter_mut() {
        d.stop();
    }
    drop((slow, flaky));
}

/// Whether this machine lets a process mount a small filesystem of its own (in a user and
/// mount namespace, no privileges needed where those are enabled).
fn can_mount_tmpfs(dir: &Path) -> bool {
    Command::new("unshare").args(["-Urm", "sh", "-c", r#"mount -t tmpfs -o size=1m tmpfs "$0""#]).arg(dir).status().is_ok_and(|s| s.success())
}

#[test]
fn a_full_disk_fails_writes_cleanly_and_serving_resumes_when_space_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut coord = Coordinator::init(dir, 1);
    let store = coord.home.join("store");
    std::fs::create_dir_all(&store).unwrap();
    if !can_mount_tmpfs(&store) {
        eprintln!("SKIPPED: `unshare -Urm` cannot mount a tmpfs on this machine (user namespaces disabled?)");
        return;
    }
    // The coordinator's store on a 16 MiB filesystem of its own; the test reaches that
    // filesystem through /proc/PID/root.
    let mut cmd = Command::new("unshare");
    cmd.args(["-Urm", "sh", "-c", r#"mount -t tmpfs -o size=16m tmpfs "$1" && exec "$0" serve --home "$2""#]);
    cmd.arg(coordinator_bin()).arg(&store).arg(&coord.home);
    coord.spawn(cmd);
    let pid = coord.child.as_ref().unwrap().id();
    let inside = PathBuf::from(format!("/proc/{pid}/root")).join(store.strip_prefix("/").unwrap());
    let d0 = Device::enroll(dir, &coord, 0, 4);
    let revoked = Device::enroll(dir, &coord, 1, 4);
    coord.admin(&["devices", "revoke", &revoked.id]);

    // Fill the disk, then write until sled hits it (its log file grows a page at a time).
    let filler = inside.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let mb = vec![0u8; 1 << 20];
    while f.write_all(&mb).is_ok() {}
    while f.write_all(&mb[..4096]).is_ok() {}
    drop(f);
    let mut refused = None;
    for _ in 0..200 {
        let out = Command::new(coordinator_bin()).args(["token", "create", "--home"]).arg(&coord.home).output().unwrap();
        if !out.status.success() {
            refused = Some((out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned()));
            break;
        }
    }
    let (code, err) = refused.expect("200 tokens were acknowledged on a full disk");
    assert_eq!(code, Some(5), "a full disk is UNAVAILABLE (retry later): {err}");
    assert!(err.contains("store"), "{err}");
    assert!(coord.child.as_mut().unwrap().try_wait().unwrap().is_none(), "the coordinator died on a full disk");
    let (code, err) = coord.admin_exit(&["token", "create"]);
    assert_eq!(code, 5, "{err}");

    // Space returns: within seconds the store is reopened and writes work again.
    std::fs::remove_file(&filler).unwrap();
    let t = Instant::now();
    let freed = Instant::now();
    let token = loop {
        let out = Command::new(coordinator_bin()).args(["token", "create", "--json", "--home"]).arg(&coord.home).output().unwrap();
        if out.status.success() {
            break serde_json::from_slice::<Value>(&out.stdout).unwrap();
        }
        assert!(t.elapsed() < Duration::from_secs(30), "writes did not resume: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(token["token"].as_str().unwrap().starts_with("spa_"));
    eprintln!(
        "writes refused while the disk was full ({}); accepted again {} ms after space returned",
        err.lines().next().unwrap_or(""),
        freed.elapsed().as_millis()
    );
    // Nothing acknowledged was lost: the enrolled device and the revocation are there, and
    // devices enroll again.
    let listed = coord.admin(&["devices", "list"]);
    let rows = listed.as_array().unwrap();
    let row = |id: &str| rows.iter().find(|r| r["device_id"] == id).cloned().unwrap_or_default();
    assert_eq!(row(&d0.id)["revoked"], false, "{listed}");
    assert_eq!(row(&revoked.id)["revoked"], true, "{listed}");
    let d2 = Device::enroll(dir, &coord, 2, 4);
    assert!(coord.admin(&["devices", "list"]).as_array().unwrap().iter().any(|r| r["device_id"] == d2.id.as_str()));
    let log = std::fs::read_to_string(coord.home.join("serve.log")).unwrap();
    assert!(log.contains("reopening") && log.contains("open again"), "{log}");
}

/// `limits.keepalive_secs` / `keepalive_timeout_secs`: a peer that stops answering (the
/// network between holds its bytes) is dropped once a ping goes unanswered, its place freed;
/// a peer that answers keeps its connection across several pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_is_dropped_by_keepalive() {
    use spa_proto::v1::{ListDevicesRequest, admin_client::AdminClient};
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("coord");
    spa_testkit::init_loopback_home(&home);
    let p = home.join("coordinator.toml");
    let toml = std::fs::read_to_string(&p)
        .unwrap()
        .replace("keepalive_secs = 30", "keepalive_secs = 1")
        .replace("keepalive_timeout_secs = 10", "keepalive_timeout_secs = 1");
    std::fs::write(&p, toml).unwrap();
    let srv = spa_coordinator::server::start(&home).await.unwrap();
    let proxy = DelayProxy::start(srv.addr, Duration::ZERO).await.unwrap();
    let ch = spa_coordinator::net::connect(&format!("https://{}", proxy.addr), &std::fs::read(home.join("tls/ca.pem")).unwrap()).await.unwrap();
    let cred = std::fs::read_to_string(home.join("admin.credential")).unwrap();
    let list = || spa_coordinator::admin_cli::with_admin(cred.trim(), ListDevicesRequest {}).unwrap();
    AdminClient::new(ch.clone()).list_devices(list()).await.unwrap();
    // Idle but answering: still open after several pings.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(srv.open_connections(), 1, "a connection that answers pings was dropped");
    proxy.partition();
    let t = Instant::now();
    while srv.open_connections() > 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "a peer that stopped answering kept its connection");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("silent peer dropped {} ms after the partition", t.elapsed().as_millis());
    srv.shutdown().await.unwrap();
}

/// A coordinator that accepts calls and never answers them (wedged: its connection stays
/// healthy, so keepalive sees nothing wrong). The device's `[net]` deadlines fail the calls: a
/// unary call at `call_timeout_secs`, a stream that goes silent at `stream_stall_secs`. The
/// same deadlines do not disturb a coordinator that answers.
#[test]
fn a_coordinator_that_never_answers_fails_device_calls_at_their_deadlines() {
    use spa_proto::methods;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut coord = Coordinator::init(dir, 2);
    let mut cmd = Command::new(coordinator_bin());
    cmd.args(["serve", "--home"]).arg(&coord.home).env("SPA_FAULT_STALL", format!("{},{}", methods::DEVICE_PING, methods::BACKBONE_FEATURES));
    coord.spawn(cmd);
    let dev = Device::enroll(dir, &coord, 0, 8);
    let cfg = dev.home.join("client.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("call_timeout_secs = 300", "call_timeout_secs = 2").replace("stream_stall_secs = 120", "stream_stall_secs = 2")).unwrap();
    let client = |args: &[&str]| {
        let t = Instant::now();
        let out = Command::new(spa_testkit::procs::bin("spa-client")).arg("--home").arg(&dev.home).args(args).output().unwrap();
        (out, t.elapsed())
    };
    let (out, took) = client(&["status", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["coordinator_reachable"], false, "{v}");
    assert!(v["coordinator_error"].as_str().unwrap().contains("Timeout expired"), "{v}");
    assert!(took < Duration::from_secs(20), "a stalled ping held the device {took:?}");
    let (out, took) = client(&["train"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("sent nothing for 2 s"), "{err}");
    assert!(took < Duration::from_secs(60), "a stalled stream held the device {took:?}");
    // The same deadlines, a coordinator that answers.
    drop(coord.child.take().map(|mut c| (c.kill(), c.wait())));
    coord.start(None);
    let (out, _) = client(&["status", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["coordinator_reachable"], true, "{v}");
    let (out, _) = client(&["train"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
