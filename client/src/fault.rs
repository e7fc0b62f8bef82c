//! Test-only faults of the device agent (the `fault-injection` feature), read from the
//! environment when a round phase's request arrives.

/// Each variable holds `PHASE` (every round) or `PHASE@ROUND`, PHASE one of training,
/// share_keys, masked_input, unmask:
/// - `SPA_FAULT_EXIT_AT`: the process aborts (no cleanup, like SIGKILL);
/// - `SPA_FAULT_SILENT_AT`: the agent stops answering, process and connection alive;
/// - `SPA_FAULT_GARBAGE_AT`: the answer is malformed (see [`garbage`]).
#[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))]
fn fault(var: &str, phase: &str, round_id: u64) -> bool {
    #[cfg(feature = "fault-injection")]
    if let Ok(v) = std::env::var(var) {
        return v == phase || v == format!("{phase}@{round_id}");
    }
    false
}

/// Aborts the process or goes silent where the environment asks it at this phase.
pub(crate) async fn fault_point(phase: &str, round_id: u64) {
    if fault("SPA_FAULT_EXIT_AT", phase, round_id) {
        eprintln!("fault injection: exiting at {phase}");
        std::process::abort();
    }
    if fault("SPA_FAULT_SILENT_AT", phase, round_id) {
        eprintln!("fault injection: silent from {phase} of round {round_id} on");
        std::future::pending::<()>().await;
    }
}

/// With `SPA_FAULT_GARBAGE_AT` naming this phase: a malformed answer, as a buggy or
/// hostile device would send (share_keys: one share left out; masked_input: lanes that do
/// not match the header's hash).
pub(crate) fn garbage(phase: &str, round_id: u64) -> bool {
    let on = fault("SPA_FAULT_GARBAGE_AT", phase, round_id);
    if on {
        eprintln!("fault injection: malformed {phase} answer in round {round_id}");
    }
    on
}
