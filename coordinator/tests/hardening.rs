//! Limits a hostile or broken device runs into (issues 15 and 27), each reproduced against the
//! real server on loopback TLS: Generate slots that idle or silent streams cannot hold,
//! revocation and key rotation ending open streams, a drain deadline on shutdown, one device's
//! share of the replay cache and of parked sessions, secrets that group or others may read,
//! concurrent key rotations, weak keys, and callers' strings in answers.
mod common;

use std::time::{Duration, Instant};

use common::*;
use spa_proto::auth::{DeviceSigner, now_ms};
use spa_proto::methods;
use spa_proto::v1::*;
use tokio::sync::mpsc;
use tonic::Code;

type Input = mpsc::Sender<GenerateRequest>;

fn open_msg(layer: u32) -> GenerateRequest {
    GenerateRequest { kind: Some(generate_request::Kind::Open(GenerateOpen { layers: vec![layer], dtype: DType::DtypeF32 as i32, ..Default::default() })) }
}

fn extend(ids: Vec<u32>) -> GenerateRequest {
    GenerateRequest { kind: Some(generate_request::Kind::Extend(GenerateExtend { ids, ..Default::default() })) }
}

/// A Generate stream whose messages the test sends when it likes; `first` is sent at once
/// (the signature covers `open_msg(layer)` either way).
async fn stream(
    ch: &tonic::transport::Channel,
    a: &DeviceSigner,
    layer: u32,
    first: bool,
) -> (Input, Result<tonic::Streaming<GenerateResponse>, tonic::Status>) {
    let (tx, rx) = mpsc::channel(8);
    if first {
        tx.send(open_msg(layer)).await.unwrap();
    }
    let h = a.sign(methods::BACKBONE_GENERATE, &open_msg(layer), now_ms());
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    h.apply(req.metadata_mut());
    let r = backbone(ch).generate(req).await.map(|r| r.into_inner());
    (tx, r)
}

/// A coordinator on loopback with its config edited by `edit`: the home (keep it alive), the
/// server, a TLS channel to it and the admin credential.
async fn serve(edit: impl Fn(String) -> String) -> (tempfile::TempDir, spa_coordinator::server::Running, tonic::transport::Channel, String) {
    let dir = tempfile::tempdir().unwrap();
    init_home(dir.path(), edit);
    let srv = spa_coordinator::server::start(dir.path()).await.unwrap();
    let ch = channel(&format!("https://{}", srv.addr), dir.path()).await;
    let cred = admin_cred(dir.path());
    (dir, srv, ch, cred)
}

