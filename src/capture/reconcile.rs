//! What a record says after a gap (SPEC C-3 "agent absent", C-4): at start, on resubscribing
//! after a bus gap, and when the lock is held again, every active record is compared with
//! what the service manager holds now, as a pure function of the record, the unit's state and
//! the current boot.
//!
//! Under `RemainAfterExit=yes` every end but a stop leaves a run's unit loaded with its
//! `InvocationID`, so rows 3–8 give the live result. A unit that is unloaded, or ended under
//! another invocation, reads `unknown` (an operator's stop while the agent was away looks like
//! that); for an existing unit, an end with `Result=success` and `ExecMainCode=killed` cannot
//! be told from a stop and reads `unknown` too.

use super::classify::{CLD_KILLED, EndFacts, classify};
use crate::queue::entry::Target;
use crate::queue::runs::{How, RunRecord, RunState};

/// A unit's state as read with `GetUnit` + `GetAll` (None: not loaded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitNow {
    pub active_state: String,
    pub sub_state: String,
    pub invocation_id: String,
    pub job: u32,
    pub result: String,
    pub code: i32,
    pub status: i32,
    pub exit_us: u64,
    pub success_statuses: Vec<i32>,
}

/// What to do with one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    /// Nothing to change (ended already, or still ending: the live signals decide).
    Keep,
    /// Running: track it (this invocation; the record is refreshed if it differs).
    Running { invocation: String },
    /// The record was made by `Run` and its unit never started: drop it (`run-never-started`).
    NeverStarted,
    /// It ended: record how (a reap is queued).
    Ended {
        how: How,
        at_ms: u64,
        invocation: String,
        facts: Option<EndFacts>,
    },
}

