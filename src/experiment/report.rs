//! What an experiment prints and writes: the markdown tables (arms, ROUGE, SPA v2 against
//! each baseline, what v2 chose and costs, the first seed's extras) and the SVG plots drawn
//! with plotters (per-round curves, loss against side fraction, the cross-user matrix, the
//! newcomers' data curve).
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::config::Arm;
use super::stats::{bootstrap_ci, holm, mean_sd, sign_test, wilcoxon};
use super::{ArmResult, Comparison, DeviceResult, ExperimentError, ExperimentResult, Result};

/// Okabe-Ito: distinguishable with the common colour-vision deficiencies.
const COLORS: [RGBColor; 8] = [
    RGBColor(0, 0, 0),
    RGBColor(0, 158, 115),
    RGBColor(230, 159, 0),
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(240, 228, 66),
];

/// Per federated device, the metric averaged over the arm's seeds.
fn per_device(arm: &ArmResult, metric: fn(&DeviceResult) -> f64) -> Vec<f64> {
    let Some(first) = arm.runs.first() else { return vec![] };
    (0..first.devices.len())
        .filter(|&i| !first.devices[i].held_out)
        .map(|i| mean_sd(&arm.runs.iter().map(|r| metric(&r.devices[i])).collect::<Vec<_>>()).0)
        .collect()
}

/// SPA v2 against each other arm (its own stages aside), on loss and accuracy, Holm-corrected
/// across the baselines of each metric.
pub fn comparisons(arms: &[ArmResult]) -> Vec<Comparison> {
    let Some(v2) = arms.iter().find(|a| a.arm == Arm::SpaV2) else { return vec![] };
    type Metric = (&'static str, fn(&DeviceResult) -> f64, bool);
    let metrics: [Metric; 2] = [("loss", |d| d.loss, true), ("accuracy", |d| d.accuracy, false)];
    let mut out = Vec::new();
    for (name, f, lower_better) in metrics {
        let mut family = Vec::new();
        for base in arms.iter().filter(|a| !a.arm.is_v2()) {
            let (s, b) = (per_device(v2, f), per_device(base, f));
            let diffs: Vec<f64> = s.iter().zip(&b).map(|(s, b)| s - b).collect();
            let better = diffs.iter().filter(|d| if lower_better { **d < 0.0 } else { **d > 0.0 }).count();
            let (ci_low, ci_high) = bootstrap_ci(&diffs, 10_000, 26);
            family.push(Comparison {
                baseline: base.arm,
                metric: name.to_string(),
                devices: diffs.len(),
                v2_better: better,
                mean_diff: mean_sd(&diffs).0,
                ci_low,
                ci_high,
                wilcoxon_p: wilcoxon(&diffs).1,
                holm_p: f64::NAN,
                sign_p: sign_test(&diffs),
            });
        }
        let adjusted = holm(&family.iter().map(|c| c.wilcoxon_p).collect::<Vec<_>>());
        for (c, p) in family.iter_mut().zip(adjusted) {
            c.holm_p = p;
        }
        out.extend(family);
    }
    out
}

fn arms_table(s: &mut String, r: &ExperimentResult) {
    let _ = writeln!(s, "| arm | test loss | token-weighted | accuracy | side fraction | newcomers: loss | accuracy | bytes/token | s per seed |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for a in &r.arms {
        let secs = mean_sd(&a.runs.iter().map(|r| r.seconds).collect::<Vec<_>>()).0;
        let (m, sd, n) = (&a.mean, &a.sd, &a.newcomers);
        let newcomers = if n.devices == 0 { "| - | - ".to_string() } else { format!("| {:.4} | {:.4} ", n.loss, n.accuracy) };
        let _ = writeln!(
            s,
            "| {} | {:.4} ± {:.4} | {:.4} | {:.4} ± {:.4} | {:.2} {newcomers}| {} | {:.1} |",
            a.arm.name(),
            m.loss,
            sd.loss,
            m.token_loss,
            m.accuracy,
            sd.accuracy,
            m.side_fraction,
            a.bytes_per_token,
            secs
        );
    }
}

fn rouge_table(s: &mut String, r: &ExperimentResult) {
    let rows: Vec<_> = r.arms.iter().filter_map(|a| a.mean.rouge.map(|g| (a.arm, g))).collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(s, "\nROUGE F1 of greedy replies (federated devices, seed {}):\n", r.seeds[0]);
    let _ = writeln!(s, "| arm | ROUGE-1 | ROUGE-2 | ROUGE-L | replies |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    for (arm, g) in rows {
        let _ = writeln!(s, "| {} | {:.4} | {:.4} | {:.4} | {} |", arm.name(), g.rouge_1, g.rouge_2, g.rouge_l, g.replies);
    }
}

fn comparison_table(s: &mut String, r: &ExperimentResult) {
    if r.comparisons.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nSPA v2 vs each baseline, per federated device (values averaged over seeds), two-sided; Holm across the baselines of a metric; 95% bootstrap interval of the mean difference:\n"
    );
    let _ = writeln!(s, "| baseline | metric | v2 better on | mean v2 - baseline [95% CI] | Wilcoxon p | Holm p | sign test p |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for c in &r.comparisons {
        let _ = writeln!(
            s,
            "| {} | {} | {}/{} | {:+.4} [{:+.4}, {:+.4}] | {:.2e} | {:.2e} | {:.2e} |",
            c.baseline.name(),
            c.metric,
            c.v2_better,
            c.devices,
            c.mean_diff,
            c.ci_low,
            c.ci_high,
            c.wilcoxon_p,
            c.holm_p,
            c.sign_p
        );
    }
}

