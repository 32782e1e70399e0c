//! The revival queue and its host lock (SPEC §2, §3).
//!
//! - `lock`: L-1 to L-8, the decision table and the born-locked file;
//! - `entry`, entries, statuses, evidence, formats;
//! - `rules`: and P-1 as pure functions;
//! - `store`, the durable state file;
//! - this file: [`Queue`], which holds the lock and the state and applies the rules. Every
//!   mutation is applied to a copy, persisted, and only then made current and acknowledged; a
//!   failed persist rolls back, is audited and is retried on each tick. While the lock is not
//!   held nothing is written under the state directory (L-6).

pub mod entry;
pub mod lock;
pub mod rules;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::audit::{Alert, AuditSink, Auditor, Event, priority};
use crate::clock::Clock;
use crate::config::{AutoHeal, Config};
use crate::facts::Facts;
use crate::facts::process::ProcessProber;
use crate::files::ReplaceError;
use crate::sync::{MutexExt, RwLockExt};
use entry::{Entry, Status, Target};
use lock::{HeldLock, LockReason, Ours, Verdict};
use rules::{Bound, PauseChange, PauseKind, Request, RequeueRefusal};
use store::{Loaded, RunStop, State};

/// Waiting time of queued entries is written at least this often, so that a crash together
/// with a backward wall-clock step loses at most this much of it.
const CHECKPOINT_MS: u64 = 10 * 60 * 1000;

/// Operator stops older than this are forgotten (no entry can be that old: the TTL is at most
/// 720 h and requeues start a new wait).
const STOP_RETENTION_MS: u64 = 31 * 24 * 3600 * 1000;

/// The queue's settings (SPEC §9 `[queue]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub enabled: bool,
    pub dry_run: bool,
    pub max_size: usize,
    pub max_attempts: u32,
    pub max_resurrections: usize,
    pub ttl_ms: u64,
    pub include_operator_kills: bool,
    pub allowed_units: Vec<String>,
    pub auto_heal: AutoHeal,
}

impl Settings {
    /// From the configuration.
    pub fn from_config(c: &Config) -> Settings {
        Settings {
            enabled: c.queue.enabled,
            dry_run: c.queue.dry_run,
            max_size: c.queue.max_size as usize,
            max_attempts: c.queue.max_attempts,
            max_resurrections: c.queue.max_resurrections as usize,
            ttl_ms: c.queue.entry_ttl_hours as u64 * 3600 * 1000,
            include_operator_kills: c.queue.include_operator_kills,
            allowed_units: c.queue.allowed_units.clone(),
            auto_heal: c.queue.auto_heal,
        }
    }
}

/// Who calls (from the bus credentials).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub root: bool,
    /// Root, a member of `outlive`, or (user mode) the agent's own uid.
    pub may_mutate: bool,
}

/// Refusals (mapped to `org.outlive.Error.*` by the bus layer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueError {
    /// `QueueDisabled`: reason code and detail.
    Disabled {
        code: String,
        detail: String,
    },
    NotFound(String),
    Paused(String),
    Full(String),
    NotGaveUp(String),
    Duplicate(String),
    PersistFailed(String),
    Invalid {
        field: String,
        why: String,
    },
    AccessDenied(String),
}

impl std::fmt::Display for QueueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueError::Disabled { code, detail } => {
                write!(f, "the queue is disabled ({code}): {detail}")
            }
            QueueError::Invalid { field, why } => write!(f, "{field}: {why}"),
            QueueError::NotFound(m)
            | QueueError::Paused(m)
            | QueueError::Full(m)
            | QueueError::NotGaveUp(m)
            | QueueError::Duplicate(m)
            | QueueError::PersistFailed(m)
            | QueueError::AccessDenied(m) => f.write_str(m),
        }
    }
}

/// `Enqueue`'s reply: `(admitted, why, id)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub admitted: bool,
    pub why: String,
    pub id: String,
}

/// What the facts layer must provide to evaluate the lock. Owned, so that the queue keeps the
/// latest one: a lock found lost while writing is evaluated again at once (L-3 as amended).
#[derive(Clone)]
pub struct LockEnv {
    pub ours: Ours,
    pub facts: Facts,
    pub prober: Arc<dyn ProcessProber + Send + Sync>,
}

/// When a lock refusal is evaluated again (L-3 as amended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// On every tick.
    Tick,
    /// At this CLOCK_BOOTTIME ms (L-4 row 10: once the heartbeat is stale).
    At(u64),
    /// On reload and after `outlivectl lock clear` only.
    Reload,
}

/// Why the lock is not held.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refusal {
    code: String,
    detail: String,
    retry: Retry,
}

/// A snapshot for publication (D-Bus properties, status line, posture).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The lock is held, the state loaded and `queue.enabled` is on.
    pub enabled: bool,
    /// A G-6 reason code when not enabled (empty when enabled).
    pub disabled_reason: String,
    pub disabled_detail: String,
    /// `persist-failed` while saves fail (the queue stays enabled).
    pub persist_failed: Option<String>,
    pub lock_held: bool,
    pub dry_run: bool,
    pub pause: Option<rules::Pause>,
    /// Open entries (queued or starting).
    pub waiting: u32,
    pub dry_run_since: Option<u64>,
}

/// What the queue publishes for readers that must never wait on it (the bus dispatch thread):
/// its snapshot and its entries, as of the last change made through [`Shared::lock`].
#[derive(Debug, Clone)]
pub struct View {
    pub snapshot: Snapshot,
    /// The entries (L-6: a disabled queue has none to show, and says why).
    pub entries: Result<Arc<Vec<Entry>>, QueueError>,
}

/// The queue as the agent's loops and the bus share it: the queue behind a mutex, taken by
/// those that may wait (the drainer, the blocking pool that applies the bus's mutations), and a
/// published [`View`] for those that may not (the bus dispatch thread reads it and never
/// touches the mutex). Every guard that changed the queue republishes the view when dropped.
pub struct Shared {
    inner: std::sync::Mutex<Queue>,
    view: std::sync::RwLock<Arc<View>>,
}

/// The handle the agent's parts hold.
pub type SharedQueue = Arc<Shared>;

impl Shared {
    /// Share `q`.
    pub fn new(q: Queue) -> SharedQueue {
        let view = std::sync::RwLock::new(Arc::new(q.view()));
        Arc::new(Shared {
            inner: std::sync::Mutex::new(q),
            view,
        })
    }

    /// Take the queue (a panic elsewhere does not make it unusable: its state only changes
    /// through complete, persisted commits).
    pub fn lock(&self) -> Guard<'_> {
        let mut g = self.inner.locked();
        let dirty = g.refresh_settings();
        Guard {
            g,
            shared: self,
            dirty,
        }
    }

    /// The latest published view; never waits for the queue.
    pub fn view(&self) -> Arc<View> {
        Arc::clone(&self.view.reading())
    }
}

/// The queue, taken. Mutable access marks it changed: the view is republished on drop.
pub struct Guard<'a> {
    g: std::sync::MutexGuard<'a, Queue>,
    shared: &'a Shared,
    dirty: bool,
}

impl std::ops::Deref for Guard<'_> {
    type Target = Queue;
    fn deref(&self) -> &Queue {
        &self.g
    }
}

impl std::ops::DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut Queue {
        self.dirty = true;
        &mut self.g
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if self.dirty {
            let v = Arc::new(self.g.view());
            *self.shared.view.writing() = v;
        }
    }
}

/// The queue: the lock, the state and the rules.
pub struct Queue {
    state_dir: PathBuf,
    runtime_dir: PathBuf,
    settings: Settings,
    held: Option<HeldLock>,
    /// Why the lock is not held (None while held).
    lock_disabled: Option<Refusal>,
    last_disabled_audited: Option<(String, String)>,
    /// The latest lock environment (to evaluate again at once when the lock is found lost).
    env: Option<LockEnv>,
    /// Set while a lost lock is evaluated again: the outcome says so (one report).
    lost: Option<String>,
    /// Lock and state I/O at start and on retries runs here, under a timeout (a hung state
    /// directory must not hang the agent before READY=1).
    io: crate::facts::probe::FactsWorker,
    verdict: Option<Verdict>,
    state: State,
    loaded: bool,
    persist_failed: Option<String>,
    auditor: Arc<Auditor>,
    clock: Arc<dyn Clock>,
    /// CLOCK_BOOTTIME of `paused_at` (in memory).
    pause_boot: Option<u64>,
    /// CLOCK_BOOTTIME of the last successful save.
    saved_boot: u64,
    /// The applied configuration this queue takes its settings from (the agent's).
    applied: Option<crate::config::Applied>,
}

