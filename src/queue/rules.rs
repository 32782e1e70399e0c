//! The queue's rules as pure functions (SPEC Q-4 to Q-12, P-1), tested by truth tables.
//! `mod.rs` applies them to the state and persists the result.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::entry::{
    self, Class, Entry, MAX_ARGV, MAX_ENV, MAX_STRING, STRONG, Status, Target, WEAK, check_path,
    forbidden_env, valid_env_name, valid_job, valid_run_id, valid_unit_name,
};

/// The 24-hour sliding window of the resurrection cap (Q-6).
pub const RESURRECTION_WINDOW_MS: u64 = 24 * 3600 * 1000;
/// Terminal entries are kept this long (Q-14) …
pub const RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;
/// … and at most this many.
pub const RETENTION_MAX: usize = 500;

/// An enqueue request, decoded (X-1) but not yet checked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Request {
    pub run_id: Option<String>,
    pub job: Option<String>,
    pub resume_on_reap: bool,
    pub session: String,
    /// None only when neither `unit` nor `exec` was given.
    pub target: Option<Target>,
    pub cwd: Option<String>,
    pub worktree: Option<String>,
    pub reason: String,
    pub disposition: String,
    pub origin: String,
    /// Already clamped (Q-3).
    pub evidence: Vec<String>,
    pub active_run: bool,
    pub run_state_file: Option<String>,
    pub reaped_at: Option<u64>,
    pub user: Option<u32>,
    pub group: Option<u32>,
}

/// The reason that implies `active_run` (Q-1).
pub const ACTIVE_RUN_REASON: &str = "age-limit (active autonomous run)";

impl Request {
    /// X-1 input limits and formats: `Err((field, why))` for `InvalidArgument`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let long = |field, s: &str| {
            if s.len() > MAX_STRING {
                Err((field, format!("longer than {MAX_STRING} bytes")))
            } else {
                Ok(())
            }
        };
        if let Some(r) = &self.run_id
            && !valid_run_id(r)
        {
            return Err(("run_id", "must match [A-Za-z0-9._:@-]{1,128}".into()));
        }
        if let Some(j) = &self.job
            && !valid_job(j)
        {
            return Err(("job", "must match [a-z0-9-]{1,64}".into()));
        }
        long("session", &self.session)?;
        long("reason", &self.reason)?;
        if !matches!(self.disposition.as_str(), "terminal" | "recovery-bounce") {
            return Err((
                "disposition",
                format!("{:?} is not terminal or recovery-bounce", self.disposition),
            ));
        }
        if !matches!(self.origin.as_str(), "autonomous" | "operator") {
            return Err((
                "origin",
                format!("{:?} is not autonomous or operator", self.origin),
            ));
        }
        match &self.target {
            None => return Err(("unit", "one of unit or exec is required".into())),
            Some(Target::Unit { unit }) => {
                if !valid_unit_name(unit) {
                    return Err(("unit", format!("{unit:?} is not a unit name")));
                }
            }
            Some(Target::Exec { exec, env }) => {
                if exec.is_empty() {
                    return Err(("exec", "argv is empty".into()));
                }
                if exec.len() > MAX_ARGV {
                    return Err(("exec", format!("more than {MAX_ARGV} items")));
                }
                if exec
                    .iter()
                    .any(|a| a.len() > MAX_STRING || a.contains('\0'))
                {
                    return Err((
                        "exec",
                        format!("an item is longer than {MAX_STRING} bytes or contains NUL"),
                    ));
                }
                if !exec[0].starts_with('/') {
                    return Err((
                        "exec",
                        format!("argv[0] {:?} must be an absolute path", exec[0]),
                    ));
                }
                if env.len() > MAX_ENV {
                    return Err(("env", format!("more than {MAX_ENV} pairs")));
                }
                for (k, v) in env {
                    if !valid_env_name(k) {
                        return Err(("env", format!("{k:?} is not a variable name")));
                    }
                    if forbidden_env(k) {
                        return Err((
                            "env",
                            format!(
                                "{k} may not be set (LD_*, GCONV_PATH, NOTIFY_SOCKET, OUTLIVE_*)"
                            ),
                        ));
                    }
                    if v.len() > MAX_STRING || v.contains('\0') {
                        return Err((
                            "env",
                            format!(
                                "the value of {k} is longer than {MAX_STRING} bytes or contains NUL"
                            ),
                        ));
                    }
                }
            }
        }
        match &self.cwd {
            None => return Err(("cwd", "required (the run's working directory)".into())),
            Some(c) => check_path(c).map_err(|e| ("cwd", e))?,
        }
        if let Some(w) = &self.worktree {
            check_path(w).map_err(|e| ("worktree", e))?;
        }
        if let Some(f) = &self.run_state_file {
            check_path(f).map_err(|e| ("run_state_file", e))?;
        }
        Ok(())
    }

    /// Whether the run was an active autonomous run (set, or implied by the reason).
    pub fn is_active_run(&self) -> bool {
        self.active_run || self.reason == ACTIVE_RUN_REASON
    }

    /// The stable key (Q-5).
    pub fn key(&self) -> String {
        entry::key(self.run_id.as_deref(), self.job.as_deref())
    }

    /// The class (Q-1).
    pub fn class(&self) -> Class {
        if self.run_id.is_some() {
            Class::Interactive
        } else {
            Class::Job
        }
    }
}

