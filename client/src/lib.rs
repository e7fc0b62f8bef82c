//! spa-client
