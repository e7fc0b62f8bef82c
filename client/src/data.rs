//! `data add FILE`: play-script text (`NAME:` line, speech, blank line), JSONL of
//! `{"input": .., "output": ..}`, or plain text, turned into (prompt, reply) examples.
use spa_model::data::shakespeare::{ExampleLimits, leaf_users, parse_play_script};
use spa_model::data::{Example, parse_jsonl};

use crate::error::{ClientError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Auto,
    Play,
    Jsonl,
    Text,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Play => "play",
            Self::Jsonl => "jsonl",
            Self::Text => "text",
        })
    }
}

/// Characters of plain text per reply, and of the preceding context used as its prompt.
const TEXT_REPLY: usize = 128;
const TEXT_PROMPT: usize = 64;

/// Guesses the format: `.jsonl` or a first line that is a JSON object, then play script
/// if at least two speeches parse, else plain text.
pub fn detect(name: &str, text: &str) -> Format {
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    if name.ends_with(".jsonl") || first.trim_start().starts_with('{') {
        Format::Jsonl
    } else if parse_play_script(text).len() >= 2 {
        Format::Play
    } else {
        Format::Text
    }
}

/// Parses `text`. For play scripts, `speaker` selects whose speeches are this device's
/// replies (default: every speech, each cued by the one before).
pub fn parse(name: &str, text: &str, format: Format, speaker: Option<&str>) -> Result<(Format, Vec<Example>)> {
    let format = if format == Format::Auto { detect(name, text) } else { format };
    let examples = match format {
        Format::Jsonl => parse_jsonl(text)?,
        Format::Play => {
            let speeches = parse_play_script(text);
            let mut roles: Vec<String> = match speaker {
                Some(s) => vec![s.to_string()],
                None => speeches.iter().map(|s| s.speaker.clone()).collect(),
            };
            roles.sort();
            roles.dedup();
            leaf_users(&speeches, &roles, ExampleLimits::default(), 1.0).into_iter().flat_map(|u| u.train).collect()
        }
        Format::Text => {
            let chars: Vec<char> = text.chars().collect();
            let mut out = Vec::new();
            let mut at = TEXT_PROMPT.min(chars.len());
            while at < chars.len() {
                let end = (at + TEXT_REPLY).min(chars.len());
                out.push(Example { prompt: chars[at.saturating_sub(TEXT_PROMPT)..at].iter().collect(), reply: chars[at..end].iter().collect() });
                at = end;
            }
            out
        }
        Format::Auto => unreachable!("resolved above"),
    };
    let examples: Vec<Example> = examples.into_iter().filter(|e| !e.prompt.is_empty() && !e.reply.is_empty()).collect();
    if examples.is_empty() {
        return Err(ClientError::Invalid(format!("{name}: no examples found (format {format})")));
    }
    Ok((format, examples))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_detected_and_parsed() {
        let play = "ANNA:\nGood morrow.\n\nBEN:\nAnd to you, fair Anna.\n\nANNA:\nHow fares the day?\n\n";
        let (f, ex) = parse("a.txt", play, Format::Auto, None).unwrap();
        assert_eq!(f, Format::Play);
        assert_eq!(ex.len(), 2);
        let (_, ex) = parse("a.txt", play, Format::Auto, Some("BEN")).unwrap();
        assert_eq!(ex.len(), 1);
        assert!(ex[0].prompt.starts_with("ANNA:\nGood morrow."));
        let jsonl = "{\"input\": \"hi\", \"output\": \"there\"}\n\n{\"input\": \"a\", \"output\": \"b\"}\n";
        let (f, ex) = parse("x", jsonl, Format::Auto, None).unwrap();
        assert_eq!((f, ex.len()), (Format::Jsonl, 2));
        assert!(parse("x.jsonl", "{\"input\": 1}", Format::Auto, None).is_err());
        let text = "lorem ipsum ".repeat(50);
        let (f, ex) = parse("t", &text, Format::Auto, None).unwrap();
        assert_eq!(f, Format::Text);
        assert_eq!(ex.iter().map(|e| e.reply.chars().count()).sum::<usize>(), text.len() - TEXT_PROMPT);
        assert!(parse("t", "", Format::Text, None).is_err());
    }
}
