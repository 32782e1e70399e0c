//! The service manager the drainer revives through (SPEC D-9): systemd over D-Bus
//! (`org.freedesktop.systemd1`), the system manager or, with `--user`, the user's. Every call is
//! bounded by a timeout; a manager that does not answer is [`Undecided`], never a failure (an
//! entry is not dropped because systemd was slow).
//!
//! The connection is never lost silently (§12 D-6): it is made when first needed and rebuilt,
//! with backoff (1 s doubling to 30 s), after any I/O or disconnect error (a restart of the
//! system bus closes it). While it is down every call is undecided, so entries stay queued
//! and in-flight attempts wait for their verification; [`Systemd::down_for_ms`] tells the
//! posture how long, and past max(2 × `drainer.interval_sec`, 30 s) `queue.resume` reads
//! `off-runtime-divergent` (`manager-unreachable`).
//!
//! The success test of D-9 is the pure [`attempt_verdict`] over a unit's state.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;

use std::sync::Arc;

use zbus::Connection;

use crate::sync::MutexExt;
use zbus::wire::{OwnedObjectPath, OwnedVariant, Variant};

/// How long one call to the service manager may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The manager did not answer (timeout, bus error): decide later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecided(pub String);

/// Why a start failed (a failed attempt, D-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartError {
    /// The manager refused (`UnitExists`, `NoSuchUnit`, a bad setting, …).
    Refused(String),
    /// No answer: the attempt's outcome is decided by verification.
    Undecided(String),
}

/// What the success test needs of a unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitState {
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    /// `Result` of a service (`success`, `exit-code`, …).
    pub result: String,
    pub main_pid: u32,
    /// `ExecMainStartTimestamp`, µs since the epoch (0: never started).
    pub exec_main_start_us: u64,
    /// `ExecMainCode` (1 exited, 2 killed, 3 dumped; 0 never ran) and `ExecMainStatus`.
    pub exec_main_code: i32,
    pub exec_main_status: i32,
}

/// D-9's verdict on an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Running: activating, reloading, or active with a running main process.
    Alive,
    /// Completed successfully since the attempt began.
    Completed,
    /// Anything else, with why.
    Failed(String),
}

/// Slack for comparing the manager's start timestamp with ours (same kernel clock; this only
/// absorbs rounding).
const START_SLACK_US: u64 = 2_000_000;

/// D-9: success if the unit is alive (`activating`, `reloading`, or `active` with a running main
/// process) or completed (`active`/`exited`, or `inactive` with `Result=success`) after the
/// attempt began at `attempt_wall_ms`.
pub fn attempt_verdict(st: &UnitState, attempt_wall_ms: u64) -> Verdict {
    let started_since =
        st.exec_main_start_us + START_SLACK_US >= attempt_wall_ms.saturating_mul(1000);
    match st.active_state.as_str() {
        "activating" | "reloading" => Verdict::Alive,
        "active" if st.sub_state == "exited" => {
            if started_since {
                Verdict::Completed
            } else {
                Verdict::Failed("active (exited) from before the attempt".into())
            }
        }
        "active" if st.main_pid != 0 => Verdict::Alive,
        "active" => {
            // Active without a main process: a target, a socket-activated service, a oneshot
            // with RemainAfterExit. It is up.
            Verdict::Alive
        }
        "inactive" if st.result == "success" && st.exec_main_start_us > 0 && started_since => {
            Verdict::Completed
        }
        "inactive" if st.result == "success" => {
            Verdict::Failed("inactive and not started since the attempt".into())
        }
        other => Verdict::Failed(format!(
            "{other}{}{}",
            if st.sub_state.is_empty() {
                String::new()
            } else {
                format!(" ({})", st.sub_state)
            },
            if st.result.is_empty() || st.result == "success" {
                String::new()
            } else {
                format!(", result {}", st.result)
            }
        )),
    }
}

