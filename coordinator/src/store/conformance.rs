//! The store's contract as checks every backend passes (feature `testing`): each takes
//! `open`, which opens (or, called again after the last handle is dropped, reopens) one and
//! the same store, so durability across a restart is part of the contract. `tests/store.rs`
//! runs every check on sled and on PostgreSQL.
use spa_aggregation::strategy::{ServerOptimizer, StrategyName};

use super::records::{DeviceMetrics, RoundPlan, RoundRecord, RoundState};
use super::{Store, StoreError, TokenRecord, token_hash};

pub fn plan(rounds: u32, strategy: StrategyName) -> RoundPlan {
    RoundPlan {
        rounds,
        min_clients: 2,
        max_clients: 2,
        deadline_secs: 60,
        local_epochs: 1,
        lr: 0.01,
        strategy,
        prox_mu: 0.0,
        dp_l2_clip: 0.0,
        dp_noise_multiplier: 0.0,
    }
}

fn token_rec(id: &str, expires: u64) -> TokenRecord {
    TokenRecord { token_id: id.into(), created_at_ms: 0, expires_at_ms: expires, note: String::new(), used_by: None, revoked_at_ms: None }
}

async fn token(store: &Store, t: &str, expires: u64) {
    store.add_token(&token_hash(t), &token_rec(&t[..4], expires)).await.unwrap();
}

/// Tokens are one-time and expire, a failed enrollment leaves its token usable, revocation,
/// checkpoints never overwritten and pruned by age, nonces, marks and last-call times: all
/// of it after a reopen.
pub async fn devices_tokens_and_checkpoints_survive_reopen(open: &impl AsyncFn() -> Store) {
    {
        let s = open().await;
        token(&s, "tok-one", 1000).await;
        token(&s, "tok-two", 1000).await;
        let d = s.enroll(&token_hash("tok-one"), &[1u8; 32], "a", 10).await.unwrap();
        assert!(matches!(s.enroll(&token_hash("tok-one"), &[2u8; 32], "b", 10).await, Err(StoreError::TokenUsed)));
        assert!(matches!(s.enroll(&token_hash("nope"), &[2u8; 32], "b", 10).await, Err(StoreError::UnknownToken)));
        assert!(matches!(s.enroll(&token_hash("tok-two"), &[2u8; 32], "b", 1000).await, Err(StoreError::TokenExpired)));
        assert!(matches!(s.enroll(&token_hash("tok-two"), &[1u8; 32], "b", 10).await, Err(StoreError::KeyEnrolled(_))));
        assert_eq!(s.tokens().await.unwrap().iter().filter(|t| t.used_by.is_none()).count(), 1);
        assert!(s.revoke(&d.device_id, 20).await.unwrap());
        assert!(!s.revoke(&d.device_id, 21).await.unwrap());
        assert!(matches!(s.revoke("dev-none", 21).await, Err(StoreError::UnknownDevice(_))));
        assert!(s.revoke_token("tok-", 22).await.is_ok());
        assert!(matches!(s.revoke_token("nope", 22).await, Err(StoreError::UnknownTokenId(_))));
        assert!(s.put_checkpoint(0, b"v0").await.unwrap());
        assert!(!s.put_checkpoint(0, b"other").await.unwrap());
        assert!(s.record_nonce("dev", "n1", 500).await.unwrap());
        assert!(!s.record_nonce("dev", "n1", 500).await.unwrap(), "a nonce is recorded once");
        s.set_clock_mark(1234).await.unwrap();
        s.touch("dev", 77);
        assert_eq!(s.last_seen("dev").await.unwrap(), 77);
        s.flush().await.unwrap();
    }
    let s = open().await;
    let devs = s.devices().await.unwrap();
    assert_eq!(devs.len(), 1);
    assert!(devs[0].revoked);
    assert_eq!(s.checkpoint(0).await.unwrap().unwrap(), b"v0");
    assert_eq!(s.latest_checkpoint_version().await.unwrap(), Some(0));
    assert_eq!(s.nonces_since(400).await.unwrap(), vec![("dev".into(), "n1".into(), 500)]);
    assert_eq!(s.prune_nonces(600).await.unwrap(), 1);
    assert_eq!((s.last_seen("dev").await.unwrap(), s.clock_mark().await.unwrap()), (77, 1234));
    for v in 1..=5 {
        assert!(s.put_checkpoint(v, b"v").await.unwrap());
    }
    assert_eq!(s.prune_checkpoints(0).await.unwrap(), 0);
    assert_eq!(s.prune_checkpoints(2).await.unwrap(), 4);
    assert_eq!(s.checkpoint(3).await.unwrap(), None);
    assert!(s.checkpoint(4).await.unwrap().is_some());
    assert_eq!(s.latest_checkpoint_version().await.unwrap(), Some(5));
    let events = s.events().await.unwrap();
    for kind in ["token.create", "device.enroll", "device.revoke", "token.revoke", "checkpoint.commit", "checkpoint.prune"] {
        assert!(events.iter().any(|e| e.kind == kind), "no {kind} event");
    }
}

