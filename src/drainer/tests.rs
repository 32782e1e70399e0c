//! Tests of the drainer's tick with an injected boottime/wall clock, gauge, service manager and
//! path checks; the queue under it is the real one (lock, state file and audit in a temporary
//! directory).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::gauge::{Gauge, Sample};
use super::manager::{ServiceManager, StartError, Transient, Undecided, UnitState, UnitUser};
use super::tick::{Drainer, Outcome, Report, Settings};
use super::validate::{Check, Context, Owner, PathState, Paths, validate};
use crate::clock::Clock;
use crate::clock::fake::FakeClock;
use crate::facts::users::Creds;
use crate::queue::entry::{Status, Target, glob_match};
use crate::queue::rules::Request;
use crate::queue::tests::{Fixture, admit, member, req, root, status};

const S: u64 = 1000;
const MIN: u64 = 60 * S;

// ---- fakes ----------------------------------------------------------------------------------

/// How a started unit behaves.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Behaviour {
    /// Keeps running.
    Runs,
    /// Exits 0 at once (`RemainAfterExit=yes`: active/exited).
    Completes,
    /// Exits 1 at once (failed).
    Fails,
}

#[derive(Default)]
struct ManagerState {
    units: HashMap<String, UnitState>,
    /// Unit files that can be loaded.
    loadable: HashSet<String>,
    /// Behaviour by unit name or transient argv[0].
    behaviour: HashMap<String, Behaviour>,
    calls: Vec<String>,
    transients: Vec<Transient>,
    /// `User=`/`Group=` of units (default: neither).
    unit_users: HashMap<String, UnitUser>,
}

/// A service manager in memory, with systemd's states.
struct FakeManager {
    clock: Arc<FakeClock>,
    st: Mutex<ManagerState>,
    /// The manager does not answer.
    mute: AtomicBool,
    /// The manager does not answer about these units.
    silent: Mutex<HashSet<String>>,
}

impl FakeManager {
    fn new(clock: Arc<FakeClock>) -> Arc<FakeManager> {
        Arc::new(FakeManager {
            clock,
            st: Mutex::new(ManagerState::default()),
            mute: AtomicBool::new(false),
            silent: Mutex::default(),
        })
    }
    fn s(&self) -> std::sync::MutexGuard<'_, ManagerState> {
        self.st.lock().unwrap()
    }
    fn loadable(&self, unit: &str, b: Behaviour) {
        let mut s = self.s();
        s.loadable.insert(unit.into());
        s.behaviour.insert(unit.into(), b);
    }
    fn behave(&self, argv0: &str, b: Behaviour) {
        self.s().behaviour.insert(argv0.into(), b);
    }
    fn set_state(&self, unit: &str, active: &str, sub: &str, result: &str, start_wall_ms: u64) {
        self.s().units.insert(
            unit.into(),
            UnitState {
                load_state: "loaded".into(),
                active_state: active.into(),
                sub_state: sub.into(),
                result: result.into(),
                main_pid: if sub == "running" { 4242 } else { 0 },
                exec_main_start_us: start_wall_ms * 1000,
                exec_main_code: 1,
                exec_main_status: 0,
            },
        );
    }
    fn calls(&self) -> Vec<String> {
        self.s().calls.clone()
    }
    fn starts(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.starts_with("start ") || c.starts_with("transient "))
            .collect()
    }
    fn check(&self) -> Result<(), Undecided> {
        if self.mute.load(Ordering::SeqCst) {
            Err(Undecided("no answer (test)".into()))
        } else {
            Ok(())
        }
    }
    fn run(&self, name: &str, b: Behaviour) {
        let now = self.clock.wall_ms();
        match b {
            Behaviour::Runs => self.set_state(name, "active", "running", "success", now),
            Behaviour::Completes => self.set_state(name, "active", "exited", "success", now),
            Behaviour::Fails => self.set_state(name, "failed", "failed", "exit-code", now),
        }
    }
}

impl ServiceManager for Arc<FakeManager> {
    async fn unit_state(&self, unit: &str) -> Result<Option<UnitState>, Undecided> {
        self.check()?;
        if self.silent.lock().unwrap().contains(unit) {
            return Err(Undecided(format!("{unit}: no answer (test)")));
        }
        Ok(self.s().units.get(unit).cloned())
    }
    async fn load_state(&self, unit: &str) -> Result<String, Undecided> {
        self.check()?;
        let s = self.s();
        Ok(if s.loadable.contains(unit) || s.units.contains_key(unit) {
            "loaded".into()
        } else {
            "not-found".into()
        })
    }
    async fn start_unit(&self, unit: &str) -> Result<(), StartError> {
        self.check().map_err(|u| StartError::Undecided(u.0))?;
        self.s().calls.push(format!("start {unit}"));
        let b = self.s().behaviour.get(unit).copied();
        match b {
            None => Err(StartError::Refused(format!(
                "org.freedesktop.systemd1.NoSuchUnit: {unit}"
            ))),
            Some(b) => {
                self.run(unit, b);
                Ok(())
            }
        }
    }
    async fn start_transient(&self, t: &Transient) -> Result<(), StartError> {
        self.check().map_err(|u| StartError::Undecided(u.0))?;
        {
            let mut s = self.s();
            s.calls.push(format!("transient {}", t.name));
            s.transients.push(t.clone());
            if s.units.contains_key(&t.name) {
                return Err(StartError::Refused(
                    "org.freedesktop.systemd1.UnitExists".into(),
                ));
            }
        }
        let b = self
            .s()
            .behaviour
            .get(&t.argv[0])
            .copied()
            .unwrap_or(Behaviour::Runs);
        self.run(&t.name, b);
        Ok(())
    }
    async fn stop_unit(&self, unit: &str) -> Result<(), Undecided> {
        self.check()?;
        let mut s = self.s();
        s.calls.push(format!("stop {unit}"));
        if unit.starts_with("outlive-revive-") {
            s.units.remove(unit);
        } else if let Some(u) = s.units.get_mut(unit) {
            u.active_state = "inactive".into();
            u.sub_state = "dead".into();
        }
        Ok(())
    }
    async fn reset_failed(&self, unit: &str) -> Result<(), Undecided> {
        self.check()?;
        let mut s = self.s();
        s.calls.push(format!("reset {unit}"));
        if s.units
            .get(unit)
            .is_some_and(|u| u.active_state == "failed")
        {
            s.units.remove(unit);
        }
        Ok(())
    }
    async fn alive_units(&self, patterns: &[String]) -> Result<Vec<String>, Undecided> {
        self.check()?;
        Ok(self
            .s()
            .units
            .iter()
            .filter(|(n, u)| {
                matches!(
                    u.active_state.as_str(),
                    "active" | "activating" | "reloading"
                ) && patterns.iter().any(|p| glob_match(p, n))
            })
            .map(|(n, _)| n.clone())
            .collect())
    }
    async fn unit_user(&self, unit: &str) -> Result<Option<UnitUser>, Undecided> {
        self.check()?;
        let s = self.s();
        Ok((s.units.contains_key(unit) || s.loadable.contains(unit))
            .then(|| s.unit_users.get(unit).cloned().unwrap_or_default()))
    }
}

/// Path checks: everything exists except what is listed.
#[derive(Default)]
struct FakePaths {
    missing: Mutex<HashSet<String>>,
    undecided: Mutex<HashSet<String>>,
    /// What the user database says, by uid (default: a member, with the entry's gid).
    owners: Mutex<HashMap<u32, Owner>>,
    /// Every path checked, with the uid it was checked as (None: the agent's own).
    checked: Mutex<Vec<(String, Option<u32>)>>,
}