/// D-9 for a watched run (C-6): a run that ended within its grace counts as completed only if
/// it exited 0; killed by a signal (an external SIGTERM reads `Result=success`) or exiting with
/// any other status, the attempt failed.
pub fn watched_verdict(st: &UnitState, attempt_wall_ms: u64) -> Verdict {
    match attempt_verdict(st, attempt_wall_ms) {
        Verdict::Completed if !(st.exec_main_code == 1 && st.exec_main_status == 0) => {
            Verdict::Failed(format!(
                "the run ended within its grace ({} {})",
                match st.exec_main_code {
                    1 => "exited with status",
                    2 => "killed by signal",
                    3 => "dumped core on signal",
                    _ => "ended with code",
                },
                st.exec_main_status
            ))
        }
        v => v,
    }
}

/// A transient unit for an exec target (D-9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transient {
    pub name: String,
    pub description: String,
    pub argv: Vec<String>,
    pub cwd: String,
    /// None for a user manager (it runs everything as its user).
    pub user: Option<(u32, u32)>,
    pub env: BTreeMap<String, String>,
    /// `After=` (a watched run stops before the agent at shutdown, C-1, C-6).
    pub after: Vec<String>,
}

impl Transient {
    /// The unit's properties for `StartTransientUnit` (D-9, SPEC §12 Q-1): the run as its user
    /// and group, and never more privileged than they are (`NoNewPrivileges=`: no setuid or
    /// file-capability gain at exec; `RestrictSUIDSGID=`: it cannot leave a setuid or setgid
    /// file behind).
    pub fn properties(&self) -> Vec<(&'static str, Variant<'static>)> {
        // ExecStartEx with `no-env-expand`: the argv is run as given. Plain ExecStart would
        // let the manager expand `$NAME` and `$$` inside it (`sh -c 'kill $$'` would break).
        let exec: Vec<(String, Vec<String>, Vec<String>)> = vec![(
            self.argv[0].clone(),
            self.argv.clone(),
            vec!["no-env-expand".to_string()],
        )];
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut props: Vec<(&str, Variant<'_>)> = vec![
            ("Description", Variant::from(self.description.clone())),
            ("Type", Variant::from("exec")),
            ("RemainAfterExit", Variant::from(true)),
            ("ExecStartEx", Variant::from(exec)),
            ("WorkingDirectory", Variant::from(self.cwd.clone())),
            ("Environment", Variant::from(env)),
            ("NoNewPrivileges", Variant::from(true)),
            ("RestrictSUIDSGID", Variant::from(true)),
        ];
        if !self.after.is_empty() {
            props.push(("After", Variant::from(self.after.clone())));
        }
        if let Some((uid, gid)) = self.user {
            props.push(("User", Variant::from(uid.to_string())));
            props.push(("Group", Variant::from(gid.to_string())));
        }
        props
    }
}

/// What the drainer asks of the service manager. Implemented by [`Systemd`] and by tests.
pub trait ServiceManager: Send + Sync {
    /// The unit's state; `None` when the manager has no such unit loaded.
    fn unit_state(
        &self,
        unit: &str,
    ) -> impl Future<Output = Result<Option<UnitState>, Undecided>> + Send;
    /// Load a unit and say whether it can be loaded (`LoadState`).
    fn load_state(&self, unit: &str) -> impl Future<Output = Result<String, Undecided>> + Send;
    /// `StartUnit(name, "replace")`.
    fn start_unit(&self, unit: &str) -> impl Future<Output = Result<(), StartError>> + Send;
    /// `StartTransientUnit` of a `Type=exec`, `RemainAfterExit=yes` service.
    fn start_transient(&self, t: &Transient)
    -> impl Future<Output = Result<(), StartError>> + Send;
    /// `StopUnit(name, "replace")`.
    fn stop_unit(&self, unit: &str) -> impl Future<Output = Result<(), Undecided>> + Send;
    /// `ResetFailedUnit(name)`.
    fn reset_failed(&self, unit: &str) -> impl Future<Output = Result<(), Undecided>> + Send;
    /// Units matching the glob `patterns` that are active, activating or reloading.
    fn alive_units(
        &self,
        patterns: &[String],
    ) -> impl Future<Output = Result<Vec<String>, Undecided>> + Send;
    /// Whom a service runs as (`User=`, `Group=`, `DynamicUser=`); None when it cannot be
    /// loaded.
    fn unit_user(
        &self,
        unit: &str,
    ) -> impl Future<Output = Result<Option<UnitUser>, Undecided>> + Send;
}

