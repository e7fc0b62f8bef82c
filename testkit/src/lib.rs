//! spa-testkit: what the integration tests of several crates share (a dev-dependency only).
//! [`procs`] runs real `spa-coordinator serve` and `spa-client run` processes on loopback;
//! [`postgres`] starts throwaway PostgreSQL clusters; [`light`] runs light devices (the SecAgg+
//! client on random updates) in the test's process.
use std::path::Path;

pub mod light;
pub mod postgres;
pub mod procs;

/// `spa-coordinator init` into `coord`, listening on an ephemeral loopback port.
pub fn init_loopback_home(coord: &Path) {
    spa_coordinator::init::init(coord, &[]).unwrap();
    let mut cfg = spa_coordinator::config::CoordinatorConfig::load(coord).unwrap();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.save(coord).unwrap();
}
