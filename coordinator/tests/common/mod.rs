//! Shared helpers: a coordinator home on loopback with a free port, TLS clients.
#![allow(dead_code)]
use std::path::Path;

use spa_proto::auth::{DeviceSigner, generate_pkcs8, public_key_of};
use spa_proto::v1::admin_client::AdminClient;
use spa_proto::v1::backbone_client::BackboneClient;
use spa_proto::v1::device_client::DeviceClient;
use spa_proto::v1::*;
use tonic::transport::Channel;

/// `init` a home and point it at a free loopback port; `edit` may change the config text.
pub fn init_home(home: &Path, edit: impl Fn(String) -> String) {
    spa_coordinator::init::init(home, &[]).unwrap();
    let p = home.join("coordinator.toml");
    let text = std::fs::read_to_string(&p).unwrap().replace("listen = \"127.0.0.1:7443\"", "listen = \"127.0.0.1:0\"");
    std::fs::write(&p, edit(text)).unwrap();
}

pub fn ca(home: &Path) -> Vec<u8> {
    std::fs::read(home.join("tls/ca.pem")).unwrap()
}

pub fn admin_cred(home: &Path) -> String {
    std::fs::read_to_string(home.join("admin.credential")).unwrap().trim().to_string()
}

pub async fn channel(url: &str, home: &Path) -> Channel {
    spa_coordinator::net::connect(url, &ca(home)).await.unwrap()
}

pub fn admin(ch: &Channel) -> AdminClient<Channel> {
    AdminClient::new(ch.clone())
}

pub fn device(ch: &Channel) -> DeviceClient<Channel> {
    DeviceClient::new(ch.clone())
}

pub fn backbone(ch: &Channel) -> BackboneClient<Channel> {
    BackboneClient::new(ch.clone()).max_decoding_message_size(8 << 20)
}

pub fn with_admin<M>(cred: &str, body: M) -> tonic::Request<M> {
    spa_coordinator::admin_cli::with_admin(cred, body).unwrap()
}

pub async fn token(ch: &Channel, cred: &str, ttl: u64) -> String {
    admin(ch).create_token(with_admin(cred, CreateTokenRequest { ttl_seconds: ttl, note: "test".into() })).await.unwrap().into_inner().token
}

/// Enrolls a fresh key; returns its signer.
pub async fn enroll(ch: &Channel, token: &str, name: &str) -> Result<DeviceSigner, tonic::Status> {
    let pkcs8 = generate_pkcs8().unwrap();
    let pk = public_key_of(&pkcs8).unwrap();
    let r = device(ch).enroll(EnrollRequest { token: token.into(), public_key: pk.to_vec(), name: name.into() }).await?.into_inner();
    Ok(DeviceSigner::from_pkcs8(&pkcs8, r.device_id).unwrap())
}

pub async fn ping(ch: &Channel, s: &DeviceSigner) -> Result<PingResponse, tonic::Status> {
    Ok(device(ch).ping(s.request(spa_proto::methods::DEVICE_PING, PingRequest {})).await?.into_inner())
}
