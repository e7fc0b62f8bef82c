//! A throwaway PostgreSQL cluster for tests, started by the project's `scripts/postgres.sh`
//! in a temporary directory (Unix socket only, no TCP port) and stopped when dropped.
use std::path::Path;
use std::process::Command;
use std::sync::Once;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/postgres.sh");

pub struct Cluster {
    dir: tempfile::TempDir,
    /// Its libpq connection string.
    pub conninfo: String,
}

impl Cluster {
    /// A new cluster, running. PostgreSQL is installed first if missing (Debian's package, as
    /// root: `scripts/postgres.sh install`, once per test process); the test fails where it
    /// cannot be.
    pub fn start() -> Self {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            script("install", Path::new("."));
        });
        let dir = tempfile::tempdir().unwrap();
        let conninfo = script("start", dir.path());
        Self { conninfo, dir }
    }

    /// Stops the server; its data stay for [`Cluster::resume`].
    pub fn stop(&self) {
        script("stop", self.dir.path());
    }

    pub fn resume(&self) {
        script("start", self.dir.path());
    }
}

fn script(verb: &str, dir: &Path) -> String {
    let out = Command::new(SCRIPT).arg(verb).arg(dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "scripts/postgres.sh {verb} failed (is PostgreSQL installed? `scripts/postgres.sh install`): {err}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(SCRIPT).arg("stop").arg(self.dir.path()).output();
    }
}