async fn layers(ch: &tonic::transport::Channel, a: &DeviceSigner) -> u32 {
    backbone(ch).get_model_info(a.request(methods::BACKBONE_GET_MODEL_INFO, GetModelInfoRequest {})).await.unwrap().into_inner().num_layers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_slots_are_freed_by_timeouts_and_revocation_ends_open_streams() {
    let (_dir, srv, ch, cred) = serve(|t| {
        t.replace("max_sessions = 64", "max_sessions = 2")
            .replace("session_idle_secs = 600", "session_idle_secs = 2")
            .replace("first_message_secs = 10", "first_message_secs = 1")
    })
    .await;
    let a = enroll(&ch, &token(&ch, &cred, 600).await, "alpha").await.unwrap();
    let b = enroll(&ch, &token(&ch, &cred, 600).await, "beta").await.unwrap();
    let nl = layers(&ch, &a).await;

    // A stream that never sends its opening message is ended, not kept.
    let t = Instant::now();
    let (_quiet, r) = stream(&ch, &a, nl, false).await;
    assert_eq!(r.unwrap_err().code(), Code::DeadlineExceeded);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // Two open sessions hold both slots; a third is refused.
    let (_a1, s1) = stream(&ch, &a, nl, true).await;
    let (_a2, s2) = stream(&ch, &a, nl, true).await;
    let (mut s1, mut s2) = (s1.unwrap(), s2.unwrap());
    let (_a3, r) = stream(&ch, &a, nl, true).await;
    assert_eq!(r.unwrap_err().code(), Code::ResourceExhausted);
    // Idle past session_idle_secs: both are closed with a status, and their slots come back.
    assert_eq!(s1.message().await.unwrap_err().code(), Code::DeadlineExceeded);
    assert_eq!(s2.message().await.unwrap_err().code(), Code::DeadlineExceeded);
    let t = Instant::now();
    let (tb, sb) = loop {
        let (tx, r) = stream(&ch, &b, nl, true).await;
        match r {
            Ok(s) => break (tx, s),
            Err(e) if e.code() == Code::ResourceExhausted && t.elapsed() < Duration::from_secs(3) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("slot not given back: {e:?}"),
        }
    };

    // Revoking a device ends its open stream at the next message.
    let mut sb = sb;
    tb.send(extend(vec![1, 2, 3])).await.unwrap();
    assert_eq!(sb.message().await.unwrap().unwrap().positions, 3);
    let revoked = admin(&ch).revoke_device(with_admin(&cred, RevokeDeviceRequest { device_id: b.device_id().into() })).await.unwrap();
    assert!(revoked.into_inner().was_active);
    tb.send(extend(vec![4])).await.unwrap();
    let e = sb.message().await.unwrap_err();
    assert!(e.code() == Code::PermissionDenied && e.message().contains("revoked"), "{e:?}");

    ping(&ch, &a).await.unwrap();
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_cannot_take_every_generation_slot() {
    let (_dir, srv, ch, cred) =
        serve(|t| t.replace("max_sessions_per_device = 4", "max_sessions_per_device = 1").replace("drain_secs = 10", "drain_secs = 1")).await;
    let a = enroll(&ch, &token(&ch, &cred, 600).await, "alpha").await.unwrap();
    let b = enroll(&ch, &token(&ch, &cred, 600).await, "beta").await.unwrap();
    let nl = layers(&ch, &a).await;
    let (a1, s1) = stream(&ch, &a, nl, true).await;
    let _s1 = s1.unwrap();
    let (_a2, r) = stream(&ch, &a, nl, true).await;
    let e = r.unwrap_err();
    assert!(e.code() == Code::ResourceExhausted && e.message().contains("this device"), "{e:?}");
    // Another device still gets a slot; and alpha's comes back once its stream ends.
    let (_b1, sb) = stream(&ch, &b, nl, true).await;
    sb.unwrap();
    drop((a1, _s1));
    let t = Instant::now();
    loop {
        let (_tx, r) = stream(&ch, &a, nl, true).await;
        match r {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted && t.elapsed() < Duration::from_secs(3) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("alpha's slot not given back: {e:?}"),
        }
    }
    srv.shutdown().await.unwrap();
}

/// The KV pool: sessions reserve their max_positions at the opening and are refused there
/// when the pool is full; a parked session gives its room up to a new one; a session never
/// steps (or drafts) past what it reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_reserve_their_kv_cache_when_they_open() {
    // A pool of 64 KiB: `fit` positions of this backbone.
    let (_dir, srv, ch, cred) = serve(|t| t.replace("kv_pool_mib = 2048.0", "kv_pool_mib = 0.0625").replace("drain_secs = 10", "drain_secs = 1")).await;
    let a = enroll(&ch, &token(&ch, &cred, 600).await, "alpha").await.unwrap();
    let info = backbone(&ch).get_model_info(a.request(methods::BACKBONE_GET_MODEL_INFO, GetModelInfoRequest {})).await.unwrap().into_inner();
    let cfg = spa_model::BackboneConfig::from_json(&info.config_json).unwrap();
    let fit = (65536 / spa_model::backbone::KvCache::bytes_per_position(&cfg)) as u32;
    assert!(fit >= 10 && fit < info.max_positions, "{fit} positions fit the pool");
    let nl = info.num_layers;
    let open = |max_positions: u32| GenerateRequest {
        kind: Some(generate_request::Kind::Open(GenerateOpen { layers: vec![nl], dtype: DType::DtypeF32 as i32, max_positions, ..Default::default() })),
    };
    let e = stream_with(&ch, &a, open(info.max_positions + 1)).await.1.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("context"), "{e:?}");
    // No max_positions: the whole context, more than the pool.
    let e = stream_with(&ch, &a, open(0)).await.1.unwrap_err();
    assert!(e.code() == Code::ResourceExhausted && e.message().contains("KV pool"), "{e:?}");
    let (s1, r1) = stream_with(&ch, &a, open(fit / 2)).await;
    let r1 = r1.unwrap();
    let (_s2, r2) = stream_with(&ch, &a, open(fit - fit / 2)).await;
    let _r2 = r2.unwrap();
    let e = stream_with(&ch, &a, open(1)).await.1.unwrap_err();
    assert!(e.code() == Code::ResourceExhausted && e.message().contains("KV pool"), "{e:?}");
    // The first stream ends: its session is parked for a resume, and gives way to a new one.
    drop((s1, r1));
    let t = Instant::now();
    let (s3, mut r3) = loop {
        match stream_with(&ch, &a, open(4)).await {
            (s, Ok(r)) => break (s, r),
            (_, Err(e)) if e.code() == Code::ResourceExhausted && t.elapsed() < Duration::from_secs(3) => tokio::time::sleep(Duration::from_millis(50)).await,
            (_, Err(e)) => panic!("the parked session kept its room: {e:?}"),
        }
    };
    // Four positions reserved: no draft past them, and a fifth token is the caller's error.
    s3.send(GenerateRequest { kind: Some(generate_request::Kind::Extend(GenerateExtend { ids: vec![3, 4, 5, 6], draft: 3, ..Default::default() })) })
        .await
        .unwrap();
    let block = r3.message().await.unwrap().unwrap();
    assert!(block.draft.is_empty(), "{:?}", block.draft);
    s3.send(extend(vec![7])).await.unwrap();
    let e = r3.message().await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("reserved"), "{e:?}");
    ping(&ch, &a).await.unwrap();
    srv.shutdown().await.unwrap();
}

