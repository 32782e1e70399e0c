//! The tick's decision (D-2 to D-8, P-2 to P-5), as a pure function: what the tick does next,
//! from what it has gathered so far.
//!
//! [`decide`] takes a [`View`] (plain data: the queue's snapshot, the candidates, the
//! pressure sample, the validation results, the drainer's own counters) and returns a
//! [`Step`]: a fact it needs before it can decide ([`Step::Need`]), bookkeeping to do before
//! that fact is read ([`Step::Then`]), or the decision ([`Step::Done`]: the actions and how the
//! tick ends). The tick (`tick.rs`) gathers, carries out and calls it again until it is done,
//! as ntpd-rs's sources return `NtpSourceAction`s that their task carries out. It takes no
//! service manager, queue handle, file or clock: its signature says so, and its table test
//! (`tests::d2_*`, `tests::d3_*`) drives it with plain values.
//!
//! A fact is asked for only where the tick's order reaches it, so that a paused tick samples no
//! pressure, and a tick held at a gate asks nothing of the service manager.

use std::collections::HashSet;

use super::gauge::Tier;
use super::tick::{Outcome, Report, Settings};
use super::validate::Check;
use crate::queue::Snapshot;
use crate::queue::entry::Entry;

/// What the tick has gathered, as plain data.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View<'a> {
    pub(crate) settings: &'a Settings,
    /// A `Drain()` (skips the calm gate, D-5).
    pub(crate) manual: bool,
    pub(crate) now_boot: u64,
    /// The queue now (re-read after every bookkeeping step).
    pub(crate) queue: &'a Snapshot,
    /// P-5: why the pause is a stale emergency pause, when it is.
    pub(crate) stale_pause: Option<&'a str>,
    /// Why lifting the stale pause failed, when it did.
    pub(crate) lift_failed: Option<&'a str>,
    /// P-3: the (paused_at, waiting) the last heads-up was raised for.
    pub(crate) headsup: Option<(u64, u32)>,
    /// Consecutive normal-pressure ticks (D-4).
    pub(crate) calm_streak: u32,
    /// Since when (boottime) the calm gate has held the head, and whether that was noticed.
    pub(crate) held_since: Option<u64>,
    pub(crate) held_notified: bool,
    /// Boottime until which the breaker is open (D-8).
    pub(crate) breaker_until: Option<u64>,
    /// The quota report while fresh (D-10).
    pub(crate) quota: Option<bool>,
    /// Entries already reported `would-revive` by this process (D-7).
    pub(crate) seen: &'a HashSet<String>,
    /// Gathered on request ([`Fact`]).
    pub(crate) pressure: Option<(Tier, &'a str)>,
    pub(crate) candidates: Option<&'a [Entry]>,
    pub(crate) revived_alive: Option<Result<usize, &'a str>>,
    /// Validation results so far, by entry id, in the order asked.
    pub(crate) checks: &'a [(String, Check)],
    /// The undecided checks used up the tick's time (each may wait out a timeout).
    pub(crate) out_of_time: bool,
}

/// A fact the decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fact {
    /// The host's pressure (D-4).
    Pressure,
    /// The ready entries in D-5's order, with the stops validation reads.
    Candidates,
    /// Revived runs still alive (D-5's session cap): asks the service manager.
    RevivedAlive,
    /// D-6 for this entry.
    Check(String),
}

/// What the tick does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// D-4: the calm streak and the tier published with it.
    SetCalm { streak: u32, tier: Option<Tier> },
    /// Advance every open entry's waiting time (and calm time when calm).
    AdvanceWaiting { calm: bool },
    ///
    SweepTtl,
    /// P-5: lift the stale emergency pause, saying why.
    LiftStalePause(String),
    /// P-3: the heads-up, once per (paused_at, waiting).
    HeadsUp {
        paused_at: u64,
        waiting: u32,
        kind: &'static str,
        reason: String,
    },
    /// D-8: the cooldown has passed.
    CloseBreaker,
    /// D-5: the calm gate holds the head since now.
    HoldSince(u64),
    /// D-5: the head was held longer than the notice allows.
    PressureHeld {
        entry_id: String,
        label: String,
        why: String,
        tier: Tier,
    },
    /// The gate no longer holds anything.
    ReleaseHold,
    /// A pause ends the hold's clock (not its notice: one per episode, D-5).
    RestartHold,
    /// D-6: a check could not decide; retried after a short backoff.
    Defer { entry_id: String, why: String },
    /// D-7: record this entry once as `would-revive`.
    WouldRevive { entry_id: String, label: String },
}

