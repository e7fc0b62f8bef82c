//! Property-based fuzzing of every decoder that takes bytes from the network or disk (no
//! nightly toolchain here, so proptest instead of cargo-fuzz): whatever the input, each
//! returns a value or an error and never panics; valid inputs round-trip. The default run is
//! short (CI); `PROPTEST_CASES=100000 cargo test --release --workspace --test decoders` is the
//! long one. Failing inputs are kept in `tests/decoders.proptest-regressions` and replayed first.
use proptest::prelude::*;
use prost::Message;
use spa_proto::secagg;
use spa_proto::tensor::{ByteAssembler, TensorAssembler, decode_f32, tensor_chunks};
use spa_proto::v1::*;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

/// Random protobuf bytes, and the encoding of a message with one field flipped: both reach
/// the field decoders, not only prost's framing.
fn wire<M: Message + Default>(bytes: &[u8]) -> Option<M> {
    M::decode(bytes).ok()
}

proptest! {
    /// Chunk reassembly: arbitrary chunk streams are refused or assembled, never a panic.
    #[test]
    fn tensor_chunks_never_panic(chunks in proptest::collection::vec((0u8..3, -1i32..5, proptest::collection::vec(0u64..40, 0..4), 0u64..300, bytes(64)), 0..8)) {
        let mut asm = TensorAssembler::new(4096);
        for (name, dtype, shape, offset, data) in chunks {
            if asm.push(TensorChunk { name: format!("t{name}"), dtype, shape, offset, data }).is_err() {
                return Ok(());
            }
        }
        if let Ok(done) = asm.finish() {
            for (name, t) in done {
                let _ = t.to_f32(&name);
            }
        }
    }

    /// Valid chunking round-trips whatever the chunk size.
    #[test]
    fn tensor_chunks_round_trip(values in proptest::collection::vec(-1e6f32..1e6, 1..200), chunk in 1usize..64) {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut asm = TensorAssembler::new(1 << 20);
        for c in tensor_chunks("w", DType::DtypeF32 as i32, &[values.len() as u64], &raw, chunk) {
            asm.push(c).unwrap();
        }
        let got = asm.finish().unwrap().remove("w").unwrap().to_f32("w").unwrap();
        prop_assert_eq!(got, values);
    }

    #[test]
    fn byte_assembly_and_f32_decoding_never_panic(expected in 0u64..500, pushes in proptest::collection::vec((0u64..600, 0u64..600, bytes(80)), 0..6), dtype in -1i32..6) {
        if let Ok(mut a) = ByteAssembler::new("fuzz", expected, 512) {
            for (offset, total, data) in pushes {
                if a.push(offset, total, &data).is_err() {
                    break;
                }
            }
            if let Ok(b) = a.finish() {
                let _ = decode_f32(&b, dtype, "fuzz");
            }
        }
    }

    /// SecAgg+ messages and tasks from the wire: checked conversions only.
    #[test]
    fn secagg_wire_messages_never_panic(raw in bytes(400)) {
        if let Some(m) = wire::<AdvertiseKeysMsg>(&raw) {
            let _ = secagg::advertise_from_wire(&m);
        }
        if let Some(t) = wire::<ShareKeysTask>(&raw) {
            let _ = secagg::share_keys_request(&t);
        }
        if let Some(t) = wire::<MaskedInputTask>(&raw) {
            let _ = secagg::masked_input_request(&t);
        }
        if let Some(t) = wire::<UnmaskTask>(&raw) {
            let _ = secagg::unmask_request(&t);
        }
        if let Some(m) = wire::<ShareKeysMsg>(&raw) {
            let _ = secagg::share_keys_from_wire(&m);
        }
        if let Some(m) = wire::<UnmaskMsg>(&raw) {
            let _ = secagg::unmask_from_wire(&m);
        }
        let _ = secagg::lanes_from_bytes(&raw);
        let _ = secagg::config_from_json(&String::from_utf8_lossy(&raw));
    }

    /// Structured advertisements: keys and signatures of every length.
    #[test]
    fn advertisements_of_any_shape_are_checked(c_pk in bytes(70), s_pk in bytes(70), sig in bytes(70), client_id in any::<u32>()) {
        let m = AdvertiseKeysMsg { round_id: 1, client_id, c_pk, s_pk, sig };
        let ok = secagg::advertise_from_wire(&m).is_ok();
        prop_assert!(!ok || (m.c_pk.len() == 32 && m.s_pk.len() == 32));
    }

    /// Safetensors (checkpoints, global versions, cached heads): random bytes and a valid
    /// file with bytes flipped.
    #[test]
    fn safetensors_never_panic(raw in bytes(300), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6)) {
        let _ = spa_model::side::ParamSet::from_safetensors(&raw);
        let mut set = spa_model::side::ParamSet::default();
        set.tensors.insert("a".into(), spa_model::side::NamedTensor { shape: vec![2, 3], values: vec![1.0; 6] });
        let mut good = set.to_safetensors();
        for (at, b) in flips {
            let n = good.len();
            good[at % n] ^= b;
        }
        let _ = spa_model::side::ParamSet::from_safetensors(&good);
    }

    /// GGUF headers: a valid prefix (magic, version, counts) followed by anything.
    #[test]
    fn gguf_files_never_panic(version in 0u32..5, n_tensors in 0u64..4, n_kv in 0u64..4, tail in bytes(300)) {
        let mut raw = b"GGUF".to_vec();
        raw.extend(version.to_le_bytes());
        raw.extend(n_tensors.to_le_bytes());
        raw.extend(n_kv.to_le_bytes());
        raw.extend(tail);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.gguf");
        std::fs::write(&p, &raw).unwrap();
        if let Ok(g) = spa_model::gguf::GgufFile::open(&p) {
            for t in g.tensors.clone() {
                let _ = g.tensor_f32(&t);
            }
        }
    }

    /// Backbone configs as a coordinator serves them.
    #[test]
    fn backbone_configs_never_panic(vals in proptest::collection::vec(any::<u64>(), 8), kv in any::<u32>(), theta in any::<f64>()) {
        let json = format!(
            r#"{{"architectures":["LlamaForCausalLM"],"vocab_size":{},"hidden_size":{},"intermediate_size":{},"num_hidden_layers":{},"num_attention_heads":{},"num_key_value_heads":{kv},"max_position_embeddings":{},"head_dim":{},"rope_theta":{theta},"rms_norm_eps":1e-5}}"#,
            vals[0] % 5000, vals[1] % 5000, vals[2], vals[3], vals[4] % 100, vals[5], vals[6] % 300
        );
        let _ = spa_model::BackboneConfig::from_json(&json);
    }

    /// Tokenizer files as a coordinator serves them to devices: the shipped tokenizer.json with
    /// bytes flipped, cut or inserted parses or is refused, and a parsed one encodes and
    /// decodes without a panic.
    #[test]
    fn tokenizer_files_never_panic(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6)) {
        let mut raw = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare-char/tokenizer.json")).unwrap();
        for (at, b, op) in edits {
            let i = at.index(raw.len());
            match op {
                0 => raw[i] = b,
                1 => raw.truncate(i),
                _ => raw.insert(i, b),
            }
            if raw.is_empty() {
                break;
            }
        }
        if let Ok(text) = std::str::from_utf8(&raw)
            && let Ok(t) = spa_model::tokenizer::Tokenizer::from_json(text)
            && let Ok(ids) = t.encode("To be, or not to be")
        {
            let _ = t.decode(&ids);
        }
    }

    /// Special-token files (config.json, generation_config.json, tokenizer_config.json) with
    /// any values where ids and templates go.
    #[test]
    fn special_token_files_never_panic(bos in any::<i64>(), eos in proptest::collection::vec(any::<i64>(), 0..3), add in any::<bool>(), template in ".{0,40}") {
        let config = format!(r#"{{"bos_token_id":{bos},"eos_token_id":{eos:?}}}"#);
        let tok = serde_json::json!({ "add_bos_token": add, "chat_template": template, "bos_token": {"content": template}, "eos_token": "</s>" }).to_string();
        let _ = spa_model::tokenizer::ModelTokens::from_json(&config, Some(&config), Some(&tok));
    }

    /// Round records as sled holds them (JSON written by this coordinator, read back after a
    /// restart): a damaged record is refused, an intact one round-trips.
    #[test]
    fn round_records_never_panic(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4)) {
        let mut raw = ROUND_RECORD.as_bytes().to_vec();
        for (at, b) in edits {
            let i = at.index(raw.len());
            raw[i] = b;
        }
        if let Ok(r) = serde_json::from_slice::<spa_coordinator::rounds::RoundRecord>(&raw) {
            let again: spa_coordinator::rounds::RoundRecord = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
            prop_assert_eq!(again, r);
        }
    }
}

