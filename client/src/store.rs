//! The device's own sled store: identity key and coordinator info, local data, backbone
//! files and frozen head by version, the feature cache, the body (the side network's shared
//! part: a committed global version, or trained here) and the personal model fitted
//! against it (SPA v2's private parts: `personal.rs`). Every change a command reports as
//! done is flushed first.
use std::path::Path;

use serde::{Deserialize, Serialize};
use spa_model::data::Example;
use spa_model::features::ExampleFeatures;

use crate::error::{ClientError, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    pub device_id: String,
    pub name: String,
    pub coordinator: String,
    pub ca_pem: String,
    pub enrolled_at_ms: u64,
    pub backbone_version: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub file: String,
    pub format: String,
    pub examples: usize,
    pub added_at_ms: u64,
}

/// Metadata of the stored body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainedMeta {
    /// 2 from SPA v2 on; records without it were written by SPA v1 (whose private part was
    /// a co-trained gate and personal layer, and is not read any more).
    #[serde(default)]
    pub format: u32,
    pub backbone_version: String,
    pub side: spa_model::side::SideConfig,
    pub trained_at_ms: u64,
    pub examples: usize,
    pub steps: usize,
    /// None when the plugin was adopted without training here (JSON has no NaN: a NaN
    /// written as null could not be read back, and the agent's next step failed on it).
    pub final_loss: Option<f32>,
    pub shared_tensors: usize,
    pub private_tensors: usize,
}

#[derive(Clone)]
pub struct ClientStore {
    db: sled::Db,
    meta: sled::Tree,
    data: sled::Tree,
    sources: sled::Tree,
    features: sled::Tree,
    params: sled::Tree,
    backbone: sled::Tree,
}

fn dec<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| ClientError::Invalid(format!("corrupt store record: {e}")))
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

/// Key slots in the meta tree: `SLOT.pkcs8` (in clear) or `SLOT.sealed` (keyseal.rs), never both.
const CURRENT_KEY: &str = "identity";
const NEXT_KEY: &str = "identity.next";

/// Writes `pkcs8` into `slot`, sealed when `pass` is given, and clears the other form.
fn key_batch(slot: &str, pkcs8: &[u8], pass: Option<&[u8]>) -> Result<sled::Batch> {
    let mut b = sled::Batch::default();
    let (clear, sealed) = (format!("{slot}.pkcs8"), format!("{slot}.sealed"));
    match pass {
        Some(p) => {
            b.insert(sealed.as_str(), enc(&crate::keyseal::seal(pkcs8, p)?));
            b.remove(clear.as_str());
        }
        None => {
            b.insert(clear.as_str(), pkcs8);
            b.remove(sealed.as_str());
        }
    }
    Ok(b)
}

impl ClientStore {
    pub fn open(home: &Path) -> Result<Self> {
        std::fs::create_dir_all(home).map_err(crate::error::io(home))?;
        let dir = home.join("store");
        private_dir(&dir)?;
        let db = open_db(&dir)?;
        Ok(Self {
            meta: db.open_tree("meta")?,
            data: db.open_tree("data")?,
            sources: db.open_tree("sources")?,
            features: db.open_tree("features")?,
            params: db.open_tree("params")?,
            backbone: db.open_tree("backbone")?,
            db,
        })
    }

    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// The committed global version the stored shared part is (set by `run`), durable.
    pub fn set_global_version(&self, v: u64) -> Result<()> {
        self.meta.insert("global_version", &v.to_be_bytes())?;
        self.flush()
    }

    /// The stored shared part is no longer a committed version (a fresh body), durable.
    pub fn clear_global_version(&self) -> Result<()> {
        self.meta.remove("global_version")?;
        self.flush()
    }

    pub fn global_version(&self) -> Result<Option<u64>> {
        Ok(self.meta.get("global_version")?.and_then(|b| b.as_ref().try_into().ok()).map(u64::from_be_bytes))
    }

    /// Stores the identity key (sealed when `pass` is given: keyseal.rs) and coordinator info;
    /// durable on return.
    pub fn set_identity(&self, pkcs8: &[u8], id: &Identity, pass: Option<&[u8]>) -> Result<()> {
        let mut b = key_batch(CURRENT_KEY, pkcs8, pass)?;
        b.insert("identity", enc(id));
        self.meta.apply_batch(b)?;
        self.flush()
    }

    /// Who this device is (no key).
    pub fn identity(&self) -> Result<Option<Identity>> {
        self.meta.get("identity")?.map(|i| dec(&i)).transpose()
    }

    /// Whether the identity key is sealed with a passphrase.
    pub fn key_sealed(&self) -> Result<bool> {
        Ok(self.meta.contains_key(format!("{CURRENT_KEY}.sealed"))?)
    }

    /// The identity key (opened with `pass` when sealed) and who this device is.
    pub fn require_identity(&self, pass: Option<&[u8]>) -> Result<(Vec<u8>, Identity)> {
        let id = self.identity()?.ok_or(ClientError::NotEnrolled)?;
        Ok((self.key(CURRENT_KEY, pass)?.ok_or(ClientError::NotEnrolled)?, id))
    }

