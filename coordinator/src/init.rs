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

/// The CA key, and the names the server certificate was issued for (one per line).
const CA_KEY_FILE: &str = "tls/ca.key";
const NAMES_FILE: &str = "tls/server.names";

/// The CA's parameters: the same at init and at each rotation, so that certificates issued
/// later name the same issuer.
fn ca_params() -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, "SPA coordinator CA");
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(p)
}

fn server_names(extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    names.extend(extra.iter().filter(|n| !names.contains(n)).cloned().collect::<Vec<_>>());
    names
}

/// A fresh server key and a certificate for `names` signed by the CA: (cert PEM, key PEM).
fn server_cert(names: &[String], issuer: &Issuer<'_, KeyPair>) -> Result<(String, String)> {
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(DnType::CommonName, "SPA coordinator");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A fresh role key and certificate (client use) signed by the CA: what one role of the
/// deployment presents to another (a leader to its aggregators). (cert PEM, key PEM).
fn role_cert(issuer: &Issuer<'_, KeyPair>) -> Result<(String, String)> {
    let mut params = CertificateParams::new(vec!["spa-role".to_string()])?;
    params.distinguished_name.push(DnType::CommonName, "SPA role");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[derive(Debug, serde::Serialize)]
pub struct TlsRotated {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub names: Vec<String>,
}

/// Issues a new server key and certificate from the home's CA (devices trust the CA, so they
/// need nothing new) and puts them in place, each written beside the old and renamed over
/// it. `extra_names` empty: the names of the last issue (init's or a rotation's). The running
/// coordinator reads its certificate at start: restart it to serve the new one.
pub fn rotate_tls(home: &Path, extra_names: &[String]) -> Result<TlsRotated> {
    let cfg = CoordinatorConfig::load(home)?;
    let ca_key_path = home.join(CA_KEY_FILE);
    let ca_pem = std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
    let issuer = Issuer::new(ca_params()?, KeyPair::from_pem(&ca_pem)?);
    let names = match extra_names {
        [] => match std::fs::read_to_string(home.join(NAMES_FILE)) {
            Ok(s) => s.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect(),
            Err(_) => server_names(&[]),
        },
        extra => server_names(extra),
    };
    let (cert, key) = server_cert(&names, &issuer)?;
    let (role_pem, role_key) = role_cert(&issuer)?;
    let s = &cfg.server;
    let (cert_path, key_path) = (cfg.resolve(home, &s.cert), cfg.resolve(home, &s.key));
    let names_text = names.join("\n");
    let files = [
        (key_path.clone(), &key, true),
        (cert_path.clone(), &cert, false),
        (home.join(NAMES_FILE), &names_text, false),
        (cfg.resolve(home, &s.role_key), &role_key, true),
        (cfg.resolve(home, &s.role_cert), &role_pem, false),
    ];
    for (path, bytes, secret) in &files {
        let tmp = path.with_extension("new");
        let _ = std::fs::remove_file(&tmp);
        write_new(&tmp, bytes.as_bytes(), *secret)?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
    }
    Ok(TlsRotated { cert: cert_path, key: key_path, names })
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

    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params()?.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let names = server_names(extra_names);
    let (cert, key) = server_cert(&names, &issuer)?;
    let (role_pem, role_key) = role_cert(&issuer)?;
    let credential = new_credential();
    write_new(&home.join(&s.ca_cert), ca_cert.pem().as_bytes(), false)?;
    write_new(&home.join(CA_KEY_FILE), issuer.key().serialize_pem().as_bytes(), true)?;
    write_new(&home.join(&s.cert), cert.as_bytes(), false)?;
    write_new(&home.join(&s.key), key.as_bytes(), true)?;
    write_new(&home.join(NAMES_FILE), names.join("\n").as_bytes(), false)?;
    write_new(&home.join(&s.role_cert), role_pem.as_bytes(), false)?;
    write_new(&home.join(&s.role_key), role_key.as_bytes(), true)?;
    write_new(&home.join(&s.admin_credential), credential.as_bytes(), true)?;
    // The config last: its presence marks a complete home.
    write_new(&config, DEFAULT_TOML.as_bytes(), false)?;
    Ok(InitReport { home: home.to_path_buf(), config, ca_cert: home.join(&s.ca_cert), admin_credential: home.join(&s.admin_credential) })
}
