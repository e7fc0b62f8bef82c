//! The device's TOML configuration (`<home>/client.toml`, documented default in
//! `configs/client.toml`): the side plugin layout and local training settings.
use std::path::Path;

use serde::{Deserialize, Serialize};
use spa_model::side::SideConfig;
use spa_model::train::TrainConfig;

use crate::error::{ClientError, Result};

pub const CONFIG_FILE: &str = "client.toml";
pub const DEFAULT_TOML: &str = include_str!("../../configs/client.toml");

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    #[serde(default)]
    pub side: SideConfig,
    #[serde(default)]
    pub train: TrainConfig,
}

impl ClientConfig {
    /// The home's config, or the defaults if it has none.
    pub fn load(home: &Path) -> Result<Self> {
        let path = home.join(CONFIG_FILE);
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(crate::error::io(&path))?;
        toml::from_str(&text).map_err(|e| ClientError::Invalid(format!("{}: {e}", path.display())))
    }

    /// Writes the documented default unless the home already has a config.
    pub fn write_default(home: &Path) -> Result<()> {
        let path = home.join(CONFIG_FILE);
        if !path.exists() {
            std::fs::write(&path, DEFAULT_TOML).map_err(crate::error::io(&path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_default_parses() {
        let c: ClientConfig = toml::from_str(DEFAULT_TOML).unwrap();
        assert_eq!(c.side, SideConfig::default());
        c.train.validate().unwrap();
    }
}
