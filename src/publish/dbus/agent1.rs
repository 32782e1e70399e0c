//! `/org/outlive/Agent1`, interface `org.outlive.Agent1` (SPEC X-1): the host's identity and
//! facts, the status line, and `Degraded`.
//!
//! The object reads a shared snapshot (`&self` only); the agent changes the snapshot and then
//! asks [`super::Bus::sync`] to emit PropertiesChanged for what changed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use zbus::message::Header;
use zbus::wire::OwnedVariant;
use zbus::{Connection, interface};

use super::auth::AuthPolicy;
use super::errors::OutliveError;
use super::gate::{Gate, Kind, blocking};
use super::variant::to_dict;
use crate::facts::users;
use crate::facts::{self, ClassifyError, Facts, Identity};
use crate::sync::RwLockExt;

/// Most bytes in a path argument (X-1 input limits).
pub(crate) const MAX_PATH: usize = 4096;

/// What the agent's main object shows.
pub struct HostState {
    pub facts: Facts,
    /// Our start time (for the lock record).
    pub pid_start: u64,
    pub identity: RwLock<Identity>,
    pub status_text: RwLock<String>,
    pub degraded: AtomicBool,
    pub auth: AuthPolicy,
}

impl HostState {
    /// New state for `identity`.
    pub fn new(facts: Facts, identity: Identity, auth: AuthPolicy) -> HostState {
        HostState {
            facts,
            pid_start: crate::facts::process::own_start_time().unwrap_or(0),
            identity: RwLock::new(identity),
            status_text: RwLock::new(String::new()),
            degraded: AtomicBool::new(false),
            auth,
        }
    }

    /// The current identity.
    pub fn identity(&self) -> Identity {
        self.identity.reading().clone()
    }

    /// Refresh the hostname (a rename must be seen); true when it changed.
    pub fn refresh_hostname(&self) -> bool {
        let now = facts::identity::hostname();
        let mut id = self.identity.writing();
        if id.hostname != now {
            id.hostname = now;
            true
        } else {
            false
        }
    }

    /// Who we are, for the lock (L-1).
    pub fn ours(&self) -> crate::queue::lock::Ours {
        let id = self.identity();
        crate::queue::lock::Ours {
            host_id: id.host_id,
            hostname: id.hostname,
            boot_id: id.boot_id,
            pid: std::process::id() as i64,
            pid_start: self.pid_start,
            pid_ns: id.pid_ns,
        }
    }

    /// What the lock decision needs of this host now (L-3).
    pub fn lock_env(&self) -> crate::queue::LockEnv {
        crate::queue::LockEnv {
            ours: self.ours(),
            facts: self.facts.clone(),
            prober: Arc::new(crate::facts::process::KernelProber),
        }
    }

    /// Set the status text (the same line as `STATUS=`).
    pub fn set_status_text(&self, s: &str) {
        *self.status_text.writing() = s.to_string();
    }

    /// The properties that may change, for change detection.
    pub fn props(&self) -> Agent1Props {
        Agent1Props {
            hostname: self.identity.reading().hostname.clone(),
            status_text: self.status_text.reading().clone(),
            degraded: self.degraded.load(Ordering::Relaxed),
        }
    }
}

/// The changeable properties of `org.outlive.Agent1`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Agent1Props {
    pub hostname: String,
    pub status_text: String,
    pub degraded: bool,
}

/// The interface object (a handle; cheap to clone for each connection).
#[derive(Clone)]
pub struct Agent1 {
    pub state: Arc<HostState>,
    pub queue: super::SharedQueue,
    pub publisher: Arc<super::Publisher>,
    pub gate: Arc<Gate>,
}

/// Validate a path argument (X-1 input limits).
pub(crate) fn check_path(field: &str, p: &str) -> Result<PathBuf, OutliveError> {
    if p.is_empty() {
        return Err(OutliveError::invalid(field, "empty path"));
    }
    if p.len() > MAX_PATH {
        return Err(OutliveError::invalid(
            field,
            format!("longer than {MAX_PATH} bytes"),
        ));
    }
    if p.contains('\0') {
        return Err(OutliveError::invalid(field, "contains NUL"));
    }
    if !p.starts_with('/') {
        return Err(OutliveError::invalid(
            field,
            format!("{p:?} is not absolute"),
        ));
    }
    Ok(PathBuf::from(p))
}

