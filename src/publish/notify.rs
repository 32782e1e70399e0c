//! Service-manager notifications (SPEC X-3): `READY=1` only when startup is complete, `STATUS=`
//! lines updated on change only, `STOPPING=1`, `RELOADING=1` + `MONOTONIC_USEC`, and
//! `STATUS=` + `ERRNO=` before a fatal exit. A no-op outside systemd (no `NOTIFY_SOCKET`).

use std::sync::Mutex;

use crate::sync::MutexExt;
use sd_notify::NotifyState;

/// What supervises the agent (decides how a wedge is escalated, X-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Supervisor {
    /// systemd (`NOTIFY_SOCKET` set); `watchdog_usec` when `WatchdogSec=` is on.
    Systemd { watchdog_usec: Option<u64> },
    /// launchd (macOS): no watchdog protocol.
    Launchd,
    /// Run by hand.
    None,
}

impl Supervisor {
    /// Detect from the environment. Call once at start.
    pub(crate) fn detect() -> Supervisor {
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            return Supervisor::Systemd {
                watchdog_usec: sd_notify::watchdog_enabled().map(|d| d.as_micros() as u64),
            };
        }
        if cfg!(target_os = "macos")
            || std::env::var_os("XPC_SERVICE_NAME").is_some_and(|v| v != "0")
        {
            return Supervisor::Launchd;
        }
        Supervisor::None
    }

    /// The watchdog period when systemd's watchdog is armed.
    pub(crate) fn watchdog_usec(self) -> Option<u64> {
        match self {
            Supervisor::Systemd { watchdog_usec } => watchdog_usec,
            _ => None,
        }
    }
}

/// Sends notifications; remembers the last status so unchanged lines are not re-sent.
pub(crate) struct Notifier {
    /// `NOTIFY_SOCKET`, read once at start.
    socket: Option<std::ffi::OsString>,
    last_status: Mutex<Option<String>>,
}

impl Notifier {
    /// A notifier for this process (enabled iff `NOTIFY_SOCKET` is set).
    pub(crate) fn from_env() -> Notifier {
        Notifier {
            socket: std::env::var_os("NOTIFY_SOCKET"),
            last_status: Mutex::new(None),
        }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        let Some(path) = &self.socket else {
            return;
        };
        if let Err(e) = send_bounded(path, states) {
            tracing::warn!("cannot notify the service manager: {e}");
        }
    }

    fn swap_status(&self, s: &str) -> bool {
        let mut last = self.last_status.locked();
        if last.as_deref() == Some(s) {
            return false;
        }
        *last = Some(s.to_string());
        true
    }

    /// `STATUS=` + `READY=1`: startup (or a reload) is complete.
    pub(crate) fn ready(&self, status: &str) {
        let line = one_line(status);
        self.swap_status(&line);
        self.send(&[NotifyState::Status(&line), NotifyState::Ready]);
    }

    /// `STATUS=` only when it changed.
    pub(crate) fn status(&self, status: &str) {
        let line = one_line(status);
        if self.swap_status(&line) {
            self.send(&[NotifyState::Status(&line)]);
        }
    }

    /// Clear the status and send `STOPPING=1` (SIGTERM).
    pub(crate) fn stopping(&self) {
        self.swap_status("");
        self.send(&[NotifyState::Status(""), NotifyState::Stopping]);
    }

    /// `RELOADING=1` with `MONOTONIC_USEC` (SIGHUP).
    pub(crate) fn reloading(&self) {
        let usec = crate::clock::monotonic_usec() as i128;
        self.send(&[
            NotifyState::Reloading,
            NotifyState::MonotonicUsec(usec),
            NotifyState::Status("reloading"),
        ]);
    }

    /// `STATUS=` + `ERRNO=` before a fatal exit.
    pub(crate) fn fatal(&self, status: &str, errno: i32) {
        let line = one_line(status);
        self.swap_status(&line);
        self.send(&[
            NotifyState::Status(&line),
            NotifyState::Errno(errno.max(0) as u32),
        ]);
    }

