//! D-Bus publication (SPEC X-1): the well-known name `org.outlive.Agent1`, its objects, and the
//! connection's life.
//!
//! The connection lives on a thread and a runtime of its own, which only dispatches calls and
//! never blocks (`gate` describes how calls are bounded and what runs where); the rest of the
//! agent asks it for PropertiesChanged and posture signals through a channel ([`Bus::sync`],
//! [`Bus::posture_signals`]). The name is requested without queueing after the startup
//! decisions; if another connection owns it, start fails (exit 75, `ERRNO=EADDRINUSE`). While
//! running, the bus loop's heartbeat follows dispatch progress: it beats while calls
//! complete, and otherwise on an answered ping of its own object. If the connection drops, the
//! loop rebuilds it with backoff (beating meanwhile: waiting is not wedged), re-serves every
//! object and re-requests the name; the gap is recorded for the posture (`publish.dbus` reads
//! `off-runtime-divergent` meanwhile).

pub(crate) mod agent1;
pub(crate) mod auth;
pub(crate) mod errors;
pub(crate) mod gate;
pub mod guards1;
pub mod queue1;
pub mod runs1;
pub mod variant;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use zbus::Connection;
use zbus::fdo::{RequestNameFlags, RequestNameReply};

use crate::audit::{AuditSink, Event, EventKind, priority};
use crate::clock::boottime_ms;
use crate::publish::watchdog::LoopBeat;
use crate::sync::{MutexExt, RwLockExt};

pub use agent1::{Agent1, HostState};
pub use errors::OutliveError;
pub use guards1::Guards1;
pub use queue1::{ResumeQueue1, SharedQueue};
pub use runs1::Runs1;

/// Emits PropertiesChanged for every published property that changed since the last call,
/// and only for those. Shared by the tick loop and the method handlers, so that a change is
/// emitted once, whoever notices it first.
pub struct Publisher {
    host: Arc<HostState>,
    queue: SharedQueue,
    drainer: crate::drainer::tick::Handle,
    posture: Arc<std::sync::RwLock<crate::posture::Published>>,
    last: tokio::sync::Mutex<(
        agent1::Agent1Props,
        queue1::QueueProps,
        guards1::GuardsProps,
    )>,
}

impl Publisher {
    /// A publisher whose baseline is the current state.
    pub fn new(
        host: Arc<HostState>,
        queue: SharedQueue,
        drainer: crate::drainer::tick::Handle,
        posture: Arc<std::sync::RwLock<crate::posture::Published>>,
    ) -> Publisher {
        let mut p = Publisher {
            host,
            queue,
            drainer,
            posture,
            last: tokio::sync::Mutex::new(Default::default()),
        };
        p.last = tokio::sync::Mutex::new(p.current());
        p
    }

    fn current(
        &self,
    ) -> (
        agent1::Agent1Props,
        queue1::QueueProps,
        guards1::GuardsProps,
    ) {
        (
            self.host.props(),
            queue1::QueueProps::of(&self.queue.view(), &self.drainer.public()),
            guards1::GuardsProps::of(&self.posture.reading()),
        )
    }

    /// Take the current state as published (a new connection: clients re-read everything).
    pub async fn reset(&self) {
        *self.last.lock().await = self.current();
    }

