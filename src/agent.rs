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
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
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
use crate::facts::process::KernelProber;
use crate::facts::{self, Facts};
use crate::publish::dbus::auth::AuthPolicy;
use crate::publish::dbus::queue1::{DrainService, lock as lock_queue};
use crate::publish::dbus::{
    Agent1, Bus, BusTarget, HostState, Objects, Publisher, ResumeQueue1, SharedQueue, StartError,
};
use crate::publish::journal::JournalWriter;
use crate::publish::notify::{Notifier, Supervisor};
use crate::publish::watchdog::{self, Heartbeats};
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
    let journal: Arc<dyn AuditSink> = Arc::new(JournalWriter::new(&config.journal_socket));

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
    let heartbeats = Heartbeats::new(wd);
    let _monitor = watchdog::spawn_monitor(
        Arc::clone(&heartbeats),
        supervisor,
        Arc::clone(&notifier),
        Arc::clone(&audit),
    );

    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
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
        config_path,
        config,
        notifier,
        audit,
        heartbeats,
        watchdog: wd,
        queue: Arc::new(Mutex::new(queue)),
        last_tick_at: Arc::new(AtomicU64::new(0)),
        host,
    };
    rt.block_on(agent.run())
}

/// Create the runtime directory if needed. In user mode it must be ours and private.
fn ensure_runtime_dir(dir: &Path, mode: Mode) -> Result<(), String> {
    let perm = if mode == Mode::User { 0o700 } else { 0o755 };
    match std::fs::symlink_metadata(dir) {
        Ok(m) => {
            if !m.is_dir() {
                return Err(format!(
                    "runtime_dir {} exists and is not a directory",
                    dir.display()
                ));
            }
            let me = nix::unistd::geteuid().as_raw();
            if m.uid() != me {
                return Err(format!(
                    "runtime_dir {} is owned by uid {}, not by this agent (uid {me}); remove it or set runtime_dir",
                    dir.display(),
                    m.uid()
                ));
            }
            if mode == Mode::User && m.permissions().mode() & 0o077 != 0 {
                return Err(format!(
                    "runtime_dir {} is accessible to others; chmod 700 it",
                    dir.display()
                ));
            }
            Ok(())
        }
        Err(_) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(perm)
            .create(dir)
            .map_err(|e| format!("cannot create runtime_dir {}: {e}", dir.display())),
    }
}

struct Agent {
    opts: Options,
    mode: Mode,
    config_path: PathBuf,
    config: Config,
    notifier: Arc<Notifier>,
    audit: Arc<dyn AuditSink>,
    heartbeats: Arc<Heartbeats>,
    watchdog: Option<Duration>,
    queue: SharedQueue,
    last_tick_at: Arc<AtomicU64>,
    host: Arc<HostState>,
}

/// Evaluate or refresh the lock with this host's current identity (L-3).
fn lock_env(host: &HostState) -> LockEnv<'_> {
    LockEnv {
        ours: host.ours(),
        facts: &host.facts,
        prober: &KernelProber,
    }
}

