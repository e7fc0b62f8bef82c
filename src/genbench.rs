//! `spa generate-bench`: collaborative decoding measured end to end. The quickstart's
//! federation (a real coordinator, device agents, rounds with SecAgg+) trains the devices'
//! plugins; then the coordinator serves behind [`DelayProxy`]s that add a fixed delay
//! each way, and devices generate through them per token (naive) and speculatively, with
//! tap states or cloud-side down-projections. Every speculative text must equal its
//! per-token text (the command fails otherwise), so this is also the identity check over
//! the real service; `cut_after` cuts the connections mid-generation to check resumes.
use std::time::Duration;

use serde::Serialize;
use spa_client::generate::{GenerateOptions, GenerateReport, Inputs, generate};
use spa_model::generate::Sampling;

use crate::netdelay::DelayProxy;
use crate::quickstart::{QuickstartConfig, federate};

#[derive(Clone, Debug)]
pub struct GenBenchConfig {
    pub quickstart: QuickstartConfig,
    /// One-way delays to measure at, milliseconds.
    pub delays_ms: Vec<u64>,
    /// Generations per mode (device i % devices, its test prompts in order).
    pub prompts: usize,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub max_draft: usize,
    /// Cut every connection after this many text pieces of each speculative generation.
    pub cut_after: Option<usize>,
}

impl Row {
    /// The markdown table's header, for rows printed with `Display`.
    pub const HEADER: &str = "| RTT ms | mode | prompts | tokens | side tokens | round trips / token | acceptance | tokens/s | bytes / token | reconnects |\n|---|---|---|---|---|---|---|---|---|---|\n";
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "| {} | {} | {} | {:.0} | {:.2} | {:.3} | {:.3} | {:.1} | {:.0} | {} |",
            self.rtt_ms,
            self.mode,
            self.prompts,
            self.tokens,
            self.side_fraction,
            self.round_trips_per_token,
            self.acceptance,
            self.tokens_per_s,
            self.bytes_per_token,
            self.reconnects
        )
    }
}

/// One mode at one delay: medians over the prompts.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub rtt_ms: u64,
    pub mode: &'static str,
    pub prompts: usize,
    pub tokens: f64,
    pub round_trips_per_token: f64,
    pub acceptance: f64,
    pub tokens_per_s: f64,
    pub bytes_per_token: f64,
    pub side_fraction: f64,
    pub reconnects: usize,
}

/// The modes measured: (name, naive, inputs, side drafts). The per-token text of each
/// inputs kind is the reference its speculative texts must equal.
const MODES: [(&str, bool, Inputs, bool); 5] = [
    ("naive, taps", true, Inputs::Taps, false),
    ("speculative, taps", false, Inputs::Taps, true),
    ("naive, down f16", true, Inputs::Down, false),
    ("speculative, down f16", false, Inputs::Down, true),
    ("speculative, down f16, backbone drafts only", false, Inputs::Down, false),
];

pub async fn run(cfg: &GenBenchConfig, on_row: &mut dyn FnMut(&Row)) -> anyhow::Result<Vec<Row>> {
    anyhow::ensure!(cfg.prompts > 0 && cfg.max_tokens > 0, "at least one prompt and one token");
    // The down-projected modes need personal models that keep the body's down-projections.
    let qs = QuickstartConfig { show: 0, shared_down: true, ..cfg.quickstart.clone() };
    let fed = federate(&qs, &mut |_| {}).await?;
    let (dir, users) = (&fed.dir, &fed.users);
    let mut rows = Vec::new();
    for &delay in &cfg.delays_ms {
        let proxy = DelayProxy::start(fed.server.addr, Duration::from_millis(delay)).await?;
        let url = format!("https://{}", proxy.addr);
        let mut texts: Vec<Vec<String>> = Vec::new();
        for (mode, naive, inputs, side_drafts) in MODES {
            let mut reports = Vec::new();
            for j in 0..cfg.prompts {
                let (i, u) = (j % users.len(), &users[j % users.len()]);
                let prompt = &u.test[(j / users.len()) % u.test.len()].prompt;
                let opts = GenerateOptions {
                    max_tokens: cfg.max_tokens,
                    sampling: cfg.sampling.clone(),
                    ignore_eos: true,
                    naive,
                    max_draft: cfg.max_draft,
                    inputs,
                    side_drafts,
                    coordinator: Some(url.clone()),
                    backend: qs.backend,
                    ..GenerateOptions::default()
                };
                let mut pieces = 0;
                let cut = cfg.cut_after.filter(|_| !naive);
                let r = generate(&dir.join(format!("device-{i}")), prompt, &opts, &mut |_| {
                    pieces += 1;
                    if cut == Some(pieces) {
                        proxy.cut();
                    }
                })
                .await?;
                anyhow::ensure!(cut.is_none() || r.reconnects > 0, "{mode}: the cut did not break the stream");
                reports.push(r);
            }
            texts.push(reports.iter().map(|r| r.text.clone()).collect());
            let row = summarize(delay, mode, &reports);
            on_row(&row);
            rows.push(row);
        }
        for (reference, spec) in [(0, 1), (2, 3), (2, 4)] {
            for (j, (a, b)) in texts[reference].iter().zip(&texts[spec]).enumerate() {
                anyhow::ensure!(a == b, "prompt {j}: {} differs from {}:\n{a:?}\n{b:?}", MODES[spec].0, MODES[reference].0);
            }
        }
    }
    fed.server.shutdown().await?;
    Ok(rows)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn summarize(delay: u64, mode: &'static str, rs: &[GenerateReport]) -> Row {
    let per = |f: &dyn Fn(&GenerateReport) -> f64| median(rs.iter().map(f).collect());
    let tokens = |r: &GenerateReport| r.tokens.max(1) as f64;
    Row {
        rtt_ms: 2 * delay,
        mode,
        prompts: rs.len(),
        tokens: per(&|r| r.tokens as f64),
        round_trips_per_token: per(&|r| r.round_trips as f64 / tokens(r)),
        acceptance: per(&|r| if r.drafted == 0 { f64::NAN } else { r.accepted as f64 / r.drafted as f64 }),
        tokens_per_s: per(&|r| r.tokens as f64 / r.decode_seconds),
        bytes_per_token: per(&|r| (r.bytes_sent + r.bytes_received) as f64 / tokens(r)),
        side_fraction: per(&|r| r.side_tokens as f64 / tokens(r)),
        reconnects: rs.iter().map(|r| r.reconnects).sum(),
    }
}