/// Q-4 step 2: eligibility, in order; the first refusal word wins.
pub fn eligibility(r: &Request, include_operator_kills: bool) -> Result<(), &'static str> {
    if r.disposition != "terminal" {
        return Err("not-terminal");
    }
    if r.origin == "operator" && !include_operator_kills {
        return Err("operator-kill");
    }
    if r.reason == "watchdog-stuck" {
        return Err("watchdog-kill");
    }
    if r.reason.starts_with("moved") {
        return Err("moved");
    }
    if r.run_id.is_none() && r.job.is_none() {
        return Err("no-resume-path");
    }
    if r.run_id.is_none() && r.job.is_some() && !r.resume_on_reap {
        return Err("job-not-opted-in");
    }
    let strong = r.evidence.iter().any(|e| STRONG.contains(&e.as_str()));
    let weak = r
        .evidence
        .iter()
        .filter(|e| WEAK.contains(&e.as_str()))
        .count();
    let enough_weak = r.run_id.is_some() && weak >= 2;
    if !(strong || enough_weak) {
        return Err("insufficient-evidence");
    }
    Ok(())
}

/// Q-9 as amended: most operator stops kept.
pub const MAX_STOPS: usize = 1000;

/// Q-9 as amended, pure: record a stop of `run_id` at `at`. Stops are kept per run_id (the
/// latest replaces an earlier one) and at most [`MAX_STOPS`] of them, the oldest dropped first;
/// returns the stops dropped to make room (to be audited).
pub fn record_stop(
    stops: &mut Vec<super::store::RunStop>,
    run_id: &str,
    at: u64,
) -> Vec<super::store::RunStop> {
    stops.retain(|s| s.run_id != run_id);
    stops.push(super::store::RunStop {
        run_id: run_id.to_string(),
        at,
    });
    let mut dropped = vec![];
    while stops.len() > MAX_STOPS {
        let oldest = stops
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| a.at.cmp(&b.at).then_with(|| a.run_id.cmp(&b.run_id)))
            .map(|(i, _)| i)
            .expect("more than MAX_STOPS stops");
        dropped.push(stops.remove(oldest));
    }
    dropped
}

/// The same rule over stops as found (a state written before it held duplicates): the latest
/// per run_id, at most [`MAX_STOPS`], oldest first out; returns what was dropped for room.
pub fn tidy_stops(stops: &mut Vec<super::store::RunStop>) -> Vec<super::store::RunStop> {
    let mut latest: BTreeMap<&str, u64> = BTreeMap::new();
    for s in stops.iter() {
        let at = latest.entry(s.run_id.as_str()).or_insert(s.at);
        *at = (*at).max(s.at);
    }
    let mut kept: Vec<super::store::RunStop> = latest
        .into_iter()
        .map(|(run_id, at)| super::store::RunStop {
            run_id: run_id.to_string(),
            at,
        })
        .collect();
    kept.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.run_id.cmp(&b.run_id)));
    let excess = kept.len().saturating_sub(MAX_STOPS);
    let dropped: Vec<_> = kept.drain(..excess).collect();
    *stops = kept;
    dropped
}

