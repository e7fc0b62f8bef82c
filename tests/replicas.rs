//! Coordinator replicas over one PostgreSQL (`store_backend = "postgres"`), as real processes:
//! what one replica changes the other sees (tokens, devices, a revocation, the nonces of signed
//! calls, so a call replayed to the other replica is refused); one replica runs
//! the rounds at a time (the leadership lease, metric `spa_leader`), devices that poll the
//! other are sent to it and take part in its rounds, and when it is killed the other takes
//! over within a few lease lifetimes.
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use spa_testkit::postgres::Cluster;
use spa_testkit::procs::{Coordinator, Device, bin};

/// A coordinator on `pg`; with `peer`, sharing its TLS material and admin credential.
fn replica(dir: &Path, name: &str, pg: &Cluster, peer: Option<&Coordinator>) -> Coordinator {
    replica_with(dir, name, pg, peer, &[])
}

/// [`replica`], its `serve` started with `env` (fault injection).
fn replica_with(dir: &Path, name: &str, pg: &Cluster, peer: Option<&Coordinator>, env: &[(&str, &str)]) -> Coordinator {
    let mut c = Coordinator::replica_home(dir, name, pg, peer);
    c.start_role("all", env);
    c
}

/// A ping signed once by the device: accepted by `first`, refused as a replay by `second`
/// (each replica's own replay cache never saw the other's calls; the shared store did).
fn replayed_to_the_other_replica_is_refused(dev: &Device, first: &Coordinator, second: &Coordinator) {
    use spa_proto::v1::PingRequest;
    use spa_proto::v1::device_client::DeviceClient;
    let (key, id) = spa_client::store::ClientStore::open(&dev.home).unwrap().require_identity(None).unwrap();
    let signer = spa_proto::auth::DeviceSigner::from_pkcs8(&key, &id.device_id).unwrap();
    let signed = signer.sign(spa_proto::methods::DEVICE_PING, &PingRequest {}, spa_proto::auth::now_ms());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let codes: Vec<tonic::Code> = [first, second]
        .iter()
        .map(|c| {
            rt.block_on(async {
                let ch = spa_coordinator::net::connect(&c.url, &std::fs::read(c.home.join("tls/ca.pem")).unwrap()).await.unwrap();
                let mut req = tonic::Request::new(PingRequest {});
                signed.apply(req.metadata_mut());
                DeviceClient::new(ch).ping(req).await.map_or_else(|e| e.code(), |_| tonic::Code::Ok)
            })
        })
        .collect();
    assert_eq!(codes, [tonic::Code::Ok, tonic::Code::Unauthenticated], "the replay to the second replica");
}

