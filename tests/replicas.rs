//! Coordinator replicas over one PostgreSQL (`store_backend = "postgres"`), as real processes:
//! what one replica changes the other sees (tokens, devices, a revocation); one replica serves
//! a device's calls (its member), so a call replayed to the other is turned away; one runs
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

/// A ping signed once by the device, sent to both replicas, then again: one serves the device
/// (rendezvous hashing over the members) and accepts it once, then refuses it as a replay; the
/// other turns it away both times (`NOT_OWNER`, naming the first) without serving it. Whether
/// `a` is the one.
fn served_once_by_its_member(dev: &Device, a: &Coordinator, b: &Coordinator) -> bool {
    use spa_proto::v1::PingRequest;
    use spa_proto::v1::device_client::DeviceClient;
    let (key, id) = spa_client::store::ClientStore::open(&dev.home).unwrap().require_identity(None).unwrap();
    let signer = spa_proto::auth::DeviceSigner::from_pkcs8(&key, &id.device_id).unwrap();
    let signed = signer.sign(spa_proto::methods::DEVICE_PING, &PingRequest {}, spa_proto::auth::now_ms());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let send = |c: &Coordinator| {
        rt.block_on(async {
            let ch = spa_coordinator::net::connect(&c.url, &std::fs::read(c.home.join("tls/ca.pem")).unwrap()).await.unwrap();
            let mut req = tonic::Request::new(PingRequest {});
            signed.apply(req.metadata_mut());
            DeviceClient::new(ch).ping(req).await.map_or_else(|e| (e.code(), spa_proto::reason::Reason::owner_url(&e)), |_| (tonic::Code::Ok, None))
        })
    };
    let first = [send(a), send(b)];
    let (owner, other) = if first[0].0 == tonic::Code::Ok { (a, b) } else { (b, a) };
    let sent_away = (tonic::Code::FailedPrecondition, Some(owner.url.clone()));
    assert!(first.contains(&(tonic::Code::Ok, None)) && first.contains(&sent_away), "{first:?}");
    assert_eq!(send(owner).0, tonic::Code::Unauthenticated, "the replay to the member serving the device");
    assert_eq!(send(other), sent_away, "the other member never serves the device");
    std::ptr::eq(owner, a)
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
    let served_by_a = served_once_by_its_member(&dev, &a, &b);
    let before = status();
    assert_eq!(before["coordinator_reachable"], true, "{before}");
    // Revoked through the member that does not serve the device: the one that does cached
    // it at the call before, and the revocation reaches that cache through NOTIFY, within 2 s
    // (milliseconds, measured in tests/store.rs).
    let elsewhere = if served_by_a { &b } else { &a };
    elsewhere.admin(&["devices", "revoke", &dev.id]);
    let t = Instant::now();
    let revoked = |v: &serde_json::Value| v["coordinator_error"].as_str().is_some_and(|e| e.contains("revoked"));
    let mut after = status();
    while !revoked(&after) && t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(50));
        after = status();
    }
    assert!(revoked(&after), "the device's member still serves it 2 s after the other member revoked it: {after}");

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

/// Two replicas `a` and `b` on `pg`, `edit` applied to each one's configuration; a runtime, a
/// channel to `a` and the admin credential.
fn two_members(
    dir: &Path,
    pg: &Cluster,
    edit: fn(&mut spa_coordinator::config::CoordinatorConfig),
) -> (Coordinator, Coordinator, tokio::runtime::Runtime, tonic::transport::Channel, String) {
    let member = |name: &str, peer: Option<&Coordinator>| {
        let mut c = Coordinator::replica_home(dir, name, pg, peer);
        c.edit_config(edit);
        c.start_role("all", &[]);
        c
    };
    let a = member("a", None);
    let b = member("b", Some(&a));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cred = std::fs::read_to_string(a.home.join("admin.credential")).unwrap().trim().to_string();
    let ch = rt.block_on(spa_coordinator::net::connect(&a.url, &std::fs::read(a.home.join("tls/ca.pem")).unwrap())).unwrap();
    (a, b, rt, ch, cred)
}

/// The signed ping `signed` sent to `c`: its code, and the member it names if sent away.
async fn ping(c: &Coordinator, signed: &spa_proto::auth::SignedHeaders) -> (tonic::Code, Option<String>) {
    use spa_proto::v1::PingRequest;
    let ch = spa_coordinator::net::connect(&c.url, &std::fs::read(c.home.join("tls/ca.pem")).unwrap()).await.unwrap();
    let mut req = tonic::Request::new(PingRequest {});
    signed.apply(req.metadata_mut());
    let r = spa_proto::v1::device_client::DeviceClient::new(ch).ping(req).await;
    r.map_or_else(|e| (e.code(), spa_proto::reason::Reason::owner_url(&e)), |_| (tonic::Code::Ok, None))
}

