//! The drainer's tick (SPEC D-1 to D-10, P-1 to P-5, Q-13): revive queued runs one at a time,
//! through the service manager, when the host is calm.
//!
//! Order (D-2): (1) heartbeat and lock (the agent's loop); (2) disabled ⇒ `queue-disabled`,
//! off ⇒ `queue-off`; (3) paused ⇒ §5; (4) pressure and calm accounting; (5) TTL sweep;
//! (6) breaker; (7) gates: calm (skipped by a manual drain), quota, session cap; (8) the head
//! candidate; (9) validation; (10) dry run; (11) the attempt. At most one decision per tick.
//!
//! Decide, then act: a tick first verifies what is due (`wake`, `reconcile`), then gathers
//! what `decide::decide` asks for (the queue's snapshot, the pressure, the
//! candidates, the count of revived runs alive, one validation at a time), carries out the
//! actions it returns (`act`) and ends the way it says (`carry_out`: a report, an
//! invalidation or an attempt). The decision is a pure function; the I/O is here.
//! Verification of an attempt runs on every wake once its grace has elapsed, before the next
//! decision; a tick never waits a grace out. Outcome words are audited when they change.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};

use super::continuation;
use super::decide::{Action, Decision, Fact, Finish, Step, View, decide};
use super::gauge::{Gauge, Tier, tier};
use super::manager::{
    CALL_TIMEOUT, ServiceManager, StartError, Transient, Verdict, attempt_verdict, watched_verdict,
};
use super::spawn::{self, SpawnSpec};
use super::validate::{Check, Context, Owner, Paths, validate};
use crate::audit::{Alert, AuditSink, Event, EventKind, priority};
use crate::clock::Clock;
use crate::config::Config;
use crate::queue::entry::{Entry, Status, Target};
use crate::queue::rules::{self, PauseKind};
use crate::queue::{AttemptResult, Finished};
use crate::sync::MutexExt;

use crate::queue::SharedQueue;

/// The drainer's settings (SPEC §9 `[drainer]`, and the queue's dry run and attempts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub required_calm_ticks: u32,
    pub grace_ms: u64,
    pub max_revived_alive: u32,
    pub backoff_base_ms: u64,
    pub breaker_threshold: u32,
    pub breaker_cooldown_ms: u64,
    pub auto_resume_stale_pause: bool,
    pub stale_pause_window_ms: u64,
    pub calm_gate: bool,
    /// 0: the pressure-held notice is off.
    pub pressure_held_notice_ms: u64,
    /// A user manager: transient units carry no `User=`/`Group=`.
    pub user_mode: bool,
    /// `queue.allowed_units`, checked again at the attempt (D-6 check 2).
    pub allowed_units: Vec<String>,
}

impl Settings {
    /// From the configuration.
    pub fn from_config(c: &Config, user_mode: bool) -> Settings {
        let d = &c.drainer;
        Settings {
            required_calm_ticks: d.required_calm_ticks,
            grace_ms: d.grace_sec as u64 * 1000,
            max_revived_alive: d.max_revived_alive,
            backoff_base_ms: d.backoff_base_sec as u64 * 1000,
            breaker_threshold: d.breaker_threshold,
            breaker_cooldown_ms: d.breaker_cooldown_min as u64 * 60_000,
            auto_resume_stale_pause: d.auto_resume_stale_pause,
            stale_pause_window_ms: d.stale_pause_window_min as u64 * 60_000,
            calm_gate: d.calm_gate,
            pressure_held_notice_ms: d.pressure_held_notice_min as u64 * 60_000,
            user_mode,
            allowed_units: c.queue.allowed_units.clone(),
        }
    }

    /// The short backoff after a check that could not decide (D-6).
    pub fn undecided_backoff_ms(&self) -> u64 {
        self.backoff_base_ms.clamp(1000, 60_000)
    }
}

/// A tick's outcome word (D-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Revived,
    QueueDisabled,
    QueueOff,
    Paused,
    BreakerOpen,
    Calm,
    Quota,
    SessionCap,
    Empty,
    Invalidated,
    DryRun,
    AttemptFailed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Revived => "revived",
            Outcome::QueueDisabled => "queue-disabled",
            Outcome::QueueOff => "queue-off",
            Outcome::Paused => "paused",
            Outcome::BreakerOpen => "breaker-open",
            Outcome::Calm => "calm",
            Outcome::Quota => "quota",
            Outcome::SessionCap => "session-cap",
            Outcome::Empty => "empty",
            Outcome::Invalidated => "invalidated",
            Outcome::DryRun => "dry-run",
            Outcome::AttemptFailed => "attempt-failed",
        }
    }
}

/// A tick's report (what `Drain()` answers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub outcome: Outcome,
    pub entry_id: Option<String>,
    pub detail: Option<String>,
}

