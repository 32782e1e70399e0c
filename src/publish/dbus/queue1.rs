//! `/org/outlive/Agent1/ResumeQueue`, interface `org.outlive.ResumeQueue1` (SPEC X-1): the
//! revival queue over D-Bus.
//!
//! The object reads the queue under its mutex and never holds it across an await. Mutations
//! are authorized from the bus credentials, decoded with `InvalidArgument` naming the field,
//! applied by the queue (which persists before answering), and followed by PropertiesChanged
//! for whatever changed.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use zbus::message::Header;
use zbus::wire::{OwnedVariant, Variant};
use zbus::{Connection, interface};

use super::Publisher;
use super::errors::OutliveError;
use super::gate::{Gate, Kind, Pass, blocking};
use super::variant::to_dict;
use crate::drainer::tick::{Handle, Outcome, Public, Report};
use crate::queue::entry::{Entry, Target, clamp_evidence};
use crate::queue::rules::Request;
use crate::queue::{Caller, QueueError, View};

pub use crate::queue::SharedQueue;

impl From<QueueError> for OutliveError {
    fn from(e: QueueError) -> OutliveError {
        match e {
            QueueError::Disabled { code, detail } => {
                OutliveError::QueueDisabled(format!("{code}: {detail}"))
            }
            QueueError::NotFound(m) => OutliveError::NotFound(m),
            QueueError::Paused(m) => OutliveError::QueuePaused(m),
            QueueError::Full(m) => OutliveError::QueueFull(m),
            QueueError::NotGaveUp(m) => OutliveError::NotGaveUp(m),
            QueueError::Duplicate(m) => OutliveError::DuplicateOpenEntry(m),
            QueueError::PersistFailed(m) => OutliveError::PersistFailed(m),
            QueueError::Invalid { field, why } => {
                OutliveError::InvalidArgument(format!("{field}: {why}"))
            }
            QueueError::AccessDenied(m) => OutliveError::AccessDenied(m),
        }
    }
}

/// The changeable properties of `org.outlive.ResumeQueue1` (all but `LastTickAt`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueProps {
    pub enabled: bool,
    pub disabled_reason: String,
    pub disabled_detail: String,
    pub dry_run: bool,
    pub paused: bool,
    pub pause_kind: String,
    pub pause_reason: String,
    pub paused_at: u64,
    pub waiting: u32,
    pub breaker_open_until: u64,
    pub quota_signal: String,
}

impl QueueProps {
    /// From the queue's view and what the drainer publishes.
    pub fn of(v: &View, d: &Public) -> QueueProps {
        let s = v.snapshot.clone();
        QueueProps {
            enabled: s.enabled,
            disabled_reason: s.disabled_reason,
            disabled_detail: s.disabled_detail,
            dry_run: s.dry_run,
            paused: s.pause.is_some(),
            pause_kind: s
                .pause
                .as_ref()
                .map(|p| p.kind.as_str().to_string())
                .unwrap_or_default(),
            pause_reason: s
                .pause
                .as_ref()
                .map(|p| p.reason.clone())
                .unwrap_or_default(),
            paused_at: s.pause.as_ref().map(|p| p.paused_at).unwrap_or(0),
            waiting: s.waiting,
            breaker_open_until: d.breaker_open_until,
            quota_signal: d.quota.as_str().into(),
        }
    }
}

/// Runs a manual tick for `Drain()` (D-1): `None` while a tick is running (`Busy`).
pub trait DrainService: Send + Sync {
    fn drain(&self) -> Pin<Box<dyn Future<Output = Option<Report>> + Send + '_>>;
}

/// The interface object.
#[derive(Clone)]
pub struct ResumeQueue1 {
    pub queue: SharedQueue,
    pub gate: Arc<Gate>,
    pub last_tick_at: Arc<AtomicU64>,
    pub publisher: Arc<Publisher>,
    pub drainer: Handle,
    pub drain: Arc<dyn DrainService>,
    /// Capture: `Stop(run_id)` also stops a watched run's unit (Q-9, C-3 row 2).
    pub capture: crate::capture::watcher::Capture,
}

