//! A device's connection to its coordinator: TLS trusting the coordinator's CA, explicit
//! message-size limits, and every call signed with the device key.
use spa_proto::auth::DeviceSigner;
use spa_proto::limits::MAX_MESSAGE_BYTES;
use spa_proto::methods;
use spa_proto::reason::Reason;
use spa_proto::v1::PingRequest;
use spa_proto::v1::backbone_client::BackboneClient;
use spa_proto::v1::device_client::DeviceClient;
use spa_proto::v1::rounds_client::RoundsClient;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::config::{ClientConfig, NetConfig};
use crate::error::{ClientError, Result};
use crate::store::ClientStore;

/// Connects over TLS to `url` (`https://HOST:PORT`), trusting only `ca_pem`; every call on the
/// channel fails (CANCELLED, "Timeout expired") if its answer takes over `net.call_timeout_secs`.
pub async fn connect(url: &str, ca_pem: &[u8], net: &NetConfig) -> Result<Channel> {
    if !url.starts_with("https://") {
        return Err(ClientError::Invalid(format!("coordinator URL must start with https:// (got '{url}')")));
    }
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    let ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| ClientError::Invalid(format!("invalid coordinator URL '{url}': {e}")))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(net.call_timeout_secs))
        // A coordinator that stops answering (a partition, a dead peer behind a NAT) is
        // noticed within ~20 s and the call fails, instead of waiting for the OS (minutes).
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(Duration::from_secs(30)));
    Ok(ep.connect().await?)
}

pub fn device_client(ch: Channel) -> DeviceClient<Channel> {
    DeviceClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub fn backbone_client(ch: Channel) -> BackboneClient<Channel> {
    BackboneClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// The time this device dates its calls with: the system clock, shifted by
/// `SPA_FAULT_CLOCK_SKEW_SECS` under fault injection (a device whose clock is wrong).
pub fn signing_time_ms() -> u64 {
    let now = spa_proto::auth::now_ms();
    #[cfg(feature = "fault-injection")]
    if let Some(skew) = std::env::var("SPA_FAULT_CLOCK_SKEW_SECS").ok().and_then(|v| v.parse::<i64>().ok()) {
        return now.saturating_add_signed(skew * 1000);
    }
    now
}

/// An enrolled device, connected: to the coordinator it reached (round calls go there) and
/// to the one serving its other calls (the same, but where several share a store).
pub struct Session {
    pub signer: DeviceSigner,
    pub channel: Channel,
    owner: Channel,
    pub identity: crate::store::Identity,
    net: NetConfig,
    capture: Option<Mutex<std::fs::File>>,
}

/// With `SPA_CAPTURE_OUTGOING=FILE`, every message body this device sends is appended to FILE
/// as records of (u32 LE length, method path, u32 LE length, protobuf bytes): the audit trail
/// the tests search for private-tensor bytes. Every outgoing message of enrolled calls goes
/// through [`Session::request`] or [`Session::record`].
pub const CAPTURE_ENV: &str = "SPA_CAPTURE_OUTGOING";

impl Session {
    /// The enrolled device of `home` (its store open as `store`), connected.
    pub async fn open(home: &Path, store: &ClientStore) -> Result<Self> {
        Self::open_at(home, store, None).await
    }

    /// [`Self::open`], reaching the coordinator at `url` instead of the enrolled address
    /// (another route to the same coordinator: its certificate is still checked).
    pub async fn open_at(home: &Path, store: &ClientStore, url: Option<&str>) -> Result<Self> {
        let net = ClientConfig::load(home)?.net;
        let (pkcs8, mut identity) = store.require_identity(crate::keyseal::passphrase()?.as_deref())?;
        if let Some(u) = url {
            identity.coordinator = u.to_string();
        }
        let signer =
            DeviceSigner::from_pkcs8(&pkcs8, identity.device_id.clone()).map_err(|e| ClientError::Invalid(format!("stored identity key rejected: {e}")))?;
        let channel = connect(&identity.coordinator, identity.ca_pem.as_bytes(), &net).await?;
        let capture = match std::env::var_os(CAPTURE_ENV) {
            Some(p) => Some(Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(&p).map_err(crate::error::io(std::path::Path::new(&p)))?)),
            None => None,
        };
        let owner = channel.clone();
        let mut s = Self { signer, channel, owner, identity, net, capture };
        s.owner = s.find_owner().await?;
        Ok(s)
    }

    /// The coordinator serving this device's calls (its round calls apart), asked with a ping:
    /// the one reached, or the one it names (`NOT_OWNER`). Refusals other than "unavailable"
    /// are left to the calls that follow (a rotation checks which key is accepted).
    async fn find_owner(&self) -> Result<Channel> {
        match self.device().ping(self.request(methods::DEVICE_PING, PingRequest {})).await {
            Ok(_) => Ok(self.channel.clone()),
            Err(st) => match Reason::owner_url(&st) {
                Some(url) => connect(&url, self.identity.ca_pem.as_bytes(), &self.net).await,
                None if st.code() == tonic::Code::Unavailable => Err(st.into()),
                None => Ok(self.channel.clone()),
            },
        }
    }

    /// The next message of a server stream. One silent for `net.stream_stall_secs` fails
    /// (DEADLINE_EXCEEDED) rather than holding the device: keepalive cannot tell a wedged
    /// coordinator from a slow one.
    pub async fn next<T>(&self, stream: &mut tonic::Streaming<T>) -> Result<Option<T>> {
        let stall = Duration::from_secs(self.net.stream_stall_secs);
        match tokio::time::timeout(stall, stream.message()).await {
            Ok(m) => Ok(m?),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!("the coordinator sent nothing for {} s on an open stream", stall.as_secs())).into()),
        }
    }

    /// Notes an outgoing message body of `method` in the capture file, if capturing.
    pub fn record<M: prost::Message>(&self, method: &str, body: &M) {
        if let Some(f) = &self.capture {
            let b = body.encode_to_vec();
            let mut rec = Vec::with_capacity(b.len() + method.len() + 8);
            rec.extend_from_slice(&(method.len() as u32).to_le_bytes());
            rec.extend_from_slice(method.as_bytes());
            rec.extend_from_slice(&(b.len() as u32).to_le_bytes());
            rec.extend_from_slice(&b);
            let _ = f.lock().unwrap_or_else(|p| p.into_inner()).write_all(&rec);
        }
    }

    /// A signed request (recorded when capturing).
    pub fn request<M: prost::Message>(&self, method: &str, body: M) -> tonic::Request<M> {
        self.record(method, &body);
        let h = self.signer.sign(method, &body, signing_time_ms());
        let mut req = tonic::Request::new(body);
        h.apply(req.metadata_mut());
        req
    }

    pub fn rounds(&self) -> RoundsClient<Channel> {
        RoundsClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// For GetGlobal: a committed version is served by the device's own coordinator.
    pub fn global(&self) -> RoundsClient<Channel> {
        RoundsClient::new(self.owner.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn device(&self) -> DeviceClient<Channel> {
        device_client(self.owner.clone())
    }

    pub fn backbone(&self) -> BackboneClient<Channel> {
        backbone_client(self.owner.clone())
    }
}