proptest! {
    /// The device's sled records (identity, keys in clear and sealed, data, sources, feature
    /// cache, plugin, global version) as a damaged disk or another program may leave them:
    /// written valid by the store, then bytes changed in place; every reader returns a value
    /// or an error, never a panic.
    #[test]
    fn device_store_records_never_panic(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>(), any::<u8>(), any::<bool>()), 1..6)) {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path();
        valid_device_store(home);
        {
            let db = raw_store(home);
            let mut records = Vec::new();
            for name in db.tree_names() {
                let t = db.open_tree(&name).unwrap();
                records.extend(t.iter().map(|kv| (t.clone(), kv.unwrap())));
            }
            for (which, at, b, truncate) in edits {
                let (t, (k, v)) = &records[which.index(records.len())];
                let mut v = v.to_vec();
                if v.is_empty() {
                    continue;
                }
                let i = at.index(v.len());
                if truncate { v.truncate(i) } else { v[i] = b }
                t.insert(k, v).unwrap();
            }
            db.flush().unwrap();
        }
        let Ok(store) = spa_client::store::ClientStore::open(home) else { return Ok(()) };
        let _ = store.identity();
        let _ = store.key_sealed();
        let _ = store.require_identity(Some(b"pass"));
        let _ = store.require_identity(None);
        let _ = store.next_key(Some(b"pass"));
        let _ = store.examples();
        let _ = store.sources();
        let _ = store.cached_features("k");
        let _ = store.body();
        if let Ok(Some(p)) = store.personal() {
            let _ = serde_json::from_slice::<spa_client::personal::PersonalRecord>(&p.record);
            let _ = spa_model::side::ParamSet::from_safetensors(&p.params);
            let _ = p.datastore.as_deref().map(spa_model::personal::knn::Datastore::from_bytes);
        }
        let _ = store.global_version();
    }
}

