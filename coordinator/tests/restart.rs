//! The real binary: `init` refuses to overwrite; `serve` survives SIGKILL with devices,
//! tokens, nonces and checkpoints intact; the admin verbs work over TLS; SIGTERM shuts down
//! gracefully.
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use spa_proto::auth::now_ms;
use spa_proto::methods;
use spa_proto::v1::PingRequest;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_spa-coordinator");

// The caller owns (kills and waits for) the child it gets back.
#[allow(clippy::zombie_processes)]
fn serve(home: &Path) -> (Child, String) {
    let _ = std::fs::remove_file(home.join("serve.addr"));
    let mut child = Command::new(BIN).args(["serve", "--home"]).arg(home).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(home.join("serve.addr"))
            && s.ends_with('\n')
        {
            return (child, s.trim().to_string());
        }
        if t.elapsed() > Duration::from_secs(60) {
            // Not left running behind a failed test.
            let _ = child.kill();
            let _ = child.wait();
            panic!("coordinator did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cli(home: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN).args(args).arg("--home").arg(home).arg("--json").output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn state_survives_sigkill_and_sigterm_is_graceful() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("coord");
    let out = Command::new(BIN).args(["init", "--home"]).arg(&home).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p = home.join("coordinator.toml");
    std::fs::write(&p, std::fs::read_to_string(&p).unwrap().replace("127.0.0.1:7443", "127.0.0.1:0")).unwrap();
    // init never overwrites.
    let out = Command::new(BIN).args(["init", "--home"]).arg(&home).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut child, url) = serve(&home);
    let tok1 = cli(&home, &["token", "create", "--ttl", "1h"])["token"].as_str().unwrap().to_string();
    let tok2 = cli(&home, &["token", "create", "--ttl", "1h"])["token"].as_str().unwrap().to_string();
    let (a, replays) = rt.block_on(async {
        let ch = channel(&url, &home).await;
        let a = enroll(&ch, &tok1, "alpha").await.unwrap();
        // Requests accepted before the crash: one dated now, one by a clock 60 s fast...
        let mut signed = Vec::new();
        for ts in [now_ms(), now_ms() + 60_000] {
            let h = a.sign(methods::DEVICE_PING, &PingRequest {}, ts);
            let mut r = tonic::Request::new(PingRequest {});
            h.apply(r.metadata_mut());
            device(&ch).ping(r).await.unwrap();
            signed.push(h);
        }
        (a, signed)
    });
    let devices = cli(&home, &["devices", "list"]);
    assert_eq!(devices.as_array().unwrap().len(), 1);
    // Let the 2 s tick write the last-call time and sled's background flush the future-dated
    // nonce (neither is acknowledged state).
    std::thread::sleep(Duration::from_millis(2500));

    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let (child, url) = serve(&home);
    let devices = cli(&home, &["devices", "list"]);
    assert!(devices[0]["last_seen_ms"].as_u64().unwrap() > 0, "{devices}");
    rt.block_on(async {
        let ch = channel(&url, &home).await;
        // The device is still enrolled and can call.
        ping(&ch, &a).await.unwrap();
        // ...are still refused after it: the first as dated before the restart, the second by
        // its persisted nonce.
        for (h, code) in replays.iter().zip([Code::FailedPrecondition, Code::Unauthenticated]) {
            let mut r = tonic::Request::new(PingRequest {});
            h.apply(r.metadata_mut());
            let e = device(&ch).ping(r).await.unwrap_err();
            assert!(e.message().contains("replay") && e.code() == code, "{e:?}");
        }
        // The unused token is still valid; the used one still used.
        assert!(enroll(&ch, &tok1, "again").await.is_err());
        enroll(&ch, &tok2, "beta").await.unwrap();
    });
    // A spare token revoked by its id can no longer enroll; the list shows each state.
    let tok3 = cli(&home, &["token", "create", "--ttl", "1h", "--note", "spare"]);
    let id3 = tok3["token_id"].as_str().unwrap();
    assert_eq!(cli(&home, &["token", "revoke", id3])["was_usable"], true);
    assert_eq!(cli(&home, &["token", "revoke", id3])["was_usable"], false);
    let e = rt.block_on(async { enroll(&channel(&url, &home).await, tok3["token"].as_str().unwrap(), "gamma").await.unwrap_err() });
    assert!(e.message().contains("revoked"), "{e:?}");
    let states: Vec<_> = cli(&home, &["token", "list"]).as_array().unwrap().iter().map(|t| t["state"].as_str().unwrap().to_string()).collect();
    assert_eq!(states, ["used", "used", "revoked"]);
    let out = Command::new(BIN).args(["token", "revoke", "tok-nonexistent", "--home"]).arg(&home).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unknown enrollment token id"));
    let devices = cli(&home, &["devices", "list"]);
    assert_eq!(devices.as_array().unwrap().len(), 2);
    let id = a.device_id().to_string();
    let r = cli(&home, &["devices", "revoke", &id]);
    assert_eq!(r["was_active"], true);
    let st = cli(&home, &["status"]);
    assert_eq!(st["active_devices"], 1);

    // SIGTERM: graceful shutdown, exit status 0.
    let st = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let mut child = child;
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no graceful shutdown");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");

    // The store holds the state: one checkpoint commit (not re-seeded), the revocation.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = spa_coordinator::store::Store::open(&home.join("store")).unwrap();
        assert_eq!(store.latest_checkpoint_version().await.unwrap(), Some(0));
        let events = store.events().await.unwrap();
        assert_eq!(events.iter().filter(|e| e.kind == "checkpoint.commit").count(), 1);
        assert!(events.iter().any(|e| e.kind == "device.revoke"));
        assert!(store.device(&id).await.unwrap().unwrap().revoked);
    });

    // A new server key and certificate from the same CA: devices connect with the CA they
    // have, and enroll and call as before.
    let before = std::fs::read(home.join("tls/server.pem")).unwrap();
    let r = cli(&home, &["rotate-tls"]);
    assert_eq!(r["names"], serde_json::json!(["localhost", "127.0.0.1"]), "init's names kept");
    assert_ne!(std::fs::read(home.join("tls/server.pem")).unwrap(), before);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(home.join("tls/server.key")).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let (mut child, url) = serve(&home);
    let tok = cli(&home, &["token", "create", "--ttl", "1h"])["token"].as_str().unwrap().to_string();
    rt.block_on(async {
        let ch = channel(&url, &home).await;
        let d = enroll(&ch, &tok, "after-rotation").await.unwrap();
        ping(&ch, &d).await.unwrap();
    });
    child.kill().unwrap();
    child.wait().unwrap();
}
