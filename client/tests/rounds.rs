//! Federated rounds end to end with real processes on loopback: a `spa-coordinator serve`
//! process, one `spa-client run` agent process per device, and the operator's CLI. Devices
//! are killed mid-round (fault injection makes a process abort at a chosen phase, like
//! SIGKILL), and so is the coordinator, at each phase.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use spa_model::side::ParamSet;

const CLIENT: &str = env!("CARGO_BIN_EXE_spa-client");

/// The coordinator binary of the same build (`cargo test --workspace` builds it).
fn coordinator_bin() -> PathBuf {
    let p = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join("spa-coordinator");
    assert!(p.exists(), "{} not built: run the tests with `cargo test --release --workspace`", p.display());
    p
}

struct Coordinator {
    home: PathBuf,
    child: Option<Child>,
    url: String,
}

impl Coordinator {
    fn init(dir: &Path, grace_secs: u64) -> Self {
        let home = dir.join("coord");
        common::init_loopback_home(&home);
        let p = home.join("coordinator.toml");
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("online_secs = 15", "online_secs = 5")
            .replace("selection_grace_secs = 2", &format!("selection_grace_secs = {grace_secs}"))
            .replace("phase_timeout_secs = 60", "phase_timeout_secs = 20")
            .replace("metrics_listen = \"\"", "metrics_listen = \"127.0.0.1:0\"");
        std::fs::write(&p, text).unwrap();
        Self { home, child: None, url: String::new() }
    }

