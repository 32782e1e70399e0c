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
    enabled: bool,
    last_status: Mutex<Option<String>>,
}

impl Notifier {
    /// A notifier for this process (enabled iff `NOTIFY_SOCKET` is set).
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            last_status: Mutex::new(None),
        }
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if self.enabled
            && let Err(e) = sd_notify::notify(states)
        {
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