/// C-3 (agent absent) and C-4 for one record.
pub fn reconcile(r: &RunRecord, unit: Option<&UnitNow>, boot_id: &str) -> Reconciled {
    if r.state != RunState::Active {
        return Reconciled::Keep;
    }
    if !r.boot_id.is_empty() && r.boot_id != boot_id {
        // C-4: alive when the host went down unobserved.
        return Reconciled::Ended {
            how: How::HostRestart,
            at_ms: r.seen_active_at,
            invocation: r.invocation_id.clone(),
            facts: None,
        };
    }
    let never_started = r.invocation_id.is_empty()
        && r.entry_id.is_none()
        && matches!(r.target, Target::Exec { .. });
    let unknown = || Reconciled::Ended {
        how: How::Unknown,
        at_ms: 0,
        invocation: r.invocation_id.clone(),
        facts: None,
    };
    let Some(u) = unit.filter(|u| !u.invocation_id.is_empty()) else {
        return if never_started {
            Reconciled::NeverStarted
        } else {
            unknown()
        };
    };
    let same = r.invocation_id.is_empty() || r.invocation_id == u.invocation_id;
    let running = matches!(u.active_state.as_str(), "activating" | "reloading")
        || (u.active_state == "active" && u.sub_state != "exited");
    if running {
        // A restart while away is not an end: the record follows the invocation that runs.
        return Reconciled::Running {
            invocation: u.invocation_id.clone(),
        };
    }
    if !same {
        return unknown();
    }
    if u.active_state == "deactivating" {
        return Reconciled::Keep;
    }
    let facts = EndFacts {
        stop_requested: false,
        system_stopping: false,
        result: u.result.clone(),
        code: u.code,
        status: u.status,
        success_statuses: u.success_statuses.clone(),
    };
    let existing_unit = matches!(r.target, Target::Unit { .. });
    let how = if existing_unit && u.result == "success" && u.code == CLD_KILLED {
        How::Unknown
    } else {
        classify(&facts)
    };
    Reconciled::Ended {
        how,
        at_ms: u.exit_us / 1000,
        invocation: u.invocation_id.clone(),
        facts: Some(facts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::runs::EvidencePolicy;

    fn rec(target: Target, inv: &str, boot: &str) -> RunRecord {
        RunRecord {
            run_id: "r1".into(),
            unit: "outlive-run-r1.service".into(),
            target,
            resume: None,
            uid: 1000,
            gid: 1000,
            cwd: "/".into(),
            worktree: None,
            session: String::new(),
            evidence: vec![],
            evidence_policy: EvidencePolicy::Autonomous,
            state: RunState::Active,
            invocation_id: inv.into(),
            boot_id: boot.into(),
            seen_active_at: 1234,
            ended_at: None,
            entry_id: None,
            entry_status: None,
            enqueue: String::new(),
            configured: false,
            created_at: 1,
        }
    }

    fn exec() -> Target {
        Target::Exec {
            exec: vec!["/bin/sleep".into()],
            env: Default::default(),
        }
    }

    fn unit(active: &str, sub: &str, inv: &str, result: &str, code: i32, status: i32) -> UnitNow {
        UnitNow {
            active_state: active.into(),
            sub_state: sub.into(),
            invocation_id: inv.into(),
            result: result.into(),
            code,
            status,
            exit_us: 7_000_000,
            ..UnitNow::default()
        }
    }

    fn how(r: Reconciled) -> Option<How> {
        match r {
            Reconciled::Ended { how, .. } => Some(how),
            _ => None,
        }
    }

    /// C-3 (agent absent): each way a run ends while the agent is away, as the unit reads
    /// afterwards under `RemainAfterExit=yes` (the facts note's last column).
    #[test]
    fn c3_absent_truth_table() {
        let r = rec(exec(), "i1", "b1");
        let rows: Vec<(&str, Option<UnitNow>, Option<How>)> = vec![
            (
                "SIGKILL",
                Some(unit("failed", "failed", "i1", "signal", 2, 9)),
                Some(How::Killed),
            ),
            (
                "SIGTERM",
                Some(unit("active", "exited", "i1", "success", 2, 15)),
                Some(How::Killed),
            ),
            (
                "exit 0",
                Some(unit("active", "exited", "i1", "success", 1, 0)),
                Some(How::Finished),
            ),
            (
                "exit 3",
                Some(unit("failed", "failed", "i1", "exit-code", 1, 3)),
                Some(How::Failed),
            ),
            (
                "WatchdogSec",
                Some(unit("failed", "failed", "i1", "watchdog", 2, 6)),
                Some(How::Watchdog),
            ),
            ("systemctl stop (collected)", None, Some(How::Unknown)),
            (
                "reset-failed, another run",
                Some(unit("failed", "failed", "i2", "signal", 2, 9)),
                Some(How::Unknown),
            ),
            (
                "still running",
                Some(unit("active", "running", "i1", "success", 0, 0)),
                None,
            ),
        ];
        for (name, u, want) in rows {
            assert_eq!(how(reconcile(&r, u.as_ref(), "b1")), want, "{name}");
        }
        assert_eq!(
            reconcile(&r, Some(&unit("active", "running", "i2", "", 0, 0)), "b1"),
            Reconciled::Running {
                invocation: "i2".into()
            },
            "restarted while away: followed"
        );
        match reconcile(
            &r,
            Some(&unit("failed", "failed", "i1", "signal", 2, 9)),
            "b1",
        ) {
            Reconciled::Ended { at_ms, .. } => assert_eq!(at_ms, 7000, "ExecMainExitTimestamp"),
            other => panic!("{other:?}"),
        }
    }

    /// C-4: an active record of another boot was alive when the host went down.
    #[test]
    fn c4_an_active_record_of_another_boot_is_a_host_restart() {
        let r = rec(exec(), "i1", "b0");
        assert_eq!(
            reconcile(&r, None, "b1"),
            Reconciled::Ended {
                how: How::HostRestart,
                at_ms: 1234,
                invocation: "i1".into(),
                facts: None
            }
        );
        let mut ended = r.clone();
        ended.state = RunState::Ended(How::Stopped);
        assert_eq!(
            reconcile(&ended, None, "b1"),
            Reconciled::Keep,
            "a stopped run stays stopped"
        );
    }

    #[test]
    fn c1_a_record_whose_unit_never_started_is_dropped_or_adopted() {
        let r = rec(exec(), "", "b1");
        assert_eq!(reconcile(&r, None, "b1"), Reconciled::NeverStarted);
        assert_eq!(
            reconcile(&r, Some(&unit("active", "running", "i9", "", 0, 0)), "b1"),
            Reconciled::Running {
                invocation: "i9".into()
            }
        );
    }

    /// C-3: for an existing unit, a clean end by a signal cannot be told from a stop.
    #[test]
    fn c3_an_existing_unit_ended_by_term_reads_unknown() {
        let r = rec(
            Target::Unit {
                unit: "agent@a.service".into(),
            },
            "i1",
            "b1",
        );
        let u = unit("inactive", "dead", "i1", "success", 2, 15);
        assert_eq!(how(reconcile(&r, Some(&u), "b1")), Some(How::Unknown));
        let u = unit("failed", "failed", "i1", "signal", 2, 9);
        assert_eq!(how(reconcile(&r, Some(&u), "b1")), Some(How::Killed));
    }
}