/// Runs and rounds by id, a commit (checkpoint, round, optimizer) as one change that never
/// overwrites a version, an abort with its reason: all of it after a reopen.
pub async fn rounds_commit_as_one_and_read_back_in_order(open: &impl AsyncFn() -> Store) {
    let optimizer = ServerOptimizer::new(StrategyName::FedAdam.config(0.0).unwrap()).unwrap();
    {
        let s = open().await;
        let lease = s.lead("leader", "https://leader:1", 60_000).await.unwrap().expect("an unheld lease is taken");
        let mut run = s.create_run(&plan(3, StrategyName::FedAdam), 5).await.unwrap();
        assert_eq!((run.run_id, run.rounds_started, run.created_ms), (1, 0, 5));
        for id in 1..=3 {
            run.rounds_started += 1;
            let rec = s.start_round(&lease, &run).await.unwrap();
            assert_eq!((rec.round_id, rec.state), (id, RoundState::Selecting));
        }
        let mut rec = s.round(2).await.unwrap().unwrap();
        (rec.state, rec.committed_version) = (RoundState::Committed, Some(1));
        s.commit_round(&lease, 1, b"v1", &rec, &optimizer).await.unwrap();
        // A version is never overwritten, and a refused commit changes nothing.
        let mut other = s.round(3).await.unwrap().unwrap();
        other.state = RoundState::Committed;
        assert!(matches!(s.commit_round(&lease, 1, b"other", &other, &optimizer).await, Err(StoreError::VersionExists(1))));
        assert_eq!(s.round(3).await.unwrap().unwrap().state, RoundState::Selecting);
        let mut first = s.round(1).await.unwrap().unwrap();
        (first.state, first.reason) = (RoundState::Aborted, Some("too few devices".into()));
        s.abort_round(&lease, &first).await.unwrap();
    }
    let s = open().await;
    assert_eq!(s.runs().await.unwrap()[0].rounds_started, 3);
    assert_eq!(s.checkpoint(1).await.unwrap().unwrap(), b"v1");
    assert_eq!(s.round(2).await.unwrap().unwrap().committed_version, Some(1));
    assert_eq!(s.round(1).await.unwrap().unwrap().state, RoundState::Aborted);
    assert_eq!(s.round(4).await.unwrap(), None);
    let ids = |rs: Vec<RoundRecord>| rs.iter().map(|r| r.round_id).collect::<Vec<_>>();
    assert_eq!(ids(s.rounds_before(Some(3), 1).await.unwrap()), [2]);
    assert_eq!(ids(s.rounds_before(None, 2).await.unwrap()), [2, 3]);
    assert_eq!(ids(s.rounds().await.unwrap()), [1, 2, 3]);
    assert_eq!(s.latest_round().await.unwrap().unwrap().round_id, 3);
    assert_eq!(s.optimizer().await.unwrap(), Some(optimizer));
    let events = s.events().await.unwrap();
    for kind in ["run.start", "round.start", "checkpoint.commit", "round.abort"] {
        assert!(events.iter().any(|e| e.kind == kind), "no {kind} event");
    }
}

