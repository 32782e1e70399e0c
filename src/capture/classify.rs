//! How a run ended (SPEC C-3), as a pure function of what the service manager reported for one
//! invocation. `notes/capture-systemd-facts.md` shows why `Result` alone cannot decide: an
//! external SIGTERM of a `Type=exec` run reads `Result=success` like `exit 0`; only the stop job
//! tells an operator's stop from a reap, and `ExecMainCode`/`ExecMainStatus` tell the rest.

use crate::queue::runs::How;

/// `ExecMainCode` (the `si_code` of the main process).
pub const CLD_EXITED: i32 = 1;
pub const CLD_KILLED: i32 = 2;
pub const CLD_DUMPED: i32 = 3;

/// The facts of one ended invocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndFacts {
    /// A job was installed on the unit when it left `active` (C-3 "stop requested").
    pub stop_requested: bool,
    /// The manager's `SystemState` was `stopping` then (for a user manager: it was exiting).
    pub system_stopping: bool,
    /// `Result` (`success`, `signal`, `oom-kill`, …).
    pub result: String,
    /// `ExecMainCode`: 1 exited, 2 killed, 3 dumped (0: never ran).
    pub code: i32,
    /// `ExecMainStatus`: the exit status or the signal number.
    pub status: i32,
    /// Exit statuses that count as success besides 0 (`SuccessExitStatus=`).
    pub success_statuses: Vec<i32>,
}

/// The signals whose default action dumps core (C-3 row 5).
const CORE_SIGNALS: [i32; 10] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGABRT,
    libc::SIGSYS,
    libc::SIGTRAP,
    libc::SIGQUIT,
    libc::SIGXCPU,
    libc::SIGXFSZ,
];

/// Exit statuses of a wrapper whose child died of SIGHUP, SIGINT, SIGKILL or SIGTERM (row 7).
const WRAPPER_KILLED: [i32; 4] = [129, 130, 137, 143];

/// C-3, first match wins. A `Result=watchdog` run is killed by `WatchdogSignal=` (SIGABRT by
/// default), so row 4 comes before row 5.
pub fn classify(f: &EndFacts) -> How {
    if f.stop_requested {
        return if f.system_stopping {
            How::HostShutdown
        } else {
            How::Stopped
        };
    }
    match f.result.as_str() {
        "oom-kill" => return How::OomKill,
        "watchdog" => return How::Watchdog,
        "timeout" => return How::Timeout,
        _ => {}
    }
    match f.code {
        CLD_DUMPED => How::Crashed,
        CLD_KILLED if CORE_SIGNALS.contains(&f.status) => How::Crashed,
        CLD_KILLED => How::Killed,
        CLD_EXITED if WRAPPER_KILLED.contains(&f.status) => How::Killed,
        CLD_EXITED if f.status == 0 || f.success_statuses.contains(&f.status) => How::Finished,
        CLD_EXITED => How::Failed,
        _ => How::Unknown,
    }
}

/// A short account of the facts for messages (`Result=signal, killed by SIGKILL`).
pub fn describe(f: &EndFacts) -> String {
    let how = match f.code {
        CLD_EXITED => format!("exited with status {}", f.status),
        CLD_KILLED => format!("killed by {}", signal_name(f.status)),
        CLD_DUMPED => format!("dumped core on {}", signal_name(f.status)),
        _ => "never ran".into(),
    };
    let mut s = format!("Result={}, {how}", f.result);
    if f.stop_requested {
        s.push_str(if f.system_stopping {
            ", stopped by the host's shutdown"
        } else {
            ", a stop job was installed"
        });
    }
    s
}

/// `SIGKILL` for 9.
pub fn signal_name(n: i32) -> String {
    nix::sys::signal::Signal::try_from(n)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {n}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(stop: bool, stopping: bool, result: &str, code: i32, status: i32) -> EndFacts {
        EndFacts {
            stop_requested: stop,
            system_stopping: stopping,
            result: result.into(),
            code,
            status,
            success_statuses: vec![],
        }
    }

    /// C-3's table over every row of `notes/capture-systemd-facts.md` §1 (what systemd 252
    /// reports for each way a `Type=exec` unit ends).
    #[test]
    fn c3_how_a_run_ended_truth_table() {
        use How::*;
        let rows: &[(&str, EndFacts, How)] = &[
            ("1 exit 0", f(false, false, "success", 1, 0), Finished),
            ("2 exit 3", f(false, false, "exit-code", 1, 3), Failed),
            (
                "3 systemctl stop",
                f(true, false, "success", 2, 15),
                Stopped,
            ),
            (
                "4 stop, TimeoutStopSec",
                f(true, false, "timeout", 2, 9),
                Stopped,
            ),
            (
                "5 stop, trapped exit 143",
                f(true, false, "exit-code", 1, 143),
                Stopped,
            ),
            (
                "6 host shutdown",
                f(true, true, "success", 2, 15),
                HostShutdown,
            ),
            ("7 kill -KILL", f(false, false, "signal", 2, 9), Killed),
            (
                "8 systemctl kill -s KILL",
                f(false, false, "signal", 2, 9),
                Killed,
            ),
            ("9 kill -TERM", f(false, false, "success", 2, 15), Killed),
            ("10 kill -HUP", f(false, false, "success", 2, 1), Killed),
            ("11 kill -INT", f(false, false, "success", 2, 2), Killed),
            (
                "13 kill -TERM, trapped exit 143",
                f(false, false, "exit-code", 1, 143),
                Killed,
            ),
            (
                "14 OOM, hybrid host",
                f(false, false, "signal", 2, 9),
                Killed,
            ),
            (
                "14 OOM, unified host",
                f(false, false, "oom-kill", 2, 9),
                OomKill,
            ),
            (
                "15 child killed, wrapper exits 137",
                f(false, false, "exit-code", 1, 137),
                Killed,
            ),
            (
                "16 WatchdogSec",
                f(false, false, "watchdog", 2, 6),
                Watchdog,
            ),
            (
                "17 RuntimeMaxSec",
                f(false, false, "timeout", 2, 15),
                Timeout,
            ),
            (
                "18 SIGSEGV, no core",
                f(false, false, "signal", 2, 11),
                Crashed,
            ),
            (
                "19 SIGSEGV, core",
                f(false, false, "core-dump", 3, 11),
                Crashed,
            ),
            (
                "20 unknown User=",
                f(false, false, "exit-code", 1, 217),
                Failed,
            ),
            (
                "21 not executable",
                f(false, false, "exit-code", 1, 203),
                Failed,
            ),
            ("SIGABRT", f(false, false, "signal", 2, 6), Crashed),
            ("never ran", f(false, false, "success", 0, 0), Unknown),
        ];
        for (name, facts, want) in rows {
            assert_eq!(classify(facts), *want, "row {name}: {facts:?}");
        }
        let listed = EndFacts {
            success_statuses: vec![42],
            ..f(false, false, "success", 1, 42)
        };
        assert_eq!(classify(&listed), Finished, "SuccessExitStatus=42");
    }

    #[test]
    fn c3_descriptions_name_the_signal() {
        assert_eq!(
            describe(&f(false, false, "signal", 2, 9)),
            "Result=signal, killed by SIGKILL"
        );
        assert!(describe(&f(true, false, "success", 2, 15)).contains("stop job"));
    }
}