/// Sessions of several devices stepping at once (the backbone worker batches their steps)
/// get the answers each gets alone: the same drafts and the same states, bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_get_the_answers_they_get_alone() {
    use generate_request::Kind;
    let (_dir, srv, ch, cred) = serve(|t| t).await;
    let mut devices = Vec::new();
    for i in 0..4 {
        devices.push(enroll(&ch, &token(&ch, &cred, 600).await, &format!("d{i}")).await.unwrap());
    }
    let nl = layers(&ch, &devices[0]).await;
    let script = |i: usize| -> Vec<GenerateRequest> {
        let sampling = spa_proto::v1::Sampling { temperature: 0.8, top_p: Some(0.9), repeat_penalty: Some(1.2), seed: i as u64, ..Default::default() };
        let open =
            GenerateOpen { layers: vec![nl], dtype: DType::DtypeF32 as i32, last_only: i.is_multiple_of(2), sampling: Some(sampling), ..Default::default() };
        let step =
            |ids: Vec<u32>, accepted: u32, draft: u32| GenerateRequest { kind: Some(Kind::Extend(GenerateExtend { ids, accepted, draft, side_draft: false })) };
        vec![
            GenerateRequest { kind: Some(Kind::Open(open)) },
            step(vec![5, 9, 42, 3 * i as u32], 0, 4),
            step(vec![7], 2, 3),
            step(vec![11], 1, 5),
            step(vec![13], 0, 2),
        ]
    };
    async fn run(ch: &tonic::transport::Channel, a: &DeviceSigner, msgs: Vec<GenerateRequest>) -> Vec<(u32, u32, Vec<u8>, Vec<u32>)> {
        let h = a.sign(methods::BACKBONE_GENERATE, &msgs[0], now_ms());
        let mut req = tonic::Request::new(tokio_stream::iter(msgs));
        h.apply(req.metadata_mut());
        let mut s = backbone(ch).generate(req).await.unwrap().into_inner();
        let mut out = vec![];
        while let Some(m) = s.message().await.unwrap() {
            out.push((m.first_position, m.positions, m.features, m.draft));
        }
        out
    }
    let mut alone = Vec::new();
    for (i, a) in devices.iter().enumerate() {
        alone.push(run(&ch, a, script(i)).await);
    }
    let together = futures_util::future::join_all(devices.iter().enumerate().map(|(i, a)| run(&ch, a, script(i)))).await;
    for (i, (t, a)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(t.len(), 4, "device {i}");
        assert!(t == a, "device {i}: the answers differ when stepped with others");
    }
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_a_silent_stream_at_the_drain_deadline() {
    let (_dir, srv, ch, cred) = serve(|t| t.replace("drain_secs = 10", "drain_secs = 1")).await;
    let a = enroll(&ch, &token(&ch, &cred, 600).await, "alpha").await.unwrap();
    let nl = layers(&ch, &a).await;
    let (_input, s) = stream(&ch, &a, nl, true).await;
    let _s = s.unwrap();
    // The stream stays open and silent (its idle timeout is 600 s); shutdown must not wait for it.
    let t = Instant::now();
    srv.shutdown().await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "shutdown took {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_cannot_exhaust_the_replay_cache_and_open_secrets_are_refused() {
    let (_dir, srv, ch, cred) = serve(|t| t.replace("max_nonces_per_device = 20000", "max_nonces_per_device = 5")).await;
    let greedy = enroll(&ch, &token(&ch, &cred, 600).await, "greedy").await.unwrap();
    let other = enroll(&ch, &token(&ch, &cred, 600).await, "other").await.unwrap();
    for _ in 0..5 {
        ping(&ch, &greedy).await.unwrap();
    }
    let e = ping(&ch, &greedy).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    for _ in 0..5 {
        ping(&ch, &other).await.unwrap();
    }
    srv.shutdown().await.unwrap();

    // A credential that group or others may read: the coordinator refuses to start (a home
    // of its own: the server above may still hold its store while its connections close).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path();
        init_home(home, |t| t);
        let cred_file = home.join("admin.credential");
        std::fs::set_permissions(&cred_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = spa_coordinator::server::start(home).await.err().expect("must refuse").to_string();
        assert!(err.contains("chmod 600") && err.contains("admin.credential"), "{err}");
        std::fs::set_permissions(&cred_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        spa_coordinator::server::start(home).await.unwrap().shutdown().await.unwrap();
    }
}

/// `limits.signed_calls_per_device_per_minute`: a device calling faster is refused
/// (RESOURCE_EXHAUSTED) once its bucket is empty, alone, and calls again as it refills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_making_signed_calls_too_fast_is_slowed_alone() {
    let (_dir, srv, ch, cred) = serve(|t| t.replace("signed_calls_per_device_per_minute = 1200", "signed_calls_per_device_per_minute = 60")).await;
    let greedy = enroll(&ch, &token(&ch, &cred, 600).await, "greedy").await.unwrap();
    let other = enroll(&ch, &token(&ch, &cred, 600).await, "other").await.unwrap();
    let mut refused = 0;
    for _ in 0..70 {
        match ping(&ch, &greedy).await {
            Ok(_) => {}
            Err(e) if e.code() == Code::ResourceExhausted && e.message().contains("signed_calls_per_device_per_minute") => refused += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    // 60 in the bucket (and at most a few refilled while the loop ran).
    assert!((5..=10).contains(&refused), "{refused} of 70 refused");
    ping(&ch, &other).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ping(&ch, &greedy).await.unwrap();
    srv.shutdown().await.unwrap();
}

/// `GET path` on the metrics endpoint, the whole reply.
async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_coordinator_serves_prometheus_metrics() {
    let (dir, srv, ch, cred) = serve(|t| t.replace("metrics_listen = \"\"", "metrics_listen = \"127.0.0.1:0\"")).await;
    let url = std::fs::read_to_string(dir.path().join("metrics.addr")).unwrap();
    let addr = url.trim().trim_start_matches("http://").trim_end_matches("/metrics").to_string();
    let a = enroll(&ch, &token(&ch, &cred, 600).await, "alpha").await.unwrap();
    // A refused device call (a forger signing as alpha) and some backbone work.
    let forger = spa_proto::auth::DeviceSigner::from_pkcs8(&spa_proto::auth::generate_pkcs8().unwrap(), a.device_id()).unwrap();
    assert!(ping(&ch, &forger).await.is_err());
    let nl = layers(&ch, &a).await;
    let (tx, s) = stream(&ch, &a, nl, true).await;
    let mut s = s.unwrap();
    tx.send(extend(vec![1, 2, 3, 4])).await.unwrap();
    s.message().await.unwrap().unwrap();

    let reply = http_get(&addr, "/metrics").await;
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    let line = |name: &str| reply.lines().find(|l| l.starts_with(name)).map(|l| l.to_string()).unwrap_or_default();
    assert_eq!(line("spa_devices_enrolled "), "spa_devices_enrolled 1", "{reply}");
    assert_eq!(line("spa_generation_sessions "), "spa_generation_sessions 1", "{reply}");
    let refused: f64 = line("spa_refused_calls_total{kind=\"device\"}").rsplit(' ').next().unwrap().parse().unwrap();
    assert!(refused >= 1.0, "{reply}");
    let tokens: f64 = line("spa_backbone_tokens_total ").rsplit(' ').next().unwrap().parse().unwrap();
    assert!(tokens >= 4.0, "{reply}");
    assert_eq!(line("spa_open_connections "), "spa_open_connections 1", "{reply}");
    // Every metric the shipped Grafana dashboard charts is registered (a family without
    // samples yet is left out of the exposition, so the registry is what is checked).
    let dashboard = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/grafana-dashboard.json")).unwrap();
    for expr in dashboard.split("\"expr\": \"").skip(1) {
        let name: String = expr[expr.find("spa_").unwrap()..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let family = name.trim_end_matches("_bucket").trim_end_matches("_total");
        let families = spa_coordinator::metrics::METRICS.families();
        assert!(families.iter().any(|f| f == family), "the dashboard charts {name}, which is not served: {families:?}");
    }
    assert!(http_get(&addr, "/other").await.starts_with("HTTP/1.1 404"));
    drop(tx);
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guessing_is_throttled_per_address() {
    let (_dir, srv, ch, cred) = serve(|t| t.replace("failed_enrollments_per_minute = 10", "failed_enrollments_per_minute = 3")).await;
    for i in 0..3 {
        let e = enroll(&ch, &format!("spa_guess_{i}"), "x").await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }
    // The fourth guess is refused before it is checked, and so is a good token from there.
    let e = enroll(&ch, "spa_guess_3", "x").await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let good = token(&ch, &cred, 600).await;
    assert_eq!(enroll(&ch, &good, "late").await.unwrap_err().code(), Code::ResourceExhausted);
    // The bucket refills at 3 a minute: one attempt after ~20 s.
    tokio::time::sleep(Duration::from_secs(21)).await;
    enroll(&ch, &good, "late").await.unwrap();
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_credential_guessing_is_throttled_per_address() {
    let (_dir, srv, ch, cred) = serve(|t| t.replace("failed_admin_calls_per_minute = 10", "failed_admin_calls_per_minute = 30")).await;
    for _ in 0..30 {
        let e = admin(&ch).list_devices(with_admin("spa-admin-guess", ListDevicesRequest {})).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }
    // Refused before the comparison, the right credential from that address too.
    let e = admin(&ch).list_devices(with_admin("spa-admin-guess", ListDevicesRequest {})).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let e = admin(&ch).list_devices(with_admin(&cred, ListDevicesRequest {})).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // 30 a minute: one attempt back every 2 s.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    admin(&ch).list_devices(with_admin(&cred, ListDevicesRequest {})).await.unwrap();
    srv.shutdown().await.unwrap();
}

/// Rotating the admin credential while serving: the new one works at once, the old one no
/// longer; the new file is private.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_credential_rotates_while_serving() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, srv, ch, old) = serve(|t| t).await;
    let path = spa_coordinator::init::rotate_admin_credential(dir.path()).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let new = admin_cred(dir.path());
    assert_ne!(new, old);
    let e = admin(&ch).list_devices(with_admin(&old, ListDevicesRequest {})).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    admin(&ch).list_devices(with_admin(&new, ListDevicesRequest {})).await.unwrap();
    srv.shutdown().await.unwrap();
}

/// A Features request of `n` sequences of `len` tokens, the last position of each (`all`:
/// every position, 1 KiB each on this backbone).
fn features_of(a: &DeviceSigner, n: usize, len: usize, all: bool) -> tonic::Request<FeaturesRequest> {
    let from = if all { 0 } else { len as u32 - 1 };
    let seq = FeatureSequence { ids: (0..len as u32).map(|i| 3 + i % 60).collect(), from, to: len as u32 };
    let body = FeaturesRequest { backbone_version: String::new(), sequences: vec![seq; n], layers: vec![0], dtype: DType::DtypeF32 as i32 };
    a.request(methods::BACKBONE_FEATURES, body)
}

fn features(a: &DeviceSigner, n: usize, len: usize) -> tonic::Request<FeaturesRequest> {
    features_of(a, n, len, false)
}

/// Sends a Features request and reads its whole answer; when that was done.
async fn features_done(ch: tonic::transport::Channel, req: tonic::Request<FeaturesRequest>) -> Instant {
    let mut s = backbone(&ch).features(req).await.unwrap().into_inner();
    while s.message().await.unwrap().is_some() {}
    Instant::now()
}

/// Item 7: one device's large Features requests hold another device back by one slice of
/// work, not by all of them; and one device has at most `max_feature_requests_per_device`
/// in flight, unread answers included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backbone_serves_devices_in_turn_and_caps_requests_in_flight() {
    let (_dir, srv, ch, cred) = serve(|t| t).await;
    let a = enroll(&ch, &token(&ch, &cred, 600).await, "a").await.unwrap();
    let b = enroll(&ch, &token(&ch, &cred, 600).await, "b").await.unwrap();
    let t0 = Instant::now();
    let a1 = tokio::spawn(features_done(ch.clone(), features(&a, 64, 200)));
    let a2 = tokio::spawn(features_done(ch.clone(), features(&a, 64, 200)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b_done = features_done(ch.clone(), features(&b, 1, 8)).await;
    let (a1_done, a2_done) = (a1.await.unwrap(), a2.await.unwrap());
    let ms = |t: Instant| t.duration_since(t0).as_millis();
    eprintln!("a1 {} ms, a2 {} ms, b (sent at 300 ms) {} ms", ms(a1_done), ms(a2_done), ms(b_done));
    // First come, first served would answer b after both of a's requests.
    assert!(b_done < a1_done && b_done < a2_done, "a1 {} ms, a2 {} ms, b {} ms", ms(a1_done), ms(a2_done), ms(b_done));

    // Two answers left unread (3 MiB each: more than HTTP/2 lets the server send ahead) hold
    // both of a's places; b is not affected.
    let held1 = backbone(&ch).features(features_of(&a, 16, 200, true)).await.unwrap();
    let held2 = backbone(&ch).features(features_of(&a, 16, 200, true)).await.unwrap();
    let e = backbone(&ch).features(features(&a, 1, 8)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("in flight"), "{e:?}");
    features_done(ch.clone(), features(&b, 1, 8)).await;
    // Dropped unread, they give their places back.
    drop((held1, held2));
    let t = Instant::now();
    loop {
        match backbone(&ch).features(features(&a, 1, 8)).await {
            Ok(_) => break,
            Err(e) => assert!(e.code() == Code::ResourceExhausted && t.elapsed() < Duration::from_secs(5), "{e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    srv.shutdown().await.unwrap();
}

/// Any bytes as a message body: the codec of the fuzzing test below.
#[derive(Clone, Copy, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// The status `body` (sent as the only message) gets from `method`.
async fn raw_call(ch: &tonic::transport::Channel, method: &'static str, body: Vec<u8>) -> Code {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    match grpc.streaming(tonic::Request::new(tokio_stream::iter(vec![body])), path, Raw).await {
        Err(s) => s.code(),
        Ok(r) => {
            let mut s = r.into_inner();
            loop {
                match s.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break Code::Ok,
                    Err(e) => break e.code(),
                }
            }
        }
    }
}

/// Whole requests fuzzed against the live server: every method of the protocol gets a string
/// field of invalid UTF-8 and 40 random bodies; each answer is a caller's-error status (never
/// INTERNAL or UNKNOWN, which would blame the coordinator), and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_answers_undecodable_and_random_bodies_as_the_callers_error() {
    let (_dir, srv, ch, cred) = serve(|t| t).await;
    let a = enroll(&ch, &token(&ch, &cred, 600).await, "a").await.unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    // The Aggregator service is served by aggregator processes, not here (tests/load.rs).
    for &method in spa_proto::methods::ALL.iter().filter(|m| !m.starts_with("/spa.v1.Aggregator/")) {
        // Field 1, length-delimited, 2 bytes that are not UTF-8.
        let code = raw_call(&ch, method, vec![0x0a, 0x02, 0xff, 0xfe]).await;
        assert!(!matches!(code, Code::Internal | Code::Unknown | Code::Unimplemented), "{method}: invalid UTF-8 got {code:?}");
        for _ in 0..40 {
            let len = (next() % 200) as usize;
            let body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let code = raw_call(&ch, method, body.clone()).await;
            assert!(!matches!(code, Code::Internal | Code::Unknown | Code::Unimplemented), "{method}: {body:?} got {code:?}");
            *seen.entry(format!("{code:?}")).or_default() += 1;
        }
    }
    eprintln!("statuses of the random bodies: {seen:?}");
    ping(&ch, &a).await.unwrap();
    srv.shutdown().await.unwrap();
}

/// The Aggregator service fuzzed the same way, over mutual TLS with the role certificate (the
/// only callers it admits): every method, random bodies, a caller's-error status each time;
/// then a real shard opens and the aggregator still refuses one below its own floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aggregator_answers_random_bodies_as_the_callers_error_keeps_its_floor_and_counts() {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let dir = tempfile::tempdir().unwrap();
    init_home(dir.path(), |t| {
        t.replace("min_shard_contributors = 100", "min_shard_contributors = 10").replace("metrics_listen = \"\"", "metrics_listen = \"127.0.0.1:0\"")
    });
    let agg = spa_coordinator::aggregator::start(dir.path()).await.unwrap();
    let read = |f: &str| std::fs::read(dir.path().join("tls").join(f)).unwrap();
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("ca.pem"))).identity(Identity::from_pem(read("role.pem"), read("role.key")));
    let ch = Endpoint::from_shared(format!("https://{}", agg.addr)).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for &method in spa_proto::methods::ALL.iter().filter(|m| m.starts_with("/spa.v1.Aggregator/")) {
        for _ in 0..40 {
            let body: Vec<u8> = (0..next() % 200).map(|_| next() as u8).collect();
            let code = raw_call(&ch, method, body.clone()).await;
            assert!(!matches!(code, Code::Internal | Code::Unknown | Code::Unimplemented), "{method}: {body:?} got {code:?}");
        }
    }
    let mut c = spa_proto::v1::aggregator_client::AggregatorClient::new(ch);
    let config = spa_aggregation::SessionConfig::recommended(7, 0, 20, 101).unwrap();
    let json = spa_proto::secagg::config_to_json(&config);
    let open = |floor| OpenShardRequest { key: Some(ShardKey { round_id: 7, shard: 0 }), session_config_json: json.clone(), floor, leader_term: 1 };
    let low = c.open_shard(open(5)).await.unwrap_err();
    assert_eq!(low.code(), Code::FailedPrecondition, "{low:?}");
    assert!(low.message().contains("at least 10"), "{low:?}");
    c.open_shard(open(10)).await.unwrap();
    assert_eq!(c.open_shard(open(10)).await.unwrap_err().code(), Code::AlreadyExists);
    // A phase closed with nobody in it fails the shard (below its floor) and forgets it.
    let close = CloseShardRequest { key: Some(ShardKey { round_id: 7, shard: 0 }), phase: ShardPhase::Advertise as i32, leader_term: 1 };
    let closed = c.close_shard(close).await.unwrap();
    assert!(matches!(closed.into_inner().result, Some(close_shard_response::Result::Failed(_))));
    assert_eq!(agg.table.len(), 0);
    // Its own metrics, none of the coordinator's.
    let url = std::fs::read_to_string(dir.path().join("metrics.addr")).unwrap();
    let reply = http_get(url.trim().trim_start_matches("http://").trim_end_matches("/metrics"), "/metrics").await;
    let value = |name: &str| reply.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert_eq!(value("spa_aggregator_shards "), Some(0.0), "{reply}");
    assert_eq!(value("spa_aggregator_closes_total{outcome=\"failed\"}"), Some(1.0), "{reply}");
    assert!(value("spa_aggregator_refused_calls_total").is_some_and(|n| n >= 2.0), "the floor and the second open: {reply}");
    assert!(!reply.contains("spa_devices_enrolled"), "{reply}");
    agg.shutdown().await.unwrap();
}

/// Whether the server closed `s` within `within` (a read returns end of file or an error).
async fn closed_by_server(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 64];
    matches!(tokio::time::timeout(within, s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
}

/// `limits.max_connections` and `limits.tls_handshake_secs`: sockets that connect and never
/// speak hold their place only until the handshake deadline, and one past the cap is closed as
/// it arrives; connections already open are served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_and_silent_ones_dropped_at_the_handshake_deadline() {
    let (dir, srv, ch, cred) =
        serve(|t| t.replace("max_connections = 4096", "max_connections = 3").replace("tls_handshake_secs = 10", "tls_handshake_secs = 1")).await;
    admin(&ch).list_devices(with_admin(&cred, ListDevicesRequest {})).await.unwrap();
    // `ch` is one connection; two silent sockets take the other places.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(tokio::net::TcpStream::connect(srv.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    assert!(closed_by_server(&mut extra, Duration::from_millis(500)).await, "a connection past the cap was kept");
    admin(&ch).list_devices(with_admin(&cred, ListDevicesRequest {})).await.unwrap();
    // The silent ones are dropped at the 1 s handshake deadline, and their places come back.
    for s in silent.iter_mut() {
        assert!(closed_by_server(s, Duration::from_secs(5)).await, "a socket that never sent a TLS hello was kept");
    }
    let again = channel(&format!("https://{}", srv.addr), dir.path()).await;
    admin(&again).list_devices(with_admin(&cred, ListDevicesRequest {})).await.unwrap();
    srv.shutdown().await.unwrap();
}

/// `limits.max_connection_age_secs`: a connection, busy or idle, is asked to close once that
/// old and cut after the grace, so a live but idle peer cannot hold its place forever; the
/// client reconnects on its next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_closed_at_their_max_age_and_clients_reconnect() {
    let (_dir, srv, ch, cred) = serve(|t| {
        t.replace("max_connection_age_secs = 3600", "max_connection_age_secs = 2").replace("connection_age_grace_secs = 60", "connection_age_grace_secs = 1")
    })
    .await;
    admin(&ch).list_devices(with_admin(&cred, ListDevicesRequest {})).await.unwrap();
    assert_eq!(srv.open_connections(), 1);
    let t = std::time::Instant::now();
    while srv.open_connections() > 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "an idle connection outlived its maximum age");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Closed after the age (2 s), not before.
    assert!(t.elapsed() >= Duration::from_millis(1500), "{:?}", t.elapsed());
    // The same channel reconnects (a call may see the closed connection once: clients retry).
    let mut ok = false;
    for _ in 0..3 {
        ok |= admin(&ch).list_devices(with_admin(&cred, ListDevicesRequest {})).await.is_ok();
        if ok {
            break;
        }
    }
    assert!(ok, "the client did not reconnect");
    assert_eq!(srv.open_connections(), 1);
    srv.shutdown().await.unwrap();
}