fn extras_text(s: &mut String, r: &ExperimentResult) {
    let x = &r.extras;
    if let Some(c) = &x.choices {
        let kinds: Vec<String> = c.candidate.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let stages: Vec<String> = c.stages.iter().map(|(k, l)| format!("{k} {l:.4}")).collect();
        let _ = writeln!(
            s,
            "\nWhat SPA v2 chose on the {} federated devices (seed {}): personal candidate mixed: {}; mean alpha {:.2}; memory on {} devices (mean weight {:.2}); gate threshold \"always the model\" on {}. Mean validation loss after each stage: {}.",
            c.devices,
            r.seeds[0],
            kinds.join(", "),
            c.mean_alpha,
            c.with_knn,
            c.mean_knn_weight,
            c.gate_always,
            stages.join(", ")
        );
    }
    costs_text(s, r);
    if let Some(c) = &x.cross_user {
        let n = c.users.len();
        let _ = writeln!(
            s,
            "\nCross-user matrix ({n} users, SPA v2 of user i on user j's test set): the user's own model is the best on {}/{n} test sets; mean loss on the diagonal {:.4}, off it {:.4}.",
            c.own_best, c.mean_diagonal, c.mean_off_diagonal
        );
    }
    if !x.side_curve.is_empty() {
        let pts: Vec<String> = x.side_curve.iter().step_by(4).map(|p| format!("{:.2} -> {:.4}", p.side_fraction, p.loss)).collect();
        let _ =
            writeln!(s, "\nSPA v2's test loss against the fraction of tokens its gate lets the model speak (mean over federated devices): {}.", pts.join(", "));
    }
    flips_text(s, r);
    if !x.fractions.is_empty() {
        let arms: Vec<Arm> = x.fractions[0].loss.iter().map(|(a, _)| *a).collect();
        let _ = writeln!(s, "\nNewcomers (never federated), personal model fitted on the first part of their train split:\n");
        let _ = writeln!(s, "| fraction | train examples | {} |", arms.iter().map(|a| a.name()).collect::<Vec<_>>().join(" | "));
        let _ = writeln!(s, "|---|---|{}", "---|".repeat(arms.len()));
        for p in &x.fractions {
            let ls: Vec<String> = p.loss.iter().map(|(_, l)| format!("{l:.4}")).collect();
            let _ = writeln!(s, "| {:.2} | {:.1} | {} |", p.fraction, p.mean_train_examples, ls.join(" | "));
        }
    }
}

/// The device cost table: per arm, compute per token beside the backbone's and what a
/// device holds.
fn costs_text(s: &mut String, r: &ExperimentResult) {
    let costs: Vec<_> = r.arms.iter().filter_map(|a| a.device_cost.as_ref().map(|c| (a.arm, c))).collect();
    if !costs.is_empty() {
        let beside = if r.backbone_macs > 0.0 { format!(" ({:.3e} MACs per token at a context of 128)", r.backbone_macs) } else { String::new() };
        let _ = writeln!(s, "\nDevice cost per token beside the backbone's{beside} (mean over devices), and what a device holds:\n");
        let _ = writeln!(s, "| arm | side + gate MACs | extra head MACs | kNN MACs | datastore MB | private MB |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for (arm, c) in costs {
            let _ = writeln!(
                s,
                "| {} | {:.3e} | {:.3e} | {:.3e} | {:.2} | {:.2} |",
                arm.name(),
                c.side_macs,
                c.head_macs,
                c.knn_macs,
                c.datastore_bytes as f64 / 1e6,
                c.private_bytes as f64 / 1e6
            );
        }
    }
}