    /// `WATCHDOG=1`.
    pub(crate) fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// `STATUS=` + `WATCHDOG=trigger`: a loop is wedged.
    pub(crate) fn watchdog_trigger(&self, status: &str) {
        let line = one_line(status);
        self.swap_status(&line);
        self.send(&[NotifyState::Status(&line), NotifyState::WatchdogTrigger]);
    }
}

/// A status must be one line; newlines would end the notification field.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The longest a notification may block when the service manager does not read (its queue
/// full): the agent's loops and its watchdog thread must never hang on it.
pub(crate) const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(250);

/// Send `states` to the socket at `path` (a path, or `@name` for an abstract socket on Linux),
/// waiting at most [`SEND_TIMEOUT`].
pub(crate) fn send_bounded(
    path: &std::ffi::OsStr,
    states: &[NotifyState<'_>],
) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
    let sock = UnixDatagram::unbound()?;
    sock.set_write_timeout(Some(SEND_TIMEOUT))?;
    let bytes = path.as_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg.as_bytes(), &addr)?
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            return Err(std::io::Error::other(
                "abstract sockets exist only on Linux",
            ));
        }
    } else {
        sock.send_to(msg.as_bytes(), path)?
    };
    if sent != msg.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "incomplete write",
        ));
    }
    Ok(())
}

/// Where the bus stands, for the status line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BusLine {
    /// `--no-bus`.
    NoBus,
    /// The name is owned (or the bus is still being reached at start).
    Up,
    /// The connection was lost and is being rebuilt.
    Lost,
}

