//! A device's connection to its coordinator: TLS trusting the coordinator's CA, explicit
//! message-size limits, and every call signed with the device key.
use spa_proto::auth::DeviceSigner;
use spa_proto::limits::MAX_MESSAGE_BYTES;
use spa_proto::v1::backbone_client::BackboneClient;
use spa_proto::v1::device_client::DeviceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::error::{ClientError, Result};
use crate::store::ClientStore;

/// Connects over TLS to `url` (`https://HOST:PORT`), trusting only `ca_pem`.
pub async fn connect(url: &str, ca_pem: &[u8]) -> Result<Channel> {
    if !url.starts_with("https://") {
        return Err(ClientError::Invalid(format!(
            "coordinator URL must start with https:// (got '{url}')"
        )));
    }
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    let ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| ClientError::Invalid(format!("invalid coordinator URL '{url}': {e}")))?
        .tls_config(tls)?
        .connect_timeout(std::time::Duration::from_secs(10));
    Ok(ep.connect().await?)
}

pub fn device_client(ch: Channel) -> DeviceClient<Channel> {
    DeviceClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub fn backbone_client(ch: Channel) -> BackboneClient<Channel> {
    BackboneClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// An enrolled device, connected.
pub struct Session {
    pub signer: DeviceSigner,
    pub channel: Channel,
    pub identity: crate::store::Identity,
}

impl Session {
    pub async fn open(store: &ClientStore) -> Result<Self> {
        let (pkcs8, identity) = store.require_identity()?;
        let signer = DeviceSigner::from_pkcs8(&pkcs8, identity.device_id.clone())
            .map_err(|e| ClientError::Invalid(format!("stored identity key rejected: {e}")))?;
        let channel = connect(&identity.coordinator, identity.ca_pem.as_bytes()).await?;
        Ok(Self {
            signer,
            channel,
            identity,
        })
    }

    pub fn device(&self) -> DeviceClient<Channel> {
        device_client(self.channel.clone())
    }

    pub fn backbone(&self) -> BackboneClient<Channel> {
        backbone_client(self.channel.clone())
    }
}