impl Report {
    pub(crate) fn new(outcome: Outcome) -> Report {
        Report {
            outcome,
            entry_id: None,
            detail: None,
        }
    }
    pub(crate) fn with(outcome: Outcome, id: Option<&str>, detail: impl Into<String>) -> Report {
        Report {
            outcome,
            entry_id: id.map(str::to_string),
            detail: Some(detail.into()),
        }
    }
}

/// `absent`, `fresh` or `stale` (D-10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuotaSignal {
    #[default]
    Absent,
    Fresh,
    Stale,
}

impl QuotaSignal {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaSignal::Absent => "absent",
            QuotaSignal::Fresh => "fresh",
            QuotaSignal::Stale => "stale",
        }
    }
}

/// What the drainer publishes (properties, status, posture).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Public {
    /// Wall ms until which the breaker is open (0: closed).
    pub breaker_open_until: u64,
    pub quota: QuotaSignal,
    pub last_outcome: Option<Outcome>,
    pub calm_streak: u32,
    pub tier: Option<Tier>,
    /// Boottime of the last tick.
    pub last_tick_boot: Option<u64>,
    /// Runs revived since the agent started (the metrics counter).
    pub revivals: u64,
}

/// What the drainer shares with the bus: what it publishes, and the quota report (D-10), which
/// `ReportQuota` sets without waiting for a running tick.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Mutex<Shared>>,
    clock: Arc<dyn Clock>,
    audit: Arc<dyn AuditSink>,
}

#[derive(Default)]
struct Shared {
    public: Public,
    /// (can_spawn, valid until boottime ms).
    quota: Option<(bool, u64)>,
}

impl Handle {
    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.locked()
    }

    /// The published state, with the quota signal as of now.
    pub fn public(&self) -> Public {
        let s = self.shared();
        let mut p = s.public.clone();
        p.quota = match s.quota {
            None => QuotaSignal::Absent,
            Some((_, until)) if self.clock.boot_ms() < until => QuotaSignal::Fresh,
            Some(_) => QuotaSignal::Stale,
        };
        p
    }

    /// The quota report while it is fresh: whether spawning is allowed.
    fn fresh_quota(&self) -> Option<bool> {
        match self.shared().quota {
            Some((can, until)) if self.clock.boot_ms() < until => Some(can),
            _ => None,
        }
    }

    fn update(&self, f: impl FnOnce(&mut Public)) {
        f(&mut self.shared().public)
    }

    /// D-10: a headroom report, valid for `valid_for_ms`.
    pub fn report_quota(&self, can_spawn: bool, valid_for_ms: u64) {
        self.shared().quota = Some((can_spawn, self.clock.boot_ms().saturating_add(valid_for_ms)));
        self.audit.record(
            &Event::new(
                EventKind::QuotaReported,
                format!(
                    "quota report: {} for {} s",
                    if can_spawn {
                        "may spawn"
                    } else {
                        "may not spawn"
                    },
                    valid_for_ms / 1000
                ),
            )
            .priority(priority::INFO)
            .field("can_spawn", can_spawn)
            .field("valid_for_ms", valid_for_ms),
        );
    }
}

struct Attempt {
    started_boot: u64,
    started_wall: u64,
    unit: Option<String>,
    transient: bool,
    child: Option<Child>,
    /// A watched run's revival (C-6: verified by how it ended).
    watched: bool,
}

/// A spawned revival (no service manager): kept to reap it and to count it while alive.
struct Tracked {
    key: String,
    child: Child,
}

/// What a tick has gathered for its decision ([`View`] borrows it).
#[derive(Default)]
struct Gathered {
    now_boot: u64,
    snapshot: crate::queue::Snapshot,
    stale_pause: Option<String>,
    lift_failed: Option<String>,
    pressure: Option<(Tier, String)>,
    candidates: Option<Vec<Entry>>,
    stops: Vec<crate::queue::store::RunStop>,
    global_stop: Option<u64>,
    /// The current unit of each candidate's watch record (C-11), by run id.
    run_units: Vec<(String, String)>,
    revived_alive: Option<Result<usize, String>>,
    checks: Vec<(String, Check)>,
    checking: Option<std::time::Instant>,
    out_of_time: bool,
}

/// The drainer.
pub struct Drainer<M: ServiceManager, P: Paths> {
    pub settings: Settings,
    manager: Option<M>,
    paths: P,
    gauge: Box<dyn Gauge>,
    clock: Arc<dyn Clock>,
    audit: Arc<dyn AuditSink>,
    runtime_dir: PathBuf,
    handle: Handle,
    calm_streak: u32,
    breaker_failures: u32,
    /// (boottime, wall) ms until which the breaker is open.
    breaker_until: Option<(u64, u64)>,
    seen: HashSet<String>,
    last_outcome: Option<(Outcome, Option<String>)>,
    held_since: Option<u64>,
    held_notified: bool,
    headsup: Option<(u64, u32)>,
    attempts: HashMap<String, Attempt>,
    tracked: Vec<Tracked>,
    reconciled: bool,
}

