//! `spa model ...`, the backbone workbench, as a user runs it: a real process on the shipped
//! backbone; JSON out, and a clear error (nothing written) for bad input.
use std::process::{Command, Output};

const MODEL: &str = "models/shakespeare-char";

fn spa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spa")).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().expect("spawn spa")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON document on stdout")
}

fn vocab() -> usize {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{}/{MODEL}/config.json", env!("CARGO_MANIFEST_DIR"))).unwrap()).unwrap();
    cfg["vocab_size"].as_u64().unwrap() as usize
}

#[test]
fn logits_are_one_row_per_id_over_the_vocabulary() {
    let v = json(&spa(&["model", "logits", "--model", MODEL, "--ids", "1,2,3"]));
    let rows = v["logits"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r.as_array().unwrap().len() == vocab()));
    // The same ids give the same logits (no state kept between runs).
    assert_eq!(json(&spa(&["model", "logits", "--model", MODEL, "--ids", "1,2,3"])), v);
}

#[test]
fn eval_reports_a_loss_the_pretrained_model_has_learnt() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "ROMEO:\nBut soft, what light through yonder window breaks?\n\nJULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n").unwrap();
    let v = json(&spa(&["model", "eval", "--model", MODEL, "--text", text.to_str().unwrap()]));
    let loss = v["loss"].as_f64().unwrap();
    // Uniform over the vocabulary is ln(V) nats; the pretrained model must do far better.
    assert!(loss > 0.0 && loss < 0.6 * (vocab() as f64).ln(), "loss {loss}");
    assert_eq!(v["unit"], "nats/token");
}

#[test]
fn roles_rank_a_play_by_speeches() {
    let dir = tempfile::tempdir().unwrap();
    let play = dir.path().join("play.txt");
    std::fs::write(&play, "A:\nx\n\nB:\ny\n\nA:\nz\n\nC:\nw\n\nA:\nv\n\nB:\nu\n").unwrap();
    let v = json(&spa(&["model", "roles", "--corpus", play.to_str().unwrap(), "--take", "2"]));
    let names: Vec<&str> = v.as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["A", "B"]);
    assert_eq!(v[0]["speeches"], 3);
}

#[test]
fn bad_input_is_a_clear_error() {
    let out = spa(&["model", "eval", "--model", MODEL, "--text", "Cargo.toml", "--context", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--context 0"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = spa(&["model", "logits", "--model", "no/such/model", "--ids", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no/such/model"), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    let out = spa(&["model", "import", "--gguf", "Cargo.toml", "--out", dir.path().join("m").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(!dir.path().join("m").join("config.json").exists(), "a failed import leaves no checkpoint");
}