/// Each arm without a gate against FedAvg+FT, token by token.
fn flips_text(s: &mut String, r: &ExperimentResult) {
    let x = &r.extras;
    if x.flips.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nAgainst FedAvg+FT token by token (the federated devices' {} test tokens, seed {}; arms without a gate): where each arm's argmax differs, who is right there, and the loss difference split by whether the argmax moved (negative: lower than FedAvg+FT's):\n",
        x.flips[0].tokens, r.seeds[0]
    );
    let _ =
        writeln!(s, "| arm | argmax changed | arm right there | FedAvg+FT right there | accuracy gain | loss gain, argmax kept | loss gain, argmax changed |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for f in &x.flips {
        let _ = writeln!(
            s,
            "| {} | {:.2}% | {:.3} | {:.3} | {:+.4} | {:+.4} | {:+.4} |",
            f.arm.name(),
            100.0 * f.changed,
            f.arm_right_on_changed,
            f.reference_right_on_changed,
            f.accuracy_gain,
            f.loss_gain_unchanged,
            f.loss_gain_changed
        );
    }
}

/// The result as markdown.
pub fn markdown(r: &ExperimentResult) -> String {
    let mut s = String::new();
    let tuned: Vec<String> = r.tuned.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(
        s,
        "{}: {} federated devices + {} newcomers, backbone {}, {} rounds x {} local epochs, seeds {:?}{}\n",
        r.name,
        r.devices.len(),
        r.newcomers.len(),
        r.backbone,
        r.rounds,
        r.local_epochs,
        r.seeds,
        if tuned.is_empty() { String::new() } else { format!(", tuned on seed {}: {}", r.seeds[0], tuned.join(", ")) }
    );
    if !r.left_out.is_empty() {
        let _ = writeln!(s, "{} roles left out: the backbone was pretrained on their text ({}).\n", r.left_out.len(), r.left_out.join(", "));
    }
    arms_table(&mut s, r);
    rouge_table(&mut s, r);
    comparison_table(&mut s, r);
    extras_text(&mut s, r);
    let _ = writeln!(s, "\nTotal {:.0} s.", r.seconds);
    s
}

/// A result written by [`write`], read back (to redraw its tables and plots).
pub fn read(path: &Path) -> Result<ExperimentResult> {
    let text = std::fs::read_to_string(path).map_err(|e| ExperimentError::Report(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| ExperimentError::Report(format!("{}: not an experiment result: {e}", path.display())))
}

/// Writes `result.json`, `table.md` and the plots (`loss.svg`, `accuracy.svg`, and with the
/// extras `side.svg`, `cross_user.svg`, `fractions.svg`).
pub fn write(r: &ExperimentResult, dir: &Path) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| ExperimentError::Report(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
    let json = serde_json::to_string_pretty(r).map_err(|e| err(&e))?;
    std::fs::write(dir.join("result.json"), json).map_err(|e| err(&e))?;
    std::fs::write(dir.join("table.md"), markdown(r)).map_err(|e| err(&e))?;
    for (file, accuracy) in [("loss.svg", false), ("accuracy.svg", true)] {
        let series = round_curves(r, accuracy);
        let label = if accuracy { "next-token accuracy" } else { "test loss (nats/token)" };
        lines(&dir.join(file), &format!("{}: {label}, mean over {} seeds", r.name, r.seeds.len()), "round", label, &series).map_err(|e| err(&e))?;
    }
    let x = &r.extras;
    if !x.side_curve.is_empty() {
        let mut series = vec![("spa_v2, threshold swept".to_string(), x.side_curve.iter().map(|p| (p.side_fraction, p.loss)).collect())];
        for arm in [Arm::SpaV2, Arm::SpaV2Gated, Arm::Global] {
            if let Some(a) = r.arms.iter().find(|a| a.arm == arm) {
                series.push((format!("{} (seed mean)", arm.name()), vec![(a.mean.side_fraction, a.mean.loss)]));
            }
        }
        lines(
            &dir.join("side.svg"),
            &format!("{}: test loss against side fraction", r.name),
            "fraction of tokens the model speaks",
            "test loss (nats/token)",
            &series,
        )
        .map_err(|e| err(&e))?;
    }
    if !x.fractions.is_empty() {
        let arms: Vec<Arm> = x.fractions[0].loss.iter().map(|(a, _)| *a).collect();
        let series: Vec<(String, Vec<(f64, f64)>)> =
            arms.iter().enumerate().map(|(k, a)| (a.name().to_string(), x.fractions.iter().map(|p| (p.mean_train_examples, p.loss[k].1)).collect())).collect();
        lines(
            &dir.join("fractions.svg"),
            &format!("{}: newcomers, test loss by train examples", r.name),
            "train examples (mean)",
            "test loss (nats/token)",
            &series,
        )
        .map_err(|e| err(&e))?;
    }
    if let Some(c) = &x.cross_user {
        heatmap(&dir.join("cross_user.svg"), &format!("{}: SPA v2 of user i (row) on user j's test set (column)", r.name), &c.loss).map_err(|e| err(&e))?;
    }
    Ok(())
}

/// The mean over seeds of each training arm's per-round metric, the backbone as a flat line.
fn round_curves(r: &ExperimentResult, accuracy: bool) -> Vec<(String, Vec<(f64, f64)>)> {
    let at = |p: &super::RoundPoint| if accuracy { p.accuracy } else { p.loss };
    let mut out = Vec::new();
    for a in &r.arms {
        let len = a.runs.iter().map(|run| run.curve.len()).min().unwrap_or(0);
        if len > 1 {
            let pts = (0..len).map(|i| (i as f64, mean_sd(&a.runs.iter().map(|run| at(&run.curve[i])).collect::<Vec<_>>()).0)).collect();
            out.push((a.arm.name().to_string(), pts));
        } else if a.arm == Arm::Backbone {
            let y = if accuracy { a.mean.accuracy } else { a.mean.loss };
            out.push(("backbone".into(), (0..=r.rounds).map(|i| (i as f64, y)).collect()));
        }
    }
    out
}

type Plot = std::result::Result<(), Box<dyn std::error::Error>>;

/// Lines (and single points, drawn as dots) with a legend column.
fn lines(path: &Path, caption: &str, x_label: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> Plot {
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
    if pts.is_empty() {
        return Ok(());
    }
    let range = |f: fn(&(f64, f64)) -> f64| pts.iter().map(f).fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let ((x0, x1), (y0, y1)) = (range(|p| p.0), range(|p| p.1));
    let (xp, yp) = (((x1 - x0) * 0.04).max(1e-3), ((y1 - y0) * 0.08).max(1e-3));
    let root = SVGBackend::new(path, (900, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    // The legend gets its own column, so it never hides a curve.
    let (plot_area, legend) = root.split_horizontally(680);
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d((x0 - xp)..(x1 + xp), (y0 - yp)..(y1 + yp))?;
    chart.configure_mesh().light_line_style(WHITE).x_desc(x_label).y_desc(y_label).draw()?;
    for (i, (name, p)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        if p.len() == 1 {
            chart.draw_series(p.iter().map(|&q| Circle::new(q, 5, color.filled())))?;
        } else {
            chart.draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))?;
        }
        let y = 60 + 22 * i as i32;
        legend.draw(&PathElement::new(vec![(4, y), (26, y)], color.stroke_width(2)))?;
        legend.draw(&Text::new(name.clone(), (32, y - 7), ("sans-serif", 13)))?;
    }
    root.present()?;
    Ok(())
}

/// A matrix as shaded cells (darker: lower loss), each with its value.
fn heatmap(path: &Path, caption: &str, m: &[Vec<f64>]) -> Plot {
    let n = m.len();
    let all: Vec<f64> = m.iter().flatten().copied().filter(|v| v.is_finite()).collect();
    if n == 0 || all.is_empty() {
        return Ok(());
    }
    let (lo, hi) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let cell = 36i32;
    let size = (cell * n as i32 + 80) as u32;
    let root = SVGBackend::new(path, (size.max(400), size + 30)).into_drawing_area();
    root.fill(&WHITE)?;
    root.draw(&Text::new(caption.to_string(), (10, 8), ("sans-serif", 13)))?;
    for (i, row) in m.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let t = if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
            let shade = (60.0 + 190.0 * t) as u8;
            let (x, y) = (40 + j as i32 * cell, 40 + i as i32 * cell);
            let fill = if i == j { RGBColor(shade / 2, shade, shade / 2) } else { RGBColor(shade, shade, shade) };
            root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], fill.filled()))?;
            root.draw(&Text::new(format!("{v:.2}"), (x + 3, y + 12), ("sans-serif", 9)))?;
        }
    }
    root.present()?;
    Ok(())
}
