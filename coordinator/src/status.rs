//! How each error of the coordinator's library becomes a gRPC status: one `From` per error
//! type, so a handler says `?` and the code a client sees is decided here. Anything the
//! caller cannot fix is `internal` (and logged); the message names the cause without the
//! coordinator's internals.
use spa_proto::reason::{Reason, invalid};
use tonic::{Code, Status};

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
    // Debug escapes control characters but prints bidi and format characters as they are.
    let quoted: String = format!("{cut:?}").chars().map(|c| if is_hiding(c) { format!("\\u{{{:x}}}", c as u32) } else { c.to_string() }).collect();
    format!("{quoted}{more}")
}

/// Characters that reorder or hide text on a terminal or in a log viewer without being
/// control characters: bidi embeddings, overrides and isolates, zero-width and invisible
/// formatting characters, line and paragraph separators, tag characters.
fn is_hiding(c: char) -> bool {
    matches!(c as u32, 0xAD | 0x61C | 0x180E | 0x200B..=0x200F | 0x2028..=0x202E | 0x2060..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB | 0xE0001 | 0xE0020..=0xE007F)
}

/// A label a caller chooses that others read later (a device's name, a token's note): at
/// most `max` bytes, no control character and none that reorders or hides text.
pub(crate) fn check_label(field: &str, s: &str, max: usize) -> Result<(), Status> {
    if s.len() > max || s.chars().any(|c| c.is_control() || is_hiding(c)) {
        return Err(invalid(field, format!("{field} must be at most {max} bytes without control or bidi/format characters")));
    }
    Ok(())
}

/// An identifier a caller names (a device id, a token id): 1..=64 of `[A-Za-z0-9._-]`, so
/// that it can be echoed and logged as it is.
pub(crate) fn check_id(field: &str, s: &str) -> Result<(), Status> {
    if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err(invalid(field, format!("{field} must be 1..=64 characters of [A-Za-z0-9._-]")));
    }
    Ok(())
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        match e {
            StoreError::UnknownToken | StoreError::TokenUsed | StoreError::TokenExpired | StoreError::TokenRevoked => Status::unauthenticated(e.to_string()),
            StoreError::KeyEnrolled(_) => Status::already_exists(e.to_string()),
            StoreError::DeviceRevoked(_) => Reason::DeviceRevoked.status(Code::PermissionDenied, e.to_string()),
            StoreError::KeyChanged(_) => Status::aborted(e.to_string()),
            StoreError::UnknownDevice(_) | StoreError::UnknownTokenId(_) => Status::not_found(e.to_string()),
            // A full or failing disk: the call may be retried once the store works again.
            _ if e.is_io() => {
                tracing::error!("store unavailable: {e}");
                Status::unavailable(format!("coordinator store unavailable: {e}"))
            }
            StoreError::Io(_)
            | StoreError::Backend(_)
            | StoreError::Corrupt(_)
            | StoreError::Schema(_)
            | StoreError::Fenced(_)
            | StoreError::VersionExists(_)
            | StoreError::Unavailable => internal(e),
        }
    }
}

impl From<RoundError> for Status {
    fn from(e: RoundError) -> Status {
        match e {
            RoundError::InvalidPlan(_) => Status::invalid_argument(e.to_string()),
            RoundError::NoSuchRound(_) => Status::not_found(e.to_string()),
            RoundError::Store(s) => s.into(),
            RoundError::SecAgg(_) | RoundError::Shards(_) | RoundError::Aborted(_) | RoundError::AbortedByOperator | RoundError::Internal(_) => internal(e),
        }
    }
}

impl From<AnswerError> for Status {
    fn from(e: AnswerError) -> Status {
        match e {
            AnswerError::NotActive(_) | AnswerError::WrongPhase { .. } => Status::failed_precondition(e.to_string()),
            AnswerError::NotInCohort => Status::permission_denied(e.to_string()),
            AnswerError::Invalid(_) | AnswerError::Refused(_) => Status::invalid_argument(e.to_string()),
            AnswerError::Unavailable(_) => Status::unavailable(e.to_string()),
            AnswerError::Store(s) => s.into(),
        }
    }
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        match e {
            EngineError::Refused(_) => Status::invalid_argument(e.to_string()),
            EngineError::SessionGone => Status::not_found(e.to_string()),
            EngineError::PoolFull { .. } => Status::resource_exhausted(e.to_string()),
            EngineError::Stopped | EngineError::Model(_) | EngineError::NonFinite | EngineError::Encoding(_) | EngineError::Panicked(_) => internal(e),
        }
    }
}
