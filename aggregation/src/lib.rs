//! spa-aggregation: see docs/ARCHITECTURE.md