/// Q-1 as amended (SPEC §12): the uid and gid a run is queued as. The caller's own when it
/// names neither; a root caller naming `user` gets that user's primary group from the user
/// database (`named`, looked up before the queue is locked) unless it names `group` too. An
/// unknown uid is refused, and so is gid 0 for a non-zero uid unless `group` was named: a run
/// never borrows the enqueuer's group. Errors are `(field, why)`.
pub fn run_as(
    caller: (u32, u32),
    user: Option<u32>,
    group: Option<u32>,
    named: Option<&crate::facts::users::Lookup>,
) -> Result<(u32, u32), (&'static str, String)> {
    use crate::facts::users::Lookup;
    let Some(uid) = user else {
        return Ok((caller.0, group.unwrap_or(caller.1)));
    };
    let primary = match named {
        Some(Lookup::Found(a)) if a.uid == uid => a.gid,
        Some(Lookup::Unknown) => {
            return Err((
                "user",
                format!(
                    "uid {uid} is not in the user database: a run must run as a user that exists"
                ),
            ));
        }
        Some(Lookup::Failed(why)) => {
            return Err(("user", format!("{why}; try again when it answers")));
        }
        Some(Lookup::Found(_)) | None => {
            return Err((
                "user",
                format!("uid {uid} was not looked up in the user database"),
            ));
        }
    };
    match group {
        Some(gid) => Ok((uid, gid)),
        None if primary == 0 && uid != 0 => Err((
            "group",
            format!(
                "the primary group of uid {uid} is gid 0 (root): name the group explicitly \
                 (`group`; outlivectl enqueue --as-gid 0) to run it with group root"
            ),
        )),
        None => Ok((uid, primary)),
    }
}

/// Q-7: what to do with a newcomer when the queue may be full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    Admit,
    /// Admit, and make this entry (by index) `gave-up:overflow`.
    Evict(usize),
    /// Refuse the newcomer `overflow`.
    Overflow,
}

/// Q-7. When `max` open entries exist: refuse a newcomer of lower priority than every open
/// entry; otherwise evict the oldest `queued` (never `starting`) entry of the lowest class
/// present among those the newcomer may displace (its own class or lower).
pub fn bound(entries: &[Entry], newcomer: Class, max: usize) -> Bound {
    let open: Vec<&Entry> = entries.iter().filter(|e| e.status.is_open()).collect();
    if open.len() < max {
        return Bound::Admit;
    }
    if open.iter().all(|e| e.class < newcomer) {
        return Bound::Overflow;
    }
    let victim = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.status == Status::Queued && e.class >= newcomer)
        .max_by(|(_, a), (_, b)| {
            a.class
                .cmp(&b.class)
                .then(b.queued_at.cmp(&a.queued_at))
                .then(b.id.cmp(&a.id))
        });
    match victim {
        Some((i, _)) => Bound::Evict(i),
        None => Bound::Overflow,
    }
}

/// Q-8: indices of the candidates (queued, backoff elapsed), interactive before job, then by
/// `queued_at` (a requeued entry keeps its place), then id.
pub fn candidates(entries: &[Entry], now_boot: u64) -> Vec<usize> {
    let mut c: Vec<usize> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            e.status == Status::Queued && e.next_attempt_boot.is_none_or(|t| now_boot >= t)
        })
        .map(|(i, _)| i)
        .collect();
    c.sort_by(|&a, &b| {
        let (x, y) = (&entries[a], &entries[b]);
        x.class
            .cmp(&y.class)
            .then(x.queued_at.cmp(&y.queued_at))
            .then(x.id.cmp(&y.id))
    });
    c
}

/// Q-11: a queued entry whose waiting time minus frozen time exceeds the TTL.
pub fn ttl_expired(e: &Entry, ttl_ms: u64) -> bool {
    e.status == Status::Queued && e.waited_ms.saturating_sub(e.frozen_ms) > ttl_ms
}