    /// Emit what changed on `conn`: per interface one PropertiesChanged holding every
    /// property the change touched (a `Pause` is one signal with `Paused`, `PauseKind`,
    /// `PauseReason` and `PausedAt`, so no client sees half of it).
    pub async fn sync(&self, conn: &Connection) {
        let mut last = self.last.lock().await;
        let now = self.current();
        if *last == now {
            return;
        }
        let mut signals: Vec<(&str, &str, Changed, Vec<&str>)> = Vec::new();
        let (a, b) = (&last.0, &now.0);
        let mut c = Changed::new();
        c.put(a.hostname != b.hostname, "Hostname", b.hostname.clone());
        c.put(
            a.status_text != b.status_text,
            "StatusText",
            b.status_text.clone(),
        );
        c.put(a.degraded != b.degraded, "Degraded", b.degraded);
        signals.push((AGENT_PATH, "org.outlive.Agent1", c, vec![]));
        let (a, b) = (&last.1, &now.1);
        let mut c = Changed::new();
        c.put(a.enabled != b.enabled, "Enabled", b.enabled);
        c.put(
            a.disabled_reason != b.disabled_reason,
            "DisabledReason",
            b.disabled_reason.clone(),
        );
        c.put(
            a.disabled_detail != b.disabled_detail,
            "DisabledDetail",
            b.disabled_detail.clone(),
        );
        c.put(a.dry_run != b.dry_run, "DryRun", b.dry_run);
        c.put(a.paused != b.paused, "Paused", b.paused);
        c.put(
            a.pause_kind != b.pause_kind,
            "PauseKind",
            b.pause_kind.clone(),
        );
        c.put(
            a.pause_reason != b.pause_reason,
            "PauseReason",
            b.pause_reason.clone(),
        );
        c.put(a.paused_at != b.paused_at, "PausedAt", b.paused_at);
        c.put(a.waiting != b.waiting, "Waiting", b.waiting);
        c.put(
            a.breaker_open_until != b.breaker_open_until,
            "BreakerOpenUntil",
            b.breaker_open_until,
        );
        c.put(
            a.quota_signal != b.quota_signal,
            "QuotaSignal",
            b.quota_signal.clone(),
        );
        signals.push((QUEUE_PATH, "org.outlive.ResumeQueue1", c, vec![]));
        let (a, b) = (&last.2, &now.2);
        let mut c = Changed::new();
        let summary: HashMap<String, u32> = b.summary.iter().cloned().collect();
        c.put(a.summary != b.summary, "Summary", summary);
        c.put(a.anomalies != b.anomalies, "Anomalies", b.anomalies.clone());
        // `Attention` is per caller (§12 G-10): its signal carries no value.
        let invalidated = if a.attention != b.attention {
            vec!["Attention"]
        } else {
            vec![]
        };
        signals.push((GUARDS_PATH, "org.outlive.Guards1", c, invalidated));
        for (path, iface, changed, invalidated) in signals {
            if changed.0.is_empty() && invalidated.is_empty() {
                continue;
            }
            if let Err(e) = emit(conn, path, iface, changed, invalidated).await {
                tracing::warn!("cannot emit PropertiesChanged: {e}");
            }
        }
        *last = now;
    }
}

/// The properties one change touched, with their new values.
struct Changed(HashMap<&'static str, zbus::Variant<'static>>);

impl Changed {
    fn new() -> Changed {
        Changed(HashMap::new())
    }

    fn put(&mut self, changed: bool, name: &'static str, value: impl Into<zbus::Variant<'static>>) {
        if changed {
            self.0.insert(name, value.into());
        }
    }
}

/// One PropertiesChanged signal.
async fn emit(
    conn: &Connection,
    path: &str,
    iface: &str,
    changed: Changed,
    invalidated: Vec<&str>,
) -> zbus::Result<()> {
    let em = zbus::object_server::SignalEmitter::new(conn, path)?;
    zbus::fdo::Properties::properties_changed(
        &em,
        zbus::names::InterfaceName::try_from(iface)?,
        changed.0,
        std::borrow::Cow::Owned(invalidated),
    )
    .await
}

/// The well-known name.
pub const NAME: &str = "org.outlive.Agent1";
/// The main object.
pub const AGENT_PATH: &str = "/org/outlive/Agent1";
/// The posture object.
pub const GUARDS_PATH: &str = "/org/outlive/Agent1/Guards";
/// The queue object.
pub const QUEUE_PATH: &str = "/org/outlive/Agent1/ResumeQueue";

/// How long one self-ping may take.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnection backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Which bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusTarget {
    /// The system bus (`DBUS_SYSTEM_BUS_ADDRESS` or the default socket).
    System,
    /// The session bus (`--user`).
    Session,
}

