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

/// Speculative generation over the real service equals per-token generation (seeded sampling
/// and greedy, tap states and cloud-side down-projections: `generate-bench` fails otherwise),
/// also when every connection is cut mid-generation and the sessions resume.
#[test]
fn speculative_generation_over_the_service_equals_per_token_and_survives_cuts() {
    for sampling in [&["--temperature", "0.8", "--top-k", "20", "--seed", "5"][..], &["--temperature", "0"]] {
        let mut args =
            vec!["generate-bench", "--devices", "3", "--rounds", "1", "--prompts", "2", "--max-tokens", "48", "--delay-ms", "1", "--cut-after", "12", "--json"];
        args.extend_from_slice(sampling);
        let out = spa(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let rows: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(rows.len(), 5, "{stdout}");
        for r in &rows {
            let speculative = r["mode"].as_str().unwrap().starts_with("speculative");
            assert_eq!(r["reconnects"].as_u64().unwrap() > 0, speculative, "{r}");
            assert_eq!(r["round_trips_per_token"].as_f64().unwrap() < 1.0, speculative, "{r}");
        }
        let bytes = |mode: &str| rows.iter().find(|r| r["mode"] == mode).unwrap()["bytes_per_token"].as_f64().unwrap();
        assert!(bytes("naive, down f16") < bytes("naive, taps") / 2.0, "{stdout}");
    }
}

#[test]
fn simulated_rounds_aggregate_securely_and_personalize() {
    let out = spa(&["simulate", "--devices", "5", "--examples", "25", "--rounds", "2", "--local-epochs", "2", "--show", "1", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let reports: Vec<serde_json::Value> = stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
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
    assert!(last["side_loss"].as_f64().unwrap() < last["backbone_loss"].as_f64().unwrap(), "{last}");
    assert!(stdout.contains("federated side:"), "{stdout}");
}

/// Distributed DP in the simulation, as the coordinator's rounds run it: without noise the
/// aggregate is the mean of the L2-clipped updates up to rounding; with noise it is not.
#[test]
fn simulated_rounds_with_distributed_dp() {
    let err = |z: &str| {
        let args = [
            "simulate",
            "--devices",
            "5",
            "--examples",
            "25",
            "--rounds",
            "1",
            "--local-epochs",
            "1",
            "--show",
            "0",
            "--dp-clip",
            "0.5",
            "--dp-noise",
            z,
            "--json",
        ];
        let out = spa(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let r: serde_json::Value = serde_json::from_str(stdout.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
        assert_eq!(r["contributors"], 4, "{r}");
        r["max_abs_error_vs_plaintext"].as_f64().unwrap()
    };
    let (exact, noisy) = (err("0"), err("1"));
    assert!(exact < 1e-3, "{exact}");
    assert!(noisy > 10.0 * exact, "{noisy} vs {exact}");
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
    fails_with(&["simulate", "--dp-noise", "1"], "--dp-clip");
    fails_with(&["simulate", "--dp-clip", "nan"], "dp clip");
}