/// Whom a service unit runs as, as its manager reports it: names or numbers as written, empty
/// when not set (root under the system manager).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitUser {
    pub user: String,
    pub group: String,
    /// `DynamicUser=yes`: the uid exists only while the unit runs.
    pub dynamic: bool,
}

/// One row of `ListUnits`/`ListUnitsByPatterns`: name, description, load state, active state,
/// sub state, followed unit, object path, job id, job type, job path.
pub type UnitRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    OwnedObjectPath,
    u32,
    String,
    OwnedObjectPath,
);

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Systemd1Manager {
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Variant<'_>)],
        aux: &[(&str, &[(&str, Variant<'_>)])],
    ) -> zbus::Result<OwnedObjectPath>;
    fn list_units_by_patterns(
        &self,
        states: &[&str],
        patterns: &[&str],
    ) -> zbus::Result<Vec<UnitRow>>;
}

/// systemd over D-Bus. Cheap to clone: clones share one connection and its state.
#[derive(Clone)]
pub struct Systemd {
    link: Arc<std::sync::Mutex<Link>>,
    /// A user manager (no `User=`/`Group=` on transient units).
    pub user: bool,
    /// The drainer loop's heartbeat: every call ends (answered or timed out) within
    /// [`CALL_TIMEOUT`] and beats it, so a tick waiting on a slow manager is progress and a
    /// tick that hangs is not.
    beat: Option<Arc<dyn super::Heartbeat>>,
}

/// The connection to the manager and how it fares.
#[derive(Default)]
struct Link {
    conn: Option<Connection>,
    /// CLOCK_BOOTTIME ms before which no new connection is tried.
    next_try_ms: u64,
    backoff_ms: u64,
    /// Since when (CLOCK_BOOTTIME ms) no working connection exists; None while it works.
    down_since_ms: Option<u64>,
    last_error: String,
}

/// Reconnection backoff bounds.
const BACKOFF_MIN_MS: u64 = 1_000;
const BACKOFF_MAX_MS: u64 = 30_000;

impl Link {
    fn down(&mut self, now: u64, why: String) {
        self.conn = None;
        self.down_since_ms.get_or_insert(now);
        self.last_error = why;
    }
}

fn error_name(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, msg, _) => {
            format!("{name}: {}", msg.clone().unwrap_or_default())
        }
        zbus::Error::FDO(f) => f.to_string(),
        other => other.to_string(),
    }
}

/// Whether an error is the manager answering (a refusal) rather than the bus failing.
fn answered(e: &zbus::Error) -> bool {
    matches!(e, zbus::Error::MethodError(..))
        || matches!(e, zbus::Error::FDO(f) if !matches!(**f,
        zbus::fdo::Error::NoReply(_) | zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_)
        | zbus::fdo::Error::Disconnected(_) | zbus::fdo::Error::Timeout(_)))
}

impl Systemd {
    /// The system manager (or, `user`, the user's manager on the session bus). Nothing is
    /// connected yet: the first call connects.
    pub fn new(user: bool, beat: Option<Arc<dyn super::Heartbeat>>) -> Systemd {
        Systemd {
            link: Arc::default(),
            user,
            beat,
        }
    }

    fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.locked()
    }

    /// How long the manager has been unreachable (ms); None while it answers.
    pub fn down_for_ms(&self) -> Option<u64> {
        self.link()
            .down_since_ms
            .map(|t| crate::clock::boottime_ms().saturating_sub(t))
    }

    /// Why the last connection attempt or call failed (for messages).
    pub fn last_error(&self) -> String {
        self.link().last_error.clone()
    }

    /// The live connection, connecting (bounded, at most once per backoff) if there is none.
    async fn connection(&self) -> Result<Connection, Undecided> {
        let now = crate::clock::boottime_ms();
        {
            let mut l = self.link();
            match &l.conn {
                Some(c) if !c.is_closed() => return Ok(c.clone()),
                Some(_) => l.down(now, "the connection to the service manager closed".into()),
                None => {}
            }
            if now < l.next_try_ms {
                return Err(Undecided(format!(
                    "the service manager is unreachable ({}); next try in {} s",
                    l.last_error,
                    (l.next_try_ms - now).div_ceil(1000)
                )));
            }
        }
        let made = tokio::time::timeout(CALL_TIMEOUT, async {
            if self.user {
                Connection::session().await
            } else {
                Connection::system().await
            }
        })
        .await;
        if let Some(b) = &self.beat {
            b.beat();
        }
        let now = crate::clock::boottime_ms();
        let mut l = self.link();
        match made {
            Ok(Ok(c)) => {
                if let Some(since) = l.down_since_ms.take() {
                    tracing::info!(
                        "reconnected to the service manager after {} ms",
                        now.saturating_sub(since)
                    );
                }
                l.conn = Some(c.clone());
                l.backoff_ms = 0;
                l.next_try_ms = 0;
                l.last_error.clear();
                Ok(c)
            }
            Ok(Err(e)) => Err(self.retry_later(&mut l, now, e.to_string())),
            Err(_) => Err(self.retry_later(
                &mut l,
                now,
                format!("no connection within {} s", CALL_TIMEOUT.as_secs()),
            )),
        }
    }

    fn retry_later(&self, l: &mut Link, now: u64, why: String) -> Undecided {
        l.backoff_ms = (l.backoff_ms * 2).clamp(BACKOFF_MIN_MS, BACKOFF_MAX_MS);
        l.next_try_ms = now + l.backoff_ms;
        let msg = format!("cannot reach the service manager: {why}");
        if l.last_error != msg {
            tracing::warn!("{msg}; retrying in {} s", l.backoff_ms / 1000);
        }
        l.down(now, msg.clone());
        Undecided(msg)
    }

    /// How a call went, for the connection's state: an answer (even a refusal) means the
    /// manager is reachable; no answer starts (or continues) a gap. A connection that is
    /// gone (a bus restart, an I/O error) is dropped, so the next call rebuilds it; a slow
    /// manager keeps its connection.
    fn record<T>(&self, r: &Result<zbus::Result<T>, Undecided>) {
        let now = crate::clock::boottime_ms();
        let mut l = self.link();
        match r {
            Ok(Ok(_)) => l.down_since_ms = None,
            Ok(Err(e)) if answered(e) => l.down_since_ms = None,
            Ok(Err(e)) => {
                let closed = l.conn.as_ref().is_none_or(|c| c.is_closed());
                let io = matches!(e, zbus::Error::InputOutput(_))
                    || matches!(e, zbus::Error::FDO(f) if matches!(**f, zbus::fdo::Error::Disconnected(_)));
                if closed || io {
                    l.down(now, e.to_string());
                } else {
                    l.down_since_ms.get_or_insert(now);
                    l.last_error = e.to_string();
                }
            }
            Err(u) => {
                l.down_since_ms.get_or_insert(now);
                l.last_error = u.0.clone();
            }
        }
    }

    /// One call, bounded by [`CALL_TIMEOUT`]; the loop's heartbeat beats when it ends.
    async fn bounded<T>(
        &self,
        f: impl Future<Output = zbus::Result<T>>,
    ) -> Result<zbus::Result<T>, Undecided> {
        let r = tokio::time::timeout(CALL_TIMEOUT, f).await.map_err(|_| {
            Undecided(format!(
                "the service manager did not answer within {} s",
                CALL_TIMEOUT.as_secs()
            ))
        });
        if let Some(b) = &self.beat {
            b.beat();
        }
        self.record(&r);
        r
    }

    /// Ask the manager for a sign of life (`Peer.Ping`), connecting if needed: every tick does,
    /// so a lost connection is found and rebuilt even while the queue is idle.
    pub async fn ping(&self) -> Result<(), Undecided> {
        let conn = self.connection().await?;
        self.bounded(async {
            conn.call_method(
                Some("org.freedesktop.systemd1"),
                "/org/freedesktop/systemd1",
                Some("org.freedesktop.DBus.Peer"),
                "Ping",
                &(),
            )
            .await
            .map(|_| ())
        })
        .await?
        .map_err(|e| Undecided(format!("systemd Ping: {e}")))
    }

    /// Whether systemd runs as the service manager here (`/run/systemd/system`, sd_booted(3)).
    pub fn booted() -> bool {
        std::path::Path::new("/run/systemd/system").is_dir()
    }

    async fn manager(&self) -> Result<(Connection, Systemd1ManagerProxy<'static>), Undecided> {
        let conn = self.connection().await?;
        let proxy = Systemd1ManagerProxy::builder(&conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(|e| Undecided(format!("systemd: {e}")))?;
        Ok((conn, proxy))
    }

    /// All properties of one interface of a unit object (one call).
    async fn all(
        &self,
        conn: &Connection,
        path: &OwnedObjectPath,
        iface: &'static str,
    ) -> Result<HashMap<String, OwnedVariant>, Undecided> {
        let p = zbus::fdo::PropertiesProxy::builder(conn)
            .destination("org.freedesktop.systemd1")
            .path(path.as_ref())
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(|e| Undecided(format!("systemd: {e}")))?;
        let name = zbus::names::InterfaceName::from_static_str_unchecked(iface);
        self.bounded(async { p.get_all(name).await.map_err(zbus::Error::from) })
            .await?
            .map_err(|e| Undecided(format!("systemd GetAll {iface}: {e}")))
    }
}

