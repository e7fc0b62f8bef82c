//! Federated rounds end to end with real processes on loopback: a `spa-coordinator serve`
//! process, one `spa-client run` agent process per device, and the operator's CLI. Devices
//! are killed mid-round (fault injection makes a process abort at a chosen phase, like
//! SIGKILL), and so is the coordinator, at each phase.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use spa_model::side::ParamSet;
use spa_testkit::procs::{Coordinator, Device, check_aggregate, ids};

#[test]
fn devices_run_rounds_with_secagg_dropouts_and_rejoin() {
    let dir = tempfile::tempdir().unwrap();
    // Selection waits (up to 60 s) until every device is online, so the cohorts are known.
    let mut coord = Coordinator::init(dir.path(), 60);
    coord.start(None);
    // 10 devices, threshold 6: up to 3 (30%) may vanish after masking starts.
    let n = 10;
    let killed = [7, 8, 9];
    let mut devices: Vec<Device> = (0..n).map(|i| Device::enroll(dir.path(), &coord, i, 24)).collect();
    let capture = dir.path().join("dev0-outgoing.bin");
    for (i, d) in devices.iter_mut().enumerate() {
        if i == 0 {
            d.run(&[("SPA_CAPTURE_OUTGOING", capture.to_str().unwrap())]);
        } else if killed.contains(&i) {
            // Dies once it has sent its key shares: it is in U2 but not U3, so its peers'
            // masks with it are removed through Shamir recovery of its mask key.
            d.run(&[("SPA_FAULT_EXIT_AT", "masked_input")]);
        } else {
            d.run(&[]);
        }
    }
    // Bad plans are refused before anything is queued; exit codes tell refused (4), not
    // found (3) and usage (2) apart (docs/OPERATIONS.md).
    let (code, err) = coord.admin_exit(&["round", "start", "--min-clients", "1"]);
    assert!(err.contains("min_clients") && code == 4, "{code}: {err}");
    let (code, err) = coord.admin_exit(&["round", "abort", "999"]);
    assert!(err.contains("no round 999") && code == 3, "{code}: {err}");
    assert_eq!(coord.admin_exit(&["round", "start", "--rounds", "many"]).0, 2);
    assert!(coord.admin_fails(&["round", "start", "--strategy", "fedmagic"]).contains("unknown strategy"));
    let run = coord.admin(&[
        "round",
        "start",
        "--rounds",
        "3",
        "--min-clients",
        "3",
        "--max-clients",
        "10",
        "--deadline",
        "120",
        "--local-epochs",
        "2",
        "--lr",
        "0.01",
    ]);
    assert_eq!(run["run_id"], 1);

    let r1 = coord.wait_round(1, Duration::from_secs(300));
    assert_eq!(r1["state"], "committed", "{r1}");
    assert_eq!(r1["cohort"].as_array().unwrap().len(), n);
    let c1 = ids(&r1["contributors"]);
    assert_eq!(c1.len(), n - killed.len(), "{r1}");
    assert_eq!(r1["committed_version"], 1);
    check_aggregate(&coord, &devices, &r1);
    // Each killed device is a dropout of round 1 with its reason: silent at masked_input.
    assert_eq!(r1["dropouts"].as_object().unwrap().len(), killed.len(), "{r1}");
    for &k in &killed {
        let d = &r1["dropouts"][devices[k].id.as_str()];
        assert_eq!(d["phase"], "masked_input", "{r1}");
        assert_eq!(d["reason"]["kind"], "timed_out", "{r1}");
    }
    for &k in &killed {
        assert!(!c1.contains(&devices[k].id), "a killed device's update must not be in the sum");
        assert!(devices[k].agent_exited(), "fault injection did not kill device {k}");
        // Killed devices come back and take part in the later rounds.
        devices[k].run(&[]);
    }
    let r2 = coord.wait_round(2, Duration::from_secs(300));
    assert_eq!(r2["state"], "committed", "{r2}");
    let r3 = coord.wait_round(3, Duration::from_secs(300));
    assert_eq!(r3["state"], "committed", "{r3}");
    assert_eq!(r3["committed_version"], 3);
    assert_eq!(ids(&r3["contributors"]).len(), n, "the restarted devices rejoined: {r3}");
    check_aggregate(&coord, &devices, &r3);
    let status = coord.admin(&["status"]);
    assert_eq!(status["global_version"], 3);

    // Devices adopt each committed version and report held-out metrics on it.
    let t = Instant::now();
    let r3 = loop {
        let r = coord.round(3);
        if r["metrics"].as_object().is_some_and(|m| m.len() == n) {
            break r;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "metrics not reported: {r}");
        std::thread::sleep(Duration::from_millis(250));
    };
    let mean = &r3["mean_metrics"];
    assert!(mean["personalized_loss"].as_f64().unwrap() < mean["backbone_loss"].as_f64().unwrap(), "{mean}");
    eprintln!("round 1: {r1}\nround 3: {r3}");
    let listed = coord.admin(&["round", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 3);
    // The live coordinator's Prometheus endpoint counted the same rounds and dropouts.
    let metrics = coord.metrics();
    assert!(metrics.contains("spa_rounds_total{outcome=\"committed\"} 3\n"), "{metrics}");
    let timed_out = metrics.lines().find_map(|l| l.strip_prefix("spa_dropouts_total{reason=\"timed_out\"} ")).map(|v| v.parse::<f64>().unwrap());
    assert!(timed_out.is_some_and(|v| v >= killed.len() as f64), "{metrics}");
    assert!(metrics.contains("spa_round_phase_seconds_count{phase=\"masked_input\"} 3\n"), "{metrics}");

    for d in devices.iter_mut() {
        d.stop();
    }
    // Each device fitted its personal model (SPA v2) against the version it adopted; on its
    // held-out text it beats the global adapter (the body alone) and the backbone.
    for d in &devices {
        let store = spa_client::store::ClientStore::open(&d.home).unwrap();
        let stored = store.personal().unwrap().unwrap_or_else(|| panic!("{}: no personal model", d.id));
        let r: spa_client::personal::PersonalRecord = serde_json::from_slice(&stored.record).unwrap();
        assert_eq!(r.global_version, Some(3), "{}: {r:?}", d.id);
        let (v2, global, backbone) = (r.heldout.unwrap(), r.heldout_global.unwrap(), r.heldout_backbone.unwrap());
        assert!(v2.loss < global.loss && global.loss < backbone.loss, "{}: v2 {v2:?} global {global:?} backbone {backbone:?}", d.id);
    }
    // What device 0 sent over three rounds: no 16-byte run of any private tensor is in it.
    let sent = std::fs::read(&capture).unwrap();
    let store = spa_client::store::ClientStore::open(&devices[0].home).unwrap();
    let stored = store.personal().unwrap().expect("device 0 saved its personal model");
    let mut private = ParamSet::from_safetensors(&stored.params).unwrap();
    // The private memory too: its keys come from the device's own text.
    if let Some(d) = stored.datastore.as_deref() {
        let d = spa_model::personal::knn::Datastore::from_bytes(d).unwrap();
        private.tensors.insert("datastore.keys".into(), spa_model::side::NamedTensor { shape: vec![d.keys.len()], values: d.keys });
    }
    let shared_params = coord.checkpoint(0).len();
    // Per round, the SecAgg+ messages (keys, shares, masked upload, reveals) cost about as
    // much as the shared parameters in f32: the masked vector is one u32 lane per parameter.
    let mut by_method: BTreeMap<String, usize> = BTreeMap::new();
    let mut at = 0;
    while at < sent.len() {
        let ml = u32::from_le_bytes(sent[at..at + 4].try_into().unwrap()) as usize;
        let method = String::from_utf8(sent[at + 4..at + 4 + ml].to_vec()).unwrap();
        let bl = u32::from_le_bytes(sent[at + 4 + ml..at + 8 + ml].try_into().unwrap()) as usize;
        *by_method.entry(method).or_default() += bl;
        at += 8 + ml + bl;
    }
    let round_bytes: usize = by_method.iter().filter(|(m, _)| m.starts_with("/spa.v1.Rounds/")).map(|(_, b)| b).sum();
    let ratio = round_bytes as f64 / (3.0 * shared_params as f64 * 4.0);
    eprintln!("device 0 sent per method over 3 rounds: {by_method:?}; round messages / (3 x shared params x 4 B) = {ratio:.4}");
    assert!(ratio > 1.0 && ratio <= 1.01, "bytes per round / (shared params x 4) = {ratio}");
    let leaks = |hay: &[u8]| -> usize {
        let mut found = 0;
        for t in private.tensors.values() {
            let bytes: Vec<u8> = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
            for w in bytes.chunks_exact(16).step_by(4) {
                if w.iter().any(|&b| b != 0) && hay.windows(16).any(|h| h == w) {
                    found += 1;
                }
            }
        }
        found
    };
    assert!(!private.tensors.is_empty());
    assert_eq!(leaks(&sent), 0, "private tensor bytes left the device");
    // The detector itself works: the same search finds private bytes planted in the capture.
    let mut planted = sent.clone();
    let t0 = private.tensors.values().next().unwrap();
    planted.extend(t0.values.iter().take(64).flat_map(|v| v.to_le_bytes()));
    assert!(leaks(&planted) > 0);
    for d in &devices {
        eprintln!("--- {}:\n{}", d.id, std::fs::read_to_string(d.home.join("agent.log")).unwrap_or_default());
    }
}

#[test]
fn below_threshold_aborts_and_coordinator_crashes_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut coord = Coordinator::init(dir.path(), 60);
    coord.start(None);
    let mut devices: Vec<Device> = (0..3).map(|i| Device::enroll(dir.path(), &coord, i, 12)).collect();
    // n = 3 needs all three masked inputs (threshold 2 + 1): one death aborts the round.
    devices[0].run(&[("SPA_FAULT_EXIT_AT", "masked_input")]);
    devices[1].run(&[]);
    devices[2].run(&[]);
    coord.admin(&["round", "start", "--rounds", "1", "--min-clients", "2", "--max-clients", "3", "--deadline", "120"]);
    let r = coord.wait_round(1, Duration::from_secs(300));
    assert_eq!(r["state"], "aborted", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("U3"), "{r}");
    assert_eq!(coord.admin(&["status"])["global_version"], 0, "an aborted round commits nothing");
    devices[0].run(&[]);

    // One good round, then the coordinator is killed at each phase of the next ones.
    coord.admin(&["round", "start", "--rounds", "1", "--min-clients", "3", "--max-clients", "3", "--deadline", "120"]);
    let r = coord.wait_round(2, Duration::from_secs(300));
    assert_eq!(r["state"], "committed", "{r}");
    let v1 = coord.checkpoint(1);
    let mut round_id = 2;
    let mut version = 1;
    for phase in ["training", "share_keys", "masked_input", "unmask", "committed"] {
        coord.child.take().map(|mut c| {
            c.kill().unwrap();
            c.wait().unwrap()
        });
        coord.start(Some(phase));
        coord.admin(&["round", "start", "--rounds", "1", "--min-clients", "3", "--max-clients", "3", "--deadline", "120"]);
        round_id += 1;
        coord.wait_crash(Duration::from_secs(120));
        coord.start(None);
        let r = coord.round(round_id);
        if phase == "committed" {
            // Killed right after the commit transaction: the version is there, whole.
            assert_eq!(r["state"], "committed", "{r}");
            version += 1;
        } else {
            assert_eq!(r["state"], "aborted", "{phase}: {r}");
            assert_eq!(r["reason"].as_str().unwrap(), format!("the coordinator restarted or leadership changed during {phase}"));
        }
        assert_eq!(coord.admin(&["status"])["global_version"], version, "{phase}");
        assert_eq!(coord.checkpoint(1), v1, "committed version 1 changed after a crash at {phase}");
    }
    // After all that, rounds still work, here with distributed DP noise on the updates.
    coord.admin(&["round", "start", "--rounds", "1", "--min-clients", "3", "--max-clients", "3", "--deadline", "120", "--dp-clip", "1.0", "--dp-noise", "0.5"]);
    let r = coord.wait_round(round_id + 1, Duration::from_secs(300));
    assert_eq!(r["state"], "committed", "{r}");
    assert_eq!(r["committed_version"], version + 1);
    assert_eq!(r["plan"]["dp_l2_clip"], 1.0);
    // Clipped to norm 1 per device, plus noise of sigma 0.5 in total: the global moved, boundedly.
    let (a, b) = (coord.checkpoint(version), coord.checkpoint(version + 1));
    let step: f32 = a.iter().zip(&b).map(|(x, y)| (y - x) * (y - x)).sum::<f32>().sqrt();
    assert!(step > 0.0 && step.is_finite(), "{step}");
    assert!(coord.admin_fails(&["round", "start", "--dp-noise", "1.0"]).contains("dp"));
}

#[test]
fn a_revoked_device_agent_stops_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut coord = Coordinator::init(dir.path(), 1);
    coord.start(None);
    let mut d = Device::enroll(dir.path(), &coord, 0, 12);
    d.run(&[]);
    // Wait until the agent is connected and polling, then revoke it.
    let t = Instant::now();
    while !std::fs::read_to_string(d.home.join("agent.log")).unwrap_or_default().contains("connected as") {
        assert!(t.elapsed() < Duration::from_secs(60), "agent did not connect");
        std::thread::sleep(Duration::from_millis(100));
    }
    coord.admin(&["devices", "revoke", &d.id]);
    let mut child = d.agent.take().unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "the agent kept running after revocation");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(d.home.join("agent.log")).unwrap();
    assert!(log.contains("refuses this device") && log.contains("revoked"), "{log}");
}