/// Polls until exactly one of `cs` leads; its index.
fn one_leader(cs: &[&Coordinator], within: Duration) -> usize {
    let t = Instant::now();
    loop {
        let leading: Vec<usize> = (0..cs.len()).filter(|&i| cs[i].leads()).collect();
        if leading.len() == 1 {
            return leading[0];
        }
        assert!(t.elapsed() < within, "leaders after {:?}: {leading:?}", t.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn replicas_share_devices_and_one_leads_until_it_dies() {
    let pg = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let mut a = replica(dir.path(), "a", &pg, None);
    let mut b = replica(dir.path(), "b", &pg, Some(&a));
    let first = one_leader(&[&a, &b], Duration::from_secs(10));

    // A device enrolls through a with a token a created; b lists it, and b's revocation is
    // honoured by a within the bound.
    let dev = Device::enroll(dir.path(), &a, 0, 4);
    let listed = b.admin(&["devices", "list"]);
    assert!(listed.as_array().unwrap().iter().any(|r| r["device_id"] == dev.id.as_str()), "{listed}");
    let status = || {
        let out = Command::new(bin("spa-client")).arg("--home").arg(&dev.home).args(["status", "--json"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_else(|_| panic!("status: {text}"))
    };
    replayed_to_the_other_replica_is_refused(&dev, &a, &b);
    let before = status();
    assert_eq!(before["coordinator_reachable"], true, "{before}");
    b.admin(&["devices", "revoke", &dev.id]);
    // a cached the device at the call before; b's revocation reaches a's cache through
    // NOTIFY, within 2 s (milliseconds, measured in tests/store.rs).
    let t = Instant::now();
    let revoked = |v: &serde_json::Value| v["coordinator_error"].as_str().is_some_and(|e| e.contains("revoked"));
    let mut after = status();
    while !revoked(&after) && t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(50));
        after = status();
    }
    assert!(revoked(&after), "a still serves the device 2 s after b revoked it: {after}");

    // Devices enrolled through the follower are sent to the leader and take part in the round
    // a run queued through the follower starts there.
    let (leader, follower) = if first == 0 { (&a, &b) } else { (&b, &a) };
    let mut devices: Vec<Device> = (1..=2).map(|i| Device::enroll(dir.path(), follower, i, 8)).collect();
    for d in &mut devices {
        d.run(&[]);
    }
    follower.admin(&["round", "start", "--rounds", "1", "--min-clients", "2", "--max-clients", "2", "--deadline", "120"]);
    let r = follower.wait_round(1, Duration::from_secs(240));
    assert_eq!(r["state"], "committed", "{r}");
    let log = std::fs::read_to_string(devices[0].home.join("agent.log")).unwrap();
    assert!(log.contains(&format!("moving to {}", leader.url)), "{log}");
    drop(devices);

    // The leader dies without a word (SIGKILL): the other takes the lease once it lapses.
    let (dead, survivor) = if first == 0 { (&mut a, &b) } else { (&mut b, &a) };
    let mut child = dead.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let t = Instant::now();
    while !survivor.leads() {
        assert!(t.elapsed() < Duration::from_secs(5), "no takeover within 5 s of the leader's death (lease 1 s)");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("takeover {} ms after the leader was killed", t.elapsed().as_millis());
}

/// PostgreSQL stopped under a serving coordinator: signed calls get UNAVAILABLE (nothing
/// acknowledged), the process stays up, and once the database is back the same process
/// serves again without a restart, with everything acknowledged before.
#[test]
fn a_database_outage_is_unavailable_and_passes() {
    let pg = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let mut c = replica(dir.path(), "c", &pg, None);
    let dev = Device::enroll(dir.path(), &c, 0, 4);
    let status = || {
        let out = Command::new(bin("spa-client")).arg("--home").arg(&dev.home).args(["status", "--json"]).output().unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    assert_eq!(status()["coordinator_reachable"], true);
    pg.stop();
    let down = status();
    assert!(down["coordinator_error"].as_str().is_some_and(|e| e.contains("Unavailable") || e.contains("unavailable")), "{down}");
    assert!(c.child.as_mut().unwrap().try_wait().unwrap().is_none(), "the coordinator exited");
    pg.resume();
    let t = Instant::now();
    while status()["coordinator_reachable"] != true {
        assert!(t.elapsed() < Duration::from_secs(20), "not serving 20 s after the database came back: {}", status());
        std::thread::sleep(Duration::from_millis(200));
    }
    let listed = c.admin(&["devices", "list"]);
    assert!(listed.as_array().unwrap().iter().any(|r| r["device_id"] == dev.id.as_str()), "{listed}");
}

/// PostgreSQL stopped for 30 s (`SPA_PG_OUTAGE_SECS`) in the middle of a round: the
/// coordinator stays up, the round in flight ends (aborted, nothing of it committed, or
/// committed whole), no round is left mid-phase, and the run goes on to commit new versions
/// with the same devices once the database is back; versions stay consecutive.
#[test]
fn a_database_stopped_mid_round_loses_nothing_and_the_run_goes_on() {
    let outage = std::env::var("SPA_PG_OUTAGE_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let pg = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let mut c = replica(dir.path(), "c", &pg, None);
    let mut first = c.child.take().unwrap();
    first.kill().unwrap();
    first.wait().unwrap();
    c.edit_config(|cfg| cfg.rounds.phase_timeout_secs = 5);
    c.start(None);
    let mut devices: Vec<Device> = (0..3).map(|i| Device::enroll(dir.path(), &c, i, 8)).collect();
    for d in &mut devices {
        d.run(&[]);
    }
    c.admin(&["round", "start", "--rounds", "4", "--min-clients", "3", "--max-clients", "3", "--deadline", "90"]);
    let r = c.wait_round_state(1, &["share_keys", "masked_input", "unmask", "committed", "aborted"], Duration::from_secs(120));
    eprintln!("database stopped for {outage} s with round 1 {}", r["state"]);
    pg.stop();
    std::thread::sleep(Duration::from_secs(outage));
    assert!(c.child.as_mut().unwrap().try_wait().unwrap().is_none(), "the coordinator exited during the outage");
    pg.resume();
    let mut version = 0;
    let mut committed_after = 0;
    for id in 1..=4 {
        let r = c.wait_round(id, Duration::from_secs(300));
        eprintln!("round {id}: {} {}", r["state"], r["reason"]);
        if r["state"] == "committed" {
            assert_eq!(r["base_version"], version, "{r}");
            version += 1;
            assert_eq!(r["committed_version"], version, "{r}");
            committed_after += usize::from(id > 1);
        }
    }
    assert!(committed_after >= 1, "no round committed after the outage");
    let rounds = c.admin(&["round", "list"]);
    assert!(rounds.as_array().unwrap().iter().all(|r| r["state"] == "committed" || r["state"] == "aborted"), "a round left mid-phase: {rounds}");
    let latest = c.checkpoint(version);
    assert!(!latest.is_empty());
}

/// The leader frozen (SIGSTOP) just before its commit, past its lease, then resumed: the
/// other replica took over meanwhile and aborted the frozen round; the old leader's commit is
/// refused (fenced), and version 1 exists once, committed by the new leader's round.
#[test]
fn a_leader_frozen_before_its_commit_is_fenced_off_and_one_version_exists() {
    let pg = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let pause = [("SPA_FAULT_PAUSE_AT", "commit")];
    let a = replica_with(dir.path(), "a", &pg, None, &pause);
    let b = replica_with(dir.path(), "b", &pg, Some(&a), &pause);
    let (leader, follower) = if one_leader(&[&a, &b], Duration::from_secs(10)) == 0 { (&a, &b) } else { (&b, &a) };
    // Enrolled through the follower: sent to the leader, back to the follower once it is gone.
    let mut devices: Vec<Device> = (0..2).map(|i| Device::enroll(dir.path(), follower, i, 8)).collect();
    for d in &mut devices {
        d.run(&[]);
    }
    follower.admin(&["round", "start", "--rounds", "2", "--min-clients", "2", "--max-clients", "2", "--deadline", "120"]);
    let log = leader.home.join("serve.log");
    let t = Instant::now();
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("fault injection: pausing at commit") {
        assert!(t.elapsed() < Duration::from_secs(180), "the leader never reached its commit");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = leader.child.as_ref().unwrap().id().to_string();
    let signal = |s: &str| assert!(Command::new("kill").args([s, &pid]).status().unwrap().success());
    signal("-STOP");
    let t = Instant::now();
    while !follower.leads() {
        assert!(t.elapsed() < Duration::from_secs(10), "no takeover while the leader was frozen");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    signal("-CONT");

    let r1 = follower.wait_round(1, Duration::from_secs(60));
    assert_eq!(r1["state"], "aborted", "{r1}");
    let r2 = follower.wait_round(2, Duration::from_secs(300));
    assert_eq!((r2["state"].as_str(), r2["base_version"].as_u64(), r2["committed_version"].as_u64()), (Some("committed"), Some(0), Some(1)), "{r2}");
    let t = Instant::now();
    while !std::fs::read_to_string(&log).unwrap().contains("no longer holds the leadership lease") {
        assert!(t.elapsed() < Duration::from_secs(10), "the old leader's commit was not refused: {}", std::fs::read_to_string(&log).unwrap());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, err) = follower.admin_exit(&["checkpoint", "export", "--version", "2", "--out", dir.path().join("v2").to_str().unwrap()]);
    assert_ne!(code, 0, "a second version was committed: {err}");
}

/// One enrollment token raced by two devices, one through each replica, five times: exactly
/// one enrollment each time (the token's row lock in the shared database decides).
#[test]
fn one_token_raced_through_two_replicas_enrolls_one_device() {
    let pg = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let a = replica(dir.path(), "a", &pg, None);
    let b = replica(dir.path(), "b", &pg, Some(&a));
    for race in 0..5 {
        let token = a.admin(&["token", "create"])["token"].as_str().unwrap().to_string();
        let enroll = |c: &Coordinator, k: usize| {
            Command::new(bin("spa-client"))
                .arg("--home")
                .arg(dir.path().join(format!("race{race}-{k}")))
                .args(["enroll", "--coordinator", &c.url, "--token", &token, "--name", "racer", "--ca"])
                .arg(a.home.join("tls/ca.pem"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let racers = [enroll(&a, 0), enroll(&b, 1)];
        let outs: Vec<_> = racers.into_iter().map(|p| p.wait_with_output().unwrap()).collect();
        let won = outs.iter().filter(|o| o.status.success()).count();
        let why: Vec<_> = outs.iter().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).collect();
        assert_eq!(won, 1, "race {race}: {won} enrollments with one token: {why:?}");
    }
    let listed = b.admin(&["devices", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 5, "{listed}");
}
