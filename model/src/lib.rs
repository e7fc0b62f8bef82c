//! spa-model