/// Why the bus could not be used at start.
#[derive(Debug)]
pub enum StartError {
    /// Another connection owns the name.
    NameTaken,
    /// The bus policy does not let us own the name.
    NameDenied(String),
    /// The bus could not be reached.
    Unreachable(zbus::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::NameTaken => write!(
                f,
                "the D-Bus name {NAME} is owned by another connection: is another outlived running? \
                 (`busctl status {NAME}` names it)"
            ),
            StartError::NameDenied(e) => write!(
                f,
                "the bus policy does not allow this process to own {NAME} ({e}); the system agent runs as \
                 root with the shipped policy org.outlive.Agent1.conf; run as a user with --user"
            ),
            StartError::Unreachable(e) => write!(f, "cannot connect to the message bus: {e}"),
        }
    }
}

/// The objects served on every connection (handles over the agent's shared state).
#[derive(Clone)]
pub struct Objects {
    pub agent1: Agent1,
    pub queue1: ResumeQueue1,
    pub guards1: Guards1,
    pub runs1: Runs1,
    pub publisher: Arc<Publisher>,
}

/// What the rest of the agent asks of the bus thread.
enum Out {
    /// Emit PropertiesChanged for what changed.
    Sync,
    /// `RunEnded(run_id, how)` (C-8).
    RunEnded(String, String),
    /// `PostureChanged(changed_rows)` and `AttentionRaised(kind, detail)`.
    Posture(Vec<crate::posture::rows::Row>, Vec<(String, String)>),
    /// Everything asked before has been emitted.
    Flushed(tokio::sync::oneshot::Sender<()>),
}

/// The agent's bus connection and its publication state.
pub struct Bus {
    target: BusTarget,
    objects: Objects,
    audit: Arc<dyn AuditSink>,
    gate: Arc<gate::Gate>,
    conn: Mutex<Option<Connection>>,
    up: AtomicBool,
    /// Boottime when the current gap began (0: none).
    gap_since_ms: AtomicU64,
    gaps: AtomicU64,
    /// Called when the connection is lost and when it is back (the posture re-evaluates, so
    /// `publish.dbus` shows the gap).
    on_change: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    outbox: tokio::sync::mpsc::UnboundedSender<Out>,
    inbox: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Out>>>,
}

/// The bus thread, once its connection owns the name.
pub struct BusThread {
    pub bus: Arc<Bus>,
    thread: std::thread::JoinHandle<()>,
}

impl BusThread {
    /// Wait (at most `patience`) for the thread to release the name and end; it does once the
    /// shutdown it was given is signalled.
    pub async fn join(self, patience: Duration) {
        let t = self.thread;
        let _ = tokio::time::timeout(patience, tokio::task::spawn_blocking(move || t.join())).await;
    }
}

