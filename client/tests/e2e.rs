//! End to end on loopback with real TLS and real sled stores: a coordinator in-process, two
//! devices that enroll, add data, fit their personal model (SPA v2) from the coordinator's
//! features, and generate; then a client "restart" (stores reopened) keeps identity and
//! the personal model; a store SPA v1 wrote is refused with what to do.

use std::path::Path;

use spa_client::ops;
use spa_model::personal::PersonalConfig;
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
    spa_testkit::init_loopback_home(&coord);
    let srv = spa_coordinator::server::start(&coord).await.unwrap();
    let url = format!("https://{}", srv.addr);
    let ca = std::fs::read_to_string(coord.join("tls/ca.pem")).unwrap();
    let cred = std::fs::read_to_string(coord.join("admin.credential")).unwrap();
    let ch = spa_coordinator::net::connect(&url, ca.as_bytes()).await.unwrap();
    let mut admin = AdminClient::new(ch);

    let users = spa_model::data::synthetic::synthetic_users(2, 30, 5);
    let personal = PersonalConfig { epochs: 2, lrs: vec![3e-3], ditto_lambdas: vec![1.0], ..PersonalConfig::default() };
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

        let s = ops::train(&home, &personal, false, Default::default(), &mut ()).await.unwrap();
        assert_eq!((s.examples, s.train_examples, s.val_examples, s.heldout_examples), (30, 19, 8, 3));
        assert_eq!(s.global_version, None, "no round yet: a fresh body");
        let stages: Vec<&str> = s.personal.stages.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(stages, ["global", "select", "mix", "knn", "gated_best", "gated_frugal"], "{s:?}");
        assert!(s.personal.stages.iter().all(|(_, l)| l.is_finite()));
        let (held, bb) = (s.heldout.unwrap(), s.heldout_backbone.unwrap());
        assert!(held.tokens > 0 && held.loss < bb.loss, "the personal model beats the backbone on held-out text: {s:?}");
        // Again: features come from the local cache.
        let s2 = ops::train(&home, &PersonalConfig { epochs: 1, ..personal.clone() }, false, Default::default(), &mut ()).await.unwrap();
        assert_eq!(s2.examples, 30);

        let g = spa_client::generate::generate(&home, &user.test[0].prompt, &greedy(24), &mut |_| {}).await.unwrap();
        assert!(g.tokens > 0 && g.tokens <= 24, "{g:?}");
        // Speculative by default: fewer round trips than tokens, the per-token text.
        assert!(g.round_trips < g.tokens && g.drafted > 0, "{g:?}");
        let naive = spa_client::generate::GenerateOptions { naive: true, ..greedy(24) };
        let n = spa_client::generate::generate(&home, &user.test[0].prompt, &naive, &mut |_| {}).await.unwrap();
        assert_eq!((n.text.as_str(), n.round_trips, n.drafted), (g.text.as_str(), n.tokens, 0), "{n:?}");
        // The coordinator drafts under the device's whole sampler (filters, penalties).
        let sampling = spa_model::generate::Sampling {
            temperature: 0.8,
            top_p: 0.9,
            min_p: 0.05,
            repeat_penalty: 1.3,
            presence_penalty: 0.4,
            seed: 3,
            ..Default::default()
        };
        let varied = spa_client::generate::GenerateOptions { sampling, ..greedy(24) };
        let v = spa_client::generate::generate(&home, &user.test[0].prompt, &varied, &mut |_| {}).await.unwrap();
        let vn = spa_client::generate::GenerateOptions { naive: true, ..varied };
        let vn = spa_client::generate::generate(&home, &user.test[0].prompt, &vn, &mut |_| {}).await.unwrap();
        assert_eq!(v.text, vn.text);
        assert!(v.round_trips < v.tokens && v.accepted > 0, "{v:?}");
        let st = ops::status(&home, false).await.unwrap();
        assert_eq!(st.coordinator_reachable, Some(true), "{st:?}");
        assert!(st.trained.is_some() && st.personal.is_some() && st.cached_features > 0 && st.cached_features <= 30, "{st:?}");
        outputs.push((home, e.device_id, g.text));
    }
    assert_ne!(outputs[0].1, outputs[1].1);

    // Client restart: a fresh open of each store has the same identity and personal model,
    // and greedy generation gives the same text as before the restart.
    let prompt = "STRANGER:\nWhat news today?\n\n";
    for ((home, id, text), user) in outputs.iter().zip(&users) {
        let store = spa_client::store::ClientStore::open(home).unwrap();
        let (_, ident) = store.require_identity(None).unwrap();
        assert_eq!(&ident.device_id, id);
        let (shared, meta) = store.body().unwrap().unwrap();
        let stored = store.personal().unwrap().expect("a personal model");
        let private = spa_model::side::ParamSet::from_safetensors(&stored.params).unwrap();
        assert_eq!((private.tensors.len(), meta.format), (meta.private_tensors, 2));
        assert!(private.tensors.keys().all(|k| k.starts_with("candidate.side.") || k.starts_with("gate.")), "{:?}", private.tensors.keys());
        assert!(spa_model::side::ParamSet::from_safetensors(&shared).unwrap().tensors.keys().all(|k| k.starts_with("side.")));
        drop(store);
        let a = spa_client::generate::generate(home, prompt, &greedy(12), &mut |_| {}).await.unwrap();
        let b = spa_client::generate::generate(home, prompt, &greedy(12), &mut |_| {}).await.unwrap();
        assert_eq!(a.text, b.text);
        let again = spa_client::generate::generate(home, &user.test[0].prompt, &greedy(24), &mut |_| {}).await.unwrap();
        assert_eq!(&again.text, text, "the same text after the restart");
    }
    // A store SPA v1 wrote (a body record without format, no personal model) is refused
    // with what to run, and its side network is kept.
    let (home, _, _) = &outputs[0];
    let store = spa_client::store::ClientStore::open(home).unwrap();
    let (shared, meta) = store.body().unwrap().unwrap();
    store.save_model(&shared, &spa_client::store::TrainedMeta { format: 0, ..meta }, None).unwrap();
    drop(store);
    let e = spa_client::generate::generate(home, prompt, &greedy(4), &mut |_| {}).await.unwrap_err();
    assert!(matches!(e, spa_client::ClientError::NoPersonalModel(_)) && e.to_string().contains("SPA v1") && e.to_string().contains("spa-client train"), "{e}");
    let s = ops::train(home, &personal, false, Default::default(), &mut ()).await.unwrap();
    assert!(s.heldout.is_some());
    spa_client::generate::generate(home, prompt, &greedy(4), &mut |_| {}).await.unwrap();
    srv.shutdown().await.unwrap();
}

fn greedy(max_tokens: usize) -> spa_client::generate::GenerateOptions {
    spa_client::generate::GenerateOptions { max_tokens, ..Default::default() }
}
