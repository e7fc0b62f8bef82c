//! spa-proto