impl Queue {
    /// A queue that has not evaluated its lock yet (disabled, `acquisition-error`).
    pub fn new(
        state_dir: &Path,
        runtime_dir: &Path,
        settings: Settings,
        auditor: Arc<Auditor>,
        clock: Arc<dyn Clock>,
    ) -> Queue {
        auditor.log.set_dir(runtime_dir);
        Queue {
            state_dir: state_dir.to_path_buf(),
            runtime_dir: runtime_dir.to_path_buf(),
            settings,
            held: None,
            lock_disabled: Some(Refusal {
                code: "acquisition-error".into(),
                detail: "the lock has not been evaluated yet".into(),
                retry: Retry::Tick,
            }),
            last_disabled_audited: None,
            env: None,
            lost: None,
            io: crate::facts::probe::FactsWorker::new(),
            verdict: None,
            state: State::empty(),
            loaded: false,
            persist_failed: None,
            auditor,
            clock,
            pause_boot: None,
            saved_boot: 0,
            applied: None,
        }
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Apply new settings.
    pub fn set_settings(&mut self, s: Settings) {
        self.settings = s;
        self.maintain_dry_run_since();
    }

    /// Take the settings from the applied configuration from now on: every operation begins
    /// with the latest ([`Shared::lock`]).
    pub fn follow(&mut self, mut applied: crate::config::Applied) {
        let c = Arc::clone(&applied.borrow_and_update());
        self.take(Settings::from_config(&c));
        self.applied = Some(applied);
    }

    /// New settings from the applied configuration (logged at debug: what the queue uses).
    fn take(&mut self, s: Settings) {
        tracing::debug!(target: "outlive::config", "queue uses {s:?}");
        self.set_settings(s);
    }

    /// The settings of a configuration applied since the last operation, if any; whether
    /// they changed.
    fn refresh_settings(&mut self) -> bool {
        let Some(rx) = self.applied.as_mut() else {
            return false;
        };
        if !rx.has_changed().unwrap_or(false) {
            return false;
        }
        let c = Arc::clone(&rx.borrow_and_update());
        self.take(Settings::from_config(&c));
        true
    }

    /// The last L-4 verdict.
    pub fn verdict(&self) -> Option<&Verdict> {
        self.verdict.as_ref()
    }

    /// Whether we hold the lock.
    pub fn lock_held(&self) -> bool {
        self.held.is_some()
    }

    /// The held lock's record.
    pub fn held_record(&self) -> Option<&lock::LockRecord> {
        self.held.as_ref().map(|h| h.record())
    }

    fn audit(&self, e: Event) {
        self.auditor.record(&e);
    }

    // ---- the lock (L-3) ---------------------------------------------------------------------

    /// How long lock and state I/O may take before the state directory counts as hung.
    fn io_timeout(env: &LockEnv) -> std::time::Duration {
        (env.facts.timeout() * 2 + std::time::Duration::from_secs(2))
            .max(std::time::Duration::from_secs(5))
    }

    /// L-3: evaluate the lock. At start and reload (`force`), and on each tick while the lock is
    /// refused for a cause that is retried (every tick, or L-4 row 10 once its heartbeat is
    /// stale). Nothing happens while the lock is held. The lock decision and the load of the
    /// state run on a worker under a timeout: a hung state directory leaves the queue disabled
    /// `acquisition-error`, never the agent hung.
    pub fn evaluate_lock(&mut self, env: &LockEnv, force: bool) {
        self.env = Some(env.clone());
        if self.held.is_some() {
            return;
        }
        let due = match self.lock_disabled.as_ref().map(|r| r.retry) {
            Some(Retry::Tick) => true,
            Some(Retry::At(t)) => self.clock.boot_ms() >= t,
            Some(Retry::Reload) | None => false,
        };
        if !force && !due {
            return;
        }
        let timeout = Self::io_timeout(env);
        let (dir, e2) = (self.state_dir.clone(), env.clone());
        let (auto_heal, now_wall) = (self.settings.auto_heal, self.clock.wall_ms());
        let job = move || {
            let acq = lock::acquire(&dir, &e2.ours, auto_heal, &e2.facts, &*e2.prober);
            let loaded = acq.held.as_ref().map(|h| store::load(h.dir(), now_wall));
            (acq, loaded)
        };
        let (acq, loaded) = match self.io.run(timeout, job) {
            crate::facts::probe::Run::Done(x) => x,
            crate::facts::probe::Run::Timeout => {
                let msg = format!(
                    "the state directory {} did not answer within {} s (a hung or unreachable filesystem?); \
                     retried every tick",
                    self.state_dir.display(),
                    timeout.as_secs()
                );
                self.disable("acquisition-error", &msg, Retry::Tick, None);
                return;
            }
        };
        let disabled = acq.disabled().map(|(r, m)| (r, m.to_string()));
        self.verdict = Some(acq.verdict.clone());
        match (acq.held, loaded) {
            (Some(h), Some(loaded)) => {
                self.held = Some(h);
                self.auditor.log.set_dir(&self.state_dir);
                for e in acq.events {
                    self.audit(e);
                }
                let was_disabled = self.last_disabled_audited.take().is_some();
                let lost = self.lost.take();
                self.lock_disabled = None;
                self.load_state(loaded);
                if (was_disabled || lost.is_some()) && self.loaded {
                    let message = match lost {
                        Some(what) => format!(
                            "{what}; outlived took the lock again, reloaded the queue from disk and is enabled"
                        ),
                        None => "the revival queue holds its lock again and is enabled".to_string(),
                    };
                    self.audit(Event::new("queue-enabled", message).priority(priority::NOTICE));
                }
            }
            _ => {
                let (reason, message) =
                    disabled.unwrap_or((LockReason::AcquisitionError, "lock not held".into()));
                let retry = if reason.retryable() {
                    Retry::Tick
                } else if let Some(d) = acq.verdict.retry_in {
                    Retry::At(self.clock.boot_ms() + d.as_millis() as u64)
                } else {
                    Retry::Reload
                };
                self.disable(reason.as_str(), &message, retry, Some(&acq.verdict));
            }
        }
    }

    /// Close the lock, stop writing under the state directory, and audit the outcome when it
    /// differs from the previous one (L-4, L-6). While a lost lock is evaluated again, the
    /// outcome says so (L-3 as amended: one report, with its real reason).
    fn disable(&mut self, code: &str, detail: &str, retry: Retry, verdict: Option<&Verdict>) {
        self.held = None;
        self.loaded = false;
        self.state = State::empty();
        self.pause_boot = None;
        self.auditor.log.set_dir(&self.runtime_dir);
        let detail = match self.lost.take() {
            Some(what) => format!("{what}: {detail}"),
            None => detail.to_string(),
        };
        self.lock_disabled = Some(Refusal {
            code: code.to_string(),
            detail: detail.clone(),
            retry,
        });
        let key = (code.to_string(), detail.clone());
        if self.last_disabled_audited.as_ref() != Some(&key) {
            let mut e = Event::new(
                "queue-disabled",
                format!("the revival queue is disabled ({code}): {detail}"),
            )
            .alert(Alert::QueueDisabled)
            .field("reason", code)
            .field("state_dir", self.state_dir.display());
            if let Some(v) = verdict {
                e = e.field("row", v.row);
                // Row 7 carries no filesystem, liveness or heartbeat facts: none were gathered.
                if let Some(c) = v.facts.class {
                    e = e.field("class", c.as_str());
                }
                if let Some(r) = &v.facts.rule {
                    e = e.field("rule", r);
                }
                if let Some(h) = &v.facts.holder {
                    e = e.field("holder", h);
                }
                if let Some(a) = v.facts.holder_alive {
                    e = e.field("holder_alive", a);
                }
                if let Some(age) = v.facts.heartbeat_age_ms {
                    e = e.field(
                        "heartbeat_age_ms",
                        age.map(|a| a.to_string())
                            .unwrap_or_else(|| "unreadable".into()),
                    );
                }
            }
            self.audit(e);
            self.last_disabled_audited = Some(key);
        }
    }

    /// L-6 as amended: the lock path no longer names the locked inode. The queue stops writing
    /// at once, and L-4 is evaluated again in the same step; only its outcome is audited and
    /// raised, saying that the lock file was replaced while held.
    fn lock_lost(&mut self) {
        let Some(h) = self.held.take() else {
            return;
        };
        let what = format!(
            "the lock file {} was replaced or removed while held (lock-lost)",
            h.path().display()
        );
        drop(h);
        self.loaded = false;
        self.lock_disabled = Some(Refusal {
            code: "lock-lost".into(),
            detail: what.clone(),
            retry: Retry::Tick,
        });
        self.lost = Some(what);
        if let Some(env) = self.env.clone() {
            self.evaluate_lock(&env, true);
        } else {
            self.disable("lock-lost", "", Retry::Tick, None);
        }
    }

    /// The state directory, for a write under it: only while the lock is held and its path
    /// still names the locked inode (L-6 as amended); otherwise the lock is lost and the write
    /// refused with `QueueDisabled` (`lock-lost`).
    fn state_dir_for_write(&mut self) -> Result<(), QueueError> {
        self.require_enabled()?;
        if self.held.as_ref().is_some_and(|h| h.still_installed()) {
            return Ok(());
        }
        self.lock_lost();
        Err(QueueError::Disabled {
            code: "lock-lost".into(),
            detail: "the lock file was replaced or removed while held; nothing was written (see `outlivectl \
                     status` for what the queue found when it looked again)"
                .into(),
        })
    }

    /// Write a file under the state directory through the held lock's descriptor of it (the
    /// continuation records, the posture boot snapshot), or, while the lock is not held, into
    /// the runtime directory (L-6). `subdir` is created 0700 when missing.
    pub fn write_file(
        &mut self,
        subdir: Option<&str>,
        name: &str,
        bytes: &[u8],
    ) -> std::io::Result<PathBuf> {
        let how = crate::files::Replace::DURABLE;
        if self.held.is_some() && self.state_dir_for_write().is_ok() {
            let h = self.held.as_ref().expect("held");
            let (d, path) = match subdir {
                Some(s) => (
                    Some(h.dir().subdir(s, 0o700)?),
                    self.state_dir.join(s).join(name),
                ),
                None => (None, self.state_dir.join(name)),
            };
            d.as_ref().unwrap_or(h.dir()).replace(name, bytes, how)?;
            return Ok(path);
        }
        let run = crate::files::Dir::create(&self.runtime_dir, 0o755)?;
        let (d, path) = match subdir {
            Some(s) => (
                Some(run.subdir(s, 0o700)?),
                self.runtime_dir.join(s).join(name),
            ),
            None => (None, self.runtime_dir.join(name)),
        };
        d.as_ref().unwrap_or(&run).replace(name, bytes, how)?;
        Ok(path)
    }

    /// L-7: release the lock (orderly stop). The file stays.
    pub fn release(&mut self) {
        self.held = None;
    }

    /// Tick step 1 (D-2): touch the lock's heartbeat, or retry acquisition. A lock file that
    /// no longer names our descriptor (removed or replaced) is lost (L-6 as amended). Also keeps
    /// the held record's hostname current.
    pub fn heartbeat(&mut self, env: &LockEnv) {
        self.env = Some(env.clone());
        if self.held.as_ref().is_some_and(|h| !h.still_installed()) {
            self.lock_lost();
            return;
        }
        match &mut self.held {
            Some(h) => {
                if let Err(e) = h.touch() {
                    tracing::warn!("cannot touch the lock heartbeat: {e}");
                }
                if h.record().hostname != env.ours.hostname {
                    let from = h.record().hostname.clone();
                    let mut r = h.record().clone();
                    r.hostname = env.ours.hostname.clone();
                    if h.update(r).is_ok() {
                        self.audit(
                            Event::new(
                                "lock-host-renamed",
                                format!(
                                    "this host was renamed from {from} to {} while holding the queue lock (same host \
                                     id {}); the lock record was updated",
                                    env.ours.hostname, env.ours.host_id
                                ),
                            )
                            .alert(Alert::LockHostRenamed)
                            .field("from", from)
                            .field("to", &env.ours.hostname)
                            .field("host_id", env.ours.host_id),
                        );
                    }
                }
            }
            None => self.evaluate_lock(env, false),
        }
    }

    // ---- state ------------------------------------------------------------------------------

    fn load_state(&mut self, loaded: Loaded) {
        let now_wall = self.clock.wall_ms();
        let now_boot = self.clock.boot_ms();
        match loaded {
            Loaded::Fresh => {
                self.state = State::empty();
                self.loaded = true;
            }
            Loaded::State {
                state,
                set_aside,
                sidecar,
                paused_because,
            } => {
                self.state = *state;
                self.restore_clocks(now_wall, now_boot);
                self.loaded = true;
                if let Some(side) = sidecar {
                    // Rewrite now: the next start must not set the same items aside again.
                    let _ = self.commit(|_, _| Ok(((), vec![])));
                    self.audit(salvage_notice(
                        &self.state_dir,
                        &set_aside,
                        &side,
                        paused_because,
                    ));
                } else if self.state.entries.iter().any(|e| e.status.is_open()) {
                    // Write the restored waiting time now: the next restart must not depend on
                    // the wall clock behaving meanwhile.
                    let _ = self.commit(|_, _| Ok(((), vec![])));
                }
            }
            Loaded::Corrupt {
                why,
                sidecar,
                id_floor_ms,
            } => {
                self.state = State::empty();
                self.state.last_id_ms = id_floor_ms;
                self.loaded = true;
                // Replace the corrupt file now, so a restart does not set it aside again.
                let _ = self.commit(|_, _| Ok(((), vec![])));
                self.audit(
                    Event::new(
                        "state-corrupt",
                        format!(
                            "the queue state {} was unreadable as a whole ({why}); it was copied to {} and the queue \
                             starts empty. Inspect the copy to recover runs that were waiting (enqueue them again), \
                             then `outlivectl ack`.",
                            self.state_dir.join(store::STATE_FILE).display(),
                            sidecar.display()
                        ),
                    )
                    .alert(Alert::QueueNotice)
                    .field("why", &why)
                    .field("sidecar", sidecar.display()),
                );
            }
            Loaded::CorruptUncopied { why, error } => {
                let msg = format!(
                    "the queue state is unreadable ({why}) and could not be copied aside ({error}); it is left in \
                     place and the queue is disabled until it can be"
                );
                self.disable("persist-failed", &msg, Retry::Tick, None);
                return;
            }
            Loaded::Unreadable(e) => {
                self.disable(
                    "persist-failed",
                    &format!("cannot read the queue state: {e}"),
                    Retry::Tick,
                    None,
                );
                return;
            }
        }
        self.prune(now_wall);
        self.maintain_dry_run_since();
    }

    /// After a restart: waiting time advances by the wall-clock delta since the save (clamped
    /// to ≥ 0); backoffs and the pause are mapped onto CLOCK_BOOTTIME.
    fn restore_clocks(&mut self, now_wall: u64, now_boot: u64) {
        let down = now_wall.saturating_sub(self.state.saved_at);
        for e in &mut self.state.entries {
            if e.status == Status::Queued {
                e.waited_ms = e.waited_ms.saturating_add(down);
            }
            e.wait_anchor_boot = now_boot;
            e.next_attempt_boot = e
                .next_attempt_at
                .map(|w| now_boot + w.saturating_sub(now_wall));
        }
        self.pause_boot = self
            .state
            .pause
            .as_ref()
            .map(|p| now_boot.saturating_sub(now_wall.saturating_sub(p.paused_at)));
    }

    /// Keep `dry_run_since` (G-7 soak) in step with the setting. Best effort: it is written
    /// with the next save if this one fails.
    fn maintain_dry_run_since(&mut self) {
        if !self.loaded {
            return;
        }
        let want = self.settings.dry_run;
        if want == self.state.dry_run_since.is_some() {
            return;
        }
        let now = self.clock.wall_ms();
        let _ = self.commit(|s, _| {
            s.dry_run_since = want.then_some(now);
            Ok(((), vec![]))
        });
    }

    /// Bring `waited_ms` (and `calm_ms` when `calm`) of queued entries up to now.
    pub fn advance_waiting(&mut self, calm: bool) {
        let now = self.clock.boot_ms();
        advance(&mut self.state.entries, now, calm);
    }

    fn require_enabled(&self) -> Result<(), QueueError> {
        if let Some(r) = &self.lock_disabled {
            return Err(QueueError::Disabled {
                code: r.code.clone(),
                detail: r.detail.clone(),
            });
        }
        if !self.loaded {
            return Err(QueueError::Disabled {
                code: "persist-failed".into(),
                detail: "the state is not loaded".into(),
            });
        }
        Ok(())
    }

    /// Apply `f` to a copy, persist it, and make it current; record its events only then.
    ///
    /// An acknowledgement is never contradicted (issue "Keep the promise under faults", 7):
    /// - the lock must still be ours (L-6 as amended), else nothing is written and the change
    ///   is refused `QueueDisabled` (`lock-lost`);
    /// - a save that failed before its rename changed nothing: `PersistFailed`;
    /// - a save whose rename succeeded but whose directory fsync failed left the new state
    ///   visible but not known durable. Refusing it then would be contradicted by the next
    ///   start, which loads the file: so the previous state is written back first, and only
    ///   then is the change refused `PersistFailed`. If even that rename fails, the file holds
    ///   the change and a restart will load it, so the change stands and is acknowledged
    ///   (the directory's failed fsync is audited and keeps `persist-failed` set).
    fn commit<T>(
        &mut self,
        f: impl FnOnce(&mut State, &Ctx) -> Result<(T, Vec<Event>), QueueError>,
    ) -> Result<T, QueueError> {
        self.state_dir_for_write()?;
        let ctx = Ctx {
            wall: self.clock.wall_ms(),
            boot: self.clock.boot_ms(),
        };
        advance(&mut self.state.entries, ctx.boot, false);
        let mut next = self.state.clone();
        let (out, events) = f(&mut next, &ctx)?;
        next.saved_at = ctx.wall;
        for e in &mut next.entries {
            e.next_attempt_at = e
                .next_attempt_boot
                .map(|b| ctx.wall + b.saturating_sub(ctx.boot));
        }
        let dir = self.held.as_ref().expect("checked above").dir();
        // Ok(true): written and durable; Ok(false): written, not known durable.
        let saved: Result<bool, String> = match store::save(dir, &next) {
            Ok(()) => Ok(true),
            Err(ReplaceError::Failed(e)) => Err(e.to_string()),
            Err(ReplaceError::NotDurable(e)) => match store::save(dir, &self.state) {
                Ok(()) | Err(ReplaceError::NotDurable(_)) => Err(format!(
                    "the directory could not be synced after the write ({e}); the previous state was written \
                     back"
                )),
                Err(ReplaceError::Failed(back)) => {
                    let msg = format!(
                        "{} was written, but the directory could not be synced ({e}) and the previous state could \
                         not be written back ({back}): the change stands, not known durable",
                        self.state_dir.join(store::STATE_FILE).display()
                    );
                    self.note_persist_failure(&msg);
                    self.persist_failed = Some(msg);
                    Ok(false)
                }
            },
        };
        match saved {
            Ok(durable) => {
                self.state = next;
                self.saved_boot = ctx.boot;
                for e in events {
                    self.audit(e);
                }
                if durable && let Some(was) = self.persist_failed.take() {
                    self.audit(
                        Event::new(
                            "persist-recovered",
                            format!("the queue state is written again (it failed: {was})"),
                        )
                        .priority(priority::NOTICE),
                    );
                }
                Ok(out)
            }
            Err(why) => {
                let msg = format!(
                    "cannot write {}: {why}",
                    self.state_dir.join(store::STATE_FILE).display()
                );
                self.note_persist_failure(&msg);
                self.persist_failed = Some(msg.clone());
                Err(QueueError::PersistFailed(msg))
            }
        }
    }

    /// Audit a persist failure once per distinct message.
    fn note_persist_failure(&self, msg: &str) {
        if self.persist_failed.as_deref() != Some(msg) {
            self.audit(
                Event::new(
                    "persist-failed",
                    format!(
                        "{msg}; the change was refused and the previous state kept. Free space or fix the state \
                         directory; outlived retries on every tick."
                    ),
                )
                .alert(Alert::QueueNotice)
                .field("error", msg),
            );
        }
    }

    /// while saves fail, each tick retries writing the current state.
    pub fn retry_persist(&mut self) {
        if self.persist_failed.is_some() && self.require_enabled().is_ok() {
            let _ = self.commit(|_, _| Ok(((), vec![])));
        }
    }

    // ---- reads ------------------------------------------------------------------------------

    /// The entries (L-6: a disabled queue has none to show and says why).
    pub fn entries(&self) -> Result<&[Entry], QueueError> {
        self.require_enabled()?;
        Ok(&self.state.entries)
    }

    /// Everything persisted (for the drainer and tests).
    pub fn state(&self) -> &State {
        &self.state
    }

    /// What [`Shared`] publishes.
    pub fn view(&self) -> View {
        View {
            snapshot: self.snapshot(),
            entries: self
                .require_enabled()
                .map(|()| Arc::new(self.state.entries.clone())),
        }
    }

    /// A snapshot for publication.
    pub fn snapshot(&self) -> Snapshot {
        let (enabled, reason, detail) = match (&self.lock_disabled, self.settings.enabled) {
            (Some(r), _) => (false, r.code.clone(), r.detail.clone()),
            (None, false) => (
                false,
                "queue-off".to_string(),
                "queue.enabled is false in the configuration".to_string(),
            ),
            (None, true) => (true, String::new(), String::new()),
        };
        Snapshot {
            enabled,
            disabled_reason: reason,
            disabled_detail: detail,
            persist_failed: self.persist_failed.clone(),
            lock_held: self.held.is_some(),
            dry_run: self.settings.dry_run,
            pause: self.state.pause.clone(),
            waiting: self
                .state
                .entries
                .iter()
                .filter(|e| e.status.is_open())
                .count() as u32,
            dry_run_since: self.state.dry_run_since,
        }
    }

    // ---- mutations (Q-4 … Q-12, P-1) --------------------------------------------------------

    /// Q-4 Enqueue. `req` is the decoded dictionary or the decoding error (`field`, why); the
    /// checks run in the SPEC's order, so a disabled queue answers `QueueDisabled` first.
    /// `named` is what the user database says of the request's `user`, looked up before the
    /// queue was locked (None when it names none).
    #[expect(clippy::too_many_lines, reason = "Q-4's checks in the rule's order")]
    pub fn enqueue(
        &mut self,
        caller: &Caller,
        req: Result<Request, (String, String)>,
        named: Option<crate::facts::users::Lookup>,
    ) -> Result<Reply, QueueError> {
        self.require_enabled()?;
        if !self.settings.enabled {
            return Err(QueueError::Disabled {
                code: "queue-off".into(),
                detail: "queue.enabled is false in the configuration".into(),
            });
        }
        if !caller.may_mutate {
            return Err(QueueError::AccessDenied(format!(
                "uid {} may not enqueue: root or a member of group `outlive` only",
                caller.uid
            )));
        }
        let req = req.map_err(|(field, why)| QueueError::Invalid { field, why })?;
        req.validate().map_err(|(field, why)| QueueError::Invalid {
            field: field.into(),
            why,
        })?;
        if (req.user.is_some() || req.group.is_some()) && !caller.root {
            return Err(QueueError::AccessDenied(
                "only root may enqueue a run as another user (user, group)".into(),
            ));
        }
        let (uid, gid) = rules::run_as(
            (caller.uid, caller.gid),
            req.user,
            req.group,
            named.as_ref(),
        )
        .map_err(|(field, why)| QueueError::Invalid {
            field: field.into(),
            why,
        })?;
        if let Some(Target::Unit { unit }) = &req.target
            && !caller.root
            && !self
                .settings
                .allowed_units
                .iter()
                .any(|g| entry::unit_allowed(g, unit))
        {
            return Err(QueueError::AccessDenied(format!(
                "{unit} is not in queue.allowed_units: non-root callers may enqueue only units matching {:?}",
                self.settings.allowed_units
            )));
        }
        let key = req.key();
        if let Err(word) = rules::eligibility(&req, self.settings.include_operator_kills) {
            self.audit(
                Event::new("enqueue-refused", format!("did not queue {key}: {word}"))
                    .field("key", &key)
                    .field("why", word)
                    .field("uid", caller.uid),
            );
            return Ok(Reply {
                admitted: false,
                why: word.into(),
                id: String::new(),
            });
        }
        if self
            .state
            .entries
            .iter()
            .any(|e| e.status.is_open() && e.key() == key)
        {
            self.audit(
                Event::new(
                    "enqueue-refused",
                    format!("did not queue {key}: it already has an open entry"),
                )
                .field("key", &key)
                .field("why", "duplicate-open-entry")
                .field("uid", caller.uid),
            );
            return Ok(Reply {
                admitted: false,
                why: "duplicate-open-entry".into(),
                id: String::new(),
            });
        }
        // are decided on the current state; the commit only carries them out.
        let now = self.clock.wall_ms();
        let recent = self.state.ledger.recent(&key, now);
        let capped = recent >= self.settings.max_resurrections;
        let max = self.settings.max_size;
        let bound = if capped {
            Bound::Admit
        } else {
            rules::bound(&self.state.entries, req.class(), max)
        };
        if bound == Bound::Overflow {
            self.audit(
                Event::new(
                    "overflow",
                    format!(
                        "the queue is full ({max} open entries) and {key} has a lower priority than all of them: not queued"
                    ),
                )
                .alert(Alert::QueueNotice)
                .field("key", &key),
            );
            return Ok(Reply {
                admitted: false,
                why: "overflow".into(),
                id: String::new(),
            });
        }
        let by = format!("enqueue by uid {}", caller.uid);
        let enqueued_by = caller.uid;
        self.commit(move |s, ctx| {
            let id = rules::next_id(&mut s.last_id_ms, &mut s.id_seq, ctx.wall);
            let mut e = new_entry(&id, &req, (uid, gid), enqueued_by, ctx);
            let mut events = vec![];
            if capped {
                let status = Status::GaveUp("resurrection-cap".into());
                e.record(None, status.clone(), &by, ctx.wall);
                e.status = status;
                e.terminal_at = Some(ctx.wall);
                events.push(
                    Event::new(
                        "resurrection-cap",
                        format!(
                            "{key} was reaped again after {recent} revivals in 24 h; not reviving it automatically \
                             (something keeps killing it). `outlivectl requeue {id}` revives it once."
                        ),
                    )
                    .alert(Alert::QueueNotice)
                    .field("key", &key)
                    .field("entry_id", &id)
                    .field("revivals", recent),
                );
                s.entries.push(e);
                return Ok((Reply { admitted: true, why: "resurrection-cap".into(), id }, events));
            }
            if let Bound::Evict(i) = bound {
                let v = &mut s.entries[i];
                let status = Status::GaveUp("overflow".into());
                v.record(Some(v.status.clone()), status.clone(), "overflow", ctx.wall);
                v.status = status;
                v.terminal_at = Some(ctx.wall);
                events.push(
                    Event::new(
                        "overflow",
                        format!(
                            "the queue is full ({max} open entries): {} ({}) gave up to make room for {key}",
                            v.label(),
                            v.id
                        ),
                    )
                    .alert(Alert::QueueNotice)
                    .field("evicted", &v.id)
                    .field("key", &key),
                );
            }
            e.record(None, Status::Queued, &by, ctx.wall);
            events.push(
                Event::new("enqueued", format!("queued {} ({key}) for revival as {id}", e.label()))
                    .priority(priority::INFO)
                    .field("entry_id", &id)
                    .field("key", &key)
                    .field("uid", uid)
                    .field("target", e.target.kind()),
            );
            s.entries.push(e);
            Ok((Reply { admitted: true, why: String::new(), id }, events))
        })
    }

    /// Q-9 Cancel: open entries only; unknown or terminal is `NotFound`.
    pub fn cancel(&mut self, caller: &Caller, id: &str) -> Result<(), QueueError> {
        self.require_enabled()?;
        require_mutate(caller, "Cancel")?;
        check_id(id)?;
        let by = format!("cancel by uid {}", caller.uid);
        self.commit(|s, ctx| {
            let e = s
                .entries
                .iter_mut()
                .find(|e| e.id == id && e.status.is_open())
                .ok_or_else(|| {
                    QueueError::NotFound(format!(
                        "no open entry {id} (`outlivectl queue` lists them)"
                    ))
                })?;
            let from = e.status.clone();
            e.record(Some(from.clone()), Status::Cancelled, &by, ctx.wall);
            e.status = Status::Cancelled;
            e.terminal_at = Some(ctx.wall);
            let ev = Event::new(
                "cancelled",
                format!("cancelled {} ({id}), which was {from}", e.label()),
            )
            .priority(priority::NOTICE)
            .field("entry_id", id)
            .field("was", &from);
            Ok(((), vec![ev]))
        })
    }

    /// Q-10 Requeue a `gave-up:*` entry.
    pub fn requeue(&mut self, caller: &Caller, id: &str) -> Result<(), QueueError> {
        self.require_enabled()?;
        require_mutate(caller, "Requeue")?;
        check_id(id)?;
        let max = self.settings.max_size;
        let paused = self.state.pause.is_some();
        let by = format!("requeue by uid {}", caller.uid);
        self.commit(|s, ctx| {
            let i = rules::requeue_check(&s.entries, id, paused, max).map_err(|r| match r {
                RequeueRefusal::Paused => QueueError::Paused("revival is paused: `outlivectl resume` first".into()),
                RequeueRefusal::NotFound => QueueError::NotFound(format!("no entry {id}")),
                RequeueRefusal::NotGaveUp => QueueError::NotGaveUp(format!(
                    "{id} did not give up; only gave-up entries can be requeued (cancelled, invalidated and revived \
                     entries are final)"
                )),
                RequeueRefusal::DuplicateOpenEntry => {
                    QueueError::Duplicate(format!("{id}'s run or job already has an open entry"))
                }
                RequeueRefusal::QueueFull => QueueError::Full(format!("the queue already holds {max} open entries")),
            })?;
            let e = &mut s.entries[i];
            let from = e.status.clone();
            let override_cap = from == Status::GaveUp("resurrection-cap".into());
            e.record(Some(from.clone()), Status::Queued, &by, ctx.wall);
            e.status = Status::Queued;
            e.attempts = 0;
            e.requeued_at = Some(ctx.wall);
            e.waited_ms = 0;
            e.calm_ms = 0;
            e.frozen_ms = 0;
            e.next_attempt_boot = None;
            e.next_attempt_at = None;
            e.pressure_starved = false;
            e.terminal_at = None;
            e.wait_anchor_boot = ctx.boot;
            let ev = if override_cap {
                Event::new(
                    "resurrection-override",
                    format!(
                        "{} ({id}) was requeued past the resurrection cap by an operator; a further reap is capped \
                         again",
                        e.label()
                    ),
                )
                .priority(priority::WARNING)
            } else {
                Event::new("requeued", format!("requeued {} ({id}), which was {from}", e.label())).priority(priority::NOTICE)
            };
            Ok(((), vec![ev.field("entry_id", id).field("was", &from)]))
        })
    }

    /// P-1 Pause (`emergency` or `maintenance`; a deliberate halt comes only from StopAll).
    pub fn pause(
        &mut self,
        caller: &Caller,
        kind: &str,
        reason: &str,
    ) -> Result<PauseChange, QueueError> {
        self.require_enabled()?;
        require_mutate(caller, "Pause")?;
        let kind = match PauseKind::parse(kind) {
            Some(PauseKind::DeliberateHalt) => {
                return Err(QueueError::Invalid {
                    field: "kind".into(),
                    why: "deliberate-halt comes only from StopAll (`outlivectl stop-all`), which also records the stop"
                        .into(),
                });
            }
            Some(k) => k,
            None => {
                return Err(QueueError::Invalid {
                    field: "kind".into(),
                    why: format!("{kind:?} is not emergency or maintenance"),
                });
            }
        };
        if reason.len() > entry::MAX_STRING {
            return Err(QueueError::Invalid {
                field: "reason".into(),
                why: "longer than 4096 bytes".into(),
            });
        }
        self.apply_pause(kind, reason, &format!("uid {}", caller.uid))
    }

    fn apply_pause(
        &mut self,
        kind: PauseKind,
        reason: &str,
        by: &str,
    ) -> Result<PauseChange, QueueError> {
        let (next, change) = rules::apply_pause(
            self.state.pause.as_ref(),
            kind,
            reason,
            self.clock.wall_ms(),
        );
        if change == PauseChange::NoOp {
            return Ok(change);
        }
        let by = by.to_string();
        let r = reason.to_string();
        self.commit(move |s, _| {
            let p = next.clone().expect("a pause");
            let ev = match change {
                PauseChange::Upgraded => Event::new(
                    "pause-upgraded",
                    format!(
                        "the pause became {} ({r}) by {by}; it was {}",
                        p.kind.as_str(),
                        s.pause.as_ref().map(|x| x.kind.as_str()).unwrap_or("-")
                    ),
                ),
                _ => Event::new(
                    "paused",
                    format!("revival paused ({}: {r}) by {by}", p.kind.as_str()),
                ),
            }
            .priority(priority::NOTICE)
            .field("kind", p.kind.as_str())
            .field("reason", &r);
            s.pause = next;
            Ok((change, vec![ev]))
        })
        .inspect(|c| {
            if *c == PauseChange::New {
                self.pause_boot = Some(self.clock.boot_ms());
            }
        })
    }

    /// P-2 Resume: clears any pause; returns whether there was one. Q-12: each open entry is
    /// credited min(pause duration, its waiting time since its TTL anchor) into `frozen_ms`.
    pub fn resume(&mut self, caller: &Caller) -> Result<bool, QueueError> {
        self.require_enabled()?;
        require_mutate(caller, "Resume")?;
        self.unpause(&format!("uid {}", caller.uid), "resumed")
    }

    /// Clear the pause with Q-12's credit; `event` describes the cause (given the pause and how
    /// long it lasted). One cause, one audit entry.
    fn unpause_with(
        &mut self,
        event: impl FnOnce(&rules::Pause, u64) -> Event,
    ) -> Result<bool, QueueError> {
        if self.state.pause.is_none() {
            return Ok(false);
        }
        let since = self.pause_boot;
        self.commit(move |s, ctx| {
            let p = s.pause.take().expect("paused");
            let paused_ms = since.map(|b| ctx.boot.saturating_sub(b)).unwrap_or(0);
            for e in s.entries.iter_mut().filter(|e| e.status.is_open()) {
                e.frozen_ms = e.frozen_ms.saturating_add(paused_ms.min(e.waited_ms));
            }
            let ev = event(&p, paused_ms)
                .field("kind", p.kind.as_str())
                .field("paused_ms", paused_ms);
            Ok((true, vec![ev]))
        })
        .inspect(|_| self.pause_boot = None)
    }

    fn unpause(&mut self, by: &str, kind: &str) -> Result<bool, QueueError> {
        let (by, kind) = (by.to_string(), kind.to_string());
        self.unpause_with(move |p, ms| {
            Event::new(
                &kind,
                format!(
                    "revival resumed by {by} after {} s paused ({}: {})",
                    ms / 1000,
                    p.kind.as_str(),
                    p.reason
                ),
            )
            .priority(priority::NOTICE)
        })
    }

    /// Q-9 Stop(run_id): cancel the run's open entries and record the stop durably.
    pub fn stop(&mut self, caller: &Caller, run_id: &str) -> Result<u32, QueueError> {
        self.require_enabled()?;
        require_mutate(caller, "Stop")?;
        if !entry::valid_run_id(run_id) {
            return Err(QueueError::Invalid {
                field: "run_id".into(),
                why: "must match [A-Za-z0-9._:@-]{1,128}".into(),
            });
        }
        let by = format!("stop by uid {}", caller.uid);
        self.commit(|s, ctx| {
            let mut n = 0;
            for e in s.entries.iter_mut().filter(|e| e.status.is_open() && e.run_id.as_deref() == Some(run_id)) {
                e.record(Some(e.status.clone()), Status::Cancelled, &by, ctx.wall);
                e.status = Status::Cancelled;
                e.terminal_at = Some(ctx.wall);
                n += 1;
            }
            let dropped = rules::record_stop(&mut s.stops, run_id, ctx.wall);
            let ev = Event::new("operator-stop", format!("run {run_id} was stopped by {by}: {n} open entries cancelled; it will not be revived"))
                .priority(priority::NOTICE)
                .field("run_id", run_id)
                .field("cancelled", n);
            let mut events = vec![ev];
            events.extend(dropped.iter().map(stop_dropped));
            Ok((n, events))
        })
    }

    /// Q-9 StopAll: a durable global stop and a `deliberate-halt` pause.
    pub fn stop_all(&mut self, caller: &Caller) -> Result<(), QueueError> {
        self.require_enabled()?;
        require_mutate(caller, "StopAll")?;
        let by = format!("uid {}", caller.uid);
        let (next, change) = rules::apply_pause(
            self.state.pause.as_ref(),
            PauseKind::DeliberateHalt,
            "stop-all",
            self.clock.wall_ms(),
        );
        self.commit(|s, ctx| {
            s.global_stop = Some(ctx.wall);
            let was = s.pause.as_ref().map(|p| p.kind.as_str().to_string());
            s.pause = next;
            let ev = Event::new(
                "stop-all",
                format!(
                    "all revival stopped by {by}: every run queued before now is stopped, and revival is halted \
                     until `outlivectl resume`{}",
                    was.map(|w| format!(" (the {w} pause was upgraded)")).unwrap_or_default()
                ),
            )
            .priority(priority::WARNING);
            Ok(((), vec![ev]))
        })
        .inspect(|_| {
            if change == PauseChange::New {
                self.pause_boot = Some(self.clock.boot_ms());
            }
        })
    }

    // ---- the drainer's transitions (Q-2 compare-and-set, D-6, D-8, D-9, Q-13) ---------------

    /// `queued → starting`: an attempt begins (its unit name recorded first, so a crash during
    /// the start leaves something to reconcile, Q-13). Returns the entry as it now is.
    pub fn begin_attempt(&mut self, id: &str, unit: Option<String>) -> Result<Entry, QueueError> {
        self.commit(|s, ctx| {
            let e = s
                .entries
                .iter_mut()
                .find(|e| e.id == id)
                .ok_or_else(|| QueueError::NotFound(id.to_string()))?;
            expect(e, &Status::Queued, "begin an attempt")?;
            e.record(
                Some(Status::Queued),
                Status::Starting,
                &format!("attempt {}", e.attempts + 1),
                ctx.wall,
            );
            e.status = Status::Starting;
            e.attempt_unit = unit.clone();
            e.attempt_pid = None;
            e.last_attempt_at = Some(ctx.wall);
            e.next_attempt_boot = None;
            Ok((e.clone(), vec![]))
        })
    }

    /// Record the pid and start time of a spawned attempt (no service manager).
    pub fn set_attempt_pid(&mut self, id: &str, pid: (i64, u64)) -> Result<(), QueueError> {
        self.commit(|s, _| {
            if let Some(e) = s.entries.iter_mut().find(|e| e.id == id) {
                e.attempt_pid = Some(pid);
            }
            Ok(((), vec![]))
        })
    }

    /// `starting → revived`, or a failed attempt (`queued` with backoff, or
    /// `gave-up:max-attempts`). Refused (and audited) when the entry is no longer `starting`:
    /// a cancel during the attempt stands; the caller then stops what it started.
    pub fn finish_attempt(
        &mut self,
        id: &str,
        result: AttemptResult,
        backoff_base_ms: u64,
    ) -> Result<Finished, QueueError> {
        let max_attempts = self.settings.max_attempts;
        let current = self
            .state
            .entries
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.status.clone());
        match current {
            None => return Err(QueueError::NotFound(id.to_string())),
            Some(Status::Starting) => {}
            Some(other) => {
                self.audit(
                    Event::new(
                        "transition-refused",
                        format!("the attempt on {id} ended ({}), but the entry is {other} now: that stands", result.word()),
                    )
                    .priority(priority::NOTICE)
                    .field("entry_id", id)
                    .field("status", &other)
                    .field("outcome", result.word()),
                );
                return Ok(Finished::Superseded(other));
            }
        }
        self.commit(|s, ctx| {
            let e = s.entries.iter_mut().find(|e| e.id == id).expect("present");
            let label = e.label();
            let key = e.key();
            match result {
                AttemptResult::Revived { at_boot } => {
                    e.record(Some(Status::Starting), Status::Revived, if at_boot { "verified at boot" } else { "verified" }, ctx.wall);
                    e.status = Status::Revived;
                    e.terminal_at = Some(ctx.wall);
                    s.ledger.record(&key, ctx.wall);
                    let mut ev = Event::new(
                        "revived",
                        format!(
                            "revived {label} ({id}): the run was restarted{}{} (restarted, not resumed: only the restart is known)",
                            e.attempt_unit.as_deref().map(|u| format!(" as {u}")).unwrap_or_default(),
                            if at_boot { ", verified when outlived started again" } else { "" }
                        ),
                    )
                    .alert(Alert::RunRevived)
                    .field("entry_id", id)
                    .field("key", &key)
                    .field("attempt", e.attempts + 1)
                    .field("unit", e.attempt_unit.clone().unwrap_or_default());
                    if at_boot {
                        ev = ev.field("verified_at_boot", true);
                    }
                    Ok((Finished::Revived, vec![ev]))
                }
                AttemptResult::Failed { why, backoff } => {
                    e.attempts += 1;
                    if e.attempts >= max_attempts {
                        let status = Status::GaveUp("max-attempts".into());
                        e.record(Some(Status::Starting), status.clone(), &why, ctx.wall);
                        e.status = status;
                        e.terminal_at = Some(ctx.wall);
                        let ev = Event::new(
                            "gave-up",
                            format!(
                                "could not bring {label} back: {} attempts failed (last: {why}); `outlivectl requeue {id}` tries again",
                                e.attempts
                            ),
                        )
                        .alert(Alert::RevivalGaveUp)
                        .field("entry_id", id)
                        .field("attempts", e.attempts)
                        .field("why", &why);
                        Ok((Finished::GaveUp, vec![ev]))
                    } else {
                        e.record(Some(Status::Starting), Status::Queued, &why, ctx.wall);
                        e.status = Status::Queued;
                        e.wait_anchor_boot = ctx.boot;
                        let delay = if backoff { backoff_base_ms.saturating_mul(1 << (e.attempts - 1).min(30)) } else { 0 };
                        e.next_attempt_boot = (delay > 0).then_some(ctx.boot + delay);
                        let ev = Event::new(
                            "attempt-failed",
                            format!("attempt {} to revive {label} ({id}) failed: {why}; next try in {} s", e.attempts, delay / 1000),
                        )
                        .priority(priority::WARNING)
                        .field("entry_id", id)
                        .field("attempt", e.attempts)
                        .field("why", &why)
                        .field("backoff_ms", delay);
                        Ok((Finished::Failed, vec![ev]))
                    }
                }
            }
        })
    }

