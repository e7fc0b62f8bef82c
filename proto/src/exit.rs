//! Exit codes of the command-line tools (`spa`, `spa-coordinator`, `spa-client`), read from
//! the error that ended them; docs/OPERATIONS.md lists them. Usage errors (2) are clap's.
use std::error::Error;

use tonic::Code;

/// Anything else: a local file, a broken store, a failed computation.
pub const FAILURE: u8 = 1;
/// Bad arguments (clap exits with it before anything runs).
pub const USAGE: u8 = 2;
/// What was asked for does not exist (a round, a device, a global version, a file).
pub const NOT_FOUND: u8 = 3;
/// The coordinator refused the call: credentials, permissions, arguments, state.
pub const REFUSED: u8 = 4;
/// The coordinator could not be reached or did not answer in time.
pub const UNAVAILABLE: u8 = 5;

/// The exit code for an error and its chain of causes (`anyhow::Error::chain`): the first
/// gRPC status, transport error or missing file found decides.
pub fn code<'a>(chain: impl IntoIterator<Item = &'a (dyn Error + 'static)>) -> u8 {
    for e in chain {
        if let Some(s) = e.downcast_ref::<tonic::Status>() {
            return match s.code() {
                Code::NotFound => NOT_FOUND,
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => UNAVAILABLE,
                Code::Unauthenticated
                | Code::PermissionDenied
                | Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::AlreadyExists
                | Code::ResourceExhausted
                | Code::OutOfRange => REFUSED,
                _ => FAILURE,
            };
        }
        if e.downcast_ref::<tonic::transport::Error>().is_some() {
            return UNAVAILABLE;
        }
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound) {
            return NOT_FOUND;
        }
    }
    FAILURE
}

/// A binary's end: nothing on success; otherwise the error and its causes on stderr (as
/// `fn main() -> anyhow::Result<()>` prints them) and the code [`code`] picks.
pub fn finish<E>(result: Result<(), E>) -> std::process::ExitCode
where
    E: std::fmt::Debug + AsRef<dyn Error + Send + Sync + 'static>,
{
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:?}");
            let top: &(dyn Error + 'static) = e.as_ref();
            std::process::ExitCode::from(code(std::iter::successors(Some(top), |&e| e.source())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(e: &(dyn Error + 'static)) -> u8 {
        code(std::iter::successors(Some(e), |&e| e.source()))
    }

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped")]
    struct Wrapped(#[source] tonic::Status);

    #[test]
    fn statuses_map_to_their_codes_through_wrappers() {
        assert_eq!(code_of(&Wrapped(tonic::Status::not_found("x"))), NOT_FOUND);
        assert_eq!(code_of(&Wrapped(tonic::Status::permission_denied("x"))), REFUSED);
        assert_eq!(code_of(&tonic::Status::unavailable("x")), UNAVAILABLE);
        assert_eq!(code_of(&tonic::Status::internal("x")), FAILURE);
        assert_eq!(code_of(&std::io::Error::from(std::io::ErrorKind::NotFound)), NOT_FOUND);
        assert_eq!(code_of(&std::io::Error::from(std::io::ErrorKind::PermissionDenied)), FAILURE);
    }
}