/// The `STATUS=` line, also the `StatusText` property: `observe-only:` while dry run is on,
/// the queue and the lock, and the bus when it is not what it should be.
fn status_line(queue: &SharedQueue, drainer: &Handle, bus: Option<&Bus>, no_bus: bool) -> String {
    let s = lock_queue(queue).snapshot();
    let d = drainer.public();
    let mut parts = Vec::new();
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
    async fn runner(&self, beat: Arc<watchdog::LoopBeat>) -> Runner {
        let user_mode = self.mode == Mode::User;
        let manager = if !Systemd::booted() {
            tracing::info!(
                "systemd is not the service manager here: exec targets are spawned detached, unit targets cannot be revived"
            );
            None
        } else {
            match tokio::time::timeout(
                crate::drainer::manager::CALL_TIMEOUT,
                Systemd::connect(user_mode, Some(beat.clone())),
            )
            .await
            {
                Ok(Ok(m)) => Some(m),
                Ok(Err(e)) => {
                    self.manager_unreachable(&e.to_string());
                    None
                }
                Err(_) => {
                    self.manager_unreachable("no answer within 5 s");
                    None
                }
            }
        };
        let uid = nix::unistd::getuid().as_raw();
        if user_mode && manager.is_some() && !lingers(uid) {
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
            &self.config.state_dir,
            &self.config.runtime_dir,
        );
        Runner {
            host: Arc::clone(&self.host),
            queue: Arc::clone(&self.queue),
            handle: d.handle(),
            drainer: tokio::sync::Mutex::new(d),
            notifier: Arc::clone(&self.notifier),
            bus: OnceLock::new(),
            no_bus: self.opts.no_bus,
            last_tick_at: Arc::clone(&self.last_tick_at),
            poke: Arc::new(tokio::sync::Notify::new()),
        }
    }

    fn manager_unreachable(&self, why: &str) {
        self.audit.record(
            &Event::new(
                "manager-unreachable",
                format!(
                    "cannot reach systemd over D-Bus ({why}): exec targets will be spawned detached and unit \
                     targets cannot be revived until outlived restarts"
                ),
            )
            .alert(Alert::QueueNotice),
        );
    }

    async fn start_bus(&self, objects: Objects) -> Result<Arc<Bus>, (String, i32, i32)> {
        let target = if self.mode == Mode::User {
            BusTarget::Session
        } else {
            BusTarget::System
        };
        let deadline = tokio::time::Instant::now() + BUS_START_PATIENCE;
        let mut backoff = Duration::from_millis(250);
        loop {
            match Bus::start(target, objects.clone(), Arc::clone(&self.audit)).await {
                Ok(b) => return Ok(b),
                Err(e @ StartError::NameTaken) => {
                    return Err((e.to_string(), libc::EADDRINUSE, exit::NAME_TAKEN));
                }
                Err(e @ StartError::NameDenied(_)) => {
                    return Err((e.to_string(), libc::EACCES, exit::NO_PERMISSION));
                }
                Err(e @ StartError::Unreachable(_)) => {
                    if tokio::time::Instant::now() + backoff > deadline {
                        return Err((e.to_string(), libc::ECONNREFUSED, exit::UNAVAILABLE));
                    }
                    tracing::warn!("{e}; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(4));
                }
            }
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
        lock_queue(&self.queue).evaluate_lock(&lock_env(&self.host), true);

        let no_bus = self.opts.no_bus;
        // The drainer's heartbeat exists before the loop does: the service manager and the
        // facts worker beat it after each bounded call within a tick. Until the loop starts
        // (after the bus name, at most BUS_START_PATIENCE), a busy window covers it.
        let drainer_beat = self
            .heartbeats
            .register(drainer::LOOP_NAME, self.timing().heartbeat_period());
        drainer_beat.busy_for(BUS_START_PATIENCE + Duration::from_secs(10));
        let runner = Arc::new(self.runner(Arc::clone(&drainer_beat)).await);
        let handle = runner.handle.clone();
        let publisher = Arc::new(Publisher::new(
            Arc::clone(&self.host),
            Arc::clone(&self.queue),
            handle.clone(),
        ));
        let auth = AuthPolicy {
            user_mode: self.mode == Mode::User,
            agent_uid: nix::unistd::getuid().as_raw(),
        };
        let objects = Objects {
            agent1: Agent1 {
                state: Arc::clone(&self.host),
                queue: Arc::clone(&self.queue),
                publisher: Arc::clone(&publisher),
            },
            queue1: ResumeQueue1 {
                queue: Arc::clone(&self.queue),
                auth,
                last_tick_at: Arc::clone(&self.last_tick_at),
                publisher: Arc::clone(&publisher),
                drainer: handle.clone(),
                drain: Arc::clone(&runner) as Arc<dyn DrainService>,
            },
            publisher: Arc::clone(&publisher),
        };
        let bus = if no_bus {
            None
        } else {
            match self.start_bus(objects).await {
                Ok(b) => Some(b),
                Err((msg, errno, status)) => return fatal(&self.notifier, &msg, errno, status),
            }
        };
        if let Some(b) = &bus {
            let _ = runner.bus.set(Arc::clone(b));
        }

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (timing_tx, timing_rx) = watch::channel(self.timing());
        // The loop starts now: no busy window any more (see `runner`).
        drainer_beat.not_busy();
        let bus_task = bus.as_ref().map(|b| {
            let period = self
                .watchdog
                .map(|w| w / 2)
                .unwrap_or(Duration::from_secs(10))
                .min(Duration::from_secs(10));
            let beat = self.heartbeats.register("bus", period);
            tokio::spawn(Arc::clone(b).run(beat, shutdown_rx.clone()))
        });

        let line = status_line(&self.queue, &handle, bus.as_deref(), no_bus);
        self.host.set_status_text(&line);
        self.notifier.ready(&line);
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
                    let line = status_line(&self.queue, &handle, bus.as_deref(), no_bus);
                    self.host.set_status_text(&line);
                    self.notifier.ready(&line);
                    if let Some(b) = &bus { b.sync().await; }
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
        if let Some(t) = bus_task {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        if let Some(b) = &bus {
            b.close().await;
        }
        // L-7: release the flock; the file stays for the next holder to reclaim.
        lock_queue(&self.queue).release();
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
                    let mut q = lock_queue(&self.queue);
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
                    &Event::new(
                        "config-unreadable",
                        format!(
                            "configuration reload failed, keeping the running configuration: {e}"
                        ),
                    )
                    .alert(Alert::QueueNotice)
                    .field("error", &e),
                );
            }
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
    notifier: Arc<Notifier>,
    bus: OnceLock<Arc<Bus>>,
    no_bus: bool,
    last_tick_at: Arc<AtomicU64>,
    /// Wakes the loop (a `Drain()` started an attempt whose grace the loop must time).
    poke: Arc<tokio::sync::Notify>,
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
        let mut q = lock_queue(&self.queue);
        q.heartbeat(&lock_env(&self.host));
        if tick {
            q.housekeeping();
        }
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
                    d.tick(&self.queue, false).await;
                }
                Wake::Idle => d.wake(&self.queue).await,
            }
            d.next_due()
        };
        self.status();
        if let Some(b) = self.bus.get() {
            b.sync().await;
        }
        due
    }

    fn status(&self) {
        let line = status_line(
            &self.queue,
            &self.handle,
            self.bus.get().map(|b| &**b),
            self.no_bus,
        );
        self.notifier.status(&line);
        self.host.set_status_text(&line);
    }
}

impl DrainService for Runner {
    fn drain(&self) -> Pin<Box<dyn Future<Output = Option<Report>> + Send + '_>> {
        Box::pin(async move {
            let mut d = self.drainer.try_lock().ok()?;
            self.step_one(true);
            let r = d.tick(&self.queue, true).await;
            drop(d);
            self.status();
            self.poke.notify_one();
            Some(r)
        })
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