impl Paths for Arc<FakePaths> {
    async fn check(&self, path: &str, _dir: bool, creds: Option<&Creds>) -> PathState {
        self.checked
            .lock()
            .unwrap()
            .push((path.to_string(), creds.map(|c| c.uid)));
        if self.undecided.lock().unwrap().contains(path) {
            PathState::Undecided(format!("{path}: Permission denied (os error 13)"))
        } else if self.missing.lock().unwrap().contains(path) {
            PathState::Missing
        } else {
            PathState::Exists
        }
    }

    async fn resolve(&self, user: &str, group: &str) -> Option<(u32, u32)> {
        let n = |s: &str| s.parse::<u32>().ok();
        match (user, group) {
            ("", "") => Some((0, 0)),
            (u, "") => n(u).map(|u| (u, u)),
            (u, g) => Some((n(u)?, n(g)?)),
        }
    }

    async fn owner(&self, uid: u32, gid: u32) -> Owner {
        self.owners
            .lock()
            .unwrap()
            .get(&uid)
            .cloned()
            .unwrap_or(Owner::User {
                creds: Creds {
                    uid,
                    gid,
                    groups: vec![gid],
                },
                member: true,
            })
    }
}

/// A gauge the test sets.
#[derive(Clone)]
struct FakeGauge(Arc<Mutex<Sample>>);

impl Gauge for FakeGauge {
    fn sample(&self) -> Sample {
        self.0.lock().unwrap().clone()
    }
}

fn normal() -> Sample {
    Sample {
        mem_available_pct: Ok(60.0),
        load_per_cpu: Ok(0.1),
        psi_some_avg10: Some(Ok(0.0)),
    }
}

fn moderate() -> Sample {
    Sample {
        mem_available_pct: Ok(10.0),
        load_per_cpu: Ok(0.1),
        psi_some_avg10: Some(Ok(0.0)),
    }
}

fn unreadable() -> Sample {
    Sample {
        mem_available_pct: Err("/proc/meminfo: Permission denied".into()),
        load_per_cpu: Ok(0.1),
        psi_some_avg10: None,
    }
}

pub(super) fn dsettings() -> Settings {
    Settings {
        required_calm_ticks: 3,
        grace_ms: 15 * S,
        max_revived_alive: 10,
        backoff_base_ms: 120 * S,
        breaker_threshold: 3,
        breaker_cooldown_ms: 30 * MIN,
        auto_resume_stale_pause: true,
        stale_pause_window_ms: 60 * MIN,
        calm_gate: true,
        pressure_held_notice_ms: 20 * MIN,
        user_mode: false,
        allowed_units: vec!["allowed-*.service".into()],
    }
}

type D = Drainer<Arc<FakeManager>, Arc<FakePaths>>;

struct Rig {
    f: Fixture,
    queue: crate::queue::SharedQueue,
    manager: Arc<FakeManager>,
    paths: Arc<FakePaths>,
    gauge: Arc<Mutex<Sample>>,
    d: D,
}

impl Rig {
    fn new() -> Rig {
        Rig::with(Fixture::new(), dsettings())
    }

    fn with(f: Fixture, settings: Settings) -> Rig {
        let queue = crate::queue::Shared::new(f.queue());
        let manager = FakeManager::new(f.clock.clone());
        manager.behave("/bin/true", Behaviour::Runs);
        let paths = Arc::new(FakePaths::default());
        let gauge = Arc::new(Mutex::new(normal()));
        let d = Self::drainer(&f, settings, &manager, &paths, &gauge);
        Rig {
            f,
            queue,
            manager,
            paths,
            gauge,
            d,
        }
    }

    fn drainer(
        f: &Fixture,
        settings: Settings,
        m: &Arc<FakeManager>,
        p: &Arc<FakePaths>,
        g: &Arc<Mutex<Sample>>,
    ) -> D {
        Drainer::new(
            settings,
            Some(m.clone()),
            p.clone(),
            Box::new(FakeGauge(g.clone())),
            f.clock.clone(),
            f.sink.clone(),
            &f.dir.path().join("run"),
        )
    }

    /// A new agent process on the same state (the old queue released first).
    fn restart(self) -> Rig {
        let Rig {
            f,
            queue,
            manager,
            paths,
            gauge,
            d,
        } = self;
        let settings = d.settings.clone();
        drop(d);
        queue.lock().release();
        drop(queue);
        let queue = crate::queue::Shared::new(f.queue());
        let d = Self::drainer(&f, settings, &manager, &paths, &gauge);
        Rig {
            f,
            queue,
            manager,
            paths,
            gauge,
            d,
        }
    }

    fn q(&self) -> crate::queue::Guard<'_> {
        self.queue.lock()
    }

    fn clock(&self) -> &FakeClock {
        &self.f.clock
    }

    fn set_gauge(&self, s: Sample) {
        *self.gauge.lock().unwrap() = s;
    }

    fn tick(&mut self) -> Report {
        self.f.clock.pass(60 * S);
        self.tick_now()
    }

    fn tick_now(&mut self) -> Report {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(self.d.tick(&self.queue, false))
    }

    fn drain(&mut self) -> Report {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(self.d.tick(&self.queue, true))
    }

    fn admit(&self, r: Request) -> String {
        admit(&mut self.q(), r)
    }

    fn status(&self, id: &str) -> Status {
        status(&self.q(), id)
    }

    fn entry(&self, id: &str) -> crate::queue::entry::Entry {
        self.q()
            .state()
            .entries
            .iter()
            .find(|e| e.id == id)
            .unwrap()
            .clone()
    }

    fn count(&self, kind: &str) -> usize {
        self.f.events(kind).len()
    }

    fn outcomes(&mut self, n: usize) -> Vec<Outcome> {
        (0..n).map(|_| self.tick().outcome).collect()
    }
}

fn exec(run: &str, argv0: &str) -> Request {
    let mut r = req(run);
    r.target = Some(Target::Exec {
        exec: vec![argv0.into()],
        env: BTreeMap::new(),
    });
    r
}

fn unit(run: &str, unit: &str) -> Request {
    let mut r = req(run);
    r.target = Some(Target::Unit { unit: unit.into() });
    r
}

fn job(slug: &str) -> Request {
    let mut r = req("x");
    r.run_id = None;
    r.job = Some(slug.into());
    r.resume_on_reap = true;
    r.evidence = vec!["structural-long-work".into()];
    r
}

// ---- D-4 calm -------------------------------------------------------------------------------

#[test]
fn d4_the_third_calm_tick_revives() {
    let mut r = Rig::new();
    let id = r.admit(exec("a", "/bin/true"));
    let got = r.outcomes(3);
    assert_eq!(got, vec![Outcome::Calm, Outcome::Calm, Outcome::Revived]);
    assert_eq!(r.status(&id), Status::Starting);
    assert_eq!(
        r.manager.starts(),
        vec![format!("transient outlive-revive-{id}-1.service")]
    );
}

#[test]
fn d4_a_moderate_tick_resets_the_streak() {
    let mut r = Rig::new();
    r.admit(exec("a", "/bin/true"));
    assert_eq!(r.outcomes(2), vec![Outcome::Calm, Outcome::Calm]);
    r.set_gauge(moderate());
    assert_eq!(r.tick().outcome, Outcome::Calm);
    r.set_gauge(normal());
    assert_eq!(
        r.outcomes(3),
        vec![Outcome::Calm, Outcome::Calm, Outcome::Revived]
    );
}

