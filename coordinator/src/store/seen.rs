//! Last-call times of devices, kept in memory until the next flush: a signed call is too
//! frequent to cost a write each. Both backends buffer them here and write them in one batch.
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default)]
pub(crate) struct Seen(Mutex<HashMap<String, u64>>);

impl Seen {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn touch(&self, id: &str, now_ms: u64) {
        self.map().insert(id.to_string(), now_ms);
    }

    /// The time not yet written, if any.
    pub fn get(&self, id: &str) -> Option<u64> {
        self.map().get(id).copied()
    }

    /// The pending times, for a write.
    pub fn take(&self) -> HashMap<String, u64> {
        std::mem::take(&mut *self.map())
    }

    /// Puts back times whose write failed, for the next try (unless newer ones arrived).
    pub fn restore(&self, pending: HashMap<String, u64>) {
        let mut g = self.map();
        for (id, ms) in pending {
            g.entry(id).or_insert(ms);
        }
    }
}
