//! The drainer's cost (SPEC D-1, D-2): one idle tick, one idle wake, and one full decision with
//! validation, on the real queue (state on this disk, fsync included), the kernel's gauges and
//! the facts worker. The service manager is an in-memory one that answers at once: what systemd
//! does for a start is not the agent's cost, and a D-Bus round trip is measured in
//! `benches/queue.rs` (Ping).
//!
//!     cargo bench --bench drainer
//!
//! Prints each figure in microseconds and the share of one CPU at the default interval (a tick
//! every 60 s and an idle wake every 15 s between). Target: under 0.01 %. Not a timed test: the
//! figures are recorded in BENCHMARKS.md.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use outlive::audit::{AuditLog, Auditor};
use outlive::clock::SystemClock;
use outlive::drainer::gauge::HostGauge;
use outlive::drainer::manager::{
    ServiceManager, StartError, Transient, Undecided, UnitState, UnitUser,
};
use outlive::drainer::tick::{Drainer, Outcome, Settings};
use outlive::drainer::validate::WorkerPaths;
use outlive::facts::Facts;
use outlive::facts::process::KernelProber;
use outlive::queue::entry::Target;
use outlive::queue::lock::Ours;
use outlive::queue::rules::Request;
use outlive::queue::{Caller, LockEnv, Queue, Settings as QueueSettings};

/// Answers at once; started units run.
#[derive(Default)]
struct InstantManager {
    units: Mutex<HashMap<String, UnitState>>,
}

impl ServiceManager for InstantManager {
    async fn unit_state(&self, unit: &str) -> Result<Option<UnitState>, Undecided> {
        Ok(self.units.lock().unwrap().get(unit).cloned())
    }
    async fn load_state(&self, _unit: &str) -> Result<String, Undecided> {
        Ok("loaded".into())
    }
    async fn start_unit(&self, unit: &str) -> Result<(), StartError> {
        self.units.lock().unwrap().insert(unit.into(), running());
        Ok(())
    }
    async fn start_transient(&self, t: &Transient) -> Result<(), StartError> {
        self.units.lock().unwrap().insert(t.name.clone(), running());
        Ok(())
    }
    async fn stop_unit(&self, unit: &str) -> Result<(), Undecided> {
        self.units.lock().unwrap().remove(unit);
        Ok(())
    }
    async fn reset_failed(&self, _unit: &str) -> Result<(), Undecided> {
        Ok(())
    }
    async fn alive_units(&self, _patterns: &[String]) -> Result<Vec<String>, Undecided> {
        // The session cap and the already-running check each ask; nothing else runs.
        Ok(vec![])
    }
    async fn unit_user(&self, _unit: &str) -> Result<Option<UnitUser>, Undecided> {
        Ok(Some(UnitUser::default()))
    }
}

fn running() -> UnitState {
    UnitState {
        load_state: "loaded".into(),
        active_state: "active".into(),
        sub_state: "running".into(),
        result: "success".into(),
        main_pid: 1,
        exec_main_start_us: outlive::clock::wall_ms() * 1000,
        exec_main_code: 0,
        exec_main_status: 0,
    }
}

fn settings() -> Settings {
    Settings {
        required_calm_ticks: 3,
        grace_ms: 15_000,
        max_revived_alive: 10,
        backoff_base_ms: 120_000,
        breaker_threshold: 3,
        breaker_cooldown_ms: 30 * 60_000,
        auto_resume_stale_pause: true,
        stale_pause_window_ms: 60 * 60_000,
        // The decision is measured, not the host's pressure at the time.
        calm_gate: false,
        pressure_held_notice_ms: 20 * 60_000,
        user_mode: false,
        allowed_units: vec![],
    }
}

