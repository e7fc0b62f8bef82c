//! The device side of SPA: side plugin, gate, frozen head copy, parameter roles.
pub mod config;
pub mod head;
pub(crate) mod mlp_grad;
pub mod params;
pub mod plugin;

pub use config::{GateConfig, LadderConfig, SideConfig, SideShape, SideVariant};
pub use head::FrozenHead;
pub use params::{NamedTensor, ParamSet, Role, RoleRules, SharedParams};
pub use plugin::{Plugin, PluginNet, PluginOutput};
