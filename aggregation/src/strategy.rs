//! Server-side aggregation strategies applied to the securely aggregated
//! mean update Δ̄ = Σ(w·Δ)/Σw (flat f32 vectors), and FedProx's client term.
//!
//! FedAvg: x ← x + η·Δ̄. The adaptive optimizers follow Reddi et al. 2021,
//! "Adaptive Federated Optimization", Algorithm 2, with the pseudo-gradient
//! Δ̄ (a descent direction, so it is added), no bias correction, and v₋₁ = τ²:
//!   m ← β₁·m + (1−β₁)·Δ̄
//!   v ← v + Δ̄²                              (FedAdagrad)
//!   v ← β₂·v + (1−β₂)·Δ̄²                    (FedAdam)
//!   v ← v − (1−β₂)·Δ̄²·sign(v − Δ̄²)          (FedYogi)
//!   x ← x + η·m / (√v + τ)

use serde::{Deserialize, Serialize};

use crate::error::{Result, SecAggError};

/// Strategy selection, as written in the coordinator's config (`strategy = "FedAdam"` …).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "strategy")]
pub enum StrategyConfig {
    /// Weighted averaging with a server learning rate (1.0 = plain FedAvg).
    FedAvg {
        /// η.
        #[serde(default = "one")]
        server_lr: f32,
    },
    /// FedAvg on the server; clients add the proximal term μ/2·‖w − w_global‖².
    FedProx {
        /// μ, sent to clients in the round plan.
        mu: f32,
        /// η.
        #[serde(default = "one")]
        server_lr: f32,
    },
    /// Adagrad on the pseudo-gradient.
    FedAdagrad(AdaptiveParams),
    /// Adam on the pseudo-gradient.
    FedAdam(AdaptiveParams),
    /// Yogi on the pseudo-gradient.
    FedYogi(AdaptiveParams),
}

fn one() -> f32 {
    1.0
}

/// Hyper-parameters of the adaptive server optimizers.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveParams {
    /// Server learning rate η.
    #[serde(default = "default_eta")]
    pub eta: f32,
    /// β₁ (first moment).
    #[serde(default = "default_beta1")]
    pub beta1: f32,
    /// β₂ (second moment; unused by FedAdagrad).
    #[serde(default = "default_beta2")]
    pub beta2: f32,
    /// τ: adaptivity (ε) term.
    #[serde(default = "default_tau")]
    pub tau: f32,
}

fn default_eta() -> f32 {
    1e-2
}
fn default_beta1() -> f32 {
    0.9
}
fn default_beta2() -> f32 {
    0.99
}
fn default_tau() -> f32 {
    1e-3
}

impl Default for AdaptiveParams {
    fn default() -> Self {
        AdaptiveParams { eta: default_eta(), beta1: default_beta1(), beta2: default_beta2(), tau: default_tau() }
    }
}

/// A server strategy by name: what an operator types (any case) and a round plan records.
/// Parsed once where the name enters (CLI, RPC); stored as the lowercase name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StrategyName {
    /// [`StrategyConfig::FedAvg`].
    #[default]
    FedAvg,
    /// [`StrategyConfig::FedProx`].
    FedProx,
    /// [`StrategyConfig::FedAdagrad`].
    FedAdagrad,
    /// [`StrategyConfig::FedAdam`].
    FedAdam,
    /// [`StrategyConfig::FedYogi`].
    FedYogi,
}

impl StrategyName {
    /// Every strategy, in the order help texts list them.
    pub const ALL: [StrategyName; 5] = [Self::FedAvg, Self::FedProx, Self::FedAdagrad, Self::FedAdam, Self::FedYogi];

    /// The lowercase name (what records store).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FedAvg => "fedavg",
            Self::FedProx => "fedprox",
            Self::FedAdagrad => "fedadagrad",
            Self::FedAdam => "fedadam",
            Self::FedYogi => "fedyogi",
        }
    }

    /// The μ devices train with: FedProx's, and 0 for every other strategy.
    pub fn client_mu(self, mu: f64) -> f64 {
        if self == Self::FedProx { mu } else { 0.0 }
    }

    /// The strategy with default hyper-parameters; `mu` is FedProx's proximal weight (the
    /// others ignore it).
    pub fn config(self, mu: f32) -> Result<StrategyConfig> {
        let c = match self {
            Self::FedAvg => StrategyConfig::FedAvg { server_lr: 1.0 },
            Self::FedProx => StrategyConfig::FedProx { mu, server_lr: 1.0 },
            Self::FedAdagrad => StrategyConfig::FedAdagrad(AdaptiveParams::default()),
            Self::FedAdam => StrategyConfig::FedAdam(AdaptiveParams::default()),
            Self::FedYogi => StrategyConfig::FedYogi(AdaptiveParams::default()),
        };
        c.validate()?;
        Ok(c)
    }
}

