//! Following one watched invocation through the service manager's signals (SPEC C-3, live),
//! as a pure state machine: the watcher feeds it the unit's `PropertiesChanged` values,
//! `JobRemoved` and `UnitRemoved`, and it says when the invocation has ended and with which
//! facts. What the signals look like for each way a unit ends is in
//! `notes/capture-systemd-facts.md` §2:
//!
//! - `Job ≠ 0` in the first signal that leaves `active` means a job ended the run (a stop, a
//!   restart or the host's shutdown); `Job = 0` means something else did.
//! - A stop job ends with the unit `inactive`/`failed` once the job is gone (`JobRemoved`,
//!   or a signal with `Job = 0`); a restart job brings the unit back `activating` under the
//!   same job first: not an end.
//! - `activating (auto-restart)` (`Restart=`) and a new `InvocationID` are not ends: the record
//!   follows the next invocation.
//! - The Service interface's signal (Result, ExecMainCode, ExecMainStatus, the exit time)
//!   comes just before the Unit interface's.

use super::classify::EndFacts;

/// What one Unit-interface signal carried (absent: not in this signal).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitSignal {
    pub active_state: Option<String>,
    pub sub_state: Option<String>,
    /// The `Job` property's id (0: none).
    pub job: Option<u32>,
    pub invocation_id: Option<String>,
}

/// What one Service-interface signal carried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceSignal {
    pub result: Option<String>,
    pub code: Option<i32>,
    pub status: Option<i32>,
    /// `ExecMainExitTimestamp`, µs since the epoch.
    pub exit_us: Option<u64>,
}

/// What the watcher does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// The unit runs a new invocation (a restart): the record follows it.
    Follow(String),
    /// The invocation ended with these facts (the watcher adds `system_stopping` when a stop
    /// was requested, and classifies).
    Ended {
        facts: EndFacts,
        exit_us: u64,
        invocation: String,
    },
}

/// One watched invocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracker {
    pub invocation: String,
    job: u32,
    /// Some once the invocation left `active`: whether a job was installed then.
    stop: Option<bool>,
    /// Ended with a stop job still installed: the end is final when the job is gone.
    pending: bool,
    result: String,
    code: i32,
    status: i32,
    exit_us: u64,
    success_statuses: Vec<i32>,
    done: bool,
}

fn running(active: &str, sub: &str) -> bool {
    matches!(active, "activating" | "reloading") || (active == "active" && sub != "exited")
}

fn ended(active: &str, sub: &str) -> bool {
    matches!(active, "inactive" | "failed") || (active == "active" && sub == "exited")
}

impl Tracker {
    /// Track `invocation` (empty: adopt the first one seen), with the unit's
    /// `SuccessExitStatus=` statuses.
    pub fn new(invocation: &str, success_statuses: Vec<i32>) -> Tracker {
        Tracker {
            invocation: invocation.to_string(),
            success_statuses,
            ..Tracker::default()
        }
    }

    /// A Service-interface signal.
    pub fn service(&mut self, s: &ServiceSignal) {
        if let Some(r) = &s.result {
            self.result.clone_from(r);
        }
        if let Some(c) = s.code {
            self.code = c;
        }
        if let Some(st) = s.status {
            self.status = st;
        }
        if let Some(t) = s.exit_us {
            self.exit_us = t;
        }
    }

    /// A Unit-interface signal.
    pub fn unit(&mut self, u: &UnitSignal) -> Step {
        if let Some(j) = u.job {
            self.job = j;
        }
        if let Some(inv) = u.invocation_id.as_deref().filter(|i| !i.is_empty()) {
            if self.invocation.is_empty() {
                self.invocation = inv.to_string();
            } else if inv != self.invocation {
                self.restart(inv);
                return Step::Follow(inv.to_string());
            }
        }
        let (Some(active), sub) = (u.active_state.as_deref(), u.sub_state.as_deref()) else {
            return Step::Nothing;
        };
        let sub = sub.unwrap_or("");
        if self.done {
            return Step::Nothing;
        }
        if running(active, sub) {
            // Running, starting again under a restart job, or `auto-restart`: not an end.
            self.stop = None;
            self.pending = false;
            return Step::Nothing;
        }
        if self.stop.is_none() {
            self.stop = Some(self.job != 0);
        }
        if !ended(active, sub) {
            return Step::Nothing;
        }
        if self.stop == Some(true) && self.job != 0 {
            self.pending = true;
            return Step::Nothing;
        }
        self.end()
    }

