//! Watch records (SPEC C-2) as the queue keeps them: in the state file, with the entries, so a
//! record and the entry a reap queues for it are written together (one commit), and a record
//! survives what the queue survives.
//!
//! The rules that decide what a record says live in `crate::capture` (C-3, C-4); this file
//! holds the record, its words, and the queue operations that change records: add one (C-1),
//! mark it started or drop it, record an end and queue a reap (C-3, C-11), evidence (C-5),
//! unwatch (C-7), revive by hand (C-8), and the mirror of each record's entry (C-2).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ops::Admission;
use super::*;

/// Ended records are pruned this long after they ended (C-2).
pub const ENDED_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;
/// `seen_active_at` is refreshed at most this often (C-4).
pub const SEEN_REFRESH_MS: u64 = 3600 * 1000;

/// How a watched run ended (C-3's words, `host-restart` from C-4, `unknown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum How {
    HostShutdown,
    HostRestart,
    Stopped,
    OomKill,
    Watchdog,
    Timeout,
    Crashed,
    Killed,
    Finished,
    Failed,
    Unknown,
}

impl How {
    /// Every word.
    pub const ALL: [How; 11] = [
        How::HostShutdown,
        How::HostRestart,
        How::Stopped,
        How::OomKill,
        How::Watchdog,
        How::Timeout,
        How::Crashed,
        How::Killed,
        How::Finished,
        How::Failed,
        How::Unknown,
    ];

    /// The word as written (`oom-kill`).
    pub fn as_str(self) -> &'static str {
        match self {
            How::HostShutdown => "host-shutdown",
            How::HostRestart => "host-restart",
            How::Stopped => "stopped",
            How::OomKill => "oom-kill",
            How::Watchdog => "watchdog",
            How::Timeout => "timeout",
            How::Crashed => "crashed",
            How::Killed => "killed",
            How::Finished => "finished",
            How::Failed => "failed",
            How::Unknown => "unknown",
        }
    }

    /// Parse a written word.
    pub fn parse(s: &str) -> Option<How> {
        How::ALL.into_iter().find(|h| h.as_str() == s)
    }

    /// A reap (C-3 rows 1, 3, 4, 6, 7 and C-4): the run is queued for revival.
    pub fn is_reap(self) -> bool {
        matches!(
            self,
            How::HostShutdown
                | How::HostRestart
                | How::OomKill
                | How::Watchdog
                | How::Timeout
                | How::Killed
        )
    }
}

/// `active`, or `ended:<how>` (C-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Active,
    Ended(How),
}

impl RunState {
    pub fn text(self) -> String {
        match self {
            RunState::Active => "active".into(),
            RunState::Ended(h) => format!("ended:{}", h.as_str()),
        }
    }

    pub fn parse(s: &str) -> Option<RunState> {
        if s == "active" {
            return Some(RunState::Active);
        }
        s.strip_prefix("ended:")
            .and_then(How::parse)
            .map(RunState::Ended)
    }
}

impl Serialize for RunState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text())
    }
}

impl<'de> Deserialize<'de> for RunState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RunState, D::Error> {
        let s = String::deserialize(d)?;
        RunState::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not a run state")))
    }
}

/// C-2 `evidence_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvidencePolicy {
    /// While active the run is mid-work: it carries `build-or-autonomous-active`.
    #[default]
    Autonomous,
    /// Only what the run declared.
    Declared,
}

impl EvidencePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            EvidencePolicy::Autonomous => "autonomous",
            EvidencePolicy::Declared => "declared",
        }
    }

    pub fn parse(s: &str) -> Option<EvidencePolicy> {
        match s {
            "autonomous" => Some(EvidencePolicy::Autonomous),
            "declared" => Some(EvidencePolicy::Declared),
            _ => None,
        }
    }
}

