//! The drainer (SPEC §4, §5). This module holds the loop's timing (D-1, D-2 step 1): the first
//! tick right after `READY=1`, then every `drainer.interval_sec`; between ticks the loop wakes
//! every half watchdog period so its heartbeat and the lock's heartbeat (L-1) stay fresh
//! while the queue is idle. What a tick does is the caller's (`agent.rs` wires the queue in).

pub(crate) mod continuation;
pub(crate) mod decide;
pub mod gauge;
pub mod manager;
pub(crate) mod spawn;
pub mod tick;
pub mod validate;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// The drainer loop's heartbeat as the drainer sees it: beaten on every wake and after
/// every bounded call to the service manager or the facts worker within a tick. Implemented by
/// `publish::watchdog::LoopBeat` (the drainer does not import the layer above it).
pub trait Heartbeat: Send + Sync {
    /// Record progress now.
    fn beat(&self);
    /// The period the loop promises to beat within.
    fn set_period(&self, period: Duration);
}

/// The loop's name in heartbeats, `STATUS=wedged: …` and `OUTLIVE_LOOP`.
pub const LOOP_NAME: &str = "drainer";

/// Most time between two idle wakes when no watchdog asks for less.
const MAX_WAKE: Duration = Duration::from_secs(15);

/// When the loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Between ticks (`drainer.interval_sec`).
    pub interval: Duration,
    /// Between idle wakes: half the watchdog period, at most the interval and 15 s.
    pub wake: Duration,
}

impl Timing {
    /// Timing for an interval and an optional watchdog period.
    pub fn new(interval: Duration, watchdog: Option<Duration>) -> Timing {
        let half_wd = watchdog.map(|w| w / 2).unwrap_or(MAX_WAKE);
        let wake = half_wd
            .min(MAX_WAKE)
            .min(interval)
            .max(Duration::from_millis(50));
        Timing { interval, wake }
    }

    /// The timing the applied configuration asks for (`drainer.interval_sec`).
    pub fn of(c: &crate::config::Config, watchdog: Option<Duration>) -> Timing {
        Timing::new(
            Duration::from_secs(u64::from(c.drainer.interval_sec)),
            watchdog,
        )
    }

    /// The heartbeat period the loop promises: it beats at least every `wake`.
    pub fn heartbeat_period(&self) -> Duration {
        self.wake
    }
}

/// What woke the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A scheduled tick (D-1).
    Tick,
    /// An idle wake between ticks: beat and touch, nothing else (D-2 step 1).
    Idle,
}

/// Run the loop until `shutdown` is true. `on_wake` runs for every tick and idle wake; the loop
/// beats its heartbeat before each. It returns how soon something is due (an attempt's grace
/// ending, D-1), and the loop wakes then at the latest; `poke` wakes it at once (a `Drain()`
/// started an attempt). The timing is the applied configuration's; a new configuration (a
/// reload) restarts the schedule from the next wait.
pub async fn run_loop<F>(
    beat: Arc<dyn Heartbeat>,
    mut config: crate::config::Applied,
    watchdog: Option<Duration>,
    mut shutdown: watch::Receiver<bool>,
    poke: Arc<tokio::sync::Notify>,
    mut on_wake: F,
) where
    F: AsyncFnMut(Wake) -> Option<Duration>,
{
    let mut next_tick = Instant::now();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let t = Timing::of(&config.borrow_and_update(), watchdog);
        beat.set_period(t.heartbeat_period());
        let now = Instant::now();
        let kind = if now >= next_tick {
            next_tick = now + t.interval;
            Wake::Tick
        } else {
            Wake::Idle
        };
        beat.beat();
        let due = on_wake(kind).await;
        beat.beat();
        let mut until = next_tick.min(Instant::now() + t.wake);
        if let Some(d) = due {
            until = until.min(Instant::now() + d.max(Duration::from_millis(10)));
        }
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {}
            _ = poke.notified() => {}
            _ = shutdown.changed() => {}
            r = config.changed() => {
                if r.is_ok() {
                    // A new interval restarts the schedule from now.
                    let t = Timing::of(&config.borrow(), watchdog);
                    tracing::debug!(target: "outlive::config", "drainer loop uses {t:?}");
                    next_tick = Instant::now() + t.interval;
                }
            }
        }
    }
}

#[cfg(test)]
mod loop_tests {
    use super::*;

    #[test]
    fn d2_wake_is_half_the_watchdog_within_bounds() {
        let t = Timing::new(Duration::from_secs(60), Some(Duration::from_secs(30)));
        assert_eq!(t.wake, Duration::from_secs(15));
        let t = Timing::new(Duration::from_secs(60), Some(Duration::from_secs(4)));
        assert_eq!(t.wake, Duration::from_secs(2));
        let t = Timing::new(Duration::from_secs(1), Some(Duration::from_secs(30)));
        assert_eq!(
            t.wake,
            Duration::from_secs(1),
            "never longer than the interval"
        );
        let t = Timing::new(Duration::from_secs(60), None);
        assert_eq!(t.wake, Duration::from_secs(15));
    }

    #[tokio::test(start_paused = true)]
    async fn d1_first_tick_at_once_then_every_interval_with_idle_wakes_between() {
        let hb = crate::publish::watchdog::Heartbeats::new(None);
        let beat = hb.register(LOOP_NAME, Duration::from_secs(1));
        let mut c = crate::config::Config::defaults(&crate::config::Paths::from_env(
            crate::config::Mode::System,
        ));
        c.drainer.interval_sec = 10;
        let (_tt, config) = watch::channel(Arc::new(c));
        let (stop_tx, stop) = watch::channel(false);
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = Arc::clone(&seen);
        let start = Instant::now();
        let poke = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(run_loop(
            beat,
            config,
            Some(Duration::from_secs(8)),
            stop,
            poke,
            async move |w| {
                s2.lock().unwrap().push((w, start.elapsed().as_secs()));
                None
            },
        ));
        tokio::time::sleep(Duration::from_secs(25)).await;
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        let got = seen.lock().unwrap().clone();
        use Wake::*;
        assert_eq!(
            got,
            vec![
                (Tick, 0),
                (Idle, 4),
                (Idle, 8),
                (Tick, 10),
                (Idle, 14),
                (Idle, 18),
                (Tick, 20),
                (Idle, 24)
            ]
        );
    }
}
