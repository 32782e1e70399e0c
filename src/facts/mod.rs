//! Host facts (SPEC §1): who this host is and what kind of filesystem a path lives on, read
//! straight from the kernel. No program is ever spawned for any of it (no `df`, `findmnt`,
//! `mount`, `hostname`, `stat`).
//!
//! - `identity`: hostname, `host_id`, boot id, pid namespace, observing namespace (H-1, H-5);
//! - `process`: liveness and start time, the "same process" test (H-1, H-2);
//! - `mountinfo`: the mount table parser (H-3 step 1);
//! - `classify`: the classification tables and decision (H-3, H-4), pure;
//! - `probe`: the facts worker thread that runs canonicalisation and statfs under a timeout;
//! - `users`: the user database, and filesystem checks made with a user's credentials.

pub mod classify;
pub mod identity;
#[cfg(target_os = "macos")]
pub(crate) mod macos;
pub mod mountinfo;
pub(crate) mod probe;
pub mod process;
pub(crate) mod users;

use crate::sync::MutexExt;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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

/// The facts service of one process: the worker thread, the mount table cache and the statfs
/// timeout. Clones share all three.
#[derive(Clone)]
pub struct Facts {
    worker: FactsWorker,
    /// `facts.statfs_timeout_ms`, as applied when a probe starts.
    timeout: Arc<dyn Fn() -> Duration + Send + Sync>,
    #[cfg(target_os = "linux")]
    table: Arc<std::sync::Mutex<mountinfo::MountTableCache>>,
}

impl Facts {
    /// `timeout` is `facts.statfs_timeout_ms` (SPEC §9).
    pub fn new(timeout: Duration) -> Facts {
        Facts::following(move || timeout)
    }

    /// Facts whose statfs timeout is read from `timeout` when each probe starts (the agent:
    /// the applied configuration, so that a reload applies from the next probe).
    pub fn following(timeout: impl Fn() -> Duration + Send + Sync + 'static) -> Facts {
        Facts {
            worker: FactsWorker::new(),
            timeout: Arc::new(timeout),
            #[cfg(target_os = "linux")]
            table: Arc::new(std::sync::Mutex::new(mountinfo::MountTableCache::new())),
        }
    }

    /// The statfs timeout.
    pub fn timeout(&self) -> Duration {
        (self.timeout)()
    }

    /// The worker (for tests and benchmarks).
    pub fn worker(&self) -> &FactsWorker {
        &self.worker
    }

    fn timed_out(path: &Path) -> Classification {
        Classification {
            path: path.to_path_buf(),
            class: FsClass::Unknown,
            rule: Rule::Timeout,
            evidence: Default::default(),
            via: None,
        }
    }

    /// The current mount table (re-read only after a change).
    #[cfg(target_os = "linux")]
    pub fn mount_table(&self) -> Result<Arc<mountinfo::MountTable>, ClassifyError> {
        self.table
            .locked()
            .current()
            .map_err(ClassifyError::MountTable)
    }

    /// Classify an absolute path (H-3): on the worker, in one job, resolve it (symlinks, `..`),
    /// find its mount, decide, and statfs where the table allows it. A path that does not
    /// resolve in time, or lies on a mount that timed out in the last 60 s, reads
    /// `unknown/timeout`.
    pub fn classify_path(&self, path: &Path) -> Result<Classification, ClassifyError> {
        self.classify_with(path, None)
    }

    /// [`Facts::classify_path`] with `creds`' filesystem credentials (SPEC §12: a member's
    /// `ClassifyPath`): what they cannot reach is an error (`PermissionDenied`), whether it
    /// exists or not, so the answer tells them nothing they could not find out themselves.
    pub fn classify_path_as(
        &self,
        path: &Path,
        creds: &users::Creds,
    ) -> Result<Classification, ClassifyError> {
        self.classify_with(path, Some(creds.clone()))
    }