    /// D-6: `queued → invalidated:<why>`; audited, and raised when `live` (not in dry run).
    pub fn invalidate(
        &mut self,
        id: &str,
        why: &str,
        detail: &str,
        live: bool,
    ) -> Result<(), QueueError> {
        self.commit(|s, ctx| {
            let e = s
                .entries
                .iter_mut()
                .find(|e| e.id == id)
                .ok_or_else(|| QueueError::NotFound(id.to_string()))?;
            expect(e, &Status::Queued, "invalidate")?;
            let status = Status::Invalidated(why.to_string());
            e.record(Some(Status::Queued), status.clone(), detail, ctx.wall);
            e.status = status;
            e.terminal_at = Some(ctx.wall);
            let mut ev = Event::new(
                "invalidated",
                format!("{} ({id}) will not be revived: {why} ({detail})", e.label()),
            )
            .field("entry_id", id)
            .field("why", why);
            ev = if live {
                ev.alert(Alert::QueueNotice)
            } else {
                ev.priority(priority::NOTICE)
            };
            Ok(((), vec![ev]))
        })
    }

    /// D-6: a check that could not decide: keep the entry queued, retry after `delay_ms`.
    pub fn defer(&mut self, id: &str, delay_ms: u64, why: &str) -> Result<(), QueueError> {
        self.commit(|s, ctx| {
            let e = s.entries.iter_mut().find(|e| e.id == id).ok_or_else(|| QueueError::NotFound(id.to_string()))?;
            e.next_attempt_boot = Some(ctx.boot + delay_ms);
            let ev = Event::new(
                "check-undecided",
                format!("could not check {} ({id}) before reviving it: {why}; it stays queued and is checked again in {} s", e.label(), delay_ms / 1000),
            )
            .priority(priority::NOTICE)
            .field("entry_id", id)
            .field("why", why);
            Ok(((), vec![ev]))
        })
    }

