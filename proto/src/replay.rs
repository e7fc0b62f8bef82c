//! The replay cache of signed calls: every nonce seen inside the clock window, bounded in
//! total and per device.
use std::collections::{BTreeSet, HashMap, HashSet};

use crate::auth::{AuthError, sha256};

/// Nonces seen within the clock window. A nonce older than the window cannot be replayed
/// (its timestamp fails the clock check), so entries expire after `ts + window`; the cache
/// is bounded, and refuses new calls ([`AuthError::Busy`]) rather than forget live nonces.
/// Each device may hold at most `per_device` entries ([`AuthError::DeviceBusy`]), so one
/// device (dating its calls at the window's future edge, say) cannot lock the others out.
#[derive(Debug)]
pub struct NonceWindow {
    window_ms: u64,
    capacity: usize,
    per_device: usize,
    seen: HashSet<(u64, u128)>,
    /// (timestamp, device, nonce), in expiry order.
    order: BTreeSet<(u64, u64, u128)>,
    counts: HashMap<u64, usize>,
}

/// A device id as the replay cache keys it: 8 bytes of its SHA-256. Entries are fixed-size
/// (about 100 bytes each, no allocation of their own: a million live nonces are ~100 MB and
/// do not fragment the heap); two ids sharing a key would only share a quota.
fn device_key(device: &str) -> u64 {
    u64::from_le_bytes(sha256(device.as_bytes())[..8].try_into().expect("8 bytes"))
}

/// A nonce as the replay cache keys it: its 128 bits (callers send 32 hex digits; anything
/// else is hashed to 128 bits).
fn nonce_key(nonce: &str) -> u128 {
    match u128::from_str_radix(nonce, 16) {
        Ok(n) if nonce.len() == 32 => n,
        _ => u128::from_le_bytes(sha256(nonce.as_bytes())[..16].try_into().expect("16 bytes")),
    }
}

impl NonceWindow {
    pub fn new(window_ms: u64, capacity: usize, per_device: usize) -> Self {
        Self { window_ms, capacity, per_device, seen: HashSet::new(), order: BTreeSet::new(), counts: HashMap::new() }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn expire(&mut self, now_ms: u64) {
        while let Some(&(ts, d, n)) = self.order.first() {
            if ts.saturating_add(self.window_ms) >= now_ms {
                break;
            }
            self.order.pop_first();
            if let Some(c) = self.counts.get_mut(&d) {
                *c -= 1;
                if *c == 0 {
                    self.counts.remove(&d);
                }
            }
            self.seen.remove(&(d, n));
        }
    }

    /// Records a nonce of a call whose timestamp already passed [`crate::auth::check_clock`].
    pub fn check_and_insert(&mut self, device: &str, nonce: &str, ts_ms: u64, now_ms: u64) -> Result<(), AuthError> {
        self.expire(now_ms);
        let (d, n) = (device_key(device), nonce_key(nonce));
        if self.seen.contains(&(d, n)) {
            return Err(AuthError::Replay);
        }
        if self.counts.get(&d).is_some_and(|&c| c >= self.per_device) {
            return Err(AuthError::DeviceBusy(self.per_device));
        }
        if self.seen.len() >= self.capacity {
            return Err(AuthError::Busy);
        }
        *self.counts.entry(d).or_insert(0) += 1;
        self.order.insert((ts_ms, d, n));
        self.seen.insert((d, n));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_refused_twice_inside_the_window() {
        let now = 10_000_000;
        let mut w = NonceWindow::new(300_000, 3, 3);
        w.check_and_insert("a", "n1", now, now).unwrap();
        assert_eq!(w.check_and_insert("a", "n1", now, now), Err(AuthError::Replay));
        // The same nonce from another device is another request.
        w.check_and_insert("b", "n1", now, now).unwrap();
        w.check_and_insert("a", "n2", now + 10, now).unwrap();
        // Full: refuse rather than forget a live nonce.
        assert_eq!(w.check_and_insert("a", "n3", now, now), Err(AuthError::Busy));
        // After the window, old entries expire (their timestamps would fail the clock check).
        let later = now + 300_001;
        w.check_and_insert("a", "n3", later, later).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w.check_and_insert("a", "n2", now + 10, later), Err(AuthError::Replay));
    }

    /// One device filling its share (calls dated at the window's future edge, which live
    /// longest) is refused alone; every other device keeps being served.
    #[test]
    fn one_device_cannot_fill_the_replay_cache() {
        let now = 10_000_000;
        let mut w = NonceWindow::new(300_000, 100, 10);
        for i in 0..10 {
            w.check_and_insert("greedy", &format!("n{i}"), now + 300_000, now).unwrap();
        }
        assert_eq!(w.check_and_insert("greedy", "n10", now + 300_000, now), Err(AuthError::DeviceBusy(10)));
        for d in 0..9 {
            for i in 0..10 {
                w.check_and_insert(&format!("dev{d}"), &format!("n{i}"), now, now).unwrap();
            }
        }
        assert_eq!(w.check_and_insert("late", "n0", now, now), Err(AuthError::Busy));
        // The others' entries expire first; the greedy device's at its own dates.
        let later = now + 300_001;
        w.check_and_insert("late", "n0", later, later).unwrap();
        assert_eq!(w.check_and_insert("greedy", "n10", later, later), Err(AuthError::DeviceBusy(10)));
        w.check_and_insert("greedy", "n10", now + 600_001, now + 600_001).unwrap();
    }
}