/// Where a bus thread reports its heartbeat and learns to stop.
pub struct Loop {
    pub beat: Arc<LoopBeat>,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Bus {
    /// Start the bus thread: connect (retrying an unreachable bus for `patience`), serve the
    /// objects and own the name there; then run the bus loop on that thread until shutdown.
    /// Returns once the name is owned, or with why it cannot be.
    pub async fn spawn(
        target: BusTarget,
        objects: Objects,
        audit: Arc<dyn AuditSink>,
        gate: Arc<gate::Gate>,
        patience: Duration,
        lp: Loop,
    ) -> Result<BusThread, StartError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("outlive-bus".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .max_blocking_threads(gate::BLOCKING_THREADS)
                    .thread_keep_alive(Duration::from_secs(600))
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(StartError::Unreachable(zbus::Error::InputOutput(
                            Arc::new(e),
                        ))));
                        return;
                    }
                };
                rt.block_on(async move {
                    let bus =
                        match Bus::start_patiently(target, objects, audit, gate, patience).await {
                            Ok(b) => b,
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        };
                    if tx.send(Ok(Arc::clone(&bus))).is_err() {
                        return;
                    }
                    let outbox = tokio::spawn(Arc::clone(&bus).outbox(lp.shutdown.clone()));
                    Arc::clone(&bus).run(lp.beat, lp.shutdown).await;
                    outbox.abort();
                    bus.close().await;
                });
            })
            .map_err(|e| StartError::Unreachable(zbus::Error::InputOutput(Arc::new(e))))?;
        match rx.await {
            Ok(Ok(bus)) => Ok(BusThread { bus, thread }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(StartError::Unreachable(zbus::Error::Failure(
                    "the bus thread ended".into(),
                )))
            }
        }
    }

    /// Connect, retrying an unreachable bus with backoff for `patience`.
    async fn start_patiently(
        target: BusTarget,
        objects: Objects,
        audit: Arc<dyn AuditSink>,
        gate: Arc<gate::Gate>,
        patience: Duration,
    ) -> Result<Arc<Bus>, StartError> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut backoff = Duration::from_millis(250);
        loop {
            match Bus::start(
                target,
                objects.clone(),
                Arc::clone(&audit),
                Arc::clone(&gate),
            )
            .await
            {
                Err(e @ StartError::Unreachable(_))
                    if tokio::time::Instant::now() + backoff <= deadline =>
                {
                    tracing::warn!("{e}; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(4));
                }
                other => return other,
            }
        }
    }

    /// Connect, serve the objects and own the name.
    pub async fn start(
        target: BusTarget,
        objects: Objects,
        audit: Arc<dyn AuditSink>,
        gate: Arc<gate::Gate>,
    ) -> Result<Arc<Bus>, StartError> {
        let conn = connect(target, &objects).await?;
        objects.publisher.reset().await;
        let (outbox, inbox) = tokio::sync::mpsc::unbounded_channel();
        let bus = Arc::new(Bus {
            target,
            objects,
            audit,
            gate,
            conn: Mutex::new(Some(conn.clone())),
            up: AtomicBool::new(true),
            gap_since_ms: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            on_change: Mutex::new(None),
            outbox,
            inbox: Mutex::new(Some(inbox)),
        });
        bus.watch_names(&conn);
        Ok(bus)
    }

    /// Forget the identity of every unique name that leaves the bus (the gate's cache).
    fn watch_names(&self, conn: &Connection) {
        let (gate, conn) = (Arc::clone(&self.gate), conn.clone());
        tokio::spawn(async move {
            use futures_util::StreamExt;
            let Ok(proxy) = zbus::fdo::DBusProxy::new(&conn).await else {
                return;
            };
            let Ok(mut changes) = proxy.receive_name_owner_changed().await else {
                return;
            };
            while let Some(sig) = changes.next().await {
                if let Ok(a) = sig.args()
                    && a.new_owner().is_none()
                {
                    gate.forget(a.name());
                }
            }
        });
    }

    /// Call `f` whenever the connection is lost or restored.
    pub fn set_on_change(&self, f: Box<dyn Fn() + Send + Sync>) {
        *self.on_change.locked() = Some(f);
    }

    fn changed(&self) {
        if let Some(f) = self.on_change.locked().as_ref() {
            f();
        }
    }

    /// The live connection, if any.
    pub fn connection(&self) -> Option<Connection> {
        self.conn.locked().clone()
    }

    /// Whether the name is owned now.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Boottime when the current gap began, if the bus is down.
    pub fn gap_since_ms(&self) -> Option<u64> {
        match self.gap_since_ms.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t),
        }
    }

    /// How many times the connection was lost.
    pub fn gaps(&self) -> u64 {
        self.gaps.load(Ordering::Relaxed)
    }

    /// Ask the bus thread to emit `RunEnded(run_id, how)` (C-8); returns at once.
    pub fn run_ended(&self, run_id: &str, how: &str) {
        let _ = self
            .outbox
            .send(Out::RunEnded(run_id.to_string(), how.to_string()));
    }

    /// Ask the bus thread to emit PropertiesChanged for what changed since it last did (see
    /// [`Publisher`]); returns at once.
    pub fn sync(&self) {
        let _ = self.outbox.send(Out::Sync);
    }

    /// Ask the bus thread to emit `PostureChanged(changed_rows)` and `AttentionRaised(kind,
    /// detail)` (G-10, G-9); returns at once.
    pub fn posture_signals(
        &self,
        changed: &[crate::posture::rows::Row],
        raised: &[(String, String)],
    ) {
        if !changed.is_empty() || !raised.is_empty() {
            let _ = self
                .outbox
                .send(Out::Posture(changed.to_vec(), raised.to_vec()));
        }
    }

    /// Wait (at most `patience`) until the bus thread has emitted what was asked before (the
    /// agent says READY=1 only then, so no change made before it is signalled after it).
    pub async fn flush(&self, patience: Duration) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.outbox.send(Out::Flushed(tx)).is_ok() {
            let _ = tokio::time::timeout(patience, rx).await;
        }
    }

    /// The bus thread's side of [`Bus::sync`] and [`Bus::posture_signals`].
    async fn outbox(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let Some(mut inbox) = self.inbox.locked().take() else {
            return;
        };
        loop {
            let out = tokio::select! {
                o = inbox.recv() => o,
                _ = shutdown.changed() => return,
            };
            let Some(out) = out else { return };
            if let Out::Flushed(done) = out {
                let _ = done.send(());
                continue;
            }
            let Some(conn) = self.connection() else {
                continue;
            };
            match out {
                Out::Flushed(_) => {}
                Out::Sync => self.objects.publisher.sync(&conn).await,
                Out::RunEnded(run_id, how) => {
                    match zbus::object_server::SignalEmitter::new(&conn, runs1::RUNS_PATH) {
                        Ok(em) => {
                            if let Err(e) = Runs1::run_ended(&em, &run_id, &how).await {
                                tracing::warn!("cannot emit RunEnded: {e}");
                            }
                        }
                        Err(e) => tracing::warn!("cannot emit RunEnded: {e}"),
                    }
                    self.objects.publisher.sync(&conn).await;
                }
                Out::Posture(changed, raised) => {
                    emit_posture(&conn, &changed, &raised).await;
                    self.objects.publisher.sync(&conn).await;
                }
            }
        }
    }

    fn set_conn(&self, c: Option<Connection>) {
        *self.conn.locked() = c;
    }

    fn lost(&self, why: &str) {
        if self.up.swap(false, Ordering::Relaxed) {
            self.gaps.fetch_add(1, Ordering::Relaxed);
            self.gap_since_ms
                .store(boottime_ms().max(1), Ordering::Relaxed);
            self.set_conn(None);
            self.audit.record(
                &Event::new(
                    EventKind::BusLost,
                    format!("lost the D-Bus connection ({why}); reconnecting with backoff"),
                )
                .priority(priority::WARNING)
                .field("reason", why),
            );
            self.changed();
        }
    }

    /// The bus loop (on the bus thread): the dispatch heartbeat, and reconnection when the
    /// connection is lost. Returns when `shutdown` flips to true.
    pub async fn run(
        self: Arc<Self>,
        beat: Arc<LoopBeat>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut backoff = BACKOFF_MIN;
        let mut last_done = self.gate.completed();
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.connection() {
                Some(conn) => {
                    let period = beat.period();
                    tokio::select! {
                        _ = conn.closed() => self.lost("the bus closed the connection"),
                        _ = tokio::time::sleep(period) => {
                            // Dispatch progress: calls completed since the last look. Without
                            // any (idle, or one slow call), a ping of our own object through
                            // the dispatcher shows it still answers.
                            let done = self.gate.completed();
                            if done != last_done {
                                last_done = done;
                                beat.beat();
                            } else {
                                match tokio::time::timeout(PING_TIMEOUT, self_ping(&conn)).await {
                                    Ok(Ok(())) => beat.beat(),
                                    Ok(Err(e)) if conn.is_closed() => self.lost(&e.to_string()),
                                    Ok(Err(e)) => tracing::warn!("the bus did not return our own ping: {e}"),
                                    Err(_) => tracing::warn!("our own ping through the bus timed out"),
                                }
                            }
                        }
                        _ = shutdown.changed() => {}
                    }
                }
                None => {
                    // Reconnecting is progress: the loop is not wedged, the bus is gone.
                    beat.beat();
                    match connect(self.target, &self.objects).await {
                        Ok(c) => {
                            // Unique names are the old daemon's: forget every identity.
                            self.gate.forget_all();
                            self.watch_names(&c);
                            self.set_conn(Some(c));
                            self.up.store(true, Ordering::Relaxed);
                            let gap_ms = self
                                .gap_since_ms()
                                .map(|t| boottime_ms().saturating_sub(t))
                                .unwrap_or(0);
                            self.gap_since_ms.store(0, Ordering::Relaxed);
                            self.objects.publisher.reset().await;
                            backoff = BACKOFF_MIN;
                            self.audit.record(
                                &Event::new(
                                    EventKind::BusReconnected,
                                    format!(
                                        "reconnected to D-Bus and own {NAME} again after {} ms",
                                        gap_ms
                                    ),
                                )
                                .priority(priority::NOTICE)
                                .field("gap_ms", gap_ms),
                            );
                            self.changed();
                        }
                        Err(e) => {
                            tracing::warn!(
                                "reconnecting to D-Bus failed: {e}; next try in {}s",
                                backoff.as_secs()
                            );
                            // Waiting out the backoff is the loop at work, not wedged: beat
                            // within every period meanwhile (an outage of the bus longer than
                            // the watchdog's window must not get the agent restarted).
                            let until = tokio::time::Instant::now() + backoff;
                            while tokio::time::Instant::now() < until && !*shutdown.borrow() {
                                beat.beat();
                                let slice = beat.period().min(until - tokio::time::Instant::now());
                                tokio::select! {
                                    _ = tokio::time::sleep(slice) => {}
                                    _ = shutdown.changed() => {}
                                }
                            }
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                        }
                    }
                }
            }
        }
    }

    /// Release the name and close the connection (orderly stop).
    pub async fn close(&self) {
        let c = self.conn.locked().take();
        if let Some(c) = c {
            let _ = c.release_name(NAME).await;
            let _ = c.close().await;
        }
    }
}