#[test]
fn d4_an_unreadable_gauge_never_counts_as_calm() {
    let mut r = Rig::new();
    r.admit(exec("a", "/bin/true"));
    r.set_gauge(unreadable());
    for _ in 0..6 {
        let rep = r.tick();
        assert_eq!(rep.outcome, Outcome::Calm);
        assert!(
            rep.detail.as_deref().unwrap().contains("unreadable"),
            "{rep:?}"
        );
    }
    assert!(r.manager.starts().is_empty());
    // A manual drain skips the calm gate (D-5), and only a manual drain.
    assert_eq!(r.drain().outcome, Outcome::Revived);
}

#[test]
fn d4_waiting_and_calm_time_advance_with_the_tick() {
    let mut r = Rig::new();
    let id = r.admit(exec("a", "/bin/true"));
    r.set_gauge(moderate());
    r.tick();
    r.set_gauge(normal());
    r.tick();
    let e = r.entry(&id);
    assert_eq!((e.waited_ms, e.calm_ms), (120 * S, 60 * S));
}

#[test]
fn d4_a_pause_resets_the_calm_streak() {
    let mut r = Rig::new();
    r.admit(exec("a", "/bin/true"));
    assert_eq!(r.outcomes(2), vec![Outcome::Calm, Outcome::Calm]);
    r.q().pause(&root(), "maintenance", "disk swap").unwrap();
    assert_eq!(r.tick().outcome, Outcome::Paused);
    r.q().resume(&root()).unwrap();
    assert_eq!(
        r.outcomes(3),
        vec![Outcome::Calm, Outcome::Calm, Outcome::Revived]
    );
}

#[test]
fn d5_the_pressure_held_notice_is_raised_once_per_episode() {
    let mut r = Rig::new();
    r.admit(exec("a", "/bin/true"));
    r.set_gauge(moderate());
    r.outcomes(20);
    assert_eq!(
        r.count("pressure-held"),
        0,
        "20 min is not longer than 20 min"
    );
    r.outcomes(10);
    assert_eq!(r.count("pressure-held"), 1);
    let ev = &r.f.events("pressure-held")[0];
    assert!(
        ev.message.contains("will revive when there is headroom"),
        "{}",
        ev.message
    );
    // The episode ends when the gate passes; a new one can raise again.
    r.set_gauge(normal());
    assert_eq!(r.outcomes(3).last(), Some(&Outcome::Revived));
    r.admit(exec("b", "/bin/true"));
    r.set_gauge(moderate());
    r.outcomes(22);
    assert_eq!(r.count("pressure-held"), 2);
}

// ---- D-5 gates ------------------------------------------------------------------------------

#[test]
fn d5_gates_block_in_order_calm_quota_session_cap() {
    let mut s = dsettings();
    s.max_revived_alive = 1;
    let mut r = Rig::with(Fixture::new(), s);
    r.admit(exec("a", "/bin/true"));
    // Everything blocks: calm comes first.
    r.set_gauge(moderate());
    r.d.report_quota(false, 3600 * S);
    r.manager.set_state(
        "outlive-revive-rq-old-1-1.service",
        "active",
        "running",
        "success",
        0,
    );
    assert_eq!(r.tick().outcome, Outcome::Calm);
    r.set_gauge(normal());
    assert_eq!(
        r.outcomes(3),
        vec![Outcome::Calm, Outcome::Calm, Outcome::Quota]
    );
    // A fresh report with headroom passes; the session cap is next.
    r.d.report_quota(true, 3600 * S);
    assert_eq!(r.tick().outcome, Outcome::SessionCap);
    r.manager.s().units.clear();
    assert_eq!(r.tick().outcome, Outcome::Revived);
}

#[test]
fn d10_no_report_or_an_expired_one_passes_and_the_signal_says_which() {
    let mut r = Rig::new();
    r.admit(exec("a", "/bin/true"));
    r.admit(exec("b", "/bin/true"));
    assert_eq!(r.d.public().quota.as_str(), "absent");
    r.d.report_quota(false, 200 * S);
    assert_eq!(r.d.public().quota.as_str(), "fresh");
    assert_eq!(
        r.outcomes(3),
        vec![Outcome::Calm, Outcome::Calm, Outcome::Quota]
    );
    // 240 s later the 200 s report is stale: the gate passes.
    assert_eq!(r.tick().outcome, Outcome::Revived);
    assert_eq!(r.d.public().quota.as_str(), "stale");
    assert_eq!(r.count("quota-reported"), 1);
}

#[test]
fn d5_a_manual_drain_skips_only_the_calm_gate() {
    let mut r = Rig::new();
    r.admit(exec("a", "/bin/true"));
    r.set_gauge(moderate());
    r.d.report_quota(false, 3600 * S);
    assert_eq!(r.drain().outcome, Outcome::Quota);
    r.d.report_quota(true, 3600 * S);
    assert_eq!(r.drain().outcome, Outcome::Revived);
}

// ---- Q-8 order, D-1 one decision -------------------------------------------------------------

#[test]
fn d1_one_revival_per_tick_class_then_fifo() {
    let mut r = Rig::new();
    let j = r.admit(job("nightly"));
    r.clock().pass(1);
    let a = r.admit(exec("a", "/bin/true"));
    r.clock().pass(1);
    let b = r.admit(exec("b", "/bin/true"));
    r.outcomes(2);
    let mut order = vec![];
    for _ in 0..3 {
        let rep = r.tick();
        assert_eq!(rep.outcome, Outcome::Revived);
        order.push(rep.entry_id.unwrap());
        assert_eq!(
            r.manager.starts().len(),
            order.len(),
            "one attempt per tick"
        );
    }
    assert_eq!(order, vec![a, b, j]);
    assert_eq!(r.tick().outcome, Outcome::Empty);
}

// ---- D-9 attempts ---------------------------------------------------------------------------

#[test]
fn d9_a_transient_unit_as_the_enqueuer_with_cwd_env_and_continuation() {
    let mut r = Rig::new();
    let mut x = exec("agent-7", "/usr/bin/agent");
    x.target = Some(Target::Exec {
        exec: vec!["/usr/bin/agent".into(), "--resume".into()],
        env: BTreeMap::from([("MODE".into(), "ci".into())]),
    });
    x.cwd = Some("/home/u/proj".into());
    x.worktree = Some("/home/u/proj/wt".into());
    let id = r.q().enqueue(&member(), Ok(x), None).unwrap().id;
    r.manager.behave("/usr/bin/agent", Behaviour::Runs);
    r.outcomes(2);
    assert_eq!(r.tick().outcome, Outcome::Revived);
    let t = r.manager.s().transients[0].clone();
    assert_eq!(t.name, format!("outlive-revive-{id}-1.service"));
    assert_eq!(t.argv, vec!["/usr/bin/agent", "--resume"]);
    assert_eq!(t.cwd, "/home/u/proj/wt", "the worktree wins over cwd");
    assert_eq!(t.user, Some((1000, 1000)));
    assert_eq!(t.env["MODE"], "ci");
    assert_eq!(t.env["OUTLIVE_ENTRY_ID"], id);
    assert_eq!(t.env["OUTLIVE_RUN_ID"], "agent-7");
    let cont = std::path::PathBuf::from(&t.env["OUTLIVE_CONTINUATION"]);
    assert_eq!(
        cont,
        r.f.dir
            .path()
            .join("run/continuations")
            .join(format!("{id}.txt"))
    );
    if nix::unistd::geteuid().is_root() {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&cont).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (1000, 1000, 0o400));
        assert!(
            std::fs::read_to_string(&cont)
                .unwrap()
                .contains("restarted")
        );
    }
    assert_eq!(r.entry(&id).attempt_unit.as_deref(), Some(t.name.as_str()));
}

