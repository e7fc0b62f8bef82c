//! The `spa-client` binary against an in-process coordinator (TLS on loopback): the
//! walk-through of docs/OPERATIONS.md, including a restarted client process that keeps its
//! identity and trained plugin.

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
    spa_testkit::init_loopback_home(&coord);
    let srv = spa_coordinator::server::start(&coord).await.unwrap();
    let url = format!("https://{}", srv.addr);
    let (_, token) = admin_and_token(&coord, srv.addr).await;

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
        // The personal model, fitted on 6 train examples, its choices on 5 validation ones,
        // scored on the last one.
        let t: serde_json::Value = serde_json::from_str(&client(&home, &["train", "--epochs", "2", "--json"])).unwrap();
        assert_eq!((t["train_examples"].as_u64(), t["val_examples"].as_u64(), t["heldout_examples"].as_u64()), (Some(6), Some(5), Some(1)), "{t}");
        assert_eq!(t["personal"]["stages"].as_array().map(Vec::len), Some(6), "{t}");
        assert!(t["heldout"]["loss"].as_f64().unwrap() < t["heldout_backbone"]["loss"].as_f64().unwrap(), "{t}");
        let bad = client_fails(&home, &["train", "--lr=-1"]);
        assert!(bad.contains("invalid personal model settings"), "{bad}");
        let g: serde_json::Value =
            serde_json::from_str(&client(&home, &["generate", "ANNA:\nGood morrow.\n\nBEN:\n", "--max-tokens", "16", "--json"])).unwrap();
        assert!(g["tokens"].as_u64().unwrap() > 0, "{g}");
        // Each command is a new process: identity and plugin come from the store.
        let s: serde_json::Value = serde_json::from_str(&client(&home, &["status", "--json"])).unwrap();
        assert_eq!(s["device_id"].as_str(), Some(id.as_str()));
        assert_eq!(s["coordinator_reachable"], true, "{s}");
        // At least the gate's four tensors are private (and a personal side network's, if kept).
        assert!(s["trained"]["private_tensors"].as_u64().unwrap() >= 4, "{s}");
        assert!(s["personal"]["meta"]["threshold"].as_f64().is_some(), "{s}");
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
    let (_, token) = admin_and_token(&coord, srv.addr).await;
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

/// An admin client of the in-process coordinator, and a fresh enrollment token.
async fn admin_and_token(coord: &Path, addr: std::net::SocketAddr) -> (spa_proto::v1::admin_client::AdminClient<tonic::transport::Channel>, String) {
    let cred = std::fs::read_to_string(coord.join("admin.credential")).unwrap();
    let ch = spa_coordinator::net::connect(&format!("https://{addr}"), &std::fs::read(coord.join("tls/ca.pem")).unwrap()).await.unwrap();
    let mut admin = spa_proto::v1::admin_client::AdminClient::new(ch);
    let req = spa_coordinator::admin_cli::with_admin(cred.trim(), spa_proto::v1::CreateTokenRequest { ttl_seconds: 600, note: String::new() }).unwrap();
    let token = admin.create_token(req).await.unwrap().into_inner().token;
    (admin, token)
}

/// A ping signed by `pkcs8` as device `id`: the coordinator's answer code.
async fn ping_code(addr: std::net::SocketAddr, ca: &Path, pkcs8: &[u8], id: &str) -> tonic::Code {
    let ch = spa_coordinator::net::connect(&format!("https://{addr}"), &std::fs::read(ca).unwrap()).await.unwrap();
    let signer = spa_proto::auth::DeviceSigner::from_pkcs8(pkcs8, id).unwrap();
    let req = signer.request(spa_proto::methods::DEVICE_PING, spa_proto::v1::PingRequest {});
    match spa_proto::v1::device_client::DeviceClient::new(ch).ping(req).await {
        Ok(_) => tonic::Code::Ok,
        Err(e) => e.code(),
    }
}