    /// P-5: the stale emergency pause heals itself (Q-12's credit applies).
    pub fn auto_resume_stale(&mut self, why: &str) -> Result<bool, QueueError> {
        let why = why.to_string();
        self.unpause_with(move |p, ms| {
            let msg = format!(
                "revival resumed by itself after {} s: the emergency pause ({}) was stale ({why}). Runs that were \
                 explicitly stopped stay stopped.",
                ms / 1000,
                p.reason
            );
            Event::new("auto-resumed-stale-pause", msg).alert(Alert::StalePauseAutoResumed)
        })
    }

    /// The CLOCK_BOOTTIME of the pause's start (in memory).
    pub fn pause_boot(&self) -> Option<u64> {
        self.pause_boot
    }

    // ---- the tick (D-2 steps 2, 4, 5; Q-14 retry) -------------------------------------------

    /// Q-11 TTL sweep (skipped while paused). Returns the number expired.
    pub fn sweep_ttl(&mut self) -> usize {
        if self.require_enabled().is_err() || self.state.pause.is_some() {
            return 0;
        }
        self.advance_waiting(false);
        let ttl = self.settings.ttl_ms;
        if !self
            .state
            .entries
            .iter()
            .any(|e| rules::ttl_expired(e, ttl))
        {
            return 0;
        }
        let live = !self.settings.dry_run;
        let hours = ttl / 3_600_000;
        self.commit(|s, ctx| {
            let mut events = vec![];
            let (mut n, mut starved) = (0, 0);
            for e in s.entries.iter_mut().filter(|e| rules::ttl_expired(e, ttl)) {
                e.pressure_starved = rules::pressure_starved(e);
                let status = Status::GaveUp("ttl".into());
                e.record(Some(Status::Queued), status.clone(), "ttl", ctx.wall);
                e.status = status;
                e.terminal_at = Some(ctx.wall);
                n += 1;
                starved += usize::from(e.pressure_starved);
                events.push(
                    Event::new(
                        "entry-expired",
                        format!("{} ({}) waited more than {hours} h and gave up", e.label(), e.id),
                    )
                    .priority(priority::NOTICE)
                    .field("entry_id", &e.id)
                    .field("waited_ms", e.waited_ms)
                    .field("pressure_starved", e.pressure_starved),
                );
            }
            if live {
                events.push(
                    Event::new(
                        "ttl-expired",
                        format!("{n} runs waited more than {hours} h and were dropped ({starved} starved by pressure)"),
                    )
                    .alert(Alert::QueueNotice)
                    .field("count", n)
                    .field("starved", starved),
                );
            }
            Ok((n, events))
        })
        .unwrap_or(0)
    }