// ---- Issue 27: what an independent hostile client found ---------------------------------

/// A new key for `a`'s device: its signer and the RotateKey request, signed by `a`.
fn rotation(a: &DeviceSigner) -> (DeviceSigner, tonic::Request<RotateKeyRequest>) {
    let next = DeviceSigner::from_pkcs8(&spa_proto::auth::generate_pkcs8().unwrap(), a.device_id()).unwrap();
    let pk = next.public_key();
    let proof = next.sign_raw(&spa_proto::auth::rotation_message(a.device_id(), &pk)).to_vec();
    let req = a.request(methods::DEVICE_ROTATE_KEY, RotateKeyRequest { new_public_key: pk.to_vec(), proof });
    (next, req)
}

/// Item 1: ten rotations signed by the same key at once: one wins, the others are refused,
/// only the winner's key works afterwards, and a loser's key was not burnt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_key_rotations_have_one_winner() {
    let (_dir, srv, ch, cred) = serve(|t| t).await;
    let a = enroll(&ch, &token(&ch, &cred, 600).await, "a").await.unwrap();
    let tries: Vec<(DeviceSigner, tonic::Request<RotateKeyRequest>)> = (0..10).map(|_| rotation(&a)).collect();
    let mut calls = Vec::new();
    let mut keys = Vec::new();
    for (next, req) in tries {
        let ch = ch.clone();
        calls.push(tokio::spawn(async move { device(&ch).rotate_key(req).await.map(|_| ()) }));
        keys.push(next);
    }
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.unwrap());
    }
    let winners: Vec<usize> = (0..10).filter(|&i| results[i].is_ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for (i, r) in results.iter().enumerate() {
        if let Err(e) = r {
            assert!(matches!(e.code(), Code::Aborted | Code::Unauthenticated), "{i}: {e:?}");
        }
    }
    let w = &keys[winners[0]];
    let working: Vec<bool> = pings(&ch, &keys).await;
    assert_eq!(working.iter().filter(|&&ok| ok).count(), 1, "{working:?}");
    assert!(ping(&ch, w).await.is_ok() && ping(&ch, &a).await.is_err());
    // A loser's key is not burnt: the winner may rotate to it.
    let loser = &keys[(winners[0] + 1) % 10];
    let pk = loser.public_key();
    let proof = loser.sign_raw(&spa_proto::auth::rotation_message(w.device_id(), &pk)).to_vec();
    device(&ch).rotate_key(w.request(methods::DEVICE_ROTATE_KEY, RotateKeyRequest { new_public_key: pk.to_vec(), proof })).await.unwrap();
    ping(&ch, loser).await.unwrap();
    srv.shutdown().await.unwrap();
}

