//! Service-manager notifications (SPEC X-3): `READY=1` only when startup is complete, `STATUS=`
//! lines updated on change only, `STOPPING=1`, `RELOADING=1` + `MONOTONIC_USEC`, and
//! `STATUS=` + `ERRNO=` before a fatal exit. A no-op outside systemd (no `NOTIFY_SOCKET`).

use std::sync::Mutex;

use sd_notify::NotifyState;

/// What supervises the agent (decides how a wedge is escalated, X-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Supervisor {
    /// systemd (`NOTIFY_SOCKET` set); `watchdog_usec` when `WatchdogSec=` is on.
    Systemd { watchdog_usec: Option<u64> },
    /// launchd (macOS): no watchdog protocol.
    Launchd,
    /// Run by hand.
    None,
}

impl Supervisor {
    /// Detect from the environment. Call once at start.
    pub fn detect() -> Supervisor {
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
    pub fn watchdog_usec(self) -> Option<u64> {
        match self {
            Supervisor::Systemd { watchdog_usec } => watchdog_usec,
            _ => None,
        }
    }
}

/// Sends notifications; remembers the last status so unchanged lines are not re-sent.
pub struct Notifier {
    /// `NOTIFY_SOCKET`, read once at start.
    socket: Option<std::ffi::OsString>,
    last_status: Mutex<Option<String>>,
}

impl Notifier {
    /// A notifier for this process (enabled iff `NOTIFY_SOCKET` is set).
    pub fn from_env() -> Notifier {
        Notifier {
            socket: std::env::var_os("NOTIFY_SOCKET"),
            last_status: Mutex::new(None),
        }
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        let Some(path) = &self.socket else {
            return;
        };
        if let Err(e) = send_bounded(path, states) {
            tracing::warn!("cannot notify the service manager: {e}");
        }
    }

    /// The status line the service manager last got.
    pub fn current_status(&self) -> Option<String> {
        self.last_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn swap_status(&self, s: &str) -> bool {
        let mut last = self.last_status.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_deref() == Some(s) {
            return false;
        }
        *last = Some(s.to_string());
        true
    }

    /// `STATUS=` + `READY=1`: startup (or a reload) is complete.
    pub fn ready(&self, status: &str) {
        let line = one_line(status);
        self.swap_status(&line);
        self.send(&[NotifyState::Status(&line), NotifyState::Ready]);
    }

    /// `STATUS=` only when it changed.
    pub fn status(&self, status: &str) {
        let line = one_line(status);
        if self.swap_status(&line) {
            self.send(&[NotifyState::Status(&line)]);
        }
    }

    /// Clear the status and send `STOPPING=1` (SIGTERM).
    pub fn stopping(&self) {
        self.swap_status("");
        self.send(&[NotifyState::Status(""), NotifyState::Stopping]);
    }

    /// `RELOADING=1` with `MONOTONIC_USEC` (SIGHUP).
    pub fn reloading(&self) {
        let usec = crate::clock::monotonic_usec() as i128;
        self.send(&[
            NotifyState::Reloading,
            NotifyState::MonotonicUsec(usec),
            NotifyState::Status("reloading"),
        ]);
    }

    /// `STATUS=` + `ERRNO=` before a fatal exit.
    pub fn fatal(&self, status: &str, errno: i32) {
        let line = one_line(status);
        self.swap_status(&line);
        self.send(&[
            NotifyState::Status(&line),
            NotifyState::Errno(errno.max(0) as u32),
        ]);
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// `STATUS=` + `WATCHDOG=trigger`: a loop is wedged.
    pub fn watchdog_trigger(&self, status: &str) {
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
pub const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(250);

/// Send `states` to the socket at `path` (a path, or `@name` for an abstract socket on Linux),
/// waiting at most [`SEND_TIMEOUT`].
pub fn send_bounded(path: &std::ffi::OsStr, states: &[NotifyState<'_>]) -> std::io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
