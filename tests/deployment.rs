//! A deployment of roles as real processes on loopback, one fault per round (issue 29's
//! combined failover run): PostgreSQL, two `serve --role leader` replicas (one leads, one
//! stands by), three `serve --role aggregator` processes running the SecAgg+ shards, one
//! `serve --role frontend` that the devices enrolled and poll through (it sends them to the
//! leader), and 60 light devices.
//!
//! - Round 1: the leader aborts itself (as SIGKILL) once masked_input is durable; the standby
//!   takes the lease and aborts the round.
//! - Round 2: the aggregator of shard 1 is SIGKILLed as the first ShareKeys request goes out;
//!   the round commits version 1 from the other shards.
//! - Round 3: every device contributes to version 2.
//!
//! Every committed step is checked against its contributors' mean update.
use std::sync::Arc;
use std::time::Duration;

use spa_testkit::light::{FULL, Kill, Link, Part, Phase, Sums, device, enroll, rearm_kill};
use spa_testkit::postgres::Cluster;
use spa_testkit::procs::Coordinator;

/// The round settings every leader shares: shards of 20 on `aggregators`, floor 10.
fn leader_config(c: &Coordinator, aggregators: &[String]) {
    c.edit_config(|cfg| {
        cfg.rounds.phase_timeout_secs = 5;
        cfg.rounds.online_secs = 30;
        cfg.rounds.evaluate_secs = 5;
        // Devices find a new leader through the frontend within a few polls.
        cfg.rounds.selection_grace_secs = 10;
        cfg.rounds.shard_size = 20;
        cfg.rounds.min_shard_contributors = 10;
        cfg.rounds.aggregators = aggregators.to_vec();
    });
}

/// The committed step of `version` against the mean update of `round`'s contributors.
fn check_step(f: &Coordinator, sums: &Sums, round: &serde_json::Value, version: u64) {
    let contributors: Vec<String> = round["contributors"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_string()).collect();
    let (before, after) = (f.checkpoint(version - 1), f.checkpoint(version));
    let g = sums.lock().unwrap();
    let mut mean = vec![0f64; before.len()];
    let id = round["round_id"].as_u64().unwrap();
    for d in &contributors {
        let delta = &g.each[&(id, d.clone())];
        mean.iter_mut().zip(delta).for_each(|(m, x)| *m += *x as f64 / contributors.len() as f64);
    }
    let err = (0..before.len()).map(|i| (after[i] - before[i] - mean[i] as f32).abs()).fold(0f32, f32::max);
    assert!(err < 1e-3, "version {version}: the committed step differs from the contributors' mean update by {err}");
}

#[test]
fn a_deployment_of_roles_loses_a_leader_and_an_aggregator_and_commits_each_version_once() {
    scenario("masked_input", Phase::ShareKeys);
}

/// Every phase of every role: the leader dies at each durable state of round 1 (the last,
/// `committed`, is between rounds), an aggregator at each request of round 2.
#[test]
#[ignore = "opt-in, ~1 min: cargo test --release --workspace --test deployment -- --ignored"]
fn the_failure_matrix_every_phase_of_every_role() {
    let leader = ["training", "share_keys", "masked_input", "unmask", "committed"];
    for (i, crash) in leader.iter().enumerate() {
        let phase = Phase::ALL[i % Phase::ALL.len()];
        eprintln!("leader dies at {crash}, an aggregator at {phase:?}");
        scenario(crash, phase);
        rearm_kill();
    }
}