/// The store's sled database, retried while the lock of the last handle is let go (sled
/// releases it from its flusher thread, a moment after the drop).
fn raw_store(home: &std::path::Path) -> sled::Db {
    let t = std::time::Instant::now();
    loop {
        match sled::open(home.join("store")) {
            Ok(db) => return db,
            Err(e) if t.elapsed() > std::time::Duration::from_secs(10) => panic!("{e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

/// A device store holding one record of each kind, written by the store itself (a sealed key
/// with a low work factor: the fuzzing is of the decoding, not of PBKDF2).
fn valid_device_store(home: &std::path::Path) {
    use spa_client::store::*;
    let store = ClientStore::open(home).unwrap();
    let pkcs8 = spa_proto::auth::generate_pkcs8().unwrap();
    let id = Identity {
        device_id: "dev-1".into(),
        name: "n".into(),
        coordinator: "https://x".into(),
        ca_pem: "pem".into(),
        enrolled_at_ms: 1,
        backbone_version: "bb".into(),
    };
    store.set_identity(&pkcs8, &id, None).unwrap();
    store.set_global_version(3).unwrap();
    let src = Source { file: "f".into(), format: "play".into(), examples: 1, added_at_ms: 2 };
    store.add_examples(&src, &[spa_model::data::Example { prompt: "p".into(), reply: "r".into() }]).unwrap();
    let f = spa_model::features::ExampleFeatures { first: 1, targets: vec![4, 5], loss: vec![true, false], feats: vec![0.5; 8] };
    store.cache_features("k", &f).unwrap();
    let meta = TrainedMeta {
        format: 2,
        backbone_version: "bb".into(),
        side: spa_model::side::SideConfig::default(),
        trained_at_ms: 3,
        examples: 1,
        steps: 2,
        final_loss: Some(1.5),
        shared_tensors: 1,
        private_tensors: 1,
    };
    let record = spa_client::personal::PersonalRecord {
        backbone_version: "bb".into(),
        global_version: Some(3),
        side: spa_model::side::SideConfig::default(),
        meta: spa_model::personal::PersonalMeta::default(),
        fitted_at_ms: 4,
        train_examples: 1,
        val_examples: 1,
        heldout: None,
        heldout_global: None,
        heldout_backbone: None,
    };
    let mut params = spa_model::side::ParamSet::default();
    params.tensors.insert("gate.w2.bias".into(), spa_model::side::NamedTensor { shape: vec![1], values: vec![2.2] });
    let datastore = spa_model::personal::knn::Datastore::new(2, vec![1.0, 0.0, 0.0, 1.0], vec![3, 4], vec![0, 0]).unwrap();
    let personal = StoredPersonal { record: serde_json::to_vec(&record).unwrap(), params: params.to_safetensors(), datastore: Some(datastore.to_bytes()) };
    store.save_model(b"shared", &meta, Some(&personal)).unwrap();
    store.flush().unwrap();
    drop(store);
    let db = raw_store(home);
    let sealed = spa_client::keyseal::seal_with(&pkcs8, b"pass", 1000).unwrap();
    db.open_tree("meta").unwrap().insert("identity.next.sealed", serde_json::to_vec(&sealed).unwrap()).unwrap();
    db.flush().unwrap();
}

/// A round record as the coordinator wrote it (tests/faults.rs, a round aborted below threshold).
const ROUND_RECORD: &str = r#"{"answered":{"masked_input":7,"share_keys":7,"training":8,"unmask":6},"base_version":1,"cohort":["dev-2f1e50e4ccc28d05","dev-4dd2f3745a82f389"],"committed_version":null,"contributors":[],"coordinator_busy_ms":0.0,"dropouts":{"dev-2f1e50e4ccc28d05":{"phase":"unmask","reason":{"kind":"timed_out"}},"dev-771249a06d5acd6d":{"phase":"share_keys","reason":{"detail":"malformed message: client 4: shares not addressed to exactly its neighbours","kind":"refused"}}},"finished_ms":1796331685648,"index":2,"mean_metrics":null,"metrics":{},"phase_ms":{"masked_input":205,"selecting":0,"share_keys":387,"training":40000,"unmask":8001},"plan":{"deadline_secs":40,"dp_l2_clip":0.0,"dp_noise_multiplier":0.0,"local_epochs":1,"lr":0.01,"max_clients":10,"min_clients":6,"prox_mu":0.0,"rounds":3,"strategy":"fedavg"},"reason":"secure aggregation: session aborted: below threshold: b-shares of 2 has 5, needs 6","round_id":2,"run_id":1,"shared_params":53792,"started_ms":1796331637049,"state":"aborted","updated_ms":1796331685648}"#;