    /// A key being rotated to, stored before the coordinator is asked (so a crash between its
    /// answer and [`ClientStore::promote_next_key`] loses nothing); durable on return.
    pub fn set_next_key(&self, pkcs8: &[u8], pass: Option<&[u8]>) -> Result<()> {
        self.meta.apply_batch(key_batch(NEXT_KEY, pkcs8, pass)?)?;
        self.flush()
    }

    pub fn next_key(&self, pass: Option<&[u8]>) -> Result<Option<Vec<u8>>> {
        self.key(NEXT_KEY, pass)
    }

    /// The next key becomes the identity key (sealed as it was stored), atomically; durable.
    pub fn promote_next_key(&self) -> Result<()> {
        let mut b = sled::Batch::default();
        for form in ["pkcs8", "sealed"] {
            match self.meta.get(format!("{NEXT_KEY}.{form}"))? {
                Some(v) => b.insert(format!("{CURRENT_KEY}.{form}").as_str(), v),
                None => b.remove(format!("{CURRENT_KEY}.{form}").as_str()),
            }
            b.remove(format!("{NEXT_KEY}.{form}").as_str());
        }
        self.meta.apply_batch(b)?;
        self.flush()
    }

    pub fn drop_next_key(&self) -> Result<()> {
        let mut b = sled::Batch::default();
        b.remove(format!("{NEXT_KEY}.pkcs8").as_str());
        b.remove(format!("{NEXT_KEY}.sealed").as_str());
        self.meta.apply_batch(b)?;
        self.flush()
    }

    /// The key in `slot`, in clear or sealed (then opened with `pass`).
    fn key(&self, slot: &str, pass: Option<&[u8]>) -> Result<Option<Vec<u8>>> {
        if let Some(k) = self.meta.get(format!("{slot}.pkcs8"))? {
            return Ok(Some(k.to_vec()));
        }
        let Some(raw) = self.meta.get(format!("{slot}.sealed"))? else {
            return Ok(None);
        };
        let sealed: crate::keyseal::Sealed = dec(&raw)?;
        let pass = pass.ok_or_else(|| {
            ClientError::Key(format!(
                "it is sealed: give its passphrase in the file named by {} (or in {})",
                crate::keyseal::PASSPHRASE_FILE_ENV,
                crate::keyseal::PASSPHRASE_ENV
            ))
        })?;
        crate::keyseal::open(&sealed, pass).map(Some)
    }

    /// Adds examples from one source; durable on return.
    pub fn add_examples(&self, source: &Source, examples: &[Example]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for e in examples {
            let id = self.db.generate_id()?;
            batch.insert(id.to_be_bytes().to_vec(), enc(e));
        }
        self.data.apply_batch(batch)?;
        let key = format!("{:020}", self.db.generate_id()?);
        self.sources.insert(key, enc(source))?;
        self.flush()
    }

    pub fn examples(&self) -> Result<Vec<Example>> {
        self.data.iter().values().map(|v| dec(&v?)).collect()
    }

    pub fn sources(&self) -> Result<Vec<Source>> {
        self.sources.iter().values().map(|v| dec(&v?)).collect()
    }

    pub fn put_backbone_file(&self, version: &str, name: &str, bytes: &[u8]) -> Result<()> {
        self.backbone.insert(format!("{version}/{name}"), bytes)?;
        Ok(())
    }

    pub fn backbone_file(&self, version: &str, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.backbone.get(format!("{version}/{name}"))?.map(|v| v.to_vec()))
    }

    pub fn cached_features(&self, key: &str) -> Result<Option<ExampleFeatures>> {
        Ok(self.features.get(key)?.map(|b| ExampleFeatures::from_bytes(&b)).transpose()?)
    }

    pub fn cache_features(&self, key: &str, f: &ExampleFeatures) -> Result<()> {
        self.features.insert(key, f.to_bytes())?;
        Ok(())
    }

    pub fn feature_cache_len(&self) -> usize {
        self.features.len()
    }

    /// Saves the body (shared safetensors) and, fitted against it, the personal model, in
    /// one atomic, durable batch; without a personal model the stored one (fitted against
    /// an earlier body) is removed with it. SPA v1's private record goes.
    pub fn save_model(&self, shared: &[u8], meta: &TrainedMeta, personal: Option<&StoredPersonal>) -> Result<()> {
        let mut b = sled::Batch::default();
        b.insert("shared", shared);
        b.insert("meta", enc(meta));
        b.remove("private");
        match personal {
            Some(p) => {
                b.insert("personal.record", p.record.as_slice());
                b.insert("personal.params", p.params.as_slice());
                match &p.datastore {
                    Some(d) => b.insert("personal.datastore", d.as_slice()),
                    None => b.remove("personal.datastore"),
                }
            }
            None => {
                for k in ["personal.record", "personal.params", "personal.datastore"] {
                    b.remove(k);
                }
            }
        }
        self.params.apply_batch(b)?;
        self.flush()
    }

    /// The body: shared safetensors and its metadata.
    pub fn body(&self) -> Result<Option<(Vec<u8>, TrainedMeta)>> {
        match (self.params.get("shared")?, self.params.get("meta")?) {
            (Some(s), Some(m)) => Ok(Some((s.to_vec(), dec(&m)?))),
            _ => Ok(None),
        }
    }

    /// The personal model's stored parts (JSON record, private safetensors, datastore).
    pub fn personal(&self) -> Result<Option<StoredPersonal>> {
        match (self.params.get("personal.record")?, self.params.get("personal.params")?) {
            (Some(r), Some(p)) => {
                Ok(Some(StoredPersonal { record: r.to_vec(), params: p.to_vec(), datastore: self.params.get("personal.datastore")?.map(|d| d.to_vec()) }))
            }
            _ => Ok(None),
        }
    }
}

