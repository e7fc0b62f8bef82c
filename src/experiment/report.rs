//! What an experiment prints and writes: the markdown tables, the paired comparisons, and
//! the per-round curves drawn as SVG with plotters.
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::config::Arm;
use super::stats::{mean_sd, sign_test, wilcoxon};
use super::{ArmResult, Comparison, ExperimentError, ExperimentResult, Result};

const BASELINES: [Arm; 4] = [Arm::Backbone, Arm::Local, Arm::Global, Arm::GlobalFt];

/// Okabe-Ito: distinguishable with the common colour-vision deficiencies.
const COLORS: [RGBColor; 7] = [
    RGBColor(0, 0, 0),
    RGBColor(0, 158, 115),
    RGBColor(230, 159, 0),
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
];

/// Per device, the metric averaged over the arm's seeds.
fn per_device(arm: &ArmResult, metric: fn(&super::DeviceResult) -> f64) -> Vec<f64> {
    let n = arm.runs.first().map_or(0, |r| r.devices.len());
    (0..n).map(|i| mean_sd(&arm.runs.iter().map(|r| metric(&r.devices[i])).collect::<Vec<_>>()).0).collect()
}

/// SPA against each baseline present, on loss, accuracy and ROUGE-L.
pub fn comparisons(arms: &[ArmResult]) -> Vec<Comparison> {
    let Some(spa) = arms.iter().find(|a| a.arm == Arm::Spa) else { return vec![] };
    type Metric = (&'static str, fn(&super::DeviceResult) -> f64, bool);
    let metrics: [Metric; 3] = [("loss", |d| d.loss, true), ("accuracy", |d| d.accuracy, false), ("rouge_l", |d| d.rouge_l, false)];
    let mut out = Vec::new();
    for base in arms.iter().filter(|a| BASELINES.contains(&a.arm)) {
        for (name, f, lower_better) in metrics {
            let (s, b) = (per_device(spa, f), per_device(base, f));
            let diffs: Vec<f64> = s.iter().zip(&b).map(|(s, b)| s - b).collect();
            let better = diffs.iter().filter(|d| if lower_better { **d < 0.0 } else { **d > 0.0 }).count();
            out.push(Comparison {
                baseline: base.arm,
                metric: name.to_string(),
                devices: diffs.len(),
                spa_better: better,
                mean_diff: mean_sd(&diffs).0,
                wilcoxon_p: wilcoxon(&diffs).1,
                sign_p: sign_test(&diffs),
            });
        }
    }
    out
}

/// The result as markdown: the arms table (mean +- sd over seeds), the paired tests, and
/// the federated arms' time per round.
pub fn markdown(r: &ExperimentResult) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}: {} devices, backbone {}, {} rounds x {} local epochs, seeds {:?}, ROUGE-L on {} test replies per device\n",
        r.name,
        r.devices.len(),
        r.backbone,
        r.rounds,
        r.local_epochs,
        r.seeds,
        if r.rouge_examples == 0 { "all".to_string() } else { r.rouge_examples.to_string() }
    );
    let _ = writeln!(s, "| arm | test loss | accuracy | ROUGE-L F1 | gate on | bytes/token | s per seed |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for a in &r.arms {
        let secs = mean_sd(&a.runs.iter().map(|r| r.seconds).collect::<Vec<_>>()).0;
        let _ = writeln!(
            s,
            "| {} | {:.4} ± {:.4} | {:.4} ± {:.4} | {:.4} ± {:.4} | {:.2} | {} | {:.1} |",
            a.arm.name(),
            a.mean.loss,
            a.sd.loss,
            a.mean.accuracy,
            a.sd.accuracy,
            a.mean.rouge_l,
            a.sd.rouge_l,
            a.mean.gate_on,
            a.bytes_per_token,
            secs
        );
    }
    if !r.comparisons.is_empty() {
        let _ = writeln!(s, "\nSPA vs each baseline, per device (values averaged over seeds), two-sided:\n");
        let _ = writeln!(s, "| baseline | metric | SPA better on | mean SPA - baseline | Wilcoxon p | sign test p |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for c in &r.comparisons {
            let _ = writeln!(
                s,
                "| {} | {} | {}/{} | {:+.4} | {:.2e} | {:.2e} |",
                c.baseline.name(),
                c.metric,
                c.spa_better,
                c.devices,
                c.mean_diff,
                c.wilcoxon_p,
                c.sign_p
            );
        }
    }
    let per_round: Vec<String> = r
        .arms
        .iter()
        .filter(|a| a.arm != Arm::GlobalFt && a.runs.iter().any(|run| run.curve.len() > 1))
        .map(|a| {
            let secs: Vec<f64> = a.runs.iter().map(|run| run.curve.last().map_or(0.0, |p| p.seconds) / (run.curve.len() - 1).max(1) as f64).collect();
            format!("{} {:.2} s", a.arm.name(), mean_sd(&secs).0)
        })
        .collect();
    if !per_round.is_empty() {
        let _ = writeln!(s, "\nWall time per round (training + aggregation + evaluation): {}", per_round.join(", "));
    }
    let _ = writeln!(s, "\nTotal {:.0} s.", r.seconds);
    s
}