async fn pings(ch: &tonic::transport::Channel, keys: &[DeviceSigner]) -> Vec<bool> {
    let mut out = Vec::new();
    for k in keys {
        out.push(ping(ch, k).await.is_ok());
    }
    out
}

/// Item 2: the eight points of small order, the identity under a second encoding and a
/// large-order point under its second encoding are refused at enrollment and rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weak_and_non_canonical_keys_are_refused_at_enrollment_and_rotation() {
    let (_dir, srv, ch, cred) = serve(|t| t).await;
    let small_order = [
        "0100000000000000000000000000000000000000000000000000000000000000",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000080",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    ];
    let second_encodings =
        ["0100000000000000000000000000000000000000000000000000000000000080", "f0ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"];
    let tok = token(&ch, &cred, 600).await;
    for k in small_order.iter().chain(&second_encodings) {
        let e = device(&ch).enroll(EnrollRequest { token: tok.clone(), public_key: hex::decode(k).unwrap(), name: "weak".into() }).await.unwrap_err();
        assert!(e.code() == Code::InvalidArgument && e.message().contains("public key refused"), "{k}: {e:?}");
    }
    // The token was not used up by the refusals.
    let a = enroll(&ch, &tok, "a").await.unwrap();
    // Rotation to the identity (with a "proof" that verifies against it: R = identity, s = 0).
    let mut sig = [0u8; 64];
    sig[0] = 1;
    let req = a.request(methods::DEVICE_ROTATE_KEY, RotateKeyRequest { new_public_key: hex::decode(small_order[0]).unwrap(), proof: sig.to_vec() });
    let e = device(&ch).rotate_key(req).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("small order"), "{e:?}");
    ping(&ch, &a).await.unwrap();
    srv.shutdown().await.unwrap();
}

