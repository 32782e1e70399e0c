//! Wiring and lifecycle of `outlived` (SPEC, L-3, §8, §9): the one place that
//! knows every part.
//!
//! Start: configuration (fatal on error, exit 78), logging, identity (fatal without a machine
//! id), runtime directory, the watchdog monitor thread, the lock decision (L-3: before the bus
//! name), the bus name (exit 75 if taken), then `READY=1`. Running: the drainer loop and the bus
//! loop on one current-thread runtime, signals on the same runtime. SIGHUP reloads
//! (`RELOADING=1` … `READY=1`); SIGTERM stops (`STOPPING=1`, finish the current tick, release
//! the lock). The agent never forks.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::audit::{Alert, AuditLog, AuditSink, Auditor, Event, priority};
use crate::clock::SystemClock;
use crate::config::{Config, Mode, Paths};
use crate::drainer::gauge::HostGauge;
use crate::drainer::manager::Systemd;
use crate::drainer::tick::{Drainer, Handle, Report, Settings as DrainerSettings};
use crate::drainer::validate::WorkerPaths;
use crate::drainer::{self, Timing, Wake};
use crate::facts::{self, Facts};
use crate::posture::attention::{Attention, Causes};
use crate::posture::rows::{REASON_CODES, Runtime, RuntimeRead};
use crate::posture::{NoticeGate, Posture, Published, QueueFacts, Settings as PostureSettings};
use crate::publish::dbus::auth::AuthPolicy;
use crate::publish::dbus::gate::Gate;
use crate::publish::dbus::queue1::DrainService;
use crate::publish::dbus::{
    Agent1, Bus, BusTarget, Guards1, HostState, Objects, Publisher, ResumeQueue1, SharedQueue,
    StartError,
};
use crate::publish::journal::JournalWriter;
use crate::publish::metrics;
use crate::publish::notify::{Notifier, Supervisor};
use crate::publish::watchdog::{self, Heartbeats, MonitorState};
use crate::queue::{LockEnv, Queue, Settings};

/// Exit statuses (sysexits.h where one fits).
pub mod exit {
    /// Identity or another start failure.
    pub const FAILURE: i32 = 1;
    /// The bus could not be reached (EX_UNAVAILABLE).
    pub const UNAVAILABLE: i32 = 69;
    /// A loop wedged and no watchdog acted (EX_SOFTWARE).
    pub const WEDGED: i32 = super::watchdog::EXIT_WEDGED;
    /// Another connection owns the name (EX_TEMPFAIL).
    pub const NAME_TAKEN: i32 = 75;
    /// The bus policy refused the name (EX_NOPERM).
    pub const NO_PERMISSION: i32 = 77;
    /// The configuration is invalid (EX_CONFIG).
    pub const CONFIG: i32 = 78;
}

/// How long the agent keeps trying to reach the bus at start before giving up.
const BUS_START_PATIENCE: Duration = Duration::from_secs(15);
/// How long a stop waits for the current tick.
const STOP_PATIENCE: Duration = Duration::from_secs(10);

/// Command-line options of `outlived` (parsed in `src/cli/mod.rs`).
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub config: Option<PathBuf>,
    pub user: bool,
    pub no_bus: bool,
    pub check_config: bool,
}