/// One watched run (C-2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    /// The unit the run lives in now (a revival moves it to the revival's unit).
    pub unit: String,
    /// What was started: the unit (C-1 b) or the argv and env (C-1 a).
    pub target: Target,
    /// The argv used instead of the target's at revival (`my-agent --continue`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Vec<String>>,
    pub uid: u32,
    pub gid: u32,
    pub cwd: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worktree: Option<String>,
    #[serde(default)]
    pub session: String,
    /// What the run declared last (Q-3, clamped).
    #[serde(default)]
    pub evidence: Vec<String>,
    #[serde(default)]
    pub evidence_policy: EvidencePolicy,
    pub state: RunState,
    /// The service manager's id of the invocation observed; empty until the start is seen.
    #[serde(default)]
    pub invocation_id: String,
    /// The boot of the last observation while active.
    #[serde(default)]
    pub boot_id: String,
    /// Wall ms of the last observation while active (refreshed at most hourly, C-4).
    #[serde(default)]
    pub seen_active_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_status: Option<String>,
    /// The outcome of the last capture enqueue (C-11): empty when queued, else the word.
    #[serde(default)]
    pub enqueue: String,
    /// Watched because `capture.units` matches it (C-7: cannot be unwatched).
    #[serde(default)]
    pub configured: bool,
    /// Wall ms the record was made.
    #[serde(default)]
    pub created_at: u64,
}

impl RunRecord {
    /// The record of a watched existing unit (C-1 b), owned by `(uid, gid)`, active in
    /// `invocation_id` of `boot_id` now (`now_ms`).
    pub fn unit_watch(
        unit: &str,
        owner: (u32, u32),
        evidence_policy: EvidencePolicy,
        invocation_id: &str,
        boot_id: &str,
        now_ms: u64,
    ) -> RunRecord {
        let target = Target::Unit {
            unit: unit.to_string(),
        };
        let mut r = RunRecord::active(
            &unit_run_id(unit),
            unit,
            target,
            owner,
            evidence_policy,
            boot_id,
            now_ms,
        );
        r.invocation_id = invocation_id.to_string();
        r
    }

    /// A new active record of `run_id` in `unit` (C-2), owned by `(uid, gid)`, seen in `boot_id`
    /// now (`now_ms`); its invocation is read when its start is seen.
    pub fn active(
        run_id: &str,
        unit: &str,
        target: Target,
        (uid, gid): (u32, u32),
        evidence_policy: EvidencePolicy,
        boot_id: &str,
        now_ms: u64,
    ) -> RunRecord {
        RunRecord {
            run_id: run_id.to_string(),
            unit: unit.to_string(),
            target,
            resume: None,
            uid,
            gid,
            cwd: "/".into(),
            worktree: None,
            session: String::new(),
            evidence: vec![],
            evidence_policy,
            state: RunState::Active,
            invocation_id: String::new(),
            boot_id: boot_id.to_string(),
            seen_active_at: now_ms,
            ended_at: None,
            entry_id: None,
            entry_status: None,
            enqueue: String::new(),
            configured: false,
            created_at: 0,
        }
    }

    /// The evidence a capture enqueue carries (C-2): what the run declared, plus
    /// `build-or-autonomous-active` for an autonomous run.
    pub fn capture_evidence(&self) -> Vec<String> {
        let mut ev = self.evidence.clone();
        if self.evidence_policy == EvidencePolicy::Autonomous {
            ev.insert(0, "build-or-autonomous-active".into());
        }
        entry::clamp_evidence(ev.iter().map(|s| Some(s.as_str())))
    }

    /// The request a capture (or `Revive`) queues (C-3, C-6): the record's target, its
    /// `resume` argv when set, marked resumed.
    pub fn request(&self, reason: &str, reaped_at: u64) -> Request {
        let target = match &self.target {
            Target::Unit { unit } => Target::Unit { unit: unit.clone() },
            // The drainer adds OUTLIVE_RESUMED=1 to a watched run's revival (C-6).
            Target::Exec { exec, env } => Target::Exec {
                exec: self.resume.clone().unwrap_or_else(|| exec.clone()),
                env: env.clone(),
            },
        };
        Request {
            run_id: Some(self.run_id.clone()),
            session: self.session.clone(),
            target: Some(target),
            cwd: Some(self.cwd.clone()),
            worktree: self.worktree.clone(),
            reason: reason.into(),
            disposition: "terminal".into(),
            origin: "autonomous".into(),
            evidence: self.capture_evidence(),
            active_run: self.evidence_policy == EvidencePolicy::Autonomous,
            reaped_at: Some(reaped_at),
            ..Request::default()
        }
    }
}

/// C-1 b: the run id of a watched existing unit.
pub fn unit_run_id(unit: &str) -> String {
    format!("unit:{unit}")
}

/// How an end is recorded (C-3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndNote {
    pub how: How,
    /// Wall ms the run ended (`ExecMainExitTimestamp`; `seen_active_at` for `host-restart`).
    pub at: u64,
    /// The invocation that ended (a record that follows another one meanwhile is not touched).
    pub invocation_id: String,
    /// For messages: what the manager said (`Result=signal, killed by SIGKILL`).
    pub detail: String,
}