fn classify_error(e: ClassifyError) -> OutliveError {
    match e {
        ClassifyError::NotAbsolute(p) => {
            OutliveError::invalid("path", format!("{} is not absolute", p.display()))
        }
        ClassifyError::NotFound(p) => {
            OutliveError::NotFound(format!("{}: no such file or directory", p.display()))
        }
        ClassifyError::Io(p, e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            OutliveError::AccessDenied(format!("{}: {e}", p.display()))
        }
        ClassifyError::Io(p, e) => OutliveError::invalid("path", format!("{}: {e}", p.display())),
        ClassifyError::MountTable(e) => {
            OutliveError::Busy(format!("cannot read the mount table: {e}"))
        }
    }
}

#[interface(name = "org.outlive.Agent1")]
impl Agent1 {
    /// The agent's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    /// H-1 `host_id` (never the raw machine id).
    #[zbus(property(emits_changed_signal = "const"))]
    fn host_id(&self) -> String {
        self.state.identity().host_id.to_hex()
    }

    /// The current hostname (display only).
    #[zbus(property)]
    fn hostname(&self) -> String {
        self.state.props().hostname
    }

    /// This boot's id.
    #[zbus(property(emits_changed_signal = "const"))]
    fn boot_id(&self) -> String {
        self.state.identity().boot_id.to_hex()
    }

    /// The status line (as sent with `STATUS=`).
    #[zbus(property)]
    fn status_text(&self) -> String {
        self.state.props().status_text
    }

    /// True iff the attention item is open (SPEC G-9).
    #[zbus(property)]
    fn degraded(&self) -> bool {
        self.state.degraded.load(Ordering::Relaxed)
    }

    /// Host facts (H-1, H-5) as a dictionary.
    #[zbus(out_args("facts"))]
    async fn get_host_facts(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<HashMap<String, OwnedVariant>, OutliveError> {
        let _pass = self.gate.enter(conn, &hdr, Kind::Read).await?;
        // The report reads /proc and /etc: on the blocking pool.
        let state = Arc::clone(&self.state);
        blocking(move || {
            state.refresh_hostname();
            to_dict(&facts::host_report(&state.identity()))
        })
        .await
    }

    /// Classify a path (H-3). Root (and a user agent's own uid) get the full classification;
    /// members get it as seen with their own credentials (SPEC §12: what they cannot reach is
    /// AccessDenied, whether it exists or not); everyone else the mount-table classification
    /// only (the path is not touched), rate-limited by the gate.
    #[zbus(out_args("classification"))]
    async fn classify_path(
        &self,
        path: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<HashMap<String, OwnedVariant>, OutliveError> {
        let p = check_path("path", &path)?;
        let caller = self.gate.enter(conn, &hdr, Kind::Read).await?.caller;
        let policy = self.gate.policy();
        let (admin, privileged) = (caller.may_administer(&policy), caller.may_mutate(&policy));
        let facts = self.state.facts.clone();
        let result = blocking(move || {
            if admin {
                facts.classify_path(&p)
            } else if privileged {
                // The member's login credentials, from the user database (NSS: here, on the
                // blocking pool).
                match users::account(caller.uid) {
                    users::Lookup::Found(a) => {
                        facts.classify_path_as(&p, &users::Creds::of(&a, a.gid))
                    }
                    _ => Err(ClassifyError::Io(
                        p.clone(),
                        std::io::Error::new(
                            std::io::ErrorKind::PermissionDenied,
                            format!(
                            "uid {} is not in the user database: its paths cannot be checked as it",
                            caller.uid
                            ),
                        ),
                    )),
                }
            } else {
                facts.classify_untouched(&p)
            }
        })
        .await?;
        Ok(to_dict(&result.map_err(classify_error)?.to_json()))
    }

    /// Re-run the lock decision (L-4) now, e.g. after `outlivectl lock clear` (root only; in
    /// user mode the agent's uid). Nothing happens while the lock is held.
    async fn reevaluate(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), OutliveError> {
        let pass = self.gate.enter(conn, &hdr, Kind::Mutate).await?;
        pass.caller
            .require_admin(&self.gate.policy(), "Reevaluate")?;
        // The lock decision reads and writes the state directory: on the blocking pool.
        let (state, queue) = (Arc::clone(&self.state), Arc::clone(&self.queue));
        blocking(move || queue.lock().evaluate_lock(&state.lock_env(), true)).await?;
        self.publisher.sync(conn).await;
        Ok(())
    }
}
