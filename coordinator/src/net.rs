//! TLS channels to a coordinator (used by the admin CLI verbs and tests).
use anyhow::{Context, Result};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Connects over TLS, trusting only `ca_pem`. `url` is `https://HOST:PORT`.
pub async fn connect(url: &str, ca_pem: &[u8]) -> Result<Channel> {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    let ep = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("invalid coordinator URL '{url}'"))?
        .tls_config(tls)?
        .connect_timeout(std::time::Duration::from_secs(10));
    ep.connect().await.with_context(|| format!("cannot connect to the coordinator at {url}"))
}
