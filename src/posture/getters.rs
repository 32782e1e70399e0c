//! The runtime reads of the built-in guards that live in the queue and the drainer (G-1, G-3):
//! each says whether its guard is genuinely on, from the component's own state. The guards of
//! the publication layer read themselves next to what they read (`publish::watchdog`,
//! `publish::journal`, `publish::metrics`); the agent registers them all, unconditionally.

use std::path::Path;

use super::rows::{REASON_CODES, Runtime, RuntimeRead};
use crate::config::{AutoHeal, Config};
use crate::drainer::manager::Systemd;
use crate::drainer::tick::Handle;
use crate::facts::{Facts, FsClass};
use crate::queue::SharedQueue;

/// A plain on or off.
pub(crate) fn status(enabled: bool) -> RuntimeRead {
    RuntimeRead::Status(Runtime {
        enabled,
        ..Runtime::default()
    })
}

/// Off, for a reason of the closed vocabulary (G-6).
pub(crate) fn off_because(reason: &str) -> RuntimeRead {
    RuntimeRead::Status(Runtime {
        enabled: false,
        reason_code: Some(reason.to_string()),
        ..Runtime::default()
    })
}

/// A boottime instant as wall ms (for display).
pub(crate) fn boot_to_wall(boot: u64) -> u64 {
    crate::clock::wall_ms().saturating_sub(crate::clock::boottime_ms().saturating_sub(boot))
}

/// How long the service manager may be unreachable before `queue.resume` reads
/// `off-runtime-divergent` (`manager-unreachable`): max(2 × `drainer.interval_sec`, 30 s)
/// (§12 D-6).
pub(crate) fn manager_grace_ms(c: &Config) -> u64 {
    (2 * c.drainer.interval_sec as u64 * 1000).max(30_000)
}

/// What `queue.resume` reads of the queue and the drainer.
pub(crate) struct QueueResume {
    pub queue: SharedQueue,
    pub drainer: Handle,
    /// `--user` without lingering: revived runs would stop at logout.
    pub no_linger: bool,
    /// The service manager's connection, when systemd runs here.
    pub systemd: Option<Systemd>,
}

impl QueueResume {
    /// `queue.resume`: on while the lock is held, the state is written, the service manager
    /// answers and the drainer ticks (its last tick is the row's).
    pub(crate) fn read(&self, applied: &Config) -> RuntimeRead {
        let s = self.queue.lock().snapshot();
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
        if self.no_linger {
            return off_because("no-linger");
        }
        let grace = manager_grace_ms(applied);
        if self
            .systemd
            .as_ref()
            .and_then(Systemd::down_for_ms)
            .is_some_and(|d| d > grace)
        {
            return off_because("manager-unreachable");
        }
        let last = self.drainer.public().last_tick_boot;
        RuntimeRead::Status(Runtime {
            enabled: true,
            dry_run: Some(s.dry_run),
            last_tick_boot: last,
            last_tick_wall: last.map(boot_to_wall),
            ..Runtime::default()
        })
    }
}

/// `capture.watch` (C-9): on while subscribed to the service manager and every record has
/// been reconciled since; `manager-unreachable` once the subscription has been gone longer
/// than [`manager_grace_ms`]; without systemd, on and blind (C-10).
pub(crate) fn capture_watch(
    h: &crate::capture::watcher::Health,
    booted: bool,
    applied: &Config,
) -> RuntimeRead {
    if !booted {
        return RuntimeRead::Status(Runtime {
            enabled: true,
            verdict_unknown: true,
            ..Runtime::default()
        });
    }
    let down_for = h
        .down_since_ms
        .map(|t| crate::clock::boottime_ms().saturating_sub(t));
    if down_for.is_some_and(|d| d > manager_grace_ms(applied)) {
        return off_because("manager-unreachable");
    }
    // Subscribed (or within the grace of a gap): on once every record has been reconciled.
    RuntimeRead::Status(Runtime {
        enabled: true,
        verdict_unknown: !(h.subscribed && h.reconciled),
        ..Runtime::default()
    })
}

/// `queue.lock.auto_heal`: on unless off, dry run while it only observes (L-4 row 11).
pub(crate) fn auto_heal(queue: &SharedQueue) -> RuntimeRead {
    let a = queue.lock().settings().auto_heal;
    RuntimeRead::Status(Runtime {
        enabled: a != AutoHeal::Off,
        dry_run: Some(a == AutoHeal::Observe),
        ..Runtime::default()
    })
}

/// `state.host_local`: the state directory classified on its own, outside the lock decision
/// (H-4: `local-volatile` is host-local but not durable).
pub(crate) fn state_host_local(facts: &Facts, dir: &Path) -> RuntimeRead {
    match facts.classify_path(dir) {
        Ok(c) => match c.class {
            FsClass::LocalPersistent => status(true),
            FsClass::LocalVolatile => off_because("state-volatile"),
            _ => off_because("state-not-host-local"),
        },
        Err(e) => RuntimeRead::Errored(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::watcher::Health;

    fn config() -> Config {
        Config::defaults(&crate::config::Paths::for_mode(
            crate::config::Mode::System,
            0,
            &|_| None,
        ))
    }

    fn read(h: &Health, booted: bool) -> Runtime {
        match capture_watch(h, booted, &config()) {
            RuntimeRead::Status(r) => r,
            other => panic!("{other:?}"),
        }
    }

    /// C-9: `capture.watch` is confirmed only while subscribed with every record reconciled,
    /// reads `manager-unreachable` once the subscription has been gone past max(2 × interval,
    /// 30 s) (120 s with the default interval), and is blind without systemd.
    #[test]
    fn c9_capture_watch_reads_the_subscription() {
        let now = crate::clock::boottime_ms();
        let live = Health {
            subscribed: true,
            reconciled: true,
            ..Health::default()
        };
        let r = read(&live, true);
        assert!(r.enabled && !r.verdict_unknown, "{r:?}");
        let catching_up = Health {
            reconciled: false,
            ..live.clone()
        };
        assert!(read(&catching_up, true).verdict_unknown);
        let short_gap = Health {
            subscribed: false,
            reconciled: false,
            down_since_ms: Some(now.saturating_sub(5_000)),
            ..Health::default()
        };
        let r = read(&short_gap, true);
        assert!(r.enabled && r.verdict_unknown, "within the grace: {r:?}");
        let long_gap = Health {
            down_since_ms: Some(now.saturating_sub(121_000)),
            ..short_gap
        };
        let r = read(&long_gap, true);
        assert!(!r.enabled, "{r:?}");
        assert_eq!(r.reason_code.as_deref(), Some("manager-unreachable"));
        let r = read(&Health::default(), false);
        assert!(
            r.enabled && r.verdict_unknown,
            "no systemd: on, blind: {r:?}"
        );
    }
}
