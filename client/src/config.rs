//! The device's TOML configuration (`<home>/client.toml`, documented default in
//! `configs/client.toml`): the side plugin layout and local training settings.
use std::path::Path;

use serde::{Deserialize, Serialize};
use spa_model::personal::PersonalConfig;
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
    /// Local training of the body in rounds.
    #[serde(default)]
    pub train: TrainConfig,
    /// The personal model's fit (SPA v2), after each adopted version and on `train`.
    #[serde(default)]
    pub personal: PersonalConfig,
    #[serde(default)]
    pub net: NetConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// What the device will allocate for the model the coordinator describes: a coordinator is
/// trusted with the backbone's outputs, not with this device's memory.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// The most the served model's head and this device's plugin (with its training state)
    /// may take, in MiB; checked before either is fetched or built.
    pub memory_mb: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self { memory_mb: 1024 }
    }
}

/// Deadlines on the device's calls to its coordinator. HTTP/2 keepalive notices a dead peer;
/// these bound a live one that accepted a call and never answers (wedged, overloaded).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetConfig {
    /// The wait for a call's answer: a unary call's reply, a stream's opening.
    pub call_timeout_secs: u64,
    /// The wait for each next message of an open stream (features, checkpoints, drafts).
    pub stream_stall_secs: u64,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self { call_timeout_secs: 300, stream_stall_secs: 120 }
    }
}

impl NetConfig {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("call_timeout_secs", self.call_timeout_secs), ("stream_stall_secs", self.stream_stall_secs)] {
            if !(1..=86_400).contains(&v) {
                return Err(ClientError::Invalid(format!("[net] {name} must be 1..=86400 seconds, got {v}")));
            }
        }
        Ok(())
    }
}

impl ClientConfig {
    /// The home's config, or the defaults if it has none.
    pub fn load(home: &Path) -> Result<Self> {
        let path = home.join(CONFIG_FILE);
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(crate::error::io(&path))?;
        let c: Self = toml::from_str(&text).map_err(|e| ClientError::Invalid(format!("{}: {e}", path.display())))?;
        c.net.validate().map_err(|e| ClientError::Invalid(format!("{}: {e}", path.display())))?;
        c.train.validate().map_err(|e| ClientError::Invalid(format!("{}: [train] {e}", path.display())))?;
        if c.train.objective == spa_model::train::Objective::Gated {
            return Err(ClientError::Invalid(format!(
                "{}: [train] objective \"gated\" is SPA v1, an experiment arm (spa experiment); a device trains the body (\"side\") and fits its personal model",
                path.display()
            )));
        }
        c.personal.validate().map_err(|e| ClientError::Invalid(format!("{}: [personal] {e}", path.display())))?;
        if !(64..=1 << 20).contains(&c.limits.memory_mb) {
            return Err(ClientError::Invalid(format!("{}: [limits] memory_mb must be 64..=1048576, got {}", path.display(), c.limits.memory_mb)));
        }
        Ok(c)
    }

    /// Writes this config as the home's (the documented file's comments are not kept).
    pub fn save(&self, home: &Path) -> Result<()> {
        let path = home.join(CONFIG_FILE);
        let text = toml::to_string(self).map_err(|e| ClientError::Invalid(format!("{}: {e}", path.display())))?;
        std::fs::write(&path, text).map_err(crate::error::io(&path))
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
        assert_eq!(c.net, NetConfig::default());
        assert_eq!(c.limits, LimitsConfig::default());
    }

    #[test]
    fn net_deadlines_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), "[net]\ncall_timeout_secs = 0\n").unwrap();
        let e = ClientConfig::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("call_timeout_secs must be 1..=86400"), "{e}");
        std::fs::write(dir.path().join(CONFIG_FILE), "[net]\nstream_stall_secs = 5\n").unwrap();
        let c = ClientConfig::load(dir.path()).unwrap();
        assert_eq!((c.net.call_timeout_secs, c.net.stream_stall_secs), (300, 5));
    }
}