/// Emit `PostureChanged(changed_rows)` and `AttentionRaised(kind, detail)` on `conn`.
async fn emit_posture(
    conn: &Connection,
    changed: &[crate::posture::rows::Row],
    raised: &[(String, String)],
) {
    let Ok(iref) = conn
        .object_server()
        .interface::<_, Guards1>(GUARDS_PATH)
        .await
    else {
        return;
    };
    let em = iref.signal_emitter();
    if !changed.is_empty()
        && let Err(e) = Guards1::posture_changed(em, guards1::rows_wire(changed)).await
    {
        tracing::warn!("cannot emit PostureChanged: {e}");
    }
    for (kind, detail) in raised {
        if let Err(e) = Guards1::attention_raised(em, kind, detail).await {
            tracing::warn!("cannot emit AttentionRaised: {e}");
        }
    }
}

async fn connect(target: BusTarget, objects: &Objects) -> Result<Connection, StartError> {
    let builder = match target {
        BusTarget::System => zbus::connection::Builder::system(),
        BusTarget::Session => zbus::connection::Builder::session(),
    };
    let conn = builder
        .serve_at(AGENT_PATH, objects.agent1.clone())
        .serve_at(QUEUE_PATH, objects.queue1.clone())
        .serve_at(GUARDS_PATH, objects.guards1.clone())
        .serve_at(runs1::RUNS_PATH, objects.runs1.clone())
        .build()
        .await
        .map_err(StartError::Unreachable)?;
    match conn
        .request_name_with_flags(NAME, RequestNameFlags::DO_NOT_QUEUE)
        .await
    {
        Ok(RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner) => Ok(conn),
        // zbus reports an existing owner as its own error, not as the reply value.
        Ok(RequestNameReply::InQueue | RequestNameReply::Exists) | Err(zbus::Error::NameTaken) => {
            Err(StartError::NameTaken)
        }
        Err(zbus::Error::FDO(e)) if matches!(*e, zbus::fdo::Error::AccessDenied(_)) => {
            Err(StartError::NameDenied(e.to_string()))
        }
        Err(e) => Err(StartError::Unreachable(e)),
    }
}

async fn self_ping(conn: &Connection) -> zbus::Result<()> {
    let me = conn.unique_name().map(|n| n.to_string());
    conn.call_method(
        me.as_deref(),
        AGENT_PATH,
        Some("org.freedesktop.DBus.Peer"),
        "Ping",
        &(),
    )
    .await?;
    Ok(())
}