impl ResumeQueue1 {
    fn props(&self) -> QueueProps {
        QueueProps::of(&self.queue.view(), &self.drainer.public())
    }

    /// Admit a call (the gate) and say who calls, as the queue sees it.
    async fn enter(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
        kind: Kind,
    ) -> Result<(Pass, Caller), OutliveError> {
        queue_caller(&self.gate, conn, hdr, kind).await
    }

    async fn mutate<T: Send + 'static>(
        &self,
        conn: &Connection,
        f: impl FnOnce(&mut crate::queue::Queue) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, OutliveError> {
        apply(&self.queue, &self.publisher, conn, f).await
    }
}

/// Admit a call (the gate) and say who calls, as the queue sees it (`ResumeQueue1`, `Runs1`).
pub(super) async fn queue_caller(
    gate: &Arc<Gate>,
    conn: &Connection,
    hdr: &Header<'_>,
    kind: Kind,
) -> Result<(Pass, Caller), OutliveError> {
    let pass = gate.enter(conn, hdr, kind).await?;
    let c = pass.caller;
    let caller = Caller {
        uid: c.uid,
        gid: c.gid.unwrap_or(c.uid),
        root: c.is_root(),
        may_mutate: c.may_mutate(&gate.policy()),
    };
    Ok((pass, caller))
}

/// A queue operation, which may write and fsync the state: on the blocking pool, never on the
/// dispatch thread; then PropertiesChanged for what changed.
pub(super) async fn apply<T: Send + 'static>(
    queue: &SharedQueue,
    publisher: &Publisher,
    conn: &Connection,
    f: impl FnOnce(&mut crate::queue::Queue) -> Result<T, QueueError> + Send + 'static,
) -> Result<T, OutliveError> {
    let q = Arc::clone(queue);
    let r = blocking(move || f(&mut q.lock())).await?;
    publisher.sync(conn).await;
    Ok(r?)
}

/// One entry as `List` shows it (X-1): the Q-1 fields, the target flattened as in `Enqueue`
/// (`unit`, or `exec` with `env_names`: env values never leave the agent); for callers who
/// are neither privileged nor the entry's user, only id, class, status, attempts, timestamps
/// and target kind (§12 G-10: not the session either).
pub fn list_row(e: &Entry, full: bool) -> serde_json::Value {
    let mut v = serde_json::json!({
        "id": e.id,
        "class": e.class.as_str(),
        "status": e.status.text(),
        "attempts": e.attempts,
        "target_kind": e.target.kind(),
        "reaped_at": e.reaped_at,
        "queued_at": e.queued_at,
        "requeued_at": e.requeued_at,
        "last_attempt_at": e.last_attempt_at,
        "next_attempt_at": e.next_attempt_at,
    });
    if !full {
        return v;
    }
    let m = v.as_object_mut().expect("an object");
    m.insert("session".into(), e.session.clone().into());
    match &e.target {
        Target::Unit { unit } => {
            m.insert("unit".into(), unit.clone().into());
        }
        Target::Exec { exec, env } => {
            m.insert("exec".into(), exec.clone().into());
            m.insert(
                "env_names".into(),
                env.keys().cloned().collect::<Vec<_>>().into(),
            );
        }
    }
    let extra = serde_json::json!({
        "run_id": e.run_id,
        "job": e.job,
        "uid": e.uid,
        "gid": e.gid,
        "enqueued_by": e.enqueued_by,
        "cwd": e.cwd,
        "worktree": e.worktree,
        "reason": e.reason,
        "active_run": e.active_run,
        "run_state_file": e.run_state_file,
        "evidence": e.evidence,
        "attempt_unit": e.attempt_unit,
        "waited_ms": e.waited_ms,
        "calm_ms": e.calm_ms,
        "frozen_ms": e.frozen_ms,
        "pressure_starved": e.pressure_starved,
        "history": e.history.iter().map(|t| serde_json::json!({
            "at": t.at,
            "from": t.from.as_ref().map(|s| s.text()),
            "to": t.to.text(),
            "by": t.by,
        })).collect::<Vec<_>>(),
    });
    for (k, val) in extra.as_object().expect("an object") {
        m.insert(k.clone(), val.clone());
    }
    v
}

