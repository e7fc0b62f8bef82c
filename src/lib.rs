//! spa: the top-level package. It owns the end-to-end tests (`tests/`) and the `spa` binary
//! (quickstart and simulations); the logic here is the in-process federated simulation.
pub mod simulation;