/// What recording an end did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Recorded; not a reap.
    Recorded,
    /// A reap: queued (`why` empty) or admitted as given up (`resurrection-cap`).
    Queued { entry_id: String, why: String },
    /// A reap the queue did not take: the refusal word (C-11).
    Refused(String),
    /// The record is gone or follows another invocation: nothing done.
    Stale,
}

/// Whether a watch caller may act on a record (C-5, C-7, C-8): the run's own uid, root, or a
/// member (`members`).
fn may_act(caller: &Caller, r: &RunRecord, members: bool) -> bool {
    caller.root || caller.uid == r.uid || (members && caller.may_mutate)
}

impl Queue {
    /// The watch records (L-6: none to show while disabled).
    pub fn runs(&self) -> Result<&[RunRecord], QueueError> {
        self.require_enabled()?;
        Ok(&self.state.runs)
    }

    /// C-11: every Runs1 mutation needs the lock and `queue.enabled`.
    fn require_runs(&self) -> Result<(), QueueError> {
        self.require_enabled()?;
        if !self.settings.enabled {
            return Err(QueueError::Disabled {
                code: "queue-off".into(),
                detail: "queue.enabled is false in the configuration".into(),
            });
        }
        Ok(())
    }

    fn record_of(&self, run_id: &str) -> Result<&RunRecord, QueueError> {
        self.state
            .runs
            .iter()
            .find(|r| r.run_id == run_id)
            .ok_or_else(|| QueueError::NotFound(format!("no watched run {run_id}")))
    }

    /// C-1, C-2: add a record (before the unit starts, for `Run`). An `active` record or an
    /// open entry with this run_id is `DuplicateOpenEntry`; an ended record is replaced. At
    /// `capture.max_watched`, ended records make room, oldest first; if all are active,
    /// `QueueFull`.
    pub fn run_add(&mut self, rec: RunRecord) -> Result<(), QueueError> {
        self.require_runs()?;
        let key = entry::key(Some(&rec.run_id), None);
        if self
            .state
            .runs
            .iter()
            .any(|r| r.run_id == rec.run_id && r.state == RunState::Active)
            || self
                .state
                .entries
                .iter()
                .any(|e| e.status.is_open() && e.key() == key)
        {
            return Err(QueueError::Duplicate(format!(
                "run {} is active or has an open entry",
                rec.run_id
            )));
        }
        let max = self.settings.max_watched;
        let active = self
            .state
            .runs
            .iter()
            .filter(|r| r.state == RunState::Active && r.run_id != rec.run_id)
            .count();
        if active >= max {
            return Err(QueueError::Full(format!(
                "{max} runs are watched and all are active (capture.max_watched); unwatch one or raise the limit"
            )));
        }
        let what = match &rec.target {
            Target::Unit { unit } => format!("watching {unit} as run {}", rec.run_id),
            Target::Exec { exec, .. } => {
                format!(
                    "run {} ({}) is watched as {}",
                    rec.run_id, exec[0], rec.unit
                )
            }
        };
        let ev = Event::new(EventKind::RunWatched, what)
            .priority(priority::INFO)
            .field("run_id", &rec.run_id)
            .field("unit", &rec.unit)
            .field("uid", rec.uid);
        self.commit(move |s, ctx| {
            let runs = s.runs_mut();
            runs.retain(|r| r.run_id != rec.run_id);
            prune(runs, ctx.wall, max.saturating_sub(1));
            let mut rec = rec;
            rec.created_at = ctx.wall;
            runs.push(rec);
            Ok(((), vec![ev]))
        })
    }

    /// C-1: the start was observed (`invocation_id`), or a record follows a new invocation
    /// (C-3 row 0, C-6). Refreshes `seen_active_at`.
    pub fn run_active(
        &mut self,
        run_id: &str,
        unit: &str,
        invocation_id: &str,
        boot_id: &str,
    ) -> Result<(), QueueError> {
        self.require_enabled()?;
        let r = self.record_of(run_id)?;
        if r.state == RunState::Active
            && r.invocation_id == invocation_id
            && r.unit == unit
            && r.boot_id == boot_id
        {
            return Ok(());
        }
        let (run_id, unit, inv, boot) = (
            run_id.to_string(),
            unit.to_string(),
            invocation_id.to_string(),
            boot_id.to_string(),
        );
        self.commit(move |s, ctx| {
            if let Some(r) = s.runs_mut().iter_mut().find(|r| r.run_id == run_id) {
                r.state = RunState::Active;
                r.unit = unit;
                r.invocation_id = inv;
                r.boot_id = boot;
                r.seen_active_at = ctx.wall;
                r.ended_at = None;
            }
            Ok(((), vec![]))
        })
    }

