//! spa-coordinator: the cloud side of SPA. See docs/ARCHITECTURE.md.
pub mod model_cli;
