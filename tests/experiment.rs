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
min_val = 4
rouge_examples = 1
cross_users = 4
data_fractions = [0.5, 1.0]
arms = ["backbone", "local", "global", "global_ft", "fedprox", "ditto", "fedrep", "knn_per", "spa_v1",
        "spa_v2_select", "spa_v2_mix", "spa_v2_knn", "spa_v2", "spa_v2_gated"]

[corpus]
kind = "synthetic"
devices = 5
examples = 25
seed = 3

[local]
epochs = 2
lr = 3e-3
batch_tokens = 256

[tune]
lrs = [3e-3, 1e-2]
fedprox_mus = [0.01, 0.1]

[personal]
epochs = 2
lrs = [3e-3, 1e-2]
ditto_lambdas = [1.0]
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
    assert_eq!(r["arms"].as_array().unwrap().len(), 14);
    // 5 devices: one newcomer held out of the federations (20%), four federated.
    assert_eq!((r["devices"].as_array().unwrap().len(), r["newcomers"].as_array().unwrap().len()), (4, 1));
    for a in r["arms"].as_array().unwrap() {
        let runs = a["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2, "one run per seed: {a}");
        assert!(runs.iter().all(|s| s["devices"].as_array().unwrap().len() == 5 && s["mean"]["devices"] == 4));
        for k in ["loss", "token_loss", "accuracy", "side_fraction"] {
            assert!(a["mean"][k].as_f64().unwrap().is_finite() && a["sd"][k].as_f64().unwrap() >= 0.0, "{k}: {a}");
        }
    }
    // The backbone never lets a side speak; the global adapter always does.
    assert_eq!((mean("backbone", "side_fraction"), mean("global", "side_fraction")), (0.0, 1.0));
    assert_eq!(arm("backbone")["bytes_per_token"], 4);
    // Synthetic users are easy to personalize: every trained arm beats the backbone, and SPA
    // v2, whose candidates include FedAvg+FT, is not worse than the global adapter.
    for name in ["local", "global", "global_ft", "ditto", "fedrep", "knn_per", "spa_v1", "spa_v2"] {
        assert!(mean(name, "loss") < mean("backbone", "loss"), "{name}: {r}");
    }
    assert!(mean("spa_v2", "loss") < mean("global", "loss"), "{r}");
    // The knobs tuned on the first seed are reported; ROUGE of the main arms on it.
    assert_eq!(r["tuned"].as_array().unwrap().len(), 4, "{}", r["tuned"]);
    assert!(arm("spa_v2")["mean"]["rouge"]["replies"].as_u64().unwrap() == 4 && arm("ditto")["mean"]["rouge"].is_null());
    let global_curve = arm("global")["runs"][0]["curve"].as_array().unwrap();
    assert_eq!(global_curve.len(), 3, "round 0 and 2 rounds");
    // Nine baselines x two metrics, p-values in (0, 1], Holm's never below the raw ones.
    let cmp = r["comparisons"].as_array().unwrap();
    assert_eq!(cmp.len(), 18);
    for c in cmp {
        let (p, h) = (c["wilcoxon_p"].as_f64().unwrap(), c["holm_p"].as_f64().unwrap());
        assert!((0.0..=1.0).contains(&p) && h >= p && h <= 1.0 && c["devices"] == 4, "{c}");
        assert!(c["ci_low"].as_f64().unwrap() <= c["mean_diff"].as_f64().unwrap() && c["mean_diff"].as_f64().unwrap() <= c["ci_high"].as_f64().unwrap(), "{c}");
    }
    let x = &r["extras"];
    assert_eq!(x["cross_user"]["loss"].as_array().unwrap().len(), 4);
    assert_eq!(x["side_curve"].as_array().unwrap().len(), 21);
    assert_eq!(x["fractions"].as_array().unwrap().len(), 2);
    assert_eq!(x["choices"]["devices"], 4);
    for f in ["result.json", "table.md", "loss.svg", "accuracy.svg", "side.svg", "cross_user.svg", "fractions.svg"] {
        let text = std::fs::read_to_string(out_dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(!text.is_empty(), "{f}");
    }
    let svg = std::fs::read_to_string(out_dir.join("loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("global") && svg.contains("polyline"), "{}", &svg[..svg.len().min(300)]);
    let table = std::fs::read_to_string(out_dir.join("table.md")).unwrap();
    assert!(table.contains("| spa_v2 |") && table.contains("Cross-user matrix") && table.contains("Holm"));
    // The tables redrawn from the saved result, without running anything.
    let again = spa(&["experiment", "--report", out_dir.join("result.json").to_str().unwrap()]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(String::from_utf8_lossy(&again.stdout), table);
}

/// A cohort sampled per round, and the devices' features on disk: the same numbers as in
/// memory; the complete works' layout (a play in Gutenberg's form) as a corpus.
#[test]
fn cohorts_disk_features_and_the_works_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let small = CONFIG
        .replace("seeds = [0, 1]", "seeds = [0]\ncohort = 3")
        .replace("cross_users = 4", "cross_users = 0")
        .replace("rouge_examples = 1", "rouge_examples = 0")
        .replace("data_fractions = [0.5, 1.0]", "data_fractions = []");
    let run = |name: &str, text: &str| -> serde_json::Value {
        let cfg = write(dir.path(), name, text);
        let out = spa(&["experiment", "--config", &cfg, "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let losses = |r: &serde_json::Value| r["arms"].as_array().unwrap().iter().map(|a| (a["arm"].clone(), a["mean"]["loss"].clone())).collect::<Vec<_>>();
    let memory = run("memory.toml", &small);
    let disk = run("disk.toml", &small.replace("cohort = 3", "cohort = 3\nfeatures_on_disk = true"));
    assert_eq!(losses(&memory), losses(&disk));
    // Three rounds of a cohort of 3 out of 4 federated devices.
    assert_eq!(memory["arms"].as_array().unwrap().iter().find(|a| a["arm"] == "global").unwrap()["runs"][0]["curve"].as_array().unwrap().len(), 3);

    let plays = dir.path().join("plays");
    std::fs::create_dir(&plays).unwrap();
    let mut play = String::from("A PLAY\n\nACT I.\n\n");
    for i in 0..30 {
        for (who, line) in [("Ann", "my lord, the morning comes"), ("Bob", "and so it does, my lady"), ("Cy", "we shall see")] {
            play.push_str(&format!("{who}.\n{line}, {i} times over.\n\n"));
        }
    }
    std::fs::write(plays.join("a_play_gut.txt"), &play).unwrap();
    let works = small.replace(
        "kind = \"synthetic\"\ndevices = 5\nexamples = 25\nseed = 3",
        &format!("kind = \"works\"\ndir = {:?}\nmin_speeches = 20", plays.to_str().unwrap()),
    );
    let r = run("works.toml", &works.replace("cohort = 3\n", "holdout = 0.0\n"));
    let names: Vec<&str> = r["devices"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
    assert_eq!(names, ["a_play/ANN", "a_play/BOB", "a_play/CY"]);
}

#[test]
fn bad_configs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (CONFIG.replace("rounds = 2", "rounds = 2\nround = 3"), "unknown field"),
        (CONFIG.replace("\"spa_v2_gated\"]", "\"spa_v2_gated\", \"spa_v2\"]"), "listed twice"),
        (CONFIG.replace("ditto_lambdas = [1.0]", "ditto_lambdas = [1.0]\nalphas = [1.5]"), "personal"),
        (CONFIG.replace("data_fractions = [0.5, 1.0]", "data_fractions = [0.0]"), "data_fractions"),
        (CONFIG.replace("seeds = [0, 1]", "seeds = []"), "seeds"),
        (CONFIG.replace("arms = [", "arms = [\"fedsomething\", "), "unknown variant"),
        (CONFIG.replace("lr = 3e-3", "lr = nan"), "invalid training settings"),
        (CONFIG.replace("rounds = 2", "rounds = 2\ntrain_fraction = 1.0"), "train_fraction"),
        (
            CONFIG.replace("kind = \"synthetic\"\ndevices = 5\nexamples = 25\nseed = 3", "kind = \"play\"\npath = \"no/such/file.txt\"\ntop = 3"),
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