    /// Drop a record: a `Run` whose start failed, a record whose unit never started
    /// (`run-never-started`), `Unwatch` (C-7), a configured unit no longer matched.
    pub fn run_drop(&mut self, run_id: &str, ev: Option<Event>) -> Result<(), QueueError> {
        self.require_enabled()?;
        self.record_of(run_id)?;
        let run_id = run_id.to_string();
        self.commit(move |s, _| {
            s.runs_mut().retain(|r| r.run_id != run_id);
            Ok(((), ev.into_iter().collect()))
        })
    }

    /// C-7 Unwatch: the run's uid or root; a configured unit cannot be unwatched.
    pub fn run_unwatch(&mut self, caller: &Caller, run_id: &str) -> Result<RunRecord, QueueError> {
        self.require_runs()?;
        let r = self.record_of(run_id)?.clone();
        if !may_act(caller, &r, false) {
            return Err(QueueError::AccessDenied(format!(
                "uid {} may not unwatch run {run_id}: only its own user (uid {}) or root",
                caller.uid, r.uid
            )));
        }
        if r.configured {
            return Err(QueueError::Invalid {
                field: "run_id".into(),
                why: format!(
                    "{} is watched because capture.units matches it: change the configuration to stop watching it",
                    r.unit
                ),
            });
        }
        let ev = Event::new(
            EventKind::RunUnwatched,
            format!(
                "run {run_id} ({}) is no longer watched (unwatched by uid {}); it keeps running",
                r.unit, caller.uid
            ),
        )
        .priority(priority::NOTICE)
        .field("run_id", run_id);
        self.run_drop(run_id, Some(ev))?;
        Ok(r)
    }

    /// C-5 SetEvidence: the run's own uid, a member or root; replaces the declared evidence.
    pub fn run_set_evidence(
        &mut self,
        caller: &Caller,
        run_id: &str,
        evidence: Vec<String>,
    ) -> Result<(), QueueError> {
        self.require_runs()?;
        let r = self.record_of(run_id)?;
        if !may_act(caller, r, true) {
            return Err(QueueError::AccessDenied(format!(
                "uid {} may not declare the evidence of run {run_id}: only its own user, a member of `outlive` or root",
                caller.uid
            )));
        }
        let run_id = run_id.to_string();
        let ev = Event::new(
            EventKind::RunEvidence,
            format!(
                "run {run_id} declared its evidence: {}",
                if evidence.is_empty() {
                    "none".to_string()
                } else {
                    evidence.join(", ")
                }
            ),
        )
        .priority(priority::INFO)
        .field("run_id", &run_id)
        .field("evidence", evidence.join(","));
        self.commit(move |s, _| {
            if let Some(r) = s.runs_mut().iter_mut().find(|r| r.run_id == run_id) {
                r.evidence = evidence;
            }
            Ok(((), vec![ev]))
        })
    }

