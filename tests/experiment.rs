//! `spa experiment` as a user runs it: a real process, a config file, the shipped backbone,
//! every arm on a small synthetic federation; the JSON result, the tables and the plots.
use std::path::Path;
use std::process::Command;

fn spa(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_spa")).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().expect("spawn spa")
}

const CONFIG: &str = r#"
name = "tiny"
seeds = [0, 1]
rounds = 2
rouge_examples = 2
arms = ["backbone", "local", "global", "global_ft", "spa", "spa_gate_on", "spa_gate_off", "spa_private_head"]

[corpus]
kind = "synthetic"
devices = 4
examples = 25
seed = 3

[local]
epochs = 2
lr = 3e-3
batch_tokens = 256
"#;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

#[test]
fn every_arm_runs_and_the_report_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "tiny.toml", CONFIG);
    let out_dir = dir.path().join("out");
    let out = spa(&["experiment", "--config", &cfg, "--json", "--out", out_dir.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let arm = |name: &str| r["arms"].as_array().unwrap().iter().find(|a| a["arm"] == name).unwrap_or_else(|| panic!("arm {name}: {r}"));
    let mean = |name: &str, k: &str| arm(name)["mean"][k].as_f64().unwrap();
    assert_eq!(r["arms"].as_array().unwrap().len(), 8);
    for a in r["arms"].as_array().unwrap() {
        let runs = a["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2, "one run per seed: {a}");
        assert!(runs.iter().all(|s| s["devices"].as_array().unwrap().len() == 4));
        for k in ["loss", "accuracy", "rouge_l", "gate_on"] {
            assert!(a["mean"][k].as_f64().unwrap().is_finite() && a["sd"][k].as_f64().unwrap() >= 0.0, "{k}: {a}");
        }
    }
    // The gate forced off is the backbone, exactly; forced on, the side speaks everywhere.
    for k in ["loss", "accuracy", "rouge_l"] {
        assert_eq!(mean("spa_gate_off", k), mean("backbone", k), "{k}");
    }
    assert_eq!(mean("spa_gate_on", "gate_on"), 1.0);
    assert_eq!(mean("global", "gate_on"), 1.0);
    assert_eq!(arm("backbone")["bytes_per_token"], 4);
    // Synthetic users are easy to personalize: every trained arm beats the backbone.
    for name in ["local", "global_ft", "spa", "spa_private_head"] {
        assert!(mean(name, "loss") < mean("backbone", "loss"), "{name}: {r}");
    }
    let spa_curve = arm("spa")["runs"][0]["curve"].as_array().unwrap();
    assert_eq!(spa_curve.len(), 3, "round 0 and 2 rounds");
    // Four baselines x three metrics, each with p-values in (0, 1].
    let cmp = r["comparisons"].as_array().unwrap();
    assert_eq!(cmp.len(), 12);
    assert!(cmp.iter().all(|c| (0.0..=1.0).contains(&c["wilcoxon_p"].as_f64().unwrap()) && c["devices"] == 4));
    for f in ["result.json", "table.md", "loss.svg", "accuracy.svg"] {
        let text = std::fs::read_to_string(out_dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(!text.is_empty(), "{f}");
    }
    let svg = std::fs::read_to_string(out_dir.join("loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("spa") && svg.contains("polyline"), "{}", &svg[..svg.len().min(300)]);
    let table = std::fs::read_to_string(out_dir.join("table.md")).unwrap();
    assert!(table.contains("| spa |"));
    // The tables redrawn from the saved result, without running anything.
    let again = spa(&["experiment", "--report", out_dir.join("result.json").to_str().unwrap()]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(String::from_utf8_lossy(&again.stdout), table);
}

#[test]
fn bad_configs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (CONFIG.replace("rounds = 2", "rounds = 2\nround = 3"), "unknown field"),
        (CONFIG.replace("\"spa_private_head\"]", "\"spa_private_head\", \"spa\"]"), "listed twice"),
        (CONFIG.replace("\"spa\", ", ""), "list spa too"),
        (CONFIG.replace("seeds = [0, 1]", "seeds = []"), "seeds"),
        (CONFIG.replace("arms = [", "arms = [\"fedsomething\", "), "unknown variant"),
        (CONFIG.replace("lr = 3e-3", "lr = nan"), "invalid training settings"),
        (CONFIG.replace("rounds = 2", "rounds = 2\ntrain_fraction = 1.0"), "train_fraction"),
        (
            CONFIG.replace("kind = \"synthetic\"\ndevices = 4\nexamples = 25\nseed = 3", "kind = \"play\"\npath = \"no/such/file.txt\"\ntop = 3"),
            "no/such/file.txt",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let cfg = write(dir.path(), &format!("bad{i}.toml"), text);
        let out = spa(&["experiment", "--config", &cfg]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(want), "case {i}: want {want:?} in {stderr}");
    }
}