/// The `STATUS=` line, also the `StatusText` property, from what the queue, the drainer
/// and the posture published. `DEGRADED:` iff the attention item is open
/// (`DEGRADED: queue.resume off-runtime-divergent (foreign-host) · 2 waiting`); otherwise the
/// posture, the queue and the lock (`posture 7/9 on · queue: 3 waiting · lock held`), led by
/// `observe-only:` while dry run is on (G-7).
pub(crate) fn status_line(
    queue: &crate::queue::Snapshot,
    breaker_open_until: u64,
    posture: &crate::posture::Published,
    bus: BusLine,
) -> String {
    if posture.degraded {
        let head = posture
            .headline
            .as_deref()
            .unwrap_or("attention needed (`outlivectl status`)");
        return format!("DEGRADED: {head} · {} waiting", queue.waiting);
    }
    let mut parts = Vec::new();
    if posture.on.1 > 0 {
        parts.push(format!("posture {}/{} on", posture.on.0, posture.on.1));
    }
    if queue.enabled {
        parts.push(format!("queue: {} waiting", queue.waiting));
    } else {
        parts.push(format!("queue disabled ({})", queue.disabled_reason));
    }
    if let Some(p) = &queue.pause {
        parts.push(format!("paused ({})", p.kind.as_str()));
    }
    if breaker_open_until > 0 {
        parts.push(format!(
            "breaker open until {}",
            crate::clock::rfc3339_ms(breaker_open_until)
        ));
    }
    if queue.persist_failed.is_some() {
        parts.push("state not written (persist-failed)".into());
    }
    parts.push(
        if queue.lock_held {
            "lock held"
        } else {
            "lock not held"
        }
        .into(),
    );
    match bus {
        BusLine::NoBus => parts.push("no bus".into()),
        BusLine::Lost => parts.push("bus connection lost".into()),
        BusLine::Up => {}
    }
    let line = parts.join(" · ");
    if queue.dry_run {
        format!("observe-only: {line}")
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// X-3 / G-7: what `systemctl status` shows, one row per shape of the line.
    #[test]
    #[expect(
        clippy::too_many_lines,
        reason = "the table: one row per shape of the status line"
    )]
    fn x3_status_line_table() {
        use crate::posture::Published;
        use crate::queue::Snapshot;
        use crate::queue::rules::{Pause, PauseKind};
        let live = Snapshot {
            enabled: true,
            lock_held: true,
            waiting: 3,
            ..Snapshot::default()
        };
        let posture = Published {
            on: (7, 9),
            ..Published::default()
        };
        let degraded = Published {
            degraded: true,
            headline: Some("queue.resume off-runtime-divergent (foreign-host)".into()),
            ..posture.clone()
        };
        let paused = Snapshot {
            pause: Some(Pause {
                kind: PauseKind::Maintenance,
                reason: "disk swap".into(),
                paused_at: 1,
            }),
            ..live.clone()
        };
        let rows: Vec<(&str, Snapshot, u64, Published, BusLine, &str)> = vec![
            (
                "healthy",
                live.clone(),
                0,
                posture.clone(),
                BusLine::Up,
                "posture 7/9 on · queue: 3 waiting · lock held",
            ),
            (
                "dry run leads",
                Snapshot {
                    dry_run: true,
                    ..live.clone()
                },
                0,
                posture.clone(),
                BusLine::Up,
                "observe-only: posture 7/9 on · queue: 3 waiting · lock held",
            ),
            (
                "degraded wins over everything",
                Snapshot {
                    dry_run: true,
                    ..live.clone()
                },
                5,
                degraded.clone(),
                BusLine::Lost,
                "DEGRADED: queue.resume off-runtime-divergent (foreign-host) · 3 waiting",
            ),
            (
                "degraded without a headline",
                live.clone(),
                0,
                Published {
                    headline: None,
                    ..degraded
                },
                BusLine::Up,
                "DEGRADED: attention needed (`outlivectl status`) · 3 waiting",
            ),
            (
                "disabled, lock not held",
                Snapshot {
                    enabled: false,
                    lock_held: false,
                    disabled_reason: "foreign-host".into(),
                    ..live.clone()
                },
                0,
                posture.clone(),
                BusLine::Up,
                "posture 7/9 on · queue disabled (foreign-host) · lock not held",
            ),
            (
                "paused",
                paused,
                0,
                posture.clone(),
                BusLine::Up,
                "posture 7/9 on · queue: 3 waiting · paused (maintenance) · lock held",
            ),
            (
                "breaker open",
                live.clone(),
                1_700_000_000_000,
                posture.clone(),
                BusLine::Up,
                "posture 7/9 on · queue: 3 waiting · breaker open until 2023-11-14T22:13:20.000Z · lock held",
            ),
            (
                "persist failed",
                Snapshot {
                    persist_failed: Some("ENOSPC".into()),
                    ..live.clone()
                },
                0,
                posture.clone(),
                BusLine::Up,
                "posture 7/9 on · queue: 3 waiting · state not written (persist-failed) · lock held",
            ),
            (
                "no bus",
                live.clone(),
                0,
                posture.clone(),
                BusLine::NoBus,
                "posture 7/9 on · queue: 3 waiting · lock held · no bus",
            ),
            (
                "bus lost",
                live.clone(),
                0,
                posture.clone(),
                BusLine::Lost,
                "posture 7/9 on · queue: 3 waiting · lock held · bus connection lost",
            ),
            (
                "no posture yet",
                live,
                0,
                Published::default(),
                BusLine::Up,
                "queue: 3 waiting · lock held",
            ),
        ];
        for (name, q, breaker, p, bus, want) in rows {
            assert_eq!(status_line(&q, breaker, &p, bus), want, "{name}");
        }
    }

    /// A service manager that stops reading never blocks a notification for longer than
    /// SEND_TIMEOUT; what it does read is the sd_notify format.
    #[test]
    fn x3_a_manager_that_stops_reading_never_blocks_the_agent() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notify");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        send_bounded(
            path.as_os_str(),
            &[NotifyState::Ready, NotifyState::Status("up")],
        )
        .unwrap();
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up\n");
        // Nobody reads any more: the queue fills, then each send gives up after the timeout.
        let t = std::time::Instant::now();
        let mut failed = 0;
        for _ in 0..2000 {
            if send_bounded(path.as_os_str(), &[NotifyState::Watchdog]).is_err() {
                failed += 1;
                if failed == 3 {
                    break;
                }
            }
        }
        assert_eq!(failed, 3, "the queue never filled");
        assert!(
            t.elapsed() < SEND_TIMEOUT * 3 + std::time::Duration::from_secs(2),
            "{:?}",
            t.elapsed()
        );
    }
}