/// The mode for these options: `--user`, implied for a non-root user.
pub fn mode(opts: &Options) -> Mode {
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
pub fn main(opts: Options) -> i32 {
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

/// The `STATUS=` line, also the `StatusText` property. `DEGRADED:` iff the attention
/// item is open (`DEGRADED: queue.resume off-runtime-divergent (foreign-host) · 2 waiting`);
/// otherwise the posture, the queue and the lock (`posture 7/9 on · queue: 3 waiting · lock
/// held`), led by `observe-only:` while dry run is on (G-7).
fn status_line(
    queue: &SharedQueue,
    drainer: &Handle,
    posture: &Published,
    bus: Option<&Bus>,
    no_bus: bool,
) -> String {
    let s = queue.view().snapshot.clone();
    if posture.degraded {
        let head = posture
            .headline
            .clone()
            .unwrap_or_else(|| "attention needed (`outlivectl status`)".into());
        return format!("DEGRADED: {head} · {} waiting", s.waiting);
    }
    let d = drainer.public();
    let mut parts = Vec::new();
    if posture.on.1 > 0 {
        parts.push(format!("posture {}/{} on", posture.on.0, posture.on.1));
    }
    if s.enabled {
        parts.push(format!("queue: {} waiting", s.waiting));
    } else {
        parts.push(format!("queue disabled ({})", s.disabled_reason));
    }
    if let Some(p) = &s.pause {
        parts.push(format!("paused ({})", p.kind.as_str()));
    }
    if d.breaker_open_until > 0 {
        parts.push(format!(
            "breaker open until {}",
            crate::clock::rfc3339_ms(d.breaker_open_until)
        ));
    }
    if s.persist_failed.is_some() {
        parts.push("state not written (persist-failed)".into());
    }
    parts.push(if s.lock_held {
        "lock held".into()
    } else {
        "lock not held".into()
    });
    match bus {
        _ if no_bus => parts.push("no bus".into()),
        Some(b) if !b.is_up() => parts.push("bus connection lost".into()),
        _ => {}
    }
    let line = parts.join(" · ");
    if s.dry_run {
        format!("observe-only: {line}")
    } else {
        line
    }
}

impl Agent {
    fn timing(&self) -> Timing {
        Timing::new(
            Duration::from_secs(self.config.drainer.interval_sec as u64),
            self.watchdog,
        )
    }

    /// The drainer and what runs it. The service manager is systemd when it runs here (the
    /// user's with `--user`); without it exec targets are spawned detached and unit targets
    /// cannot be revived.
    async fn runner(
        &self,
        beat: Arc<watchdog::LoopBeat>,
        published: Arc<RwLock<Published>>,
    ) -> Runner {
        let user_mode = self.mode == Mode::User;
        // Under systemd the drainer always goes through it: its connection is made when first
        // needed and rebuilt after any loss (§12 D-6); the agent never spawns runs itself there.
        let manager = if Systemd::booted() {
            Some(Systemd::new(user_mode, Some(beat.clone())))
        } else {
            tracing::info!(
                "systemd is not the service manager here: exec targets are spawned detached, unit targets cannot be revived"
            );
            None
        };
        let uid = nix::unistd::getuid().as_raw();
        let no_linger = user_mode && manager.is_some() && !lingers(uid);
        if no_linger {
            self.audit.record(
                &Event::new(
                    "no-linger",
                    format!(
                        "the user manager of uid {uid} does not linger: runs revived through it stop when that user \
                         logs out. Run `loginctl enable-linger` for this user, or run outlived as a system service."
                    ),
                )
                .alert(Alert::QueueNotice)
                .field("reason", "no-linger"),
            );
        }
        let systemd = manager.clone();
        let d = Drainer::new(
            DrainerSettings::from_config(&self.config, user_mode),
            manager,
            WorkerPaths {
                facts: self.host.facts.clone(),
                beat: Some(beat),
            },
            Box::new(HostGauge),
            Arc::new(SystemClock),
            Arc::clone(&self.audit),
            &self.config.runtime_dir,
        );
        let out = Arc::new(Outputs {
            rows_wire: Arc::default(),
            host: Arc::clone(&self.host),
            queue: Arc::clone(&self.queue),
            notifier: Arc::clone(&self.notifier),
            drainer: d.handle(),
            published,
            bus: OnceLock::new(),
            no_bus: self.opts.no_bus,
        });
        Runner {
            host: Arc::clone(&self.host),
            queue: Arc::clone(&self.queue),
            handle: d.handle(),
            drainer: tokio::sync::Mutex::new(d),
            out,
            last_tick_at: Arc::clone(&self.last_tick_at),
            poke: Arc::new(tokio::sync::Notify::new()),
            posture_poke: Arc::clone(&self.posture_poke),
            applied: Arc::clone(&self.applied),
            metrics: Arc::new(metrics::Writes::default()),
            audit: Arc::clone(&self.audit),
            no_linger,
            systemd,
            manager_down: Arc::default(),
        }
    }

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
            let p = posture.lock().unwrap_or_else(|e| e.into_inner());
            for e in p
                .rejected_dropins()
                .iter()
                .chain(p.accepted_gaps_event().iter())
            {
                self.audit.record(e);
            }
        }
        self.write_boot_snapshot(&posture);
        let book = posture.lock().unwrap_or_else(|e| e.into_inner()).book();
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
                    *self.applied.write().unwrap_or_else(|e| e.into_inner()) = self.config.clone();
                    {
                        let mut p = posture.lock().unwrap_or_else(|e| e.into_inner());
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

/// Evaluates the posture (G-8) off the runtime's thread (a hung state directory cannot stall
/// the agent), records what it decided, and publishes the result.
struct Evaluator {
    posture: Arc<Mutex<Posture>>,
    out: Arc<Outputs>,
    queue: SharedQueue,
    audit: Arc<dyn AuditSink>,
    /// The service manager unreachable past its grace (a persistent cause, G-9).
    manager_down: Arc<AtomicBool>,
}

impl Evaluator {
    async fn evaluate(&self) {
        let mut facts = queue_facts(&self.queue);
        facts.causes.manager_unreachable = self.manager_down.load(Ordering::Relaxed);
        let posture = Arc::clone(&self.posture);
        let done = tokio::task::spawn_blocking(move || {
            let mut p = posture.lock().unwrap_or_else(|e| e.into_inner());
            let o = p.evaluate(&facts);
            (o, p.published().clone())
        })
        .await;
        let Ok((outcome, published)) = done else {
            tracing::warn!("the posture evaluation panicked; the last posture stays published");
            return;
        };
        for e in &outcome.events {
            self.audit.record(e);
        }
        self.out
            .host
            .degraded
            .store(published.degraded, Ordering::Relaxed);
        *self
            .out
            .rows_wire
            .write()
            .unwrap_or_else(|e| e.into_inner()) =
            Arc::new(crate::publish::dbus::guards1::rows_wire(&published.rows));
        *self
            .out
            .published
            .write()
            .unwrap_or_else(|e| e.into_inner()) = published;
        self.out.status();
        if let Some(b) = self.out.bus.get() {
            b.posture_signals(&outcome.changed_rows, &outcome.raised);
        }
        self.out.sync();
    }
}

/// What the posture needs of the queue for persistent causes and the dry-run soak.
fn queue_facts(q: &SharedQueue) -> QueueFacts {
    let s = q.view().snapshot.clone();
    QueueFacts {
        causes: Causes {
            queue_disabled: !s.enabled,
            persist_failed: s.persist_failed.is_some(),
            paused_waiting: s.pause.is_some() && s.waiting > 0,
            manager_unreachable: false,
        },
        dry_run_since: s.dry_run_since,
    }
}

fn status(enabled: bool) -> RuntimeRead {
    RuntimeRead::Status(Runtime {
        enabled,
        ..Runtime::default()
    })
}

fn off_because(reason: &str) -> RuntimeRead {
    RuntimeRead::Status(Runtime {
        enabled: false,
        reason_code: Some(reason.to_string()),
        ..Runtime::default()
    })
}

/// A boottime instant as wall ms (for display).
fn boot_to_wall(boot: u64) -> u64 {
    crate::clock::wall_ms().saturating_sub(crate::clock::boottime_ms().saturating_sub(boot))
}

impl Agent {
    /// The posture with a getter for every built-in guard (G-3: registered unconditionally).
    fn posture(&self, runner: &Runner) -> Posture {
        let settings = PostureSettings::from_config(&self.config, self.opts.no_bus, self.watchdog);
        let owner = if self.mode == Mode::User {
            nix::unistd::getuid().as_raw()
        } else {
            0
        };
        let mut p = Posture::new(
            &self.config_path,
            self.opts.config.is_some(),
            self.paths.clone(),
            self.config.clone(),
            settings,
            owner,
            Arc::clone(&self.attention),
            Arc::new(SystemClock),
        );
        // queue.resume: the lock held, the state writable, the service manager reachable, the
        // drainer ticking.
        let (q, d, no_linger) = (
            Arc::clone(&self.queue),
            runner.handle.clone(),
            runner.no_linger,
        );
        let (systemd, applied) = (runner.systemd.clone(), Arc::clone(&self.applied));
        p.register(
            "queue.resume",
            Box::new(move || {
                let s = q.lock().snapshot();
                if !s.enabled {
                    let code = if REASON_CODES.contains(&s.disabled_reason.as_str()) {
                        s.disabled_reason.as_str()
                    } else {
                        "acquisition-error"
                    };
                    return off_because(code);
                }
                if s.persist_failed.is_some() {
                    return off_because("persist-failed");
                }
                if no_linger {
                    return off_because("no-linger");
                }
                let grace = manager_grace_ms(&applied.read().unwrap_or_else(|e| e.into_inner()));
                if systemd
                    .as_ref()
                    .and_then(Systemd::down_for_ms)
                    .is_some_and(|d| d > grace)
                {
                    return off_because("manager-unreachable");
                }
                let last = d.public().last_tick_boot;
                RuntimeRead::Status(Runtime {
                    enabled: true,
                    dry_run: Some(s.dry_run),
                    last_tick_boot: last,
                    last_tick_wall: last.map(boot_to_wall),
                    ..Runtime::default()
                })
            }),
        );
        let q = Arc::clone(&self.queue);
        p.register(
            "queue.lock.auto_heal",
            Box::new(move || {
                let a = q.lock().settings().auto_heal;
                RuntimeRead::Status(Runtime {
                    enabled: a != crate::config::AutoHeal::Off,
                    dry_run: Some(a == crate::config::AutoHeal::Observe),
                    ..Runtime::default()
                })
            }),
        );
        // The drainer applies these on start and reload.
        let applied = Arc::clone(&self.applied);
        p.register(
            "drainer.auto_resume_stale_pause",
            Box::new(move || {
                status(
                    applied
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .drainer
                        .auto_resume_stale_pause,
                )
            }),
        );
        let applied = Arc::clone(&self.applied);
        p.register(
            "drainer.calm_gate",
            Box::new(move || {
                status(
                    applied
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .drainer
                        .calm_gate,
                )
            }),
        );
        // state.host_local: the state directory classified on its own (outside the lock).
        let (host, dir) = (Arc::clone(&self.host), self.config.state_dir.clone());
        p.register(
            "state.host_local",
            Box::new(move || match host.facts.classify_path(&dir) {
                Ok(c) => match c.class {
                    crate::facts::FsClass::LocalPersistent => status(true),
                    crate::facts::FsClass::LocalVolatile => off_because("state-volatile"),
                    _ => off_because("state-not-host-local"),
                },
                Err(e) => RuntimeRead::Errored(e.to_string()),
            }),
        );
        // watchdog: armed and fed under systemd; elsewhere the monitor runs, verdict unknown.
        let (monitor, supervisor) = (Arc::clone(&self.monitor), self.supervisor);
        p.register(
            "watchdog",
            Box::new(move || {
                let running = monitor.running.load(Ordering::Relaxed);
                let last = match monitor.last_ok_ms.load(Ordering::Relaxed) {
                    0 => None,
                    t => Some(t),
                };
                let fed = |enabled: bool, blind: bool| {
                    RuntimeRead::Status(Runtime {
                        enabled,
                        last_tick_boot: last,
                        last_tick_wall: last.map(boot_to_wall),
                        verdict_unknown: blind,
                        ..Runtime::default()
                    })
                };
                match supervisor {
                    Supervisor::Systemd {
                        watchdog_usec: Some(_),
                    } => fed(running && monitor.feeding.load(Ordering::Relaxed), false),
                    // Under systemd without WatchdogSec= nothing restarts a wedged agent.
                    Supervisor::Systemd {
                        watchdog_usec: None,
                    } => status(false),
                    Supervisor::Launchd | Supervisor::None => fed(running, true),
                }
            }),
        );
        let (bus, no_bus) = (Arc::clone(&runner.out), self.opts.no_bus);
        p.register(
            "publish.dbus",
            Box::new(move || status(!no_bus && bus.bus.get().is_some_and(|b| b.is_up()))),
        );
        let journal = Arc::clone(&self.journal);
        p.register(
            "publish.journal",
            Box::new(move || {
                use crate::publish::journal::Delivery;
                let last = journal.last_delivery();
                if last != Delivery::UnifiedLog
                    && !journal.socket_present()
                    && !crate::publish::journal::stderr_is_journal()
                {
                    // No journal to confirm: `on-unverified`.
                    return RuntimeRead::Absent;
                }
                match last {
                    Delivery::Journal | Delivery::UnifiedLog => status(true),
                    Delivery::Stderr => status(false),
                    Delivery::None => RuntimeRead::Status(Runtime {
                        enabled: true,
                        verdict_unknown: true,
                        ..Runtime::default()
                    }),
                }
            }),
        );
        let (applied, writes) = (Arc::clone(&self.applied), Arc::clone(&runner.metrics));
        p.register(
            "metrics.textfile",
            Box::new(move || {
                if applied
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .metrics_textfile
                    .is_none()
                {
                    return status(false);
                }
                let w = writes.get();
                RuntimeRead::Status(Runtime {
                    enabled: w.last_error.is_none(),
                    reason_code: w.last_error.map(|e| e.code.to_string()),
                    last_tick_boot: w.last_ok.map(|x| x.0),
                    last_tick_wall: w.last_ok.map(|x| x.1),
                    ..Runtime::default()
                })
            }),
        );
        p
    }

    /// `posture-boot.json` (G-4): what was applied, in the state directory while the lock is
    /// held, else in the runtime directory (L-6).
    fn write_boot_snapshot(&self, posture: &Mutex<Posture>) {
        let text = {
            let p = posture.lock().unwrap_or_else(|e| e.into_inner());
            format!(
                "{}\n",
                serde_json::to_string_pretty(&p.boot_snapshot_json()).unwrap_or_default()
            )
        };
        // In the state directory while the lock is held (checked to still be ours), else in
        // the runtime directory (L-6).
        if let Err(e) = self
            .queue
            .lock()
            .write_file(None, "posture-boot.json", text.as_bytes())
        {
            tracing::warn!("cannot write posture-boot.json: {e}");
        }
    }
}

/// The drainer as the agent runs it: systemd over D-Bus (or a detached spawn), path checks on
/// the facts worker, the kernel's gauges.
type AgentDrainer = Drainer<Systemd, WorkerPaths>;

/// What one wake of the drainer loop, or a `Drain()`, does (D-1, D-2). The drainer sits behind
/// an async mutex: the loop waits for it, a `Drain()` that finds it taken is `Busy`.
struct Runner {
    host: Arc<HostState>,
    queue: SharedQueue,
    drainer: tokio::sync::Mutex<AgentDrainer>,
    handle: Handle,
    out: Arc<Outputs>,
    last_tick_at: Arc<AtomicU64>,
    /// Wakes the loop (a `Drain()` started an attempt whose grace the loop must time).
    poke: Arc<tokio::sync::Notify>,
    /// Asks the posture for an evaluation (every tick, G-8).
    posture_poke: Arc<tokio::sync::Notify>,
    applied: Arc<RwLock<Config>>,
    metrics: Arc<metrics::Writes>,
    audit: Arc<dyn AuditSink>,
    /// `--user` without lingering (the queue's row reads `no-linger`).
    no_linger: bool,
    /// The service manager's connection (a clone of the drainer's), when systemd runs here.
    systemd: Option<Systemd>,
    /// Whether the manager has been unreachable past the threshold (a persistent cause, G-9).
    manager_down: Arc<AtomicBool>,
}

/// How long the service manager may be unreachable before `queue.resume` reads
/// `off-runtime-divergent` (`manager-unreachable`): max(2 × `drainer.interval_sec`, 30 s)
/// (§12 D-6).
fn manager_grace_ms(c: &Config) -> u64 {
    (2 * c.drainer.interval_sec as u64 * 1000).max(30_000)
}

impl Runner {
    /// D-2 step 1: on a tick record `last_tick_at` and refresh the hostname; always touch the
    /// lock (or retry its acquisition). On a tick also the queue's housekeeping (retention,
    /// checkpoint, the Q-14 persist retry).
    fn step_one(&self, tick: bool) {
        if tick {
            self.last_tick_at
                .store(crate::clock::wall_ms(), Ordering::Relaxed);
            self.host.refresh_hostname();
        }
        let mut q = self.queue.lock();
        q.heartbeat(&lock_env(&self.host));
        if tick {
            q.housekeeping();
        }
    }

    /// On every tick: a sign of life from the service manager (so a lost connection is found
    /// and rebuilt even while the queue is idle), and, once it has been unreachable past the
    /// threshold, one notice that stays while it is (and one line when it is back).
    async fn watch_manager(&self) {
        let Some(m) = &self.systemd else {
            return;
        };
        let _ = m.ping().await;
        let grace = manager_grace_ms(&self.applied.read().unwrap_or_else(|e| e.into_inner()));
        let down = m.down_for_ms();
        let over = down.is_some_and(|d| d > grace);
        if over == self.manager_down.swap(over, Ordering::Relaxed) {
            return;
        }
        if over {
            self.audit.record(
                &Event::new(
                    "manager-unreachable",
                    format!(
                        "systemd has not been reachable over D-Bus for {} s ({}): no run is revived and none is \
                         dropped meanwhile (entries stay queued, attempts wait for their verification); outlived \
                         keeps reconnecting. Check the system bus: `systemctl status dbus`",
                        down.unwrap_or(0) / 1000,
                        m.last_error()
                    ),
                )
                .alert(Alert::QueueNotice)
                .field("reason", "manager-unreachable"),
            );
        } else {
            self.audit.record(
                &Event::new(
                    "manager-reachable",
                    "systemd answers over D-Bus again: revival resumes",
                )
                .priority(priority::NOTICE),
            );
        }
        self.posture_poke.notify_one();
    }

    /// One wake of the loop; returns when the next attempt's grace ends.
    async fn wake(&self, w: Wake) -> Option<Duration> {
        let due = {
            let mut d = self.drainer.lock().await;
            #[cfg(feature = "fault-hooks")]
            if crate::faults::wedged(drainer::LOOP_NAME) {
                // A tick that awaits something that never completes, holding the drainer:
                // exactly the wedge X-4 exists to catch (and a `Drain()` meanwhile is `Busy`).
                tracing::warn!("fault hook: wedging the {} loop", drainer::LOOP_NAME);
                std::future::pending::<()>().await;
            }
            self.step_one(w == Wake::Tick);
            match w {
                Wake::Tick => {
                    self.watch_manager().await;
                    d.tick(&self.queue, false).await;
                }
                Wake::Idle => d.wake(&self.queue).await,
            }
            d.next_due()
        };
        if w == Wake::Tick {
            self.after_tick();
        }
        self.out.status();
        self.out.sync();
        due
    }

    /// After every tick: the counts of repeated refusals that are due (§12 X-1), the metrics
    /// textfile and a posture evaluation (G-8).
    fn after_tick(&self) {
        self.audit.flush();
        self.posture_poke.notify_one();
        let (path, runtime_dir) = {
            let c = self.applied.read().unwrap_or_else(|e| e.into_inner());
            (c.metrics_textfile.clone(), c.runtime_dir.clone())
        };
        let Some(path) = path else {
            return;
        };
        // The one metrics directory the agent owns: `<runtime_dir>/metrics`, root 0755, for
        // node_exporter's --collector.textfile.directory (writable under the shipped unit).
        if path.parent() == Some(runtime_dir.join("metrics").as_path()) {
            let made = crate::files::Dir::create(&runtime_dir, 0o755)
                .and_then(|d| d.subdir("metrics", 0o755));
            if let Err(e) = made {
                tracing::warn!("cannot create {}/metrics: {e}", runtime_dir.display());
            }
        }
        let (entries, paused) = {
            let q = self.queue.lock();
            (q.state().entries.clone(), q.state().pause.is_some())
        };
        let d = self.handle.public();
        let last_tick_wall = d.last_tick_boot.map(|b| {
            crate::clock::wall_ms().saturating_sub(crate::clock::boottime_ms().saturating_sub(b))
        });
        let rows = self.out.published().rows;
        let host_id = self.host.identity().host_id.to_string();
        let text = metrics::render(&metrics::Snapshot {
            rows: &rows,
            entries: &entries,
            paused,
            revivals_total: d.revivals,
            last_tick_wall,
            version: env!("CARGO_PKG_VERSION"),
            host_id: &host_id,
        });
        if let Some(err) = self.metrics.write(&path, &text) {
            self.audit.record(
                &Event::new(
                    "metrics-write-failed",
                    format!(
                        "{}; the metrics.textfile guard reads off-runtime-divergent ({}) until a write succeeds",
                        err.message, err.code
                    ),
                )
                .priority(priority::WARNING)
                .field("reason", err.code),
            );
        }
    }
}

impl Runner {
    /// A tick now (`Drain()`, D-1): `None` while a tick is running (`Busy`).
    async fn drain(&self) -> Option<Report> {
        let mut d = self.drainer.try_lock().ok()?;
        self.step_one(true);
        let r = d.tick(&self.queue, true).await;
        drop(d);
        self.after_tick();
        self.out.status();
        self.poke.notify_one();
        Some(r)
    }
}

/// `Drain()` as the bus thread asks for it: the tick runs on the agent's main runtime, where
/// the drainer lives (it writes and fsyncs; the dispatch thread never does).
struct DrainOnMain {
    runner: Arc<Runner>,
    rt: tokio::runtime::Handle,
}

impl DrainService for DrainOnMain {
    fn drain(&self) -> Pin<Box<dyn Future<Output = Option<Report>> + Send + '_>> {
        let runner = Arc::clone(&self.runner);
        let task = self.rt.spawn(async move { runner.drain().await });
        Box::pin(async move { task.await.ok().flatten() })
    }
}

/// Where the agent's state is shown: the `STATUS=` line, `StatusText`, the bus.
struct Outputs {
    /// The rows as `GetGuards` sends them (converted once per evaluation).
    rows_wire: crate::publish::dbus::guards1::SharedRows,
    host: Arc<HostState>,
    queue: SharedQueue,
    notifier: Arc<Notifier>,
    drainer: Handle,
    published: Arc<RwLock<Published>>,
    bus: OnceLock<Arc<Bus>>,
    no_bus: bool,
}

impl Outputs {
    fn published(&self) -> Published {
        self.published
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn line(&self) -> String {
        let p = self.published.read().unwrap_or_else(|e| e.into_inner());
        status_line(
            &self.queue,
            &self.drainer,
            &p,
            self.bus.get().map(|b| &**b),
            self.no_bus,
        )
    }

    /// `STATUS=` (sent only when it changed) and `StatusText`.
    fn status(&self) {
        let line = self.line();
        self.notifier.status(&line);
        self.host.set_status_text(&line);
    }

    /// PropertiesChanged for what changed (emitted by the bus thread).
    fn sync(&self) {
        if let Some(b) = self.bus.get() {
            b.sync();
        }
    }

    /// Everything changed so far signalled (before READY=1).
    async fn flush(&self) {
        if let Some(b) = self.bus.get() {
            b.sync();
            b.flush(Duration::from_secs(2)).await;
        }
    }
}

/// Whether `user` lingers (`/var/lib/systemd/linger/<user>`): without it a user manager, and
/// every run it revived, stops at logout (D-9).
fn lingers(uid: u32) -> bool {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .is_some_and(|u| Path::new("/var/lib/systemd/linger").join(u.name).exists())
}