/// A result written by [`write`], read back (to redraw its tables and plots).
pub fn read(path: &Path) -> Result<ExperimentResult> {
    let text = std::fs::read_to_string(path).map_err(|e| ExperimentError::Report(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| ExperimentError::Report(format!("{}: not an experiment result: {e}", path.display())))
}

/// Writes `result.json`, `table.md` and the per-round curves (`loss.svg`, `accuracy.svg`).
pub fn write(r: &ExperimentResult, dir: &Path) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| ExperimentError::Report(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
    let json = serde_json::to_string_pretty(r).map_err(|e| err(&e))?;
    std::fs::write(dir.join("result.json"), json).map_err(|e| err(&e))?;
    std::fs::write(dir.join("table.md"), markdown(r)).map_err(|e| err(&e))?;
    plot(r, &dir.join("loss.svg"), Curve::Loss).map_err(|e| err(&e))?;
    plot(r, &dir.join("accuracy.svg"), Curve::Accuracy).map_err(|e| err(&e))?;
    Ok(())
}

#[derive(Clone, Copy)]
enum Curve {
    Loss,
    Accuracy,
}

impl Curve {
    fn label(self) -> &'static str {
        match self {
            Self::Loss => "test loss (nats/token)",
            Self::Accuracy => "next-token accuracy",
        }
    }

    fn at(self, p: &super::RoundPoint) -> f64 {
        match self {
            Self::Loss => p.loss,
            Self::Accuracy => p.accuracy,
        }
    }

    fn of(self, s: &super::Summary) -> f64 {
        match self {
            Self::Loss => s.loss,
            Self::Accuracy => s.accuracy,
        }
    }
}

/// The mean over seeds of each training arm's per-round metric, the backbone as a flat line.
fn curves(r: &ExperimentResult, c: Curve) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut out = Vec::new();
    // global_ft's rounds are the global arm's: only its fine-tuned end point is its own.
    for a in r.arms.iter().filter(|a| a.arm != Arm::GlobalFt) {
        let len = a.runs.iter().map(|run| run.curve.len()).min().unwrap_or(0);
        if len > 1 {
            let pts = (0..len).map(|i| (i as f64, mean_sd(&a.runs.iter().map(|run| c.at(&run.curve[i])).collect::<Vec<_>>()).0)).collect();
            out.push((a.arm.name().to_string(), pts));
        } else if a.arm == Arm::Backbone {
            out.push(("backbone".into(), (0..=r.rounds).map(|i| (i as f64, c.of(&a.mean))).collect()));
        }
    }
    out
}

fn plot(r: &ExperimentResult, path: &Path, c: Curve) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let (series, label) = (curves(r, c), c.label());
    let ys: Vec<f64> = series.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)).filter(|y| y.is_finite()).collect();
    if ys.is_empty() {
        return Ok(());
    }
    let (lo, hi) = ys.iter().fold((f64::MAX, f64::MIN), |(a, b), &y| (a.min(y), b.max(y)));
    let pad = ((hi - lo) * 0.08).max(1e-3);
    let root = SVGBackend::new(path, (860, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    // The legend gets its own column, so it never hides a curve.
    let (plot_area, legend) = root.split_horizontally(700);
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(format!("{}: {label}, mean over {} seeds", r.name, r.seeds.len()), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..r.rounds as f64, (lo - pad)..(hi + pad))?;
    chart
        .configure_mesh()
        .x_labels((r.rounds + 1).min(21))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .light_line_style(WHITE)
        .x_desc("round")
        .y_desc(label)
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?;
        let y = 60 + 22 * i as i32;
        legend.draw(&PathElement::new(vec![(4, y), (26, y)], color.stroke_width(2)))?;
        legend.draw(&Text::new(name.clone(), (32, y - 7), ("sans-serif", 14)))?;
    }
    root.present()?;
    Ok(())
}