    /// C-3: record how a watched invocation ended and, for a reap, queue the run (C-11: the
    /// outcome is on the record, audited, never silent). A record that follows another
    /// invocation by now, or is already ended, is left alone.
    pub fn run_end(&mut self, run_id: &str, note: EndNote) -> Result<Ended, QueueError> {
        self.require_enabled()?;
        let Ok(r) = self.record_of(run_id) else {
            return Ok(Ended::Stale);
        };
        if r.state != RunState::Active
            || (!r.invocation_id.is_empty()
                && !note.invocation_id.is_empty()
                && r.invocation_id != note.invocation_id)
        {
            return Ok(Ended::Stale);
        }
        let r = r.clone();
        let how = note.how;
        let message = end_message(&r, &note);
        if !how.is_reap() {
            let ev = not_a_reap(&r, how, &message);
            self.commit(|s, _| {
                mark_ended(s, &r.run_id, &note, None, "");
                Ok(((), vec![ev]))
            })?;
            return Ok(Ended::Recorded);
        }
        let admission = Admission {
            run_as: (r.uid, r.gid),
            by: 0,
            eligibility: true,
        };
        let reply = self.admit(r.request(how.as_str(), note.at), admission, |s, reply| {
            let mut status = String::new();
            if let Some(e) = s.entries.iter_mut().find(|e| e.id == reply.id) {
                e.watched = true;
                status = e.status.text();
            }
            mark_ended(s, &r.run_id, &note, Some((&reply.id, &status)), &reply.why);
        })?;
        let word = reply.why.clone();
        if reply.admitted {
            let cap = if word.is_empty() {
                String::new()
            } else {
                format!(" ({word})")
            };
            self.audit(
                Event::new(
                    EventKind::RunCaptured,
                    format!("{message}; queued for revival as {}{cap}", reply.id),
                )
                .alert(Alert::RunCaptured)
                .field("run_id", &r.run_id)
                .field("how", how.as_str())
                .field("entry_id", &reply.id)
                .field("enqueue", &word),
            );
            return Ok(Ended::Queued {
                entry_id: reply.id,
                why: word,
            });
        }
        // Refused (insufficient evidence, a duplicate, overflow): recorded with the word.
        let ev = Event::new(
            EventKind::RunEnded,
            format!("{message}; not queued: {word}"),
        )
        .priority(priority::NOTICE)
        .field("run_id", &r.run_id)
        .field("how", how.as_str())
        .field("enqueue", &word);
        self.commit(|s, _| {
            mark_ended(s, &r.run_id, &note, None, &word);
            Ok(((), vec![ev]))
        })?;
        Ok(Ended::Refused(word))
    }

    /// C-8 Revive: the record's uid, members, root. Queues the record's target with reason
    /// `revived-by-hand`; Q-4's eligibility rows are skipped, the duplicate rule, the cap and
    /// the bound apply.
    pub fn run_revive(&mut self, caller: &Caller, run_id: &str) -> Result<Reply, QueueError> {
        self.require_runs()?;
        let r = self.record_of(run_id)?.clone();
        if !may_act(caller, &r, true) {
            return Err(QueueError::AccessDenied(format!(
                "uid {} may not revive run {run_id}: only its own user, a member of `outlive` or root",
                caller.uid
            )));
        }
        if r.state == RunState::Active {
            return Err(QueueError::Duplicate(format!(
                "run {run_id} is active: there is nothing to revive"
            )));
        }
        let now = self.clock.wall_ms();
        let req = r.request("revived-by-hand", r.ended_at.unwrap_or(now));
        let admission = Admission {
            run_as: (r.uid, r.gid),
            by: caller.uid,
            eligibility: false,
        };
        let reply = self.admit(req, admission, |s, reply| {
            if let Some(e) = s.entries.iter_mut().find(|e| e.id == reply.id) {
                e.watched = true;
            }
            if let Some(x) = s.runs_mut().iter_mut().find(|x| x.run_id == r.run_id) {
                x.entry_id = Some(reply.id.clone());
                x.enqueue = reply.why.clone();
            }
        })?;
        if reply.admitted {
            self.audit(
                Event::new(
                    EventKind::RevivedByHand,
                    format!(
                        "run {run_id} was queued for revival by uid {} ({})",
                        caller.uid, reply.id
                    ),
                )
                .priority(priority::NOTICE)
                .field("run_id", run_id)
                .field("entry_id", &reply.id),
            );
        }
        Ok(reply)
    }

    /// C-4: `seen_active_at` of active records of this boot, at most hourly (one write for
    /// all of them).
    pub fn runs_seen(&mut self, boot_id: &str) -> Result<(), QueueError> {
        self.require_enabled()?;
        let now = self.clock.wall_ms();
        let due = self.state.runs.iter().any(|r| {
            r.state == RunState::Active
                && r.boot_id == boot_id
                && now.saturating_sub(r.seen_active_at) >= SEEN_REFRESH_MS
        });
        if !due {
            return Ok(());
        }
        let boot = boot_id.to_string();
        self.commit(move |s, ctx| {
            for r in s
                .runs_mut()
                .iter_mut()
                .filter(|r| r.state == RunState::Active && r.boot_id == boot)
            {
                r.seen_active_at = ctx.wall;
            }
            Ok(((), vec![]))
        })
    }
}

/// `run R (unit) ended: how (detail)`.
fn end_message(r: &RunRecord, note: &EndNote) -> String {
    let detail = if note.detail.is_empty() {
        String::new()
    } else {
        format!(" ({})", note.detail)
    };
    format!(
        "run {} ({}) ended: {}{detail}",
        r.run_id,
        r.unit,
        note.how.as_str()
    )
}