impl std::str::FromStr for StrategyName {
    type Err = SecAggError;
    /// The error does not repeat the input: it may reach a reply or a log.
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|n| n.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| SecAggError::InvalidConfig(format!("unknown strategy (expected one of {})", Self::ALL.map(|n| n.as_str()).join(", "))))
    }
}

impl std::fmt::Display for StrategyName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for StrategyName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for StrategyName {
    /// Any case, as records written before the name was typed hold what the operator typed.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl StrategyConfig {
    /// FedProx's μ for the round plan (0 for the other strategies).
    pub fn client_proximal_mu(&self) -> f32 {
        match self {
            StrategyConfig::FedProx { mu, .. } => *mu,
            _ => 0.0,
        }
    }

    fn validate(&self) -> Result<()> {
        let ok = match self {
            StrategyConfig::FedAvg { server_lr } => server_lr.is_finite() && *server_lr > 0.0,
            StrategyConfig::FedProx { mu, server_lr } => mu.is_finite() && *mu >= 0.0 && server_lr.is_finite() && *server_lr > 0.0,
            StrategyConfig::FedAdagrad(p) | StrategyConfig::FedAdam(p) | StrategyConfig::FedYogi(p) => {
                p.eta > 0.0 && (0.0..1.0).contains(&p.beta1) && (0.0..1.0).contains(&p.beta2) && p.tau > 0.0
            }
        };
        if ok { Ok(()) } else { Err(SecAggError::InvalidConfig(format!("bad strategy parameters {self:?}"))) }
    }
}

/// Optimizer state carried across rounds (persist it with serde).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerOptimizerState {
    /// Rounds applied.
    pub step: u64,
    /// First moment (adaptive strategies; empty otherwise).
    pub m: Vec<f32>,
    /// Second moment (adaptive strategies; empty otherwise).
    pub v: Vec<f32>,
}

/// A strategy with its state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerOptimizer {
    /// The configuration.
    pub config: StrategyConfig,
    /// The persisted state.
    pub state: ServerOptimizerState,
}

impl ServerOptimizer {
    /// A fresh optimizer.
    pub fn new(config: StrategyConfig) -> Result<Self> {
        config.validate()?;
        Ok(ServerOptimizer { config, state: ServerOptimizerState::default() })
    }

    /// Resumes from a persisted state.
    pub fn with_state(config: StrategyConfig, state: ServerOptimizerState) -> Result<Self> {
        config.validate()?;
        Ok(ServerOptimizer { config, state })
    }

    /// Applies one round: `global` ← update(global, mean_delta).
    pub fn apply(&mut self, global: &mut [f32], mean_delta: &[f32]) -> Result<()> {
        if global.len() != mean_delta.len() {
            return Err(SecAggError::LengthMismatch { expected: global.len(), got: mean_delta.len() });
        }
        if mean_delta.iter().any(|d| !d.is_finite()) {
            return Err(SecAggError::Malformed("non-finite mean update".into()));
        }
        match &self.config {
            StrategyConfig::FedAvg { server_lr } | StrategyConfig::FedProx { server_lr, .. } => {
                for (x, d) in global.iter_mut().zip(mean_delta) {
                    *x += server_lr * d;
                }
            }
            StrategyConfig::FedAdagrad(p) | StrategyConfig::FedAdam(p) | StrategyConfig::FedYogi(p) => {
                let p = *p;
                let st = &mut self.state;
                if st.m.is_empty() {
                    st.m = vec![0.0; global.len()];
                    st.v = vec![p.tau * p.tau; global.len()];
                }
                if st.m.len() != global.len() || st.v.len() != global.len() {
                    return Err(SecAggError::LengthMismatch { expected: global.len(), got: st.m.len() });
                }
                let kind = &self.config;
                for i in 0..global.len() {
                    let d = mean_delta[i];
                    let d2 = d * d;
                    let m = p.beta1 * st.m[i] + (1.0 - p.beta1) * d;
                    let v = st.v[i];
                    let v = match kind {
                        StrategyConfig::FedAdagrad(_) => v + d2,
                        StrategyConfig::FedAdam(_) => p.beta2 * v + (1.0 - p.beta2) * d2,
                        _ => v - (1.0 - p.beta2) * d2 * (v - d2).signum(),
                    };
                    st.m[i] = m;
                    st.v[i] = v;
                    global[i] += p.eta * m / (v.sqrt() + p.tau);
                }
            }
        }
        self.state.step += 1;
        Ok(())
    }
}

