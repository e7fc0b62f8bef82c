//! How each error of the coordinator's library becomes a gRPC status: one `From` per error
//! type, so a handler says `?` and the code a client sees is decided here. Anything the
//! caller cannot fix is `internal` (and logged); the message names the cause without the
//! coordinator's internals.
use tonic::Status;

use crate::engine::EngineError;
use crate::rounds::{AnswerError, RoundError};
use crate::store::StoreError;

/// An error the caller cannot fix: logged here, reported as `internal`.
pub(crate) fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!("internal error: {e}");
    Status::internal(format!("coordinator error: {e}"))
}

/// A caller's string as it may appear in an error message: at most 64 characters, quoted and
/// escaped (no control characters reach a log or a terminal, and no megabyte comes back).
pub(crate) fn echo(s: &str) -> String {
    let cut: String = s.chars().take(64).collect();
    let more = if cut.len() < s.len() { format!("... ({} bytes)", s.len()) } else { String::new() };
    format!("{cut:?}{more}")
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        match e {
            StoreError::UnknownToken | StoreError::TokenUsed | StoreError::TokenExpired | StoreError::TokenRevoked => Status::unauthenticated(e.to_string()),
            StoreError::KeyEnrolled(_) => Status::already_exists(e.to_string()),
            StoreError::DeviceRevoked(_) => Status::permission_denied(e.to_string()),
            StoreError::UnknownDevice(_) | StoreError::UnknownTokenId(_) => Status::not_found(e.to_string()),
            // A full or failing disk: the call may be retried once the store works again.
            _ if e.is_io() => {
                tracing::error!("store unavailable: {e}");
                Status::unavailable(format!("coordinator store unavailable: {e}"))
            }
            StoreError::Sled(_) | StoreError::Corrupt(_) | StoreError::VersionExists(_) | StoreError::Unavailable => internal(e),
        }
    }
}

impl From<RoundError> for Status {
    fn from(e: RoundError) -> Status {
        match e {
            RoundError::InvalidPlan(_) => Status::invalid_argument(e.to_string()),
            RoundError::NoSuchRound(_) => Status::not_found(e.to_string()),
            RoundError::Store(s) => s.into(),
            RoundError::SecAgg(_) | RoundError::Aborted(_) | RoundError::AbortedByOperator | RoundError::Internal(_) => internal(e),
        }
    }
}

impl From<AnswerError> for Status {
    fn from(e: AnswerError) -> Status {
        match e {
            AnswerError::NotActive(_) | AnswerError::WrongPhase { .. } => Status::failed_precondition(e.to_string()),
            AnswerError::NotInCohort => Status::permission_denied(e.to_string()),
            AnswerError::Invalid(_) | AnswerError::Refused(_) => Status::invalid_argument(e.to_string()),
            AnswerError::Store(s) => s.into(),
        }
    }
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        match e {
            EngineError::Refused(_) => Status::invalid_argument(e.to_string()),
            EngineError::SessionGone => Status::not_found(e.to_string()),
            EngineError::Stopped | EngineError::Model(_) | EngineError::NonFinite | EngineError::Encoding(_) | EngineError::Panicked(_) => internal(e),
        }
    }
}
