//! Device data: the LEAF-style Shakespeare partition (each speaking role is a user) and a
//! generator of synthetic users with distinct styles for tests and the quickstart.
pub mod shakespeare;
pub mod synthetic;

use serde::{Deserialize, Serialize};

/// One seq2seq example: the model reads `prompt` and must produce `reply`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub prompt: String,
    pub reply: String,
}

/// A user's private data, split in order into train and test.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserData {
    pub user: String,
    pub train: Vec<Example>,
    pub test: Vec<Example>,
}

/// Splits in order: the first `ceil(frac * n)` examples train, the rest test (LEAF's
/// in-order split, so the test set is the user's later data).
pub fn split_in_order(user: String, examples: Vec<Example>, train_frac: f64) -> UserData {
    let n_train = ((examples.len() as f64) * train_frac).ceil() as usize;
    let mut train = examples;
    let test = train.split_off(n_train.min(train.len()));
    UserData { user, train, test }
}

/// The text layout of the play scripts, shared by pretraining and personalization so that
/// the backbone has seen the format: `NAME:\nspeech\n\n`.
pub fn format_speech(speaker: &str, text: &str) -> String {
    format!("{speaker}:\n{text}\n\n")
}

/// The prompt for `speaker` replying to `cue` (said by `cue_speaker`), cue cut to its last
/// `max_cue_chars` characters.
pub fn reply_prompt(cue_speaker: &str, cue: &str, speaker: &str, max_cue_chars: usize) -> String {
    let n = cue.chars().count();
    let cue: String = cue.chars().skip(n.saturating_sub(max_cue_chars)).collect();
    format!("{}{speaker}:\n", format_speech(cue_speaker, &cue))
}

/// Parses JSONL lines of `{"input": .., "output": ..}` (the client's `data add` format).
pub fn parse_jsonl(text: &str) -> crate::Result<Vec<Example>> {
    #[derive(Deserialize)]
    struct Line {
        input: String,
        output: String,
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let line: Line = serde_json::from_str(l).map_err(|e| crate::ModelError::Data(format!("line {}: {e}", i + 1)))?;
            Ok(Example { prompt: line.input, reply: line.output })
        })
        .collect()
}
