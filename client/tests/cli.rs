//! The `spa-client` binary against an in-process coordinator (TLS on loopback): the
//! walk-through of docs/OPERATIONS.md, including a restarted client process that keeps its
//! identity and trained plugin.
mod common;

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_spa-client");

fn client(home: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN).arg("--home").arg(home).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; returns its stderr.
fn client_fails(home: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN).arg("--home").arg(home).args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_binary_walkthrough() {
    let dir = tempfile::tempdir().unwrap();
    let coord = dir.path().join("coord");
    common::init_loopback_home(&coord);
    let srv = spa_coordinator::server::start(&coord).await.unwrap();
    let url = format!("https://{}", srv.addr);
    let cred = std::fs::read_to_string(coord.join("admin.credential")).unwrap();
    let ch = spa_coordinator::net::connect(&url, &std::fs::read(coord.join("tls/ca.pem")).unwrap()).await.unwrap();
    let req = spa_coordinator::admin_cli::with_admin(cred.trim(), spa_proto::v1::CreateTokenRequest { ttl_seconds: 600, note: String::new() }).unwrap();
    let token = spa_proto::v1::admin_client::AdminClient::new(ch).create_token(req).await.unwrap().into_inner().token;

    let home = dir.path().join("dev");
    let ca = coord.join("tls/ca.pem");
    let play = dir.path().join("play.txt");
    let mut text = String::new();
    for i in 0..12 {
        text.push_str(&format!("ANNA:\nGood morrow, sir, the {i} bells ring.\n\nBEN:\nAnd a merry morrow to you, fair Anna, the {i} bells are ours.\n\n"));
    }
    std::fs::write(&play, text).unwrap();
    let (ca_s, play_s) = (ca.to_str().unwrap().to_string(), play.to_str().unwrap().to_string());
    let out = tokio::task::spawn_blocking(move || {
        let e: serde_json::Value =
            serde_json::from_str(&client(&home, &["enroll", "--coordinator", &url, "--token", &token, "--ca", &ca_s, "--name", "cli", "--json"])).unwrap();
        let id = e["device_id"].as_str().unwrap().to_string();
        let a: serde_json::Value = serde_json::from_str(&client(&home, &["data", "add", &play_s, "--speaker", "BEN", "--json"])).unwrap();
        assert_eq!((a["examples"].as_u64(), a["format"].as_str()), (Some(12), Some("play")));
        let t: serde_json::Value = serde_json::from_str(&client(&home, &["train", "--epochs", "2", "--json"])).unwrap();
        assert!(t["steps"].as_u64().unwrap() > 0, "{t}");
        assert_eq!(t["epoch_kept"], serde_json::Value::Null, "no validation split by default: {t}");
        // With a validation split the report shows its loss per epoch and the epoch kept.
        let v: serde_json::Value = serde_json::from_str(&client(&home, &["train", "--epochs", "2", "--val-fraction", "0.3", "--json"])).unwrap();
        assert_eq!(v["val_losses"].as_array().map(Vec::len), Some(3), "{v}");
        assert!(v["epoch_kept"].as_u64().unwrap() <= 2, "{v}");
        let bad = client_fails(&home, &["train", "--val-fraction", "0.9"]);
        assert!(bad.contains("invalid training settings"), "{bad}");
        let g: serde_json::Value =
            serde_json::from_str(&client(&home, &["generate", "ANNA:\nGood morrow.\n\nBEN:\n", "--max-tokens", "16", "--json"])).unwrap();
        assert!(g["tokens"].as_u64().unwrap() > 0, "{g}");
        // Each command is a new process: identity and plugin come from the store.
        let s: serde_json::Value = serde_json::from_str(&client(&home, &["status", "--json"])).unwrap();
        assert_eq!(s["device_id"].as_str(), Some(id.as_str()));
        assert_eq!(s["coordinator_reachable"], true, "{s}");
        assert_eq!(s["trained"]["private_tensors"].as_u64(), Some(6), "{s}");
        let g2: serde_json::Value =
            serde_json::from_str(&client(&home, &["generate", "ANNA:\nGood morrow.\n\nBEN:\n", "--max-tokens", "16", "--json"])).unwrap();
        assert_eq!(g["text"], g2["text"]);
        // Bad input is a clear error, not a crash.
        assert!(client_fails(&home, &["data", "add", "/nonexistent/file"]).contains("/nonexistent/file"));
        id
    })
    .await
    .unwrap();
    assert!(out.starts_with("dev-"));

    // A device whose key is sealed with a passphrase: it works with the passphrase, and
    // without it says why rather than failing obscurely.
    let ch = spa_coordinator::net::connect(&format!("https://{}", srv.addr), &std::fs::read(&ca).unwrap()).await.unwrap();
    let req = spa_coordinator::admin_cli::with_admin(cred.trim(), spa_proto::v1::CreateTokenRequest { ttl_seconds: 600, note: String::new() }).unwrap();
    let token = spa_proto::v1::admin_client::AdminClient::new(ch).create_token(req).await.unwrap().into_inner().token;
    let (home2, url2, ca2) = (dir.path().join("sealed"), format!("https://{}", srv.addr), ca.to_str().unwrap().to_string());
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "a long device passphrase\n").unwrap();
    tokio::task::spawn_blocking(move || {
        let with_pass = |args: &[&str]| Command::new(BIN).arg("--home").arg(&home2).args(args).env("SPA_KEY_PASSPHRASE_FILE", &pass).output().unwrap();
        let out = with_pass(&["enroll", "--coordinator", &url2, "--token", &token, "--ca", &ca2, "--name", "sealed"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let s: serde_json::Value = serde_json::from_slice(&with_pass(&["status", "--json"]).stdout).unwrap();
        assert_eq!((s["key_sealed"].as_bool(), s["coordinator_reachable"].as_bool()), (Some(true), Some(true)), "{s}");
        let s: serde_json::Value = serde_json::from_str(&client(&home2, &["status", "--json"])).unwrap();
        assert_eq!(s["coordinator_reachable"], false, "{s}");
        assert!(s["coordinator_error"].as_str().unwrap().contains("sealed"), "{s}");
    })
    .await
    .unwrap();
    srv.shutdown().await.unwrap();
}