impl<M: ServiceManager, P: Paths> Drainer<M, P> {
    pub fn new(
        settings: Settings,
        manager: Option<M>,
        paths: P,
        gauge: Box<dyn Gauge>,
        clock: Arc<dyn Clock>,
        audit: Arc<dyn AuditSink>,
        runtime_dir: &Path,
    ) -> Drainer<M, P> {
        Drainer {
            settings,
            manager,
            paths,
            gauge,
            handle: Handle {
                shared: Arc::default(),
                clock: Arc::clone(&clock),
                audit: Arc::clone(&audit),
            },
            clock,
            audit,
            runtime_dir: runtime_dir.to_path_buf(),
            calm_streak: 0,
            breaker_failures: 0,
            breaker_until: None,
            seen: HashSet::new(),
            last_outcome: None,
            held_since: None,
            held_notified: false,
            headsup: None,
            attempts: HashMap::new(),
            tracked: Vec::new(),
            reconciled: false,
        }
    }

    /// What the drainer shares with the bus objects.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// What the drainer publishes now.
    pub fn public(&self) -> Public {
        self.handle.public()
    }

    /// D-10 (see [`Handle::report_quota`]).
    pub fn report_quota(&self, can_spawn: bool, valid_for_ms: u64) {
        self.handle.report_quota(can_spawn, valid_for_ms)
    }

    /// Whether a service manager is used (else exec targets are spawned detached).
    pub fn has_manager(&self) -> bool {
        self.manager.is_some()
    }

    fn publish(&self) {
        let now_boot = self.clock.boot_ms();
        let breaker = match self.breaker_until {
            Some((boot, wall)) if boot > now_boot => wall,
            _ => 0,
        };
        let outcome = self.last_outcome.as_ref().map(|(o, _)| *o);
        let streak = self.calm_streak;
        self.handle.update(|p| {
            p.breaker_open_until = breaker;
            p.last_outcome = outcome;
            p.calm_streak = streak;
        });
    }

    /// One tick (D-2). `manual`: a `Drain()` (skips the calm gate).
    pub async fn tick(&mut self, queue: &SharedQueue, manual: bool) -> Report {
        let r = self.tick_inner(queue, manual).await;
        let now = self.clock.boot_ms();
        self.handle.update(|p| p.last_tick_boot = Some(now));
        let key = (
            r.outcome,
            r.detail
                .clone()
                .filter(|_| matches!(r.outcome, Outcome::QueueDisabled | Outcome::Paused)),
        );
        if self.last_outcome.as_ref() != Some(&key) {
            self.audit.record(
                &Event::new(
                    EventKind::TickOutcome,
                    format!(
                        "drainer: {}{}",
                        r.outcome.as_str(),
                        r.detail
                            .as_deref()
                            .map(|d| format!(" ({d})"))
                            .unwrap_or_default()
                    ),
                )
                .priority(priority::INFO)
                .field("outcome", r.outcome.as_str())
                .field("entry_id", r.entry_id.clone().unwrap_or_default()),
            );
            self.last_outcome = Some(key);
        }
        self.publish();
        r
    }

    /// D-2 steps 2–11: verify what is due, then gather, decide ([`decide`]) and act until the
    /// decision is made.
    async fn tick_inner(&mut self, queue: &SharedQueue, manual: bool) -> Report {
        self.wake(queue).await;
        if !self.reconciled {
            self.reconcile(queue).await;
        }
        let mut g = Gathered {
            now_boot: self.clock.boot_ms(),
            ..Gathered::default()
        };
        self.refresh(queue, &mut g);
        loop {
            let step = decide(&self.view(&g, manual));
            match step {
                Step::Need(fact) => self.gather(queue, fact, &mut g).await,
                Step::Then(actions, fact) => {
                    for a in actions {
                        if let Err(e) = self.act(queue, a) {
                            g.lift_failed = Some(e);
                        }
                    }
                    self.refresh(queue, &mut g);
                    if g.lift_failed.is_none() {
                        self.gather(queue, fact, &mut g).await;
                    }
                }
                Step::Done(d) => return self.carry_out(queue, d).await,
            }
        }
    }

