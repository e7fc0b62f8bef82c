use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use spa_client::agent::{self, AgentEvent, AgentOptions};
use spa_client::config::ClientConfig;
use spa_client::data::Format;
use spa_client::generate;
use spa_client::ops;
use spa_client::personal::FeatureProgress;
use spa_model::BackendKind;

/// SPA device client: enroll, add local data, train the side plugin, generate.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The device's home directory (its own store and config).
    #[arg(long, global = true, default_value = "spa-device")]
    home: PathBuf,
    /// Print each result as one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Compute backend for training and generation: flex (default), ndarray, cuda. Overrides
    /// BURN_DEVICE.
    #[arg(long, global = true)]
    device: Option<BackendKind>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate the device identity key and enroll with a one-time token.
    Enroll {
        /// Coordinator URL, e.g. https://127.0.0.1:7443
        #[arg(long)]
        coordinator: String,
        #[arg(long)]
        token: String,
        /// The coordinator's CA certificate (its home's tls/ca.pem).
        #[arg(long)]
        ca: PathBuf,
        /// A label for this device.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Identity, data, training state, and a signed ping of the coordinator.
    Status {
        /// Do not contact the coordinator.
        #[arg(long)]
        offline: bool,
    },
    /// Replace the identity key in place (same device id); the old key is refused afterwards.
    /// The new key is sealed with the passphrase (SPA_KEY_PASSPHRASE_FILE / SPA_KEY_PASSPHRASE)
    /// or with --new-passphrase-file. Run it again if it was interrupted: it finishes.
    RotateKey {
        /// Seal the new key with the passphrase in this file instead (changes the passphrase).
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Local data.
    #[command(subcommand)]
    Data(DataCommand),
    /// Fit the personal model (SPA v2) against the stored body on local data (features from
    /// the coordinator): personal side network, mixture, private memory, gate, each chosen
    /// on the device's validation split. Settings: client.toml's [personal].
    Train {
        /// Most epochs of each trained candidate (default: [personal] epochs).
        #[arg(long)]
        epochs: Option<usize>,
        /// The one learning rate tried (default: [personal] lrs).
        #[arg(long)]
        lr: Option<f64>,
        /// Fit against a fresh body instead of the stored one (the last adopted version).
        #[arg(long)]
        fresh: bool,
    },
    /// Run the device agent: take part in federated rounds until stopped (or --rounds).
    Run {
        /// Exit after this many committed versions were adopted and evaluated.
        #[arg(long)]
        rounds: Option<u32>,
        /// Longest wait between polls while the coordinator is unreachable, seconds.
        #[arg(long, default_value_t = 10)]
        max_backoff: u64,
    },
    /// Generate text with the coordinator's backbone and the local plugin and gate.
    Generate {
        prompt: String,
        #[arg(long, default_value_t = 120)]
        max_tokens: usize,
        #[command(flatten)]
        sampling: generate::SamplingArgs,
        /// Stop at the end of the first generated line.
        #[arg(long, conflicts_with = "stop")]
        stop_at_newline: bool,
        /// Stop once the generated text contains this.
        #[arg(long)]
        stop: Option<String>,
        /// Wrap the prompt in the model's chat template (tokenizer_config.json).
        #[arg(long)]
        chat: bool,
        /// Keep generating past the model's end-of-sequence token.
        #[arg(long)]
        ignore_eos: bool,
        /// One round trip per token (no drafts from the coordinator).
        #[arg(long)]
        naive: bool,
        /// Most tokens the coordinator drafts per round trip (the length adapts below it).
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
        max_draft: u32,
        /// What the device receives per position: every tap's state, or the shared
        /// down-projections applied by the coordinator (auto: down when the plugin's are a
        /// committed global version's).
        #[arg(long, value_enum, default_value_t = generate::Inputs::Auto)]
        inputs: generate::Inputs,
        /// Drafts from the backbone only (by default the coordinator may also draft from the
        /// global side plugin after tokens the gate gave to the side, where those are
        /// accepted more often).
        #[arg(long)]
        no_side_drafts: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DataCommand {
    /// Add a file: play script, JSONL of {"input","output"}, or plain text.
    Add {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Auto)]
        format: Format,
        /// For play scripts: the role whose speeches are this device's replies.
        #[arg(long)]
        speaker: Option<String>,
    },
    /// List the data sources and example count.
    List,
}

struct Bars {
    feat: Option<ProgressBar>,
}

impl FeatureProgress for Bars {
    fn features(&mut self, done: usize, total: usize) {
        let b = self.feat.get_or_insert_with(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(ProgressStyle::with_template("features {bar:30} {pos}/{len} examples").expect("template"));
            b
        });
        b.set_position(done as u64);
        if done == total {
            b.finish();
        }
    }
}

/// `data list --json`.
#[derive(serde::Serialize)]
struct DataList<'a, S> {
    examples: usize,
    sources: &'a [S],
}

fn main() -> std::process::ExitCode {
    spa_model::alloc::keep_freed_memory();
    spa_proto::exit::finish(run(Cli::parse()))
}

fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let home = cli.home;
    let backend = BackendKind::resolve(cli.device)?;
    match cli.command {
        Command::Enroll { coordinator, token, ca, name } => {
            let ca_pem = std::fs::read_to_string(&ca).with_context(|| format!("reading {}", ca.display()))?;
            let r = rt.block_on(ops::enroll(&home, &coordinator, &token, &ca_pem, &name))?;
            emit(json, &r, |r| format!("enrolled as {} with {} (backbone {})", r.device_id, r.coordinator, r.backbone_version))?;
        }
        Command::RotateKey { new_passphrase_file } => {
            let new_pass = new_passphrase_file.as_deref().map(spa_client::keyseal::passphrase_file).transpose()?;
            let r = rt.block_on(spa_client::rotate::rotate_key(&home, new_pass))?;
            emit(json, &r, |r| {
                let how = if r.key_sealed { "sealed" } else { "in clear" };
                let done = if r.finished_interrupted { " (finished an interrupted rotation)" } else { "" };
                format!("{}: new identity key in use, kept {how}{done}", r.device_id)
            })?;
        }
        Command::Status { offline } => {
            let r = rt.block_on(ops::status(&home, offline))?;
            emit(json, &r, |r| serde_json::to_string_pretty(r).expect("serializes"))?;
        }
        Command::Data(DataCommand::Add { file, format, speaker }) => {
            let s = ops::data_add(&home, &file, format, speaker.as_deref())?;
            emit(json, &s, |s| format!("added {} examples from {} ({})", s.examples, s.file, s.format))?;
        }
        Command::Data(DataCommand::List) => {
            let (sources, n) = ops::data_list(&home)?;
            emit(json, &DataList { examples: n, sources: &sources }, |l| {
                let rows: String = l.sources.iter().map(|s| format!("{:>6}  {:<6} {}\n", s.examples, s.format, s.file)).collect();
                format!("{rows}{n} examples")
            })?;
        }
        Command::Train { epochs, lr, fresh } => {
            let mut pc = ClientConfig::load(&home)?.personal;
            if let Some(e) = epochs {
                pc.epochs = e;
            }
            if let Some(l) = lr {
                pc.lrs = vec![l];
            }
            let mut bars = Bars { feat: None };
            let r = rt.block_on(ops::train(&home, &pc, fresh, backend, &mut bars))?;
            if let Some(b) = bars.feat {
                b.finish();
            }
            emit(json, &r, |r| serde_json::to_string_pretty(r).expect("serializes"))?;
        }
        Command::Run { rounds, max_backoff } => {
            let opts = AgentOptions { rounds, max_backoff: std::time::Duration::from_secs(max_backoff.max(1)), backend };
            let n = rt.block_on(agent::run(&home, &opts, &mut |e| eprintln!("{}", describe(&e))))?;
            eprintln!("adopted {n} committed version(s); exiting");
        }
        Command::Generate { prompt, max_tokens, sampling, stop_at_newline, stop, chat, ignore_eos, naive, max_draft, inputs, no_side_drafts } => {
            let opts = generate::GenerateOptions {
                max_tokens,
                sampling: sampling.sampling(),
                stop: if stop_at_newline { Some("\n".into()) } else { stop },
                chat,
                ignore_eos,
                naive,
                max_draft: max_draft as usize,
                inputs,
                side_drafts: !no_side_drafts,
                coordinator: None,
                backend,
            };
            rt.block_on(generate_text(&home, &prompt, &opts, json))?;
        }
    }
    Ok(())
}

/// Prints a result: one JSON document with `--json`, else its text form.
fn emit<T: serde::Serialize>(json: bool, r: &T, text: impl FnOnce(&T) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        println!("{}", text(r));
    }
    Ok(())
}

/// `generate`: the text streams to stdout as it comes (the prompt first), then a summary on
/// stderr; with `--json`, one document at the end.
async fn generate_text(home: &std::path::Path, prompt: &str, opts: &generate::GenerateOptions, json: bool) -> Result<()> {
    let mut out = std::io::stdout();
    if !json {
        print!("{prompt}");
    }
    let r = generate::generate(home, prompt, opts, &mut |t| {
        if !json {
            print!("{t}");
            let _ = out.flush();
        }
    })
    .await?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!();
        eprintln!(
            "{} tokens ({} from the side plugin), {} round trips, {}/{} drafts accepted, {} bytes, {:.2}s",
            r.tokens,
            r.side_tokens,
            r.round_trips,
            r.accepted,
            r.drafted,
            r.bytes_sent + r.bytes_received,
            r.seconds
        );
    }
    Ok(())
}

fn describe(e: &AgentEvent) -> String {
    match e {
        AgentEvent::Connected { device_id } => format!("connected as {device_id}; waiting for rounds"),
        AgentEvent::Redirected { to } => format!("this coordinator does not run the rounds: moving to {to}"),
        AgentEvent::Unreachable { error, retry_in } => format!("coordinator unreachable or refusing ({error}); retrying in {retry_in:?}"),
        AgentEvent::Trained { round_id, version, examples, final_loss } => {
            format!("round {round_id}: trained on {examples} examples from global v{version} (loss {final_loss:.3}); keys advertised")
        }
        AgentEvent::Phase { round_id, phase } => format!("round {round_id}: {phase} sent"),
        AgentEvent::RoundFailed { round_id, error } => format!("round {round_id}: left the round: {error}"),
        AgentEvent::Evaluated { round_id, version, backbone_loss, global_loss, personalized_loss } => {
            format!(
                "round {round_id}: adopted global v{version}; held-out loss backbone {backbone_loss:.3} / global {global_loss:.3} / personalized {personalized_loss:.3}"
            )
        }
    }
}
