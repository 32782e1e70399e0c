//! The watchdog fed by progress (SPEC X-4).
//!
//! Each critical loop (drainer, posture evaluator, bus dispatcher) registers a heartbeat and
//! beats it as it makes progress. A loop is stale when now − last beat > period +
//! max(5 s, period / 2), unless it declared a bounded busy window for known-slow work (at most
//! 4 × the watchdog timeout). A dedicated OS thread, independent of the async runtime that the
//! loops run on, sends `WATCHDOG=1` every half watchdog period only while no loop is stale.
//! When one is, it sets `STATUS=wedged: <loop> since <time>`, writes the watchdog alert
//! (field `OUTLIVE_LOOP`) and sends `WATCHDOG=trigger`, so systemd restarts the agent and the
//! core dump shows where it hung. Without systemd's watchdog (launchd, or run by hand) the
//! same monitor exits with status 70 so the supervisor restarts it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::notify::{Notifier, Supervisor};
use crate::audit::{Alert, AuditSink, Event, EventKind};
use crate::clock::{boottime_ms, rfc3339_ms, wall_ms};
use crate::posture::getters::{boot_to_wall, status};
use crate::posture::rows::{Runtime, RuntimeRead};
use crate::sync::MutexExt;

/// Exit status when the monitor ends a wedged process itself (EX_SOFTWARE).
pub(crate) const EXIT_WEDGED: i32 = 70;

/// The slack X-4 grants a loop beyond its period.
pub(crate) fn slack_ms(period_ms: u64) -> u64 {
    (period_ms / 2).max(5_000)
}

/// X-4's staleness rule, as a pure function: exactly at the limit is not stale.
pub(crate) fn is_stale(now_ms: u64, last_beat_ms: u64, period_ms: u64, busy_until_ms: u64) -> bool {
    now_ms > busy_until_ms && now_ms.saturating_sub(last_beat_ms) > period_ms + slack_ms(period_ms)
}

/// One loop's heartbeat.
pub struct LoopBeat {
    name: &'static str,
    period_ms: AtomicU64,
    last_ms: AtomicU64,
    busy_until_ms: AtomicU64,
    max_busy_ms: u64,
}

impl LoopBeat {
    /// The loop's name (as in `STATUS=wedged: <name>` and `OUTLIVE_LOOP`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Record progress now.
    pub fn beat(&self) {
        self.last_ms.store(boottime_ms(), Ordering::Relaxed);
    }

    /// Change the period (configuration reload).
    pub fn set_period(&self, period: Duration) {
        self.period_ms
            .store(period.as_millis() as u64, Ordering::Relaxed);
    }

    /// The current period.
    pub fn period(&self) -> Duration {
        Duration::from_millis(self.period_ms.load(Ordering::Relaxed))
    }

    /// Declare known-slow work for up to `d`, clamped to 4 × the watchdog timeout.
    pub fn busy_for(&self, d: Duration) {
        let ms = (d.as_millis() as u64).min(self.max_busy_ms);
        self.busy_until_ms
            .store(boottime_ms() + ms, Ordering::Relaxed);
    }

    /// End a busy window early.
    pub fn not_busy(&self) {
        self.busy_until_ms.store(0, Ordering::Relaxed);
    }

    /// Boottime of the last beat.
    pub fn last_beat_ms(&self) -> u64 {
        self.last_ms.load(Ordering::Relaxed)
    }

    fn stale_at(&self, now: u64) -> bool {
        is_stale(
            now,
            self.last_ms.load(Ordering::Relaxed),
            self.period_ms.load(Ordering::Relaxed),
            self.busy_until_ms.load(Ordering::Relaxed),
        )
    }
}

impl crate::drainer::Heartbeat for LoopBeat {
    fn beat(&self) {
        LoopBeat::beat(self)
    }
    fn set_period(&self, period: Duration) {
        LoopBeat::set_period(self, period)
    }
}

/// The registry of loop heartbeats.
pub(crate) struct Heartbeats {
    loops: Mutex<Vec<Arc<LoopBeat>>>,
    max_busy_ms: u64,
}

