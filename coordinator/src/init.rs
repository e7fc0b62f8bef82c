//! `spa-coordinator init --home DIR`: a documented default config, a self-signed CA with a
//! server certificate it signed, and an admin credential. Never overwrites anything.
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{CoordinatorError, Result, io};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::config::{CONFIG_FILE, CoordinatorConfig, DEFAULT_TOML};

#[derive(Debug, serde::Serialize)]
pub struct InitReport {
    pub home: PathBuf,
    pub config: PathBuf,
    pub ca_cert: PathBuf,
    pub admin_credential: PathBuf,
}

/// Writes a new file, failing if it exists; secret files get mode 0600.
fn write_new(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = o.open(path).map_err(io(path))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io(path))?;
    Ok(())
}

/// A fresh admin credential: `spa-admin-` and 256 random bits in hex.
fn new_credential() -> String {
    format!("spa-admin-{}\n", hex::encode(spa_proto::auth::random_bytes::<32>()))
}

/// Replaces the admin credential of `home` with a fresh one (written mode 0600 beside the old
/// one, then renamed over it: never a half-written file). A running coordinator reads the file
/// on each admin call: the old credential stops working at once. Returns the file's path.
pub fn rotate_admin_credential(home: &Path) -> Result<std::path::PathBuf> {
    let cfg = CoordinatorConfig::load(home)?;
    let path = cfg.resolve(home, &cfg.server.admin_credential);
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, new_credential().as_bytes(), true)?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(path)
}

/// `extra_names`: more DNS names or IP addresses the server certificate is valid for
/// (beyond localhost and 127.0.0.1).
pub fn init(home: &Path, extra_names: &[String]) -> Result<InitReport> {
    let cfg = CoordinatorConfig::default_config();
    let config = home.join(CONFIG_FILE);
    let s = &cfg.server;
    let targets = [&config, &home.join(&s.cert), &home.join(&s.key), &home.join(&s.ca_cert), &home.join(&s.admin_credential), &home.join(&s.store)];
    if let Some(t) = targets.iter().find(|p| p.exists()) {
        return Err(CoordinatorError::Config(format!("{} already exists: refusing to overwrite an initialised coordinator home", t.display())));
    }
    std::fs::create_dir_all(home).map_err(io(home))?;
    let tls = home.join(&s.cert).parent().expect("cert path has a parent").to_path_buf();
    std::fs::create_dir_all(&tls).map_err(io(&tls))?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "SPA coordinator CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    names.extend(extra_names.iter().cloned());
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name.push(DnType::CommonName, "SPA coordinator");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let key = KeyPair::generate()?;
    let issuer = Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer)?;

    let credential = new_credential();
    write_new(&home.join(&s.ca_cert), ca_cert.pem().as_bytes(), false)?;
    write_new(&home.join("tls/ca.key"), issuer.key().serialize_pem().as_bytes(), true)?;
    write_new(&home.join(&s.cert), cert.pem().as_bytes(), false)?;
    write_new(&home.join(&s.key), key.serialize_pem().as_bytes(), true)?;
    write_new(&home.join(&s.admin_credential), credential.as_bytes(), true)?;
    // The config last: its presence marks a complete home.
    write_new(&config, DEFAULT_TOML.as_bytes(), false)?;
    Ok(InitReport { home: home.to_path_buf(), config, ca_cert: home.join(&s.ca_cert), admin_credential: home.join(&s.admin_credential) })
}