/// The run of the module's doc, the leader dying once `crash_at` is durable in round 1 and
/// the aggregator of shard 1 at the first `kill_at` request of round 2.
fn scenario(crash_at: &str, kill_at: Phase) {
    let n = 60;
    let pg = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let mut a = Coordinator::replica_home(dir.path(), "a", &pg, None);
    let aggs: Vec<Coordinator> = (0..3).map(|i| Coordinator::aggregator(dir.path(), &format!("agg{i}"), &a, 10)).collect();
    let urls: Vec<String> = aggs.iter().map(|g| g.url.clone()).collect();
    leader_config(&a, &urls);
    a.start_role("leader", &[("SPA_FAULT_CRASH_AT", crash_at)]);
    let t = std::time::Instant::now();
    while !a.leads() {
        assert!(t.elapsed() < Duration::from_secs(20), "the first leader did not take the lease");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut b = Coordinator::replica_home(dir.path(), "b", &pg, Some(&a));
    leader_config(&b, &urls);
    b.start_role("leader", &[]);
    let mut f = Coordinator::replica_home(dir.path(), "f", &pg, Some(&a));
    f.start_role("frontend", &[]);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let sums: Sums = Default::default();
    let kill = Kill { pid: aggs[1].child.as_ref().unwrap().id(), round: 2, phase: kill_at };
    let handles = rt.block_on(async {
        let ca = Arc::new(std::fs::read(f.home.join("tls/ca.pem")).unwrap());
        let cred = std::fs::read_to_string(f.home.join("admin.credential")).unwrap().trim().to_string();
        let ch = spa_coordinator::net::connect(&f.url, &ca).await.unwrap();
        let mut handles = Vec::new();
        for i in 0..n {
            let signer = enroll(&ch, &cred, &format!("light-{i}")).await;
            let part = Part { lenient: true, kill: Some(kill), ..FULL };
            let link = Link { home: ch.clone(), ca: ca.clone() };
            handles.push(tokio::spawn(device(link, signer, i as u64, 3, sums.clone(), part)));
        }
        handles
    });
    // Queued through the frontend; the leader runs it.
    f.admin(&["round", "start", "--rounds", "3", "--min-clients", "20", "--max-clients", "60", "--deadline", "60"]);

    a.wait_crash(Duration::from_secs(120));
    let r1 = f.wait_round(1, Duration::from_secs(120));
    let mut version = 0;
    if crash_at == "committed" {
        assert_eq!(r1["state"], "committed", "{r1}");
        version += 1;
        check_step(&f, &sums, &r1, version);
    } else {
        assert_eq!(r1["state"], "aborted", "{r1}");
        assert!(r1["reason"].as_str().unwrap().contains(&format!("leadership changed during {crash_at}")), "{r1}");
    }
    let t = std::time::Instant::now();
    while !b.leads() {
        assert!(t.elapsed() < Duration::from_secs(20), "the standby did not take the lease");
        std::thread::sleep(Duration::from_millis(100));
    }

    let r2 = f.wait_round(2, Duration::from_secs(180));
    assert_eq!(r2["state"], "committed", "{r2}");
    version += 1;
    assert_eq!(r2["committed_version"], version, "{r2}");
    let shards = r2["shards"].as_array().unwrap();
    assert!(shards[1]["failed"].as_str().unwrap().contains(&urls[1]), "{r2}");
    let (cohort, lost) = (r2["cohort"].as_array().unwrap().len(), shards[1]["devices"].as_u64().unwrap() as usize);
    assert_eq!(r2["contributors"].as_array().unwrap().len(), cohort - lost, "every device of the other shards: {r2}");
    check_step(&f, &sums, &r2, version);

    let r3 = f.wait_round(3, Duration::from_secs(180));
    assert_eq!(r3["state"], "committed", "{r3}");
    version += 1;
    assert_eq!(r3["committed_version"], version, "{r3}");
    assert_eq!(r3["contributors"].as_array().unwrap().len(), n, "{r3}");
    assert!(r3["shards"].as_array().unwrap().iter().all(|s| s["failed"].is_null() && s["aggregator"] != urls[1].as_str()), "{r3}");
    check_step(&f, &sums, &r3, version);
    assert!(!f.leads(), "a frontend never takes the lease");
    // No version past the last round's, from the dead leader or anyone.
    let status = f.admin(&["status"]);
    assert_eq!(status["global_version"], version, "{status}");
    let out = dir.path().join("next.safetensors");
    f.admin_fails(&["checkpoint", "export", "--version", &(version + 1).to_string(), "--out", out.to_str().unwrap()]);
    // Lenient devices keep polling (one outside a cohort evaluates fewer versions): stop them.
    handles.iter().for_each(|h| h.abort());
}