/// How the tick ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Finish {
    Report(Report),
    /// D-6: mark it `invalidated:<why>` (the report says whether that was recorded).
    Invalidate {
        entry_id: String,
        why: &'static str,
        detail: String,
    },
    /// D-9: attempt it (`revived` or `attempt-failed`, from the attempt).
    Attempt(Box<Entry>),
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    pub(crate) actions: Vec<Action>,
    pub(crate) finish: Finish,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    Need(Fact),
    /// Do these, then gather the fact.
    Then(Vec<Action>, Fact),
    Done(Decision),
}

fn done(actions: Vec<Action>, report: Report) -> Step {
    Step::Done(Decision {
        actions,
        finish: Finish::Report(report),
    })
}

/// The tick's next step (D-2 steps 2–11; step 1 is the loop's).
pub(crate) fn decide(v: &View<'_>) -> Step {
    let q = v.queue;
    // (2)
    if !q.enabled {
        let o = if q.disabled_reason == "queue-off" {
            Outcome::QueueOff
        } else {
            Outcome::QueueDisabled
        };
        let detail = format!("{}: {}", q.disabled_reason, q.disabled_detail);
        return done(vec![], Report::with(o, None, detail));
    }
    // (3) §5
    if let Some(step) = paused(v) {
        return step;
    }
    // (4) and (5): the pressure, then the accounting before the candidates are read.
    let Some((tier, why)) = v.pressure else {
        return Step::Need(Fact::Pressure);
    };
    let Some(cands) = v.candidates else {
        let calm = tier == Tier::Normal;
        let streak = if calm { v.calm_streak + 1 } else { 0 };
        let actions = vec![
            Action::SetCalm {
                streak,
                tier: Some(tier),
            },
            Action::AdvanceWaiting { calm },
            Action::SweepTtl,
        ];
        return Step::Then(actions, Fact::Candidates);
    };
    // (6)
    let mut actions = Vec::new();
    if let Some(until) = v.breaker_until {
        if v.now_boot < until {
            let detail = format!("open for {} s more", (until - v.now_boot) / 1000);
            return done(vec![], Report::with(Outcome::BreakerOpen, None, detail));
        }
        actions.push(Action::CloseBreaker);
    }
    // (7) Nothing to gate: the gates hold entries, and an idle tick asks nothing of the
    // service manager.
    if cands.is_empty() {
        actions.push(Action::ReleaseHold);
        return done(actions, Report::new(Outcome::Empty));
    }
    if let Some(held) = calm_gate(v, tier, why, &cands[0]) {
        actions.extend(held.0);
        return done(actions, held.1);
    }
    actions.push(Action::ReleaseHold);
    if v.quota == Some(false) {
        let r = Report::with(
            Outcome::Quota,
            None,
            "the quota tracker reported no headroom",
        );
        return done(actions, r);
    }
    match v.revived_alive {
        None => return Step::Need(Fact::RevivedAlive),
        Some(Ok(n)) if n >= v.settings.max_revived_alive as usize => {
            let detail = format!(
                "{n} revived runs are alive (limit {})",
                v.settings.max_revived_alive
            );
            return done(actions, Report::with(Outcome::SessionCap, None, detail));
        }
        Some(Ok(_)) => {}
        Some(Err(why)) => {
            let detail = format!("cannot count the revived runs: {why}");
            return done(actions, Report::with(Outcome::SessionCap, None, detail));
        }
    }
    // (8) to (11)
    choose(v, cands, actions)
}

