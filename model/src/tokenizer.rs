//! Tokenizers are HF `tokenizer.json` files read by the `tokenizers` crate, so any LLaMA
//! checkpoint's own tokenizer works. [`char_level_json`] writes the one our default backbone
//! uses: one token per character (a BPE model with no merges, which HF reads natively).
//! [`ModelTokens`] holds what a checkpoint's own files say of BOS, EOS and its chat
//! template; no token is ever looked up by a literal string.
use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result, io_err};

/// The special tokens [`char_level_json`] writes, at ids 0, 1 and 2.
pub const UNK: &str = "<unk>";
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";
pub const CHAR_LEVEL_BOS_ID: u32 = 1;
pub const CHAR_LEVEL_EOS_ID: u32 = 2;

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer(vocab={})", self.vocab_size)
    }
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(ModelError::MissingFile { path: path.to_path_buf(), hint: "the checkpoint directory needs tokenizer.json" });
        }
        let text = std::fs::read_to_string(path).map_err(crate::error::io_err(path))?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::Tokenizer { message, .. } => ModelError::Tokenizer { path: path.to_path_buf(), message },
            other => other,
        })
    }

    /// Parses a tokenizer.json (a device gets it from its coordinator: any bytes). tokenizers
    /// 0.22 panics on some malformed files (`expect("Helper")` in its decoder section, found
    /// by `tests/decoders.rs`): that is caught and reported as a malformed file.
    pub fn from_json(text: &str) -> Result<Self> {
        let bad = |message: String| ModelError::Tokenizer { path: "tokenizer.json".into(), message };
        let parsed = std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>())
            .map_err(|_| bad("malformed tokenizer.json (the tokenizers parser panicked on it)".into()))?;
        let inner = parsed.map_err(|e| bad(e.to_string()))?;
        let vocab_size = inner.get_vocab_size(true);
        Ok(Self { inner, vocab_size })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(|e| ModelError::Tokenizer { path: "tokenizer.json".into(), message: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| ModelError::Tokenizer { path: "tokenizer.json".into(), message: e.to_string() })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// BOS, EOS and the chat template of a checkpoint, from its own files: `config.json`, then
/// `generation_config.json` (which wins, as in HF's `generate`), and `tokenizer_config.json`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelTokens {
    pub bos: Option<u32>,
    /// Any of these ends a generation (HF allows a list).
    pub eos: Vec<u32>,
    /// Prepend BOS to prompts (`add_bos_token`).
    pub add_bos: bool,
    pub chat_template: Option<String>,
    /// The template's `bos_token` / `eos_token` strings.
    bos_token: String,
    eos_token: String,
}

fn token_ids(v: &Value, key: &str) -> Result<Vec<u32>> {
    let bad = || ModelError::Config { path: key.into(), message: format!("'{key}' must be a token id or a list of them, got {v}") };
    let one = |x: &Value| x.as_u64().filter(|&i| i <= u32::MAX as u64).map(|i| i as u32).ok_or_else(bad);
    match v {
        Value::Null => Ok(vec![]),
        Value::Array(a) => a.iter().map(one).collect(),
        x => Ok(vec![one(x)?]),
    }
}

/// A special token's content: a string or HF's `{"content": ...}` object.
fn token_content(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or("").to_string(),
        _ => String::new(),
    }
}