/// The keys `Enqueue` accepts and their D-Bus types (X-1).
pub const ENQUEUE_KEYS: &[(&str, &str)] = &[
    ("run_id", "s"),
    ("job", "s"),
    ("resume_on_reap", "b"),
    ("session", "s"),
    ("unit", "s"),
    ("exec", "as"),
    ("env", "a{ss}"),
    ("cwd", "s"),
    ("worktree", "s"),
    ("reason", "s"),
    ("disposition", "s"),
    ("origin", "s"),
    ("evidence", "as"),
    ("active_run", "b"),
    ("run_state_file", "s"),
    ("reaped_at", "t"),
    ("user", "u"),
    ("group", "u"),
];

type Field = (String, String);

fn wrong(key: &str, want: &str, v: &OwnedVariant) -> Field {
    (
        key.to_string(),
        format!("expected type {want}, got {}", v.value_signature()),
    )
}

fn string(key: &str, v: &OwnedVariant) -> Result<String, Field> {
    match &**v {
        Variant::Str(s) => {
            let s = s.as_str();
            if s.len() > crate::queue::entry::MAX_STRING {
                return Err((key.into(), "longer than 4096 bytes".into()));
            }
            Ok(s.to_string())
        }
        _ => Err(wrong(key, "s", v)),
    }
}

fn boolean(key: &str, v: &OwnedVariant) -> Result<bool, Field> {
    match &**v {
        Variant::Bool(b) => Ok(*b),
        _ => Err(wrong(key, "b", v)),
    }
}

fn strings(key: &str, v: &OwnedVariant, limit: usize) -> Result<Vec<String>, Field> {
    let Variant::Array(a) = &**v else {
        return Err(wrong(key, "as", v));
    };
    if a.len() > limit {
        return Err((key.into(), format!("more than {limit} items")));
    }
    a.iter()
        .map(|x| match x {
            Variant::Str(s) => Ok(s.as_str().to_string()),
            _ => Err(wrong(key, "as", v)),
        })
        .collect()
}

/// A non-negative integer of any D-Bus integer type (`y n q i u x t`, X-1 as amended):
/// clients send plain numbers as whatever width their binding picks.
fn unsigned(key: &str, v: &OwnedVariant) -> Result<u64, Field> {
    let n: i128 = match &**v {
        Variant::U8(n) => (*n).into(),
        Variant::I16(n) => (*n).into(),
        Variant::U16(n) => (*n).into(),
        Variant::I32(n) => (*n).into(),
        Variant::U32(n) => (*n).into(),
        Variant::I64(n) => (*n).into(),
        Variant::U64(n) => (*n).into(),
        _ => {
            let why = format!(
                "expected a non-negative integer (any of y n q i u x t), got {}",
                v.value_signature()
            );
            return Err((key.to_string(), why));
        }
    };
    u64::try_from(n).map_err(|_| (key.to_string(), format!("{n} is negative")))
}