impl Heartbeats {
    /// `watchdog_timeout` bounds busy windows (4 ×); without one, 4 minutes.
    pub(crate) fn new(watchdog_timeout: Option<Duration>) -> Arc<Heartbeats> {
        let max_busy_ms = watchdog_timeout
            .map(|d| 4 * d.as_millis() as u64)
            .unwrap_or(240_000);
        Arc::new(Heartbeats {
            loops: Mutex::new(Vec::new()),
            max_busy_ms,
        })
    }

    /// Register a loop (beaten now). Re-registering a name replaces it.
    pub(crate) fn register(&self, name: &'static str, period: Duration) -> Arc<LoopBeat> {
        let beat = Arc::new(LoopBeat {
            name,
            period_ms: AtomicU64::new(period.as_millis() as u64),
            last_ms: AtomicU64::new(boottime_ms()),
            busy_until_ms: AtomicU64::new(0),
            max_busy_ms: self.max_busy_ms,
        });
        let mut loops = self.loops.locked();
        loops.retain(|l| l.name != name);
        loops.push(Arc::clone(&beat));
        beat
    }

    /// Stop watching a loop (it ended on purpose, e.g. `--no-bus`).
    #[cfg(test)]
    pub(crate) fn unregister(&self, name: &str) {
        self.loops.locked().retain(|l| l.name != name);
    }

    /// The stale loop that has been silent longest, with its last beat.
    pub(crate) fn first_stale(&self, now_ms: u64) -> Option<(&'static str, u64)> {
        let loops = self.loops.locked();
        loops
            .iter()
            .filter(|l| l.stale_at(now_ms))
            .map(|l| (l.name, l.last_beat_ms()))
            .min_by_key(|&(_, last)| last)
    }

    /// The registered loop names.
    #[cfg(test)]
    pub(crate) fn names(&self) -> Vec<&'static str> {
        self.loops.locked().iter().map(|l| l.name).collect()
    }
}

/// What the monitor has done, for the posture (`watchdog` guard).
#[derive(Default)]
pub(crate) struct MonitorState {
    /// Boottime of the last check that found every loop live (the feed, under systemd).
    pub last_ok_ms: AtomicU64,
    /// Whether `WATCHDOG=1` is being sent (systemd watchdog armed).
    pub feeding: AtomicBool,
    /// Whether the monitor thread runs.
    pub running: AtomicBool,
    /// The loop found wedged, if any.
    pub wedged: Mutex<Option<String>>,
}

/// Start the monitor thread.
pub(crate) fn spawn_monitor(
    hb: Arc<Heartbeats>,
    supervisor: Supervisor,
    notifier: Arc<Notifier>,
    audit: Arc<dyn AuditSink>,
) -> Arc<MonitorState> {
    let state = Arc::new(MonitorState::default());
    let st = Arc::clone(&state);
    let wd = supervisor.watchdog_usec().map(Duration::from_micros);
    // Half the watchdog period; 1 s when there is no watchdog (G-1 `watchdog` cadence).
    let interval = wd
        .map(|d| d / 2)
        .unwrap_or(Duration::from_secs(1))
        .max(Duration::from_millis(10));
    st.feeding.store(wd.is_some(), Ordering::Relaxed);
    st.running.store(true, Ordering::Relaxed);
    let spawned = std::thread::Builder::new()
        .name("outlive-watchdog".into())
        .spawn(move || {
            loop {
                std::thread::sleep(interval);
                let now = boottime_ms();
                match hb.first_stale(now) {
                    None => {
                        if wd.is_some() {
                            notifier.watchdog();
                        }
                        st.last_ok_ms.store(now, Ordering::Relaxed);
                    }
                    Some((name, last)) => {
                        wedged(
                            name,
                            last,
                            now,
                            supervisor,
                            wd,
                            &notifier,
                            audit.as_ref(),
                            &st,
                        );
                        return;
                    }
                }
            }
        });
    if spawned.is_err() {
        state.running.store(false, Ordering::Relaxed);
    }
    state
}

