//! The agent's life once started (X-1, X-3, L-3, L-7): the lock decided before the bus name,
//! the bus, the first posture before `READY=1`, the loops, signals (SIGHUP reloads through the
//! one configuration path, SIGTERM stops), and an orderly stop.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::outputs::{Evaluator, Outputs};
use super::runner::{DrainOnMain, Runner};
use super::{Agent, BUS_START_PATIENCE, STOP_PATIENCE, exit, fatal, lock_env};
use crate::audit::{Event, EventKind, priority};
use crate::config::{Config, Mode, Paths};
use crate::drainer::{self, Timing};
use crate::posture::{Posture, Published};
use crate::publish::dbus::auth::AuthPolicy;
use crate::publish::dbus::gate::Gate;
use crate::publish::dbus::{
    Agent1, Bus, BusTarget, Guards1, Objects, Publisher, ResumeQueue1, Runs1, StartError,
};
use crate::sync::MutexExt;

/// The signals the agent answers.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

/// What runs until the agent stops.
struct Running {
    shutdown: watch::Sender<bool>,
    drainer: JoinHandle<()>,
    posture: JoinHandle<()>,
    capture: JoinHandle<()>,
    bus: Option<crate::publish::dbus::BusThread>,
}

impl Agent {
    pub(super) async fn run(self) -> i32 {
        let (Ok(term), Ok(int), Ok(hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            return fatal(
                &self.notifier,
                "cannot install signal handlers",
                libc::EINVAL,
                exit::FAILURE,
            );
        };
        // L-3: the lock is decided before the bus name is requested.
        self.queue.lock().evaluate_lock(&lock_env(&self.host), true);
        // The drainer's heartbeat exists before the loop does: the service manager and the
        // facts worker beat it after each bounded call within a tick. Until the loop starts
        // (after the bus name, at most BUS_START_PATIENCE), a busy window covers it.
        let drainer_beat = self
            .heartbeats
            .register(drainer::LOOP_NAME, self.timing().heartbeat_period());
        drainer_beat.busy_for(BUS_START_PATIENCE + Duration::from_secs(10));
        let published = Arc::new(RwLock::new(Published::default()));
        let (capture, watcher, on_end) = crate::capture::watcher::new(
            Arc::clone(&self.queue),
            Arc::clone(&self.audit),
            self.applied(),
            self.mode == Mode::User,
            self.host.identity().boot_id.to_hex(),
        );
        let runner = Arc::new(
            self.runner(Arc::clone(&drainer_beat), Arc::clone(&published), capture)
                .await,
        );
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
            super::posture::write_boot_snapshot(&self.queue, &p);
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        // Capture subscribes to the service manager before the bus name is taken, so that a
        // `Run` is never answered by a capture that is not listening yet (C-1, C-3).
        let capture_task = tokio::spawn(watcher.run(runner.capture.booted, shutdown_rx.clone()));
        let bus = match self
            .start_bus(&runner, &posture, &published, shutdown_rx.clone())
            .await
        {
            Ok(bus) => bus,
            Err(status) => return status,
        };
        if let Some(b) = runner.out.bus.get() {
            let b = Arc::clone(b);
            *on_end.locked() = Some(Arc::new(move |run_id: &str, how: &str| {
                b.run_ended(run_id, how)
            }));
        }
        // the first posture is evaluated before READY=1.
        let evaluator = Arc::new(self.evaluator(&posture, &runner));
        evaluator.evaluate().await;
        // The loop starts now: no busy window any more.
        drainer_beat.not_busy();
        let posture_task = self.posture_loop(&evaluator, shutdown_rx.clone());
        self.ready(&out).await;
        self.announce(bus.is_some());
        let loop_runner = Arc::clone(&runner);
        let drainer_task = tokio::spawn(drainer::run_loop(
            drainer_beat,
            self.applied(),
            self.watchdog,
            shutdown_rx,
            Arc::clone(&runner.poke),
            async move |w| loop_runner.wake(w).await,
        ));
        let mut signals = Signals { term, int, hup };
        self.serve(&mut signals, &evaluator, &out).await;
        self.stop(Running {
            shutdown,
            drainer: drainer_task,
            posture: posture_task,
            capture: capture_task,
            bus,
        })
        .await
    }

    /// Serve the bus on its own thread: the objects, then the name. `Err` is the exit
    /// status of a start that cannot go on (the name taken or denied, the bus unreachable).
    async fn start_bus(
        &self,
        runner: &Arc<Runner>,
        posture: &Mutex<Posture>,
        published: &Arc<RwLock<Published>>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Option<crate::publish::dbus::BusThread>, i32> {
        if self.opts.no_bus {
            return Ok(None);
        }
        let gate = Gate::new(AuthPolicy {
            user_mode: self.mode == Mode::User,
            agent_uid: nix::unistd::getuid().as_raw(),
        });
        let objects = self.objects(runner, posture, published, &gate);
        // The bus dispatches on a thread of its own (publish::dbus::gate); its loop's heartbeat
        // is excused while it waits for an unreachable bus at start.
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
            shutdown,
        };
        let audit = Arc::clone(&self.audit);
        match Bus::spawn(target, objects, audit, gate, BUS_START_PATIENCE, lp).await {
            Ok(t) => {
                beat.not_busy();
                let _ = runner.out.bus.set(Arc::clone(&t.bus));
                // A lost or restored bus is a runtime change: publish.dbus shows the gap.
                let poke = Arc::clone(&self.posture_poke);
                t.bus.set_on_change(Box::new(move || poke.notify_one()));
                Ok(Some(t))
            }
            Err(e) => {
                let (errno, status) = match &e {
                    StartError::NameTaken => (libc::EADDRINUSE, exit::NAME_TAKEN),
                    StartError::NameDenied(_) => (libc::EACCES, exit::NO_PERMISSION),
                    StartError::Unreachable(_) => (libc::ECONNREFUSED, exit::UNAVAILABLE),
                };
                Err(fatal(&self.notifier, &e.to_string(), errno, status))
            }
        }
    }

    /// The objects the bus serves, over the agent's shared state.
    fn objects(
        &self,
        runner: &Arc<Runner>,
        posture: &Mutex<Posture>,
        published: &Arc<RwLock<Published>>,
        gate: &Arc<Gate>,
    ) -> Objects {
        let handle = runner.handle.clone();
        let publisher = Arc::new(Publisher::new(
            Arc::clone(&self.host),
            Arc::clone(&self.queue),
            handle.clone(),
            Arc::clone(published),
        ));
        Objects {
            agent1: Agent1 {
                state: Arc::clone(&self.host),
                queue: Arc::clone(&self.queue),
                publisher: Arc::clone(&publisher),
                gate: Arc::clone(gate),
            },
            queue1: ResumeQueue1 {
                queue: Arc::clone(&self.queue),
                gate: Arc::clone(gate),
                last_tick_at: Arc::clone(&self.last_tick_at),
                publisher: Arc::clone(&publisher),
                drainer: handle,
                drain: Arc::new(DrainOnMain {
                    runner: Arc::clone(runner),
                    rt: tokio::runtime::Handle::current(),
                }),
                capture: runner.capture.clone(),
            },
            runs1: Runs1 {
                queue: Arc::clone(&self.queue),
                gate: Arc::clone(gate),
                publisher: Arc::clone(&publisher),
                capture: runner.capture.clone(),
                boot_id: self.host.identity().boot_id.to_hex(),
                counter: Arc::default(),
                user_mode: self.mode == Mode::User,
            },
            guards1: Guards1 {
                published: Arc::clone(published),
                rows: Arc::clone(&runner.out.rows_wire),
                book: posture.locked().book(),
                attention: Arc::clone(&self.attention),
                audit: Arc::clone(&self.audit),
                poke: Arc::clone(&self.posture_poke),
                gate: Arc::clone(gate),
                publisher: Arc::clone(&publisher),
            },
            publisher,
        }
    }

    fn evaluator(&self, posture: &Arc<Mutex<Posture>>, runner: &Runner) -> Evaluator {
        Evaluator {
            posture: Arc::clone(posture),
            out: Arc::clone(&runner.out),
            queue: Arc::clone(&self.queue),
            audit: Arc::clone(&self.audit),
            manager_down: Arc::clone(&runner.manager_down),
            applied: self.applied(),
            posture_applied: Mutex::new(self.config()),
            no_bus: self.opts.no_bus,
            watchdog: self.watchdog,
        }
    }

    /// The posture loop (G-8): an evaluation on every poke (a tick, a runtime change, a
    /// report) and at least every wake period.
    fn posture_loop(
        &self,
        evaluator: &Arc<Evaluator>,
        mut stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let beat = self
            .heartbeats
            .register("posture", self.timing().heartbeat_period());
        let ev = Arc::clone(evaluator);
        let poke = Arc::clone(&self.posture_poke);
        let applied = self.applied();
        let watchdog = self.watchdog;
        tokio::spawn(async move {
            loop {
                if *stop.borrow() {
                    return;
                }
                let wake = Timing::of(&applied.borrow(), watchdog).wake;
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
    }

    /// `STATUS=` and `StatusText` with everything changed so far signalled, then `READY=1`.
    async fn ready(&self, out: &Outputs) {
        let line = out.line();
        self.host.set_status_text(&line);
        out.flush().await;
        self.notifier.ready(&line);
    }

    /// The start, in the journal; dry run is never silent (G-7: an entry, not a notice).
    fn announce(&self, bus: bool) {
        if self.config().queue.dry_run {
            self.audit.record(
                &Event::new(
                    EventKind::ObserveOnly,
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
        let mode = if self.mode == Mode::User {
            "user"
        } else {
            "system"
        };
        self.audit.record(
            &Event::new(
                EventKind::Started,
                format!(
                    "outlived {} started ({mode} mode, host {}{})",
                    env!("CARGO_PKG_VERSION"),
                    id.hostname,
                    if bus { "" } else { ", no bus" }
                ),
            )
            .priority(priority::INFO)
            .field("version", env!("CARGO_PKG_VERSION"))
            .field("host_id", id.host_id),
        );
    }

    /// Until SIGTERM or SIGINT: SIGHUP reloads (X-3: `RELOADING=1`, apply, the lock
    /// re-evaluated, the posture re-evaluated, then `READY=1`).
    async fn serve(&self, signals: &mut Signals, evaluator: &Evaluator, out: &Outputs) {
        loop {
            tokio::select! {
                _ = signals.term.recv() => return,
                _ = signals.int.recv() => return,
                _ = signals.hup.recv() => {
                    self.reload();
                    evaluator.evaluate().await;
                    self.ready(out).await;
                }
            }
        }
    }

    /// Read the file again and apply it (G-4): one new configuration on the one path; keys a
    /// reload cannot apply keep their value and are named. L-3: a refusal that ticks do not
    /// retry is evaluated again (the queue takes the new settings first).
    fn reload(&self) {
        self.notifier.reloading();
        let paths = Paths::from_env(self.mode);
        let newer = match Config::load(&self.config_path, self.opts.config.is_some(), &paths) {
            Ok(c) => c,
            Err(e) => {
                // The attention notice (`config-unreadable`) comes from the posture, which
                // reads the file at every evaluation (G-4).
                self.audit.record(
                    &Event::new(
                        EventKind::ConfigReloadFailed,
                        format!(
                            "configuration reload failed, keeping the running configuration: {e}"
                        ),
                    )
                    .priority(priority::WARNING)
                    .field("error", &e),
                );
                return;
            }
        };
        let (applied, pending) = self.config().apply_reload(&newer);
        if !pending.is_empty() {
            self.audit.record(
                &Event::new(
                    EventKind::ConfigReloadPending,
                    format!(
                        "reload cannot apply {}; the new value takes effect at the next start",
                        pending.join(", ")
                    ),
                )
                .priority(priority::NOTICE)
                .field("keys", pending.join(",")),
            );
        }
        self.config.send_replace(Arc::new(applied));
        self.queue.lock().evaluate_lock(&lock_env(&self.host), true);
        self.audit.record(
            &Event::new(EventKind::ConfigReloaded, "configuration reloaded")
                .priority(priority::INFO),
        );
    }

    /// SIGTERM: `STOPPING=1`, the current tick finished (bounded), the bus name
    /// released, and the lock released (L-7: the file stays for the next holder).
    async fn stop(&self, r: Running) -> i32 {
        self.notifier.stopping();
        let _ = r.shutdown.send(true);
        if tokio::time::timeout(STOP_PATIENCE, r.drainer)
            .await
            .is_err()
        {
            tracing::warn!(
                "the drainer did not finish its tick within {}s; stopping anyway",
                STOP_PATIENCE.as_secs()
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), r.posture).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), r.capture).await;
        // The bus thread releases the name and ends.
        if let Some(t) = r.bus {
            t.join(Duration::from_secs(3)).await;
        }
        // Counts of repeated refusals still held back go to the log while it is the state's.
        self.audit.close();
        self.queue.lock().release();
        self.audit
            .record(&Event::new(EventKind::Stopped, "outlived stopped").priority(priority::INFO));
        0
    }
}