    /// Retention and ledger expiry, applied to the current state without a write of its
    /// own (the next save carries it).
    fn prune(&mut self, now: u64) {
        self.state.ledger.expire(now);
        self.state
            .stops
            .retain(|s| now.saturating_sub(s.at) < STOP_RETENTION_MS);
        for d in rules::tidy_stops(&mut self.state.stops) {
            self.audit(stop_dropped(&d));
        }
        let mut terminal: Vec<(u64, String)> = self
            .state
            .entries
            .iter()
            .filter(|e| !e.status.is_open())
            .map(|e| (e.terminal_at.unwrap_or(e.queued_at), e.id.clone()))
            .collect();
        terminal.sort();
        let excess = terminal.len().saturating_sub(rules::RETENTION_MAX);
        let mut drop: std::collections::HashSet<String> = terminal
            .iter()
            .take(excess)
            .map(|(_, id)| id.clone())
            .collect();
        drop.extend(
            terminal
                .iter()
                .filter(|(t, _)| now.saturating_sub(*t) > rules::RETENTION_MS)
                .map(|(_, id)| id.clone()),
        );
        if !drop.is_empty() {
            self.state.entries.retain(|e| !drop.contains(&e.id));
        }
    }

    /// The housekeeping part of a tick: retention, the persist retry, and a checkpoint of the
    /// waiting time every 10 minutes while entries wait.
    pub fn housekeeping(&mut self) {
        if self.loaded {
            let now = self.clock.wall_ms();
            self.prune(now);
        }
        if self.persist_failed.is_some() {
            self.retry_persist();
        } else if self.loaded
            && self.clock.boot_ms().saturating_sub(self.saved_boot) >= CHECKPOINT_MS
            && self
                .state
                .entries
                .iter()
                .any(|e| e.status == Status::Queued)
        {
            let _ = self.commit(|_, _| Ok(((), vec![])));
        }
    }
}