    /// What the decision sees now.
    fn view<'a>(&'a self, g: &'a Gathered, manual: bool) -> View<'a> {
        View {
            settings: &self.settings,
            manual,
            now_boot: g.now_boot,
            queue: &g.snapshot,
            stale_pause: g.stale_pause.as_deref(),
            lift_failed: g.lift_failed.as_deref(),
            headsup: self.headsup,
            calm_streak: self.calm_streak,
            held_since: self.held_since,
            held_notified: self.held_notified,
            breaker_until: self.breaker_until.map(|(boot, _)| boot),
            quota: self.handle.fresh_quota(),
            seen: &self.seen,
            pressure: g.pressure.as_ref().map(|(t, why)| (*t, why.as_str())),
            candidates: g.candidates.as_deref(),
            revived_alive: g
                .revived_alive
                .as_ref()
                .map(|r| r.as_ref().copied().map_err(String::as_str)),
            checks: &g.checks,
            out_of_time: g.out_of_time,
        }
    }

    /// The queue's snapshot, and whether its pause is a stale emergency pause (P-5).
    fn refresh(&self, queue: &SharedQueue, g: &mut Gathered) {
        g.snapshot = queue.lock().snapshot();
        g.stale_pause = g
            .snapshot
            .pause
            .as_ref()
            .and_then(|p| self.stale_pause(queue, p));
    }

    /// Gather what the decision asked for.
    async fn gather(&mut self, queue: &SharedQueue, fact: Fact, g: &mut Gathered) {
        match fact {
            Fact::Pressure => {
                let (t, why) = tier(&self.gauge.sample());
                g.pressure = Some((t, why));
            }
            Fact::Candidates => {
                let q = queue.lock();
                let state = q.state();
                g.candidates = Some(
                    rules::candidates(&state.entries, g.now_boot)
                        .into_iter()
                        .map(|i| state.entries[i].clone())
                        .collect(),
                );
                g.stops = state.stops.clone();
                g.global_stop = state.global_stop;
                g.run_units = g
                    .candidates
                    .iter()
                    .flatten()
                    .filter(|e| e.watched)
                    .filter_map(|e| {
                        let run = e.run_id.as_ref()?;
                        let r = state.runs.iter().find(|r| &r.run_id == run)?;
                        Some((run.clone(), r.unit.clone()))
                    })
                    .collect();
            }
            Fact::RevivedAlive => g.revived_alive = Some(self.revived_alive(queue).await),
            Fact::Check(id) => {
                let started = *g.checking.get_or_insert_with(std::time::Instant::now);
                let entry = g
                    .candidates
                    .as_ref()
                    .and_then(|c| c.iter().find(|e| e.id == id))
                    .cloned();
                let check = match entry {
                    Some(e) => {
                        let run_unit = g
                            .run_units
                            .iter()
                            .find(|(run, _)| e.run_id.as_ref() == Some(run))
                            .map(|(_, unit)| unit.as_str());
                        self.check(&e, &g.stops, g.global_stop, run_unit).await
                    }
                    None => Check::Undecided("the entry is no longer a candidate".into()),
                };
                // Each undecided check may have waited out a timeout.
                if matches!(check, Check::Undecided(_)) && started.elapsed() >= CALL_TIMEOUT {
                    g.out_of_time = true;
                }
                g.checks.push((id, check));
            }
        }
    }

    /// D-6 for one entry: the agent's own runs are checked as the agent, anyone else's as them.
    async fn check(
        &mut self,
        e: &Entry,
        stops: &[crate::queue::store::RunStop],
        global_stop: Option<u64>,
        run_unit: Option<&str>,
    ) -> Check {
        let tracked_alive = self.tracked_alive(&e.key());
        let owner = if e.uid == nix::unistd::geteuid().as_raw() {
            Owner::Agent
        } else {
            self.paths.owner(e.uid, e.gid).await
        };
        let cx = Context {
            owner: &owner,
            allowed_units: &self.settings.allowed_units,
            stops,
            global_stop,
            manager: self.manager.as_ref(),
            tracked_alive,
            run_unit,
        };
        validate(e, &cx, &self.paths).await
    }

