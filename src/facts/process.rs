//! Process liveness and start time (SPEC H-1) and the "same process" test (H-2).
//!
//! A pid alone is not a process: pids are recycled. A recorded process is the tuple
//! (boot id, pid namespace, pid, start time). `kill(pid, 0)` failing with EPERM means the pid
//! exists (it belongs to another user); a zombie is dead; a pid whose start time cannot be read
//! (hidepid) counts as alive, because alive is the side that refuses to take anything over.

use std::fmt;

use super::identity::Id128;

/// What a probe of one pid found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// No such process, or a zombie, or a pid that is never probed (≤ 0).
    Dead,
    /// The pid exists and is not a zombie; its start time when readable.
    Alive { start_time: Option<u64> },
}

/// Parse `/proc/<pid>/stat`: the state letter (field 3) and the start time (field 22, clock
/// ticks since boot). The command name (field 2) may contain spaces and parentheses, so the
/// fields are counted after the last `)`.
pub fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state (field 3), field 22 is 19 further on.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// The effects a liveness decision needs; the real one reads the kernel, tests count calls.
pub trait ProcessProber {
    /// Probe one pid.
    fn probe(&self, pid: i64) -> Liveness;
}

/// Probes the running kernel.
#[derive(Debug, Default, Clone, Copy)]
pub struct KernelProber;

impl ProcessProber for KernelProber {
    fn probe(&self, pid: i64) -> Liveness {
        probe(pid)
    }
}

/// Probe a pid on this kernel.
pub fn probe(pid: i64) -> Liveness {
    if pid <= 0 || pid > i32::MAX as i64 {
        return Liveness::Dead;
    }
    let exists = match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    };
    if !exists {
        return Liveness::Dead;
    }
    match sys::stat(pid) {
        // Z: zombie, X: dead (being reaped). Both are gone for our purposes.
        Some((state, _)) if state == 'Z' || state == 'X' => Liveness::Dead,
        Some((_, start)) => Liveness::Alive {
            start_time: Some(start),
        },
        None => Liveness::Alive { start_time: None },
    }
}

/// Our own start time (for the lock record).
pub fn own_start_time() -> Option<u64> {
    sys::stat(std::process::id() as i64).map(|(_, s)| s)
}

#[cfg(target_os = "linux")]
mod sys {
    pub(super) fn stat(pid: i64) -> Option<(char, u64)> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        super::parse_stat(&s)
    }
}

#[cfg(target_os = "macos")]
mod sys {
    pub fn stat(pid: i64) -> Option<(char, u64)> {
        crate::facts::macos::proc_stat(pid)
    }
}

/// A process as recorded by someone else (a lock holder, a spawned run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedProcess {
    pub pid: i64,
    pub start_time: u64,
    pub boot_id: Option<Id128>,
    pub pid_ns: Option<u64>,
}

/// What H-2 concluded, with the reason in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SameProcess {
    Alive(&'static str),
    Dead(&'static str),
    /// Cannot tell (another pid namespace): treated as alive by every caller.
    CannotTell(&'static str),
}

impl SameProcess {
    /// Whether the decision must treat the process as alive (fail-closed).
    pub fn counts_as_alive(&self) -> bool {
        !matches!(self, SameProcess::Dead(_))
    }

    /// The reason in words.
    pub fn reason(&self) -> &'static str {
        match self {
            SameProcess::Alive(r) | SameProcess::Dead(r) | SameProcess::CannotTell(r) => r,
        }
    }
}

impl fmt::Display for SameProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self {
            SameProcess::Alive(_) => "alive",
            SameProcess::Dead(_) => "dead",
            SameProcess::CannotTell(_) => "cannot tell (treated as alive)",
        };
        write!(f, "{word}: {}", self.reason())
    }
}