/// The event of an end that is not a reap: `unknown` is an alert that stays (C-3 row 9), the
/// rest are recorded.
fn not_a_reap(r: &RunRecord, how: How, message: &str) -> Event {
    if how == How::Unknown {
        Event::new(
            EventKind::RunUnknown,
            format!(
                "{message}: it ended while outlived was not listening and the service manager no longer \
                 knows how; it is not revived. If it was reaped, run `outlivectl revive {}`",
                r.run_id
            ),
        )
        .alert(Alert::RunUnknown)
    } else {
        Event::new(EventKind::RunEnded, format!("{message}; not revived")).priority(priority::INFO)
    }
    .field("run_id", &r.run_id)
    .field("how", how.as_str())
    .field("unit", &r.unit)
}

/// Mark a record ended (C-2): how, when, the invocation that ended, its entry, the enqueue word.
fn mark_ended(
    s: &mut State,
    run_id: &str,
    note: &EndNote,
    entry: Option<(&str, &str)>,
    word: &str,
) {
    if let Some(x) = s.runs_mut().iter_mut().find(|x| x.run_id == run_id) {
        x.state = RunState::Ended(note.how);
        x.ended_at = Some(note.at);
        x.enqueue = word.to_string();
        if !note.invocation_id.is_empty() {
            x.invocation_id.clone_from(&note.invocation_id);
        }
        if let Some((id, status)) = entry {
            x.entry_id = Some(id.to_string());
            x.entry_status = Some(status.to_string());
        }
    }
}

/// C-2 retention: ended records 7 days after they ended, then the oldest ended ones until at
/// most `keep` remain.
pub(super) fn prune(runs: &mut Vec<RunRecord>, now: u64, keep: usize) {
    runs.retain(|r| {
        r.state == RunState::Active
            || now.saturating_sub(r.ended_at.unwrap_or(now)) < ENDED_RETENTION_MS
    });
    while runs.len() > keep {
        let Some(oldest) = runs
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state != RunState::Active)
            .min_by_key(|(_, r)| r.ended_at.unwrap_or(0))
            .map(|(i, _)| i)
        else {
            break;
        };
        runs.remove(oldest);
    }
}

/// C-2: each record shows its latest entry's status; when that entry is `revived`, the record
/// is active again on the revival's unit (its invocation is read by capture when it adopts
/// it). Applied to every state written.
pub(super) fn mirror(s: &mut State, boot_id: Option<&str>) {
    let entry_of = |r: &RunRecord| {
        let id = r.entry_id.as_ref()?;
        s.entries.iter().find(|e| &e.id == id)
    };
    // Most commits change no record: the records stay shared with the published view.
    let stale = |r: &RunRecord| {
        entry_of(r).is_some_and(|e| r.entry_status.as_deref() != Some(e.status.text().as_str()))
    };
    if !s.runs.iter().any(stale) {
        return;
    }
    let entries = &s.entries;
    for r in Arc::make_mut(&mut s.runs) {
        let Some(id) = &r.entry_id else { continue };
        let Some(e) = entries.iter().find(|e| &e.id == id) else {
            continue;
        };
        let status = e.status.text();
        if r.entry_status.as_deref() != Some(status.as_str()) {
            let revived_now = e.status == Status::Revived && r.state != RunState::Active;
            r.entry_status = Some(status);
            if revived_now {
                r.state = RunState::Active;
                if let Some(u) = &e.attempt_unit {
                    r.unit = u.clone();
                }
                r.invocation_id.clear();
                r.ended_at = None;
                if let Some(b) = boot_id {
                    r.boot_id = b.to_string();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c2_run_states_and_words_round_trip() {
        for h in How::ALL {
            assert_eq!(How::parse(h.as_str()), Some(h));
            let st = RunState::Ended(h);
            assert_eq!(RunState::parse(&st.text()), Some(st));
        }
        assert_eq!(RunState::parse("active"), Some(RunState::Active));
        assert_eq!(RunState::parse("ended:bogus"), None);
        let reaps: Vec<&str> = How::ALL
            .into_iter()
            .filter(|h| h.is_reap())
            .map(How::as_str)
            .collect();
        assert_eq!(
            reaps,
            [
                "host-shutdown",
                "host-restart",
                "oom-kill",
                "watchdog",
                "timeout",
                "killed"
            ]
        );
    }
}