#[test]
fn d9_user_mode_transient_units_carry_no_user() {
    let mut s = dsettings();
    s.user_mode = true;
    let mut r = Rig::with(Fixture::new(), s);
    r.admit(exec("a", "/bin/true"));
    r.outcomes(3);
    assert_eq!(r.manager.s().transients[0].user, None);
}

#[test]
fn d9_verified_after_grace_never_within_a_tick_and_revived_is_audited() {
    let mut r = Rig::new();
    let id = r.admit(exec("a", "/bin/true"));
    r.outcomes(3);
    assert_eq!(r.status(&id), Status::Starting);
    // Within the grace nothing is decided, however often the loop wakes.
    r.clock().pass(14 * S);
    block(r.d.wake(&r.queue));
    assert_eq!(r.status(&id), Status::Starting);
    r.clock().pass(S);
    block(r.d.wake(&r.queue));
    assert_eq!(r.status(&id), Status::Revived);
    let ev = r.f.events("revived");
    assert_eq!(ev.len(), 1);
    assert_eq!(
        ev[0].alert.map(|a| a.message_id()),
        Some("234242b2aed347baac257c41c5caf85b")
    );
    assert!(
        !ev[0].message.contains("resumed by") && ev[0].message.contains("not resumed"),
        "{}",
        ev[0].message
    );
    let key = r.entry(&id).key();
    assert_eq!(r.q().state().ledger.recent(&key, r.clock().wall_ms()), 1);
}

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn d9_a_run_that_completed_within_the_grace_is_revived_and_its_unit_stopped() {
    let mut r = Rig::new();
    r.manager.behave("/bin/true", Behaviour::Completes);
    let id = r.admit(exec("a", "/bin/true"));
    r.outcomes(3);
    r.tick();
    assert_eq!(r.status(&id), Status::Revived);
    let unit = format!("outlive-revive-{id}-1.service");
    assert!(
        r.manager.calls().contains(&format!("stop {unit}")),
        "{:?}",
        r.manager.calls()
    );
}

#[test]
fn d9_unit_targets_use_start_unit_and_a_missing_unit_is_invalidated() {
    let mut r = Rig::new();
    r.manager.loadable("demo-run.service", Behaviour::Runs);
    let id = r.admit(unit("a", "demo-run.service"));
    let gone = r.admit(unit("b", "gone.service"));
    r.outcomes(2);
    assert_eq!(r.tick().outcome, Outcome::Revived);
    assert_eq!(r.manager.starts(), vec!["start demo-run.service"]);
    let rep = r.tick();
    assert_eq!(
        (rep.outcome, rep.entry_id.as_deref()),
        (Outcome::Invalidated, Some(gone.as_str()))
    );
    assert_eq!(
        r.status(&gone),
        Status::Invalidated("target-missing".into())
    );
    assert_eq!(r.status(&id), Status::Revived);
}

/// Security review finding 12: a unit's continuation copy was 0444. It is 0400 and belongs to
/// the unit's `User=`/`Group=`; root's for a `DynamicUser=` unit (no uid before it starts).
#[test]
fn d11_a_units_continuation_copy_is_its_users_alone() {
    if !crate::testing::root("handing the copy to the unit's user") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let mut r = Rig::new();
    r.manager.loadable("as-user.service", Behaviour::Runs);
    r.manager.loadable("dynamic.service", Behaviour::Runs);
    r.manager.s().unit_users.insert(
        "as-user.service".into(),
        UnitUser {
            user: "65534".into(),
            group: "65533".into(),
            dynamic: false,
        },
    );
    r.manager.s().unit_users.insert(
        "dynamic.service".into(),
        UnitUser {
            user: "worker".into(),
            group: String::new(),
            dynamic: true,
        },
    );
    r.admit(unit("a", "as-user.service"));
    r.outcomes(2);
    assert_eq!(r.tick().outcome, Outcome::Revived);
    r.admit(unit("b", "dynamic.service"));
    r.f.clock.pass(600 * S);
    assert_eq!(r.tick().outcome, Outcome::Revived);
    let dir = r.f.dir.path().join("run/continuations/unit");
    let m = std::fs::metadata(dir.join("as-user.service.txt")).unwrap();
    assert_eq!((m.mode() & 0o777, m.uid(), m.gid()), (0o400, 65534, 65533));
    let m = std::fs::metadata(dir.join("dynamic.service.txt")).unwrap();
    assert_eq!((m.mode() & 0o777, m.uid(), m.gid()), (0o400, 0, 0));
}

#[test]
fn q2_a_cancel_during_starting_stands_and_stops_what_the_attempt_started() {
    let mut r = Rig::new();
    let id = r.admit(exec("a", "/bin/true"));
    r.outcomes(3);
    let unit = format!("outlive-revive-{id}-1.service");
    r.q().cancel(&root(), &id).unwrap();
    // The very next wake concludes it: no waiting out the grace for a cancelled attempt.
    block(r.d.wake(&r.queue));
    assert_eq!(r.status(&id), Status::Cancelled);
    assert!(r.manager.calls().contains(&format!("stop {unit}")));
    assert_eq!(r.count("transition-refused"), 1);
    assert_eq!(r.count("attempt-stopped"), 1);
    assert_eq!(r.count("revived"), 0);
}

// ---- D-8 failures ---------------------------------------------------------------------------

#[test]
fn d8_backoff_doubles_then_gives_up_with_one_alert() {
    let mut s = dsettings();
    s.breaker_threshold = 10;
    let mut r = Rig::with(Fixture::new(), s);
    r.manager.behave("/bin/false", Behaviour::Fails);
    let id = r.admit(exec("a", "/bin/false"));
    r.outcomes(3);
    let u = |n: u32| format!("outlive-revive-{id}-{n}.service");
    // Attempt 1 fails at verification: backoff 120 s.
    r.clock().pass(15 * S);
    block(r.d.wake(&r.queue));
    let e = r.entry(&id);
    assert_eq!((e.status.clone(), e.attempts), (Status::Queued, 1));
    assert_eq!(e.next_attempt_boot, Some(r.clock().boot_ms() + 120 * S));
    assert!(r.manager.calls().contains(&format!("reset {}", u(1))));
    r.clock().pass(119 * S);
    assert_eq!(r.tick_now().outcome, Outcome::Empty, "still backing off");
    r.clock().pass(S);
    assert_eq!(r.tick_now().outcome, Outcome::Revived);
    // Attempt 2 fails: backoff 240 s.
    r.clock().pass(15 * S);
    block(r.d.wake(&r.queue));
    assert_eq!(
        r.entry(&id).next_attempt_boot,
        Some(r.clock().boot_ms() + 240 * S)
    );
    r.clock().pass(239 * S);
    assert_eq!(r.tick_now().outcome, Outcome::Empty);
    r.clock().pass(S);
    assert_eq!(r.tick_now().outcome, Outcome::Revived);
    r.clock().pass(15 * S);
    block(r.d.wake(&r.queue));
    assert_eq!(r.status(&id), Status::GaveUp("max-attempts".into()));
    assert_eq!(
        r.manager.starts(),
        vec![
            format!("transient {}", u(1)),
            format!("transient {}", u(2)),
            format!("transient {}", u(3))
        ]
    );
    let gave = r.f.events("gave-up");
    assert_eq!(gave.len(), 1);
    assert_eq!(
        gave[0].alert.map(|a| a.message_id()),
        Some("2b024c8048ec43d5bd93e3e01858924d")
    );
    assert!(
        gave[0].message.starts_with("could not bring"),
        "{}",
        gave[0].message
    );
    assert_eq!(r.count("attempt-failed"), 2);
}