    fn classify_with(
        &self,
        path: &Path,
        creds: Option<users::Creds>,
    ) -> Result<Classification, ClassifyError> {
        if !path.is_absolute() {
            return Err(ClassifyError::NotAbsolute(path.to_path_buf()));
        }
        let facts = self.clone();
        let p = path.to_path_buf();
        let job = move || match &creds {
            None => facts.classify_on_worker(&p),
            Some(c) => users::as_user(c, || facts.classify_on_worker(&p))
                .unwrap_or_else(|e| Err(ClassifyError::Io(p.clone(), e))),
        };
        match self.worker.run(self.timeout(), job) {
            Run::Done(r) => r,
            Run::Timeout => Ok(Facts::timed_out(path)),
        }
    }

    #[cfg(target_os = "linux")]
    fn classify_on_worker(&self, path: &Path) -> Result<Classification, ClassifyError> {
        let table = self.mount_table()?;
        // Resolving the path touches its filesystem: a hang here is charged to the mount the
        // path lexically lives on, and a mount that recently hung is not touched again.
        if let Some(m) = table.find(&mountinfo::normalize_lexically(path)) {
            let key = (m.mount_id, m.mount_point.clone());
            if self.worker.recently_timed_out(&key) {
                return Ok(Facts::timed_out(path));
            }
        }
        let canonical = match std::fs::canonicalize(path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ClassifyError::NotFound(path.to_path_buf()));
            }
            Err(e) => return Err(ClassifyError::Io(path.to_path_buf(), e)),
        };
        Ok(classify::classify(
            &table,
            &canonical,
            &self.worker.inline_probe(),
        ))
    }

    /// macOS: statfs `MNT_LOCAL` (H-3), a job on the worker.
    #[cfg(target_os = "macos")]
    fn classify_on_worker(&self, p: &Path) -> Result<Classification, ClassifyError> {
        let canonical = std::fs::canonicalize(p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ClassifyError::NotFound(p.to_path_buf()),
            _ => ClassifyError::Io(p.to_path_buf(), e),
        })?;
        let s = macos::statfs(&canonical).map_err(|e| ClassifyError::Io(canonical.clone(), e))?;
        Ok(classify::classify_mnt_local(
            &canonical,
            &s.fstypename,
            s.mnt_local,
            s.read_only,
            &s.mount_point,
            &s.source,
        ))
    }

    /// Classify without touching the path: lexical normalisation and the mount table only
    /// (unprivileged `ClassifyPath`, SPEC X-1). Never resolves symlinks, never calls statfs.
    #[cfg(target_os = "linux")]
    pub fn classify_untouched(&self, path: &Path) -> Result<Classification, ClassifyError> {
        if !path.is_absolute() {
            return Err(ClassifyError::NotAbsolute(path.to_path_buf()));
        }
        let table = self.mount_table()?;
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

impl Facts {
    /// H-5 applied to a path the agent cannot find: why it may exist where the agent's mount
    /// namespace does not show it, or None when it is plainly missing. Looked at: PID 1's view
    /// (`/proc/1/root`, when the agent may read it), else whether the path lies under a tree
    /// that systemd's sandboxing replaced for the agent (an inaccessible or private mount).
    #[cfg(target_os = "linux")]
    pub fn hidden_from_agent(&self, path: &Path) -> Option<String> {
        if matches!(identity::observing_namespace_differs(), Ok(false)) {
            return None;
        }
        let p1 = Path::new("/proc/1/root").join(path.strip_prefix("/").unwrap_or(path));
        match self
            .worker
            .run(self.timeout(), move || std::fs::symlink_metadata(&p1))
        {
            Run::Done(Ok(_)) => {
                return Some(format!(
                    "{} exists in PID 1's mount namespace but not in outlived's (H-5)",
                    path.display()
                ));
            }
            Run::Done(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return None,
            _ => {}
        }
        let table = self.mount_table().ok()?;
        let m = table.find(&mountinfo::normalize_lexically(path))?;
        let root = m.root.to_string_lossy();
        (root.contains("/systemd/inaccessible") || root.contains("/systemd-private-")).then(|| {
            format!(
                "{} is under {}, which outlived's sandbox hides or replaces (H-5)",
                path.display(),
                m.mount_point.display()
            )
        })
    }

    /// macOS has no mount namespaces: a missing path is missing.
    #[cfg(not(target_os = "linux"))]
    pub fn hidden_from_agent(&self, _path: &Path) -> Option<String> {
        None
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
