//! Which coordinator serves a device when several share a PostgreSQL store. Every coordinator
//! that serves devices is a member (a row per incarnation, `store::Backend::members`); a
//! device's calls, its round calls apart (those go to the leader), are served by the member
//! its id hashes highest with (rendezvous hashing: a member that leaves moves only its own
//! devices, one that joins takes about 1/n of them). One member serving a device keeps its
//! replay window and rate limits in memory, so no call writes its nonce to the database.
//!
//! No two members serve a device at once, by timing rather than messages (times by the
//! store's clock): a member serves only while its last renewal is under `ttl/2` old, and its
//! view of the others is as old; a peer takes over its devices only once its row lapsed,
//! `ttl/2` after it stopped; a member joining serves from `3 ttl/4` after its row was written,
//! when every member still serving has read it. A member that comes within `ttl/2` of
//! lapsing joins again as a new incarnation.
//!
//! A member refuses calls dated before it took the device (the last time another member
//! served it, from the rows of the last clock window): such a call may have been accepted
//! there; and as it takes a device it loads the nonces the store keeps for it (the previous
//! member recorded there the future-dated calls it accepted): `crate::auth`.
use std::sync::Mutex;
use std::time::Instant;

use spa_proto::auth::sha256;

use crate::store::records::{Member, Roster};

/// Where a device's call is served.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// Here, for calls dated at or after `since_ms`.
    Here { since_ms: u64 },
    /// At the member reached at this URL.
    Elsewhere(String),
    /// Nowhere known: this member's view is too old (its store is out of reach), or no
    /// member serves the device now (one just lapsed and its successor has not joined yet).
    Unknown,
}

/// Renewal timing derived from the membership lease `ttl_ms`.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub ttl_ms: u64,
}

impl Timing {
    /// How often a member renews and reads the others.
    pub fn renew_every_ms(self) -> u64 {
        self.ttl_ms / 4
    }
    /// How long a view (and a renewal) is good for.
    pub fn fresh_ms(self) -> u64 {
        self.ttl_ms / 2
    }
    /// From its row's write to a joining member's first call.
    pub fn grace_ms(self) -> u64 {
        self.ttl_ms * 3 / 4
    }
}

/// This process's membership: the roster it last read, and when.
pub struct Members {
    pub url: String,
    pub timing: Timing,
    /// The clock window of signed calls: how far back who-served-whom matters.
    window_ms: u64,
    view: Mutex<Option<(Roster, Instant)>>,
    /// Set as the process stops: it serves no device from then on.
    left: std::sync::atomic::AtomicBool,
}

impl Members {
    pub fn new(url: String, timing: Timing, window_ms: u64) -> Self {
        Self { url, timing, window_ms, view: Mutex::new(None), left: Default::default() }
    }

