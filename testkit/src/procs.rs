//! Real processes on loopback for end-to-end tests: a `spa-coordinator serve` process with
//! its admin CLI, and device homes with one `spa-client run` agent process each. Shared by
//! client/tests/rounds.rs, tests/faults.rs and tests/load.rs.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use spa_coordinator::config::CoordinatorConfig;
use spa_model::side::ParamSet;

/// A binary of the same build (`cargo test --workspace` builds them all next to `deps/`).
pub fn bin(name: &str) -> PathBuf {
    let p = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join(name);
    assert!(p.exists(), "{} not built: run the tests with `cargo test --release --workspace`", p.display());
    p
}

pub fn coordinator_bin() -> PathBuf {
    bin("spa-coordinator")
}

fn client_bin() -> PathBuf {
    bin("spa-client")
}

pub struct Coordinator {
    pub home: PathBuf,
    pub child: Option<Child>,
    pub url: String,
}

impl Coordinator {
    pub fn init(dir: &Path, grace_secs: u64) -> Self {
        let home = dir.join("coord");
        crate::init_loopback_home(&home);
        let mut cfg = CoordinatorConfig::load(&home).unwrap();
        cfg.rounds.online_secs = 5;
        cfg.rounds.selection_grace_secs = grace_secs;
        cfg.rounds.phase_timeout_secs = 20;
        cfg.server.metrics_listen = "127.0.0.1:0".into();
        cfg.save(&home).unwrap();
        Self { home, child: None, url: String::new() }
    }

    /// An aggregator process (`serve --role aggregator`) in `dir/<name>`, with `of`'s TLS
    /// material (the deployment's CA, its server certificate), releasing sums of at least
    /// `floor` contributors; started.
    pub fn aggregator(dir: &Path, name: &str, of: &Coordinator, floor: u64) -> Self {
        let home = dir.join(name);
        crate::init_loopback_home(&home);
        for f in ["ca.pem", "server.pem", "server.key", "role.pem", "role.key"] {
            std::fs::copy(of.home.join("tls").join(f), home.join("tls").join(f)).unwrap();
        }
        let mut agg = Self { home, child: None, url: String::new() };
        agg.edit_config(|c| c.rounds.min_shard_contributors = floor);
        let mut cmd = Command::new(coordinator_bin());
        cmd.args(["serve", "--role", "aggregator", "--home"]).arg(&agg.home);
        agg.spawn(cmd);
        agg
    }