/// FedProx client term: the gradient μ·(w − w_global) added to the local
/// gradient, in place (`grad += μ·(w − w_global)`).
pub fn fedprox_add_gradient(mu: f32, w: &[f32], w_global: &[f32], grad: &mut [f32]) -> Result<()> {
    if w.len() != w_global.len() || w.len() != grad.len() {
        return Err(SecAggError::LengthMismatch { expected: w.len(), got: w_global.len().min(grad.len()) });
    }
    for ((g, a), b) in grad.iter_mut().zip(w).zip(w_global) {
        *g += mu * (a - b);
    }
    Ok(())
}

/// FedProx client term: the loss μ/2·‖w − w_global‖².
pub fn fedprox_loss(mu: f32, w: &[f32], w_global: &[f32]) -> Result<f32> {
    if w.len() != w_global.len() {
        return Err(SecAggError::LengthMismatch { expected: w.len(), got: w_global.len() });
    }
    let sq: f64 = w.iter().zip(w_global).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    Ok((0.5 * mu as f64 * sq) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fedavg_applies_server_lr() {
        let mut opt = ServerOptimizer::new(StrategyConfig::FedAvg { server_lr: 0.5 }).unwrap();
        let mut x = vec![1.0, 2.0];
        opt.apply(&mut x, &[2.0, -2.0]).unwrap();
        assert_eq!(x, vec![2.0, 1.0]);
        assert!(opt.apply(&mut x, &[1.0]).is_err());
    }

    #[test]
    fn adaptive_steps_match_hand_computation() {
        let p = AdaptiveParams { eta: 0.1, beta1: 0.9, beta2: 0.99, tau: 0.01 };
        let d = 0.5f32;
        // One step from m = 0, v = τ².
        let m = 0.1 * d;
        let cases = [
            (StrategyConfig::FedAdagrad(p), 1e-4 + d * d),
            (StrategyConfig::FedAdam(p), 0.99 * 1e-4 + 0.01 * d * d),
            (StrategyConfig::FedYogi(p), 1e-4 + 0.01 * d * d),
        ];
        for (cfg, v) in cases {
            let mut opt = ServerOptimizer::new(cfg.clone()).unwrap();
            let mut x = vec![0.0f32];
            opt.apply(&mut x, &[d]).unwrap();
            let want = 0.1 * m / (v.sqrt() + 0.01);
            assert!((x[0] - want).abs() < 1e-6, "{cfg:?}: {} vs {want}", x[0]);
            assert_eq!(opt.state.step, 1);
            // State survives a serde round trip and continues identically.
            let json = serde_json::to_string(&opt).unwrap();
            let mut back: ServerOptimizer = serde_json::from_str(&json).unwrap();
            let mut x2 = x.clone();
            opt.apply(&mut x, &[d]).unwrap();
            back.apply(&mut x2, &[d]).unwrap();
            assert_eq!(x, x2);
        }
    }

    #[test]
    fn config_is_tagged() {
        let c: StrategyConfig = serde_json::from_str(r#"{"strategy":"FedAdam","eta":0.05}"#).unwrap();
        assert_eq!(c, StrategyConfig::FedAdam(AdaptiveParams { eta: 0.05, ..Default::default() }));
        let c: StrategyConfig = serde_json::from_str(r#"{"strategy":"FedProx","mu":0.01}"#).unwrap();
        assert_eq!(c.client_proximal_mu(), 0.01);
        assert!(ServerOptimizer::new(StrategyConfig::FedAdam(AdaptiveParams { beta1: 1.5, ..Default::default() })).is_err());
    }

    #[test]
    fn fedprox_term() {
        let mut g = vec![0.0, 1.0];
        fedprox_add_gradient(0.1, &[1.0, 2.0], &[0.0, 0.0], &mut g).unwrap();
        assert!((g[0] - 0.1).abs() < 1e-7 && (g[1] - 1.2).abs() < 1e-6);
        assert!((fedprox_loss(0.1, &[1.0, 2.0], &[0.0, 0.0]).unwrap() - 0.25).abs() < 1e-6);
    }
}