    /// Starts `serve`; with `crash_at`, the process aborts right after that round state is durable.
    fn start(&mut self, crash_at: Option<&str>) {
        let _ = std::fs::remove_file(self.home.join("serve.addr"));
        let mut cmd = Command::new(coordinator_bin());
        cmd.args(["serve", "--home"]).arg(&self.home).stdout(Stdio::null());
        cmd.stderr(std::fs::OpenOptions::new().create(true).append(true).open(self.home.join("serve.log")).unwrap());
        if let Some(s) = crash_at {
            cmd.env("SPA_FAULT_CRASH_AT", s);
        }
        self.child = Some(cmd.spawn().unwrap());
        let t = Instant::now();
        loop {
            if let Ok(s) = std::fs::read_to_string(self.home.join("serve.addr"))
                && s.ends_with('\n')
            {
                self.url = s.trim().to_string();
                // Restarts keep the port: devices stored this URL at enrollment.
                let p = self.home.join("coordinator.toml");
                let text = std::fs::read_to_string(&p).unwrap();
                let port = self.url.trim_start_matches("https://");
                std::fs::write(&p, text.replace("\nlisten = \"127.0.0.1:0\"", &format!("\nlisten = \"{port}\""))).unwrap();
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "coordinator did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to die by itself (fault injection).
    fn wait_crash(&mut self, timeout: Duration) {
        let mut c = self.child.take().unwrap();
        let t = Instant::now();
        loop {
            if c.try_wait().unwrap().is_some() {
                return;
            }
            assert!(t.elapsed() < timeout, "the coordinator did not reach its fault point");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn admin(&self, args: &[&str]) -> Value {
        let out = Command::new(coordinator_bin()).args(args).arg("--home").arg(&self.home).arg("--json").output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn admin_fails(&self, args: &[&str]) -> String {
        self.admin_exit(args).1
    }

    /// A failing admin command's exit code and stderr.
    fn admin_exit(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(coordinator_bin()).args(args).arg("--home").arg(&self.home).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// The body of `GET /metrics` on the coordinator's Prometheus endpoint.
    fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let url = std::fs::read_to_string(self.home.join("metrics.addr")).unwrap();
        let addr = url.trim().trim_start_matches("http://").trim_end_matches("/metrics").to_string();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn round(&self, id: u64) -> Value {
        self.admin(&["round", "status", &id.to_string()])
    }

    /// Polls until round `id` exists and is committed or aborted.
    fn wait_round(&self, id: u64, timeout: Duration) -> Value {
        let t = Instant::now();
        loop {
            let out = Command::new(coordinator_bin()).args(["round", "status", &id.to_string(), "--json", "--home"]).arg(&self.home).output().unwrap();
            if out.status.success() {
                let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                if v["state"] == "committed" || v["state"] == "aborted" {
                    return v;
                }
            }
            assert!(t.elapsed() < timeout, "round {id} did not finish: {}", String::from_utf8_lossy(&out.stdout));
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn checkpoint(&self, version: u64) -> Vec<f32> {
        let out = self.home.join(format!("v{version}.safetensors"));
        self.admin(&["checkpoint", "export", "--version", &version.to_string(), "--out", out.to_str().unwrap()]);
        ParamSet::from_safetensors(&std::fs::read(&out).unwrap()).unwrap().flatten()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Device {
    home: PathBuf,
    id: String,
    agent: Option<Child>,
}

impl Device {
    /// Enrolls with a fresh token and adds `examples` synthetic examples of user `index`.
    fn enroll(dir: &Path, coord: &Coordinator, index: usize, examples: usize) -> Self {
        let token = coord.admin(&["token", "create"])["token"].as_str().unwrap().to_string();
        let home = dir.join(format!("dev{index}"));
        let ca = coord.home.join("tls/ca.pem");
        let st = Command::new(CLIENT)
            .arg("--home")
            .arg(&home)
            .args(["enroll", "--coordinator", &coord.url, "--token", &token, "--name", &format!("device-{index}"), "--ca"])
            .arg(&ca)
            .output()
            .unwrap();
        assert!(st.status.success(), "enroll: {}", String::from_utf8_lossy(&st.stderr));
        let user = spa_model::data::synthetic::synthetic_users(index + 1, examples, 7).pop().unwrap();
        let jsonl: String =
            user.train.iter().chain(&user.test).map(|e| serde_json::json!({ "input": e.prompt, "output": e.reply }).to_string() + "\n").collect();
        let data = home.join("data.jsonl");
        std::fs::write(&data, jsonl).unwrap();
        let st = Command::new(CLIENT).arg("--home").arg(&home).args(["data", "add"]).arg(&data).output().unwrap();
        assert!(st.status.success(), "data add: {}", String::from_utf8_lossy(&st.stderr));
        let st = Command::new(CLIENT).arg("--home").arg(&home).args(["status", "--offline", "--json"]).output().unwrap();
        let v: Value = serde_json::from_slice(&st.stdout).unwrap();
        let id = v["device_id"].as_str().expect("status names the device").to_string();
        Self { home, id, agent: None }
    }

    fn run(&mut self, env: &[(&str, &str)]) {
        let mut cmd = Command::new(CLIENT);
        cmd.arg("--home").arg(&self.home).args(["run", "--max-backoff", "1"]).stdout(Stdio::null());
        cmd.stderr(std::fs::OpenOptions::new().create(true).append(true).open(self.home.join("agent.log")).unwrap());
        cmd.env("SPA_TEST_DUMP_UPDATES", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.agent = Some(cmd.spawn().unwrap());
    }

    fn agent_exited(&mut self) -> bool {
        self.agent.as_mut().is_some_and(|c| c.try_wait().unwrap().is_some())
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn update(&self, round: u64) -> (Vec<f32>, f64) {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(self.home.join(format!("update-round-{round}.json"))).unwrap()).unwrap();
        let d = v["delta"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        (d, v["weight"].as_f64().unwrap())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.stop();
    }
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

/// The committed change of the global parameters must be the weighted mean of the
/// contributors' (clipped) plaintext updates, up to quantization.
fn check_aggregate(coord: &Coordinator, devices: &[Device], round: &Value) {
    let v = round["committed_version"].as_u64().unwrap();
    let (before, after) = (coord.checkpoint(v - 1), coord.checkpoint(v));
    let by_id: BTreeMap<&str, &Device> = devices.iter().map(|d| (d.id.as_str(), d)).collect();
    let mut sum = vec![0f64; before.len()];
    let mut wsum = 0f64;
    for c in ids(&round["contributors"]) {
        let (d, w) = by_id[c.as_str()].update(round["round_id"].as_u64().unwrap());
        assert_eq!(d.len(), before.len());
        wsum += w;
        for (s, x) in sum.iter_mut().zip(d) {
            *s += w * x.clamp(-1.0, 1.0) as f64;
        }
    }
    let mut max_err = 0f32;
    let mut max_mag = 0f32;
    for i in 0..before.len() {
        let expected = (sum[i] / wsum) as f32;
        max_err = max_err.max((after[i] - before[i] - expected).abs());
        max_mag = max_mag.max(expected.abs());
    }
    assert!(max_mag > 1e-3, "updates are trivially small ({max_mag}); the check would prove nothing");
    assert!(max_err < 1e-3, "secure aggregate differs from the plaintext mean by {max_err}");
}

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
    // What device 0 sent over three rounds: no 16-byte run of any private tensor is in it.
    let sent = std::fs::read(&capture).unwrap();
    let store = spa_client::store::ClientStore::open(&devices[0].home).unwrap();
    let (_, private, _) = store.plugin().unwrap().expect("device 0 saved its plugin");
    let private = ParamSet::from_safetensors(&private).unwrap();
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
            assert_eq!(r["reason"].as_str().unwrap(), format!("coordinator restarted during {phase}"));
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
