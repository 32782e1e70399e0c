//! Host facts (SPEC §1): who this host is and what kind of filesystem a path lives on, read
//! straight from the kernel. No program is ever spawned for any of it (no `df`, `findmnt`,
//! `mount`, `hostname`, `stat`).
//!
//! - `identity`: hostname, `host_id`, boot id, pid namespace, observing namespace (H-1, H-5);
//! - `process`: liveness and start time, the "same process" test (H-1, H-2);
//! - `mountinfo`: the mount table parser (H-3 step 1);
//! - `classify`: the classification tables and decision (H-3, H-4), pure;
//! - `probe`: the facts worker thread that runs canonicalisation and statfs under a timeout.

pub mod classify;
pub mod identity;
#[cfg(target_os = "macos")]
pub mod macos;
pub mod mountinfo;
pub mod probe;
pub mod process;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use classify::{Classification, FsClass, Rule};
pub use identity::{Id128, Identity, IdentityError};

use probe::{FactsWorker, Run};

/// Why a path could not be classified at all (as opposed to classified `unknown`).
#[derive(Debug)]
pub enum ClassifyError {
    /// The path is relative.
    NotAbsolute(PathBuf),
    /// The path does not exist.
    NotFound(PathBuf),
    /// Resolving the path failed (permission, loop, …).
    Io(PathBuf, std::io::Error),
    /// The mount table could not be read.
    MountTable(std::io::Error),
}

impl fmt::Display for ClassifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClassifyError::NotAbsolute(p) => {
                write!(f, "{}: the path must be absolute", p.display())
            }
            ClassifyError::NotFound(p) => write!(f, "{}: no such file or directory", p.display()),
            ClassifyError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            ClassifyError::MountTable(e) => write!(f, "cannot read /proc/self/mountinfo: {e}"),
        }
    }
}

impl std::error::Error for ClassifyError {}

/// The facts service of one process: a worker thread and the statfs timeout. Clones share
/// the worker and the timeout.
#[derive(Clone)]
pub struct Facts {
    worker: FactsWorker,
    timeout_ms: Arc<AtomicU64>,
}

impl Facts {
    /// `timeout` is `facts.statfs_timeout_ms` (SPEC §9).
    pub fn new(timeout: Duration) -> Facts {
        Facts {
            worker: FactsWorker::new(),
            timeout_ms: Arc::new(AtomicU64::new(timeout.as_millis() as u64)),
        }
    }

    /// Change the statfs timeout (start and configuration reload).
    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
    }

    /// The statfs timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    /// The worker (for tests and benchmarks).
    pub fn worker(&self) -> &FactsWorker {
        &self.worker
    }

    /// Classify an absolute path: resolve it (symlinks, `..`) on the worker, find its mount,
    /// classify (H-3). A path that does not resolve in time reads `unknown/timeout`.
    pub fn classify_path(&self, path: &Path) -> Result<Classification, ClassifyError> {
        if !path.is_absolute() {
            return Err(ClassifyError::NotAbsolute(path.to_path_buf()));
        }
        let canonical = match self.worker.canonicalize(path, self.timeout()) {
            Run::Done(Ok(p)) => p,
            Run::Done(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ClassifyError::NotFound(path.to_path_buf()));
            }
            Run::Done(Err(e)) => return Err(ClassifyError::Io(path.to_path_buf(), e)),
            Run::Timeout => {
                return Ok(Classification {
                    path: path.to_path_buf(),
                    class: FsClass::Unknown,
                    rule: Rule::Timeout,
                    evidence: Default::default(),
                    via: None,
                });
            }
        };
        self.classify_resolved(&canonical)
    }

    #[cfg(target_os = "linux")]
    fn classify_resolved(&self, canonical: &Path) -> Result<Classification, ClassifyError> {
        let table = mountinfo::MountTable::read_own().map_err(ClassifyError::MountTable)?;
        Ok(classify::classify(
            &table,
            canonical,
            &self.worker.probe(self.timeout()),
        ))
    }

    #[cfg(target_os = "macos")]
    fn classify_resolved(&self, canonical: &Path) -> Result<Classification, ClassifyError> {
        let p = canonical.to_path_buf();
        match self
            .worker
            .run(None, self.timeout, move || macos::statfs(&p))
        {
            Run::Done(Ok(s)) => Ok(classify::classify_mnt_local(
                canonical,
                &s.fstypename,
                s.mnt_local,
                s.read_only,
                &s.mount_point,
                &s.source,
            )),
            Run::Done(Err(e)) => Err(ClassifyError::Io(canonical.to_path_buf(), e)),
            Run::Timeout => Ok(Classification {
                path: canonical.to_path_buf(),
                class: FsClass::Unknown,
                rule: Rule::Timeout,
                evidence: Default::default(),
                via: None,
            }),
        }
    }

    /// Classify without touching the path: lexical normalisation and the mount table only
    /// (unprivileged `ClassifyPath`, SPEC X-1). Never resolves symlinks, never calls statfs.
    #[cfg(target_os = "linux")]
    pub fn classify_untouched(&self, path: &Path) -> Result<Classification, ClassifyError> {
        if !path.is_absolute() {
            return Err(ClassifyError::NotAbsolute(path.to_path_buf()));
        }
        let table = mountinfo::MountTable::read_own().map_err(ClassifyError::MountTable)?;
        Ok(classify::classify(
            &table,
            &mountinfo::normalize_lexically(path),
            &classify::NoTouch,
        ))
    }

    /// macOS has no mount table file; statfs is the only source, so an unprivileged caller's
    /// path is not classified there.
    #[cfg(target_os = "macos")]
    pub fn classify_untouched(&self, path: &Path) -> Result<Classification, ClassifyError> {
        Ok(Classification {
            path: path.to_path_buf(),
            class: FsClass::Unknown,
            rule: Rule::MountTableOnly,
            evidence: Default::default(),
            via: None,
        })
    }
}

/// The host part of `outlivectl host --json` and `GetHostFacts` (never the raw machine id).
pub fn host_report(id: &Identity) -> serde_json::Value {
    let (differs, detail) = match &id.observing_namespace_differs {
        Ok(b) => (serde_json::Value::Bool(*b), None),
        Err(e) => (serde_json::Value::Null, Some(e.clone())),
    };
    let mut v = serde_json::json!({
        "hostname": id.hostname,
        "host_id": id.host_id.to_hex(),
        "boot_id": id.boot_id.to_hex(),
        "pid_ns": id.pid_ns,
        "observing_namespace_differs": differs,
        "agent_version": env!("CARGO_PKG_VERSION"),
    });
    if let Some(d) = detail {
        v["observing_namespace_detail"] = d.into();
    }
    v
}
