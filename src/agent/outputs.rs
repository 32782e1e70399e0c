//! Where the agent's state is shown (X-1, X-3, G-8): the posture evaluated off the runtime's
//! thread and published, the `STATUS=` line and `StatusText`, and the bus's change signals.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use crate::audit::AuditSink;
use crate::config::{Applied, Config};
use crate::drainer::tick::Handle;
use crate::posture::attention::Causes;
use crate::posture::{Posture, Published, QueueFacts, Settings as PostureSettings};
use crate::publish::dbus::{Bus, HostState, SharedQueue};
use crate::publish::notify::{BusLine, Notifier, status_line};
use crate::sync::{MutexExt, RwLockExt};

/// Evaluates the posture (G-8) off the runtime's thread (a hung state directory cannot stall
/// the agent), records what it decided, and publishes the result.
pub(super) struct Evaluator {
    pub(super) posture: Arc<Mutex<Posture>>,
    pub(super) out: Arc<Outputs>,
    pub(super) queue: SharedQueue,
    pub(super) audit: Arc<dyn AuditSink>,
    /// The service manager unreachable past its grace (a persistent cause, G-9).
    pub(super) manager_down: Arc<AtomicBool>,
    /// The applied configuration, and the one the posture last took (a new one is taken
    /// before the next evaluation: G-4's boot snapshot, the drop-ins read again).
    pub(super) applied: Applied,
    pub(super) posture_applied: Mutex<Arc<Config>>,
    pub(super) no_bus: bool,
    pub(super) watchdog: Option<Duration>,
}

impl Evaluator {
    pub(super) async fn evaluate(&self) {
        let mut facts = queue_facts(&self.queue);
        facts.causes.manager_unreachable = self.manager_down.load(Ordering::Relaxed);
        let config = Arc::clone(&self.applied.borrow());
        let newer = {
            let mut last = self.posture_applied.locked();
            (!Arc::ptr_eq(&last, &config)).then(|| {
                *last = Arc::clone(&config);
                config
            })
        };
        let settings = newer
            .as_ref()
            .map(|c| PostureSettings::from_config(c, self.no_bus, self.watchdog));
        let (posture, queue) = (Arc::clone(&self.posture), Arc::clone(&self.queue));
        let done = tokio::task::spawn_blocking(move || {
            let mut p = posture.locked();
            let mut events = Vec::new();
            if let (Some(c), Some(s)) = (newer, settings) {
                tracing::debug!(target: "outlive::config", "posture uses {s:?}");
                p.reload((*c).clone(), s);
                events = p.rejected_dropins();
                super::posture::write_boot_snapshot(&queue, &p);
            }
            let o = p.evaluate(&facts);
            (events, o, p.published().clone())
        })
        .await;
        let Ok((reloaded, outcome, published)) = done else {
            tracing::warn!("the posture evaluation panicked; the last posture stays published");
            return;
        };
        for e in reloaded.iter().chain(&outcome.events) {
            self.audit.record(e);
        }
        self.out
            .host
            .degraded
            .store(published.degraded, Ordering::Relaxed);
        *self.out.rows_wire.writing() =
            Arc::new(crate::publish::dbus::guards1::rows_wire(&published.rows));
        *self.out.published.writing() = published;
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

/// Where the agent's state is shown: the `STATUS=` line, `StatusText`, the bus.
pub(super) struct Outputs {
    /// The rows as `GetGuards` sends them (converted once per evaluation).
    pub(super) rows_wire: crate::publish::dbus::guards1::SharedRows,
    pub(super) host: Arc<HostState>,
    pub(super) queue: SharedQueue,
    pub(super) notifier: Arc<Notifier>,
    pub(super) drainer: Handle,
    pub(super) published: Arc<RwLock<Published>>,
    pub(super) bus: OnceLock<Arc<Bus>>,
    pub(super) no_bus: bool,
}

impl Outputs {
    pub(super) fn published(&self) -> Published {
        self.published.reading().clone()
    }

    pub(super) fn line(&self) -> String {
        let p = self.published.reading();
        let bus = match self.bus.get() {
            _ if self.no_bus => BusLine::NoBus,
            Some(b) if !b.is_up() => BusLine::Lost,
            _ => BusLine::Up,
        };
        status_line(
            &self.queue.view().snapshot,
            self.drainer.public().breaker_open_until,
            &p,
            bus,
        )
    }

    /// `STATUS=` (sent only when it changed) and `StatusText`.
    pub(super) fn status(&self) {
        let line = self.line();
        self.notifier.status(&line);
        self.host.set_status_text(&line);
    }

    /// PropertiesChanged for what changed (emitted by the bus thread).
    pub(super) fn sync(&self) {
        if let Some(b) = self.bus.get() {
            b.sync();
        }
    }

    /// Everything changed so far signalled (before READY=1).
    pub(super) async fn flush(&self) {
        if let Some(b) = self.bus.get() {
            b.sync();
            b.flush(Duration::from_secs(2)).await;
        }
    }
}
