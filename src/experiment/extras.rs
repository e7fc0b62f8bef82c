//! What the first seed measures beyond the arms' scores: what SPA v2 chose on each device,
//! the cross-user matrix (is personalization personal?), test loss against the fraction of
//! tokens the side speaks (what the gate costs), and the newcomers' curve over how much of
//! their data their personal model is fitted on.
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use serde::{Deserialize, Serialize};
use spa_model::features::FeatureSet;
use spa_model::personal::{Fit, PersonalModel, Route, Stage, TokenScores, fit, score_all};
use spa_model::side::Plugin;

use super::Context;
use super::Result;
use super::config::Arm;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Extras {
    pub choices: Option<Choices>,
    pub cross_user: Option<CrossUser>,
    pub side_curve: Vec<SidePoint>,
    pub fractions: Vec<FractionPoint>,
    /// Each arm without a gate against FedAvg+FT, token by token (see [`super::flips`]).
    #[serde(default)]
    pub flips: Vec<super::flips::FlipRow>,
}

/// What the federated devices' SPA v2 fits chose.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Choices {
    pub devices: usize,
    /// Devices whose mixed candidate is each kind (global, finetune, ditto, fedrep).
    pub candidate: Vec<(String, usize)>,
    pub mean_alpha: f64,
    /// Devices whose memory has weight > 0, and the mean weight.
    pub with_knn: usize,
    pub mean_knn_weight: f64,
    /// Devices whose best threshold lets the model speak at every token.
    pub gate_always: usize,
    /// Mean validation loss after each stage.
    pub stages: Vec<(String, f64)>,
}

/// Test loss of user i's SPA v2 model on user j's test set.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CrossUser {
    pub users: Vec<String>,
    pub loss: Vec<Vec<f64>>,
    /// Test sets on which their own user's model is the best of all the users' models.
    pub own_best: usize,
    pub mean_diagonal: f64,
    pub mean_off_diagonal: f64,
}

/// Mean over federated devices of SPA v2's test loss when the gate lets the side speak on a
/// given fraction of each device's test tokens (thresholds at the gate's test quantiles).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SidePoint {
    pub side_fraction: f64,
    pub loss: f64,
}

/// Newcomers' mean test loss per arm with their personal model fitted on the first
/// `fraction` of their train split.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FractionPoint {
    pub fraction: f64,
    pub mean_train_examples: f64,
    pub loss: Vec<(Arm, f64)>,
}

pub fn measure(ctx: &Context, body: &Plugin, fits: &[Fit], seed: u64, progress: &mut dyn FnMut(&str)) -> Result<Extras> {
    let head = ctx.head();
    let fed_fits = &fits[..ctx.fed.len()];
    let v2: Vec<PersonalModel> = fed_fits.iter().map(|f| f.model(body, Stage::Gated(Route::Best))).collect();
    let mut out = Extras { choices: Some(choices(fed_fits, &v2)), ..Extras::default() };
    let n = ctx.cfg.cross_users.min(ctx.fed.len());
    // Each device's own model on its own test set: the matrix's diagonal, then the side curve.
    let mut own: Vec<Option<TokenScores>> = vec![None; v2.len()];
    if n >= 2 {
        let t = Instant::now();
        // Column j: every model on user j's test set (loaded once; the body projected once).
        let models: Vec<&PersonalModel> = v2.iter().take(n).collect();
        let scored = (0..n).into_par_iter().map(|j| Ok(score_all(&models, &head, &ctx.fed.get(j)?.test)?)).collect::<Result<Vec<_>>>()?;
        let mut columns = Vec::with_capacity(n);
        for (j, mut scores) in scored.into_iter().enumerate() {
            columns.push(models.iter().zip(&scores).map(|(m, s)| s.at(m.threshold).loss).collect::<Vec<f64>>());
            own[j] = Some(scores.swap_remove(j));
        }
        let loss: Vec<Vec<f64>> = (0..n).map(|i| columns.iter().map(|c| c[i]).collect()).collect();
        let own_best = (0..n).filter(|&j| (0..n).all(|i| loss[j][j] <= loss[i][j])).count();
        let diag = (0..n).map(|i| loss[i][i]).sum::<f64>() / n as f64;
        let off = (0..n).flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j))).map(|(i, j)| loss[i][j]).sum::<f64>() / (n * (n - 1)) as f64;
        progress(&format!(
            "cross-user matrix of {n} users: own model best on {own_best}/{n} test sets, diagonal {diag:.4} vs off-diagonal {off:.4} ({:.1} s)",
            t.elapsed().as_secs_f64()
        ));
        let users = (0..n).map(|i| ctx.fed.name(i).to_string()).collect();
        out.cross_user = Some(CrossUser { users, loss, own_best, mean_diagonal: diag, mean_off_diagonal: off });
    }
    let own = own
        .into_par_iter()
        .enumerate()
        .map(|(i, s)| match s {
            Some(s) => Ok(s),
            None => Ok(v2[i].score(&head, &ctx.fed.get(i)?.test)?),
        })
        .collect::<Result<Vec<TokenScores>>>()?;
    out.side_curve = side_curve(&own);
    for &fraction in ctx.cfg.data_fractions.iter().filter(|_| !ctx.new.is_empty()) {
        let t = Instant::now();
        out.fractions.push(fraction_point(ctx, body, &head, fraction, seed)?);
        progress(&format!("newcomers fitted on {:.0}% of their data ({:.1} s)", fraction * 100.0, t.elapsed().as_secs_f64()));
    }
    Ok(out)
}

