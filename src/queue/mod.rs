//! The revival queue and its host lock (SPEC §2, §3).
//!
//! - `lock`: L-1 to L-8, the decision table and the born-locked file;
//! - `entry`, entries, statuses, evidence, formats;
//! - `rules`: and P-1 as pure functions;
//! - `store`, the durable state file;
//! - this file: [`Queue`], which holds the lock and the state and applies the rules. Every
//!   mutation is applied to a copy, persisted, and only then made current and acknowledged
//!   (`commit`); a failed persist rolls back, is audited and is retried on each tick. While the
//!   lock is not held nothing is written under the state directory (L-6);
//! - `Queue`'s operations by concern: `lifecycle` (the lock, loading, read-only when not held),
//!   `ops` (operators' and reporters' mutations), `attempts` (the drainer's transitions),
//!   `housekeeping` (waiting time, TTL, retention, the persist retry).

pub mod entry;
pub mod lock;
pub mod rules;
pub mod runs;
pub mod store;

mod attempts;
mod housekeeping;
mod lifecycle;
mod ops;

pub use attempts::{AttemptResult, Finished};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::audit::{Alert, AuditSink, Auditor, Event, EventKind, priority};
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
    /// `capture.max_watched` (C-2).
    pub max_watched: usize,
    /// `capture.evidence_policy`: the default of watched runs (C-2).
    pub evidence_policy: runs::EvidencePolicy,
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
            max_watched: c.capture.max_watched as usize,
            evidence_policy: runs::EvidencePolicy::parse(&c.capture.evidence_policy)
                .unwrap_or_default(),
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
    /// The watch records (C-2), on the same terms.
    pub runs: Result<Arc<Vec<runs::RunRecord>>, QueueError>,
}

/// The queue as the agent's loops and the bus share it: the queue behind a mutex, taken by
/// those that may wait (the drainer, the blocking pool that applies the bus's mutations), and a
/// published [`View`] for those that may not (the bus dispatch thread reads it and never
/// touches the mutex). Every guard that changed the queue republishes the view when dropped.
pub struct Shared {
    inner: std::sync::Mutex<Queue>,
    view: std::sync::RwLock<Arc<View>>,
    /// Told when the published watch records change (capture looks at them then).
    runs_changed: tokio::sync::Notify,
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
            runs_changed: tokio::sync::Notify::new(),
        })
    }

    /// Notified when the watch records in the published view change (C-2: capture follows a
    /// record a revival made active again without waiting for its next pass).
    pub fn runs_changed(&self) -> &tokio::sync::Notify {
        &self.runs_changed
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
            let old = self.shared.view();
            let v = Arc::new(self.g.view_since(Some(&old)));
            *self.shared.view.writing() = Arc::clone(&v);
            let changed = match (&old.runs, &v.runs) {
                (Ok(a), Ok(b)) => !Arc::ptr_eq(a, b) && a != b,
                (a, b) => a.is_ok() != b.is_ok(),
            };
            if changed {
                self.shared.runs_changed.notify_one();
            }
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
    /// L-6: the entries on disk as last read while the lock is not held (for counts only).
    observed: Option<Vec<Entry>>,
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
            observed: None,
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
        let boot_id = self.env.as_ref().map(|e| e.ours.boot_id.to_hex());
        runs::mirror(&mut next, boot_id.as_deref());
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
                            EventKind::PersistRecovered,
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
                    EventKind::PersistFailed,
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
        self.view_since(None)
    }

    /// What [`Shared`] publishes, reusing what `old` published where nothing changed: an idle
    /// agent republishes after every heartbeat, and copies nothing then.
    fn view_since(&self, old: Option<&View>) -> View {
        View {
            snapshot: self.snapshot(),
            entries: self
                .require_enabled()
                .map(|()| match old.map(|v| &v.entries) {
                    Some(Ok(e)) if **e == self.state.entries => Arc::clone(e),
                    _ => Arc::new(self.state.entries.clone()),
                }),
            runs: self
                .require_enabled()
                .map(|()| Arc::clone(&self.state.runs)),
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
}

/// a transition names the status it expects to leave.
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

#[cfg(test)]
pub(crate) mod tests;