/// Decode `Enqueue`'s dictionary (X-1). Unknown keys and wrong types are `(key, why)`.
/// Evidence may be `as`, or `av` whose non-strings are dropped (Q-3).
#[expect(clippy::too_many_lines, reason = "X-1's Enqueue keys, one arm each")]
pub fn decode_enqueue(dict: &HashMap<String, OwnedVariant>) -> Result<Request, Field> {
    let mut keys: Vec<&String> = dict.keys().collect();
    keys.sort();
    for k in &keys {
        if !ENQUEUE_KEYS.iter().any(|(n, _)| n == k) {
            let shown: String = k.chars().take(64).collect();
            return Err((shown, "unknown key".into()));
        }
    }
    let get = |k: &str| dict.get(k);
    let mut r = Request {
        disposition: "terminal".into(),
        origin: "autonomous".into(),
        ..Request::default()
    };
    let opt_str = |k: &str| get(k).map(|v| string(k, v)).transpose();
    r.run_id = opt_str("run_id")?;
    r.job = opt_str("job")?;
    r.session = opt_str("session")?.unwrap_or_default();
    r.cwd = opt_str("cwd")?;
    r.worktree = opt_str("worktree")?;
    r.reason = opt_str("reason")?.unwrap_or_default();
    r.run_state_file = opt_str("run_state_file")?;
    if let Some(d) = opt_str("disposition")? {
        r.disposition = d;
    }
    if let Some(o) = opt_str("origin")? {
        r.origin = o;
    }
    if let Some(v) = get("resume_on_reap") {
        r.resume_on_reap = boolean("resume_on_reap", v)?;
    }
    if let Some(v) = get("active_run") {
        r.active_run = boolean("active_run", v)?;
    }
    if let Some(v) = get("reaped_at") {
        r.reaped_at = Some(unsigned("reaped_at", v)?);
    }
    for (k, slot) in [("user", &mut r.user), ("group", &mut r.group)] {
        if let Some(v) = get(k) {
            let n = unsigned(k, v)?;
            *slot = Some(
                u32::try_from(n)
                    .map_err(|_| (k.to_string(), format!("{n} is not a uid or gid")))?,
            );
        }
    }
    if let Some(v) = get("evidence") {
        let Variant::Array(a) = &**v else {
            return Err(wrong("evidence", "as", v));
        };
        if a.len() > 4096 {
            return Err(("evidence".into(), "more than 4096 items".into()));
        }
        let items: Vec<Option<String>> = a
            .iter()
            .map(|x| match x {
                Variant::Str(s) => Some(s.as_str().to_string()),
                Variant::Variant(inner) => match &**inner {
                    Variant::Str(s) => Some(s.as_str().to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        r.evidence = clamp_evidence(items.iter().map(|o| o.as_deref()));
    }
    let unit = opt_str("unit")?;
    let exec = get("exec")
        .map(|v| strings("exec", v, crate::queue::entry::MAX_ARGV))
        .transpose()?;
    let env = match get("env") {
        None => None,
        Some(v) => {
            let Variant::Dict(d) = &**v else {
                return Err(wrong("env", "a{ss}", v));
            };
            let mut out = std::collections::BTreeMap::new();
            for (k, val) in d.iter() {
                match (k, val) {
                    (Variant::Str(k), Variant::Str(val)) => {
                        out.insert(k.as_str().to_string(), val.as_str().to_string());
                    }
                    _ => return Err(wrong("env", "a{ss}", v)),
                }
            }
            if out.len() > crate::queue::entry::MAX_ENV {
                return Err(("env".into(), "more than 64 pairs".into()));
            }
            Some(out)
        }
    };
    r.target = match (unit, exec, env) {
        (Some(_), Some(_), _) => {
            return Err(("exec".into(), "give either unit or exec, not both".into()));
        }
        (Some(_), None, Some(_)) => return Err(("env".into(), "env goes only with exec".into())),
        (Some(u), None, None) => Some(Target::Unit { unit: u }),
        (None, Some(x), env) => Some(Target::Exec {
            exec: x,
            env: env.unwrap_or_default(),
        }),
        (None, None, Some(_)) => return Err(("env".into(), "env goes only with exec".into())),
        (None, None, None) => None,
    };
    Ok(r)
}

#[interface(name = "org.outlive.ResumeQueue1")]
impl ResumeQueue1 {
    /// The lock is held, the state loaded and the queue on.
    #[zbus(property)]
    fn enabled(&self) -> bool {
        self.props().enabled
    }

    /// A reason code (G-6), empty when enabled.
    #[zbus(property)]
    fn disabled_reason(&self) -> String {
        self.props().disabled_reason
    }

    /// The L-4 message.
    #[zbus(property)]
    fn disabled_detail(&self) -> String {
        self.props().disabled_detail
    }

    #[zbus(property)]
    fn dry_run(&self) -> bool {
        self.props().dry_run
    }

    #[zbus(property)]
    fn paused(&self) -> bool {
        self.props().paused
    }

    #[zbus(property)]
    fn pause_kind(&self) -> String {
        self.props().pause_kind
    }

    #[zbus(property)]
    fn pause_reason(&self) -> String {
        self.props().pause_reason
    }

    /// Wall ms, 0 when not paused.
    #[zbus(property)]
    fn paused_at(&self) -> u64 {
        self.props().paused_at
    }

    /// Open entries (queued or starting).
    #[zbus(property)]
    fn waiting(&self) -> u32 {
        self.props().waiting
    }

    /// Wall ms of the last tick. Changes every tick, so it emits no change signals.
    #[zbus(property(emits_changed_signal = "false"))]
    fn last_tick_at(&self) -> u64 {
        self.last_tick_at.load(Ordering::Relaxed)
    }

    /// Wall ms until which the breaker is open, 0 when closed.
    #[zbus(property)]
    fn breaker_open_until(&self) -> u64 {
        self.props().breaker_open_until
    }

    /// `absent`, `fresh` or `stale` (D-10).
    #[zbus(property)]
    fn quota_signal(&self) -> String {
        self.props().quota_signal
    }

    /// The entries (X-1), redacted for callers who are neither privileged nor the entry's user.
    #[zbus(out_args("entries"))]
    async fn list(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<HashMap<String, OwnedVariant>>, OutliveError> {
        let (_pass, caller) = self.enter(conn, &hdr, Kind::Read).await?;
        let view = self.queue.view();
        let entries = view.entries.clone()?;
        Ok(entries
            .iter()
            .map(|e| to_dict(&list_row(e, caller.may_mutate || caller.uid == e.uid)))
            .collect())
    }

    /// Queue a reaped run (Q-4). Replies `(admitted, why, id)`: `(false, <refusal word>, "")`,
    /// `(true, "", id)` when queued, `(true, "resurrection-cap", id)` when admitted as given up.
    /// The request's keys and types (unknown keys and wrong types are `InvalidArgument`
    /// naming the key):
    /// `run_id` s, `job` s, `resume_on_reap` b, `session` s, `unit` s, or `exec` as with
    /// `env` a{ss}, `cwd` s, `worktree` s, `reason` s, `disposition` s (`terminal` or
    /// `recovery-bounce`), `origin` s (`autonomous` or `operator`), `evidence` as (or av),
    /// `active_run` b, `run_state_file` s, `reaped_at` (ms since the epoch), and for root
    /// callers only `user` and `group`; these three take any integer type (y n q i u x t)
    /// whose value is non-negative and fits.
    #[zbus(out_args("admitted", "why", "id"))]
    async fn enqueue(
        &self,
        request: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(bool, String, String), OutliveError> {
        let (_pass, caller) = self.enter(conn, &hdr, Kind::Mutate).await?;
        let decoded = decode_enqueue(&request);
        drop(request);
        // Q-1: the user a root caller names is looked up in the user database (NSS, which may
        // block) on the blocking pool, before the queue is locked.
        let named = match &decoded {
            Ok(r) if caller.root => match r.user {
                Some(uid) => Some(blocking(move || crate::facts::users::account(uid)).await?),
                None => None,
            },
            _ => None,
        };
        let reply = self
            .mutate(conn, move |q| q.enqueue(&caller, decoded, named))
            .await?;
        Ok((reply.admitted, reply.why, reply.id))
    }

    /// Cancel an open entry (Q-9).
    async fn cancel(
        &self,
        id: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), OutliveError> {
        let (_pass, caller) = self.enter(conn, &hdr, Kind::Mutate).await?;
        self.mutate(conn, move |q| q.cancel(&caller, &id)).await
    }

    /// Requeue a gave-up entry (Q-10).
    async fn requeue(
        &self,
        id: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), OutliveError> {
        let (_pass, caller) = self.enter(conn, &hdr, Kind::Mutate).await?;
        self.mutate(conn, move |q| q.requeue(&caller, &id)).await
    }

    /// Pause revival (P-1): `emergency` or `maintenance`.
    async fn pause(
        &self,
        kind: String,
        reason: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), OutliveError> {
        let (_pass, caller) = self.enter(conn, &hdr, Kind::Mutate).await?;
        self.mutate(conn, move |q| q.pause(&caller, &kind, &reason).map(|_| ()))
            .await
    }

    /// Clear any pause; whether there was one (P-2).
    #[zbus(out_args("was_paused"))]
    async fn resume(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<bool, OutliveError> {
        let (_pass, caller) = self.enter(conn, &hdr, Kind::Mutate).await?;
        self.mutate(conn, move |q| q.resume(&caller)).await
    }

    /// Stop a run: stop its unit if it is a watched run (only its own user or root may), cancel
    /// its open entries and record the stop (Q-9, C-3). Returns how many entries were cancelled.
    #[zbus(out_args("cancelled"))]
    async fn stop(
        &self,
        run_id: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<u32, OutliveError> {
        let (_pass, caller) = self.enter(conn, &hdr, Kind::Mutate).await?;
        // A watched run that is active is stopped too (its end then reads `stopped`); a member
        // may not stop another user's run.
        let active = self.queue.view().runs.as_ref().ok().and_then(|rs| {
            rs.iter()
                .find(|r| r.run_id == run_id && r.state == crate::queue::runs::RunState::Active)
                .map(|r| (r.unit.clone(), r.uid))
        });
        if let Some((_, uid)) = &active
            && !caller.root
            && *uid != caller.uid
        {
            return Err(OutliveError::AccessDenied(format!(
                "run {run_id} belongs to uid {uid}: only its own user or root may stop it"
            )));
        }
        let n = self.mutate(conn, move |q| q.stop(&caller, &run_id)).await?;
        if let Some((unit, _)) = active {
            self.capture.stop_unit(&unit);
        }
        Ok(n)
    }

    /// Run a tick now (D-1), skipping the calm gate (D-5). Replies `outcome` (a D-3 word) and
    /// optionally `entry_id` and `detail`.
    #[zbus(out_args("report"))]
    async fn drain(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<HashMap<String, OwnedVariant>, OutliveError> {
        let (_pass, caller) = self.enter(conn, &hdr, Kind::Mutate).await?;
        if !caller.may_mutate {
            return Err(OutliveError::AccessDenied(
                "Drain needs root or membership in the outlive group".into(),
            ));
        }
        let report =
            self.drain.drain().await.ok_or_else(|| {
                OutliveError::Busy("a tick is running; try again in a moment".into())
            })?;
        self.publisher.sync(conn).await;
        drain_reply(report)
    }

    /// A headroom report from the quota tracker (D-10), valid for `valid_for_sec`.
    async fn report_quota(
        &self,
        can_spawn: bool,
        valid_for_sec: u32,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), OutliveError> {
        let (_pass, caller) = self.enter(conn, &hdr, Kind::Mutate).await?;
        if !caller.may_mutate {
            return Err(OutliveError::AccessDenied(
                "ReportQuota needs root or membership in the outlive group".into(),
            ));
        }
        // The report is audited (the journal and audit.jsonl): on the blocking pool.
        let d = self.drainer.clone();
        blocking(move || d.report_quota(can_spawn, u64::from(valid_for_sec) * 1000)).await?;
        self.publisher.sync(conn).await;
        Ok(())
    }

    /// Stop everything: a durable global stop and a deliberate halt (Q-9).
    async fn stop_all(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), OutliveError> {
        let (_pass, caller) = self.enter(conn, &hdr, Kind::Mutate).await?;
        self.mutate(conn, move |q| q.stop_all(&caller)).await
    }
}

/// D-3: `Drain()`'s reply, or the errors that stand for `queue-disabled`, `queue-off` and
/// `paused`.
pub fn drain_reply(r: Report) -> Result<HashMap<String, OwnedVariant>, OutliveError> {
    let detail = r.detail.clone().unwrap_or_default();
    match r.outcome {
        Outcome::QueueDisabled | Outcome::QueueOff => Err(OutliveError::QueueDisabled(detail)),
        Outcome::Paused => Err(OutliveError::QueuePaused(detail)),
        o => {
            let mut out = serde_json::Map::new();
            out.insert("outcome".into(), o.as_str().into());
            if let Some(id) = r.entry_id {
                out.insert("entry_id".into(), id.into());
            }
            if let Some(d) = r.detail {
                out.insert("detail".into(), d.into());
            }
            Ok(to_dict(&serde_json::Value::Object(out)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v<T: Into<Variant<'static>>>(x: T) -> OwnedVariant {
        OwnedVariant::try_from(x.into()).unwrap()
    }

    fn base() -> HashMap<String, OwnedVariant> {
        HashMap::from([
            ("run_id".to_string(), v("r1".to_string())),
            ("exec".to_string(), v(vec!["/bin/true".to_string()])),
            ("cwd".to_string(), v("/tmp".to_string())),
            (
                "evidence".to_string(),
                v(vec!["active-subagent".to_string(), "bogus".to_string()]),
            ),
        ])
    }

    #[test]
    fn x1_enqueue_dictionary_decodes_with_defaults() {
        let r = decode_enqueue(&base()).unwrap();
        assert_eq!(r.run_id.as_deref(), Some("r1"));
        assert_eq!(
            (r.disposition.as_str(), r.origin.as_str()),
            ("terminal", "autonomous")
        );
        assert_eq!(r.evidence, vec!["active-subagent"], "clamped");
        assert!(matches!(r.target, Some(Target::Exec { .. })));
    }

    #[test]
    fn x1_unknown_keys_and_wrong_types_name_the_key() {
        let cases: Vec<(&str, OwnedVariant, &str)> = vec![
            ("bogus", v(1u32), "bogus"),
            ("run_id", v(vec![1u8, 2]), "run_id"),
            ("reaped_at", v("yesterday".to_string()), "reaped_at"),
            ("user", v(-1i32), "user"),
            ("exec", v("/bin/true".to_string()), "exec"),
            ("resume_on_reap", v(1u32), "resume_on_reap"),
            ("env", v(vec!["A=B".to_string()]), "env"),
            ("session", v("x".repeat(5000)), "session"),
        ];
        for (k, val, field) in cases {
            let mut d = base();
            d.insert(k.to_string(), val);
            let e = decode_enqueue(&d).unwrap_err();
            assert_eq!(e.0, field, "{k}: {e:?}");
        }
    }

    /// X-1 as amended (issue 15): `reaped_at`, `user` and `group` take any D-Bus integer type
    /// whose value is non-negative and fits (gdbus and dbus-python send plain numbers as
    /// 32-bit), and nothing else.
    #[test]
    fn x1_integers_of_any_width_that_fit_are_accepted() {
        let ints: Vec<(OwnedVariant, Option<u64>)> = vec![
            (v(7u8), Some(7)),
            (v(7i16), Some(7)),
            (v(7u16), Some(7)),
            (v(7i32), Some(7)),
            (v(7u32), Some(7)),
            (v(7i64), Some(7)),
            (v(7u64), Some(7)),
            (v(-1i32), None),
            (v(-1i64), None),
            (v(1.5f64), None),
            (v(true), None),
        ];
        for (val, want) in ints {
            for key in ["reaped_at", "user", "group"] {
                let mut d = base();
                d.insert(key.to_string(), val.try_clone().unwrap());
                let got = decode_enqueue(&d);
                match want {
                    Some(n) => {
                        let r = got.unwrap_or_else(|e| panic!("{key} = {val:?}: {e:?}"));
                        let slot = match key {
                            "reaped_at" => r.reaped_at,
                            "user" => r.user.map(u64::from),
                            _ => r.group.map(u64::from),
                        };
                        assert_eq!(slot, Some(n), "{key} = {val:?}");
                    }
                    None => assert_eq!(got.unwrap_err().0, key, "{key} = {val:?}"),
                }
            }
        }
        // Larger than a uid or gid can be.
        for key in ["user", "group"] {
            let mut d = base();
            d.insert(key.to_string(), v(1u64 << 32));
            assert_eq!(decode_enqueue(&d).unwrap_err().0, key);
        }
    }

    #[test]
    fn x1_unit_exec_and_env_combinations() {
        let mut d = base();
        d.insert("unit".into(), v("x.service".to_string()));
        assert_eq!(decode_enqueue(&d).unwrap_err().0, "exec");
        let mut d = base();
        d.remove("exec");
        d.insert("unit".into(), v("x.service".to_string()));
        d.insert(
            "env".into(),
            v(HashMap::from([("A".to_string(), "1".to_string())])),
        );
        assert_eq!(decode_enqueue(&d).unwrap_err().0, "env");
        let mut d = base();
        d.insert(
            "env".into(),
            v(HashMap::from([("A".to_string(), "1".to_string())])),
        );
        let r = decode_enqueue(&d).unwrap();
        let Some(Target::Exec { env, .. }) = r.target else {
            panic!()
        };
        assert_eq!(env.get("A").map(String::as_str), Some("1"));
    }

    #[test]
    fn q3_evidence_as_av_drops_non_strings() {
        let mut d = base();
        let items: Vec<OwnedVariant> = vec![
            v("relay-lease".to_string()),
            v(7u32),
            v("active-process".to_string()),
        ];
        d.insert(
            "evidence".into(),
            OwnedVariant::try_from(Variant::from(items)).unwrap(),
        );
        assert_eq!(
            decode_enqueue(&d).unwrap().evidence,
            vec!["relay-lease", "active-process"]
        );
    }

    #[test]
    fn x1_list_redacts_for_other_users_and_never_shows_env_values() {
        let e: Entry = serde_json::from_value(serde_json::json!({
            "id": "rq-a-1", "run_id": "r", "session": "s", "target": {"exec": ["/bin/x"], "env": {"TOKEN": "secret"}},
            "uid": 1000, "gid": 1000, "cwd": "/home/u", "class": "interactive", "status": "queued",
            "reaped_at": 1, "queued_at": 2
        }))
        .unwrap();
        let full = list_row(&e, true);
        assert_eq!(full["env_names"], serde_json::json!(["TOKEN"]));
        assert!(!full.to_string().contains("secret"));
        let red = list_row(&e, false);
        let keys: Vec<&String> = red.as_object().unwrap().keys().collect();
        for k in &keys {
            assert!(
                [
                    "id",
                    "class",
                    "status",
                    "attempts",
                    "session",
                    "target_kind",
                    "reaped_at",
                    "queued_at",
                    "requeued_at",
                    "last_attempt_at",
                    "next_attempt_at"
                ]
                .contains(&k.as_str()),
                "{k} leaks to other users"
            );
        }
        assert!(!red.to_string().contains("/home/u"));
    }
}