#[test]
fn d8_a_refused_start_is_a_failed_attempt() {
    let mut r = Rig::new();
    // A unit that loads but that the manager refuses to start.
    r.manager.s().loadable.insert("odd.service".into());
    let id = r.admit(unit("a", "odd.service"));
    r.outcomes(2);
    let rep = r.tick();
    assert_eq!(rep.outcome, Outcome::AttemptFailed);
    assert!(rep.detail.unwrap().contains("NoSuchUnit"));
    assert_eq!((r.status(&id), r.entry(&id).attempts), (Status::Queued, 1));
}

#[test]
fn d8_the_breaker_opens_once_and_closes_after_its_cooldown() {
    let mut r = Rig::new();
    r.manager.behave("/bin/false", Behaviour::Fails);
    let ids: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|x| r.admit(exec(x, "/bin/false")))
        .collect();
    r.outcomes(2);
    for _ in 0..3 {
        assert_eq!(r.tick().outcome, Outcome::Revived);
        r.clock().pass(15 * S);
        block(r.d.wake(&r.queue));
    }
    assert_eq!(r.count("breaker-opened"), 1);
    let ev = &r.f.events("breaker-opened")[0];
    assert_eq!(
        ev.alert.map(|a| a.message_id()),
        Some(crate::audit::Alert::QueueNotice.message_id())
    );
    let until = r.d.public().breaker_open_until;
    assert_eq!(until, r.clock().wall_ms() + 30 * MIN);
    // While open: no attempts, and no second notice.
    let starts = r.manager.starts().len();
    let mut t = 0;
    while t + 60 * S < 30 * MIN {
        assert_eq!(r.tick().outcome, Outcome::BreakerOpen);
        t += 60 * S;
    }
    assert_eq!(r.manager.starts().len(), starts);
    assert_eq!(r.count("breaker-opened"), 1);
    // After the cooldown it closes: the next entry is attempted.
    r.clock().pass(30 * MIN - t);
    let rep = r.tick_now();
    assert_eq!(rep.outcome, Outcome::Revived, "{rep:?}");
    assert_eq!(r.d.public().breaker_open_until, 0);
    let _ = ids;
}

#[test]
fn d8_a_success_resets_the_failure_streak() {
    let mut s = dsettings();
    s.backoff_base_ms = 3600 * S; // no retries within the test
    let mut r = Rig::with(Fixture::new(), s);
    r.manager.behave("/bin/false", Behaviour::Fails);
    r.admit(exec("a", "/bin/false"));
    r.admit(exec("b", "/bin/false"));
    r.admit(exec("c", "/bin/true"));
    r.admit(exec("d", "/bin/false"));
    r.admit(exec("e", "/bin/false"));
    r.outcomes(2);
    for _ in 0..5 {
        assert_eq!(r.tick().outcome, Outcome::Revived);
        r.clock().pass(15 * S);
        block(r.d.wake(&r.queue));
    }
    assert_eq!(
        r.count("breaker-opened"),
        0,
        "2 failures, a success, 2 failures"
    );
}

#[test]
fn d8_invalidations_and_undecided_checks_do_not_count() {
    let mut r = Rig::new();
    for x in ["a", "b", "c", "d"] {
        let mut e = exec(x, "/bin/true");
        e.cwd = Some(format!("/gone/{x}"));
        r.admit(e);
        r.paths.missing.lock().unwrap().insert(format!("/gone/{x}"));
    }
    r.outcomes(2);
    for _ in 0..4 {
        assert_eq!(r.tick().outcome, Outcome::Invalidated);
    }
    assert_eq!(r.count("breaker-opened"), 0);
}

// ---- D-6 validation -------------------------------------------------------------------------

fn user(uid: u32, member: bool) -> Owner {
    Owner::User {
        creds: Creds {
            uid,
            gid: uid,
            groups: vec![uid],
        },
        member,
    }
}

/// D-6 check 2 (security review finding 11): a member's queued run is authorized again at
/// the attempt. A member who left `outlive`, a user who no longer exists, and a unit target
/// that `queue.allowed_units` no longer admits are `not-authorized`; a user database that does
/// not answer leaves the entry queued. Root's choice of user is not re-checked for membership.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn d6_not_authorized_is_checked_again_at_the_attempt() {
    let by_member = |r: &mut Rig, x: Request| r.q().enqueue(&member(), Ok(x), None).unwrap().id;
    // Left the group.
    let mut r = Rig::new();
    r.outcomes(2);
    let a = by_member(&mut r, exec("a", "/bin/true"));
    r.paths
        .owners
        .lock()
        .unwrap()
        .insert(1000, user(1000, false));
    let rep = r.tick();
    assert_eq!(rep.outcome, Outcome::Invalidated, "{rep:?}");
    assert_eq!(r.status(&a), Status::Invalidated("not-authorized".into()));
    assert!(
        rep.detail
            .as_deref()
            .unwrap_or_default()
            .contains("no longer a member of group `outlive`"),
        "{rep:?}"
    );
    assert!(r.manager.starts().is_empty());
    // No longer in the user database.
    r.paths.owners.lock().unwrap().insert(1000, Owner::Gone);
    let b = by_member(&mut r, exec("b", "/bin/true"));
    r.tick();
    assert_eq!(r.status(&b), Status::Invalidated("not-authorized".into()));
    // The database does not answer: decided later.
    r.paths
        .owners
        .lock()
        .unwrap()
        .insert(1000, Owner::Undecided("sssd is down".into()));
    let c = by_member(&mut r, exec("c", "/bin/true"));
    let rep = r.tick();
    assert_eq!(rep.outcome, Outcome::Empty, "{rep:?}");
    assert!(
        rep.detail
            .as_deref()
            .unwrap_or_default()
            .contains("sssd is down"),
        "{rep:?}"
    );
    assert_eq!(r.status(&c), Status::Queued);
    // A member again: it revives, its paths checked as the member.
    r.paths
        .owners
        .lock()
        .unwrap()
        .insert(1000, user(1000, true));
    r.f.clock.pass(600 * S);
    assert_eq!(r.tick().outcome, Outcome::Revived);
    let checked = r.paths.checked.lock().unwrap().clone();
    assert!(
        checked
            .iter()
            .any(|(p, uid)| p == "/tmp" && *uid == Some(1000)),
        "{checked:?}"
    );
    assert!(
        checked.iter().all(|(_, uid)| *uid == Some(1000)),
        "{checked:?}"
    );

    // A unit target that queue.allowed_units no longer admits.
    let mut narrowed = dsettings();
    narrowed.allowed_units = vec!["other-*".into()];
    let mut r = Rig::with(Fixture::new(), narrowed);
    r.outcomes(2);
    r.manager.loadable("allowed-7.service", Behaviour::Runs);
    let d = by_member(&mut r, unit("d", "allowed-7.service"));
    let rep = r.tick();
    assert_eq!(r.status(&d), Status::Invalidated("not-authorized".into()));
    assert!(
        rep.detail
            .as_deref()
            .unwrap_or_default()
            .contains("queue.allowed_units"),
        "{rep:?}"
    );

    // Root queued a run as a user outside the group: root's choice, not re-checked; its paths
    // are still checked as that user, and root's own run as the agent.
    let mut r = Rig::new();
    r.outcomes(2);
    r.paths
        .owners
        .lock()
        .unwrap()
        .insert(1000, user(1000, false));
    let mut x = exec("e", "/bin/true");
    x.user = Some(1000);
    x.group = Some(1000);
    let found = crate::facts::users::Lookup::Found(crate::facts::users::Account {
        uid: 1000,
        name: "u".into(),
        gid: 1000,
    });
    let e = r.q().enqueue(&root(), Ok(x), Some(found)).unwrap().id;
    assert_eq!(r.tick().outcome, Outcome::Revived);
    assert_eq!(r.status(&e), Status::Starting);
    let checked = r.paths.checked.lock().unwrap().clone();
    assert!(
        checked.iter().all(|(_, uid)| *uid == Some(1000)),
        "{checked:?}"
    );
    let mut r = Rig::new();
    r.outcomes(2);
    r.admit(exec("f", "/bin/true"));
    assert_eq!(r.tick().outcome, Outcome::Revived);
    let checked = r.paths.checked.lock().unwrap().clone();
    assert!(
        !checked.is_empty() && checked.iter().all(|(_, uid)| uid.is_none()),
        "{checked:?}"
    );

    // An entry written before enqueued_by was recorded: its uid stands for the enqueuer.
    let mut r = Rig::new();
    let g = by_member(&mut r, exec("g", "/bin/true"));
    let mut old = r.entry(&g);
    old.enqueued_by = None;
    let owner = user(1000, false);
    let cx = Context::<Arc<FakeManager>> {
        owner: &owner,
        allowed_units: &[],
        stops: &[],
        global_stop: None,
        manager: None,
        tracked_alive: false,
        run_unit: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let got = rt.block_on(validate(&old, &cx, &r.paths));
    assert!(
        matches!(got, Check::Invalid("not-authorized", _)),
        "{got:?}"
    );
    old.uid = 0;
    old.gid = 0;
    let got = rt.block_on(validate(
        &old,
        &Context {
            owner: &Owner::Agent,
            ..cx
        },
        &r.paths,
    ));
    assert_eq!(got, Check::Pass);
}