/// A Generate stream opened by `first` (signed by `a`), sent at once.
async fn stream_with(
    ch: &tonic::transport::Channel,
    a: &DeviceSigner,
    first: GenerateRequest,
) -> (Input, Result<tonic::Streaming<GenerateResponse>, tonic::Status>) {
    let (tx, rx) = mpsc::channel(8);
    let h = a.sign(methods::BACKBONE_GENERATE, &first, now_ms());
    tx.send(first).await.unwrap();
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    h.apply(req.metadata_mut());
    (tx, backbone(ch).generate(req).await.map(|r| r.into_inner()))
}

fn resume_msg(layer: u32, session: u64, length: u32) -> GenerateRequest {
    let mut m = open_msg(layer);
    if let Some(generate_request::Kind::Open(o)) = &mut m.kind {
        (o.resume_session, o.resume_length) = (session, length);
    }
    m
}

/// Items 3 and 8: rotating the key ends the streams opened with the old one, and the session
/// resumes under the new key; a stream cut between steps (the client cancels) resumes too;
/// an undecodable later message is an error, not a clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_ends_old_streams_and_sessions_cut_between_steps_resume() {
    let (_dir, srv, ch, cred) = serve(|t| t).await;
    let a = enroll(&ch, &token(&ch, &cred, 600).await, "a").await.unwrap();
    let nl = layers(&ch, &a).await;
    let (tx, s) = stream(&ch, &a, nl, true).await;
    let mut s = s.unwrap();
    tx.send(extend(vec![1, 2, 3])).await.unwrap();
    let first = s.message().await.unwrap().unwrap();
    let session = first.session;
    let (b, req) = rotation(&a);
    device(&ch).rotate_key(req).await.unwrap();
    tx.send(extend(vec![4])).await.unwrap();
    let e = s.message().await.unwrap_err();
    assert!(e.code() == Code::Unauthenticated && e.message().contains("rotated"), "{e:?}");
    // The same device resumes under its new key; the old key opens nothing.
    let (_tx, r) = stream_with(&ch, &a, resume_msg(nl, session, 3)).await;
    assert_eq!(r.unwrap_err().code(), Code::Unauthenticated);
    let (tx, s) = stream_with(&ch, &b, resume_msg(nl, session, 3)).await;
    let mut s = s.unwrap();
    tx.send(extend(vec![4])).await.unwrap();
    assert_eq!(s.message().await.unwrap().unwrap().first_position, 3);

    // Cut between steps: the client drops its stream (a cancel), then resumes.
    drop((tx, s));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (tx, s) = stream_with(&ch, &b, resume_msg(nl, session, 4)).await;
    let mut s = s.expect("a session cut between steps resumes");
    tx.send(extend(vec![5])).await.unwrap();
    assert_eq!(s.message().await.unwrap().unwrap().first_position, 4);

    // An undecodable message after the opening one: an error status.
    let open = open_msg(nl);
    let h = b.sign(methods::BACKBONE_GENERATE, &open, now_ms());
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(tokio_stream::iter(vec![prost::Message::encode_to_vec(&open), vec![0x0a, 0xff]]));
    h.apply(req.metadata_mut());
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(methods::BACKBONE_GENERATE);
    let mut r = grpc.streaming(req, path, Raw).await.unwrap().into_inner();
    let end = loop {
        match r.message().await {
            Ok(Some(_)) => {}
            Ok(None) => break Code::Ok,
            Err(e) => break e.code(),
        }
    };
    assert_eq!(end, Code::InvalidArgument);
    srv.shutdown().await.unwrap();
}

