//! Wiring and lifecycle of `outlived` (SPEC, L-3, §8, §9): the one place that
//! knows every part.
//!
//! Start: configuration (fatal on error, exit 78), logging, identity (fatal without a machine
//! id), runtime directory, the watchdog monitor thread, the lock decision (L-3: before the bus
//! name), the bus name (exit 75 if taken), then `READY=1`. Running: the drainer loop and the bus
//! loop on one current-thread runtime, signals on the same runtime. SIGHUP reloads
//! (`RELOADING=1` … `READY=1`); SIGTERM stops (`STOPPING=1`, finish the current tick, release
//! the lock). The agent never forks.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

mod outputs;
mod posture;
mod runner;

use outputs::Evaluator;
use runner::DrainOnMain;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::audit::{AuditLog, AuditSink, Auditor, Event, priority};
use crate::clock::SystemClock;
use crate::config::{Config, Mode, Paths};
use crate::drainer::tick::Settings as DrainerSettings;
use crate::drainer::{self, Timing};
use crate::facts::{self, Facts};
use crate::posture::attention::Attention;
use crate::posture::{NoticeGate, Posture, Published, Settings as PostureSettings};
use crate::publish::dbus::auth::AuthPolicy;
use crate::publish::dbus::gate::Gate;
use crate::publish::dbus::{
    Agent1, Bus, BusTarget, Guards1, HostState, Objects, Publisher, ResumeQueue1, SharedQueue,
    StartError,
};
use crate::publish::journal::JournalWriter;
use crate::publish::notify::{Notifier, Supervisor};
use crate::publish::watchdog::{self, Heartbeats, MonitorState};
use crate::queue::{LockEnv, Queue, Settings};
use crate::sync::{MutexExt, RwLockExt};

/// Exit statuses (sysexits.h where one fits).
pub(crate) mod exit {
    /// Identity or another start failure.
    pub(crate) const FAILURE: i32 = 1;
    /// The bus could not be reached (EX_UNAVAILABLE).
    pub(crate) const UNAVAILABLE: i32 = 69;
    // 70 (EX_SOFTWARE), a loop wedged and no watchdog acted, is exited by the monitor
    // itself: `publish::watchdog::EXIT_WEDGED`.
    /// Another connection owns the name (EX_TEMPFAIL).
    pub(crate) const NAME_TAKEN: i32 = 75;
    /// The bus policy refused the name (EX_NOPERM).
    pub(crate) const NO_PERMISSION: i32 = 77;
    /// The configuration is invalid (EX_CONFIG).
    pub(crate) const CONFIG: i32 = 78;
}

/// How long the agent keeps trying to reach the bus at start before giving up.
const BUS_START_PATIENCE: Duration = Duration::from_secs(15);
/// How long a stop waits for the current tick.
const STOP_PATIENCE: Duration = Duration::from_secs(10);

/// Command-line options of `outlived` (parsed in `src/cli/mod.rs`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Options {
    pub config: Option<PathBuf>,
    pub user: bool,
    pub no_bus: bool,
    pub check_config: bool,
}

/// The mode for these options: `--user`, implied for a non-root user.
pub(crate) fn mode(opts: &Options) -> Mode {
    if opts.user || !nix::unistd::getuid().is_root() {
        Mode::User
    } else {
        Mode::System
    }
}

/// Report a fatal start error to the operator (stderr) and the service manager (`STATUS=` +
/// `ERRNO=`), and return the exit status.
fn fatal(notifier: &Notifier, message: &str, errno: i32, status: i32) -> i32 {
    eprintln!("outlived: {message}");
    notifier.fatal(&format!("failed: {message}"), errno);
    status
}

