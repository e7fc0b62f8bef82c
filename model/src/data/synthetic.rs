//! Synthetic users with distinct, learnable speaking styles, so the quickstart and the tests
//! need no external data. Every user has a fixed opener, a fixed closing phrase and a small
//! favourite vocabulary; cues come from one shared pool. Only characters that occur in
//! play-script English are used, so any backbone pretrained on such text can encode them.
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};

use super::{Example, UserData, reply_prompt, split_in_order};

const NAMES: &[&str] = &[
    "ALDER",
    "BRAMBLE",
    "CRESSIDA",
    "DORCAS",
    "EGLANTINE",
    "FENWICK",
    "GRISELDA",
    "HOLLIS",
    "IMOGEN",
    "JAQUENETTA",
    "KESTREL",
    "LAVINIA",
    "MALVOLIA",
    "NERISSA",
    "OSWIN",
    "PERDITA",
];
const OPENERS: &[&str] = &[
    "Marry, ",
    "By my troth, ",
    "Alas, ",
    "Good morrow! ",
    "Hark, ",
    "Fie, fie! ",
    "Forsooth, ",
    "Peace, ",
    "O sweet day! ",
    "Mark me, ",
    "Heigh-ho! ",
    "Zounds! ",
];
const CLOSERS: &[&str] = &[
    "and so farewell.",
    "I swear it.",
    "mark my words.",
    "so help me.",
    "and there an end.",
    "by the moon.",
    "God save you.",
    "no more of that.",
    "upon my life.",
    "say I well?",
    "so says the wind.",
    "amen to that.",
];
const NOUNS: &[&str] = &[
    "sword", "crown", "horse", "wine", "moon", "sea", "bread", "gold", "rose", "storm", "letter", "ring", "garden", "tower", "fool", "ship", "candle", "lamb",
    "falcon", "river", "winter", "feast", "song", "key",
];
const VERBS: &[&str] = &["loves", "fears", "keeps", "seeks", "holds", "scorns", "praises", "guards", "remembers", "mends"];
const WHO: &[&str] = &["my lord", "the king", "my cousin", "the nurse", "my father", "the duke", "our queen"];
const CUES: &[&str] = &[
    "What news from the court?",
    "Where hast thou been all this while?",
    "Speak, what dost thou think?",
    "How fares the day with thee?",
    "Wilt thou stay or go?",
    "Tell me true, what troubles thee?",
    "Who comes there?",
    "Is it so indeed?",
    "What say you to this?",
    "Why dost thou look so pale?",
];

/// One user's style, drawn from `seed`.
#[derive(Clone, Debug)]
pub struct Style {
    pub name: String,
    pub opener: &'static str,
    pub closer: &'static str,
    pub nouns: Vec<&'static str>,
    pub verbs: Vec<&'static str>,
}

pub fn style(index: usize, seed: u64) -> Style {
    let mut rng = StdRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let round = index / NAMES.len();
    let name = if round == 0 { NAMES[index].to_string() } else { format!("{} {}", NAMES[index % NAMES.len()], "I".repeat(round + 1)) };
    Style {
        name,
        opener: OPENERS[index % OPENERS.len()],
        closer: CLOSERS[(index * 5 + 3) % CLOSERS.len()],
        nouns: NOUNS.sample(&mut rng, 3).copied().collect(),
        verbs: VERBS.sample(&mut rng, 2).copied().collect(),
    }
}

fn reply(style: &Style, rng: &mut StdRng) -> String {
    let who = WHO.choose(rng).expect("non-empty");
    let verb = style.verbs.choose(rng).expect("non-empty");
    let a = style.nouns.choose(rng).expect("non-empty");
    let b = style.nouns.choose(rng).expect("non-empty");
    let mid = match rng.random_range(0..3) {
        0 => format!("{who} {verb} the {a} more than the {b}"),
        1 => format!("the {a} and the {b}, {who} {verb} them both"),
        _ => format!("{who} {verb} the {a}"),
    };
    format!("{}{mid}, {}\n\n", style.opener, style.closer)
}

/// `n_users` users with `examples` examples each, 80/20 in order.
pub fn synthetic_users(n_users: usize, examples: usize, seed: u64) -> Vec<UserData> {
    (0..n_users)
        .map(|u| {
            let st = style(u, seed);
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(1000 + u as u64));
            let ex = (0..examples)
                .map(|_| {
                    let cue = CUES.choose(&mut rng).expect("non-empty");
                    Example { prompt: reply_prompt("STRANGER", cue, &st.name, 64), reply: reply(&st, &mut rng) }
                })
                .collect();
            split_in_order(st.name.clone(), ex, 0.8)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_deterministic_distinct_and_styled() {
        let a = synthetic_users(4, 10, 7);
        assert_eq!(a, synthetic_users(4, 10, 7));
        assert_eq!(a[0].train.len(), 8);
        assert_eq!(a[0].test.len(), 2);
        let names: std::collections::HashSet<_> = a.iter().map(|u| &u.user).collect();
        assert_eq!(names.len(), 4);
        for (i, u) in a.iter().enumerate() {
            let st = style(i, 7);
            for e in u.train.iter().chain(&u.test) {
                assert!(e.reply.starts_with(st.opener) && e.reply.ends_with(&format!("{}\n\n", st.closer)));
                assert!(e.prompt.ends_with(&format!("{}:\n", u.user)));
            }
        }
        let charset: std::collections::HashSet<char> = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.!?:;'-\n".chars().collect();
        assert!(a.iter().flat_map(|u| &u.train).flat_map(|e| e.prompt.chars().chain(e.reply.chars())).all(|c| charset.contains(&c)));
    }
}