fn choices(fits: &[Fit], models: &[PersonalModel]) -> Choices {
    let n = fits.len().max(1) as f64;
    let mut candidate: Vec<(String, usize)> = ["global", "finetune", "ditto", "fedrep"].iter().map(|k| (k.to_string(), 0)).collect();
    for f in fits {
        let name = f.candidates[f.mixed].candidate.name();
        if let Some(c) = candidate.iter_mut().find(|(k, _)| k == name) {
            c.1 += 1;
        }
    }
    let stage_names: Vec<String> = fits.first().map_or(vec![], |f| f.stages.iter().map(|(n, _)| n.clone()).collect());
    let stages = stage_names
        .iter()
        .enumerate()
        .map(|(k, name)| (name.clone(), fits.iter().map(|f| f.stages.get(k).map_or(f64::NAN, |s| s.1)).sum::<f64>() / n))
        .collect();
    Choices {
        devices: fits.len(),
        candidate,
        mean_alpha: fits.iter().map(|f| if f.mixed == 0 { 0.0 } else { f.alpha }).sum::<f64>() / n,
        with_knn: fits.iter().filter(|f| f.knn.is_some()).count(),
        mean_knn_weight: fits.iter().map(|f| f.knn.map_or(0.0, |k| k.weight as f64)).sum::<f64>() / n,
        gate_always: models.iter().filter(|m| m.threshold == spa_model::personal::gate::ALWAYS).count(),
        stages,
    }
}

/// Each device's model's test scores at thresholds that let it speak on 0, 5, ..., 100% of
/// its tokens (the gate's test quantiles).
fn side_curve(scores: &[TokenScores]) -> Vec<SidePoint> {
    const STEPS: usize = 20;
    let mut acc = vec![(0.0f64, 0.0f64); STEPS + 1];
    for s in scores {
        let mut g = s.gate.clone();
        g.sort_by(f32::total_cmp);
        for (q, a) in acc.iter_mut().enumerate() {
            // q = 0: every token to the side; q = STEPS: none.
            let t = if q == 0 { spa_model::personal::gate::ALWAYS } else { g[((q * g.len()) / STEPS).clamp(1, g.len()) - 1] as f64 };
            let t = if q == STEPS { spa_model::personal::gate::NEVER } else { t };
            let p = s.at(t);
            a.0 += p.side_fraction;
            a.1 += p.loss;
        }
    }
    let n = scores.len().max(1) as f64;
    acc.into_iter().map(|(s, l)| SidePoint { side_fraction: s / n, loss: l / n }).collect()
}

/// The first `fraction` of a feature set's examples (at least one).
fn head_of(set: &FeatureSet, fraction: f64) -> FeatureSet {
    let mut s = set.clone();
    let keep = ((s.examples.len() as f64 * fraction).ceil() as usize).clamp(1, s.examples.len());
    s.examples.truncate(keep);
    s
}

fn fraction_point(ctx: &Context, body: &Plugin, head: &spa_model::side::FrozenHead, fraction: f64, seed: u64) -> Result<FractionPoint> {
    let arms =
        [(Arm::Global, Stage::Global), (Arm::GlobalFt, Stage::Candidate("finetune")), (Arm::KnnPer, Stage::KnnGlobal), (Arm::SpaV2, Stage::Gated(Route::Best))];
    // Per newcomer: its train examples and each arm's test loss.
    let per_device = (0..ctx.new.len())
        .into_par_iter()
        .map(|i| {
            let d = ctx.new.get(i)?;
            let train = Arc::new(head_of(&d.train, fraction));
            let val = d.val.as_ref().expect("experiment devices have a validation split");
            let f = fit(body, head, &train, val, &ctx.cfg.personal, seed.wrapping_add(31 * i as u64))?;
            let models: Vec<PersonalModel> = arms.iter().map(|(_, stage)| f.model(body, *stage)).collect();
            let scores = score_all(&models.iter().collect::<Vec<_>>(), head, &d.test)?;
            Ok((train.examples.len(), models.iter().zip(&scores).map(|(m, s)| s.at(m.threshold).loss).collect::<Vec<f64>>()))
        })
        .collect::<Result<Vec<(usize, Vec<f64>)>>>()?;
    let examples: usize = per_device.iter().map(|(e, _)| e).sum();
    let loss: Vec<f64> = (0..arms.len()).map(|k| per_device.iter().map(|(_, l)| l[k]).sum()).collect();
    let n = ctx.new.len().max(1) as f64;
    Ok(FractionPoint { fraction, mean_train_examples: examples as f64 / n, loss: arms.iter().zip(loss).map(|((a, _), l)| (*a, l / n)).collect() })
}