    /// Carry out one action; only lifting a stale pause can fail (why, for the report).
    fn act(&mut self, queue: &SharedQueue, a: Action) -> Result<(), String> {
        match a {
            Action::SetCalm { streak, tier } => {
                self.calm_streak = streak;
                if let Some(t) = tier {
                    self.handle.update(|p| p.tier = Some(t));
                }
            }
            Action::AdvanceWaiting { calm } => {
                queue.lock().advance_waiting(calm);
            }
            Action::SweepTtl => {
                queue.lock().sweep_ttl();
            }
            Action::LiftStalePause(why) => {
                queue
                    .lock()
                    .auto_resume_stale(&why)
                    .map_err(|e| e.to_string())?;
                self.headsup = None;
            }
            Action::HeadsUp {
                paused_at,
                waiting,
                kind,
                reason,
            } => {
                self.headsup = Some((paused_at, waiting));
                self.audit.record(
                    &Event::new(
                        EventKind::PausedWaiting,
                        format!(
                            "revival is paused ({kind}: {reason}); {waiting} runs are waiting; run `outlivectl resume` to let them come back"
                        ),
                    )
                    .alert(Alert::PausedWithRunsWaiting)
                    .field("kind", kind)
                    .field("waiting", waiting),
                );
            }
            Action::CloseBreaker => {
                self.breaker_until = None;
                self.audit.record(
                    &Event::new(
                        EventKind::BreakerClosed,
                        "the breaker closed after its cooldown: revival attempts resume",
                    )
                    .priority(priority::NOTICE),
                );
            }
            Action::HoldSince(t) => self.held_since = Some(t),
            Action::PressureHeld {
                entry_id,
                label,
                why,
                tier,
            } => {
                self.held_notified = true;
                self.audit.record(
                    &Event::new(
                        EventKind::PressureHeld,
                        format!(
                            "{label} is held under memory/CPU pressure ({why}); will revive when there is headroom"
                        ),
                    )
                    .alert(Alert::QueueNotice)
                    .field("entry_id", &entry_id)
                    .field("tier", tier.as_str()),
                );
            }
            Action::ReleaseHold => {
                self.held_since = None;
                self.held_notified = false;
            }
            Action::RestartHold => self.held_since = None,
            Action::Defer { entry_id, why } => {
                let _ = queue
                    .lock()
                    .defer(&entry_id, self.settings.undecided_backoff_ms(), &why);
            }
            Action::WouldRevive { entry_id, label } => {
                self.audit.record(
                    &Event::new(
                        EventKind::WouldRevive,
                        format!("dry run: would revive {label} ({entry_id}); nothing is started while queue.dry_run is on"),
                    )
                    .priority(priority::INFO)
                    .field("entry_id", &entry_id),
                );
                self.seen.insert(entry_id);
            }
        }
        Ok(())
    }

    /// Carry out the decision and end the tick.
    async fn carry_out(&mut self, queue: &SharedQueue, d: Decision) -> Report {
        for a in d.actions {
            let _ = self.act(queue, a);
        }
        match d.finish {
            Finish::Report(r) => r,
            Finish::Invalidate {
                entry_id,
                why,
                detail,
            } => {
                let live = !queue.lock().snapshot().dry_run;
                let recorded = queue.lock().invalidate(&entry_id, why, &detail, live);
                let detail = match recorded {
                    Ok(()) => format!("{why}: {detail}"),
                    Err(err) => format!("{why}: {detail} (not recorded: {err})"),
                };
                Report::with(Outcome::Invalidated, Some(&entry_id), detail)
            }
            Finish::Attempt(e) => self.attempt(queue, *e).await,
        }
    }

    /// P-5: a stale emergency pause, and why.
    fn stale_pause(&self, queue: &SharedQueue, p: &rules::Pause) -> Option<String> {
        if !self.settings.auto_resume_stale_pause || p.kind != PauseKind::Emergency {
            return None;
        }
        let now = self.clock.wall_ms();
        if p.paused_at == 0 || p.paused_at > now {
            return None;
        }
        let window = self.settings.stale_pause_window_ms;
        let g = queue.lock();
        g.state()
            .entries
            .iter()
            .find(|e| {
                e.status.is_open()
                    && e.active_run
                    && e.queued_at > p.paused_at
                    && e.queued_at - p.paused_at > window
            })
            .map(|e| {
                format!(
                    "{} was queued {} min after it began",
                    e.label(),
                    (e.queued_at - p.paused_at) / 60_000
                )
            })
    }

    fn tracked_alive(&mut self, key: &str) -> bool {
        self.reap();
        self.tracked.iter().any(|t| t.key == key)
    }

    fn reap(&mut self) {
        self.tracked
            .retain_mut(|t| matches!(t.child.try_wait(), Ok(None)));
    }

    /// D-5 session cap: revived runs still alive.
    async fn revived_alive(&mut self, queue: &SharedQueue) -> Result<usize, String> {
        self.reap();
        let mut n = self.tracked.len();
        if let Some(m) = &self.manager {
            let mut patterns = vec!["outlive-revive-*".to_string()];
            {
                let g = queue.lock();
                for e in g
                    .state()
                    .entries
                    .iter()
                    .filter(|e| e.status == Status::Revived)
                {
                    if let Target::Unit { unit } = &e.target
                        && !patterns.contains(unit)
                    {
                        patterns.push(unit.clone());
                    }
                }
            }
            n += m.alive_units(&patterns).await.map_err(|u| u.0)?.len();
        }
        Ok(n)
    }

