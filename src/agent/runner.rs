//! The drainer as the agent runs it (D-1, D-2): what one wake of its loop or a `Drain()` does
//! around the tick itself (the lock's heartbeat, housekeeping, the service manager's sign of
//! life), and what follows a tick (the metrics textfile, X-5; a posture evaluation, G-8).

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use super::outputs::Outputs;
use super::{Agent, lock_env};
use crate::audit::{Alert, AuditSink, Event, EventKind, priority};
use crate::capture::watcher::Capture;
use crate::clock::SystemClock;
use crate::config::{Applied, Mode};
use crate::drainer::Wake;
use crate::drainer::gauge::HostGauge;
use crate::drainer::manager::Systemd;
use crate::drainer::tick::{Drainer, Handle, Report, Settings as DrainerSettings};
use crate::drainer::validate::WorkerPaths;
use crate::posture::Published;
use crate::posture::getters::{boot_to_wall, manager_grace_ms};
use crate::publish::dbus::queue1::DrainService;
use crate::publish::dbus::{HostState, SharedQueue};
use crate::publish::metrics;
use crate::publish::watchdog;

impl Agent {
    /// The drainer and what runs it. The service manager is systemd when it runs here (the
    /// user's with `--user`); without it exec targets are spawned detached and unit targets
    /// cannot be revived.
    pub(super) async fn runner(
        &self,
        beat: Arc<watchdog::LoopBeat>,
        published: Arc<RwLock<Published>>,
        capture: Capture,
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
                    EventKind::NoLinger,
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
            DrainerSettings::from_config(&self.config(), user_mode),
            manager,
            WorkerPaths {
                facts: self.host.facts.clone(),
                beat: Some(beat),
            },
            Box::new(HostGauge),
            Arc::new(SystemClock),
            Arc::clone(&self.audit),
            &self.config().runtime_dir,
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
            applied: self.applied(),
            user_mode,
            metrics: Arc::new(metrics::Writes::default()),
            audit: Arc::clone(&self.audit),
            no_linger,
            systemd,
            manager_down: Arc::default(),
            capture,
        }
    }
}

/// The drainer as the agent runs it: systemd over D-Bus (or a detached spawn), path checks on
/// the facts worker, the kernel's gauges.
type AgentDrainer = Drainer<Systemd, WorkerPaths>;

/// What one wake of the drainer loop, or a `Drain()`, does (D-1, D-2). The drainer sits behind
/// an async mutex: the loop waits for it, a `Drain()` that finds it taken is `Busy`.
pub(super) struct Runner {
    pub(super) host: Arc<HostState>,
    queue: SharedQueue,
    pub(super) drainer: tokio::sync::Mutex<AgentDrainer>,
    pub(super) handle: Handle,
    pub(super) out: Arc<Outputs>,
    last_tick_at: Arc<AtomicU64>,
    /// Wakes the loop (a `Drain()` started an attempt whose grace the loop must time).
    pub(super) poke: Arc<tokio::sync::Notify>,
    /// Asks the posture for an evaluation (every tick, G-8).
    posture_poke: Arc<tokio::sync::Notify>,
    /// The applied configuration: the drainer takes its settings from it at every wake.
    applied: Applied,
    user_mode: bool,
    pub(super) metrics: Arc<metrics::Writes>,
    audit: Arc<dyn AuditSink>,
    /// `--user` without lingering (the queue's row reads `no-linger`).
    pub(super) no_linger: bool,
    /// The service manager's connection (a clone of the drainer's), when systemd runs here.
    pub(super) systemd: Option<Systemd>,
    /// Whether the manager has been unreachable past the threshold (a persistent cause, G-9).
    pub(super) manager_down: Arc<AtomicBool>,
    /// Capture (§11): watched runs.
    pub(super) capture: Capture,
}

impl Runner {
    /// The drainer's settings from the configuration applied now.
    fn settings(&self) -> DrainerSettings {
        DrainerSettings::from_config(&self.applied.borrow(), self.user_mode)
    }

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
        let grace = manager_grace_ms(&self.applied.borrow());
        let down = m.down_for_ms();
        let over = down.is_some_and(|d| d > grace);
        if over == self.manager_down.swap(over, Ordering::Relaxed) {
            return;
        }
        if over {
            self.audit.record(
                &Event::new(
                    EventKind::ManagerUnreachable,
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
                    EventKind::ManagerReachable,
                    "systemd answers over D-Bus again: revival resumes",
                )
                .priority(priority::NOTICE),
            );
        }
        self.posture_poke.notify_one();
    }

    /// One wake of the loop; returns when the next attempt's grace ends.
    pub(super) async fn wake(&self, w: Wake) -> Option<Duration> {
        let due = {
            let mut d = self.drainer.lock().await;
            #[cfg(feature = "fault-hooks")]
            if crate::faults::wedged(crate::drainer::LOOP_NAME) {
                // A tick that awaits something that never completes, holding the drainer:
                // exactly the wedge X-4 exists to catch (and a `Drain()` meanwhile is `Busy`).
                tracing::warn!("fault hook: wedging the {} loop", crate::drainer::LOOP_NAME);
                std::future::pending::<()>().await;
            }
            take(&mut d, self.settings());
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
            let c = self.applied.borrow();
            (c.metrics_textfile.clone(), c.runtime_dir.clone())
        };
        let Some(path) = path else {
            return;
        };
        let (entries, paused) = {
            let q = self.queue.lock();
            (q.counted_entries(), q.state().pause.is_some())
        };
        let d = self.handle.public();
        let last_tick_wall = d.last_tick_boot.map(boot_to_wall);
        let host_id = self.host.identity().host_id.to_string();
        let view = self.queue.view();
        let published = self.out.published();
        let text = metrics::render(&metrics::Snapshot {
            rows: &published.rows,
            entries: &entries,
            paused,
            queue_enabled: view.snapshot.enabled,
            disabled_reason: &view.snapshot.disabled_reason,
            degraded: published.degraded,
            breaker_open: d.breaker_open_until > 0,
            revivals_total: d.revivals,
            now_wall: crate::clock::wall_ms(),
            last_tick_wall,
            version: env!("CARGO_PKG_VERSION"),
            host_id: &host_id,
        });
        if let Some(e) = self.metrics.publish(&path, &runtime_dir, &text) {
            self.audit.record(&e);
        }
    }
}

impl Runner {
    /// A tick now (`Drain()`, D-1): `None` while a tick is running (`Busy`).
    pub(super) async fn drain(&self) -> Option<Report> {
        let mut d = self.drainer.try_lock().ok()?;
        take(&mut d, self.settings());
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
pub(super) struct DrainOnMain {
    pub(super) runner: Arc<Runner>,
    pub(super) rt: tokio::runtime::Handle,
}

impl DrainService for DrainOnMain {
    fn drain(&self) -> Pin<Box<dyn Future<Output = Option<Report>> + Send + '_>> {
        let runner = Arc::clone(&self.runner);
        let task = self.rt.spawn(async move { runner.drain().await });
        Box::pin(async move { task.await.ok().flatten() })
    }
}

/// The drainer's settings at the start of its step (logged at debug when they change: what
/// the drainer uses).
fn take(d: &mut AgentDrainer, s: DrainerSettings) {
    if d.settings != s {
        tracing::debug!(target: "outlive::config", "drainer uses {s:?}");
        d.settings = s;
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