/// `rotate-key`: same device id, new key (sealed when a passphrase is given), the old key
/// refused and never enrollable again; a rotation interrupted after the coordinator took the
/// new key, or before it heard of it, is finished by the next run; a bad proof is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_rotates_its_key_in_place() {
    use spa_client::store::ClientStore;
    let dir = tempfile::tempdir().unwrap();
    let coord = dir.path().join("coord");
    spa_testkit::init_loopback_home(&coord);
    let srv = spa_coordinator::server::start(&coord).await.unwrap();
    let addr = srv.addr;
    let (mut admin, token) = admin_and_token(&coord, addr).await;
    let (home, ca) = (dir.path().join("dev"), coord.join("tls/ca.pem"));
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "a long device passphrase\n").unwrap();
    let (h, c, p) = (home.clone(), ca.clone(), pass.clone());
    let (id, old_key, rotated) = tokio::task::spawn_blocking(move || {
        let url = format!("https://{addr}");
        let e: serde_json::Value =
            serde_json::from_str(&client(&h, &["enroll", "--coordinator", &url, "--token", &token, "--ca", c.to_str().unwrap(), "--json"])).unwrap();
        let old_key = ClientStore::open(&h).unwrap().require_identity(None).unwrap().0;
        // Rotating with a passphrase seals the new key.
        let out = Command::new(BIN).arg("--home").arg(&h).args(["rotate-key", "--json"]).env("SPA_KEY_PASSPHRASE_FILE", &p).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (e["device_id"].as_str().unwrap().to_string(), old_key, r)
    })
    .await
    .unwrap();
    assert_eq!(
        (rotated["device_id"].as_str(), rotated["key_sealed"].as_bool(), rotated["finished_interrupted"].as_bool()),
        (Some(id.as_str()), Some(true), Some(false)),
        "{rotated}"
    );
    let store = ClientStore::open(&home).unwrap();
    assert!(store.key_sealed().unwrap());
    let new_key = store.require_identity(Some(b"a long device passphrase")).unwrap().0;
    drop(store);
    assert_eq!(ping_code(addr, &ca, &new_key, &id).await, tonic::Code::Ok);
    assert_eq!(ping_code(addr, &ca, &old_key, &id).await, tonic::Code::Unauthenticated);
    // The old key cannot enroll again (as a new device) with a fresh token.
    let (_, token2) = admin_and_token(&coord, addr).await;
    let ch = spa_coordinator::net::connect(&format!("https://{addr}"), &std::fs::read(&ca).unwrap()).await.unwrap();
    let old_pk = spa_proto::auth::public_key_of(&old_key).unwrap().to_vec();
    let e = spa_proto::v1::device_client::DeviceClient::new(ch.clone())
        .enroll(spa_proto::v1::EnrollRequest { token: token2, public_key: old_pk, name: "again".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");

    // A bad proof (signed by another key) is refused and changes nothing.
    let signer = spa_proto::auth::DeviceSigner::from_pkcs8(&new_key, id.clone()).unwrap();
    let other = spa_proto::auth::DeviceSigner::from_pkcs8(&spa_proto::auth::generate_pkcs8().unwrap(), id.clone()).unwrap();
    let bogus = spa_proto::auth::DeviceSigner::from_pkcs8(&spa_proto::auth::generate_pkcs8().unwrap(), id.clone()).unwrap();
    let pk = other.public_key();
    let body = spa_proto::v1::RotateKeyRequest { new_public_key: pk.to_vec(), proof: bogus.sign_raw(&spa_proto::auth::rotation_message(&id, &pk)).to_vec() };
    let e =
        spa_proto::v1::device_client::DeviceClient::new(ch.clone()).rotate_key(signer.request(spa_proto::methods::DEVICE_ROTATE_KEY, body)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert_eq!(ping_code(addr, &ca, &new_key, &id).await, tonic::Code::Ok);

    // Interrupted after the coordinator took the next key (its answer lost): the next run
    // finds the coordinator accepts the stored next key and finishes.
    let next = spa_proto::auth::generate_pkcs8().unwrap();
    ClientStore::open(&home).unwrap().set_next_key(&next, Some(b"a long device passphrase")).unwrap();
    let n = spa_proto::auth::DeviceSigner::from_pkcs8(&next, id.clone()).unwrap();
    let pk = n.public_key();
    let body = spa_proto::v1::RotateKeyRequest { new_public_key: pk.to_vec(), proof: n.sign_raw(&spa_proto::auth::rotation_message(&id, &pk)).to_vec() };
    spa_proto::v1::device_client::DeviceClient::new(ch.clone()).rotate_key(signer.request(spa_proto::methods::DEVICE_ROTATE_KEY, body)).await.unwrap();
    let (h, p) = (home.clone(), pass.clone());
    let r = tokio::task::spawn_blocking(move || {
        let out = Command::new(BIN).arg("--home").arg(&h).args(["rotate-key", "--json"]).env("SPA_KEY_PASSPHRASE_FILE", &p).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // Interrupted before the coordinator heard of it: the stored next key is used.
        ClientStore::open(&h).unwrap().set_next_key(&spa_proto::auth::generate_pkcs8().unwrap(), Some(b"a long device passphrase")).unwrap();
        let out2 = Command::new(BIN).arg("--home").arg(&h).args(["rotate-key", "--json"]).env("SPA_KEY_PASSPHRASE_FILE", &p).output().unwrap();
        assert!(out2.status.success(), "{}", String::from_utf8_lossy(&out2.stderr));
        let s = Command::new(BIN).arg("--home").arg(&h).args(["status", "--json"]).env("SPA_KEY_PASSPHRASE_FILE", &p).output().unwrap();
        let v = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
        (v(&out.stdout), v(&out2.stdout), v(&s.stdout))
    })
    .await
    .unwrap();
    assert_eq!((r.0["finished_interrupted"].as_bool(), r.1["finished_interrupted"].as_bool()), (Some(true), Some(false)), "{r:?}");
    assert_eq!((r.2["device_id"].as_str(), r.2["coordinator_reachable"].as_bool()), (Some(id.as_str()), Some(true)), "{r:?}");
    assert_eq!(ping_code(addr, &ca, &next, &id).await, tonic::Code::Unauthenticated, "the key before the last rotation is refused");
    let cred = std::fs::read_to_string(coord.join("admin.credential")).unwrap();
    let list =
        admin.list_devices(spa_coordinator::admin_cli::with_admin(cred.trim(), spa_proto::v1::ListDevicesRequest {}).unwrap()).await.unwrap().into_inner();
    assert!(list.devices[0].key_rotated_at_ms > 0, "{list:?}");
    srv.shutdown().await.unwrap();
}