    /// D-9: start an attempt on `e`: `queued → starting`, the continuation (D-11), the start
    /// through the service manager (or a detached spawn where there is none); its
    /// verification follows once its grace has elapsed.
    async fn attempt(&mut self, queue: &SharedQueue, e: Entry) -> Report {
        let transient = matches!(e.target, Target::Exec { .. }) && self.manager.is_some();
        let unit = match &e.target {
            Target::Unit { unit } => Some(unit.clone()),
            Target::Exec { .. } if transient => Some(format!(
                "outlive-revive-{}-{}.service",
                e.id,
                e.attempts + 1
            )),
            Target::Exec { .. } => None,
        };
        let e = match queue.lock().begin_attempt(&e.id, unit.clone()) {
            Ok(e) => e,
            Err(err) => {
                return Report::with(
                    Outcome::AttemptFailed,
                    Some(&e.id),
                    format!("could not record the attempt: {err}"),
                );
            }
        };
        let started_boot = self.clock.boot_ms();
        let started_wall = e.last_attempt_at.unwrap_or_else(|| self.clock.wall_ms());
        let cont = match self.continuation(queue, &e).await {
            Ok(p) => p,
            Err(err) => {
                let why = format!("cannot write the continuation: {err}");
                self.fail(queue, &e.id, why.clone(), None).await;
                return Report::with(Outcome::AttemptFailed, Some(&e.id), why);
            }
        };
        let (started, child) = self.start(queue, &e, unit.as_deref(), &cont).await;
        if let Err(StartError::Refused(why)) = started {
            self.fail(queue, &e.id, why.clone(), unit.filter(|_| transient))
                .await;
            return Report::with(Outcome::AttemptFailed, Some(&e.id), why);
        }
        let attempt = Attempt {
            started_boot,
            started_wall,
            unit: unit.clone(),
            transient,
            child,
            watched: e.watched,
        };
        self.attempts.insert(e.id.clone(), attempt);
        let detail = match started {
            Err(StartError::Undecided(w)) => {
                format!("the start was not confirmed ({w}); verification decides")
            }
            _ => format!(
                "attempt {} started{}",
                e.attempts + 1,
                unit.map(|u| format!(" as {u}")).unwrap_or_default()
            ),
        };
        Report::with(Outcome::Revived, Some(&e.id), detail)
    }

    /// D-11: the continuation's record under the state directory (through the queue: written
    /// only while its lock is ours) and the run's copy under the runtime directory, handed to
    /// whom the run runs as (for a unit, its `User=`; root's when that cannot be known).
    async fn continuation(&mut self, queue: &SharedQueue, e: &Entry) -> std::io::Result<PathBuf> {
        let text = continuation::text(e);
        let unit_owner = match (&e.target, &self.manager) {
            (Target::Unit { unit }, Some(m)) if !self.settings.user_mode => {
                match m.unit_user(unit).await {
                    Ok(Some(u)) if !u.dynamic => self.paths.resolve(&u.user, &u.group).await,
                    _ => None,
                }
            }
            _ => None,
        };
        queue
            .lock()
            .write_file(
                Some("continuations"),
                &continuation::record_name(e),
                text.as_bytes(),
            )
            .and_then(|_| continuation::write_copy(&self.runtime_dir, e, &text, unit_owner))
    }

    /// D-9's start: the unit, a transient unit for an exec target, or (without a service
    /// manager) a detached spawn, tracked by pid and start time.
    async fn start(
        &mut self,
        queue: &SharedQueue,
        e: &Entry,
        unit: Option<&str>,
        cont: &Path,
    ) -> (Result<(), StartError>, Option<Child>) {
        let env_of = |env: &std::collections::BTreeMap<String, String>| {
            let mut env = env.clone();
            env.insert("OUTLIVE_ENTRY_ID".into(), e.id.clone());
            env.insert(
                "OUTLIVE_RUN_ID".into(),
                e.run_id.clone().unwrap_or_default(),
            );
            env.insert("OUTLIVE_CONTINUATION".into(), cont.display().to_string());
            if e.watched {
                // C-6: a watched run's revival (its `resume` argv when it has one).
                env.insert("OUTLIVE_RESUMED".into(), "1".into());
            }
            env
        };
        let cwd = e.worktree.clone().unwrap_or_else(|| e.cwd.clone());
        match (&e.target, &self.manager) {
            (Target::Unit { unit }, Some(m)) => (m.start_unit(unit).await, None),
            (Target::Exec { exec, env }, Some(m)) => {
                let t = Transient {
                    name: unit.expect("a transient unit name").to_string(),
                    description: format!("outlive revival of {} ({})", e.label(), e.id),
                    argv: exec.clone(),
                    cwd,
                    user: (!self.settings.user_mode).then_some((e.uid, e.gid)),
                    env: env_of(env),
                    // C-6: a watched run's revival stops before the agent at shutdown.
                    after: if e.watched && !self.settings.user_mode {
                        vec!["outlived.service".into()]
                    } else {
                        vec![]
                    },
                };
                (m.start_transient(&t).await, None)
            }
            (Target::Exec { exec, env }, None) => {
                let spec = SpawnSpec {
                    id: e.id.clone(),
                    argv: exec.clone(),
                    cwd,
                    uid: e.uid,
                    gid: e.gid,
                    env: env_of(env),
                };
                match spawn::spawn(&spec, &self.runtime_dir) {
                    Ok((c, pid, start)) => {
                        let _ = queue.lock().set_attempt_pid(&e.id, (pid, start));
                        (Ok(()), Some(c))
                    }
                    Err(err) => {
                        let why = format!("cannot start {}: {err}", exec[0]);
                        (Err(StartError::Refused(why)), None)
                    }
                }
            }
            (Target::Unit { unit }, None) => {
                let why = format!("no service manager to start {unit}");
                (Err(StartError::Refused(why)), None)
            }
        }
    }

