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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod lifecycle;
mod outputs;
mod posture;
mod runner;

use tokio::sync::watch;

use crate::audit::{AuditLog, AuditSink, Auditor};
use crate::clock::SystemClock;
use crate::config::{Applied, Config, Mode, Paths};
use crate::drainer::Timing;
use crate::facts::{self, Facts};
use crate::posture::attention::Attention;
use crate::posture::{NoticeGate, Posture, Settings as PostureSettings};
use crate::publish::dbus::auth::AuthPolicy;
use crate::publish::dbus::{HostState, SharedQueue};
use crate::publish::journal::JournalWriter;
use crate::publish::notify::{Notifier, Supervisor};
use crate::publish::watchdog::{self, Heartbeats, MonitorState};
use crate::queue::{LockEnv, Queue, Settings};

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
pub(crate) fn main(opts: Options) -> i32 {
    one_malloc_arena();
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
            let message = format!("configuration error: {e}");
            return fatal(&notifier, &message, libc::EINVAL, exit::CONFIG);
        }
    };
    if opts.check_config {
        check_config(&config, &config_path);
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

    #[cfg(feature = "fault-hooks")]
    crate::faults::init(config.runtime_dir.clone());
    let identity = match facts::identity::identity() {
        Ok(i) => i,
        Err(e) => return fatal(&notifier, &e.to_string(), e.errno(), exit::FAILURE),
    };
    if let Err(e) = ensure_runtime_dir(&config.runtime_dir, mode) {
        return fatal(&notifier, &e, libc::EACCES, exit::FAILURE);
    }
    // Until the lock is decided, audit lines go to the runtime directory (L-6).
    let auditor = Arc::new(Auditor::new(
        AuditLog::new(&config.runtime_dir),
        vec![journal],
    ));
    let audit: Arc<dyn AuditSink> = auditor.clone();

    let supervisor = Supervisor::detect();
    let wd = supervisor.watchdog_usec().map(Duration::from_micros);
    let (attention, posture_poke) = attention(&config, opts.no_bus, wd, &auditor);
    let heartbeats = Heartbeats::new(wd);
    let monitor = watchdog::spawn_monitor(
        Arc::clone(&heartbeats),
        supervisor,
        Arc::clone(&notifier),
        Arc::clone(&audit),
    );

    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            let message = format!("cannot start the runtime: {e}");
            return fatal(&notifier, &message, libc::EAGAIN, exit::FAILURE);
        }
    };
    // The one configuration path: start and every reload send the applied configuration
    // here, and each part takes its settings from it at the start of its step.
    let (config_tx, _) = watch::channel(Arc::new(config.clone()));
    let host = Arc::new(HostState::new(
        facts_following(config_tx.subscribe()),
        identity,
        AuthPolicy {
            user_mode: mode == Mode::User,
            agent_uid: nix::unistd::getuid().as_raw(),
        },
    ));
    let mut queue = Queue::new(
        &config.state_dir,
        &config.runtime_dir,
        Settings::from_config(&config),
        Arc::clone(&auditor),
        Arc::new(SystemClock),
    );
    queue.follow(config_tx.subscribe());
    let agent = Agent {
        opts,
        mode,
        paths,
        config_path,
        config: config_tx,
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

/// The attention item and what wakes the posture (G-9). It takes queue notices from the first
/// one on: the gate is in the auditor before anything can raise.
fn attention(
    config: &Config,
    no_bus: bool,
    watchdog: Option<Duration>,
    auditor: &Auditor,
) -> (Arc<Mutex<Attention>>, Arc<tokio::sync::Notify>) {
    let settings = PostureSettings::from_config(config, no_bus, watchdog);
    let attention = Posture::attention_for(&settings, Arc::new(SystemClock));
    let posture_poke = Arc::new(tokio::sync::Notify::new());
    let poke = Arc::clone(&posture_poke);
    auditor.set_gate(Arc::new(NoticeGate::new(
        Arc::clone(&attention),
        Box::new(move || poke.notify_one()),
    )));
    (attention, posture_poke)
}

/// One malloc arena for the whole process. glibc gives every thread that allocates an arena of
/// its own; the agent's threads (the runtimes, their blocking pools, the bus, the facts
/// worker) are mostly idle, and each arena kept its high-water mark resident: 1.2 MiB of RSS
/// with 200 watched runs (BENCHMARKS.md). Contention is no concern at this load.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The main runtime. Blocking work (a posture evaluation, a save) comes once a tick: the
/// pool's thread stays parked between ticks instead of ending after tokio's default 10 s and
/// starting again each minute (idle CPU, BENCHMARKS.md).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_keep_alive(Duration::from_secs(600))
        // Bounded, like every thread of the agent (the unit's TasksMax=).
        .max_blocking_threads(4)
        .build()
}

/// The facts service, its statfs timeout read from the applied configuration at each probe.
fn facts_following(applied: Applied) -> Facts {
    let last = AtomicU64::new(u64::from(applied.borrow().facts.statfs_timeout_ms));
    Facts::following(move || {
        let ms = u64::from(applied.borrow().facts.statfs_timeout_ms);
        if last.swap(ms, Ordering::Relaxed) != ms {
            tracing::debug!(target: "outlive::config", "facts use a statfs timeout of {ms} ms");
        }
        Duration::from_millis(ms)
    })
}

/// `outlived --check-config`: the effective configuration, and where it came from.
fn check_config(config: &Config, path: &Path) {
    match &config.source {
        Some(p) => println!(
            "# effective configuration of outlived, from {}",
            p.display()
        ),
        None => println!(
            "# effective configuration of outlived ({} not found: all defaults)",
            path.display()
        ),
    }
    print!("{}", config.to_toml());
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
    /// The applied configuration (start, reload): the one channel every part reads.
    config: watch::Sender<Arc<Config>>,
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
        Timing::of(&self.config(), self.watchdog)
    }

    /// The configuration applied now.
    fn config(&self) -> Arc<Config> {
        Arc::clone(&self.config.borrow())
    }

    /// A reader of the applied configuration, for a part that follows it.
    fn applied(&self) -> Applied {
        self.config.subscribe()
    }
}