/// Opens a session, takes one step of two tokens, cuts the stream: the session is parked.
async fn park(ch: &tonic::transport::Channel, who: &DeviceSigner, nl: u32) -> u64 {
    let (tx, s) = stream(ch, who, nl, true).await;
    let mut s = s.unwrap();
    tx.send(extend(vec![1, 2])).await.unwrap();
    let id = s.message().await.unwrap().unwrap().session;
    drop((tx, s));
    tokio::time::sleep(Duration::from_millis(50)).await;
    id
}

async fn resumes(ch: &tonic::transport::Channel, who: &DeviceSigner, nl: u32, id: u64) -> Result<(), tonic::Status> {
    stream_with(ch, who, resume_msg(nl, id, 2)).await.1.map(|_| ())
}

/// Item 4: a device parking many sessions loses its own oldest, never another device's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_sessions_count_against_their_own_device() {
    let (_dir, srv, ch, cred) = serve(|t| t.replace("max_sessions = 64", "max_sessions = 8")).await;
    let a = enroll(&ch, &token(&ch, &cred, 600).await, "a").await.unwrap();
    let b = enroll(&ch, &token(&ch, &cred, 600).await, "b").await.unwrap();
    let nl = layers(&ch, &a).await;
    let b_session = park(&ch, &b, nl).await;
    let mut a_sessions = Vec::new();
    for _ in 0..12 {
        a_sessions.push(park(&ch, &a, nl).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    resumes(&ch, &b, nl, b_session).await.expect("another device's parked session survives");
    // a keeps its newest max_sessions_per_device (4); its oldest are gone.
    assert_eq!(resumes(&ch, &a, nl, a_sessions[0]).await.unwrap_err().code(), Code::NotFound);
    resumes(&ch, &a, nl, a_sessions[11]).await.unwrap();
    srv.shutdown().await.unwrap();
}

/// Item 6: revoking a device cuts its Features answer between chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_cuts_a_features_answer_between_chunks() {
    let (_dir, srv, ch, cred) = serve(|t| t).await;
    let a = enroll(&ch, &token(&ch, &cred, 600).await, "a").await.unwrap();
    // 64 chunks of 200 KiB.
    let mut s = backbone(&ch).features(features_of(&a, 64, 200, true)).await.unwrap().into_inner();
    s.message().await.unwrap().unwrap();
    admin(&ch).revoke_device(with_admin(&cred, RevokeDeviceRequest { device_id: a.device_id().into() })).await.unwrap();
    let mut after = 0;
    let e = loop {
        match s.message().await {
            Ok(Some(_)) => after += 1,
            Ok(None) => panic!("all {after} remaining chunks were delivered after the revocation"),
            Err(e) => break e,
        }
    };
    assert!(e.code() == Code::PermissionDenied && after < 32, "{after} chunks, then {e:?}");
    srv.shutdown().await.unwrap();
}