/// Concurrent writers of one record: run ids are never shared, concurrent evaluations of a
/// round are all kept.
pub async fn concurrent_runs_and_reports_lose_nothing(open: &impl AsyncFn() -> Store) {
    let s = open().await;
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for _ in 0..8 {
                    ids.push(s.create_run(&plan(1, StrategyName::FedAvg), 0).await.unwrap().run_id);
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    ids.sort();
    assert_eq!(ids, (1..=32).collect::<Vec<u64>>());
    assert_eq!(s.runs().await.unwrap().len(), 32);
    let run = s.runs().await.unwrap().remove(0);
    let lease = s.lead("leader", "https://leader:1", 60_000).await.unwrap().unwrap();
    let rec = s.start_round(&lease, &run).await.unwrap();
    let metrics = |k: u64| DeviceMetrics { tokens: k + 1, ..Default::default() };
    let tasks: Vec<_> = (0..4u64)
        .map(|t| {
            let s = s.clone();
            tokio::spawn(async move {
                for k in 0..8 {
                    assert!(s.add_round_metrics(rec.round_id, &format!("dev-{t}-{k}"), metrics(k)).await.unwrap());
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let back = s.round(rec.round_id).await.unwrap().unwrap();
    assert_eq!((back.metrics.len(), back.mean_metrics.map(|m| m.tokens)), (32, Some(4 * (1..=8).sum::<u64>())));
    assert!(!s.add_round_metrics(rec.round_id + 100, "dev", metrics(0)).await.unwrap(), "no such round");
}

/// A token revocation racing an enrollment keeps the enrollment's `used_by`; a device
/// revocation racing a key rotation keeps the rotated key.
pub async fn revocations_racing_enrollments_and_rotations_lose_nothing(open: &impl AsyncFn() -> Store) {
    let s = open().await;
    for i in 0..40u8 {
        let name = format!("tok-{i:03}-race");
        s.add_token(&token_hash(&name), &token_rec(&name, u64::MAX)).await.unwrap();
        let (enrolled, revoked) = tokio::join!(
            tokio::spawn({
                let s = s.clone();
                async move { s.enroll(&token_hash(&format!("tok-{i:03}-race")), &[i + 1; 32], "d", 10).await }
            }),
            tokio::spawn({
                let (s, name) = (s.clone(), name.clone());
                async move { s.revoke_token(&name, 11).await }
            })
        );
        revoked.unwrap().unwrap();
        let Ok(d) = enrolled.unwrap() else { continue };
        let tok = s.tokens().await.unwrap().into_iter().find(|t| t.used_by.as_deref() == Some(d.device_id.as_str()));
        assert!(tok.is_some(), "round {i}: the enrollment's used_by was overwritten");
        let (rotated, revoked) = tokio::join!(
            tokio::spawn({
                let (s, d) = (s.clone(), d.clone());
                async move { s.rotate_key(&d.device_id, &d.public_key_hex, &[i + 101; 32], 12).await }
            }),
            tokio::spawn({
                let (s, id) = (s.clone(), d.device_id.clone());
                async move { s.revoke(&id, 13).await }
            })
        );
        revoked.unwrap().unwrap();
        let now = s.device(&d.device_id).await.unwrap().unwrap();
        assert!(now.revoked, "round {i}");
        if let Ok(r) = rotated.unwrap() {
            assert_eq!(now.public_key_hex, r.public_key_hex, "round {i}: the rotated key was written back over");
        }
    }
}

/// Of two rotations signed by the same key one wins, the loser's key stays unused, old keys
/// stay burnt.
pub async fn of_two_rotations_signed_by_the_same_key_one_wins(open: &impl AsyncFn() -> Store) {
    let s = open().await;
    token(&s, "tok-one", 1000).await;
    let old = [1u8; 32];
    let d = s.enroll(&token_hash("tok-one"), &old, "a", 10).await.unwrap();
    let won = s.rotate_key(&d.device_id, &hex::encode(old), &[2u8; 32], 20).await.unwrap();
    assert_eq!(won.public_key_hex, hex::encode([2u8; 32]));
    let lost = s.rotate_key(&d.device_id, &hex::encode(old), &[3u8; 32], 21).await.unwrap_err();
    assert!(matches!(lost, StoreError::KeyChanged(_)), "{lost}");
    assert_eq!(s.device(&d.device_id).await.unwrap().unwrap().public_key_hex, hex::encode([2u8; 32]));
    s.rotate_key(&d.device_id, &hex::encode([2u8; 32]), &[3u8; 32], 22).await.unwrap();
    let again = s.rotate_key(&d.device_id, &hex::encode([3u8; 32]), &old, 23).await.unwrap_err();
    assert!(matches!(again, StoreError::KeyEnrolled(_)), "{again}");
    s.revoke(&d.device_id, 24).await.unwrap();
    let late = s.rotate_key(&d.device_id, &hex::encode([3u8; 32]), &[4u8; 32], 25).await.unwrap_err();
    assert!(matches!(late, StoreError::DeviceRevoked(_)), "{late}");
}

/// Retention: finished rounds beyond the newest `keep` ids and events before a date go; a
/// round still running stays whatever its age.
pub async fn history_is_pruned_by_count_and_age(open: &impl AsyncFn() -> Store) {
    let s = open().await;
    let lease = s.lead("leader", "https://leader:1", 60_000).await.unwrap().unwrap();
    let mut run = s.create_run(&plan(5, StrategyName::FedAvg), 0).await.unwrap();
    for i in 1..=5u64 {
        run.rounds_started += 1;
        let mut r = s.start_round(&lease, &run).await.unwrap();
        if i != 2 {
            (r.state, r.reason) = (RoundState::Aborted, Some("test".into()));
            s.abort_round(&lease, &r).await.unwrap();
        }
    }
    let before = s.events().await.unwrap().len();
    assert_eq!(s.prune_history(0, 0).await.unwrap(), (0, 0), "0 keeps everything");
    let (rounds, events) = s.prune_history(2, spa_proto::auth::now_ms() + 1).await.unwrap();
    let ids: Vec<u64> = s.rounds().await.unwrap().iter().map(|r| r.round_id).collect();
    assert_eq!((rounds, ids), (2, vec![2, 4, 5]), "round 2 still runs; 4 and 5 are the newest two");
    assert_eq!((events, s.events().await.unwrap().len()), (before, 0));
}
