//! Why the coordinator refused a call, in a form a client acts on: a google.rpc.ErrorInfo
//! (domain `spa`) in the status details, beside the human message, and for invalid input the
//! field at fault (google.rpc.BadRequest). Clients match on [`Reason`] and
//! [`invalid_fields`], never on the message's words.
use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The ErrorInfo domain of SPA's reasons.
pub const DOMAIN: &str = "spa";

/// A refusal a client handles differently from "retry later".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The device was revoked: no retry helps, the agent stops.
    DeviceRevoked,
    /// The coordinator cannot project this device's inputs (its global version is not kept,
    /// or the device's down-projections differ from it): ask for taps instead.
    DownProjectionsUnavailable,
    /// This replica does not run the rounds: poll the one at detail [`LEADER`] instead.
    NotLeader,
    /// Another replica serves this device's calls (its round calls apart): the one at detail
    /// [`OWNER`].
    NotOwner,
}

/// The ErrorInfo metadata key of [`Reason::NotLeader`]: the URL of the replica running rounds.
pub const LEADER: &str = "leader";

/// The ErrorInfo metadata key of [`Reason::NotOwner`]: the URL of the replica serving the device.
pub const OWNER: &str = "owner";

impl Reason {
    const ALL: [Reason; 4] = [Reason::DeviceRevoked, Reason::DownProjectionsUnavailable, Reason::NotLeader, Reason::NotOwner];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::DeviceRevoked => "DEVICE_REVOKED",
            Reason::DownProjectionsUnavailable => "DOWN_PROJECTIONS_UNAVAILABLE",
            Reason::NotLeader => "NOT_LEADER",
            Reason::NotOwner => "NOT_OWNER",
        }
    }

    /// A status of `code` and `message` that carries this reason.
    pub fn status(self, code: Code, message: impl Into<String>) -> Status {
        self.status_with(code, message, HashMap::new())
    }

    /// [`Reason::status`] with metadata for the client to act on (as [`LEADER`]).
    pub fn status_with(self, code: Code, message: impl Into<String>, metadata: HashMap<String, String>) -> Status {
        Status::with_error_details(code, message, ErrorDetails::with_error_info(self.as_str(), DOMAIN, metadata))
    }

    /// Where a [`Reason::NotLeader`] refusal sends the device (its [`LEADER`] metadata).
    pub fn leader_url(status: &Status) -> Option<String> {
        Self::url(status, Reason::NotLeader, LEADER)
    }

    /// Where a [`Reason::NotOwner`] refusal sends the device (its [`OWNER`] metadata).
    pub fn owner_url(status: &Status) -> Option<String> {
        Self::url(status, Reason::NotOwner, OWNER)
    }

    fn url(status: &Status, reason: Reason, key: &str) -> Option<String> {
        let info = status.get_error_details().error_info().cloned()?;
        let ours = info.domain == DOMAIN && info.reason == reason.as_str();
        ours.then(|| info.metadata.get(key).cloned()).flatten()
    }

    /// The reason `status` carries, if it carries one of ours.
    pub fn of(status: &Status) -> Option<Reason> {
        let info = status.get_error_details().error_info().cloned()?;
        if info.domain != DOMAIN {
            return None;
        }
        Self::ALL.into_iter().find(|r| r.as_str() == info.reason)
    }
}

/// An INVALID_ARGUMENT that names the request field at fault, as a google.rpc.BadRequest
/// field violation (`field` a dot path into the request message, as `sequences.3.ids`)
/// beside the human message: a client finds the field without reading the words.
pub fn invalid(field: &str, message: impl Into<String>) -> Status {
    let message = message.into();
    Status::with_error_details(Code::InvalidArgument, message.clone(), ErrorDetails::with_bad_request_violation(field, message))
}

/// The request fields `status` says are at fault (none: it names none).
pub fn invalid_fields(status: &Status) -> Vec<String> {
    status.get_error_details().bad_request().map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_survives_the_status_and_words_do_not_make_one() {
        for r in Reason::ALL {
            let st = r.status(Code::PermissionDenied, "anything");
            assert_eq!(Reason::of(&st), Some(r));
            assert_eq!(st.message(), "anything");
        }
        assert_eq!(Reason::of(&Status::permission_denied("device 'x' is revoked")), None);
        let foreign = Status::with_error_details(Code::PermissionDenied, "m", ErrorDetails::with_error_info("DEVICE_REVOKED", "other", HashMap::new()));
        assert_eq!(Reason::of(&foreign), None);
    }

    #[test]
    fn a_not_leader_refusal_names_the_leader_and_no_other_reason_does() {
        let to = |r: Reason| r.status_with(Code::FailedPrecondition, "m", [(LEADER.to_string(), "https://l:1".to_string())].into());
        assert_eq!(Reason::leader_url(&to(Reason::NotLeader)).as_deref(), Some("https://l:1"));
        assert_eq!(Reason::leader_url(&to(Reason::DeviceRevoked)), None);
        assert_eq!(Reason::leader_url(&Reason::NotLeader.status(Code::FailedPrecondition, "m")), None);
        let owner = Reason::NotOwner.status_with(Code::FailedPrecondition, "m", [(OWNER.to_string(), "https://o:1".to_string())].into());
        assert_eq!(Reason::owner_url(&owner).as_deref(), Some("https://o:1"));
        assert_eq!(Reason::leader_url(&owner), None, "an owner is not a leader");
        assert_eq!(Reason::owner_url(&to(Reason::NotLeader)), None);
    }

    #[test]
    fn an_invalid_field_survives_the_status() {
        let st = invalid("sequences.2.ids", "token id 99 out of vocabulary");
        assert_eq!((st.code(), st.message()), (Code::InvalidArgument, "token id 99 out of vocabulary"));
        assert_eq!(invalid_fields(&st), ["sequences.2.ids"]);
        assert!(invalid_fields(&Status::invalid_argument("sequences.2.ids is bad")).is_empty());
    }
}