fn get<T: TryFrom<OwnedVariant>>(props: &HashMap<String, OwnedVariant>, name: &str) -> Option<T> {
    props
        .get(name)
        .and_then(|v| v.try_clone().ok())
        .and_then(|v| T::try_from(v).ok())
}

impl ServiceManager for Systemd {
    async fn unit_state(&self, unit: &str) -> Result<Option<UnitState>, Undecided> {
        let (conn, m) = self.manager().await?;
        let path = match self.bounded(m.get_unit(unit)).await? {
            Ok(p) => p,
            Err(e) if answered(&e) => return Ok(None),
            Err(e) => return Err(Undecided(format!("systemd GetUnit {unit}: {e}"))),
        };
        let u = self
            .all(&conn, &path, "org.freedesktop.systemd1.Unit")
            .await?;
        let Some(active_state) = get::<String>(&u, "ActiveState") else {
            return Err(Undecided(format!(
                "systemd: cannot read the state of {unit}"
            )));
        };
        // Only services have a Result, a main process and ExecMainStartTimestamp.
        let s = if unit.ends_with(".service") {
            self.all(&conn, &path, "org.freedesktop.systemd1.Service")
                .await?
        } else {
            HashMap::new()
        };
        Ok(Some(UnitState {
            load_state: get(&u, "LoadState").unwrap_or_default(),
            active_state,
            sub_state: get(&u, "SubState").unwrap_or_default(),
            result: get(&s, "Result").unwrap_or_default(),
            main_pid: get(&s, "MainPID").unwrap_or(0),
            exec_main_start_us: get(&s, "ExecMainStartTimestamp").unwrap_or(0),
            exec_main_code: get(&s, "ExecMainCode").unwrap_or(0),
            exec_main_status: get(&s, "ExecMainStatus").unwrap_or(0),
        }))
    }