/// Item 7: strings a caller chose come back short and escaped, and labels that would hide or
/// reorder text are refused at entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_strings_are_echoed_short_and_escaped_and_bidi_labels_refused() {
    let (_dir, srv, ch, cred) = serve(|t| t).await;
    let strategy = format!("x\n{}", "y".repeat(100_000));
    let plan =
        StartRoundsRequest { rounds: 1, min_clients: 1, max_clients: 1, deadline_seconds: 60, local_epochs: 1, lr: 0.01, strategy, ..Default::default() };
    let e = admin(&ch).start_rounds(with_admin(&cred, plan)).await.unwrap_err();
    assert!(
        e.code() == Code::InvalidArgument && e.message().len() < 300 && !e.message().contains('\n'),
        "{} bytes: {:?}",
        e.message().len(),
        e.message().chars().take(80).collect::<String>()
    );
    let e = admin(&ch).revoke_token(with_admin(&cred, RevokeTokenRequest { token_id: "tok-\u{1b}[2J\r".into() })).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && !e.message().contains('\u{1b}'), "{e:?}");
    let tok = token(&ch, &cred, 600).await;
    for name in ["evil\u{202e}gnp.exe", "zero\u{200b}width", "line\u{2028}break"] {
        let pk = spa_proto::auth::public_key_of(&spa_proto::auth::generate_pkcs8().unwrap()).unwrap();
        let e = device(&ch).enroll(EnrollRequest { token: tok.clone(), public_key: pk.to_vec(), name: name.into() }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name:?}: {e:?}");
    }
    let e = admin(&ch).create_token(with_admin(&cred, CreateTokenRequest { ttl_seconds: 60, note: "a\u{202e}b".into() })).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    enroll(&ch, &tok, "plain name, ünïcode fine").await.unwrap();
    srv.shutdown().await.unwrap();
}

/// Item 2, stores from before the check: a device enrolled with the identity point (written
/// to the store directly, as an older coordinator would have) signs nothing, not even with
/// the signature that verifies against that key without any private key (R = identity, s = 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weak_key_already_in_the_store_signs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    init_home(dir.path(), |t| t);
    let identity = hex::decode("0100000000000000000000000000000000000000000000000000000000000000").unwrap();
    let id = {
        let store = spa_coordinator::store::Store::open(&dir.path().join("store")).unwrap();
        let rec = spa_coordinator::store::TokenRecord {
            token_id: "tok-old".into(),
            created_at_ms: 0,
            expires_at_ms: u64::MAX,
            note: String::new(),
            used_by: None,
            revoked_at_ms: None,
        };
        store.add_token(&spa_coordinator::store::token_hash("old-token"), &rec).await.unwrap();
        store.enroll(&spa_coordinator::store::token_hash("old-token"), &identity, "old", now_ms()).await.unwrap().device_id
    };
    let srv = spa_coordinator::server::start(dir.path()).await.unwrap();
    let ch = channel(&format!("https://{}", srv.addr), dir.path()).await;
    let mut sig = [0u8; 64];
    sig[0] = 1;
    let h = spa_proto::auth::SignedHeaders { device_id: id, ts_ms: now_ms(), nonce_hex: "ab".repeat(16), sig_hex: hex::encode(sig) };
    let mut req = tonic::Request::new(PingRequest {});
    h.apply(req.metadata_mut());
    let e = device(&ch).ping(req).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    srv.shutdown().await.unwrap();
}