/// Run the agent; returns the process exit status.
#[expect(
    clippy::too_many_lines,
    reason = "FIXME(issue 13): the start sequence, to be split with the one configuration path"
)]
pub(crate) fn main(opts: Options) -> i32 {
    let mode = mode(&opts);
    let paths = Paths::from_env(mode);
    let notifier = Arc::new(Notifier::from_env());
    let config_path = opts
        .config
        .clone()
        .unwrap_or_else(|| paths.config_file.clone());
    let config = match Config::load(&config_path, opts.config.is_some(), &paths) {
        Ok(c) => c,
        Err(e) => {
            return fatal(
                &notifier,
                &format!("configuration error: {e}"),
                libc::EINVAL,
                exit::CONFIG,
            );
        }
    };
    if opts.check_config {
        match &config.source {
            Some(p) => println!(
                "# effective configuration of outlived, from {}",
                p.display()
            ),
            None => println!(
                "# effective configuration of outlived ({} not found: all defaults)",
                config_path.display()
            ),
        }
        print!("{}", config.to_toml());
        return 0;
    }

    crate::publish::logging::init(&config.journal_socket);
    match &config.source {
        Some(p) => tracing::info!("configuration from {}", p.display()),
        None => tracing::info!(
            "no configuration file at {}: all defaults",
            config_path.display()
        ),
    }
    let journal_writer = Arc::new(JournalWriter::new(&config.journal_socket));
    let journal: Arc<dyn AuditSink> = journal_writer.clone();

    let identity = match facts::identity::identity() {
        Ok(i) => i,
        Err(e) => return fatal(&notifier, &e.to_string(), e.errno(), exit::FAILURE),
    };
    if let Err(e) = ensure_runtime_dir(&config.runtime_dir, mode) {
        return fatal(&notifier, &e, libc::EACCES, exit::FAILURE);
    }
    #[cfg(feature = "fault-hooks")]
    crate::faults::init(config.runtime_dir.clone());
    // Until the lock is decided, audit lines go to the runtime directory (L-6).
    let auditor = Arc::new(Auditor::new(
        AuditLog::new(&config.runtime_dir),
        vec![journal],
    ));
    let audit: Arc<dyn AuditSink> = auditor.clone();

    let supervisor = Supervisor::detect();
    let wd = supervisor.watchdog_usec().map(Duration::from_micros);
    // The attention item takes queue notices from the first one on (G-9): the gate is in the
    // auditor before anything can raise.
    let posture_settings = PostureSettings::from_config(&config, opts.no_bus, wd);
    let attention = Posture::attention_for(&posture_settings, Arc::new(SystemClock));
    let posture_poke = Arc::new(tokio::sync::Notify::new());
    let poke = Arc::clone(&posture_poke);
    auditor.set_gate(Arc::new(NoticeGate::new(
        Arc::clone(&attention),
        Box::new(move || poke.notify_one()),
    )));
    let heartbeats = Heartbeats::new(wd);
    let monitor = watchdog::spawn_monitor(
        Arc::clone(&heartbeats),
        supervisor,
        Arc::clone(&notifier),
        Arc::clone(&audit),
    );

    // Blocking work (a posture evaluation, a save) comes once a tick: keep the pool's thread
    // parked between ticks instead of ending it after tokio's default 10 s and starting a new
    // one each minute (idle CPU, BENCHMARKS.md).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_keep_alive(Duration::from_secs(600))
        // Bounded, like every thread of the agent (the unit's TasksMax=).
        .max_blocking_threads(4)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fatal(
                &notifier,
                &format!("cannot start the runtime: {e}"),
                libc::EAGAIN,
                exit::FAILURE,
            );
        }
    };
    let host = Arc::new(HostState::new(
        Facts::new(Duration::from_millis(config.facts.statfs_timeout_ms as u64)),
        identity,
        AuthPolicy {
            user_mode: mode == Mode::User,
            agent_uid: nix::unistd::getuid().as_raw(),
        },
    ));
    let queue = Queue::new(
        &config.state_dir,
        &config.runtime_dir,
        Settings::from_config(&config),
        Arc::clone(&auditor),
        Arc::new(SystemClock),
    );
    let agent = Agent {
        opts,
        mode,
        paths,
        config_path,
        applied: Arc::new(RwLock::new(config.clone())),
        config,
        journal: journal_writer,
        monitor,
        supervisor,
        attention,
        posture_poke,
        notifier,
        audit,
        heartbeats,
        watchdog: wd,
        queue: crate::queue::Shared::new(queue),
        last_tick_at: Arc::new(AtomicU64::new(0)),
        host,
    };
    rt.block_on(agent.run())
}