    async fn load_state(&self, unit: &str) -> Result<String, Undecided> {
        let (conn, m) = self.manager().await?;
        match self.bounded(m.load_unit(unit)).await? {
            Ok(path) => get(
                &self
                    .all(&conn, &path, "org.freedesktop.systemd1.Unit")
                    .await?,
                "LoadState",
            )
            .ok_or_else(|| Undecided(format!("systemd: cannot read LoadState of {unit}"))),
            Err(e) if answered(&e) => Ok(format!("error ({})", error_name(&e))),
            Err(e) => Err(Undecided(format!("systemd LoadUnit {unit}: {e}"))),
        }
    }

    async fn start_unit(&self, unit: &str) -> Result<(), StartError> {
        let (_conn, m) = self
            .manager()
            .await
            .map_err(|u| StartError::Undecided(u.0))?;
        match self
            .bounded(m.start_unit(unit, "replace"))
            .await
            .map_err(|u| StartError::Undecided(u.0))?
        {
            Ok(_) => Ok(()),
            Err(e) if answered(&e) => Err(StartError::Refused(error_name(&e))),
            Err(e) => Err(StartError::Undecided(e.to_string())),
        }
    }

    async fn start_transient(&self, t: &Transient) -> Result<(), StartError> {
        let (_conn, m) = self
            .manager()
            .await
            .map_err(|u| StartError::Undecided(u.0))?;
        let props = t.properties();
        match self
            .bounded(m.start_transient_unit(&t.name, "fail", &props, &[]))
            .await
            .map_err(|u| StartError::Undecided(u.0))?
        {
            Ok(_) => Ok(()),
            Err(e) if answered(&e) => Err(StartError::Refused(error_name(&e))),
            Err(e) => Err(StartError::Undecided(e.to_string())),
        }
    }

    async fn stop_unit(&self, unit: &str) -> Result<(), Undecided> {
        let (_conn, m) = self.manager().await?;
        match self.bounded(m.stop_unit(unit, "replace")).await? {
            Ok(_) => Ok(()),
            // Not loaded any more: nothing to stop.
            Err(e) if answered(&e) => Ok(()),
            Err(e) => Err(Undecided(e.to_string())),
        }
    }

    async fn reset_failed(&self, unit: &str) -> Result<(), Undecided> {
        let (_conn, m) = self.manager().await?;
        match self.bounded(m.reset_failed_unit(unit)).await? {
            Ok(()) => Ok(()),
            Err(e) if answered(&e) => Ok(()),
            Err(e) => Err(Undecided(e.to_string())),
        }
    }

    async fn unit_user(&self, unit: &str) -> Result<Option<UnitUser>, Undecided> {
        let (conn, m) = self.manager().await?;
        // LoadUnit, not GetUnit: a unit loaded for validation may have been unloaded since
        // (nothing references it until it starts), and systemd loads a unit again when its
        // object is asked for.
        let path = match self.bounded(m.load_unit(unit)).await? {
            Ok(p) => p,
            Err(e) if answered(&e) => return Ok(None),
            Err(e) => return Err(Undecided(format!("systemd LoadUnit {unit}: {e}"))),
        };
        if !unit.ends_with(".service") {
            return Ok(Some(UnitUser::default()));
        }
        let s = self
            .all(&conn, &path, "org.freedesktop.systemd1.Service")
            .await?;
        Ok(Some(UnitUser {
            user: get(&s, "User").unwrap_or_default(),
            group: get(&s, "Group").unwrap_or_default(),
            dynamic: get(&s, "DynamicUser").unwrap_or(false),
        }))
    }

