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

/// A user's private data, split in order into train, validation (possibly empty) and test.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserData {
    pub user: String,
    pub train: Vec<Example>,
    #[serde(default)]
    pub val: Vec<Example>,
    pub test: Vec<Example>,
}

/// Splits in order: the first `ceil(frac * n)` examples train, the rest test (LEAF's
/// in-order split, so the test set is the user's later data).
pub fn split_in_order(user: String, examples: Vec<Example>, train_frac: f64) -> UserData {
    let n_train = ((examples.len() as f64) * train_frac).ceil() as usize;
    let mut train = examples;
    let test = train.split_off(n_train.min(train.len()));
    UserData { user, train, val: vec![], test }
}

impl UserData {
    /// Moves the last `max(ceil(fraction * all examples), min)` train examples to validation
    /// (they come after the rest of train and before test, in time order). Refused when that
    /// would leave fewer train than validation examples.
    pub fn with_validation(mut self, fraction: f64, min: usize) -> crate::Result<Self> {
        let all = self.train.len() + self.val.len() + self.test.len();
        let n = (((all as f64) * fraction).ceil() as usize).max(min);
        if n == 0 {
            return Ok(self);
        }
        if self.train.len() < 2 * n {
            return Err(crate::ModelError::Data(format!(
                "user {:?}: {} train examples cannot give {n} to validation and keep as many (take more text per user)",
                self.user,
                self.train.len()
            )));
        }
        let mut val = self.train.split_off(self.train.len() - n);
        val.append(&mut self.val);
        self.val = val;
        Ok(self)
    }
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
