//! Test-only faults (the `fault-injection` feature), read from the environment.
//! `SPA_FAULT_STALL=<method path>[,...]`: those calls are accepted and never answered (unary)
//! or answered with a stream that never sends, while the connection stays healthy: a wedged
//! coordinator, which devices must not wait on forever. Crash points are in
//! `rounds::round_loop`.

/// Whether calls to `method` stall.
pub fn stalls(method: &str) -> bool {
    #[cfg(feature = "fault-injection")]
    return std::env::var("SPA_FAULT_STALL").is_ok_and(|v| v.split(',').any(|m| m == method));
    #[cfg(not(feature = "fault-injection"))]
    {
        let _ = method;
        false
    }
}

/// Never returns if calls to `method` stall.
pub async fn stall_point(method: &str) {
    if stalls(method) {
        std::future::pending::<()>().await;
    }
}