/// A personal model as stored (decoded by `personal.rs`).
#[derive(Clone, Debug, PartialEq)]
pub struct StoredPersonal {
    pub record: Vec<u8>,
    pub params: Vec<u8>,
    pub datastore: Option<Vec<u8>>,
}

/// sled's file lock outlives a dropped handle for a moment (its flusher thread lets go
/// asynchronously), so opening the store right after another command, in this process or one
/// that just exited, can find it held: retry for a few seconds before reporting it.
/// The store holds the device's identity key: it is made mode 0700, and one that group or
/// others may enter is refused (`chmod 700` it).
fn private_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        match std::fs::metadata(dir) {
            Ok(m) => {
                let mode = m.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(ClientError::Invalid(format!(
                        "the device store {} holds the identity key but is open to group or others (mode {mode:o}): `chmod 700` it",
                        dir.display()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new().mode(0o700).create(dir).map_err(crate::error::io(dir))?;
            }
            Err(e) => return Err(crate::error::io(dir)(e)),
        }
    }
    let _ = dir;
    Ok(())
}

fn open_db(path: &Path) -> Result<sled::Db> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::open(path) {
            Err(sled::Error::Io(e)) if e.to_string().contains("acquire lock") => {
                if std::time::Instant::now() >= deadline {
                    return Err(ClientError::Invalid(format!(
                        "the device store {} is in use by another spa-client process (the `run` agent while it trains or evaluates?); try again",
                        path.display()
                    )));
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return Ok(other?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The store holding the identity key is private to its owner, and one that others may
    /// enter is refused rather than used.
    #[cfg(unix)]
    #[test]
    fn the_store_is_private_and_an_open_one_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let home = tempfile::tempdir().unwrap();
        drop(ClientStore::open(home.path()).unwrap());
        let dir = home.path().join("store");
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = ClientStore::open(home.path()).err().expect("must refuse").to_string();
        assert!(err.contains("chmod 700"), "{err}");
    }

    /// A plugin adopted before any local training has no loss; its record reads back, and
    /// so does one written before the field was optional.
    #[test]
    fn metadata_without_a_loss_reads_back() {
        let home = tempfile::tempdir().unwrap();
        let store = ClientStore::open(home.path()).unwrap();
        let meta = TrainedMeta {
            format: 2,
            backbone_version: "b".into(),
            side: Default::default(),
            trained_at_ms: 1,
            examples: 0,
            steps: 0,
            final_loss: None,
            shared_tensors: 1,
            private_tensors: 1,
        };
        store.save_model(b"s", &meta, None).unwrap();
        assert_eq!(store.body().unwrap().unwrap().1, meta);
        let old = serde_json::to_string(&meta).unwrap().replace("\"final_loss\":null", "\"final_loss\":0.5").replace("\"format\":2,", "");
        let old: TrainedMeta = serde_json::from_str(&old).unwrap();
        assert_eq!((old.final_loss, old.format), (Some(0.5), 0), "SPA v1's records read back as format 0");
    }

    /// A sealed identity key is not in the store's files; it opens with the passphrase only.
    #[test]
    fn a_sealed_identity_key_is_not_kept_in_clear() {
        let home = tempfile::tempdir().unwrap();
        let store = ClientStore::open(home.path()).unwrap();
        let pkcs8 = spa_proto::auth::generate_pkcs8().unwrap();
        let id = Identity {
            device_id: "dev-1".into(),
            name: "n".into(),
            coordinator: "https://x".into(),
            ca_pem: String::new(),
            enrolled_at_ms: 0,
            backbone_version: String::new(),
        };
        store.set_identity(&pkcs8, &id, Some(b"pass")).unwrap();
        assert!(store.key_sealed().unwrap());
        assert_eq!(store.require_identity(Some(b"pass")).unwrap().0, pkcs8);
        assert!(store.require_identity(None).unwrap_err().to_string().contains("sealed"));
        assert!(store.require_identity(Some(b"other")).is_err());
        drop(store);
        let mut on_disk = Vec::new();
        for e in walk(&home.path().join("store")) {
            on_disk.extend(std::fs::read(e).unwrap());
        }
        assert!(!on_disk.windows(32).any(|w| w == &pkcs8[pkcs8.len() - 32..]), "the key's bytes are on disk");
    }

    fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
        }
        out
    }
}