    /// `JobRemoved` for the unit: a stop job that held the end back is gone.
    pub fn job_removed(&mut self) -> Step {
        self.job = 0;
        if self.pending && !self.done {
            return self.end();
        }
        Step::Nothing
    }

    /// `UnitRemoved` outside a daemon-reload: the unit was collected after it ended.
    pub fn unit_removed(&mut self) -> Step {
        if self.stop.is_some() && !self.done {
            return self.end();
        }
        Step::Nothing
    }

    fn restart(&mut self, inv: &str) {
        *self = Tracker::new(inv, std::mem::take(&mut self.success_statuses));
    }

    fn end(&mut self) -> Step {
        self.done = true;
        Step::Ended {
            facts: EndFacts {
                stop_requested: self.stop == Some(true),
                system_stopping: false,
                result: self.result.clone(),
                code: self.code,
                status: self.status,
                success_statuses: self.success_statuses.clone(),
            },
            exit_us: self.exit_us,
            invocation: self.invocation.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::classify::classify;
    use crate::queue::runs::How;

    /// `PC(active/sub job=N [result code/status])` of the facts note: the Service signal, then
    /// the Unit signal.
    enum Sig {
        Pc(
            &'static str,
            &'static str,
            u32,
            Option<(&'static str, i32, i32)>,
        ),
        Inv(&'static str),
        JobRemoved,
        UnitRemoved,
    }
    use Sig::*;

    fn run(seq: &[Sig]) -> (Vec<Step>, Option<How>) {
        let mut t = Tracker::new("inv1", vec![]);
        let mut steps = vec![];
        for s in seq {
            let step = match s {
                Pc(a, sub, job, svc) => {
                    if let Some((r, c, st)) = svc {
                        t.service(&ServiceSignal {
                            result: Some((*r).into()),
                            code: Some(*c),
                            status: Some(*st),
                            exit_us: Some(5_000_000),
                        });
                    }
                    t.unit(&UnitSignal {
                        active_state: Some((*a).into()),
                        sub_state: Some((*sub).into()),
                        job: Some(*job),
                        invocation_id: None,
                    })
                }
                Inv(i) => t.unit(&UnitSignal {
                    invocation_id: Some((*i).into()),
                    ..UnitSignal::default()
                }),
                JobRemoved => t.job_removed(),
                UnitRemoved => t.unit_removed(),
            };
            if step != Step::Nothing {
                steps.push(step);
            }
        }
        let how = steps.iter().find_map(|s| match s {
            Step::Ended { facts, .. } => Some(classify(facts)),
            _ => None,
        });
        (steps, how)
    }

    /// C-3 live: the signal sequences systemd 252 sends for each way a unit ends
    /// (`notes/capture-systemd-facts.md` §2), each ended exactly once and classified.
    #[test]
    #[expect(
        clippy::too_many_lines,
        reason = "a table: one row per signal sequence of the facts note"
    )]
    fn c3_signal_sequences_end_once_and_classify() {
        let cases: Vec<(&str, Vec<Sig>, Option<How>)> = vec![
            (
                "exit 0",
                vec![
                    Pc("active", "running", 0, None),
                    Pc("deactivating", "stop-post", 0, Some(("success", 1, 0))),
                    Pc("inactive", "dead", 0, Some(("success", 1, 0))),
                    UnitRemoved,
                ],
                Some(How::Finished),
            ),
            (
                "RemainAfterExit, exit 0",
                vec![Pc("active", "exited", 0, Some(("success", 1, 0)))],
                Some(How::Finished),
            ),
            (
                "RemainAfterExit, kill -TERM",
                vec![Pc("active", "exited", 0, Some(("success", 2, 15)))],
                Some(How::Killed),
            ),
            (
                "exit 3",
                vec![
                    Pc("deactivating", "stop-post", 0, Some(("exit-code", 1, 3))),
                    Pc("failed", "failed", 0, Some(("exit-code", 1, 3))),
                ],
                Some(How::Failed),
            ),
            (
                "systemctl stop",
                vec![
                    Pc("active", "running", 290, None),
                    Pc("deactivating", "stop-sigterm", 290, None),
                    Pc("deactivating", "stop-post", 290, Some(("success", 2, 15))),
                    Pc("inactive", "dead", 290, Some(("success", 2, 15))),
                    JobRemoved,
                    Pc("inactive", "dead", 0, None),
                    UnitRemoved,
                ],
                Some(How::Stopped),
            ),
            (
                "systemctl stop, no ExecStopPost, no JobRemoved seen",
                vec![
                    Pc("active", "running", 334, None),
                    Pc("deactivating", "stop-sigterm", 334, None),
                    Pc("inactive", "dead", 334, Some(("success", 2, 15))),
                    Pc("inactive", "dead", 0, None),
                    UnitRemoved,
                ],
                Some(How::Stopped),
            ),
            (
                "kill -KILL",
                vec![
                    Pc("deactivating", "stop-post", 0, Some(("signal", 2, 9))),
                    Pc("failed", "failed", 0, Some(("signal", 2, 9))),
                ],
                Some(How::Killed),
            ),
            (
                "systemctl stop, trapped, exit 143",
                vec![
                    Pc("active", "running", 981, None),
                    Pc("deactivating", "stop-sigterm", 981, None),
                    Pc(
                        "deactivating",
                        "stop-post",
                        981,
                        Some(("exit-code", 1, 143)),
                    ),
                    Pc("failed", "failed", 981, None),
                    JobRemoved,
                    Pc("failed", "failed", 0, None),
                ],
                Some(How::Stopped),
            ),
            (
                "kill -TERM, trapped, exit 143",
                vec![
                    Pc(
                        "deactivating",
                        "stop-sigterm",
                        0,
                        Some(("exit-code", 1, 143)),
                    ),
                    Pc("deactivating", "stop-post", 0, None),
                    Pc("failed", "failed", 0, None),
                ],
                Some(How::Killed),
            ),
            (
                "WatchdogSec",
                vec![
                    Pc("deactivating", "stop-watchdog", 0, Some(("watchdog", 0, 0))),
                    Pc("deactivating", "stop-post", 0, Some(("watchdog", 2, 6))),
                    Pc("failed", "failed", 0, None),
                ],
                Some(How::Watchdog),
            ),
            (
                "systemctl restart (same job)",
                vec![
                    Pc("active", "running", 1933, None),
                    Pc("deactivating", "stop-sigterm", 1933, None),
                    Pc("deactivating", "stop-post", 1933, Some(("success", 2, 15))),
                    Pc("inactive", "dead", 1933, None),
                    Pc("activating", "start", 1933, None),
                    Inv("inv2"),
                    Pc("active", "running", 1933, None),
                    JobRemoved,
                ],
                None,
            ),
            (
                "host shutdown",
                vec![
                    Pc("active", "running", 362, None),
                    Pc("deactivating", "stop-sigterm", 362, None),
                    Pc("deactivating", "stop-post", 362, Some(("success", 2, 15))),
                    Pc("inactive", "dead", 362, None),
                    JobRemoved,
                    Pc("inactive", "dead", 0, None),
                ],
                Some(How::Stopped), // the watcher adds SystemState=stopping: host-shutdown
            ),
        ];
        for (name, seq, want) in cases {
            let (steps, how) = run(&seq);
            let ends = steps
                .iter()
                .filter(|s| matches!(s, Step::Ended { .. }))
                .count();
            assert_eq!(ends, usize::from(want.is_some()), "{name}: {steps:?}");
            assert_eq!(how, want, "{name}");
        }
        let (steps, _) = run(&[Inv("inv2")]);
        assert_eq!(
            steps,
            vec![Step::Follow("inv2".into())],
            "a new invocation is followed"
        );
    }

    #[test]
    fn c3_the_exit_time_and_invocation_are_carried() {
        let (steps, _) = run(&[
            Pc("deactivating", "stop-post", 0, Some(("signal", 2, 9))),
            Pc("failed", "failed", 0, None),
        ]);
        assert!(
            matches!(&steps[0], Step::Ended { exit_us: 5_000_000, invocation, .. } if invocation == "inv1")
        );
    }
}
