//! spa: the top-level package. It owns the end-to-end tests (`tests/`) and the `spa` binary:
//! `quickstart` ([`quickstart`]: the real coordinator and device agents on loopback) and
//! `simulate` ([`simulation`]: every device in one process, network replaced by calls) and
//! `experiment` ([`experiment`]: the personalization tables, arms against baselines) and
//! `generate-bench` ([`genbench`]: collaborative decoding through [`netdelay`]'s delaying proxy).
pub mod experiment;
pub mod genbench;
pub mod model_cli;
pub mod netdelay;
pub mod quickstart;
pub mod simulation;
