//! Capture's effects (SPEC C-1, C-3, C-4, C-9, C-11): one task on the agent's runtime that
//! holds its own connection to the service manager, subscribed (`Manager.Subscribe`: systemd
//! sends unit signals only to subscribers), and
//!
//! - feeds each watched invocation's [`Tracker`] with its unit's signals and records the end
//!   it reports through the queue (a reap is queued in the same write), then unloads the
//!   ended run unit (`StopUnit` when `active (exited)`, `ResetFailedUnit` when `failed`) so
//!   the name can be used again and the host does not stay `degraded`;
//! - starts runs for `Runs1.Run` (the record is already durable) and answers when the start
//!   job has finished;
//! - reconciles every record after a gap ([`reconcile`]): at start, after the subscription is
//!   rebuilt (with backoff, 1 s doubling to 30 s), and when the queue's lock is held again;
//! - watches the units `capture.units` matches;
//! - says how it fares, for the `capture.watch` guard ([`Health`]).
//!
//! Queue writes (which fsync) run on the blocking pool, never on this task.

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use zbus::Connection;
use zbus::wire::{OwnedObjectPath, OwnedVariant, Variant as Value};

use super::classify;
use super::reconcile::{Reconciled, UnitNow, reconcile};
use super::track::{ServiceSignal, Step, Tracker, UnitSignal};
use crate::audit::{AuditSink, Event, EventKind, priority};
use crate::drainer::manager::{Transient, UnitRow};
use crate::queue::SharedQueue;
use crate::queue::entry::Target;
use crate::queue::runs::{EndNote, Ended, How, RunRecord, RunState};
use crate::sync::MutexExt;

const SD: &str = "org.freedesktop.systemd1";
const SD_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";
const UNIT_IFACE: &str = "org.freedesktop.systemd1.Unit";
const SERVICE_IFACE: &str = "org.freedesktop.systemd1.Service";
/// One call to the manager.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `Run` waits for the start job.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Housekeeping: adopt, reconcile, `capture.units`, `seen_active_at`, and a sign of life from
/// the manager (a lost connection ends the signal stream at once). Records that change (a
/// `Run`, a revival) are looked at when they change, not at the next pass.
const PASS_EVERY: Duration = Duration::from_secs(60);
const BACKOFF_MIN_MS: u64 = 1_000;
const BACKOFF_MAX_MS: u64 = 30_000;

/// How capture fares (C-9).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// Subscribed to the service manager now.
    pub subscribed: bool,
    /// Every record reconciled since the subscription was made.
    pub reconciled: bool,
    /// CLOCK_BOOTTIME ms since when there is no subscription (None while subscribed).
    pub down_since_ms: Option<u64>,
    pub last_error: String,
    /// Records watched and active.
    pub watching: usize,
}

/// Why a run could not be started (`Run` fails with it; the record is gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartRunError {
    /// The manager refused or the start job did not finish `done`.
    Failed(String),
    /// No service manager to ask.
    Unreachable(String),
}

/// What the bus asks of capture.
enum Command {
    /// Start the record's unit (the record is durable) and answer with the unit.
    Start {
        rec: Box<RunRecord>,
        reply: oneshot::Sender<Result<String, StartRunError>>,
    },
    /// Read a unit (for `Watch`: it must be loaded and active).
    Read {
        unit: String,
        reply: oneshot::Sender<Result<Option<UnitNow>, String>>,
    },
    /// Stop a run's unit (`Stop(run_id)`, Q-9): its end reads `stopped`.
    Stop { unit: String },
}

/// The handle the bus and the agent hold.
#[derive(Clone)]
pub struct Capture {
    tx: mpsc::UnboundedSender<Command>,
    health: Arc<Mutex<Health>>,
    /// Whether there is a service manager to watch (C-10).
    pub booted: bool,
}

impl Capture {
    /// How capture fares.
    pub fn health(&self) -> Health {
        self.health.locked().clone()
    }

    /// C-1: start `rec`'s transient unit; the unit's name once its start job is `done`.
    pub async fn start(&self, rec: RunRecord) -> Result<String, StartRunError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Start {
                rec: Box::new(rec),
                reply,
            })
            .map_err(|_| StartRunError::Unreachable("capture is not running".into()))?;
        rx.await
            .unwrap_or_else(|_| Err(StartRunError::Unreachable("capture stopped".into())))
    }

    /// A unit's state now (None: not loaded).
    pub async fn read(&self, unit: &str) -> Result<Option<UnitNow>, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Read {
                unit: unit.to_string(),
                reply,
            })
            .map_err(|_| "capture is not running".to_string())?;
        rx.await
            .unwrap_or_else(|_| Err("capture stopped".to_string()))
    }

    /// Stop a run's unit (its end is then `stopped`).
    pub fn stop_unit(&self, unit: &str) {
        let _ = self.tx.send(Command::Stop {
            unit: unit.to_string(),
        });
    }
}

/// Who hears of ends (the bus emits `RunEnded`).
pub type OnEnd = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// The watcher task's parts.
pub struct Watcher {
    queue: SharedQueue,
    audit: Arc<dyn AuditSink>,
    applied: crate::config::Applied,
    user: bool,
    boot_id: String,
    rx: mpsc::UnboundedReceiver<Command>,
    health: Arc<Mutex<Health>>,
    jobs: Arc<Mutex<Jobs>>,
    on_end: Arc<Mutex<Option<OnEnd>>>,
    trackers: HashMap<String, Watched>,
    /// Inside `Reloading(true)…(false)`: `UnitRemoved` is not an end.
    reloading: bool,
    /// The queue was usable at the last pass (a lock held again means a reconcile).
    queue_ok: bool,
    backoff_ms: u64,
    /// What capture last said it uses (`capture.units`, `capture.evidence_policy`).
    uses: Option<(Vec<String>, String)>,
    /// Wall ms this watcher was made: a record made since without an invocation is a start in
    /// flight, not one a previous agent never started.
    started_at: u64,
}