    /// A replica's home in `dir/<name>` on `pg` (not started); with `peer`, sharing its TLS
    /// material and admin credential (a deployment's replicas do: devices trust one CA,
    /// operators hold one credential). A 1 s leadership lease and membership.
    pub fn replica_home(dir: &Path, name: &str, pg: &crate::postgres::Cluster, peer: Option<&Coordinator>) -> Self {
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let c = Coordinator::init(&sub, 0);
        if let Some(p) = peer {
            for f in std::fs::read_dir(p.home.join("tls")).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, c.home.join("tls").join(f.file_name().unwrap())).unwrap();
            }
            std::fs::copy(p.home.join("admin.credential"), c.home.join("admin.credential")).unwrap();
        }
        let file = c.home.join("postgres.conninfo");
        std::fs::write(&file, &pg.conninfo).unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        c.edit_config(|cfg| {
            cfg.server.store_backend = spa_coordinator::config::StoreBackend::Postgres;
            cfg.rounds.leader_lease_secs = 1;
            cfg.server.member_lease_secs = 1;
        });
        c
    }

    /// Starts `serve --role <role>` with `env` (fault injection) and waits until it serves.
    pub fn start_role(&mut self, role: &str, env: &[(&str, &str)]) {
        let mut cmd = Command::new(coordinator_bin());
        cmd.args(["serve", "--role", role, "--home"]).arg(&self.home).envs(env.iter().copied());
        self.spawn(cmd);
    }

    /// Changes coordinator.toml (before [`Self::start`]).
    pub fn edit_config(&self, edit: impl FnOnce(&mut CoordinatorConfig)) {
        let mut cfg = CoordinatorConfig::load(&self.home).unwrap();
        edit(&mut cfg);
        cfg.save(&self.home).unwrap();
    }

    /// Starts `serve`; with `crash_at`, the process aborts right after that round state is durable.
    pub fn start(&mut self, crash_at: Option<&str>) {
        let mut cmd = Command::new(coordinator_bin());
        cmd.args(["serve", "--home"]).arg(&self.home);
        if let Some(s) = crash_at {
            cmd.env("SPA_FAULT_CRASH_AT", s);
        }
        self.spawn(cmd);
    }

    /// Starts `cmd`, which runs `serve` on this home (wrapped in another program, say), and
    /// waits until it serves.
    pub fn spawn(&mut self, mut cmd: Command) {
        let _ = std::fs::remove_file(self.home.join("serve.addr"));
        cmd.stdout(Stdio::null());
        cmd.stderr(std::fs::OpenOptions::new().create(true).append(true).open(self.home.join("serve.log")).unwrap());
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
    pub fn wait_crash(&mut self, timeout: Duration) {
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

    pub fn admin(&self, args: &[&str]) -> Value {
        let out = Command::new(coordinator_bin()).args(args).arg("--home").arg(&self.home).arg("--json").output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn admin_fails(&self, args: &[&str]) -> String {
        self.admin_exit(args).1
    }

    /// A failing admin command's exit code and stderr.
    pub fn admin_exit(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(coordinator_bin()).args(args).arg("--home").arg(&self.home).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// The body of `GET /metrics` on the coordinator's Prometheus endpoint.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let url = std::fs::read_to_string(self.home.join("metrics.addr")).unwrap();
        let addr = url.trim().trim_start_matches("http://").trim_end_matches("/metrics").to_string();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// Whether this coordinator holds the leadership lease (`spa_leader 1` on its metrics).
    pub fn leads(&self) -> bool {
        self.metrics().lines().any(|l| l == "spa_leader 1")
    }

    pub fn round(&self, id: u64) -> Value {
        self.admin(&["round", "status", &id.to_string()])
    }

    /// Polls until round `id` exists and is committed or aborted.
    pub fn wait_round(&self, id: u64, timeout: Duration) -> Value {
        self.wait_round_state(id, &["committed", "aborted"], timeout)
    }

    /// Polls until round `id` exists and is in one of `states`.
    pub fn wait_round_state(&self, id: u64, states: &[&str], timeout: Duration) -> Value {
        let t = Instant::now();
        loop {
            let out = Command::new(coordinator_bin()).args(["round", "status", &id.to_string(), "--json", "--home"]).arg(&self.home).output().unwrap();
            if out.status.success() {
                let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                if states.iter().any(|s| v["state"] == *s) {
                    return v;
                }
            }
            assert!(t.elapsed() < timeout, "round {id} did not reach {states:?}: {}", String::from_utf8_lossy(&out.stdout));
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn checkpoint(&self, version: u64) -> Vec<f32> {
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

pub struct Device {
    pub home: PathBuf,
    pub id: String,
    pub agent: Option<Child>,
}

impl Device {
    /// Enrolls with a fresh token and adds `examples` synthetic examples of user `index`.
    pub fn enroll(dir: &Path, coord: &Coordinator, index: usize, examples: usize) -> Self {
        Self::enroll_via(dir, coord, &coord.url, index, examples)
    }

    /// [`Self::enroll`] through `url` (a proxy in front of the coordinator): the agent
    /// reaches the coordinator only that way.
    pub fn enroll_via(dir: &Path, coord: &Coordinator, url: &str, index: usize, examples: usize) -> Self {
        let token = coord.admin(&["token", "create"])["token"].as_str().unwrap().to_string();
        let home = dir.join(format!("dev{index}"));
        let ca = coord.home.join("tls/ca.pem");
        let st = Command::new(client_bin())
            .arg("--home")
            .arg(&home)
            .args(["enroll", "--coordinator", url, "--token", &token, "--name", &format!("device-{index}"), "--ca"])
            .arg(&ca)
            .output()
            .unwrap();
        assert!(st.status.success(), "enroll: {}", String::from_utf8_lossy(&st.stderr));
        let user = spa_model::data::synthetic::synthetic_users(index + 1, examples, 7).pop().unwrap();
        let jsonl: String =
            user.train.iter().chain(&user.test).map(|e| serde_json::json!({ "input": e.prompt, "output": e.reply }).to_string() + "\n").collect();
        let data = home.join("data.jsonl");
        std::fs::write(&data, jsonl).unwrap();
        let st = Command::new(client_bin()).arg("--home").arg(&home).args(["data", "add"]).arg(&data).output().unwrap();
        assert!(st.status.success(), "data add: {}", String::from_utf8_lossy(&st.stderr));
        let st = Command::new(client_bin()).arg("--home").arg(&home).args(["status", "--offline", "--json"]).output().unwrap();
        let v: Value = serde_json::from_slice(&st.stdout).unwrap();
        let id = v["device_id"].as_str().expect("status names the device").to_string();
        Self { home, id, agent: None }
    }

    pub fn run(&mut self, env: &[(&str, &str)]) {
        let mut cmd = Command::new(client_bin());
        cmd.arg("--home").arg(&self.home).args(["run", "--max-backoff", "1"]).stdout(Stdio::null());
        cmd.stderr(std::fs::OpenOptions::new().create(true).append(true).open(self.home.join("agent.log")).unwrap());
        cmd.env("SPA_TEST_DUMP_UPDATES", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.agent = Some(cmd.spawn().unwrap());
    }

    pub fn agent_exited(&mut self) -> bool {
        self.agent.as_mut().is_some_and(|c| c.try_wait().unwrap().is_some())
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn update(&self, round: u64) -> (Vec<f32>, f64) {
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

pub fn ids(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

/// The committed change of the global parameters must be the weighted mean of the
/// contributors' (clipped) plaintext updates, up to quantization.
pub fn check_aggregate(coord: &Coordinator, devices: &[Device], round: &Value) {
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