#[expect(
    clippy::too_many_arguments,
    reason = "what the wedge report needs, passed down from the monitor's one loop"
)]
fn wedged(
    name: &'static str,
    last_beat: u64,
    now: u64,
    supervisor: Supervisor,
    wd: Option<Duration>,
    notifier: &Notifier,
    audit: &dyn AuditSink,
    st: &MonitorState,
) {
    let since_wall = wall_ms().saturating_sub(now.saturating_sub(last_beat));
    let since = rfc3339_ms(since_wall);
    *st.wedged.locked() = Some(name.to_string());
    st.running.store(false, Ordering::Relaxed);
    let restart_by = match supervisor {
        Supervisor::Systemd { .. } => "asking systemd to restart outlived (WATCHDOG=trigger)",
        Supervisor::Launchd => "exiting with status 70 so that launchd restarts outlived",
        Supervisor::None => "exiting with status 70",
    };
    audit.record(
        &Event::new(
            EventKind::WatchdogTrigger,
            format!("the {name} loop has made no progress since {since}; {restart_by}"),
        )
        .alert(Alert::WatchdogTrigger)
        .field("loop", name)
        .field("since", &since),
    );
    let status = format!("wedged: {name} since {since}");
    match supervisor {
        Supervisor::Systemd { .. } => {
            notifier.watchdog_trigger(&status);
            // systemd acts on the trigger (SIGABRT, then a restart). Should it not, end the
            // process ourselves rather than linger wedged; Restart=on-failure brings it back.
            std::thread::sleep(
                wd.unwrap_or(Duration::from_secs(10))
                    .max(Duration::from_secs(10)),
            );
            std::process::exit(EXIT_WEDGED);
        }
        Supervisor::Launchd | Supervisor::None => {
            eprintln!("outlived: {status}; exiting with status {EXIT_WEDGED}");
            std::process::exit(EXIT_WEDGED);
        }
    }
}

/// The `watchdog` guard (G-1): under systemd, on while the watchdog is armed and fed; under
/// systemd without `WatchdogSec=` off (nothing restarts a wedged agent); elsewhere the monitor
/// runs with no one to confirm it (verdict unknown: `on-blind`).
pub(crate) fn guard_read(monitor: &MonitorState, supervisor: Supervisor) -> RuntimeRead {
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
        Supervisor::Systemd {
            watchdog_usec: None,
        } => status(false),
        Supervisor::Launchd | Supervisor::None => fed(running, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x4_staleness_boundary() {
        // period 60 s: slack 30 s; stale strictly after 90 s.
        assert!(!is_stale(190_000, 100_000, 60_000, 0));
        assert!(is_stale(190_001, 100_000, 60_000, 0));
        // period 1 s: slack is the 5 s floor.
        assert_eq!(slack_ms(1_000), 5_000);
        assert!(!is_stale(6_000, 0, 1_000, 0));
        assert!(is_stale(6_001, 0, 1_000, 0));
    }

    #[test]
    fn x4_busy_window_suspends_staleness_until_it_ends() {
        assert!(!is_stale(500_000, 0, 1_000, 500_000));
        assert!(is_stale(500_001, 0, 1_000, 500_000));
    }

    #[test]
    fn x4_busy_window_is_bounded_by_four_watchdog_periods() {
        let hb = Heartbeats::new(Some(Duration::from_secs(30)));
        let l = hb.register("drainer", Duration::from_secs(15));
        let before = boottime_ms();
        l.busy_for(Duration::from_secs(3600));
        let until = l.busy_until_ms.load(Ordering::Relaxed);
        assert!(
            until <= boottime_ms() + 120_000 && until >= before + 119_000,
            "{until}"
        );
    }

    #[test]
    fn x4_first_stale_names_the_silent_loop() {
        let hb = Heartbeats::new(None);
        let a = hb.register("drainer", Duration::from_secs(1));
        let b = hb.register("bus", Duration::from_secs(1));
        let now = boottime_ms();
        assert_eq!(hb.first_stale(now), None);
        a.last_ms
            .store(now.saturating_sub(10_000), Ordering::Relaxed);
        assert_eq!(hb.first_stale(now).map(|s| s.0), Some("drainer"));
        b.last_ms
            .store(now.saturating_sub(20_000), Ordering::Relaxed);
        assert_eq!(hb.first_stale(now).map(|s| s.0), Some("bus"));
        hb.unregister("bus");
        assert_eq!(hb.first_stale(now).map(|s| s.0), Some("drainer"));
        assert_eq!(hb.names(), vec!["drainer"]);
    }
}