/// C-11: a captured entry is `already-running` while the unit its watch record is on now is
/// active (the run would run twice); once that unit is gone, the same entry is revived.
#[test]
fn c11_already_running_looks_at_the_records_current_unit() {
    use crate::queue::runs::{EndNote, EvidencePolicy, How, RunRecord};
    let mut r = Rig::new();
    r.outcomes(2);
    // A watched exec run on `unit`, killed and captured: its entry's id.
    let captured = |r: &mut Rig, run: &str, unit: &str| {
        let rec = RunRecord {
            target: Target::Exec {
                exec: vec!["/bin/true".into()],
                env: BTreeMap::new(),
            },
            unit: unit.into(),
            run_id: run.into(),
            cwd: "/".into(),
            ..RunRecord::unit_watch(
                unit,
                (0, 0),
                EvidencePolicy::Autonomous,
                "inv-1",
                "boot",
                r.clock().wall_ms(),
            )
        };
        r.q().run_add(rec).unwrap();
        let note = EndNote {
            how: How::Killed,
            at: r.clock().wall_ms(),
            invocation_id: "inv-1".into(),
            detail: "killed by SIGKILL".into(),
        };
        r.q().run_end(run, note).unwrap();
        let id = r
            .q()
            .state()
            .entries
            .iter()
            .find(|e| e.run_id.as_deref() == Some(run))
            .map(|e| e.id.clone())
            .expect("the capture queued the run");
        assert!(r.entry(&id).watched);
        id
    };
    // Its unit active again (another copy of the run): already-running.
    let unit = "outlive-run-w.service";
    let id = captured(&mut r, "w", unit);
    r.manager.loadable(unit, Behaviour::Runs);
    r.manager.set_state(unit, "active", "running", "success", 1);
    r.tick();
    assert_eq!(r.status(&id), Status::Invalidated("already-running".into()));
    let ev = r.f.events("invalidated");
    assert!(
        ev.iter().any(|e| format!("{e:?}").contains(unit)),
        "the report names the run's unit: {ev:?}"
    );
    // Its unit gone (capture unloads it): revived.
    let v = captured(&mut r, "v", "outlive-run-v.service");
    assert_eq!(r.tick().outcome, Outcome::Revived);
    assert_eq!(r.status(&v), Status::Starting);
}

#[test]
fn d6_validation_order_and_words() {
    let mut r = Rig::new();
    r.outcomes(2);
    // already-running: the unit target is active.
    r.manager.loadable("live.service", Behaviour::Runs);
    r.manager
        .set_state("live.service", "active", "running", "success", 1);
    let a = r.admit(unit("a", "live.service"));
    assert_eq!(r.tick().outcome, Outcome::Invalidated);
    assert_eq!(r.status(&a), Status::Invalidated("already-running".into()));
    // already-running: an earlier attempt unit of the entry is alive.
    let b = r.admit(exec("b", "/bin/true"));
    r.manager.set_state(
        &format!("outlive-revive-{b}-1.service"),
        "active",
        "running",
        "success",
        1,
    );
    r.tick();
    assert_eq!(r.status(&b), Status::Invalidated("already-running".into()));
    // ran-since: the unit started after the entry was queued.
    r.manager.loadable("timer-job.service", Behaviour::Runs);
    let c = r.admit(unit("c", "timer-job.service"));
    let later = r.clock().wall_ms() + 5 * S;
    r.manager
        .set_state("timer-job.service", "inactive", "dead", "success", later);
    r.tick();
    assert_eq!(r.status(&c), Status::Invalidated("ran-since".into()));
    // target-missing, cwd-missing, worktree-missing, run-finished.
    let d = r.admit(exec("d", "/opt/gone"));
    r.paths.missing.lock().unwrap().insert("/opt/gone".into());
    r.tick();
    assert_eq!(r.status(&d), Status::Invalidated("target-missing".into()));
    let mut x = exec("e", "/bin/true");
    x.cwd = Some("/home/gone".into());
    x.worktree = Some("/home/gone/wt".into());
    r.paths
        .missing
        .lock()
        .unwrap()
        .extend(["/home/gone".to_string(), "/home/gone/wt".to_string()]);
    let e = r.admit(x);
    r.tick();
    assert_eq!(
        r.status(&e),
        Status::Invalidated("cwd-missing".into()),
        "cwd is checked before the worktree"
    );
    let mut x = exec("f", "/bin/true");
    x.worktree = Some("/home/gone/wt".into());
    let f = r.admit(x);
    r.tick();
    assert_eq!(r.status(&f), Status::Invalidated("worktree-missing".into()));
    let mut x = exec("g", "/bin/true");
    x.active_run = true;
    x.run_state_file = Some("/run/agents/g.state".into());
    r.paths
        .missing
        .lock()
        .unwrap()
        .insert("/run/agents/g.state".into());
    let g = r.admit(x);
    r.tick();
    assert_eq!(r.status(&g), Status::Invalidated("run-finished".into()));
    // Each invalidation is audited and raised (live).
    let inv = r.f.events("invalidated");
    assert_eq!(inv.len(), 7);
    assert!(inv.iter().all(|e| e.alert.is_some()));
}

#[test]
fn d6_operator_stop_recorded_after_queued_invalidates() {
    let mut r = Rig::new();
    let a = r.admit(exec("a", "/bin/true"));
    r.q().stop_all(&root()).unwrap();
    r.q().resume(&root()).unwrap();
    r.clock().pass(1);
    let b = r.admit(exec("b", "/bin/true"));
    r.outcomes(2);
    assert_eq!(r.tick().outcome, Outcome::Invalidated);
    assert_eq!(r.status(&a), Status::Invalidated("operator-stop".into()));
    assert_eq!(
        r.tick().outcome,
        Outcome::Revived,
        "queued after the stop: revived"
    );
    assert_eq!(r.status(&b), Status::Starting);
}