/// One tracked unit.
struct Watched {
    run_id: String,
    tracker: Tracker,
    /// The unit's `ActiveState`/`SubState` at its last signal (to unload it after its end).
    last: (String, String),
    /// Whether the unit is a run unit the agent unloads after its end.
    ours: bool,
}

/// The manager's signals, as they arrive (or the error that ended the stream).
type Signals = mpsc::UnboundedReceiver<zbus::Result<zbus::Message>>;

/// A run the agent spawned itself (C-10): its child, to read its wait status.
struct Spawned {
    run_id: String,
    child: std::process::Child,
}

/// How often spawned runs are reaped when SIGCHLD cannot be followed (C-10; only while there
/// are some). With SIGCHLD, an idle agent with spawned runs does not wake for them.
const REAP_EVERY: Duration = Duration::from_millis(250);

/// A spawned run's invocation: its pid and start time (C-10).
fn pid_invocation(pid: i64, start: u64) -> String {
    format!("pid:{pid}:{start}")
}

fn parse_pid_invocation(s: &str) -> Option<(i64, u64)> {
    let mut it = s.strip_prefix("pid:")?.split(':');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Start jobs waited for, and those that ended before anyone waited.
#[derive(Default)]
struct Jobs {
    waiting: HashMap<String, oneshot::Sender<String>>,
    removed: VecDeque<(String, String)>,
}

/// Make capture: the handle, the task's parts, and where to say that a run ended.
pub fn new(
    queue: SharedQueue,
    audit: Arc<dyn AuditSink>,
    applied: crate::config::Applied,
    user: bool,
    boot_id: String,
) -> (Capture, Watcher, Arc<Mutex<Option<OnEnd>>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let health = Arc::new(Mutex::new(Health {
        down_since_ms: Some(crate::clock::boottime_ms()),
        ..Health::default()
    }));
    let on_end: Arc<Mutex<Option<OnEnd>>> = Arc::default();
    let booted = crate::drainer::manager::Systemd::booted();
    (
        Capture {
            tx,
            health: Arc::clone(&health),
            booted,
        },
        Watcher {
            queue,
            audit,
            applied,
            user,
            boot_id,
            rx,
            health,
            jobs: Arc::default(),
            on_end: Arc::clone(&on_end),
            trackers: HashMap::new(),
            reloading: false,
            queue_ok: false,
            backoff_ms: 0,
            uses: None,
            started_at: crate::clock::wall_ms(),
        },
        on_end,
    )
}

const UNIT_PATHS: &str = "/org/freedesktop/systemd1/unit/";

/// A unit's object path (`/org/freedesktop/systemd1/unit/<name, bus-escaped>`).
pub fn unit_path(unit: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(UNIT_PATHS.len() + unit.len() * 2);
    out.push_str(UNIT_PATHS);
    for b in unit.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            let _ = write!(out, "_{b:02x}");
        }
    }
    out
}

