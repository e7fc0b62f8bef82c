//! The local personalization experiment: for each user, the backbone alone versus a side
//! plugin trained on that user's train split only, both measured on the user's test split.
use serde::{Deserialize, Serialize};

use crate::backbone::Backbone;
use crate::data::UserData;
use crate::error::Result;
use crate::features::{Positions, extract_features, tokenize_examples};
use crate::side::{FrozenHead, Plugin, SideConfig, SideVariant};
use crate::tokenizer::Tokenizer;
use crate::train::{EvalMetrics, TrainConfig, TrainReport, evaluate, train_plugin};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserResult {
    pub user: String,
    pub train_tokens: usize,
    pub test: EvalMetrics,
    pub train: TrainReport,
}

impl UserResult {
    pub fn side_wins(&self) -> bool {
        self.test.side_loss < self.test.backbone_loss
    }
}

pub fn positions_for(variant: SideVariant) -> Positions {
    match variant {
        SideVariant::Mlp => Positions::LossOnly,
        SideVariant::Ladder => Positions::All,
    }
}

/// Trains one fresh plugin per user and evaluates it; `on_user` sees each result as it lands.
pub fn local_personalization(
    backbone: &Backbone,
    tokenizer: &Tokenizer,
    users: &[UserData],
    side: &SideConfig,
    train: &TrainConfig,
    on_user: &mut dyn FnMut(&UserResult),
) -> Result<Vec<UserResult>> {
    let head = FrozenHead::device_copy(backbone);
    let max_len = backbone.config.max_position_embeddings;
    let mut out = Vec::new();
    for u in users {
        let plugin = Plugin::new(side, &backbone.config, &backbone.device)?;
        let layers = plugin.shape.feature_layers.clone();
        let pos = positions_for(side.variant);
        let tr = extract_features(backbone, &tokenize_examples(tokenizer, &u.train, max_len)?, &layers, pos, 8)?;
        let te = extract_features(backbone, &tokenize_examples(tokenizer, &u.test, max_len)?, &layers, pos, 8)?;
        if tr.num_loss_tokens() == 0 || te.num_loss_tokens() == 0 {
            continue;
        }
        let (plugin, report) = train_plugin(plugin, &head, &tr, train, None, &mut |_| {})?;
        let r = UserResult { user: u.user.clone(), train_tokens: tr.num_loss_tokens(), test: evaluate(&plugin, &head, &te, 2048)?, train: report };
        on_user(&r);
        out.push(r);
    }
    Ok(out)
}