#[test]
fn d6_a_check_that_cannot_decide_keeps_the_entry_queued() {
    let mut r = Rig::new();
    let mut x = exec("a", "/bin/true");
    x.cwd = Some("/home/locked".into());
    let id = r.admit(x);
    r.paths
        .undecided
        .lock()
        .unwrap()
        .insert("/home/locked".into());
    r.outcomes(2);
    let rep = r.tick();
    assert_eq!(rep.outcome, Outcome::Empty, "{rep:?}");
    assert!(rep.detail.unwrap().contains("could not be checked"));
    let e = r.entry(&id);
    assert_eq!(e.status, Status::Queued);
    assert_eq!(
        e.next_attempt_boot,
        Some(r.clock().boot_ms() + 60 * S),
        "a short backoff"
    );
    assert_eq!(r.count("check-undecided"), 1);
    // A service manager that does not answer about a unit is undecided too.
    r.manager.loadable("demo.service", Behaviour::Runs);
    let u = r.admit(unit("u", "demo.service"));
    r.manager
        .silent
        .lock()
        .unwrap()
        .insert("demo.service".into());
    let rep = r.tick();
    assert_eq!(rep.outcome, Outcome::Empty, "{rep:?}");
    assert_eq!(
        (r.status(&id), r.status(&u)),
        (Status::Queued, Status::Queued)
    );
    assert_eq!(r.count("check-undecided"), 3);
    // Once both can be checked, both are revived, one per tick.
    r.paths.undecided.lock().unwrap().clear();
    r.manager.silent.lock().unwrap().clear();
    assert_eq!(r.tick().outcome, Outcome::Revived);
    assert_eq!(r.tick().outcome, Outcome::Revived);
    assert_eq!(
        r.status(&id),
        Status::Revived,
        "verified on the second tick's wake"
    );
    assert_eq!(r.status(&u), Status::Starting);
    assert_eq!(r.count("breaker-opened"), 0);
    // A manager that answers nothing holds everything at the session cap (it cannot count the
    // revived runs), and drops nothing.
    let w = r.admit(exec("w", "/bin/true"));
    r.manager.mute.store(true, Ordering::SeqCst);
    let rep = r.tick();
    assert_eq!(rep.outcome, Outcome::SessionCap);
    assert!(rep.detail.unwrap().contains("cannot count"));
    assert_eq!(r.status(&w), Status::Queued);
}

// ---- D-7 dry run ----------------------------------------------------------------------------

#[test]
fn d7_dry_run_never_attempts_and_rotates() {
    let mut f = Fixture::new();
    f.settings.dry_run = true;
    let mut r = Rig::with(f, dsettings());
    let ids: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|x| {
            r.clock().pass(1);
            r.admit(exec(x, "/bin/true"))
        })
        .collect();
    r.outcomes(2);
    let mut seen = vec![];
    for _ in 0..3 {
        let rep = r.tick();
        assert_eq!(rep.outcome, Outcome::DryRun);
        seen.push(rep.entry_id.unwrap());
    }
    assert_eq!(
        seen, ids,
        "rotating through the ready entries, not stuck on the head"
    );
    let rep = r.tick();
    assert_eq!((rep.outcome, rep.entry_id), (Outcome::DryRun, None));
    assert!(r.manager.starts().is_empty());
    assert_eq!(r.count("would-revive"), 3);
    assert_eq!(r.count("revived"), 0);
    assert!(ids.iter().all(|i| r.status(i) == Status::Queued));
    // Invalidated as live, but no attention item.
    let mut x = exec("z", "/bin/true");
    x.cwd = Some("/gone".into());
    r.paths.missing.lock().unwrap().insert("/gone".into());
    let z = r.admit(x);
    assert_eq!(r.tick().outcome, Outcome::Invalidated);
    assert_eq!(r.status(&z), Status::Invalidated("cwd-missing".into()));
    assert!(r.f.events("invalidated")[0].alert.is_none());
    // A new agent process records each entry once more.
    let mut r = r.restart();
    r.outcomes(2);
    assert_eq!(r.tick().entry_id.as_deref(), Some(ids[0].as_str()));
}

// ---- §5 pauses ------------------------------------------------------------------------------

fn active(run: &str) -> Request {
    let mut r = exec(run, "/bin/true");
    r.active_run = true;
    r
}

/// Pause with `kind` now, then admit an active-run entry `after` ms later, then tick.
fn stale_case(first: &str, then: Option<&str>, after: u64) -> (Rig, Report) {
    let mut r = Rig::new();
    match first {
        "stop-all" => r.q().stop_all(&root()).unwrap(),
        k => {
            r.q().pause(&root(), k, "sentinel").unwrap();
        }
    }
    match then {
        Some("stop-all") => r.q().stop_all(&root()).unwrap(),
        Some(k) => {
            r.q().pause(&root(), k, "operator").unwrap();
        }
        None => {}
    }
    r.clock().pass(after);
    r.admit(active("a"));
    let rep = r.tick_now();
    (r, rep)
}

#[test]
fn p5_the_stale_window_is_strict() {
    let (r, rep) = stale_case("emergency", None, 60 * MIN);
    assert_eq!(rep.outcome, Outcome::Paused, "exactly 60 min does not heal");
    assert!(r.q().state().pause.is_some());
    let (r, rep) = stale_case("emergency", None, 60 * MIN + 1);
    assert_ne!(rep.outcome, Outcome::Paused, "60 min + 1 ms heals");
    assert!(r.q().state().pause.is_none());
    let ev = r.f.events("auto-resumed-stale-pause");
    assert_eq!(ev.len(), 1);
    assert_eq!(
        ev[0].alert.map(|a| a.message_id()),
        Some("c6f308fc68cd4cd590855194b55b9493")
    );
    assert!(
        ev[0].message.contains("explicitly stopped stay stopped"),
        "{}",
        ev[0].message
    );
    // The same tick continues normally: the calm gate (streak 1 of 3).
    assert_eq!(rep.outcome, Outcome::Calm);
}

#[test]
fn p5_only_an_emergency_pause_heals() {
    for (first, then) in [
        ("emergency", Some("maintenance")),
        ("emergency", Some("stop-all")),
        ("stop-all", Some("emergency")),
        ("maintenance", None),
        ("stop-all", None),
    ] {
        let (r, rep) = stale_case(first, then, 24 * 60 * MIN);
        assert_eq!(rep.outcome, Outcome::Paused, "{first} then {then:?}");
        assert!(r.q().state().pause.is_some());
        assert_eq!(r.count("auto-resumed-stale-pause"), 0);
    }
}

#[test]
fn p5_needs_an_active_run_and_the_setting() {
    let mut r = Rig::new();
    r.q().pause(&root(), "emergency", "sentinel").unwrap();
    r.clock().pass(2 * 60 * MIN);
    r.admit(exec("plain", "/bin/true"));
    assert_eq!(r.tick_now().outcome, Outcome::Paused, "no active_run entry");
    let mut s = dsettings();
    s.auto_resume_stale_pause = false;
    let mut r = Rig::with(Fixture::new(), s);
    r.q().pause(&root(), "emergency", "sentinel").unwrap();
    r.clock().pass(2 * 60 * MIN);
    r.admit(active("a"));
    assert_eq!(
        r.tick_now().outcome,
        Outcome::Paused,
        "auto_resume_stale_pause = false"
    );
}

