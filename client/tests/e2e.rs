//! End to end on loopback with real TLS and real sled stores: a coordinator in-process, two
//! devices that enroll, add data, train their side plugin and gate from the coordinator's
//! features, and generate; then a client "restart" (stores reopened) keeps identity and
//! private layers.
mod common;

use std::path::Path;

use spa_client::ops;
use spa_model::train::TrainConfig;
use spa_proto::v1::CreateTokenRequest;
use spa_proto::v1::admin_client::AdminClient;

fn write_jsonl(path: &Path, user: &spa_model::data::UserData) {
    let lines: Vec<String> = user.train.iter().chain(&user.test).map(|e| serde_json::json!({"input": e.prompt, "output": e.reply}).to_string()).collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_enroll_train_generate_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let coord = dir.path().join("coord");
    common::init_loopback_home(&coord);
    let srv = spa_coordinator::server::start(&coord).await.unwrap();
    let url = format!("https://{}", srv.addr);
    let ca = std::fs::read_to_string(coord.join("tls/ca.pem")).unwrap();
    let cred = std::fs::read_to_string(coord.join("admin.credential")).unwrap();
    let ch = spa_coordinator::net::connect(&url, ca.as_bytes()).await.unwrap();
    let mut admin = AdminClient::new(ch);

    let users = spa_model::data::synthetic::synthetic_users(2, 30, 5);
    let train = TrainConfig { epochs: 2, batch_tokens: 512, ..TrainConfig::default() };
    let mut outputs = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let home = dir.path().join(format!("device-{i}"));
        let req = spa_coordinator::admin_cli::with_admin(cred.trim(), CreateTokenRequest { ttl_seconds: 600, note: String::new() }).unwrap();
        let token = admin.create_token(req).await.unwrap().into_inner().token;
        let e = ops::enroll(&home, &url, &token, &ca, &format!("device {i}")).await.unwrap();
        assert!(e.device_id.starts_with("dev-"));
        // A second enrollment of the same home is refused locally.
        assert!(ops::enroll(&home, &url, &token, &ca, "x").await.is_err());

        let data = dir.path().join(format!("user{i}.jsonl"));
        write_jsonl(&data, user);
        let src = ops::data_add(&home, &data, spa_client::data::Format::Auto, None).unwrap();
        assert_eq!((src.examples, src.format.as_str()), (30, "jsonl"));

        let s = ops::train(&home, &train, false, &mut ()).await.unwrap();
        assert_eq!((s.examples, s.heldout_examples, s.resumed), (30, 3, false));
        assert!(s.steps > 0 && s.epoch_losses.iter().all(|l| l.is_finite()));
        assert!(s.heldout.is_some());
        // Again: features come from the local cache, training resumes from the store.
        let s2 = ops::train(&home, &TrainConfig { epochs: 1, ..train.clone() }, false, &mut ()).await.unwrap();
        assert!(s2.resumed);

        let g = spa_client::generate::generate(&home, &user.test[0].prompt, &greedy(24), &mut |_| {}).await.unwrap();
        assert!(g.tokens > 0 && g.tokens <= 24, "{g:?}");
        // Speculative by default: fewer round trips than tokens, the per-token text.
        assert!(g.round_trips < g.tokens && g.drafted > 0, "{g:?}");
        let naive = spa_client::generate::GenerateOptions { naive: true, ..greedy(24) };
        let n = spa_client::generate::generate(&home, &user.test[0].prompt, &naive, &mut |_| {}).await.unwrap();
        assert_eq!((n.text.as_str(), n.round_trips, n.drafted), (g.text.as_str(), n.tokens, 0), "{n:?}");
        let st = ops::status(&home, false).await.unwrap();
        assert_eq!(st.coordinator_reachable, Some(true), "{st:?}");
        assert!(st.trained.is_some() && st.cached_features > 0 && st.cached_features <= 30, "{st:?}");
        outputs.push((home, e.device_id, g.text));
    }
    assert_ne!(outputs[0].1, outputs[1].1);

    // Client restart: a fresh open of each store has the same identity and private layers,
    // and greedy generation gives the same text.
    for (home, id, text) in &outputs {
        let store = spa_client::store::ClientStore::open(home).unwrap();
        let (_, ident) = store.require_identity(None).unwrap();
        assert_eq!(&ident.device_id, id);
        let (shared, private, meta) = store.plugin().unwrap().unwrap();
        let private = spa_model::side::ParamSet::from_safetensors(&private).unwrap();
        assert_eq!(private.tensors.len(), meta.private_tensors);
        assert!(private.tensors.keys().all(|k| k.starts_with("gate.") || k.starts_with("personal.")));
        assert!(spa_model::side::ParamSet::from_safetensors(&shared).unwrap().tensors.keys().all(|k| k.starts_with("side.")));
        drop(store);
        let prompt = "STRANGER:\nWhat news today?\n\n";
        let a = spa_client::generate::generate(home, prompt, &greedy(12), &mut |_| {}).await.unwrap();
        let b = spa_client::generate::generate(home, prompt, &greedy(12), &mut |_| {}).await.unwrap();
        assert_eq!(a.text, b.text);
        let _ = text;
    }
    srv.shutdown().await.unwrap();
}

fn greedy(max_tokens: usize) -> spa_client::generate::GenerateOptions {
    spa_client::generate::GenerateOptions { max_tokens, ..Default::default() }
}