/// (3) §5: a paused queue's tick, or `None` when it is not paused.
fn paused(v: &View<'_>) -> Option<Step> {
    let p = v.queue.pause.as_ref()?;
    let paused = || {
        Report::with(
            Outcome::Paused,
            None,
            format!("{}: {}", p.kind.as_str(), p.reason),
        )
    };
    if let Some(e) = v.lift_failed {
        // The accounting was done when the lift was tried.
        let detail = format!("the stale pause could not be lifted: {e}");
        return Some(done(vec![], Report::with(Outcome::Paused, None, detail)));
    }
    // Paused time is waiting time (the unpause credits it to `frozen_ms`, Q-12), never calm
    // time.
    let mut actions = vec![
        Action::AdvanceWaiting { calm: false },
        Action::SetCalm {
            streak: 0,
            tier: None,
        },
        Action::RestartHold,
    ];
    let live = !v.queue.dry_run;
    if !live {
        // P-4: a paused dry-run queue does nothing else.
        return Some(done(actions, paused()));
    }
    if let Some(why) = v.stale_pause {
        // P-5: lift it and go on with this tick.
        actions.push(Action::LiftStalePause(why.to_string()));
        return Some(Step::Then(actions, Fact::Pressure));
    }
    // P-3: once per (paused_at, open-entry count).
    let waiting = v.queue.waiting;
    if waiting > 0 && v.headsup != Some((p.paused_at, waiting)) {
        actions.push(Action::HeadsUp {
            paused_at: p.paused_at,
            waiting,
            kind: p.kind.as_str(),
            reason: p.reason.clone(),
        });
    }
    Some(done(actions, paused()))
}

/// D-5's calm gate: the actions and the report when it holds the head.
fn calm_gate(v: &View<'_>, tier: Tier, why: &str, head: &Entry) -> Option<(Vec<Action>, Report)> {
    let s = v.settings;
    if !s.calm_gate || v.manual || v.calm_streak >= s.required_calm_ticks {
        return None;
    }
    let mut actions = Vec::new();
    if !v.queue.dry_run {
        let since = match v.held_since {
            Some(t) => t,
            None => {
                actions.push(Action::HoldSince(v.now_boot));
                v.now_boot
            }
        };
        let notice = s.pressure_held_notice_ms;
        if notice > 0 && !v.held_notified && v.now_boot.saturating_sub(since) > notice {
            actions.push(Action::PressureHeld {
                entry_id: head.id.clone(),
                label: head.label(),
                why: why.to_string(),
                tier,
            });
        }
    }
    let detail = format!(
        "{why} ({} of {} calm ticks)",
        v.calm_streak, s.required_calm_ticks
    );
    Some((actions, Report::with(Outcome::Calm, None, detail)))
}