/// How an attempt ended (D-9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptResult {
    /// Verified alive or completed; `at_boot` when found by boot reconciliation.
    Revived { at_boot: bool },
    /// A failed attempt; `backoff` false for Q-13 (requeued without backoff).
    Failed { why: String, backoff: bool },
}

impl AttemptResult {
    fn word(&self) -> &'static str {
        match self {
            AttemptResult::Revived { .. } => "revived",
            AttemptResult::Failed { .. } => "failed",
        }
    }
}

/// What `finish_attempt` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    Revived,
    Failed,
    GaveUp,
    /// The entry left `starting` meanwhile (a cancel); its status.
    Superseded(Status),
}

/// a transition names the status it expects to leave.
/// Q-15 as amended: the notice for items set aside while loading. It stays in the attention
/// item until acknowledged (G-9), and says how many, where, and what to do.
fn salvage_notice(
    state_dir: &Path,
    set_aside: &[store::SetAside],
    sidecar: &Path,
    paused_because: Option<String>,
) -> Event {
    let entries = set_aside.iter().filter(|a| a.field == "entries").count();
    let whys: Vec<String> = set_aside
        .iter()
        .take(3)
        .map(|a| match &a.at {
            Some(at) => format!("{}[{at}]: {}", a.field, a.why),
            None => format!("{}: {}", a.field, a.why),
        })
        .collect();
    let mut message = format!(
        "{} item(s) of the queue state {} could not be read ({} entries) and were set aside in {} ({}{});          everything else loaded. Recover what they held by hand (enqueue a run again), then `outlivectl ack`.",
        set_aside.len(),
        state_dir.join(store::STATE_FILE).display(),
        entries,
        sidecar.display(),
        whys.join("; "),
        if set_aside.len() > whys.len() {
            "; …"
        } else {
            ""
        },
    );
    if let Some(why) = paused_because {
        message.push_str(&format!(
            " Revival is paused (maintenance) because {why}: run `outlivectl resume` once you have checked."
        ));
    }
    Event::new("state-salvaged", message)
        .alert(Alert::QueueNotice)
        .field("set_aside", set_aside.len())
        .field("entries", entries)
        .field("sidecar", sidecar.display())
}