    /// A failed attempt (D-8): backoff or give-up, the reset of a failed transient unit, the
    /// breaker.
    async fn fail(
        &mut self,
        queue: &SharedQueue,
        id: &str,
        why: String,
        transient_unit: Option<String>,
    ) {
        let r = queue.lock().finish_attempt(
            id,
            AttemptResult::Failed { why, backoff: true },
            self.settings.backoff_base_ms,
        );
        if let (Some(u), Some(m)) = (&transient_unit, &self.manager) {
            let _ = m.reset_failed(u).await;
        }
        if matches!(r, Ok(Finished::Failed) | Ok(Finished::GaveUp)) {
            self.count_failure();
        }
    }

    fn count_failure(&mut self) {
        self.breaker_failures += 1;
        if self.breaker_failures >= self.settings.breaker_threshold && self.breaker_until.is_none()
        {
            let ms = self.settings.breaker_cooldown_ms;
            self.breaker_until = Some((self.clock.boot_ms() + ms, self.clock.wall_ms() + ms));
            self.audit.record(
                &Event::new(
                    EventKind::BreakerOpened,
                    format!(
                        "{} revival attempts failed in a row: revival stops for {} min (the breaker is open); it \
                         closes by itself, and only a success resets the count",
                        self.breaker_failures,
                        self.settings.breaker_cooldown_ms / 60_000
                    ),
                )
                .alert(Alert::QueueNotice)
                .field("failures", self.breaker_failures),
            );
        }
    }

    /// How long until the next attempt's grace ends (the loop wakes then to verify it).
    pub fn next_due(&self) -> Option<std::time::Duration> {
        let now = self.clock.boot_ms();
        self.attempts
            .values()
            .map(|a| (a.started_boot + self.settings.grace_ms).saturating_sub(now))
            .min()
            .map(std::time::Duration::from_millis)
    }

    /// On every wake: reap spawned runs; verify attempts whose grace has elapsed (D-9); stop what
    /// an attempt started when its entry was cancelled meanwhile.
    pub async fn wake(&mut self, queue: &SharedQueue) {
        self.reap();
        let now = self.clock.boot_ms();
        let due: Vec<String> = self
            .attempts
            .iter()
            .filter(|(_, a)| now.saturating_sub(a.started_boot) >= self.settings.grace_ms)
            .map(|(id, _)| id.clone())
            .collect();
        let cancelled: Vec<String> = {
            let g = queue.lock();
            self.attempts
                .keys()
                .filter(|id| {
                    g.state()
                        .entries
                        .iter()
                        .any(|e| &e.id == *id && !e.status.is_open())
                })
                .cloned()
                .collect()
        };
        for id in cancelled
            .iter()
            .chain(due.iter().filter(|d| !cancelled.contains(d)))
        {
            let Some(mut a) = self.attempts.remove(id) else {
                continue;
            };
            let verdict = match self.verdict(&mut a).await {
                Some(v) => v,
                None => {
                    // The manager did not answer: check again on the next wake.
                    self.attempts.insert(id.clone(), a);
                    continue;
                }
            };
            self.conclude(queue, id, a, verdict, false).await;
        }
        self.publish();
    }

    async fn verdict(&self, a: &mut Attempt) -> Option<Verdict> {
        if let Some(c) = &mut a.child {
            return Some(match c.try_wait() {
                Ok(None) => Verdict::Alive,
                Ok(Some(s)) if s.success() => Verdict::Completed,
                Ok(Some(s)) => Verdict::Failed(format!("the process ended with {s}")),
                Err(e) => Verdict::Failed(format!("cannot wait for the process: {e}")),
            });
        }
        let (Some(unit), Some(m)) = (&a.unit, &self.manager) else {
            return Some(Verdict::Failed("the attempt did not start".into()));
        };
        match m.unit_state(unit).await {
            Err(_) => None,
            Ok(None) => Some(Verdict::Failed(format!("{unit} no longer exists"))),
            Ok(Some(st)) => Some(verdict_of(&st, a.started_wall, a.watched)),
        }
    }

