//! spa-coordinator