fn expect(e: &Entry, want: &Status, what: &str) -> Result<(), QueueError> {
    if &e.status == want {
        Ok(())
    } else {
        Err(QueueError::Invalid {
            field: "status".into(),
            why: format!("cannot {what}: {} is {}, not {want}", e.id, e.status),
        })
    }
}

/// Mutation context: the clocks, read once.
struct Ctx {
    wall: u64,
    boot: u64,
}

fn require_mutate(caller: &Caller, what: &str) -> Result<(), QueueError> {
    if caller.may_mutate {
        Ok(())
    } else {
        Err(QueueError::AccessDenied(format!(
            "{what}: uid {} is neither root nor a member of group `outlive`",
            caller.uid
        )))
    }
}

fn check_id(id: &str) -> Result<(), QueueError> {
    if entry::valid_id(id) {
        Ok(())
    } else {
        Err(QueueError::Invalid {
            field: "id".into(),
            why: format!("{id:?} is not an entry id (rq-…-…)"),
        })
    }
}

/// Advance waiting (and calm) time of queued entries to `now` (CLOCK_BOOTTIME).
fn advance(entries: &mut [Entry], now: u64, calm: bool) {
    for e in entries.iter_mut() {
        let delta = now.saturating_sub(e.wait_anchor_boot);
        e.wait_anchor_boot = now;
        if e.status == Status::Queued {
            e.waited_ms = e.waited_ms.saturating_add(delta);
            if calm {
                e.calm_ms = e.calm_ms.saturating_add(delta);
            }
        }
    }
}