/// (8) to (11): the first candidate that passes validation, in order; a dry run reports each
/// ready entry once.
fn choose(v: &View<'_>, cands: &[Entry], mut actions: Vec<Action>) -> Step {
    let live = !v.queue.dry_run;
    let mut undecided = 0usize;
    let mut last_undecided = "";
    let mut chosen = None;
    for e in cands.iter().filter(|e| live || !v.seen.contains(&e.id)) {
        let Some((_, check)) = v.checks.iter().find(|(id, _)| *id == e.id) else {
            return Step::Need(Fact::Check(e.id.clone()));
        };
        match check {
            Check::Pass => {
                chosen = Some(e);
                break;
            }
            Check::Invalid(why, detail) => {
                return Step::Done(Decision {
                    actions,
                    finish: Finish::Invalidate {
                        entry_id: e.id.clone(),
                        why,
                        detail: detail.clone(),
                    },
                });
            }
            Check::Undecided(w) => {
                actions.push(Action::Defer {
                    entry_id: e.id.clone(),
                    why: w.clone(),
                });
                undecided += 1;
                last_undecided = w;
                // Keep the tick short: the others are checked on later ticks.
                if v.out_of_time {
                    break;
                }
            }
        }
    }
    let Some(e) = chosen else {
        let r = if undecided > 0 {
            Report::with(
                Outcome::Empty,
                None,
                format!(
                    "{undecided} ready entries could not be checked ({last_undecided}); they stay queued and are checked again"
                ),
            )
        } else if !live {
            Report::with(
                Outcome::DryRun,
                None,
                "every ready entry was already reported",
            )
        } else {
            Report::new(Outcome::Empty)
        };
        return done(actions, r);
    };
    // (10) D-7
    if !live {
        actions.push(Action::WouldRevive {
            entry_id: e.id.clone(),
            label: e.label(),
        });
        return done(
            actions,
            Report::with(Outcome::DryRun, Some(&e.id), "would revive"),
        );
    }
    // (11)
    Step::Done(Decision {
        actions,
        finish: Finish::Attempt(Box::new(e.clone())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::rules::{Pause, PauseKind};
    use std::collections::HashMap;

    const MIN: u64 = 60_000;
    const NOW: u64 = 1000 * MIN;

    /// The drainer's test settings (the defaults of §9).
    fn settings() -> Settings {
        crate::drainer::tests::dsettings()
    }

    fn entry(id: &str) -> Entry {
        serde_json::from_value(serde_json::json!({
            "id": id, "run_id": format!("run-{id}"), "session": format!("session {id}"),
            "target": {"unit": "x.service"}, "uid": 0, "gid": 0, "cwd": "/",
            "class": "interactive", "status": "queued", "reaped_at": 0, "queued_at": 0,
        }))
        .unwrap()
    }

    /// Everything a row's tick would gather, and the drainer's counters before it.
    struct World {
        settings: Settings,
        manual: bool,
        queue: Snapshot,
        stale: Option<&'static str>,
        lift_fails: bool,
        headsup: Option<(u64, u32)>,
        calm_streak: u32,
        held_since: Option<u64>,
        held_notified: bool,
        breaker_until: Option<u64>,
        quota: Option<bool>,
        seen: HashSet<String>,
        pressure: (Tier, &'static str),
        candidates: Vec<Entry>,
        revived_alive: Result<usize, &'static str>,
        checks: HashMap<&'static str, Check>,
        out_of_time: bool,
    }

    /// A live, calm, enabled queue with one ready entry that passes its checks.
    fn world() -> World {
        World {
            settings: settings(),
            manual: false,
            queue: Snapshot {
                enabled: true,
                lock_held: true,
                waiting: 1,
                ..Snapshot::default()
            },
            stale: None,
            lift_fails: false,
            headsup: None,
            calm_streak: 5,
            held_since: None,
            held_notified: false,
            breaker_until: None,
            quota: None,
            seen: HashSet::new(),
            pressure: (Tier::Normal, "calm"),
            candidates: vec![entry("rq-a-1")],
            revived_alive: Ok(0),
            checks: HashMap::from([("rq-a-1", Check::Pass)]),
            out_of_time: false,
        }
    }

    fn paused(kind: PauseKind) -> Option<Pause> {
        Some(Pause {
            kind,
            reason: "disk swap".into(),
            paused_at: 7,
        })
    }

    /// What a tick does in `w`: the facts it asked for, every action, and how it ended. The
    /// bookkeeping the decision cannot see is applied as the tick applies it (the calm streak,
    /// a lifted pause).
    fn run(w: &World) -> (Vec<Fact>, Vec<Action>, Finish) {
        let (mut asked, mut all): (Vec<Fact>, Vec<Action>) = (Vec::new(), Vec::new());
        let mut queue = w.queue.clone();
        let mut streak = w.calm_streak;
        let mut lift_failed = None;
        let (mut pressure, mut candidates, mut revived) = (false, false, false);
        let mut checks: Vec<(String, Check)> = Vec::new();
        for _ in 0..100 {
            let stale = if queue.pause.is_some() { w.stale } else { None };
            let v = View {
                settings: &w.settings,
                manual: w.manual,
                now_boot: NOW,
                queue: &queue,
                stale_pause: stale,
                lift_failed,
                headsup: w.headsup,
                calm_streak: streak,
                held_since: w.held_since,
                held_notified: w.held_notified,
                breaker_until: w.breaker_until,
                quota: w.quota,
                seen: &w.seen,
                pressure: pressure.then_some(w.pressure),
                candidates: candidates.then_some(&w.candidates[..]),
                revived_alive: revived.then_some(w.revived_alive),
                checks: &checks,
                out_of_time: w.out_of_time,
            };
            let (fact, actions) = match decide(&v) {
                Step::Need(f) => (f, vec![]),
                Step::Then(actions, f) => (f, actions),
                Step::Done(d) => {
                    all.extend(d.actions);
                    return (asked, all, d.finish);
                }
            };
            for a in &actions {
                match a {
                    Action::SetCalm { streak: s, .. } => streak = *s,
                    Action::LiftStalePause(_) if w.lift_fails => lift_failed = Some("disk full"),
                    Action::LiftStalePause(_) => queue.pause = None,
                    _ => {}
                }
            }
            all.extend(actions);
            if lift_failed.is_some() {
                continue;
            }
            match &fact {
                Fact::Pressure => pressure = true,
                Fact::Candidates => candidates = true,
                Fact::RevivedAlive => revived = true,
                Fact::Check(id) => checks.push((id.clone(), w.checks[id.as_str()].clone())),
            }
            asked.push(fact);
        }
        panic!("the decision did not settle in 100 steps");
    }

    fn outcome(f: &Finish) -> &'static str {
        match f {
            Finish::Report(r) => r.outcome.as_str(),
            Finish::Invalidate { .. } => "invalidated",
            // The attempt's own result says `revived` or `attempt-failed` (D-9).
            Finish::Attempt(_) => "attempt",
        }
    }

    use Fact::{Candidates, Check as C, Pressure, RevivedAlive};

    fn check(id: &str) -> Fact {
        C(id.to_string())
    }

    const ACCOUNT_CALM: [Action; 3] = [
        Action::SetCalm {
            streak: 6,
            tier: Some(Tier::Normal),
        },
        Action::AdvanceWaiting { calm: true },
        Action::SweepTtl,
    ];

    /// D-2 and D-3: one row per step of the tick's order and per outcome word: the facts the
    /// tick asks for (in order), what it does, and how it ends.
    #[test]
    #[expect(
        clippy::too_many_lines,
        reason = "the table: one row per D-2 step and D-3 word"
    )]
    fn d2_d3_the_tick_decision_table() {
        type Row = (&'static str, World, Vec<Fact>, &'static str);
        let rows: Vec<Row> = vec![
            // (2)
            (
                "2 disabled: queue-disabled, nothing asked",
                World {
                    queue: Snapshot {
                        enabled: false,
                        disabled_reason: "foreign-host".into(),
                        ..Snapshot::default()
                    },
                    ..world()
                },
                vec![],
                "queue-disabled",
            ),
            (
                "2 off: queue-off",
                World {
                    queue: Snapshot {
                        enabled: false,
                        disabled_reason: "queue-off".into(),
                        ..Snapshot::default()
                    },
                    ..world()
                },
                vec![],
                "queue-off",
            ),
            // (3)
            (
                "3 paused: paused, no pressure sampled",
                World {
                    queue: Snapshot {
                        pause: paused(PauseKind::Maintenance),
                        ..world().queue
                    },
                    ..world()
                },
                vec![],
                "paused",
            ),
            (
                "3 P-4 paused dry run: paused, even when stale",
                World {
                    queue: Snapshot {
                        pause: paused(PauseKind::Emergency),
                        dry_run: true,
                        ..world().queue
                    },
                    stale: Some("stale"),
                    ..world()
                },
                vec![],
                "paused",
            ),
            (
                "3 P-5 stale emergency pause: lifted, the tick goes on (to the calm gate: the pause reset the streak)",
                World {
                    queue: Snapshot {
                        pause: paused(PauseKind::Emergency),
                        ..world().queue
                    },
                    stale: Some("stale"),
                    ..world()
                },
                vec![Pressure, Candidates],
                "calm",
            ),
            (
                "3 P-5 stale emergency pause under a manual drain: lifted, and attempted",
                World {
                    queue: Snapshot {
                        pause: paused(PauseKind::Emergency),
                        ..world().queue
                    },
                    stale: Some("stale"),
                    manual: true,
                    ..world()
                },
                vec![Pressure, Candidates, RevivedAlive, check("rq-a-1")],
                "attempt",
            ),
            (
                "3 P-5 a lift that fails: paused",
                World {
                    queue: Snapshot {
                        pause: paused(PauseKind::Emergency),
                        ..world().queue
                    },
                    stale: Some("stale"),
                    lift_fails: true,
                    ..world()
                },
                vec![],
                "paused",
            ),
            // (4) and (7): pressure resets the streak, and the calm gate holds
            (
                "4 pressure: calm gate holds, the manager is not asked",
                World {
                    pressure: (Tier::Moderate, "memory 10% available"),
                    ..world()
                },
                vec![Pressure, Candidates],
                "calm",
            ),
            (
                "4 a manual drain skips the calm gate",
                World {
                    pressure: (Tier::Critical, "memory 2% available"),
                    manual: true,
                    ..world()
                },
                vec![Pressure, Candidates, RevivedAlive, check("rq-a-1")],
                "attempt",
            ),
            (
                "4 calm gate off: it never holds",
                World {
                    pressure: (Tier::Critical, "load"),
                    settings: Settings {
                        calm_gate: false,
                        ..settings()
                    },
                    ..world()
                },
                vec![Pressure, Candidates, RevivedAlive, check("rq-a-1")],
                "attempt",
            ),
            // (5) is bookkeeping before the candidates are read (ACCOUNT_CALM below).
            // (6)
            (
                "6 breaker open: breaker-open",
                World {
                    breaker_until: Some(NOW + MIN),
                    ..world()
                },
                vec![Pressure, Candidates],
                "breaker-open",
            ),
            // (7) gates
            (
                "7 quota: the tracker says no headroom",
                World {
                    quota: Some(false),
                    ..world()
                },
                vec![Pressure, Candidates],
                "quota",
            ),
            (
                "7 session cap: too many revived runs alive",
                World {
                    revived_alive: Ok(10),
                    ..world()
                },
                vec![Pressure, Candidates, RevivedAlive],
                "session-cap",
            ),
            (
                "7 session cap: uncountable is held",
                World {
                    revived_alive: Err("manager unreachable"),
                    ..world()
                },
                vec![Pressure, Candidates, RevivedAlive],
                "session-cap",
            ),
            // (8)
            (
                "8 nothing ready: empty, the manager is not asked",
                World {
                    candidates: vec![],
                    ..world()
                },
                vec![Pressure, Candidates],
                "empty",
            ),
            // (9)
            (
                "9 the head is invalid: invalidated",
                World {
                    checks: HashMap::from([(
                        "rq-a-1",
                        Check::Invalid("cwd-missing", "/gone".into()),
                    )]),
                    ..world()
                },
                vec![Pressure, Candidates, RevivedAlive, check("rq-a-1")],
                "invalidated",
            ),
            (
                "9 undecided head: deferred, the next is chosen",
                World {
                    candidates: vec![entry("rq-a-1"), entry("rq-a-2")],
                    checks: HashMap::from([
                        ("rq-a-1", Check::Undecided("EACCES".into())),
                        ("rq-a-2", Check::Pass),
                    ]),
                    ..world()
                },
                vec![
                    Pressure,
                    Candidates,
                    RevivedAlive,
                    check("rq-a-1"),
                    check("rq-a-2"),
                ],
                "attempt",
            ),
            (
                "9 undecided past the tick's time: the rest wait",
                World {
                    candidates: vec![entry("rq-a-1"), entry("rq-a-2")],
                    out_of_time: true,
                    checks: HashMap::from([
                        ("rq-a-1", Check::Undecided("timeout".into())),
                        ("rq-a-2", Check::Pass),
                    ]),
                    ..world()
                },
                vec![Pressure, Candidates, RevivedAlive, check("rq-a-1")],
                "empty",
            ),
            // (10)
            (
                "10 dry run: would revive, nothing started",
                World {
                    queue: Snapshot {
                        dry_run: true,
                        ..world().queue
                    },
                    ..world()
                },
                vec![Pressure, Candidates, RevivedAlive, check("rq-a-1")],
                "dry-run",
            ),
            (
                "10 dry run: each entry once",
                World {
                    queue: Snapshot {
                        dry_run: true,
                        ..world().queue
                    },
                    seen: HashSet::from(["rq-a-1".to_string()]),
                    ..world()
                },
                vec![Pressure, Candidates, RevivedAlive],
                "dry-run",
            ),
            // (11)
            (
                "11 live and chosen: attempt (revived or attempt-failed, D-9)",
                world(),
                vec![Pressure, Candidates, RevivedAlive, check("rq-a-1")],
                "attempt",
            ),
        ];
        let mut words = HashSet::new();
        for (name, w, facts, word) in rows {
            let (asked, actions, finish) = run(&w);
            assert_eq!(asked, facts, "{name}: the facts asked");
            assert_eq!(outcome(&finish), word, "{name}: {finish:?}");
            words.insert(word);
            if facts.contains(&Candidates)
                && w.pressure.0 == Tier::Normal
                && w.queue.pause.is_none()
            {
                assert_eq!(actions[..3], ACCOUNT_CALM, "{name}: (4) and (5) come first");
            }
            if let Finish::Attempt(e) = &finish {
                assert!(!w.queue.dry_run, "{name}");
                assert!(w.checks[e.id.as_str()] == Check::Pass, "{name}");
            }
        }
        // Every D-3 word the decision ends with (revived and attempt-failed come from the
        // attempt it decides).
        for word in [
            "queue-disabled",
            "queue-off",
            "paused",
            "breaker-open",
            "calm",
            "quota",
            "session-cap",
            "empty",
            "invalidated",
            "dry-run",
            "attempt",
        ] {
            assert!(words.contains(word), "no row ends {word}");
        }
    }

    #[test]
    fn p3_heads_up_once_per_pause_and_count() {
        let w = World {
            queue: Snapshot {
                pause: paused(PauseKind::Maintenance),
                waiting: 2,
                ..world().queue
            },
            ..world()
        };
        let (_, actions, _) = run(&w);
        assert!(actions.iter().any(|a| matches!(
            a,
            Action::HeadsUp {
                paused_at: 7,
                waiting: 2,
                ..
            }
        )));
        let (_, actions, _) = run(&World {
            headsup: Some((7, 2)),
            ..w
        });
        assert!(
            !actions.iter().any(|a| matches!(a, Action::HeadsUp { .. })),
            "{actions:?}"
        );
    }

    #[test]
    fn d5_pressure_held_notice_once_past_its_time_and_not_in_dry_run() {
        let held = |since, notified, dry_run| World {
            pressure: (Tier::Moderate, "load 1.2"),
            held_since: since,
            held_notified: notified,
            queue: Snapshot {
                dry_run,
                ..world().queue
            },
            ..world()
        };
        let notices = |w: &World| {
            run(w)
                .1
                .into_iter()
                .filter(|a| matches!(a, Action::PressureHeld { .. }))
                .count()
        };
        assert_eq!(
            run(&held(None, false, false))
                .1
                .iter()
                .filter(|a| **a == Action::HoldSince(NOW))
                .count(),
            1
        );
        assert_eq!(notices(&held(Some(NOW - 19 * MIN), false, false)), 0);
        assert_eq!(notices(&held(Some(NOW - 21 * MIN), false, false)), 1);
        assert_eq!(notices(&held(Some(NOW - 21 * MIN), true, false)), 0);
        assert_eq!(notices(&held(Some(NOW - 21 * MIN), false, true)), 0);
    }

    #[test]
    fn d8_an_expired_breaker_closes_and_the_tick_goes_on() {
        let (_, actions, finish) = run(&World {
            breaker_until: Some(NOW - 1),
            ..world()
        });
        assert!(actions.contains(&Action::CloseBreaker));
        assert_eq!(outcome(&finish), "attempt");
    }
}
