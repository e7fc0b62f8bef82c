//! Which forward runs: on the flex backend (serving, features, generation) the host forwards,
//! `decode.rs` for a few positions and `prefill.rs` for many; elsewhere (autodiff, other
//! backends) the tensor forward in `llama.rs`. Above all three, so they import the model and
//! the model imports none of them.
use super::host::HostOutput;
use super::llama::{Backbone, BackboneOutput, TokenBatch};
use super::{KvCache, decode, prefill};
use crate::tensor_util::from_vec;

impl Backbone {
    /// One forward pass. `taps` must be validated with [`Self::check_taps`]; `batch` with
    /// [`TokenBatch::new`] against this cache's length. On the flex backend (serving,
    /// features, generation) the host forwards run: `decode.rs` for a few positions,
    /// `prefill.rs` for many; elsewhere (autodiff, other backends) the tensor forward.
    pub fn forward(&self, batch: &TokenBatch, taps: &[usize], want_logits: bool, mut cache: Option<&mut KvCache>) -> BackboneOutput {
        // Dropout acts only on an autodiff device, which the host forwards never serve.
        if !self.device.is_autodiff()
            && let Some(out) = self.forward_host(batch, taps, want_logits, cache.as_deref_mut())
        {
            return out;
        }
        self.forward_ids(batch.tensor(&self.device), taps, want_logits, cache)
    }

    /// The host forwards, each sequence of the batch on its own (right padding with id 0, as
    /// [`TokenBatch::tensor`] pads, so every position is what the tensor forward computes).
    /// `None` off flex, with any cache untouched.
    fn forward_host(&self, batch: &TokenBatch, taps: &[usize], want_logits: bool, cache: Option<&mut KvCache>) -> Option<BackboneOutput> {
        let run = |ids: &[u32], cache: &mut KvCache| {
            if ids.len() <= decode::MAX_POSITIONS {
                decode::forward_few(self, ids, taps, want_logits, cache)
            } else {
                prefill::forward_many(self, ids, taps, want_logits, cache)
            }
        };
        let outs = match (cache, batch.ids.as_slice()) {
            (Some(c), [ids]) => vec![run(ids, c)?],
            (Some(_), _) => return None,
            (None, seqs) => {
                let padded = |ids: &Vec<u32>| ids.iter().copied().chain(std::iter::repeat(0)).take(batch.max_len).collect::<Vec<_>>();
                seqs.iter().map(|ids| run(&padded(ids), &mut self.new_cache())).collect::<Option<Vec<_>>>()?
            }
        };
        Some(self.host_output(&outs, batch.max_len, taps.len(), want_logits))
    }

    /// Host outputs of `t` positions each as the tensor forward's output `[b, t, _]`.
    pub(crate) fn host_output(&self, outs: &[HostOutput], t: usize, taps: usize, want_logits: bool) -> BackboneOutput {
        let b = outs.len();
        let (d, v) = (self.config.hidden_size, self.config.vocab_size);
        let join = |part: &dyn Fn(&HostOutput) -> &Vec<f32>, width: usize| {
            from_vec(outs.iter().flat_map(|o| part(o).iter().copied()).collect(), [b, t, width], &self.device)
        };
        BackboneOutput {
            taps: (0..taps).map(|j| join(&|o| &o.taps[j], d)).collect(),
            last_hidden: join(&|o| &o.last_hidden, d),
            logits: want_logits.then(|| join(&|o| o.logits.as_ref().expect("asked for logits"), v)),
        }
    }
}
