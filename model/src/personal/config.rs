//! What a device's personal fit may try, and how long (`[personal]` in client.toml and
//! experiment files): the candidates, the mixture and memory grids, the gate, the route.
use serde::{Deserialize, Serialize};

use super::gate::GateTrain;
use crate::error::{ModelError, Result};

/// The grids and budgets of the fit (`[personal]` in client.toml and experiment files).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PersonalConfig {
    /// Most epochs of each trained candidate; the one kept is chosen on validation.
    pub epochs: usize,
    pub lrs: Vec<f64>,
    pub batch_tokens: usize,
    /// Candidates tried besides the body: FedAvg+FT, Ditto per lambda (none if empty), FedRep.
    pub finetune: bool,
    pub ditto_lambdas: Vec<f64>,
    pub fedrep: bool,
    /// Mixture weights of the personal candidate tried (0 and 1 always are).
    pub alphas: Vec<f64>,
    /// Keep the body's down-projections in every candidate, so the coordinator can apply
    /// them for the device (`spa-client generate --inputs down`: d/r values per tap instead
    /// of d), at the price of candidates that adapt less.
    pub shared_down: bool,
    pub knn: KnnGrid,
    pub gate: GateTrain,
    /// The threshold a device decodes with: `best` (lowest validation loss) or `frugal` (the
    /// fewest model tokens within `frugal_within` of it).
    pub route: Route,
    pub frugal_within: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    #[default]
    Best,
    Frugal,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KnnGrid {
    pub enabled: bool,
    pub ks: Vec<usize>,
    pub temperatures: Vec<f32>,
    /// Weights of the kNN distribution tried (0 always is).
    pub weights: Vec<f32>,
    /// Entries kept (the newest).
    pub max_entries: usize,
}

impl Default for KnnGrid {
    fn default() -> Self {
        Self {
            enabled: true,
            ks: vec![8, 32, 128],
            temperatures: vec![0.01, 0.03, 0.1, 0.3, 1.0],
            weights: (1..=18).map(|i| i as f32 * 0.05).collect(),
            max_entries: 65_536,
        }
    }
}

impl Default for PersonalConfig {
    fn default() -> Self {
        Self {
            epochs: 4,
            lrs: vec![1e-3, 3e-3],
            batch_tokens: 256,
            finetune: true,
            ditto_lambdas: vec![0.1, 1.0],
            fedrep: true,
            alphas: (1..10).map(|i| i as f64 * 0.1).collect(),
            shared_down: false,
            knn: KnnGrid::default(),
            gate: GateTrain::default(),
            route: Route::Best,
            frugal_within: 0.01,
        }
    }
}

impl PersonalConfig {
    pub fn validate(&self) -> Result<()> {
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        let ok = (1..=100).contains(&self.epochs)
            && !self.lrs.is_empty()
            && self.lrs.iter().all(|l| l.is_finite() && *l > 0.0 && *l < 1.0)
            && self.batch_tokens > 0
            && self.ditto_lambdas.iter().all(|l| l.is_finite() && *l > 0.0)
            && self.alphas.iter().all(|a| unit(*a))
            && self.knn.ks.iter().all(|k| (1..=1024).contains(k))
            && self.knn.temperatures.iter().all(|t| t.is_finite() && *t > 0.0)
            && self.knn.weights.iter().all(|w| unit(*w as f64))
            && self.knn.max_entries > 0
            && (!self.knn.enabled || !self.knn.ks.is_empty() && !self.knn.temperatures.is_empty())
            && self.frugal_within.is_finite()
            && self.frugal_within >= 0.0;
        if !ok {
            return Err(ModelError::InvalidInput(format!("invalid personal model settings {self:?}")));
        }
        self.gate.validate()
    }
}
