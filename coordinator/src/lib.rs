//! spa-coordinator: the cloud side of SPA. See docs/ARCHITECTURE.md and docs/PROTOCOL.md.
//!
//! - [`server`]: the TLS gRPC server (Device, Admin, Backbone, health, reflection).
//! - [`state`]: what every handler shares ([`state::Shared`]) and the per-device permits:
//!   the bottom floor the handlers import, so that they never import each other.
//! - [`service`]: the Device, Admin and Backbone handlers, which validate every input;
//!   [`generation`]: the Generate stream.
//! - [`auth`]: signed device calls and admin calls.
//! - [`engine`]: the thread that owns the backbone and generation sessions' KV caches.
//! - [`rounds`]: the federated round loop (selection, SecAgg+ phases, commit) and its state.
//! - [`aggregator`]: where a round's SecAgg+ shards run (in process, or aggregator processes).
//! - [`round_service`]: the device-facing Rounds service and the admin round verbs.
//! - [`members`]: on a shared store, which coordinator serves which device.
//! - [`store`]: the durable state behind one interface ([`store::Backend`]); sled by default.
//! - [`status`]: how every error of this library becomes a gRPC status.
//! - [`metrics`]: Prometheus counters and gauges, and the `/metrics` endpoint.
//! - [`init`], [`admin_cli`]: operator verbs.
pub mod admin_cli;
pub mod aggregator;
pub(crate) mod auth;
pub mod config;
pub(crate) mod conn;
pub(crate) mod engine;
pub mod error;
mod fault;
pub(crate) mod generation;
pub mod init;
pub mod members;
pub mod metrics;
pub mod net;
pub(crate) mod round_service;
pub mod rounds;
pub mod server;
pub(crate) mod service;
pub(crate) mod state;
pub(crate) mod status;
pub mod store;

/// Locks a mutex whose holders only insert, remove or count (round state, rate limiters,
/// session counts): a panic while holding it cannot leave it inconsistent, so a poisoned
/// lock is used as it is rather than turned into an error.
/// A task aborted when this handle drops (background tasks that live as long as their owner:
/// the round loop's lease keeper, a store's change listener).
pub(crate) struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Helpers for the binary.
pub mod service_main {
    /// Logs to stderr; `RUST_LOG`-style level from `SPA_LOG` (default info).
    pub fn init_tracing() {
        let level = std::env::var("SPA_LOG").ok().and_then(|l| l.parse().ok()).unwrap_or(tracing::Level::INFO);
        let _ = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .try_init();
    }
}