/// Q-11: starved by pressure when calm for less than 10 % of its wait.
pub fn pressure_starved(e: &Entry) -> bool {
    e.calm_ms.saturating_mul(10) < e.waited_ms
}

/// Why a requeue is refused (Q-10), in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequeueRefusal {
    Paused,
    NotFound,
    NotGaveUp,
    DuplicateOpenEntry,
    QueueFull,
}

/// Q-10 checks.
pub fn requeue_check(
    entries: &[Entry],
    id: &str,
    paused: bool,
    max: usize,
) -> Result<usize, RequeueRefusal> {
    if paused {
        return Err(RequeueRefusal::Paused);
    }
    let i = entries
        .iter()
        .position(|e| e.id == id)
        .ok_or(RequeueRefusal::NotFound)?;
    if !matches!(entries[i].status, Status::GaveUp(_)) {
        return Err(RequeueRefusal::NotGaveUp);
    }
    let k = entries[i].key();
    if entries.iter().any(|e| e.status.is_open() && e.key() == k) {
        return Err(RequeueRefusal::DuplicateOpenEntry);
    }
    if entries.iter().filter(|e| e.status.is_open()).count() >= max {
        return Err(RequeueRefusal::QueueFull);
    }
    Ok(i)
}

/// The resurrection ledger (Q-6): successful revivals per key, surviving the entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger(pub BTreeMap<String, Vec<u64>>);

impl Ledger {
    /// Revivals of `key` within the 24 h before `now`.
    pub fn recent(&self, key: &str, now: u64) -> usize {
        self.0.get(key).map_or(0, |v| {
            v.iter()
                .filter(|&&t| now.saturating_sub(t) < RESURRECTION_WINDOW_MS)
                .count()
        })
    }

    /// Record a revival.
    pub fn record(&mut self, key: &str, at: u64) {
        self.0.entry(key.to_string()).or_default().push(at);
    }

    /// Forget revivals older than the window; rows expire 24 h after their last revival.
    pub fn expire(&mut self, now: u64) {
        for v in self.0.values_mut() {
            v.retain(|&t| now.saturating_sub(t) < RESURRECTION_WINDOW_MS);
        }
        self.0.retain(|_, v| !v.is_empty());
    }
}

/// Pause kinds (P-1), in the order they outrank each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PauseKind {
    Emergency,
    Maintenance,
    DeliberateHalt,
}

impl PauseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PauseKind::Emergency => "emergency",
            PauseKind::Maintenance => "maintenance",
            PauseKind::DeliberateHalt => "deliberate-halt",
        }
    }

    pub fn parse(s: &str) -> Option<PauseKind> {
        match s {
            "emergency" => Some(PauseKind::Emergency),
            "maintenance" => Some(PauseKind::Maintenance),
            "deliberate-halt" => Some(PauseKind::DeliberateHalt),
            _ => None,
        }
    }
}

/// The one pause record (P-1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    pub kind: PauseKind,
    pub reason: String,
    /// Wall ms. A value that is not a millisecond count (hand-edited, or written by another
    /// tool) reads as 0: malformed, so the pause never heals by itself (P-5), and the rest of
    /// the state still loads.
    #[serde(default, deserialize_with = "lenient_ms")]
    pub paused_at: u64,
}

fn lenient_ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(v.as_u64().unwrap_or(0))
}

/// What a pause request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseChange {
    New,
    /// A higher kind replaced a lower one (kind and reason; `paused_at` unchanged).
    Upgraded,
    /// Never a downgrade: nothing changed.
    NoOp,
}

/// P-1: apply a pause request to the current pause.
pub fn apply_pause(
    current: Option<&Pause>,
    kind: PauseKind,
    reason: &str,
    now: u64,
) -> (Option<Pause>, PauseChange) {
    match current {
        None => (
            Some(Pause {
                kind,
                reason: reason.to_string(),
                paused_at: now,
            }),
            PauseChange::New,
        ),
        Some(p) if kind > p.kind => (
            Some(Pause {
                kind,
                reason: reason.to_string(),
                paused_at: p.paused_at,
            }),
            PauseChange::Upgraded,
        ),
        Some(p) => (Some(p.clone()), PauseChange::NoOp),
    }
}

