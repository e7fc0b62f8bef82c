//! TLS channels to a coordinator (used by the admin CLI verbs and tests).
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Why no channel could be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Not a transport failure (the exit code is not "unavailable"): the cause as text.
    #[error("invalid coordinator URL '{url}': {reason}")]
    Url { url: String, reason: String },
    #[error("cannot connect to the coordinator at {url}: {source}")]
    Connect { url: String, source: tonic::transport::Error },
}

/// Connects over TLS, trusting only `ca_pem`. `url` is `https://HOST:PORT`.
pub async fn connect(url: &str, ca_pem: &[u8]) -> Result<Channel, ConnectError> {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    let bad_url = |e: tonic::transport::Error| ConnectError::Url { url: url.to_string(), reason: e.to_string() };
    let ep = Endpoint::from_shared(url.to_string()).map_err(bad_url)?.tls_config(tls).map_err(bad_url)?;
    let ep = ep.connect_timeout(std::time::Duration::from_secs(10));
    ep.connect().await.map_err(|source| ConnectError::Connect { url: url.to_string(), source })
}