fn ours() -> Ours {
    let id = outlive::facts::identity::identity().expect("a machine id");
    Ours {
        host_id: id.host_id,
        hostname: id.hostname,
        boot_id: id.boot_id,
        pid: std::process::id() as i64,
        pid_start: outlive::facts::process::own_start_time().unwrap_or(0),
        pid_ns: id.pid_ns,
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    queue: outlive::queue::SharedQueue,
    drainer: Drainer<InstantManager, WorkerPaths>,
    facts: Facts,
    ours: Ours,
    n: usize,
    cwd: String,
}

impl Rig {
    fn new() -> Rig {
        // On this disk, as the state directory would be (not a tmpfs).
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        let dir = tempfile::tempdir_in(&base).unwrap();
        let (state, run) = (dir.path().join("state"), dir.path().join("run"));
        std::fs::create_dir_all(&run).unwrap();
        let cwd = dir.path().join("project");
        std::fs::create_dir_all(&cwd).unwrap();
        let auditor = Arc::new(Auditor::new(AuditLog::new(&run), vec![]));
        let qs = QueueSettings {
            enabled: true,
            dry_run: false,
            max_size: 50,
            max_attempts: 3,
            max_resurrections: 2,
            ttl_ms: 24 * 3600 * 1000,
            include_operator_kills: false,
            allowed_units: vec![],
            auto_heal: outlive::config::AutoHeal::Off,
            max_watched: 200,
            evidence_policy: outlive::queue::runs::EvidencePolicy::Autonomous,
        };
        let mut q = Queue::new(&state, &run, qs, auditor.clone(), Arc::new(SystemClock));
        let facts = Facts::new(Duration::from_secs(3));
        let ours = ours();
        q.evaluate_lock(
            &LockEnv {
                ours: ours.clone(),
                facts: facts.clone(),
                prober: std::sync::Arc::new(KernelProber),
            },
            true,
        );
        assert!(q.snapshot().enabled, "the queue must be enabled");
        let drainer = Drainer::new(
            settings(),
            Some(InstantManager::default()),
            WorkerPaths {
                facts: facts.clone(),
                beat: None,
            },
            Box::new(HostGauge),
            Arc::new(SystemClock),
            auditor,
            &run,
        );
        Rig {
            _dir: dir,
            queue: outlive::queue::Shared::new(q),
            drainer,
            facts,
            ours,
            n: 0,
            cwd: cwd.to_str().unwrap().to_string(),
        }
    }

    fn admit(&mut self, cwd: &str) -> String {
        self.n += 1;
        let req = Request {
            run_id: Some(format!("agent-run-{}", self.n)),
            session: format!("tmux:agent-{}", self.n),
            target: Some(Target::Exec {
                exec: vec!["/bin/sh".into(), "-c".into(), "exec sleep 600".into()],
                env: BTreeMap::from([("AGENT_HOME".into(), "/home/dev/.agent".into())]),
            }),
            cwd: Some(cwd.into()),
            reason: "age-limit (active autonomous run)".into(),
            disposition: "terminal".into(),
            origin: "autonomous".into(),
            evidence: vec!["active-subagent".into(), "uncommitted-worktree-work".into()],
            ..Request::default()
        };
        let root = Caller {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            root: true,
            may_mutate: true,
        };
        let r = self.queue.lock().enqueue(&root, Ok(req), None).unwrap();
        assert!(r.admitted, "{r:?}");
        r.id
    }

    /// The agent's D-2 step 1 (the lock's heartbeat).
    fn heartbeat(&self) {
        self.queue.lock().heartbeat(&LockEnv {
            ours: self.ours.clone(),
            facts: self.facts.clone(),
            prober: std::sync::Arc::new(KernelProber),
        });
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn idle(c: &mut Criterion) {
    let rt = rt();
    let mut g = c.benchmark_group("idle");
    g.measurement_time(Duration::from_secs(5));
    let mut r = Rig::new();
    rt.block_on(r.drainer.tick(&r.queue, false));
    g.bench_function("tick", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    r.heartbeat();
                    let rep = r.drainer.tick(&r.queue, false).await;
                    debug_assert_eq!(rep.outcome, Outcome::Empty);
                }
                t.elapsed()
            })
        })
    });
    g.bench_function("wake", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    r.heartbeat();
                    r.drainer.wake(&r.queue).await;
                }
                t.elapsed()
            })
        })
    });
    g.finish();
}

/// Fresh rigs every so many decisions keep the state small, as a real queue's is.
const PER_RIG: u64 = 25;

fn decision(c: &mut Criterion) {
    let rt = rt();
    let mut g = c.benchmark_group("decision");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(8));
    // Validation passes, the continuation is written, the attempt recorded and started.
    g.bench_function("revive", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let mut r = Rig::new();
                rt.block_on(r.drainer.tick(&r.queue, false));
                for _ in 0..left.min(PER_RIG) {
                    let cwd = r.cwd.clone();
                    let id = r.admit(&cwd);
                    let rep = rt.block_on(async {
                        let t = Instant::now();
                        let rep = r.drainer.tick(&r.queue, false).await;
                        total += t.elapsed();
                        rep
                    });
                    assert_eq!(rep.outcome, Outcome::Revived, "{rep:?}");
                    assert_eq!(rep.entry_id.as_deref(), Some(id.as_str()));
                    // Untimed: end the attempt so the next decision is on a fresh entry.
                    let root = Caller {
                        uid: 0,
                        gid: 0,
                        root: true,
                        may_mutate: true,
                    };
                    r.queue.lock().cancel(&root, &id).unwrap();
                    rt.block_on(r.drainer.wake(&r.queue));
                }
                left = left.saturating_sub(PER_RIG);
            }
            total
        })
    });
    // Validation fails at cwd-missing (after the already-running and stop checks): the
    // entry is invalidated.
    g.bench_function("invalidate", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let mut r = Rig::new();
                rt.block_on(r.drainer.tick(&r.queue, false));
                for _ in 0..left.min(PER_RIG) {
                    r.admit("/nonexistent/project");
                    let rep = rt.block_on(async {
                        let t = Instant::now();
                        let rep = r.drainer.tick(&r.queue, false).await;
                        total += t.elapsed();
                        rep
                    });
                    assert_eq!(rep.outcome, Outcome::Invalidated, "{rep:?}");
                }
                left = left.saturating_sub(PER_RIG);
            }
            total
        })
    });
    g.finish();
}

fn mean_us(c: &str) -> Option<f64> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/criterion")
        .join(c)
        .join("new/estimates.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
    v["mean"]["point_estimate"].as_f64().map(|ns| ns / 1000.0)
}

fn summary() {
    let (Some(tick), Some(wake)) = (mean_us("idle/tick"), mean_us("idle/wake")) else {
        return;
    };
    // At the defaults: a tick every 60 s, idle wakes every 15 s between (3 per interval).
    let per_minute = tick + 3.0 * wake;
    println!("\nidle tick {tick:.1} µs, idle wake {wake:.1} µs");
    println!(
        "share of one CPU at the default interval: {:.5} % (target < 0.01 %)",
        per_minute / 60e6 * 100.0
    );
    if let (Some(rv), Some(inv)) = (mean_us("decision/revive"), mean_us("decision/invalidate")) {
        println!("one decision: revive {rv:.1} µs, invalidate {inv:.1} µs");
    }
}

criterion_group!(benches, idle, decision);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