/// Q-1 ids: `rq-<ms base36>-<counter base36>`, with ms = max(now, last + 1) so ids never repeat
/// even when the clock steps back.
pub fn next_id(last_id_ms: &mut u64, seq: &mut u64, now_ms: u64) -> String {
    let ms = now_ms.max(*last_id_ms + 1);
    *last_id_ms = ms;
    *seq = (*seq + 1) % 36u64.pow(8);
    format!("rq-{}-{}", base36(ms), base36(*seq))
}

fn base36(mut n: u64) -> String {
    const D: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    if n == 0 {
        return "0".into();
    }
    let mut out = Vec::new();
    while n > 0 {
        out.push(D[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::entry::valid_id;

    fn req() -> Request {
        Request {
            run_id: Some("r1".into()),
            disposition: "terminal".into(),
            origin: "autonomous".into(),
            evidence: vec!["active-subagent".into()],
            target: Some(Target::Unit {
                unit: "demo.service".into(),
            }),
            cwd: Some("/home/u".into()),
            ..Request::default()
        }
    }

    /// A change to a request, for table tests.
    type Edit = Box<dyn Fn(&mut Request)>;

    #[test]
    fn q4_eligibility_in_order() {
        let base = req();
        assert_eq!(eligibility(&base, false), Ok(()));
        let cases: Vec<(Edit, bool, &str)> = vec![
            (
                Box::new(|r| r.disposition = "recovery-bounce".into()),
                false,
                "not-terminal",
            ),
            (
                Box::new(|r| r.origin = "operator".into()),
                false,
                "operator-kill",
            ),
            (
                Box::new(|r| r.reason = "watchdog-stuck".into()),
                false,
                "watchdog-kill",
            ),
            (
                Box::new(|r| r.reason = "moved to host-b".into()),
                false,
                "moved",
            ),
            (Box::new(|r| r.run_id = None), false, "no-resume-path"),
            (
                Box::new(|r| {
                    r.run_id = None;
                    r.job = Some("nightly".into());
                }),
                false,
                "job-not-opted-in",
            ),
            (
                Box::new(|r| r.evidence = vec!["relay-lease".into()]),
                false,
                "insufficient-evidence",
            ),
            (
                Box::new(|r| r.evidence = vec![crate::queue::entry::MARKER.into()]),
                false,
                "insufficient-evidence",
            ),
        ];
        for (f, ops, word) in cases {
            let mut r = base.clone();
            f(&mut r);
            assert_eq!(eligibility(&r, ops), Err(word));
        }
        // First refusal wins: a recovery bounce of an operator kill is "not-terminal".
        let mut r = base.clone();
        r.disposition = "recovery-bounce".into();
        r.origin = "operator".into();
        r.evidence.clear();
        assert_eq!(eligibility(&r, false), Err("not-terminal"));
        // Operator kills are admitted when configured.
        let mut r = base.clone();
        r.origin = "operator".into();
        assert_eq!(eligibility(&r, true), Ok(()));
        // A job that opted in; two distinct weak items suffice only with a run id.
        let mut r = base.clone();
        r.run_id = None;
        r.job = Some("nightly".into());
        r.resume_on_reap = true;
        assert_eq!(eligibility(&r, false), Ok(()));
        r.evidence = vec!["relay-lease".into(), "active-process".into()];
        assert_eq!(eligibility(&r, false), Err("insufficient-evidence"));
        let mut r = base.clone();
        r.evidence = vec!["relay-lease".into(), "active-process".into()];
        assert_eq!(eligibility(&r, false), Ok(()));
    }

    #[test]
    fn x1_validation_names_the_field() {
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|r| r.run_id = Some("bad id".into())), "run_id"),
            (Box::new(|r| r.job = Some("Bad".into())), "job"),
            (Box::new(|r| r.session = "x".repeat(4097)), "session"),
            (Box::new(|r| r.reason = "x".repeat(4097)), "reason"),
            (Box::new(|r| r.disposition = "maybe".into()), "disposition"),
            (Box::new(|r| r.origin = "someone".into()), "origin"),
            (Box::new(|r| r.target = None), "unit"),
            (
                Box::new(|r| {
                    r.target = Some(Target::Unit {
                        unit: "no-suffix".into(),
                    })
                }),
                "unit",
            ),
            (
                Box::new(|r| {
                    r.target = Some(Target::Exec {
                        exec: vec![],
                        env: Default::default(),
                    })
                }),
                "exec",
            ),
            (
                Box::new(|r| {
                    r.target = Some(Target::Exec {
                        exec: vec!["rel/x".into()],
                        env: Default::default(),
                    })
                }),
                "exec",
            ),
            (
                Box::new(|r| {
                    r.target = Some(Target::Exec {
                        exec: vec!["/x".into(); 65],
                        env: Default::default(),
                    })
                }),
                "exec",
            ),
            (
                Box::new(|r| {
                    r.target = Some(Target::Exec {
                        exec: vec!["/x".into()],
                        env: [("LD_PRELOAD".into(), "y".into())].into(),
                    })
                }),
                "env",
            ),
            (
                Box::new(|r| {
                    let env = (0..65).map(|i| (format!("V{i}"), "1".into())).collect();
                    r.target = Some(Target::Exec {
                        exec: vec!["/x".into()],
                        env,
                    })
                }),
                "env",
            ),
            (Box::new(|r| r.cwd = None), "cwd"),
            (Box::new(|r| r.cwd = Some("relative".into())), "cwd"),
            (Box::new(|r| r.worktree = Some("w".into())), "worktree"),
            (
                Box::new(|r| r.run_state_file = Some(format!("/{}", "a".repeat(4096)))),
                "run_state_file",
            ),
        ];
        for (f, field) in cases {
            let mut r = req();
            f(&mut r);
            assert_eq!(r.validate().map_err(|(f, _)| f), Err(field));
        }
        assert_eq!(req().validate(), Ok(()));
    }

    fn entry(id: &str, class: Class, status: Status, queued_at: u64) -> Entry {
        Entry {
            id: id.into(),
            run_id: (class == Class::Interactive).then(|| format!("run-{id}")),
            job: (class == Class::Job).then(|| format!("job-{id}")),
            session: String::new(),
            target: Target::Unit {
                unit: "x.service".into(),
            },
            uid: 0,
            gid: 0,
            enqueued_by: None,
            cwd: "/".into(),
            worktree: None,
            class,
            reason: String::new(),
            active_run: false,
            run_state_file: None,
            evidence: vec![],
            status,
            attempts: 0,
            attempt_unit: None,
            attempt_pid: None,
            reaped_at: 0,
            queued_at,
            requeued_at: None,
            last_attempt_at: None,
            next_attempt_at: None,
            waited_ms: 0,
            calm_ms: 0,
            frozen_ms: 0,
            pressure_starved: false,
            terminal_at: None,
            history: vec![],
            watched: false,
            next_attempt_boot: None,
            wait_anchor_boot: 0,
        }
    }

    use Class::{Interactive as I, Job as J};

    #[test]
    fn q7_bound_truth_table() {
        let q = Status::Queued;
        let s = Status::Starting;
        // Room left.
        assert_eq!(bound(&[entry("a", J, q.clone(), 1)], I, 2), Bound::Admit);
        // Full of interactive entries: a job is lower than every open entry.
        let full_i = vec![entry("a", I, q.clone(), 1), entry("b", I, q.clone(), 2)];
        assert_eq!(bound(&full_i, J, 2), Bound::Overflow);
        // An interactive newcomer displaces the oldest queued of the lowest class present.
        let mixed = vec![
            entry("a", I, q.clone(), 1),
            entry("b", J, q.clone(), 5),
            entry("c", J, q.clone(), 3),
        ];
        assert_eq!(bound(&mixed, I, 3), Bound::Evict(2));
        // A job newcomer displaces the oldest queued job (drop-oldest within its class).
        assert_eq!(bound(&mixed, J, 3), Bound::Evict(2));
        // Only interactive entries queued, all interactive: the oldest goes.
        assert_eq!(bound(&full_i, I, 2), Bound::Evict(0));
        // Starting entries are never displaced.
        let starting = vec![entry("a", J, s.clone(), 1), entry("b", J, s.clone(), 2)];
        assert_eq!(bound(&starting, I, 2), Bound::Overflow);
        // A job never displaces an interactive entry, even when the jobs present are starting.
        let edge = vec![entry("a", I, q.clone(), 1), entry("b", J, s.clone(), 2)];
        assert_eq!(bound(&edge, J, 2), Bound::Overflow);
        // Terminal entries do not count.
        let t = vec![
            entry("a", J, Status::Revived, 1),
            entry("b", J, Status::Cancelled, 2),
        ];
        assert_eq!(bound(&t, J, 2), Bound::Admit);
    }

    #[test]
    fn q8_order_class_then_queued_at_and_backoff() {
        let mut es = vec![
            entry("j-old", J, Status::Queued, 1),
            entry("i-new", I, Status::Queued, 9),
            entry("i-old", I, Status::Queued, 5),
            entry("i-start", I, Status::Starting, 0),
            entry("i-backoff", I, Status::Queued, 2),
        ];
        es[4].next_attempt_boot = Some(1000);
        let ids = |v: Vec<usize>| v.into_iter().map(|i| es[i].id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(candidates(&es, 999)), vec!["i-old", "i-new", "j-old"]);
        assert_eq!(
            ids(candidates(&es, 1000)),
            vec!["i-backoff", "i-old", "i-new", "j-old"]
        );
    }

    #[test]
    fn q11_ttl_boundary_and_freeze() {
        let ttl = 24 * 3600 * 1000;
        let mut e = entry("a", I, Status::Queued, 0);
        e.waited_ms = ttl;
        assert!(!ttl_expired(&e, ttl), "exactly the TTL is not expired");
        e.waited_ms = ttl + 1;
        assert!(ttl_expired(&e, ttl));
        e.frozen_ms = 1;
        assert!(!ttl_expired(&e, ttl), "paused time does not count");
        e.status = Status::Starting;
        e.frozen_ms = 0;
        assert!(!ttl_expired(&e, ttl), "only queued entries expire");
        let mut e = entry("b", I, Status::Queued, 0);
        e.waited_ms = 1000;
        e.calm_ms = 99;
        assert!(pressure_starved(&e));
        e.calm_ms = 100;
        assert!(!pressure_starved(&e));
    }

    #[test]
    fn q10_requeue_refusals_in_order() {
        let mut es = vec![
            entry("g", I, Status::GaveUp("ttl".into()), 1),
            entry("r", I, Status::Revived, 1),
            entry("c", I, Status::Cancelled, 1),
            entry("v", I, Status::Invalidated("cwd-missing".into()), 1),
            entry("q", I, Status::Queued, 1),
        ];
        assert_eq!(
            requeue_check(&es, "g", true, 50),
            Err(RequeueRefusal::Paused)
        );
        assert_eq!(
            requeue_check(&es, "nope", false, 50),
            Err(RequeueRefusal::NotFound)
        );
        for id in ["r", "c", "v", "q"] {
            assert_eq!(
                requeue_check(&es, id, false, 50),
                Err(RequeueRefusal::NotGaveUp),
                "{id}"
            );
        }
        assert_eq!(
            requeue_check(&es, "g", false, 1),
            Err(RequeueRefusal::QueueFull)
        );
        assert_eq!(requeue_check(&es, "g", false, 50), Ok(0));
        es[4].run_id = es[0].run_id.clone();
        assert_eq!(
            requeue_check(&es, "g", false, 50),
            Err(RequeueRefusal::DuplicateOpenEntry)
        );
    }

    #[test]
    fn q6_ledger_sliding_window() {
        let mut l = Ledger::default();
        l.record("run:a", 0);
        l.record("run:a", 10);
        assert_eq!(l.recent("run:a", 100), 2);
        assert_eq!(
            l.recent("run:a", RESURRECTION_WINDOW_MS),
            1,
            "the first slid out"
        );
        assert_eq!(l.recent("run:a", RESURRECTION_WINDOW_MS + 10), 0);
        l.expire(RESURRECTION_WINDOW_MS + 5);
        assert_eq!(l.0["run:a"], vec![10]);
        l.expire(RESURRECTION_WINDOW_MS + 10);
        assert!(l.0.is_empty(), "rows expire 24 h after their last revival");
    }

    #[test]
    fn p1_pause_never_downgrades() {
        use PauseKind::*;
        let (p, c) = apply_pause(None, Emergency, "sentinel", 100);
        assert_eq!(c, PauseChange::New);
        let p = p.unwrap();
        for (kind, change) in [
            (Emergency, PauseChange::NoOp),
            (Maintenance, PauseChange::Upgraded),
            (DeliberateHalt, PauseChange::Upgraded),
        ] {
            let (n, c) = apply_pause(Some(&p), kind, "later", 200);
            assert_eq!(c, change, "{kind:?}");
            let n = n.unwrap();
            assert_eq!(n.paused_at, 100, "paused_at unchanged");
            if c == PauseChange::Upgraded {
                assert_eq!((n.kind, n.reason.as_str()), (kind, "later"));
            } else {
                assert_eq!(n, p);
            }
        }
        let m = Pause {
            kind: Maintenance,
            reason: "m".into(),
            paused_at: 1,
        };
        assert_eq!(
            apply_pause(Some(&m), Emergency, "e", 2).1,
            PauseChange::NoOp
        );
        assert_eq!(
            apply_pause(Some(&m), DeliberateHalt, "h", 2).1,
            PauseChange::Upgraded
        );
        let h = Pause {
            kind: DeliberateHalt,
            reason: "h".into(),
            paused_at: 1,
        };
        assert_eq!(
            apply_pause(Some(&h), Emergency, "e", 2).1,
            PauseChange::NoOp
        );
        assert_eq!(
            apply_pause(Some(&h), Maintenance, "m", 2).1,
            PauseChange::NoOp
        );
    }

    #[test]
    fn q1_ids_never_repeat_even_when_the_clock_steps_back() {
        let (mut last, mut seq) = (0u64, 0u64);
        let mut seen = std::collections::HashSet::new();
        for now in [
            1_795_000_000_000u64,
            1_795_000_000_000,
            1_794_000_000_000,
            1_795_000_000_001,
        ] {
            let id = next_id(&mut last, &mut seq, now);
            assert!(valid_id(&id), "{id}");
            assert!(seen.insert(id), "repeated");
        }
        assert_eq!(last, 1_795_000_000_003);
    }

    /// Q-9 as amended (security review finding 7): 4,000 stops of distinct runs kept 4,000
    /// records. Now one per run (the latest) and at most 1,000, the oldest out first.
    #[test]
    fn q9_stops_are_kept_per_run_and_at_most_1000() {
        let mut stops = vec![];
        let mut dropped = vec![];
        for i in 0..4000u64 {
            dropped.extend(record_stop(&mut stops, &format!("run-{i}"), 1000 + i));
        }
        assert_eq!(stops.len(), MAX_STOPS);
        assert_eq!(dropped.len(), 3000);
        assert_eq!(dropped[0].run_id, "run-0");
        assert_eq!(stops[0].run_id, "run-3000");
        // Stopped again: one record, the latest, and the oldest other one stays.
        record_stop(&mut stops, "run-3500", 99_999);
        assert_eq!(stops.len(), MAX_STOPS);
        let mine: Vec<_> = stops.iter().filter(|s| s.run_id == "run-3500").collect();
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].at, 99_999);
        assert_eq!(stops[0].run_id, "run-3000");
        // A state written before the rule, with duplicates, is tidied to the same shape.
        let mut old: Vec<super::super::store::RunStop> = (0..3)
            .map(|i| super::super::store::RunStop {
                run_id: "same".into(),
                at: 10 + i,
            })
            .collect();
        assert!(tidy_stops(&mut old).is_empty());
        assert_eq!(old.len(), 1);
        assert_eq!(old[0].at, 12);
    }
}