/// The audit line of a stop dropped to keep at most [`rules::MAX_STOPS`].
fn stop_dropped(s: &RunStop) -> Event {
    Event::new(
        "stop-dropped",
        format!(
            "the operator stop of run {} recorded at {} was forgotten: at most {} stops are kept \
             (entries queued before it were cancelled when it was recorded)",
            s.run_id,
            crate::clock::rfc3339_ms(s.at),
            rules::MAX_STOPS
        ),
    )
    .priority(priority::NOTICE)
    .field("run_id", &s.run_id)
}

/// A new queued entry for `req`, run as `(uid, gid)`, queued by the caller `by`.
fn new_entry(id: &str, req: &Request, (uid, gid): (u32, u32), by: u32, ctx: &Ctx) -> Entry {
    Entry {
        id: id.to_string(),
        run_id: req.run_id.clone(),
        job: req.job.clone(),
        session: req.session.clone(),
        target: req.target.clone().expect("validated"),
        uid,
        gid,
        enqueued_by: Some(by),
        cwd: req.cwd.clone().expect("validated"),
        worktree: req.worktree.clone(),
        class: req.class(),
        reason: entry::clamp_reason(&req.reason),
        active_run: req.is_active_run(),
        run_state_file: req.run_state_file.clone(),
        evidence: req.evidence.clone(),
        status: Status::Queued,
        attempts: 0,
        attempt_unit: None,
        attempt_pid: None,
        reaped_at: req.reaped_at.unwrap_or(ctx.wall),
        queued_at: ctx.wall,
        requeued_at: None,
        last_attempt_at: None,
        next_attempt_at: None,
        waited_ms: 0,
        calm_ms: 0,
        frozen_ms: 0,
        pressure_starved: false,
        terminal_at: None,
        history: vec![],
        next_attempt_boot: None,
        wait_anchor_boot: ctx.boot,
    }
}

#[cfg(test)]
pub(crate) mod tests;