#[test]
fn p5_a_malformed_paused_at_never_heals() {
    let f = Fixture::new();
    {
        // A state written by hand: paused_at is not a millisecond count.
        let q = Arc::new(Mutex::new(f.queue()));
        q.lock()
            .unwrap()
            .pause(&root(), "emergency", "sentinel")
            .unwrap();
        q.lock().unwrap().release();
    }
    let path = f.state_dir().join("resume-queue.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["pause"]["paused_at"] = serde_json::json!("yesterday");
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let mut r = Rig::with(f, dsettings());
    assert_eq!(
        r.q().state().pause.as_ref().unwrap().paused_at,
        0,
        "the rest of the state loads"
    );
    r.clock().pass(3 * 60 * MIN);
    r.admit(active("a"));
    for _ in 0..3 {
        assert_eq!(r.tick().outcome, Outcome::Paused);
    }
    assert_eq!(r.count("auto-resumed-stale-pause"), 0);
    assert_eq!(r.count("state-corrupt"), 0);
}

#[test]
fn p5_stops_still_invalidate_after_an_auto_resume() {
    let mut r = Rig::new();
    let stopped = r.admit(exec("old", "/bin/true"));
    r.q().stop_all(&root()).unwrap();
    r.q().resume(&root()).unwrap();
    r.q().pause(&root(), "emergency", "sentinel").unwrap();
    r.clock().pass(61 * MIN);
    let fresh = r.admit(active("a"));
    r.outcomes(2);
    let rep = r.tick();
    assert_eq!(r.count("auto-resumed-stale-pause"), 1);
    assert_eq!(
        (rep.outcome, rep.entry_id.as_deref()),
        (Outcome::Invalidated, Some(stopped.as_str()))
    );
    assert_eq!(
        r.status(&stopped),
        Status::Invalidated("operator-stop".into())
    );
    assert_eq!(r.tick().outcome, Outcome::Revived);
    assert_eq!(r.status(&fresh), Status::Starting);
}

#[test]
fn p3_heads_up_once_per_paused_at_and_waiting_count() {
    let mut r = Rig::new();
    r.q().pause(&root(), "maintenance", "disk swap").unwrap();
    r.admit(exec("a", "/bin/true"));
    r.outcomes(3);
    assert_eq!(r.count("paused-waiting"), 1);
    let ev = &r.f.events("paused-waiting")[0];
    assert_eq!(
        ev.alert.map(|a| a.message_id()),
        Some("11db55d58fda454ab22674b200f45ee7")
    );
    assert!(
        ev.message.contains("1 runs are waiting") && ev.message.contains("outlivectl resume"),
        "{}",
        ev.message
    );
    r.admit(exec("b", "/bin/true"));
    r.outcomes(2);
    assert_eq!(r.count("paused-waiting"), 2, "a new waiting count");
    // A new pause (new paused_at) with the same count raises again.
    r.q().resume(&root()).unwrap();
    r.clock().pass(1);
    r.q().pause(&root(), "maintenance", "disk swap 2").unwrap();
    r.tick();
    assert_eq!(r.count("paused-waiting"), 3);
}

#[test]
fn p4_a_paused_dry_run_queue_does_nothing_else() {
    let mut f = Fixture::new();
    f.settings.dry_run = true;
    let mut r = Rig::with(f, dsettings());
    r.q().pause(&root(), "emergency", "sentinel").unwrap();
    r.clock().pass(2 * 60 * MIN);
    r.admit(active("a"));
    assert_eq!(r.outcomes(3), vec![Outcome::Paused; 3]);
    assert_eq!(r.count("paused-waiting"), 0);
    assert_eq!(r.count("auto-resumed-stale-pause"), 0);
}

// ---- time -----------------------------------------------------------------------------------

#[test]
fn time_a_wall_clock_step_of_25_hours_changes_no_ttl_or_backoff() {
    for step in [25 * 60 * MIN as i64, -(25 * 60 * MIN as i64)] {
        let mut s = dsettings();
        s.breaker_threshold = 10;
        let mut r = Rig::with(Fixture::new(), s);
        r.manager.behave("/bin/false", Behaviour::Fails);
        let id = r.admit(exec("a", "/bin/false"));
        let other = r.admit(job("nightly"));
        r.set_gauge(moderate());
        r.outcomes(1);
        r.set_gauge(normal());
        r.outcomes(3);
        r.clock().pass(15 * S);
        block(r.d.wake(&r.queue));
        let e = r.entry(&id);
        assert_eq!(e.attempts, 1);
        let due = e.next_attempt_boot.unwrap();
        let waited = e.waited_ms;
        r.clock().step_wall(step);
        let rep = r.tick_now();
        // The job is revived; the failed entry is still backing off.
        assert_eq!(
            (rep.outcome, rep.entry_id.as_deref()),
            (Outcome::Revived, Some(other.as_str())),
            "step {step}"
        );
        let e = r.entry(&id);
        assert_eq!(
            (e.status, e.next_attempt_boot),
            (Status::Queued, Some(due)),
            "step {step}"
        );
        assert_eq!(
            e.waited_ms, waited,
            "a wall step adds no waiting time (step {step})"
        );
        assert_eq!(r.count("entry-expired"), 0);
        r.clock().pass(due - r.clock().boot_ms());
        assert_eq!(
            r.tick_now().entry_id.as_deref(),
            Some(id.as_str()),
            "due by boottime, step {step}"
        );
    }
}

// ---- Q-13 boot reconciliation ---------------------------------------------------------------

#[test]
fn q13_a_live_attempt_unit_found_at_start_is_revived_once() {
    let mut r = Rig::new();
    let id = r.admit(exec("a", "/bin/true"));
    r.outcomes(3);
    assert_eq!(r.status(&id), Status::Starting);
    // The agent dies within the grace; the unit keeps running.
    let mut r = r.restart();
    r.tick_now();
    assert_eq!(r.status(&id), Status::Revived);
    let ev = r.f.events("revived");
    assert_eq!(ev.len(), 1);
    assert_eq!(
        ev[0].get("verified_at_boot"),
        Some("true"),
        "{:?}",
        ev[0].fields
    );
    let key = r.entry(&id).key();
    assert_eq!(r.q().state().ledger.recent(&key, r.clock().wall_ms()), 1);
    r.tick();
    assert_eq!(r.f.events("revived").len(), 1, "counted once");
}

#[test]
fn q13_a_gone_unit_counts_one_failed_attempt_without_backoff() {
    let mut r = Rig::new();
    let id = r.admit(exec("a", "/bin/true"));
    r.outcomes(3);
    r.manager.s().units.clear(); // a reboot
    let mut r = r.restart();
    let rep = r.tick_now();
    let e = r.entry(&id);
    assert_eq!(
        (e.status, e.attempts, e.next_attempt_boot),
        (Status::Queued, 1, None),
        "{rep:?}"
    );
}

#[test]
fn q13_an_unanswering_manager_keeps_it_starting_until_it_answers() {
    let mut r = Rig::new();
    let id = r.admit(exec("a", "/bin/true"));
    r.outcomes(3);
    let mut r = r.restart();
    r.manager.mute.store(true, Ordering::SeqCst);
    r.tick_now();
    assert_eq!(r.status(&id), Status::Starting);
    r.manager.mute.store(false, Ordering::SeqCst);
    r.tick();
    assert_eq!(r.status(&id), Status::Revived);
}

// ---- D-3 outcome words ----------------------------------------------------------------------

#[test]
fn d3_outcomes_are_audited_on_change_only() {
    let mut r = Rig::new();
    r.outcomes(5);
    let ev = r.f.events("tick-outcome");
    assert_eq!(ev.len(), 1, "five empty ticks, one record");
    r.admit(exec("a", "/bin/true"));
    r.outcomes(3);
    let words: Vec<String> =
        r.f.events("tick-outcome")
            .iter()
            .map(|e| e.get("outcome").unwrap().to_string())
            .collect();
    // The idle ticks were calm, so the streak was already complete.
    assert_eq!(words, vec!["empty", "revived", "empty"]);
}

#[test]
fn d3_a_disabled_queue_is_the_first_word() {
    let mut f = Fixture::new();
    f.settings.enabled = false;
    let mut r = Rig::with(f, dsettings());
    assert_eq!(r.tick().outcome, Outcome::QueueOff);
}