/// Two members (4 s clock window, 1 s membership): devices split between them, and signed
/// calls write no nonce to the database (each member's window is in memory). The member
/// serving a device is killed: the other serves it within the bound, refuses a call signed
/// before it took the device (accepted by the dead one), and refuses a future-dated one the
/// dead member accepted (its nonce, the only one in the store, is loaded as the device moves).
#[test]
fn a_device_moves_to_the_next_member_when_its_own_dies_and_no_call_is_served_twice() {
    use spa_proto::auth::now_ms;
    use spa_proto::v1::PingRequest;
    let pg = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, mut b, rt, ch, cred) = two_members(dir.path(), &pg, |cfg| cfg.auth.clock_window_secs = 4);
    let signers: Vec<_> = (0..12).map(|i| rt.block_on(spa_testkit::light::enroll(&ch, &cred, &format!("d{i}")))).collect();
    let sign = |s: &spa_proto::auth::DeviceSigner, ts| s.sign(spa_proto::methods::DEVICE_PING, &PingRequest {}, ts);
    // Which member serves each device: the one that accepts a fresh call.
    let on_b: Vec<_> = signers.iter().filter(|s| rt.block_on(ping(&a, &sign(s, now_ms()))).1.as_deref() == Some(b.url.as_str())).collect();
    assert!(!on_b.is_empty() && on_b.len() < signers.len(), "12 devices on one member: {}", on_b.len());

    let nonces = || {
        rt.block_on(async {
            let (sql, conn) = tokio_postgres::connect(&pg.conninfo, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            sql.query_one("SELECT count(*) FROM nonces", &[]).await.unwrap().get::<_, i64>(0)
        })
    };
    let before = nonces();
    assert_eq!(before, 0, "no ordinary call writes its nonce to the database");
    for s in &signers {
        for c in [&a, &b] {
            let (code, owner) = rt.block_on(ping(c, &sign(s, now_ms())));
            assert!(code == tonic::Code::Ok || owner.is_some(), "{code:?}");
        }
    }
    assert_eq!(nonces(), 0, "24 more calls wrote nonces to the database");

    // Signed now and accepted by b; signed 3 s ahead (inside the window) and accepted by b,
    // which keeps its nonce in the store.
    let d = on_b[0];
    let (now, ahead) = (sign(d, now_ms()), sign(d, now_ms() + 3000));
    assert_eq!(rt.block_on(ping(&b, &now)).0, tonic::Code::Ok);
    assert_eq!(rt.block_on(ping(&b, &ahead)).0, tonic::Code::Ok);
    assert_eq!(nonces(), 1, "the future-dated call's nonce is kept");
    let mut child = b.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let t = Instant::now();
    while rt.block_on(ping(&a, &sign(d, now_ms()))).0 != tonic::Code::Ok {
        assert!(t.elapsed() < Duration::from_secs(5), "a does not serve b's device 5 s after b died (membership 1 s)");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("a serves b's device {} ms after b was killed", t.elapsed().as_millis());
    assert_eq!(rt.block_on(ping(&a, &now)).0, tonic::Code::FailedPrecondition, "a call signed before a took the device");
    assert_eq!(rt.block_on(ping(&a, &ahead)).0, tonic::Code::Unauthenticated, "the future-dated call b accepted");
}

/// A member stopped with SIGTERM ends its incarnation as it stops: the other member serves its
/// devices at its next look at the members (a quarter of the 4 s lease), not once the lease
/// lapses (3 to 4 s after the signal).
#[test]
fn a_member_that_stops_hands_its_devices_over_at_once() {
    use spa_proto::auth::now_ms;
    use spa_proto::v1::PingRequest;
    let pg = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, mut b, rt, ch, cred) = two_members(dir.path(), &pg, |cfg| cfg.server.member_lease_secs = 4);
    let sign = |s: &spa_proto::auth::DeviceSigner| s.sign(spa_proto::methods::DEVICE_PING, &PingRequest {}, now_ms());
    // A device b serves (one in two is; 20 tries).
    let d = (0..20)
        .map(|i| rt.block_on(spa_testkit::light::enroll(&ch, &cred, &format!("d{i}"))))
        .find(|s| rt.block_on(ping(&b, &sign(s))).0 == tonic::Code::Ok)
        .expect("b serves none of 20 devices");
    let pid = b.child.as_ref().unwrap().id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let t = Instant::now();
    while rt.block_on(ping(&a, &sign(&d))).0 != tonic::Code::Ok {
        assert!(t.elapsed() < Duration::from_millis(2500), "a does not serve b's device 2.5 s after b was stopped");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("a serves b's device {} ms after b was stopped", t.elapsed().as_millis());
    b.child.take().unwrap().wait().unwrap();
}