    async fn conclude(
        &mut self,
        queue: &SharedQueue,
        id: &str,
        mut a: Attempt,
        v: Verdict,
        at_boot: bool,
    ) {
        let result = match &v {
            Verdict::Alive | Verdict::Completed => AttemptResult::Revived { at_boot },
            Verdict::Failed(why) => AttemptResult::Failed {
                why: why.clone(),
                backoff: !at_boot,
            },
        };
        let fin = queue
            .lock()
            .finish_attempt(id, result, self.settings.backoff_base_ms);
        match fin {
            Ok(Finished::Superseded(status)) => {
                // A cancel during `starting` stands: stop what the attempt started.
                if let (Some(u), Some(m)) = (&a.unit, &self.manager) {
                    let _ = m.stop_unit(u).await;
                }
                if let Some(c) = &mut a.child {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(c.id() as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                    let _ = c.try_wait();
                }
                self.audit.record(
                    &Event::new(
                        EventKind::AttemptStopped,
                        format!("{id} became {status} during its attempt: what the attempt started was stopped"),
                    )
                    .priority(priority::NOTICE)
                    .field("entry_id", id)
                    .field("unit", a.unit.clone().unwrap_or_default()),
                );
            }
            Ok(Finished::Revived) => {
                self.breaker_failures = 0;
                self.handle.update(|p| p.revivals += 1);
                if v == Verdict::Completed
                    && a.transient
                    && let (Some(u), Some(m)) = (&a.unit, &self.manager)
                {
                    // A completed transient attempt is stopped so that it unloads.
                    let _ = m.stop_unit(u).await;
                }
                if let Some(c) = a.child.take() {
                    let key = queue
                        .lock()
                        .state()
                        .entries
                        .iter()
                        .find(|e| e.id == id)
                        .map(|e| e.key())
                        .unwrap_or_default();
                    self.tracked.push(Tracked { key, child: c });
                }
            }
            Ok(Finished::Failed) | Ok(Finished::GaveUp) => {
                if a.transient
                    && let (Some(u), Some(m)) = (&a.unit, &self.manager)
                {
                    let _ = m.reset_failed(u).await;
                }
                self.count_failure();
            }
            Err(e) => {
                tracing::warn!("cannot record the outcome of the attempt on {id}: {e}; retried");
                self.attempts.insert(id.to_string(), a);
            }
        }
    }

    /// entries found `starting` at start: the attempt succeeded while the agent was down
    /// (alive or completed ⇒ `revived`), failed, or cannot be told yet (checked next tick).
    async fn reconcile(&mut self, queue: &SharedQueue) {
        let starting: Vec<Entry> = {
            let g = queue.lock();
            if !g.snapshot().enabled {
                return;
            }
            g.state()
                .entries
                .iter()
                .filter(|e| e.status == Status::Starting && !self.attempts.contains_key(&e.id))
                .cloned()
                .collect()
        };
        let mut all = true;
        for e in starting {
            let transient = e
                .attempt_unit
                .as_deref()
                .is_some_and(|u| u.starts_with("outlive-revive-"));
            let a = Attempt {
                started_boot: 0,
                started_wall: e.last_attempt_at.unwrap_or(0),
                unit: e.attempt_unit.clone(),
                transient,
                child: None,
                watched: e.watched,
            };
            let v = match (&e.attempt_unit, e.attempt_pid, &self.manager) {
                (Some(unit), _, Some(m)) => match m.unit_state(unit).await {
                    Err(_) => {
                        all = false;
                        continue;
                    }
                    Ok(None) => Verdict::Failed(format!("{unit} no longer exists (a reboot?)")),
                    Ok(Some(st)) => verdict_of(&st, a.started_wall, a.watched),
                },
                (_, Some((pid, start)), _) => match crate::facts::process::probe(pid) {
                    crate::facts::process::Liveness::Alive { start_time }
                        if start_time.is_none_or(|s| s == start) =>
                    {
                        Verdict::Alive
                    }
                    _ => Verdict::Failed(
                        "the spawned process is gone and its exit status is unknown".into(),
                    ),
                },
                _ => Verdict::Failed("the attempt did not start before outlived stopped".into()),
            };
            self.conclude(queue, &e.id, a, v, true).await;
        }
        self.reconciled = all;
    }
}

/// D-9's success test, C-6's for a watched run.
fn verdict_of(st: &crate::drainer::manager::UnitState, began_wall: u64, watched: bool) -> Verdict {
    if watched {
        watched_verdict(st, began_wall)
    } else {
        attempt_verdict(st, began_wall)
    }
}
