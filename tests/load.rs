//! Many devices over the service: a real `spa-coordinator serve` process, and N light
//! devices in this process, each with its own enrolled identity and signed calls over loopback
//! TLS, running the SecAgg+ client machine on a random update instead of training (training
//! is what `client/tests/rounds.rs` and `tests/faults.rs` run, with one agent process per
//! device). Every round must commit with every device, the committed step must be the mean of
//! the devices' updates, and the coordinator's resident memory is sampled after each round.
//!
//! Short by default (CI): 30 devices, 3 rounds. By hand, for docs/BENCHMARKS.md:
//! `SPA_LOAD_DEVICES=1000 SPA_LOAD_ROUNDS=40` (load) and `SPA_LOAD_DEVICES=100
//! SPA_LOAD_ROUNDS=480` (soak: many short rounds; memory must stay flat).

use std::sync::Arc;
use std::time::{Duration, Instant};

use spa_proto::auth::now_ms;
use spa_proto::methods;
use spa_proto::v1::rounds_client::RoundsClient;
use spa_proto::v1::*;
use spa_testkit::light::{Error, FULL, Kill, Link, Part, Phase, Sums, device, enroll};
use spa_testkit::procs::Coordinator;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A device outside every cohort (enrolled, never polling) uploads to each round in turn, a
/// header and then lanes that never come: the coordinator must refuse it at the header,
/// before reading any lane (a buffering server would wait for the stream forever). Returns
/// how many uploads met a round in progress (PERMISSION_DENIED, not in the cohort).
async fn outsider_uploads(url: String, home: std::path::PathBuf, rounds: u64, stop: Arc<std::sync::atomic::AtomicBool>) -> usize {
    let ch = spa_coordinator::net::connect(&url, &std::fs::read(home.join("tls/ca.pem")).unwrap()).await.unwrap();
    let cred = std::fs::read_to_string(home.join("admin.credential")).unwrap().trim().to_string();
    let signer = enroll(&ch, &cred, "outsider").await;
    let mut refused = 0;
    let mut next = 1;
    while next <= rounds && !stop.load(std::sync::atomic::Ordering::Relaxed) {
        // The round expected next, or the one after if that one was missed.
        for round_id in [next, next + 1] {
            let header =
                MaskedUpload { kind: Some(masked_upload::Kind::Header(MaskedUploadHeader { round_id, client_id: 1, lanes: 53_793, sha256: vec![0; 32] })) };
            let h = signer.sign(methods::ROUNDS_UPLOAD_MASKED, &header, now_ms());
            let lanes = tokio_stream::StreamExt::chain(tokio_stream::iter([header]), tokio_stream::pending());
            let mut req = tonic::Request::new(lanes);
            h.apply(req.metadata_mut());
            let mut rpc = RoundsClient::new(ch.clone());
            let call = rpc.upload_masked(req);
            let e = tokio::time::timeout(Duration::from_secs(10), call).await.expect("an outsider's upload was read past its header").unwrap_err();
            match e.code() {
                tonic::Code::PermissionDenied => {
                    refused += 1;
                    next = round_id + 1;
                    break;
                }
                // No round in progress (not yet, or over).
                tonic::Code::FailedPrecondition if e.message().contains("not in progress") => {}
                _ => panic!("outsider upload: {e:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    refused
}

/// The size of the files under `dir`, in MB.
fn dir_mb(dir: &std::path::Path) -> f64 {
    let mut bytes = 0u64;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        bytes += if p.is_dir() { (dir_mb(&p) * 1e6) as u64 } else { e.metadata().map_or(0, |m| m.len()) };
    }
    bytes as f64 / 1e6
}

/// Resident and peak resident memory of process `pid`, in MB.
fn rss_mb(pid: u32) -> (f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| s.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok()).unwrap_or(0.0);
    (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0)
}

#[test]
fn many_devices_run_rounds_over_the_service_in_flat_memory() {
    let (n, rounds) = (env_or("SPA_LOAD_DEVICES", 30), env_or("SPA_LOAD_ROUNDS", 3));
    let tmp = tempfile::tempdir().unwrap();
    let mut coord = Coordinator::init(tmp.path(), 120);
    coord.edit_config(|c| {
        c.rounds.phase_timeout_secs = 120;
        c.rounds.online_secs = 30;
    });
    coord.start(None);
    let pid = coord.child.as_ref().unwrap().id();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let sums: Sums = Default::default();
    let t0 = Instant::now();
    let handles = rt.block_on(async {
        let ca = std::fs::read(coord.home.join("tls/ca.pem")).unwrap();
        let cred = std::fs::read_to_string(coord.home.join("admin.credential")).unwrap().trim().to_string();
        // Devices share 50 connections (HTTP/2 streams): a thousand sockets each side would
        // pass the usual 1024 open files.
        let mut channels = Vec::new();
        for _ in 0..n.min(50) {
            channels.push(spa_coordinator::net::connect(&coord.url, &ca).await.unwrap());
        }
        let mut handles = Vec::new();
        for i in 0..n {
            let ch = channels[i % channels.len()].clone();
            let signer = enroll(&ch, &cred, &format!("light-{i}")).await;
            let link = Link { home: ch, ca: Arc::new(ca.clone()) };
            handles.push(tokio::spawn(device(link, signer, i as u64, rounds, sums.clone(), FULL)));
        }
        handles
    });
    eprintln!("{n} devices enrolled and polling in {:.1} s; coordinator RSS {:.0} MB", t0.elapsed().as_secs_f64(), rss_mb(pid).0);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outsider = rt.spawn(outsider_uploads(coord.url.clone(), coord.home.clone(), rounds as u64, stop.clone()));
    let n_s = n.to_string();
    coord.admin(&["round", "start", "--rounds", &rounds.to_string(), "--min-clients", &n_s, "--max-clients", &n_s, "--deadline", "300"]);
    let mut rss = Vec::new();
    for id in 1..=rounds as u64 {
        let r = coord.wait_round(id, Duration::from_secs(900));
        assert_eq!(r["state"], "committed", "{r}");
        assert_eq!(r["contributors"].as_array().unwrap().len(), n, "{r}");
        let (now, peak) = rss_mb(pid);
        rss.push(now);
        eprintln!(
            "round {id}: phases {} busy {} ms; coordinator RSS {now:.0} MB (peak {peak:.0}); store on disk {:.0} MB",
            r["phase_ms"],
            r["coordinator_busy_ms"],
            dir_mb(&coord.home.join("store"))
        );
        if id == 1 || id == rounds as u64 {
            // The committed step is the mean of the updates, up to quantization.
            let v = r["committed_version"].as_u64().unwrap();
            let (before, after) = (coord.checkpoint(v - 1), coord.checkpoint(v));
            let g = sums.lock().unwrap();
            let (sum, count) = &g.sums[&id];
            assert_eq!(*count, n);
            let err = (0..before.len()).map(|i| (after[i] - before[i] - (sum[i] / n as f64) as f32).abs()).fold(0f32, f32::max);
            assert!(err < 1e-3, "round {id}: the committed step differs from the mean update by {err}");
        }
    }
    rt.block_on(async {
        for h in handles {
            h.await.unwrap().unwrap();
        }
    });
    if rounds >= 2 {
        // Round records page back (all at once would outgrow the message limit: ~40 KB a
        // round at 1000 devices).
        let page = coord.admin(&["round", "list", "--limit", "2"]);
        let ids: Vec<u64> = page.as_array().unwrap().iter().map(|r| r["round_id"].as_u64().unwrap()).collect();
        assert_eq!(ids, [rounds as u64 - 1, rounds as u64]);
        let back = coord.admin(&["round", "list", "--limit", "1000", "--before", &ids[0].to_string()]);
        assert_eq!(back.as_array().unwrap().len(), rounds - 2);
        assert!(coord.admin_fails(&["round", "list", "--limit", "1001"]).contains("at most 1000"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let refused = rt.block_on(outsider).unwrap();
    assert!(refused > 0, "the outsider never found a round in progress to upload to");
    eprintln!("{n} devices, {rounds} rounds in {:.1} s; RSS after each round (MB): {rss:.0?}", t0.elapsed().as_secs_f64());
    // Flat memory in the steady state: the last quarter of the rounds holds, on average, at
    // most 10% more than the third. (Warming up takes time, not rounds: the replay cache fills
    // for one clock window, 300 s, and sled's page cache up to its cap; a fixed fraction of
    // the rounds is still warming up when rounds are short.) A leak of 0.1 MB a round over
    // 480 rounds fails it.
    if rounds >= 20 {
        let mean = |q: &[f64]| q.iter().sum::<f64>() / q.len() as f64;
        let (third, last) = (mean(&rss[rounds / 2..rounds * 3 / 4]), mean(&rss[rounds * 3 / 4..]));
        assert!(
            last <= third * 1.1,
            "coordinator memory still grows: {third:.0} MB on average over the third quarter of {rounds} rounds, {last:.0} MB over the last"
        );
    }
}

/// A sharded round over the service: 40 devices in two SecAgg+ shards of 20 placed by the
/// hash the spec fixes (recomputed here from the cohort), a floor of 15 per shard. Six of
/// shard 0's devices never upload: fourteen are left, enough for its threshold (12) but below
/// the floor, so shard 0 releases nothing and the round commits shard 1's mean alone.
#[test]
fn a_shard_below_its_floor_is_left_out_and_the_round_commits_the_others_mean() {
    let n = 40;
    let tmp = tempfile::tempdir().unwrap();
    let mut coord = Coordinator::init(tmp.path(), 120);
    coord.edit_config(|c| {
        c.rounds.phase_timeout_secs = 5;
        c.rounds.online_secs = 30;
        c.rounds.shard_size = 30;
        c.rounds.min_shard_contributors = 15;
    });
    coord.start(None);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let sums: Sums = Default::default();
    let (handles, shards, cohort) = rt.block_on(async {
        let ca = std::fs::read(coord.home.join("tls/ca.pem")).unwrap();
        let cred = std::fs::read_to_string(coord.home.join("admin.credential")).unwrap().trim().to_string();
        let ch = spa_coordinator::net::connect(&coord.url, &ca).await.unwrap();
        let mut signers = Vec::new();
        for i in 0..n {
            signers.push(enroll(&ch, &cred, &format!("light-{i}")).await);
        }
        // Round 1 on version 0, every device selected (the cohort is sorted by id).
        let mut cohort: Vec<String> = signers.iter().map(|s| s.device_id().to_string()).collect();
        cohort.sort();
        let shards = spa_aggregation::shards::assign(&spa_aggregation::shards::shard_seed(1, 0, &cohort), &cohort, 30, 15);
        let seat = |d: &str| cohort.iter().position(|c| c == d).unwrap() as u32 + 1;
        let handles: Vec<_> = signers
            .into_iter()
            .enumerate()
            .map(|(i, signer)| {
                let s = seat(signer.device_id());
                let part = match shards[0].iter().position(|&m| m == s) {
                    Some(k) => Part { uploads: k >= 6, counted: false, ..FULL },
                    None => FULL,
                };
                tokio::spawn(device(Link { home: ch.clone(), ca: Arc::new(ca.clone()) }, signer, i as u64, 1, sums.clone(), part))
            })
            .collect();
        (handles, shards, cohort)
    });
    assert_eq!(shards.iter().map(Vec::len).collect::<Vec<_>>(), [20, 20]);
    coord.admin(&["round", "start", "--rounds", "1", "--min-clients", "20", "--max-clients", "40", "--deadline", "120"]);
    let r = coord.wait_round(1, Duration::from_secs(300));
    assert_eq!(r["state"], "committed", "{r}");
    let got: Vec<&str> = r["cohort"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
    assert_eq!(got, cohort, "every device selected, in the order the placement was computed from");
    let device = |seat: u32| cohort[seat as usize - 1].as_str();
    let contributors: Vec<&str> = r["contributors"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
    let mut expected: Vec<&str> = shards[1].iter().map(|&s| device(s)).collect();
    expected.sort();
    assert_eq!(contributors, expected, "shard 1's devices, and only them");
    let summary = &r["shards"];
    assert_eq!(summary[0]["floor"], 15, "{summary}");
    assert!(summary[0]["failed"].as_str().unwrap().contains("U3 has 14, needs 15"), "{summary}");
    assert_eq!(summary[1]["contributors"], 20, "{summary}");
    for (k, &s) in shards[0].iter().enumerate() {
        let d = &r["dropouts"][device(s)];
        let kind = if k < 6 { "timed_out" } else { "shard_failed" };
        assert_eq!(d["reason"]["kind"], kind, "{d}");
    }
    // The committed step is shard 1's mean update, up to quantization.
    let (before, after) = (coord.checkpoint(0), coord.checkpoint(1));
    let g = sums.lock().unwrap();
    let (sum, count) = &g.sums[&1];
    assert_eq!(*count, 20);
    let err = (0..before.len()).map(|i| (after[i] - before[i] - (sum[i] / 20.0) as f32).abs()).fold(0f32, f32::max);
    assert!(err < 1e-3, "the committed step differs from shard 1's mean update by {err}");
    drop(g);
    rt.block_on(async {
        for h in handles {
            h.await.unwrap().unwrap();
        }
    });
}

/// Shards on aggregator processes (`serve --role aggregator`, mutual TLS with the leader's
/// role certificate): 60 devices in three shards of 20, shard i on aggregator i, floor 10.
/// An aggregator refuses a caller without a role certificate. In round 1 the aggregator of
/// shard 1 is SIGKILLed as the first ShareKeys request goes out: shard 1 leaves the round, the
/// round commits the mean of the other shards' devices. In round 2 the dead aggregator's
/// shard opens on the next one and every device contributes.
#[test]
fn shards_run_on_aggregator_processes_and_a_killed_one_loses_only_its_shard() {
    let n = 60;
    let tmp = tempfile::tempdir().unwrap();
    let mut coord = Coordinator::init(tmp.path(), 120);
    let aggs: Vec<Coordinator> = (0..3).map(|i| Coordinator::aggregator(tmp.path(), &format!("agg{i}"), &coord, 10)).collect();
    let urls: Vec<String> = aggs.iter().map(|a| a.url.clone()).collect();
    coord.edit_config(|c| {
        c.rounds.phase_timeout_secs = 5;
        c.rounds.online_secs = 30;
        c.rounds.shard_size = 20;
        c.rounds.min_shard_contributors = 10;
        c.rounds.aggregators = urls.clone();
    });
    coord.start(None);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ca = std::fs::read(coord.home.join("tls/ca.pem")).unwrap();
    rt.block_on(async {
        // The CA alone (a device's view) is not enough to reach an aggregator.
        let refused = async {
            let ch = spa_coordinator::net::connect(&urls[0], &ca).await?;
            let open = OpenShardRequest { key: Some(ShardKey { round_id: 99, shard: 0 }), session_config_json: String::new(), floor: 50, leader_term: 1 };
            spa_proto::v1::aggregator_client::AggregatorClient::new(ch).open_shard(open).await.map_err(Error::from)
        };
        assert!(refused.await.is_err(), "an aggregator served a caller without a role certificate");
    });
    let victim = aggs[1].child.as_ref().unwrap().id();
    let sums: Sums = Default::default();
    let handles = rt.block_on(async {
        let cred = std::fs::read_to_string(coord.home.join("admin.credential")).unwrap().trim().to_string();
        let ch = spa_coordinator::net::connect(&coord.url, &ca).await.unwrap();
        let mut handles = Vec::new();
        for i in 0..n {
            let signer = enroll(&ch, &cred, &format!("light-{i}")).await;
            let part = Part { lenient: true, kill: Some(Kill { pid: victim, round: 1, phase: Phase::ShareKeys }), ..FULL };
            handles.push(tokio::spawn(device(Link { home: ch.clone(), ca: Arc::new(ca.clone()) }, signer, i as u64, 2, sums.clone(), part)));
        }
        handles
    });
    coord.admin(&["round", "start", "--rounds", "2", "--min-clients", "20", "--max-clients", "60", "--deadline", "120"]);
    for round in [1u64, 2] {
        let r = coord.wait_round(round, Duration::from_secs(300));
        assert_eq!(r["state"], "committed", "{r}");
        let shards = r["shards"].as_array().unwrap();
        assert_eq!(shards.len(), 3, "{r}");
        let contributors: Vec<String> = r["contributors"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_string()).collect();
        if round == 1 {
            for (i, s) in shards.iter().enumerate() {
                assert_eq!(s["aggregator"], urls[i], "shard {i} of round 1 ran elsewhere: {s}");
            }
            assert!(shards[1]["failed"].as_str().unwrap().contains(&urls[1]), "{}", shards[1]);
            assert_eq!(contributors.len(), 40, "shards 0 and 2 contribute: {r}");
        } else {
            assert_eq!(shards[1]["aggregator"], urls[2], "the dead aggregator's shard opens on the next one: {}", shards[1]);
            assert!(shards.iter().all(|s| s["failed"].is_null()), "{r}");
            assert_eq!(contributors.len(), n, "{r}");
        }
        // The committed step is the contributors' mean update, up to quantization.
        let (before, after) = (coord.checkpoint(round - 1), coord.checkpoint(round));
        let g = sums.lock().unwrap();
        let mut mean = vec![0f64; before.len()];
        for d in &contributors {
            let delta = &g.each[&(round, d.clone())];
            mean.iter_mut().zip(delta).for_each(|(m, x)| *m += *x as f64 / contributors.len() as f64);
        }
        let err = (0..before.len()).map(|i| (after[i] - before[i] - mean[i] as f32).abs()).fold(0f32, f32::max);
        assert!(err < 1e-3, "round {round}: the committed step differs from the contributors' mean update by {err}");
    }
    rt.block_on(async {
        for h in handles {
            h.await.unwrap().unwrap();
        }
    });
}
