//! The `spa` binary as a user runs it: a real process, the shipped backbone, federated
//! rounds with SecAgg+, personalized generation at the end; the quickstart over the real
//! service on loopback, the simulation in-process with a dropout.
use std::process::Command;

fn spa(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_spa")).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().expect("spawn spa")
}

#[test]
fn quickstart_runs_rounds_over_the_service_and_personalizes() {
    let out = spa(&["quickstart", "--devices", "4", "--examples", "30", "--rounds", "2", "--local-epochs", "2", "--show", "1", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines[0]["Setup"]["coordinator"].as_str().unwrap().starts_with("https://127.0.0.1:"), "{stdout}");
    let rounds: Vec<&serde_json::Value> = lines.iter().filter_map(|l| l.get("Round")).collect();
    assert_eq!(rounds.len(), 2, "{stdout}");
    for (i, r) in rounds.iter().enumerate() {
        assert_eq!(r["state"], "committed");
        assert_eq!(r["committed_version"], (i + 1) as u64);
        assert_eq!(r["contributors"].as_array().unwrap().len(), 4, "{r}");
    }
    let m = &rounds[1]["mean_metrics"];
    assert!(m["personalized_loss"].as_f64().unwrap() < m["backbone_loss"].as_f64().unwrap(), "{m}");
    let sample = lines.iter().find_map(|l| l.get("Sample")).expect("a generated sample");
    assert!(!sample["personalized"].as_str().unwrap().trim().is_empty(), "{sample}");
}

#[test]
fn simulated_rounds_aggregate_securely_and_personalize() {
    let out = spa(&["simulate", "--devices", "5", "--examples", "25", "--rounds", "2", "--local-epochs", "2", "--show", "1", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let reports: Vec<serde_json::Value> =
        stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(reports.len(), 2, "{stdout}");
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r["version"], (i + 1) as u64);
        assert_eq!(r["cohort"], 5);
        // 25% dropout after masking: one device's masks are recovered, its update left out.
        assert_eq!(r["contributors"], 4);
        // The secure aggregate equals the plaintext weighted mean up to quantization.
        assert!(r["max_abs_error_vs_plaintext"].as_f64().unwrap() < 1e-4, "{r}");
    }
    let last = &reports[1]["mean"];
    assert!(last["routed_loss"].as_f64().unwrap() < last["backbone_loss"].as_f64().unwrap(), "{last}");
    assert!(stdout.contains("personalized:"), "{stdout}");
}

/// `spa args` exits non-zero and says `needle` on stderr.
fn fails_with(args: &[&str], needle: &str) {
    let out = spa(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains(needle), "{args:?}: {stderr}");
}

#[test]
fn bad_arguments_fail_clearly() {
    fails_with(&["quickstart", "--devices", "2"], "at least 3 devices");
    fails_with(&["quickstart", "--strategy", "fedsgd"], "fedsgd");
    fails_with(&["simulate", "--dropout", "0.7"], "dropout");
    fails_with(&["simulate", "--model", "/nonexistent/model"], "config.json");
    fails_with(&["simulate", "--devices", "4"], "survivors");
    fails_with(&["simulate", "--devices", "1"], "at least 2");
    fails_with(&["simulate", "--strategy", "fedsgd"], "fedsgd");
    fails_with(&["simulate", "--lr", "nan"], "invalid training settings");
}