/// H-2: is the recorded process still running? A different boot id means dead without probing;
/// a different or unknown pid namespace means "cannot tell"; a different start time means the
/// pid was recycled.
pub fn same_process(
    rec: &RecordedProcess,
    our_boot: &Id128,
    our_pid_ns: Option<u64>,
    prober: &dyn ProcessProber,
) -> SameProcess {
    match rec.boot_id {
        Some(b) if b != *our_boot => return SameProcess::Dead("recorded on another boot"),
        None => return SameProcess::CannotTell("the record has no boot id"),
        Some(_) => {}
    }
    if rec.pid_ns != our_pid_ns {
        return SameProcess::CannotTell("recorded in another pid namespace");
    }
    if rec.pid <= 0 {
        return SameProcess::Dead("the record holds no valid pid");
    }
    match prober.probe(rec.pid) {
        Liveness::Dead => SameProcess::Dead("no such process"),
        Liveness::Alive { start_time: None } => {
            SameProcess::Alive("the pid exists and its start time is hidden")
        }
        Liveness::Alive {
            start_time: Some(s),
        } if s == rec.start_time => SameProcess::Alive("pid and start time match"),
        Liveness::Alive { .. } => SameProcess::Dead("the pid was recycled (start time differs)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::Cell;

    const STAT: &str = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";

    #[test]
    fn h1_stat_parses_after_last_paren() {
        assert_eq!(parse_stat(STAT), Some(('S', 987654)));
        assert_eq!(parse_stat("1 (x) Z 0 0"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    proptest! {
        #[test]
        fn h1_stat_parse_survives_any_comm(comm in "[ -~]{0,40}", start in 0u64..u64::MAX) {
            let line = format!("42 ({comm}) R 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0");
            prop_assert_eq!(parse_stat(&line), Some(('R', start)));
        }
    }

    struct Fixed(Liveness, Cell<u32>);
    impl ProcessProber for Fixed {
        fn probe(&self, _pid: i64) -> Liveness {
            self.1.set(self.1.get() + 1);
            self.0
        }
    }

    fn boot(n: u8) -> Id128 {
        Id128([n; 16])
    }

    fn rec(pid: i64, start: u64, b: u8, ns: Option<u64>) -> RecordedProcess {
        RecordedProcess {
            pid,
            start_time: start,
            boot_id: Some(boot(b)),
            pid_ns: ns,
        }
    }

    #[test]
    fn h2_truth_table() {
        let alive = |s| Fixed(Liveness::Alive { start_time: s }, Cell::new(0));
        // (record, prober, expected alive?, probe expected?)
        let cases: Vec<(RecordedProcess, Fixed, bool, bool, &str)> = vec![
            (
                rec(10, 5, 1, Some(7)),
                alive(Some(5)),
                true,
                true,
                "same pid and start",
            ),
            (
                rec(10, 5, 1, Some(7)),
                alive(Some(6)),
                false,
                true,
                "recycled",
            ),
            (
                rec(10, 5, 1, Some(7)),
                alive(None),
                true,
                true,
                "hidden start time",
            ),
            (
                rec(10, 5, 1, Some(7)),
                Fixed(Liveness::Dead, Cell::new(0)),
                false,
                true,
                "gone",
            ),
            (
                rec(10, 5, 2, Some(7)),
                alive(Some(5)),
                false,
                false,
                "other boot: never probed",
            ),
            (
                rec(10, 5, 1, Some(8)),
                Fixed(Liveness::Dead, Cell::new(0)),
                true,
                false,
                "other ns",
            ),
            (
                rec(0, 5, 1, Some(7)),
                alive(Some(5)),
                false,
                false,
                "pid 0 never probed",
            ),
            (
                rec(-3, 5, 1, Some(7)),
                alive(Some(5)),
                false,
                false,
                "negative pid never probed",
            ),
        ];
        for (r, p, want_alive, want_probe, what) in cases {
            let got = same_process(&r, &boot(1), Some(7), &p);
            assert_eq!(got.counts_as_alive(), want_alive, "{what}: {got}");
            assert_eq!(p.1.get() > 0, want_probe, "{what}: probe count");
        }
    }

    #[test]
    fn h1_never_probes_nonpositive_pids() {
        assert_eq!(probe(0), Liveness::Dead);
        assert_eq!(probe(-1), Liveness::Dead);
        assert_eq!(probe(i64::MAX), Liveness::Dead);
    }

    #[test]
    fn h1_own_process_is_alive_with_start_time() {
        let me = std::process::id() as i64;
        let start = own_start_time().expect("own start time");
        assert_eq!(
            probe(me),
            Liveness::Alive {
                start_time: Some(start)
            }
        );
    }
}