/// Create the runtime directory if needed (through `crate::files`: a link at its path is
/// refused). It must be this agent's, and writable by it alone (a runtime directory others may
/// write in would let them plant the files the agent writes there: continuation copies, logs
/// of spawned runs, audit lines while the lock is not held); in user mode private (0700).
fn ensure_runtime_dir(dir: &Path, mode: Mode) -> Result<(), String> {
    let perm = if mode == Mode::User { 0o700 } else { 0o755 };
    let d = crate::files::Dir::create(dir, perm)
        .map_err(|e| format!("runtime_dir {}: {e}", dir.display()))?;
    let m = d
        .meta()
        .map_err(|e| format!("runtime_dir {}: {e}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if m.uid != me {
        return Err(format!(
            "runtime_dir {} is owned by uid {}, not by this agent (uid {me}); remove it or set runtime_dir",
            dir.display(),
            m.uid
        ));
    }
    if m.shared_writable() {
        return Err(format!(
            "runtime_dir {} is writable by group or others (mode {:04o}); chmod go-w it, or set runtime_dir to a \
             private directory",
            dir.display(),
            m.perm
        ));
    }
    if mode == Mode::User && m.perm & 0o077 != 0 {
        return Err(format!(
            "runtime_dir {} is accessible to others; chmod 700 it",
            dir.display()
        ));
    }
    Ok(())
}

struct Agent {
    opts: Options,
    mode: Mode,
    paths: Paths,
    config_path: PathBuf,
    config: Config,
    /// The configuration as applied (start, reload), for the guards' getters.
    applied: Arc<RwLock<Config>>,
    journal: Arc<JournalWriter>,
    monitor: Arc<MonitorState>,
    supervisor: Supervisor,
    attention: Arc<Mutex<Attention>>,
    posture_poke: Arc<tokio::sync::Notify>,
    notifier: Arc<Notifier>,
    audit: Arc<dyn AuditSink>,
    heartbeats: Arc<Heartbeats>,
    watchdog: Option<Duration>,
    queue: SharedQueue,
    last_tick_at: Arc<AtomicU64>,
    host: Arc<HostState>,
}

/// Evaluate or refresh the lock with this host's current identity (L-3).
fn lock_env(host: &HostState) -> LockEnv {
    host.lock_env()
}

impl Agent {
    fn timing(&self) -> Timing {
        Timing::new(
            Duration::from_secs(self.config.drainer.interval_sec as u64),
            self.watchdog,
        )
    }

    #[expect(
        clippy::too_many_lines,
        reason = "FIXME(issue 13): the lifecycle, to be split with the one configuration path"
    )]
    async fn run(mut self) -> i32 {
        let (mut sigterm, mut sigint, mut sighup) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(a), Ok(b), Ok(c)) => (a, b, c),
            _ => {
                return fatal(
                    &self.notifier,
                    "cannot install signal handlers",
                    libc::EINVAL,
                    exit::FAILURE,
                );
            }
        };

        // L-3: the lock is decided before the bus name is requested.
        self.queue.lock().evaluate_lock(&lock_env(&self.host), true);

        let no_bus = self.opts.no_bus;
        // The drainer's heartbeat exists before the loop does: the service manager and the
        // facts worker beat it after each bounded call within a tick. Until the loop starts
        // (after the bus name, at most BUS_START_PATIENCE), a busy window covers it.
        let drainer_beat = self
            .heartbeats
            .register(drainer::LOOP_NAME, self.timing().heartbeat_period());
        drainer_beat.busy_for(BUS_START_PATIENCE + Duration::from_secs(10));
        let published = Arc::new(RwLock::new(Published::default()));
        let runner = Arc::new(
            self.runner(Arc::clone(&drainer_beat), Arc::clone(&published))
                .await,
        );
        let handle = runner.handle.clone();
        let out = Arc::clone(&runner.out);
        let posture = Arc::new(Mutex::new(self.posture(&runner)));
        {
            let p = posture.locked();
            for e in p
                .rejected_dropins()
                .iter()
                .chain(p.accepted_gaps_event().iter())
            {
                self.audit.record(e);
            }
        }
        self.write_boot_snapshot(&posture);
        let book = posture.locked().book();
        let publisher = Arc::new(Publisher::new(
            Arc::clone(&self.host),
            Arc::clone(&self.queue),
            handle.clone(),
            Arc::clone(&published),
        ));
        let gate = Gate::new(AuthPolicy {
            user_mode: self.mode == Mode::User,
            agent_uid: nix::unistd::getuid().as_raw(),
        });
        let objects = Objects {
            agent1: Agent1 {
                state: Arc::clone(&self.host),
                queue: Arc::clone(&self.queue),
                publisher: Arc::clone(&publisher),
                gate: Arc::clone(&gate),
            },
            queue1: ResumeQueue1 {
                queue: Arc::clone(&self.queue),
                gate: Arc::clone(&gate),
                last_tick_at: Arc::clone(&self.last_tick_at),
                publisher: Arc::clone(&publisher),
                drainer: handle.clone(),
                drain: Arc::new(DrainOnMain {
                    runner: Arc::clone(&runner),
                    rt: tokio::runtime::Handle::current(),
                }),
            },
            guards1: Guards1 {
                published: Arc::clone(&published),
                rows: Arc::clone(&out.rows_wire),
                book,
                attention: Arc::clone(&self.attention),
                audit: Arc::clone(&self.audit),
                poke: Arc::clone(&self.posture_poke),
                gate: Arc::clone(&gate),
                publisher: Arc::clone(&publisher),
            },
            publisher: Arc::clone(&publisher),
        };
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let bus = if no_bus {
            None
        } else {
            // The bus dispatches on a thread of its own (publish::dbus::gate); its loop's
            // heartbeat is excused while it waits for an unreachable bus at start.
            let period = self
                .watchdog
                .map(|w| w / 2)
                .unwrap_or(Duration::from_secs(10))
                .min(Duration::from_secs(10));
            let beat = self.heartbeats.register("bus", period);
            beat.busy_for(BUS_START_PATIENCE + Duration::from_secs(10));
            let target = if self.mode == Mode::User {
                BusTarget::Session
            } else {
                BusTarget::System
            };
            let lp = crate::publish::dbus::Loop {
                beat: Arc::clone(&beat),
                shutdown: shutdown_rx.clone(),
            };
            match Bus::spawn(
                target,
                objects,
                Arc::clone(&self.audit),
                gate,
                BUS_START_PATIENCE,
                lp,
            )
            .await
            {
                Ok(t) => {
                    beat.not_busy();
                    Some(t)
                }
                Err(e) => {
                    let (errno, status) = match &e {
                        StartError::NameTaken => (libc::EADDRINUSE, exit::NAME_TAKEN),
                        StartError::NameDenied(_) => (libc::EACCES, exit::NO_PERMISSION),
                        StartError::Unreachable(_) => (libc::ECONNREFUSED, exit::UNAVAILABLE),
                    };
                    return fatal(&self.notifier, &e.to_string(), errno, status);
                }
            }
        };
        if let Some(t) = &bus {
            let b = &t.bus;
            let _ = out.bus.set(Arc::clone(b));
            // A lost or restored bus is a runtime change: publish.dbus shows the gap.
            let poke = Arc::clone(&self.posture_poke);
            b.set_on_change(Box::new(move || poke.notify_one()));
        }
        // the first posture is evaluated before READY=1.
        let evaluator = Arc::new(Evaluator {
            posture: Arc::clone(&posture),
            out: Arc::clone(&out),
            queue: Arc::clone(&self.queue),
            audit: Arc::clone(&self.audit),
            manager_down: Arc::clone(&runner.manager_down),
        });
        evaluator.evaluate().await;

        let (timing_tx, timing_rx) = watch::channel(self.timing());
        // The loop starts now: no busy window any more (see `runner`).
        drainer_beat.not_busy();

        let posture_task = {
            let beat = self
                .heartbeats
                .register("posture", self.timing().heartbeat_period());
            let ev = Arc::clone(&evaluator);
            let poke = Arc::clone(&self.posture_poke);
            let mut stop = shutdown_rx.clone();
            let timing = timing_rx.clone();
            tokio::spawn(async move {
                loop {
                    if *stop.borrow() {
                        return;
                    }
                    let wake = timing.borrow().wake;
                    beat.set_period(wake);
                    beat.beat();
                    ev.evaluate().await;
                    beat.beat();
                    tokio::select! {
                        _ = tokio::time::sleep(wake) => {}
                        _ = poke.notified() => {}
                        _ = stop.changed() => {}
                    }
                }
            })
        };

        let line = out.line();
        self.host.set_status_text(&line);
        out.flush().await;
        self.notifier.ready(&line);
        if self.config.queue.dry_run {
            // G-7: dry run is never silent (a journal entry, not an attention notice).
            self.audit.record(
                &Event::new(
                    "observe-only",
                    format!(
                        "observe-only: queue.dry_run is on, so outlived queues and checks reaped runs but revives none. \
                         To revive them, set dry_run = false under [queue] in {} and run `systemctl reload outlived`",
                        self.config_path.display()
                    ),
                )
                .priority(priority::NOTICE),
            );
        }
        let id = self.host.identity();
        self.audit.record(
            &Event::new(
                "started",
                format!(
                    "outlived {} started ({} mode, host {}{})",
                    env!("CARGO_PKG_VERSION"),
                    if self.mode == Mode::User {
                        "user"
                    } else {
                        "system"
                    },
                    id.hostname,
                    if bus.is_some() { "" } else { ", no bus" }
                ),
            )
            .priority(priority::INFO)
            .field("version", env!("CARGO_PKG_VERSION"))
            .field("host_id", id.host_id),
        );

        let loop_runner = Arc::clone(&runner);
        let drainer_task = tokio::spawn(drainer::run_loop(
            drainer_beat,
            timing_rx,
            shutdown_rx.clone(),
            Arc::clone(&runner.poke),
            async move |w| loop_runner.wake(w).await,
        ));

        loop {
            tokio::select! {
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
                _ = sighup.recv() => {
                    self.reload(&timing_tx);
                    runner.drainer.lock().await.settings =
                        DrainerSettings::from_config(&self.config, self.mode == Mode::User);
                    *self.applied.writing() = self.config.clone();
                    {
                        let mut p = posture.locked();
                        p.reload(
                            self.config.clone(),
                            PostureSettings::from_config(&self.config, no_bus, self.watchdog),
                        );
                        for e in p.rejected_dropins() {
                            self.audit.record(&e);
                        }
                    }
                    self.write_boot_snapshot(&posture);
                    // re-evaluate posture, then READY=1.
                    evaluator.evaluate().await;
                    let line = out.line();
                    self.host.set_status_text(&line);
                    out.flush().await;
                    self.notifier.ready(&line);
                }
            }
        }

        self.notifier.stopping();
        let _ = shutdown_tx.send(true);
        if tokio::time::timeout(STOP_PATIENCE, drainer_task)
            .await
            .is_err()
        {
            tracing::warn!(
                "the drainer did not finish its tick within {}s; stopping anyway",
                STOP_PATIENCE.as_secs()
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), posture_task).await;
        // The bus thread releases the name and ends.
        if let Some(t) = bus {
            t.join(Duration::from_secs(3)).await;
        }
        // Counts of repeated refusals still held back go to the log while it is the state's.
        self.audit.close();
        // L-7: release the flock; the file stays for the next holder to reclaim.
        self.queue.lock().release();
        self.audit
            .record(&Event::new("stopped", "outlived stopped").priority(priority::INFO));
        0
    }

    fn reload(&mut self, timing_tx: &watch::Sender<Timing>) {
        self.notifier.reloading();
        let paths = Paths::from_env(self.mode);
        match Config::load(&self.config_path, self.opts.config.is_some(), &paths) {
            Ok(newer) => {
                let (applied, pending) = self.config.apply_reload(&newer);
                if !pending.is_empty() {
                    self.audit.record(
                        &Event::new(
                            "config-reload-pending",
                            format!("reload cannot apply {}; the new value takes effect at the next start", pending.join(", ")),
                        )
                        .priority(priority::NOTICE)
                        .field("keys", pending.join(",")),
                    );
                }
                self.config = applied;
                self.host.facts.set_timeout(Duration::from_millis(
                    self.config.facts.statfs_timeout_ms as u64,
                ));
                let _ = timing_tx.send(self.timing());
                {
                    let mut q = self.queue.lock();
                    q.set_settings(Settings::from_config(&self.config));
                    // L-3: a refusal that ticks do not retry is re-evaluated on reload.
                    q.evaluate_lock(&lock_env(&self.host), true);
                }
                self.audit.record(
                    &Event::new("config-reloaded", "configuration reloaded")
                        .priority(priority::INFO),
                );
            }
            Err(e) => {
                self.audit.record(
                    // The attention notice (`config-unreadable`) comes from the posture, which
                    // reads the file at every evaluation (G-4).
                    &Event::new(
                        "config-reload-failed",
                        format!(
                            "configuration reload failed, keeping the running configuration: {e}"
                        ),
                    )
                    .priority(priority::WARNING)
                    .field("error", &e),
                );
            }
        }
    }
}