    /// Stops serving devices (the process is stopping).
    pub fn leave(&self) {
        self.left.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// This member's incarnation, once it joined.
    pub fn incarnation(&self) -> Option<u64> {
        crate::lock(&self.view).as_ref().map(|(r, _)| r.mine)
    }

    /// Records a roster read by a renewal that began at `started`.
    pub fn update(&self, roster: Roster, started: Instant) {
        let mut g = crate::lock(&self.view);
        let changed = g.as_ref().is_none_or(|(old, _)| old.mine != roster.mine);
        if changed {
            tracing::info!(incarnation = roster.mine, members = roster.members.len(), "serving devices as a member");
        }
        *g = Some((roster, started));
    }

    /// Whether this member serves devices now (its incarnation joined and its view is fresh).
    pub fn serving(&self) -> bool {
        let g = crate::lock(&self.view);
        let Some((roster, at)) = g.as_ref().filter(|_| !self.left.load(std::sync::atomic::Ordering::SeqCst)) else { return false };
        let age = at.elapsed().as_millis() as u64;
        let now = roster.now_ms + age;
        age < self.timing.fresh_ms() && roster.members.iter().any(|m| m.incarnation == roster.mine && m.from_ms <= now && now < m.until_ms)
    }

    /// Where `device`'s calls are served now.
    pub fn route(&self, device: &str) -> Route {
        let g = crate::lock(&self.view);
        let Some((roster, at)) = g.as_ref().filter(|_| !self.left.load(std::sync::atomic::Ordering::SeqCst)) else { return Route::Unknown };
        let age = at.elapsed().as_millis() as u64;
        if age >= self.timing.fresh_ms() {
            return Route::Unknown;
        }
        let now = roster.now_ms + age;
        match owner_at(&roster.members, device, now) {
            Some(m) if m.incarnation == roster.mine => {
                Route::Here { since_ms: held_since(&roster.members, device, roster.mine, now, now.saturating_sub(self.window_ms)) }
            }
            Some(m) => Route::Elsewhere(m.url.clone()),
            None => Route::Unknown,
        }
    }
}

/// Renews this member and reads the others every quarter of the lease, as long as the task runs.
pub async fn keep(members: std::sync::Arc<Members>, store: crate::store::Store) {
    let t = members.timing;
    let keep_ms = members.window_ms + t.ttl_ms;
    loop {
        let started = Instant::now();
        match store.members(members.incarnation(), &members.url, t.ttl_ms, t.fresh_ms(), t.grace_ms(), keep_ms).await {
            Ok(r) => members.update(r, started),
            Err(e) => tracing::warn!("membership among the coordinators serving devices: {e}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(t.renew_every_ms())).await;
    }
}

/// `device`'s weight with the member at `url`: the highest weight serves it.
fn weight(url: &str, device: &str) -> u64 {
    let mut b = Vec::with_capacity(url.len() + device.len() + 1);
    b.extend_from_slice(url.as_bytes());
    b.push(0);
    b.extend_from_slice(device.as_bytes());
    u64::from_le_bytes(sha256(&b)[..8].try_into().expect("8 bytes"))
}

/// The member serving `device` at `t` (store clock): of those serving then, the highest weight.
pub fn owner_at<'a>(members: &'a [Member], device: &str, t: u64) -> Option<&'a Member> {
    members.iter().filter(|m| m.from_ms <= t && t < m.until_ms).max_by_key(|m| (weight(&m.url, device), m.incarnation))
}

/// Since when `mine` has served `device` without a break, looking back no further than
/// `floor` (`mine` serves it at `t`): the last instant in `(floor, t]` at which the roster
/// changed and another member (or none) served it just before; 0 if there is none (what came
/// before `floor` is older than any call still accepted).
pub fn held_since(members: &[Member], device: &str, mine: u64, t: u64, floor: u64) -> u64 {
    let mut changes: Vec<u64> = members.iter().flat_map(|m| [m.from_ms, m.until_ms]).filter(|&c| c > floor && c <= t).collect();
    changes.sort_unstable_by(|a, b| b.cmp(a));
    changes.dedup();
    for c in changes {
        if owner_at(members, device, c - 1).is_none_or(|m| m.incarnation != mine) {
            return c;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(incarnation: u64, url: &str, from_ms: u64, until_ms: u64) -> Member {
        Member { incarnation, url: url.into(), from_ms, until_ms }
    }

    fn devices() -> Vec<String> {
        (0..400).map(|i| format!("dev-{i}")).collect()
    }

    #[test]
    fn devices_spread_over_members_and_a_lapse_moves_only_its_own() {
        let both = [m(1, "https://a:1", 0, 1000), m(2, "https://b:1", 0, 2000)];
        let at = |t| devices().iter().map(|d| owner_at(&both, d, t).map(|m| m.incarnation)).collect::<Vec<_>>();
        let (before, after) = (at(500), at(1500));
        let on_a = before.iter().filter(|o| **o == Some(1)).count();
        assert!((150..250).contains(&on_a), "rendezvous hashing splits 400 devices about evenly: {on_a} on a");
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(*a, Some(2), "after a lapses, b serves every device");
            if *b == Some(2) {
                assert_eq!(a, b, "b's own devices stay");
            }
        }
        assert_eq!(at(2500).iter().flatten().count(), 0, "no member serves after both lapse");
    }

    #[test]
    fn a_member_accepts_calls_dated_after_it_took_the_device() {
        // a lapses at 1000; b serves from 0; c joins at 3000.
        let ms = [m(1, "https://a:1", 0, 1000), m(2, "https://b:1", 0, 9000), m(3, "https://c:1", 3000, 9000)];
        for d in devices() {
            let (early, late) = (owner_at(&ms, &d, 500).unwrap().incarnation, owner_at(&ms, &d, 5000).unwrap().incarnation);
            if late != 2 {
                assert_eq!(late, 3);
                assert_eq!(held_since(&ms, &d, 3, 5000, 0), 3000, "c took {d} when it joined");
                continue;
            }
            let expected = if early == 1 { 1000 } else { 0 };
            assert_eq!(held_since(&ms, &d, 2, 5000, 0), expected, "b holds {d} since a lapsed, or throughout");
            assert_eq!(held_since(&ms, &d, 2, 5000, 2000), 0, "nothing before the floor counts");
        }
    }

    #[test]
    fn a_stale_view_routes_nowhere() {
        let members = Members::new("https://a:1".into(), Timing { ttl_ms: 40 }, 300_000);
        assert_eq!(members.route("d"), Route::Unknown, "no view yet");
        let roster = Roster { now_ms: 10_000, mine: 1, members: vec![m(1, "https://a:1", 0, 20_000)] };
        members.update(roster, Instant::now());
        assert!(matches!(members.route("d"), Route::Here { since_ms: 0 }));
        std::thread::sleep(std::time::Duration::from_millis(25));
        assert_eq!(members.route("d"), Route::Unknown, "a view older than ttl/2 serves nothing");
    }
}