/// A writer that refuses to grow past `max` bytes.
struct Capped {
    buf: Vec<u8>,
    max: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.max {
            return Err(std::io::Error::other(format!("output over {} bytes", self.max)));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ModelTokens {
    /// Reads `dir`'s config.json and, where present, generation_config.json and
    /// tokenizer_config.json.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<Option<String>> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(t) => Ok(Some(t)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_err(&path)(e)),
            }
        };
        let config = read("config.json")?
            .ok_or_else(|| ModelError::MissingFile { path: dir.join("config.json"), hint: "a HuggingFace checkpoint directory needs config.json" })?;
        Self::from_json(&config, read("generation_config.json")?.as_deref(), read("tokenizer_config.json")?.as_deref())
    }

    /// The same from the files' contents (a device gets them from the coordinator).
    pub fn from_json(config: &str, generation: Option<&str>, tokenizer_config: Option<&str>) -> Result<Self> {
        let parse = |name: &str, text: &str| -> Result<Value> {
            serde_json::from_str(text).map_err(|e| ModelError::Config { path: name.into(), message: e.to_string() })
        };
        let config = parse("config.json", config)?;
        let generation = generation.map(|g| parse("generation_config.json", g)).transpose()?.unwrap_or(Value::Null);
        let tc = tokenizer_config.map(|t| parse("tokenizer_config.json", t)).transpose()?.unwrap_or(Value::Null);
        let pick = |key: &str| generation.get(key).filter(|v| !v.is_null()).or(config.get(key)).unwrap_or(&Value::Null);
        let bos = token_ids(pick("bos_token_id"), "bos_token_id")?.first().copied();
        let eos = token_ids(pick("eos_token_id"), "eos_token_id")?;
        // HF allows one template or a list of named ones; "default" is the chat one.
        let chat_template = match tc.get("chat_template") {
            Some(Value::String(t)) => Some(t.clone()),
            Some(Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(String::from),
            _ => None,
        };
        Ok(Self {
            bos,
            eos,
            add_bos: tc.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false),
            chat_template,
            bos_token: token_content(tc.get("bos_token")),
            eos_token: token_content(tc.get("eos_token")),
        })
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    /// `user`'s message in the chat template, with the assistant's turn opened; `None` when the
    /// checkpoint has no template. The template may come from a coordinator the device does not
    /// trust: its size, the instructions it runs and the text it writes are bounded (the
    /// SmolLM2 template renders in a few hundred instructions).
    pub fn chat_prompt(&self, user: &str) -> Result<Option<String>> {
        const MAX_TEMPLATE: usize = 256 << 10;
        const MAX_FUEL: u64 = 200_000;
        const MAX_OUTPUT: usize = 1 << 20;
        let Some(template) = &self.chat_template else { return Ok(None) };
        let bad = |m: String| ModelError::Tokenizer { path: "tokenizer_config.json".into(), message: format!("chat template: {m}") };
        if template.len() > MAX_TEMPLATE {
            return Err(bad(format!("{} bytes, over the limit of {MAX_TEMPLATE}", template.len())));
        }
        let mut env = minijinja::Environment::new();
        env.set_fuel(Some(MAX_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", template).map_err(|e| bad(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => vec![minijinja::context! { role => "user", content => user }],
            add_generation_prompt => true,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        };
        let mut out = Capped { buf: Vec::new(), max: MAX_OUTPUT };
        env.get_template("chat").and_then(|t| t.render_captured_to(ctx, &mut out)).map_err(|e| bad(e.to_string()))?;
        String::from_utf8(out.buf).map(Some).map_err(|_| bad("not UTF-8".into()))
    }

    /// A prompt's ids: in the chat template if `chat` (an error if there is none), BOS first
    /// where the checkpoint asks for it.
    pub fn prompt_ids(&self, tok: &Tokenizer, text: &str, chat: bool) -> Result<Vec<u32>> {
        let text = if chat {
            self.chat_prompt(text)?.ok_or_else(|| ModelError::InvalidInput("--chat: this model has no chat template (tokenizer_config.json)".into()))?
        } else {
            text.to_string()
        };
        let mut ids = Vec::new();
        // Templates that write `{{ bos_token }}` themselves get no second one.
        let has_bos = !self.bos_token.is_empty() && text.starts_with(&self.bos_token);
        if self.add_bos
            && let Some(b) = self.bos
            && !has_bos
        {
            ids.push(b);
        }
        ids.extend(tok.encode(&text)?);
        Ok(ids)
    }
}

/// A `tokenizer.json` with `<unk>`=0, `<s>`=1, `</s>`=2, then one token per character of
/// `chars` (sorted, deduplicated).
pub fn char_level_json(chars: impl IntoIterator<Item = char>) -> String {
    let mut chars: Vec<char> = chars.into_iter().collect();
    chars.sort_unstable();
    chars.dedup();
    let specials = [UNK, BOS, EOS];
    let mut vocab = serde_json::Map::new();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), i.into());
    }
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), (i + specials.len()).into());
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let v = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": UNK, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    });
    serde_json::to_string_pretty(&v).expect("json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_level_round_trip_and_unknowns() {
        let tok = Tokenizer::from_json(&char_level_json("Hello, world!\n".chars())).unwrap();
        assert_eq!(tok.vocab_size(), 3 + 11);
        let ids = tok.encode("Hello,\nworld!").unwrap();
        assert_eq!(ids.len(), 13);
        assert_eq!(tok.decode(&ids).unwrap(), "Hello,\nworld!");
        // Characters outside the vocabulary become <unk> (id 0) and decode to nothing.
        assert_eq!(tok.encode("Hz").unwrap(), vec![tok.token_to_id("H").unwrap(), 0]);
        assert_eq!(tok.token_to_id(BOS), Some(CHAR_LEVEL_BOS_ID));
        assert_eq!(tok.token_to_id(EOS), Some(CHAR_LEVEL_EOS_ID));
    }

    #[test]
    fn special_tokens_come_from_the_checkpoint_files() {
        let config = r#"{"bos_token_id": 1, "eos_token_id": 2}"#;
        let t = ModelTokens::from_json(config, None, None).unwrap();
        assert_eq!((t.bos, t.eos.clone(), t.add_bos), (Some(1), vec![2], false));
        assert_eq!(t.chat_prompt("hi").unwrap(), None);
        // generation_config.json wins, and may list several ends.
        let t = ModelTokens::from_json(config, Some(r#"{"eos_token_id": [7, 2]}"#), None).unwrap();
        assert!(t.is_eos(7) && t.is_eos(2) && !t.is_eos(1));
        let tc = r#"{"add_bos_token": true, "bos_token": {"content": "<s>"},
            "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'].strip() }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"}"#;
        let t = ModelTokens::from_json(config, None, Some(tc)).unwrap();
        assert_eq!(t.chat_prompt("  hi ").unwrap().unwrap(), "<s>[user] hi[assistant]");
        let tok = Tokenizer::from_json(&char_level_json("<s>[]usrhiatn ".chars())).unwrap();
        // The plain prompt gets BOS; the template wrote it as text already, so not twice.
        assert_eq!(t.prompt_ids(&tok, "hi", false).unwrap()[0], 1);
        let chat = t.prompt_ids(&tok, "hi", true).unwrap();
        assert_eq!((chat[0], chat.iter().filter(|&&i| i == 1).count()), (1, 1));
        let broken = ModelTokens::from_json(config, None, Some(r#"{"chat_template": "{% if %}"}"#)).unwrap();
        assert!(broken.chat_prompt("x").unwrap_err().to_string().contains("chat template"));
        assert!(ModelTokens::from_json(r#"{"eos_token_id": "x"}"#, None, None).is_err());
        assert!(ModelTokens::default().prompt_ids(&tok, "hi", true).unwrap_err().to_string().contains("no chat template"));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Tokenizer::from_json("{not json").is_err());
    }

    /// Templates a hostile coordinator could serve: each fails fast with an error, none hangs
    /// or exhausts memory.
    #[test]
    fn hostile_chat_templates_are_bounded() {
        let with = |t: &str| {
            let tc = serde_json::json!({ "chat_template": t }).to_string();
            ModelTokens::from_json("{}", None, Some(&tc)).unwrap()
        };
        let t0 = std::time::Instant::now();
        for t in [
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "{% for i in range(100000) %}{{ 'x' * 99999999 }}{% endfor %}",
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "{{ range(1000000000) }}",
        ] {
            let e = with(t).chat_prompt("hi").unwrap_err();
            assert!(e.to_string().contains("chat template"), "{t}: {e}");
        }
        assert!(with(&"x".repeat(300 << 10)).chat_prompt("hi").unwrap_err().to_string().contains("over the limit"));
        assert!(t0.elapsed() < std::time::Duration::from_secs(20), "{:?}", t0.elapsed());
        assert_eq!(with("{{ messages[0]['content'] }}!").chat_prompt("ok").unwrap().unwrap(), "ok!");
    }

    /// A coordinator's tokenizer.json, mutated: refused or accepted, never a panic.
    #[test]
    fn mutated_tokenizer_json_never_panics() {
        let good = char_level_json("abcdefgh ".chars());
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..300 {
            let mut b = good.clone().into_bytes();
            for _ in 0..1 + next() % 4 {
                let i = (next() as usize) % b.len();
                match next() % 3 {
                    0 => b[i] = next() as u8,
                    1 => {
                        b.remove(i);
                    }
                    _ => b.insert(i, b"{}[]\",:0-9e"[(next() % 11) as usize]),
                }
            }
            let text = String::from_utf8_lossy(&b).into_owned();
            let r = std::panic::catch_unwind(|| Tokenizer::from_json(&text).map(|t| t.encode("abc hhh").map(|ids| t.decode(&ids))));
            assert!(r.is_ok(), "panicked on {text}");
        }
    }
}