/// The unit an object path names (the inverse of [`unit_path`]); None for any other path.
/// A signal is matched to its tracker by this, without escaping every watched unit's name.
pub fn path_unit(path: &str) -> Option<String> {
    let escaped = path.strip_prefix(UNIT_PATHS)?.as_bytes();
    let mut out = Vec::with_capacity(escaped.len());
    let mut i = 0;
    while i < escaped.len() {
        match escaped[i] {
            b'_' => {
                let hex = std::str::from_utf8(escaped.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if b.is_ascii_alphanumeric() => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// Properties as a reply or a signal carries them, borrowed from the message.
type Props<'m> = HashMap<&'m str, Value<'m>>;

fn invocation_hex(v: &Value<'_>) -> Option<String> {
    let Value::Array(a) = v else { return None };
    let bytes: Vec<u8> = a
        .iter()
        .filter_map(|x| match x {
            Value::U8(b) => Some(*b),
            _ => None,
        })
        .collect();
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn job_id(v: &Value<'_>) -> Option<u32> {
    match v {
        Value::Structure(s) => match s.fields().first() {
            Some(Value::U32(id)) => Some(*id),
            _ => None,
        },
        _ => None,
    }
}

fn str_of(v: &Value<'_>) -> Option<String> {
    match v {
        Value::Str(s) => Some(s.to_string()),
        _ => None,
    }
}

fn i32_of(v: &Value<'_>) -> Option<i32> {
    match v {
        Value::I32(n) => Some(*n),
        _ => None,
    }
}

fn u64_of(v: &Value<'_>) -> Option<u64> {
    match v {
        Value::U64(n) => Some(*n),
        _ => None,
    }
}

fn unit_signal(props: &Props<'_>) -> UnitSignal {
    let get = |k: &str| props.get(k);
    UnitSignal {
        active_state: get("ActiveState").and_then(str_of),
        sub_state: get("SubState").and_then(str_of),
        job: get("Job").and_then(job_id),
        invocation_id: get("InvocationID").and_then(invocation_hex),
    }
}

fn service_signal(props: &Props<'_>) -> ServiceSignal {
    let get = |k: &str| props.get(k);
    ServiceSignal {
        result: get("Result").and_then(str_of),
        code: get("ExecMainCode").and_then(i32_of),
        status: get("ExecMainStatus").and_then(i32_of),
        exit_us: get("ExecMainExitTimestamp").and_then(u64_of),
    }
}

fn success_statuses(props: &Props<'_>) -> Vec<i32> {
    // `SuccessExitStatus` is `(aiai)`: statuses, then signals.
    match props.get("SuccessExitStatus") {
        Some(Value::Structure(s)) => match s.fields().first() {
            Some(Value::Array(a)) => a.iter().filter_map(i32_of).collect(),
            _ => vec![],
        },
        _ => vec![],
    }
}

/// The manager, over one connection.
struct Manager {
    conn: Connection,
}

impl Manager {
    async fn call<B>(
        &self,
        path: &str,
        iface: &str,
        method: &str,
        body: &B,
    ) -> Result<zbus::Message, String>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        match tokio::time::timeout(
            CALL_TIMEOUT,
            self.conn
                .call_method(Some(SD), path, Some(iface), method, body),
        )
        .await
        {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "systemd did not answer {method} within {} s",
                CALL_TIMEOUT.as_secs()
            )),
        }
    }

    /// `GetAll` of one interface: the reply (its body reads as [`Props`]).
    async fn get_all(&self, path: &str, iface: &str) -> Result<zbus::Message, String> {
        self.call(path, "org.freedesktop.DBus.Properties", "GetAll", &(iface,))
            .await
    }

    /// A unit's state (None: not loaded). `Err` when the manager did not answer.
    async fn read(&self, unit: &str) -> Result<Option<UnitNow>, String> {
        let path: OwnedObjectPath = match self.call(SD_PATH, MANAGER, "GetUnit", &(unit,)).await {
            Ok(m) => m.body().deserialize().map_err(|e| e.to_string())?,
            Err(e) if e.contains("NoSuchUnit") || e.contains("not loaded") => return Ok(None),
            Err(e) => return Err(e),
        };
        let u = self.get_all(path.as_str(), UNIT_IFACE).await?;
        let s = if unit.ends_with(".service") {
            Some(self.get_all(path.as_str(), SERVICE_IFACE).await?)
        } else {
            None
        };
        let (ub, sb) = (u.body(), s.as_ref().map(zbus::Message::body));
        let u: Props<'_> = ub.deserialize().map_err(|e| e.to_string())?;
        let s: Props<'_> = match &sb {
            Some(b) => b.deserialize().map_err(|e| e.to_string())?,
            None => HashMap::new(),
        };
        let us = unit_signal(&u);
        let ss = service_signal(&s);
        Ok(Some(UnitNow {
            active_state: us.active_state.unwrap_or_default(),
            sub_state: us.sub_state.unwrap_or_default(),
            invocation_id: us.invocation_id.unwrap_or_default(),
            job: us.job.unwrap_or(0),
            result: ss.result.unwrap_or_default(),
            code: ss.code.unwrap_or(0),
            status: ss.status.unwrap_or(0),
            exit_us: ss.exit_us.unwrap_or(0),
            success_statuses: success_statuses(&s),
        }))
    }

    async fn system_stopping(&self) -> bool {
        let Ok(m) = self
            .call(
                SD_PATH,
                "org.freedesktop.DBus.Properties",
                "Get",
                &(MANAGER, "SystemState"),
            )
            .await
        else {
            return false;
        };
        matches!(m.body().deserialize::<OwnedVariant>().ok().and_then(|v| str_of(&v)), Some(s) if s == "stopping")
    }

    async fn unload(&self, unit: &str, last_active: &str) {
        let r = match last_active {
            "failed" => self
                .call(SD_PATH, MANAGER, "ResetFailedUnit", &(unit,))
                .await
                .map(|_| ()),
            "active" => self
                .call(SD_PATH, MANAGER, "StopUnit", &(unit, "replace"))
                .await
                .map(|_| ()),
            _ => Ok(()),
        };
        if let Err(e) = r {
            tracing::debug!("unloading {unit}: {e}");
        }
    }
}

impl Watcher {
    /// Until `shutdown`: subscribe, serve, resubscribe after a loss. Without a service manager
    /// (`booted` false) it only follows the configuration and answers commands (C-10).
    pub async fn run(mut self, booted: bool, mut shutdown: watch::Receiver<bool>) {
        self.follow_config();
        if !booted {
            return self.idle(&mut shutdown).await;
        }
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.subscribe().await {
                Ok((mgr, stream)) => {
                    self.backoff_ms = 0;
                    self.serve(&mgr, stream, &mut shutdown).await;
                }
                Err(e) => self.down(&e),
            }
            if *shutdown.borrow() {
                return;
            }
            self.backoff_ms = (self.backoff_ms * 2).clamp(BACKOFF_MIN_MS, BACKOFF_MAX_MS);
            let wait = tokio::time::sleep(Duration::from_millis(self.backoff_ms));
            tokio::pin!(wait);
            // Commands are answered meanwhile (the manager is unreachable).
            loop {
                tokio::select! {
                    () = &mut wait => break,
                    _ = shutdown.changed() => return,
                    c = self.rx.recv() => match c {
                        None => return,
                        Some(c) => self.refuse(c),
                    },
                }
            }
        }
    }

    /// No service manager here (C-10): runs are spawned by the agent and tracked by pid and
    /// start time; while the agent is their parent, the wait status classifies their end.
    async fn idle(&mut self, shutdown: &mut watch::Receiver<bool>) {
        let mut children: Vec<Spawned> = Vec::new();
        let mut sigchld =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).ok();
        let mut reap = tokio::time::interval(REAP_EVERY);
        reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pass = tokio::time::interval(PASS_EVERY);
        pass.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let queue = Arc::clone(&self.queue);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                r = self.applied.changed() => {
                    if r.is_err() {
                        return;
                    }
                    self.follow_config();
                }
                c = self.rx.recv() => match c {
                    None => return,
                    Some(Command::Start { rec, reply }) => {
                        let _ = reply.send(self.spawn_run(&rec, &mut children).await);
                    }
                    Some(c) => self.refuse(c),
                },
                () = async {
                    match &mut sigchld {
                        Some(s) => {
                            s.recv().await;
                        }
                        None => {
                            reap.tick().await;
                        }
                    }
                }, if !children.is_empty() => self.reap(&mut children).await,
                () = queue.runs_changed().notified() => self.pass_unbooted(&children).await,
                _ = pass.tick() => {
                    self.reap(&mut children).await;
                    self.pass_unbooted(&children).await;
                }
            }
        }
    }

    /// C-10: spawn `rec`'s argv as D-9's spawn path does; the record takes the pid and start
    /// time as its invocation.
    async fn spawn_run(
        &mut self,
        rec: &RunRecord,
        children: &mut Vec<Spawned>,
    ) -> Result<String, StartRunError> {
        let Target::Exec { exec, env } = &rec.target else {
            return Err(StartRunError::Failed(
                "not a run started through outlived".into(),
            ));
        };
        let mut env = env.clone();
        env.insert("OUTLIVE_RUN_ID".into(), rec.run_id.clone());
        let spec = crate::drainer::spawn::SpawnSpec {
            id: rec.run_id.clone(),
            argv: exec.clone(),
            cwd: rec.worktree.clone().unwrap_or_else(|| rec.cwd.clone()),
            uid: rec.uid,
            gid: rec.gid,
            env,
        };
        let runtime_dir = self.applied.borrow().runtime_dir.clone();
        let q = Arc::clone(&self.queue);
        let run_id = rec.run_id.clone();
        match crate::drainer::spawn::spawn(&spec, &runtime_dir) {
            Ok((child, pid, start)) => {
                children.push(Spawned {
                    run_id: run_id.clone(),
                    child,
                });
                let (inv, boot) = (pid_invocation(pid, start), self.boot_id.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    q.lock().run_active(&run_id, "", &inv, &boot)
                })
                .await;
                Ok(String::new())
            }
            Err(e) => {
                let _ = tokio::task::spawn_blocking(move || q.lock().run_drop(&run_id, None)).await;
                Err(StartRunError::Failed(format!(
                    "cannot start {}: {e}",
                    exec[0]
                )))
            }
        }
    }

    /// C-10: the wait status of an ended child classifies its end (rows 5–8).
    async fn reap(&mut self, children: &mut Vec<Spawned>) {
        let mut ended = vec![];
        children.retain_mut(|s| match s.child.try_wait() {
            Ok(Some(status)) => {
                ended.push((s.run_id.clone(), s.child.id(), status));
                false
            }
            Ok(None) => true,
            Err(_) => false,
        });
        for (run_id, pid, status) in ended {
            use std::os::unix::process::ExitStatusExt;
            let facts = match (status.code(), status.signal()) {
                (Some(c), _) => classify::EndFacts {
                    code: classify::CLD_EXITED,
                    status: c,
                    ..Default::default()
                },
                (None, Some(sig)) => classify::EndFacts {
                    code: if status.core_dumped() {
                        classify::CLD_DUMPED
                    } else {
                        classify::CLD_KILLED
                    },
                    status: sig,
                    ..Default::default()
                },
                (None, None) => classify::EndFacts::default(),
            };
            let inv = self
                .queue
                .view()
                .runs
                .as_ref()
                .ok()
                .and_then(|rs| {
                    rs.iter()
                        .find(|r| r.run_id == run_id)
                        .map(|r| r.invocation_id.clone())
                })
                .unwrap_or_default();
            let note = EndNote {
                how: classify::classify(&facts),
                at: crate::clock::wall_ms(),
                invocation_id: inv,
                detail: format!("{}, pid {pid}", classify::describe(&facts)),
            };
            self.record_end(None, &run_id, "", note, None).await;
        }
    }

    /// C-10, C-4: records of another boot are host restarts; a tracked run whose process is
    /// gone while the agent is not its parent reads `unknown`; a record a detached revival
    /// made active again takes that revival's pid.
    async fn pass_unbooted(&mut self, children: &[Spawned]) {
        self.follow_config();
        let view = self.queue.view();
        let (Ok(runs), Ok(entries)) = (view.runs.clone(), view.entries.clone()) else {
            return;
        };
        for r in runs.iter().filter(|r| r.state == RunState::Active) {
            if children.iter().any(|c| c.run_id == r.run_id) {
                continue;
            }
            if !r.boot_id.is_empty() && r.boot_id != self.boot_id {
                if let Reconciled::Ended {
                    how,
                    at_ms,
                    invocation,
                    ..
                } = reconcile(r, None, &self.boot_id)
                {
                    let note = EndNote {
                        how,
                        at: at_ms,
                        invocation_id: invocation,
                        detail: "the host restarted while it ran".into(),
                    };
                    self.record_end(None, &r.run_id, &r.unit, note, None).await;
                }
                continue;
            }
            let inv = if r.invocation_id.is_empty() {
                // Revived by the drainer's spawn: its pid and start time are on the entry.
                let Some((pid, start)) = r
                    .entry_id
                    .as_ref()
                    .and_then(|id| entries.iter().find(|e| &e.id == id))
                    .and_then(|e| e.attempt_pid)
                else {
                    continue;
                };
                let (q, run_id, unit, inv, boot) = (
                    Arc::clone(&self.queue),
                    r.run_id.clone(),
                    r.unit.clone(),
                    pid_invocation(pid, start),
                    self.boot_id.clone(),
                );
                let adopted = inv.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    q.lock().run_active(&run_id, &unit, &inv, &boot)
                })
                .await;
                adopted
            } else {
                r.invocation_id.clone()
            };
            let Some((pid, start)) = parse_pid_invocation(&inv) else {
                continue;
            };
            let alive = matches!(
                crate::facts::process::probe(pid),
                crate::facts::process::Liveness::Alive { start_time } if start_time.is_none_or(|s| s == start)
            );
            if !alive {
                let note = EndNote {
                    how: How::Unknown,
                    at: crate::clock::wall_ms(),
                    invocation_id: inv,
                    detail: format!(
                        "process {pid} is gone, and outlived was not its parent to read how it ended"
                    ),
                };
                self.record_end(None, &r.run_id, &r.unit, note, None).await;
            }
        }
        let (q, boot) = (Arc::clone(&self.queue), self.boot_id.clone());
        let _ = tokio::task::spawn_blocking(move || q.lock().runs_seen(&boot)).await;
    }

    /// Log what capture uses when the applied configuration changed (the one configuration
    /// path: every part says what it took).
    fn follow_config(&mut self) {
        let c = Arc::clone(&self.applied.borrow_and_update());
        let now = (c.capture.units.clone(), c.capture.evidence_policy.clone());
        if self.uses.as_ref() != Some(&now) {
            tracing::debug!(target: "outlive::config", "capture uses units: {:?}, evidence_policy: {}", now.0, now.1);
            self.uses = Some(now);
        }
    }

    fn refuse(&self, c: Command) {
        let why = format!(
            "the service manager is unreachable ({})",
            self.health.locked().last_error
        );
        match c {
            Command::Start { rec, reply } => {
                let q = Arc::clone(&self.queue);
                let run_id = rec.run_id.clone();
                tokio::task::spawn_blocking(move || {
                    let _ = q.lock().run_drop(&run_id, None);
                    let _ = reply.send(Err(StartRunError::Unreachable(why)));
                });
            }
            Command::Read { reply, .. } => {
                let _ = reply.send(Err(why));
            }
            Command::Stop { .. } => {}
        }
    }

    fn down(&self, why: &str) {
        let mut h = self.health.locked();
        let was_up = h.subscribed;
        h.subscribed = false;
        h.reconciled = false;
        h.down_since_ms.get_or_insert(crate::clock::boottime_ms());
        if h.last_error != why {
            tracing::warn!("capture: {why}; resubscribing");
        }
        h.last_error = why.to_string();
        drop(h);
        if was_up {
            self.audit.record(
                &Event::new(
                    EventKind::CaptureLost,
                    format!(
                        "capture lost its subscription to the service manager ({why}); ends are classified when it is back"
                    ),
                )
                .priority(priority::WARNING),
            );
        }
    }

    async fn subscribe(&mut self) -> Result<(Manager, Signals), String> {
        let conn = tokio::time::timeout(CALL_TIMEOUT, async {
            if self.user {
                Connection::session().await
            } else {
                Connection::system().await
            }
        })
        .await
        .map_err(|_| "no connection to the bus within 5 s".to_string())?
        .map_err(|e| format!("cannot connect to the bus: {e}"))?;
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender(SD)
            .build()
            .map_err(|e| e.to_string())?;
        let mut stream = zbus::MessageStream::for_match_rule(rule, &conn, NonZeroUsize::new(64))
            .await
            .map_err(|e| format!("cannot add the match rule: {e}"))?;
        let mgr = Manager { conn };
        mgr.call(SD_PATH, MANAGER, "Subscribe", &())
            .await
            .map_err(|e| format!("systemd Subscribe: {e}"))?;
        let mut h = self.health.locked();
        let gap = h.down_since_ms.take();
        h.subscribed = true;
        h.reconciled = false;
        h.last_error.clear();
        drop(h);
        if let Some(since) = gap {
            tracing::info!(
                "capture subscribed to the service manager (after {} ms without)",
                crate::clock::boottime_ms().saturating_sub(since)
            );
        }
        // After a gap every record is reconciled (C-3, agent absent).
        self.trackers.clear();
        self.queue_ok = false;
        // A task of its own moves the signals into an unbounded channel at once: zbus's queue
        // stays small (it is allocated whole), and while this task waits for a reply on the same
        // connection, a burst of signals (a daemon-reload) never fills it and holds the reply up.
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = stream.next().await {
                if tx.send(m).is_err() {
                    return;
                }
            }
        });
        Ok((mgr, rx))
    }

    async fn serve(
        &mut self,
        mgr: &Manager,
        mut stream: Signals,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let mut pass = tokio::time::interval(PASS_EVERY);
        pass.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let queue = Arc::clone(&self.queue);
        loop {
            tokio::select! {
                m = stream.recv() => match m {
                    Some(Ok(msg)) => self.signal(mgr, &msg).await,
                    Some(Err(e)) => return self.down(&format!("the bus: {e}")),
                    None => return self.down("the connection to the bus closed"),
                },
                c = self.rx.recv() => match c {
                    None => return,
                    Some(c) => self.command(mgr, c).await,
                },
                () = queue.runs_changed().notified() => self.pass(mgr).await,
                _ = pass.tick() => {
                    if mgr.conn.is_closed() {
                        return self.down("the connection to the bus closed");
                    }
                    if let Err(e) = mgr.call(SD_PATH, "org.freedesktop.DBus.Peer", "Ping", &()).await {
                        return self.down(&e);
                    }
                    self.pass(mgr).await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn command(&mut self, mgr: &Manager, c: Command) {
        match c {
            Command::Start { rec, reply } => {
                self.trackers.insert(
                    rec.unit.clone(),
                    Watched {
                        run_id: rec.run_id.clone(),
                        tracker: Tracker::new("", vec![]),
                        last: Default::default(),
                        ours: true,
                    },
                );
                let conn = mgr.conn.clone();
                let (jobs, queue, user, boot) = (
                    Arc::clone(&self.jobs),
                    Arc::clone(&self.queue),
                    self.user,
                    self.boot_id.clone(),
                );
                tokio::spawn(async move {
                    let r = start_run(&Manager { conn }, &jobs, &queue, &rec, user, &boot).await;
                    let _ = reply.send(r);
                });
            }
            Command::Read { unit, reply } => {
                let _ = reply.send(mgr.read(&unit).await);
            }
            Command::Stop { unit } => {
                if let Err(e) = mgr
                    .call(SD_PATH, MANAGER, "StopUnit", &(unit.as_str(), "replace"))
                    .await
                {
                    tracing::warn!("cannot stop {unit}: {e}");
                }
            }
        }
    }

    async fn signal(&mut self, mgr: &Manager, msg: &zbus::Message) {
        let h = msg.header();
        let Some(member) = h.member().map(|m| m.to_string()) else {
            return;
        };
        match member.as_str() {
            "PropertiesChanged" => {
                let Some(unit) = h.path().and_then(|p| path_unit(p.as_str())) else {
                    return;
                };
                if !self.trackers.contains_key(&unit) {
                    return;
                }
                let body = msg.body();
                let Ok((iface, changed, _)) = body.deserialize::<(&str, Props<'_>, Vec<&str>)>()
                else {
                    return;
                };
                let w = self.trackers.get_mut(&unit).expect("found above");
                let step = if iface == SERVICE_IFACE {
                    w.tracker.service(&service_signal(&changed));
                    Step::Nothing
                } else if iface == UNIT_IFACE {
                    let u = unit_signal(&changed);
                    if let (Some(a), s) = (&u.active_state, &u.sub_state) {
                        w.last = (a.clone(), s.clone().unwrap_or_default());
                    }
                    w.tracker.unit(&u)
                } else {
                    Step::Nothing
                };
                self.step(mgr, &unit, step).await;
            }
            "JobRemoved" => {
                let Ok((_, job, unit, result)) = msg
                    .body()
                    .deserialize::<(u32, OwnedObjectPath, String, String)>()
                else {
                    return;
                };
                {
                    let mut j = self.jobs.locked();
                    if let Some(tx) = j.waiting.remove(job.as_str()) {
                        let _ = tx.send(result);
                    } else {
                        j.removed.push_back((job.to_string(), result));
                        if j.removed.len() > 256 {
                            j.removed.pop_front();
                        }
                    }
                }
                if let Some(w) = self.trackers.get_mut(&unit) {
                    let step = w.tracker.job_removed();
                    self.step(mgr, &unit, step).await;
                } else if self.uses.as_ref().is_some_and(|(globs, _)| {
                    globs
                        .iter()
                        .any(|g| crate::queue::entry::glob_match(g, &unit))
                }) {
                    // A unit `capture.units` matches finished a job (it started): watch it now,
                    // not at the next pass.
                    self.pass(mgr).await;
                }
            }
            "UnitRemoved" if !self.reloading => {
                let Ok((unit, _)) = msg.body().deserialize::<(String, OwnedObjectPath)>() else {
                    return;
                };
                if let Some(w) = self.trackers.get_mut(&unit) {
                    let step = w.tracker.unit_removed();
                    self.step(mgr, &unit, step).await;
                }
            }
            "Reloading" => {
                if let Ok(r) = msg.body().deserialize::<bool>() {
                    self.reloading = r;
                }
            }
            _ => {}
        }
    }

    async fn step(&mut self, mgr: &Manager, unit: &str, step: Step) {
        match step {
            Step::Nothing => {}
            Step::Follow(inv) => {
                let Some(w) = self.trackers.get(unit) else {
                    return;
                };
                let (q, run_id, unit, boot) = (
                    Arc::clone(&self.queue),
                    w.run_id.clone(),
                    unit.to_string(),
                    self.boot_id.clone(),
                );
                let _ = tokio::task::spawn_blocking(move || {
                    q.lock().run_active(&run_id, &unit, &inv, &boot)
                })
                .await;
            }
            Step::Ended {
                mut facts,
                exit_us,
                invocation,
            } => {
                if facts.stop_requested {
                    facts.system_stopping = mgr.system_stopping().await;
                }
                let Some(w) = self.trackers.remove(unit) else {
                    return;
                };
                // C-3 row 0: a unit with `Restart=` goes `failed`, then at once
                // `activating (auto-restart)`: it was not an end. The manager has switched
                // state by the time it answers, so one read tells.
                if !w.ours
                    && !facts.stop_requested
                    && let Ok(Some(now)) = mgr.read(unit).await
                    && (matches!(now.active_state.as_str(), "activating" | "reloading")
                        || (now.active_state == "active" && now.sub_state != "exited"))
                {
                    self.trackers.insert(
                        unit.to_string(),
                        Watched {
                            // The next invocation is followed (the record takes it).
                            tracker: Tracker::new(&invocation, now.success_statuses.clone()),
                            last: (now.active_state, now.sub_state),
                            ..w
                        },
                    );
                    return;
                }
                let how = classify::classify(&facts);
                let note = EndNote {
                    how,
                    at: if exit_us > 0 {
                        exit_us / 1000
                    } else {
                        crate::clock::wall_ms()
                    },
                    invocation_id: invocation,
                    detail: classify::describe(&facts),
                };
                self.record_end(
                    Some(mgr),
                    &w.run_id,
                    unit,
                    note,
                    w.ours.then_some(w.last.0.as_str()),
                )
                .await;
            }
        }
    }

    /// Record an end through the queue; then unload an ended run unit and tell the bus.
    async fn record_end(
        &mut self,
        mgr: Option<&Manager>,
        run_id: &str,
        unit: &str,
        note: EndNote,
        unload: Option<&str>,
    ) {
        let how = note.how;
        let q = Arc::clone(&self.queue);
        let rid = run_id.to_string();
        let r = tokio::task::spawn_blocking(move || q.lock().run_end(&rid, note))
            .await
            .unwrap_or_else(|e| Err(crate::queue::QueueError::PersistFailed(e.to_string())));
        match r {
            Ok(Ended::Stale) => {}
            Ok(_) => {
                if let (Some(last), Some(mgr)) = (unload, mgr) {
                    mgr.unload(unit, last).await;
                }
                if let Some(f) = self.on_end.locked().as_ref() {
                    f(run_id, how.as_str());
                }
            }
            Err(e) => {
                // Not written (the lock is not held, the state cannot be written): the unit keeps
                // its facts and the next reconcile reads them (C-11).
                tracing::warn!(
                    "capture: cannot record how run {run_id} ended ({}): {e}",
                    how.as_str()
                );
                self.queue_ok = false;
            }
        }
    }

    /// Housekeeping: reconcile what has no tracker (new records, after a gap, the lock held
    /// again), watch what `capture.units` matches, drop trackers of ended records, refresh
    /// `seen_active_at`.
    async fn pass(&mut self, mgr: &Manager) {
        self.follow_config();
        let view = self.queue.view();
        let Ok(runs) = view.runs.clone() else {
            self.queue_ok = false;
            self.health.locked().reconciled = false;
            return;
        };
        if !self.queue_ok {
            // The lock is held again (or capture just subscribed): everything is reconciled.
            self.trackers.clear();
            self.queue_ok = true;
        }
        let active: HashSet<&str> = runs
            .iter()
            .filter(|r| r.state == RunState::Active)
            .map(|r| r.unit.as_str())
            .collect();
        self.trackers.retain(|u, _| active.contains(u.as_str()));
        let mut complete = true;
        for r in runs.iter().filter(|r| r.state == RunState::Active) {
            if self.trackers.contains_key(&r.unit) {
                continue;
            }
            if !self.reconcile_one(mgr, r).await {
                complete = false;
            }
        }
        self.configured(mgr, &runs).await;
        {
            let mut h = self.health.locked();
            h.reconciled = complete && h.subscribed;
            h.watching = self.trackers.len();
        }
        let (q, boot) = (Arc::clone(&self.queue), self.boot_id.clone());
        let _ = tokio::task::spawn_blocking(move || q.lock().runs_seen(&boot)).await;
    }

    /// One record against the manager's state now; false when the manager did not answer.
    async fn reconcile_one(&mut self, mgr: &Manager, r: &RunRecord) -> bool {
        let unit = if r.boot_id.is_empty() || r.boot_id == self.boot_id {
            match mgr.read(&r.unit).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!("capture: cannot read {}: {e}", r.unit);
                    return false;
                }
            }
        } else {
            None
        };
        let ours = matches!(r.target, Target::Exec { .. });
        match reconcile(r, unit.as_ref(), &self.boot_id) {
            Reconciled::Keep => {
                self.track(r, &r.invocation_id, ours, unit.as_ref());
            }
            Reconciled::Running { invocation } => {
                self.track(r, &invocation, ours, unit.as_ref());
                if invocation != r.invocation_id || r.boot_id != self.boot_id {
                    let (q, run_id, u, boot) = (
                        Arc::clone(&self.queue),
                        r.run_id.clone(),
                        r.unit.clone(),
                        self.boot_id.clone(),
                    );
                    let _ = tokio::task::spawn_blocking(move || {
                        q.lock().run_active(&run_id, &u, &invocation, &boot)
                    })
                    .await;
                }
            }
            Reconciled::NeverStarted if r.created_at >= self.started_at => {
                // Made by a `Run` of this process whose start is in flight: its start is
                // watched (the record was written before the start was asked for).
                self.track(r, "", ours, None);
            }
            Reconciled::NeverStarted => {
                let q = Arc::clone(&self.queue);
                let ev = Event::new(
                    EventKind::RunNeverStarted,
                    format!(
                        "run {} was recorded but its unit {} never started (outlived stopped in between): the record is dropped",
                        r.run_id, r.unit
                    ),
                )
                .priority(priority::NOTICE)
                .field("run_id", &r.run_id);
                let run_id = r.run_id.clone();
                let _ =
                    tokio::task::spawn_blocking(move || q.lock().run_drop(&run_id, Some(ev))).await;
            }
            Reconciled::Ended {
                how,
                at_ms,
                invocation,
                facts,
            } => {
                let note = EndNote {
                    how,
                    at: if at_ms > 0 {
                        at_ms
                    } else {
                        crate::clock::wall_ms()
                    },
                    invocation_id: invocation,
                    detail: match (&facts, how) {
                        (_, How::HostRestart) => "the host restarted while it ran".into(),
                        (Some(f), How::Unknown) => format!(
                            "{}; it ended while outlived was not listening",
                            classify::describe(f)
                        ),
                        (Some(f), _) => classify::describe(f),
                        (None, _) => "its unit is gone".into(),
                    },
                };
                let last = unit
                    .as_ref()
                    .map(|u| u.active_state.clone())
                    .unwrap_or_default();
                self.record_end(
                    Some(mgr),
                    &r.run_id,
                    &r.unit,
                    note,
                    ours.then_some(last.as_str()),
                )
                .await;
            }
        }
        true
    }

    fn track(&mut self, r: &RunRecord, invocation: &str, ours: bool, unit: Option<&UnitNow>) {
        self.trackers.insert(
            r.unit.clone(),
            Watched {
                run_id: r.run_id.clone(),
                tracker: Tracker::new(
                    invocation,
                    unit.map(|u| u.success_statuses.clone()).unwrap_or_default(),
                ),
                last: unit
                    .map(|u| (u.active_state.clone(), u.sub_state.clone()))
                    .unwrap_or_default(),
                ours,
            },
        );
    }

    /// `capture.units` (C-1 b): every loaded, active unit that matches is watched.
    async fn configured(&mut self, mgr: &Manager, runs: &[RunRecord]) {
        let (globs, policy) = {
            let c = self.applied.borrow();
            (c.capture.units.clone(), c.capture.evidence_policy.clone())
        };
        if globs.is_empty() {
            return;
        }
        let pats: Vec<&str> = globs.iter().map(String::as_str).collect();
        let units: Vec<UnitRow> = match mgr
            .call(
                SD_PATH,
                MANAGER,
                "ListUnitsByPatterns",
                &(["active"].as_slice(), pats.as_slice()),
            )
            .await
            .and_then(|m| {
                m.body()
                    .deserialize::<Vec<UnitRow>>()
                    .map_err(|e| e.to_string())
            }) {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!("capture: ListUnitsByPatterns: {e}");
                return;
            }
        };
        let known: HashSet<&str> = runs
            .iter()
            .filter(|r| r.state == RunState::Active)
            .map(|r| r.unit.as_str())
            .collect();
        let mut capped = 0;
        for row in units
            .iter()
            .filter(|row| row.4 == "running" && !known.contains(row.0.as_str()))
        {
            let unit = row.0.clone();
            if !crate::queue::entry::valid_run_id(&super::unit_run_id(&unit)) {
                tracing::debug!(
                    "capture: {unit} matches capture.units but its name cannot be a run id"
                );
                continue;
            }
            let Ok(Some(now)) = mgr.read(&unit).await else {
                continue;
            };
            let rec = RunRecord {
                configured: true,
                ..RunRecord::unit_watch(
                    &unit,
                    (0, 0),
                    crate::queue::runs::EvidencePolicy::parse(&policy).unwrap_or_default(),
                    &now.invocation_id,
                    &self.boot_id,
                    crate::clock::wall_ms(),
                )
            };
            let q = Arc::clone(&self.queue);
            let added = tokio::task::spawn_blocking(move || q.lock().run_add(rec)).await;
            match added {
                Ok(Ok(())) => {}
                Ok(Err(crate::queue::QueueError::Full(_))) => capped += 1,
                Ok(Err(e)) => tracing::debug!("capture: cannot watch {unit}: {e}"),
                Err(_) => {}
            }
        }
        if capped > 0 {
            self.audit.record(
                &Event::new(
                    EventKind::WatchCap,
                    format!(
                        "{capped} units match capture.units but capture.max_watched records are active: they are not watched"
                    ),
                )
                .alert(crate::audit::Alert::QueueNotice)
                .field("units", capped),
            );
        }
    }
}

/// C-1: start a run's transient unit and wait for its start job; the record is made active
/// with the unit's invocation, or dropped when the start failed.
async fn start_run(
    mgr: &Manager,
    jobs: &Mutex<Jobs>,
    queue: &SharedQueue,
    rec: &RunRecord,
    user: bool,
    boot_id: &str,
) -> Result<String, StartRunError> {
    let r = start_job(mgr, jobs, rec, user).await;
    let q = Arc::clone(queue);
    let (run_id, unit) = (rec.run_id.clone(), rec.unit.clone());
    match r {
        Ok(()) => {
            let inv = match mgr.read(&unit).await {
                Ok(Some(u)) => u.invocation_id,
                _ => String::new(),
            };
            let boot = boot_id.to_string();
            let u = unit.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let mut g = q.lock();
                if g.runs()
                    .ok()
                    .and_then(|rs| rs.iter().find(|x| x.run_id == run_id).map(|x| x.state))
                    == Some(RunState::Active)
                {
                    let _ = g.run_active(&run_id, &u, &inv, &boot);
                }
            })
            .await;
            Ok(unit)
        }
        Err(e) => {
            let _ = tokio::task::spawn_blocking(move || q.lock().run_drop(&run_id, None)).await;
            Err(e)
        }
    }
}