    async fn alive_units(&self, patterns: &[String]) -> Result<Vec<String>, Undecided> {
        if patterns.is_empty() {
            return Ok(vec![]);
        }
        let (_conn, m) = self.manager().await?;
        let pats: Vec<&str> = patterns.iter().map(String::as_str).collect();
        match self
            .bounded(m.list_units_by_patterns(&["active", "activating", "reloading"], &pats))
            .await?
        {
            Ok(units) => Ok(units.into_iter().map(|u| u.0).collect()),
            Err(e) => Err(Undecided(format!("systemd ListUnitsByPatterns: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(active: &str, sub: &str, result: &str, pid: u32, start_us: u64) -> UnitState {
        UnitState {
            load_state: "loaded".into(),
            active_state: active.into(),
            sub_state: sub.into(),
            result: result.into(),
            main_pid: pid,
            exec_main_start_us: start_us,
            exec_main_code: 1,
            exec_main_status: 0,
        }
    }

    /// C-6: a watched run killed within its grace is a failed attempt, never completed.
    #[test]
    fn c6_a_watched_run_completes_only_by_exiting_zero() {
        let began = 1_000_000u64;
        let after = (began + 5) * 1000;
        let mut term = st("active", "exited", "success", 0, after);
        term.exec_main_code = 2;
        term.exec_main_status = 15;
        assert_eq!(
            attempt_verdict(&term, began),
            Verdict::Completed,
            "an unwatched entry"
        );
        assert!(
            matches!(watched_verdict(&term, began), Verdict::Failed(w) if w.contains("killed by signal 15"))
        );
        let done = st("inactive", "dead", "success", 0, after);
        assert_eq!(watched_verdict(&done, began), Verdict::Completed);
        let running = st("active", "running", "success", 12, after);
        assert_eq!(watched_verdict(&running, began), Verdict::Alive);
    }

    #[test]
    fn d9_success_test_truth_table() {
        let began = 1_000_000u64; // ms
        let after = (began + 5) * 1000; // µs
        let before = (began - 60_000) * 1000;
        let cases = [
            (st("activating", "start", "success", 0, 0), true),
            (st("reloading", "reload", "success", 12, after), true),
            (st("active", "running", "success", 12, after), true),
            (st("active", "exited", "success", 0, after), true),
            (st("active", "exited", "success", 0, before), false),
            (st("inactive", "dead", "success", 0, after), true),
            (st("inactive", "dead", "success", 0, before), false),
            (st("inactive", "dead", "success", 0, 0), false),
            (st("failed", "failed", "exit-code", 0, after), false),
            (st("inactive", "dead", "exit-code", 0, after), false),
            (
                st("deactivating", "stop-sigterm", "success", 12, after),
                false,
            ),
        ];
        for (s, ok) in cases {
            let v = attempt_verdict(&s, began);
            assert_eq!(
                matches!(v, Verdict::Alive | Verdict::Completed),
                ok,
                "{s:?} ⇒ {v:?}"
            );
        }
        assert_eq!(
            attempt_verdict(&st("inactive", "dead", "success", 0, after), began),
            Verdict::Completed
        );
        assert!(
            matches!(attempt_verdict(&st("failed", "failed", "exit-code", 0, after), began), Verdict::Failed(w) if w.contains("exit-code"))
        );
    }

    /// SPEC §12 Q-1 (security review finding 2, defence in depth): a transient revival unit
    /// runs as its user and group and can gain no privilege (no setuid gain at exec, no setuid
    /// or setgid file left behind).
    #[test]
    fn q1_transient_units_carry_no_new_privileges_and_restrict_suid_sgid() {
        let t = Transient {
            name: "outlive-revive-rq-a-1-1.service".into(),
            description: "d".into(),
            argv: vec!["/bin/true".into()],
            cwd: "/".into(),
            user: Some((1001, 1001)),
            env: BTreeMap::new(),
            after: vec![],
        };
        let props: BTreeMap<&str, String> = t
            .properties()
            .into_iter()
            .map(|(k, v)| (k, v.to_string()))
            .collect();
        assert_eq!(props["NoNewPrivileges"], "true");
        assert_eq!(props["RestrictSUIDSGID"], "true");
        assert_eq!(props["User"], "\"1001\"");
        assert_eq!(props["Group"], "\"1001\"");
        let user_manager = Transient { user: None, ..t };
        let props: Vec<&str> = user_manager.properties().iter().map(|(k, _)| *k).collect();
        assert!(props.contains(&"NoNewPrivileges") && !props.contains(&"User"));
    }
}
