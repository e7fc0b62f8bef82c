//! Helpers shared by the client's integration tests.
use std::path::Path;

pub mod procs;

/// `spa-coordinator init` into `coord`, listening on an ephemeral loopback port.
pub fn init_loopback_home(coord: &Path) {
    spa_coordinator::init::init(coord, &[]).unwrap();
    let p = coord.join("coordinator.toml");
    let text = std::fs::read_to_string(&p).unwrap().replace("127.0.0.1:7443", "127.0.0.1:0");
    std::fs::write(&p, text).unwrap();
}