async fn start_job(
    mgr: &Manager,
    jobs: &Mutex<Jobs>,
    rec: &RunRecord,
    user: bool,
) -> Result<(), StartRunError> {
    let Target::Exec { exec, env } = &rec.target else {
        return Err(StartRunError::Failed(
            "not a run started through outlived".into(),
        ));
    };
    let mut env = env.clone();
    env.insert("OUTLIVE_RUN_ID".into(), rec.run_id.clone());
    let t = Transient {
        name: rec.unit.clone(),
        description: format!("outlive run {}", rec.run_id),
        argv: exec.clone(),
        cwd: rec.worktree.clone().unwrap_or_else(|| rec.cwd.clone()),
        user: (!user).then_some((rec.uid, rec.gid)),
        env,
        after: if user {
            vec![]
        } else {
            vec!["outlived.service".into()]
        },
    };
    let props = t.properties();
    let aux: Vec<(&str, Vec<(&str, zbus::wire::Variant<'_>)>)> = vec![];
    let job: OwnedObjectPath = match mgr
        .call(
            SD_PATH,
            MANAGER,
            "StartTransientUnit",
            &(rec.unit.as_str(), "fail", props, aux),
        )
        .await
    {
        Ok(m) => m
            .body()
            .deserialize()
            .map_err(|e| StartRunError::Failed(e.to_string()))?,
        Err(e) => {
            return Err(StartRunError::Failed(format!(
                "systemd refused to start {}: {e}",
                rec.unit
            )));
        }
    };
    let rx = {
        let mut j = jobs.locked();
        if let Some(i) = j.removed.iter().position(|(p, _)| p == job.as_str()) {
            let (_, result) = j.removed.remove(i).expect("found");
            return job_result(&rec.unit, &result);
        }
        let (tx, rx) = oneshot::channel();
        j.waiting.insert(job.to_string(), tx);
        rx
    };
    match tokio::time::timeout(START_TIMEOUT, rx).await {
        Ok(Ok(result)) => job_result(&rec.unit, &result),
        _ => {
            jobs.locked().waiting.remove(job.as_str());
            Err(StartRunError::Failed(format!(
                "the start job of {} did not finish within {} s",
                rec.unit,
                START_TIMEOUT.as_secs()
            )))
        }
    }
}

fn job_result(unit: &str, result: &str) -> Result<(), StartRunError> {
    if result == "done" {
        Ok(())
    } else {
        Err(StartRunError::Failed(format!(
            "the start job of {unit} ended `{result}` (`systemctl status {unit}` and `journalctl -u {unit}` say why)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_paths_are_bus_escaped() {
        assert_eq!(
            unit_path("outlive-run-a\\x2d1.service"),
            "/org/freedesktop/systemd1/unit/outlive_2drun_2da_5cx2d1_2eservice"
        );
        for unit in [
            "outlive-run-a\\x2d1.service",
            "agent@x:y.service",
            "a.b_c-d.service",
            "plain",
        ] {
            assert_eq!(path_unit(&unit_path(unit)).as_deref(), Some(unit));
        }
        for other in [
            "/org/freedesktop/systemd1",
            "/org/freedesktop/systemd1/job/12",
            "/org/freedesktop/systemd1/unit/bad_zz",
            "/org/freedesktop/systemd1/unit/cut_2",
            "/org/freedesktop/systemd1/unit/a.b",
        ] {
            assert_eq!(path_unit(other), None, "{other}");
        }
    }
}
