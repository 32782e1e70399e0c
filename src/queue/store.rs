//! The durable state file (SPEC Q-14, Q-15): `resume-queue.json` in the state directory.
//!
//! Every save writes a temporary file in the same directory, fsyncs it, renames it over the
//! state file and fsyncs the directory, so a crash at any moment leaves either the old state or
//! the new one, never a mixture. Files are 0600 in a 0700 directory. A file that does not parse
//! or has an unknown version is copied to `resume-queue.corrupt-<ms>.json` beside it and the
//! queue starts empty, loudly; if the copy fails, the file is left in place and the caller
//! disables the queue.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::entry::Entry;
use super::rules::{Ledger, Pause};

/// The state file's name.
pub const STATE_FILE: &str = "resume-queue.json";
/// The state format version.
pub const STATE_VERSION: u32 = 1;

/// A durable per-run operator stop (Q-9).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStop {
    pub run_id: String,
    pub at: u64,
}

/// Everything the queue persists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// Wall ms of the save (a restart advances waiting time by the wall delta since, clamped ≥ 0).
    #[serde(default)]
    pub saved_at: u64,
    #[serde(default)]
    pub last_id_ms: u64,
    #[serde(default)]
    pub id_seq: u64,
    #[serde(default)]
    pub entries: Vec<Entry>,
    #[serde(default)]
    pub ledger: Ledger,
    #[serde(default)]
    pub stops: Vec<RunStop>,
    /// Wall ms of the last global stop (`StopAll`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_stop: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<Pause>,
    /// Wall ms since the queue first ran in dry run (G-7 soak); None when not in dry run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run_since: Option<u64>,
}

impl State {
    /// An empty state.
    pub fn empty() -> State {
        State {
            version: STATE_VERSION,
            ..State::default()
        }
    }
}

/// What loading found.
#[derive(Debug)]
pub enum Loaded {
    /// No state file yet.
    Fresh,
    /// The state.
    State(Box<State>),
    /// Corrupt: copied to `sidecar`; start empty.
    Corrupt { why: String, sidecar: PathBuf },
    /// Corrupt and the copy failed: the file is left in place.
    CorruptUncopied { why: String, error: String },
    /// The file exists but cannot be read (permissions, I/O).
    Unreadable(String),
}

/// Parse a state file's bytes (Q-15: unknown versions are corrupt).
pub fn parse(bytes: &[u8]) -> Result<State, String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    match v.get("version").and_then(|x| x.as_u64()) {
        Some(n) if n == STATE_VERSION as u64 => {}
        Some(n) => return Err(format!("unknown version {n}")),
        None => return Err("no version".into()),
    }
    serde_json::from_value(v).map_err(|e| format!("malformed: {e}"))
}

/// Load the state from `dir` (Q-15).
pub fn load(dir: &Path, now_ms: u64) -> Loaded {
    let path = dir.join(STATE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Loaded::Fresh,
        Err(e) => return Loaded::Unreadable(format!("{}: {e}", path.display())),
    };
    match parse(&bytes) {
        Ok(s) => Loaded::State(Box::new(s)),
        Err(why) => {
            let sidecar = dir.join(format!("resume-queue.corrupt-{now_ms}.json"));
            match copy_durably(&bytes, &sidecar, dir) {
                Ok(()) => Loaded::Corrupt { why, sidecar },
                Err(e) => Loaded::CorruptUncopied {
                    why,
                    error: format!("{}: {e}", sidecar.display()),
                },
            }
        }
    }
}

fn copy_durably(bytes: &[u8], to: &Path, dir: &Path) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    File::open(dir)?.sync_all()
}

/// Save atomically and durably (Q-14). The state is acknowledged only after this returns Ok.
pub fn save(dir: &Path, state: &State) -> io::Result<()> {
    #[cfg(feature = "fault-hooks")]
    if crate::faults::persist_fails() {
        return Err(io::Error::other("fault hook: persist fails"));
    }
    let bytes = serde_json::to_vec(state).map_err(io::Error::other)?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(STATE_FILE))?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn q14_save_then_load_round_trips_with_mode_0600() {
        let d = tempfile::tempdir().unwrap();
        let mut s = State::empty();
        s.last_id_ms = 42;
        s.stops.push(RunStop {
            run_id: "r".into(),
            at: 1,
        });
        save(d.path(), &s).unwrap();
        let meta = std::fs::metadata(d.path().join(STATE_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        match load(d.path(), 0) {
            Loaded::State(l) => assert_eq!(*l, s),
            other => panic!("{other:?}"),
        }
        assert!(
            !d.path().join(format!("{STATE_FILE}.tmp")).exists(),
            "no temp file left"
        );
    }

    #[test]
    fn q15_corrupt_or_unknown_version_goes_to_a_sidecar() {
        for bad in [
            &b"{not json"[..],
            br#"{"version": 9}"#,
            br#"{"entries": []}"#,
            br#"{"version":1,"entries":[{"id":1}]}"#,
        ] {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join(STATE_FILE), bad).unwrap();
            match load(d.path(), 1234) {
                Loaded::Corrupt { sidecar, .. } => {
                    assert_eq!(sidecar, d.path().join("resume-queue.corrupt-1234.json"));
                    assert_eq!(
                        std::fs::read(&sidecar).unwrap(),
                        bad,
                        "the sidecar is an exact copy"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn q15_failed_copy_leaves_the_file_in_place() {
        if !nix::unistd::geteuid().is_root() {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join(STATE_FILE), b"garbage").unwrap();
            std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o500)).unwrap();
            assert!(matches!(load(d.path(), 1), Loaded::CorruptUncopied { .. }));
            std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
            assert_eq!(
                std::fs::read(d.path().join(STATE_FILE)).unwrap(),
                b"garbage"
            );
        }
        // As root the directory mode does not stop the copy; an existing sidecar of the same
        // name does (create_new).
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(STATE_FILE), b"garbage").unwrap();
        std::fs::create_dir(d.path().join("resume-queue.corrupt-7.json")).unwrap();
        assert!(matches!(load(d.path(), 7), Loaded::CorruptUncopied { .. }));
        assert_eq!(
            std::fs::read(d.path().join(STATE_FILE)).unwrap(),
            b"garbage"
        );
    }

    #[test]
    fn q14_a_failed_save_keeps_the_previous_file() {
        let d = tempfile::tempdir().unwrap();
        let s = State::empty();
        save(d.path(), &s).unwrap();
        let before = std::fs::read(d.path().join(STATE_FILE)).unwrap();
        // Make the temp name unusable: a directory stands where the temp file would go.
        std::fs::create_dir(d.path().join(format!("{STATE_FILE}.tmp"))).unwrap();
        let mut s2 = State::empty();
        s2.last_id_ms = 99;
        assert!(save(d.path(), &s2).is_err());
        assert_eq!(std::fs::read(d.path().join(STATE_FILE)).unwrap(), before);
    }
}
