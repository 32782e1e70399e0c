//! Queue entries (SPEC ): the fields, the statuses, the formats and limits, and
//! the validation shared by every way in (D-Bus, the state file, `outlivectl`).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Most evidence items kept.
pub const MAX_EVIDENCE: usize = 32;
/// Most Unicode scalar values in a reason.
pub const MAX_REASON: usize = 500;
/// Most bytes in a string argument.
pub const MAX_STRING: usize = 4096;
/// Most bytes in a path.
pub const MAX_PATH: usize = 4096;
/// Most argv items and env pairs.
pub const MAX_ARGV: usize = 64;
pub const MAX_ENV: usize = 64;
/// Most history records kept per entry.
pub const MAX_HISTORY: usize = 32;

/// Strong evidence.
pub const STRONG: [&str; 6] = [
    "build-or-autonomous-active",
    "active-subagent",
    "pending-injection",
    "open-commitment",
    "structural-long-work",
    "uncommitted-worktree-work",
];
/// Weak evidence.
pub const WEAK: [&str; 4] = [
    "active-process",
    "main-process-active",
    "recent-user-message",
    "relay-lease",
];
/// A marker that never counts.
pub const MARKER: &str = "unverified-under-pressure";

/// drop unknown names and non-strings, collapse duplicates, keep first-seen order, at most
/// 32 items. `None` items stand for non-strings.
pub fn clamp_evidence<'a>(items: impl IntoIterator<Item = Option<&'a str>>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for it in items.into_iter().flatten() {
        let known = STRONG.contains(&it) || WEAK.contains(&it) || it == MARKER;
        if known && !out.iter().any(|e| e == it) {
            out.push(it.to_string());
            if out.len() == MAX_EVIDENCE {
                break;
            }
        }
    }
    out
}

/// Priority class: interactive (a run with a stable identity) before job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    Interactive,
    Job,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Interactive => "interactive",
            Class::Job => "job",
        }
    }
}

/// Entry status.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Status {
    Queued,
    Starting,
    Revived,
    Cancelled,
    Invalidated(String),
    GaveUp(String),
}

impl Status {
    /// `queued` and `starting` are open; the rest are terminal.
    pub fn is_open(&self) -> bool {
        matches!(self, Status::Queued | Status::Starting)
    }

    /// The status as written (`gave-up:ttl`).
    pub fn text(&self) -> String {
        match self {
            Status::Queued => "queued".into(),
            Status::Starting => "starting".into(),
            Status::Revived => "revived".into(),
            Status::Cancelled => "cancelled".into(),
            Status::Invalidated(w) => format!("invalidated:{w}"),
            Status::GaveUp(w) => format!("gave-up:{w}"),
        }
    }

    /// Parse a written status.
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "queued" => Status::Queued,
            "starting" => Status::Starting,
            "revived" => Status::Revived,
            "cancelled" => Status::Cancelled,
            _ => {
                let (kind, why) = s.split_once(':')?;
                if why.is_empty()
                    || !why
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                {
                    return None;
                }
                match kind {
                    "invalidated" => Status::Invalidated(why.into()),
                    "gave-up" => Status::GaveUp(why.into()),
                    _ => return None,
                }
            }
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

impl Serialize for Status {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text())
    }
}

impl<'de> Deserialize<'de> for Status {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Status, D::Error> {
        let s = String::deserialize(d)?;
        Status::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown status {s:?}")))
    }
}

/// What to revive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Target {
    Unit {
        unit: String,
    },
    Exec {
        exec: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
    },
}

impl Target {
    /// `unit` or `exec`.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Unit { .. } => "unit",
            Target::Exec { .. } => "exec",
        }
    }
}

/// One recorded transition (the entry's history: every status it went through, and why).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Status>,
    pub to: Status,
    pub by: String,
}

/// A queue entry. Instants are wall-clock ms; `*_boot` fields are in-memory CLOCK_BOOTTIME.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(default)]
    pub session: String,
    pub target: Target,
    pub uid: u32,
    pub gid: u32,
    /// The uid of the caller that queued it (D-6 check 2 re-checks a non-root enqueuer's
    /// authority at the attempt). Absent in entries written before it was recorded: the
    /// entry's uid stands for it then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enqueued_by: Option<u32>,
    pub cwd: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worktree: Option<String>,
    pub class: Class,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub active_run: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_state_file: Option<String>,
    #[serde(default)]
    pub evidence: Vec<String>,
    pub status: Status,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_unit: Option<String>,
    /// The spawned process of the current attempt where there is no systemd (pid, start time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_pid: Option<(i64, u64)>,
    pub reaped_at: u64,
    pub queued_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requeued_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt_at: Option<u64>,
    /// Wall ms when the backoff ends (persisted form; recomputed at start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<u64>,
    #[serde(default)]
    pub waited_ms: u64,
    #[serde(default)]
    pub calm_ms: u64,
    #[serde(default)]
    pub frozen_ms: u64,
    #[serde(default)]
    pub pressure_starved: bool,
    /// When the entry became terminal (retention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal_at: Option<u64>,
    #[serde(default)]
    pub history: Vec<Transition>,
    /// Queued by capture for a watched run (C-6: its revival is verified by how it ends).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub watched: bool,
    /// CLOCK_BOOTTIME when the backoff ends (in memory).
    #[serde(skip)]
    pub next_attempt_boot: Option<u64>,
    /// CLOCK_BOOTTIME up to which `waited_ms` is accounted (in memory).
    #[serde(skip)]
    pub wait_anchor_boot: u64,
}

impl Entry {
    /// `run:<run_id>` if run_id, else `job:<job>`.
    pub fn key(&self) -> String {
        key(self.run_id.as_deref(), self.job.as_deref())
    }

    /// The TTL anchor: when the entry (re)entered the queue.
    pub fn ttl_anchor(&self) -> u64 {
        self.requeued_at.unwrap_or(self.queued_at)
    }

    /// A name for messages: the session, else the run id or job.
    pub fn label(&self) -> String {
        if !self.session.is_empty() {
            self.session.clone()
        } else if let Some(r) = &self.run_id {
            format!("run {r}")
        } else if let Some(j) = &self.job {
            format!("job {j}")
        } else {
            self.id.clone()
        }
    }

    /// Record a transition in the history (bounded: the first record and the latest ones).
    pub fn record(&mut self, from: Option<Status>, to: Status, by: &str, at: u64) {
        if self.history.len() >= MAX_HISTORY {
            self.history.remove(1);
        }
        self.history.push(Transition {
            at,
            from,
            to,
            by: by.to_string(),
        });
    }
}

///
pub fn key(run_id: Option<&str>, job: Option<&str>) -> String {
    match (run_id, job) {
        (Some(r), _) => format!("run:{r}"),
        (None, Some(j)) => format!("job:{j}"),
        (None, None) => String::new(),
    }
}

/// `^rq-[0-9a-z]{1,12}-[0-9a-z]{1,8}$`.
pub fn valid_id(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("rq-") else {
        return false;
    };
    let Some((a, b)) = rest.split_once('-') else {
        return false;
    };
    let ok = |p: &str, max: usize| {
        !p.is_empty()
            && p.len() <= max
            && p.bytes()
                .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
    };
    ok(a, 12) && ok(b, 8)
}

/// `[A-Za-z0-9._:@-]{1,128}`.
pub fn valid_run_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._:@-".contains(&c))
}

/// `[a-z0-9-]{1,64}`.
pub fn valid_job(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

/// An absolute path within limits.
pub fn check_path(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("empty path".into());
    }
    if p.len() > MAX_PATH {
        return Err(format!("longer than {MAX_PATH} bytes"));
    }
    if p.contains('\0') {
        return Err("contains NUL".into());
    }
    if !p.starts_with('/') {
        return Err(format!("{p:?} is not absolute"));
    }
    Ok(())
}

/// Environment names refused at enqueue (D-9): the loader's, `GCONV_PATH`, `NOTIFY_SOCKET` and
/// the agent's own.
pub fn forbidden_env(name: &str) -> bool {
    name.starts_with("LD_")
        || name == "GCONV_PATH"
        || name == "NOTIFY_SOCKET"
        || name.starts_with("OUTLIVE_")
}

/// A syntactically valid environment name.
pub fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// A systemd unit name (`foo.service`, `bar@x.service`).
pub fn valid_unit_name(s: &str) -> bool {
    let Some((stem, suffix)) = s.rsplit_once('.') else {
        return false;
    };
    !stem.is_empty()
        && s.len() <= 255
        && matches!(
            suffix,
            "service" | "target" | "timer" | "socket" | "path" | "scope" | "slice" | "mount"
        )
        && stem
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b":-_.\\@".contains(&c))
}

/// Truncate to at most `MAX_REASON` Unicode scalar values, on a character boundary.
pub fn clamp_reason(s: &str) -> String {
    s.chars().take(MAX_REASON).collect()
}

/// Whether `name` matches the glob `pattern` (`*`, `?`, `[…]` with ranges and `!`/`^`). Linear
/// backtracking to the last `*`: at most len(pattern) × len(name) steps, whatever the input.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // One pattern element at p[i] against c: Some(next i) when it matches.
    let one = |i: usize, c: char| -> Option<usize> {
        match p[i] {
            '?' => Some(i + 1),
            '[' => {
                let close = p[i + 1..].iter().position(|&x| x == ']').map(|k| i + 1 + k);
                let Some(close) = close else {
                    return (c == '[').then_some(i + 1);
                };
                let set = &p[i + 1..close];
                let (negate, set) = match set.first() {
                    Some('!') | Some('^') => (true, &set[1..]),
                    _ => (false, set),
                };
                let mut hit = false;
                let mut k = 0;
                while k < set.len() {
                    if k + 2 < set.len() && set[k + 1] == '-' {
                        hit |= set[k] <= c && c <= set[k + 2];
                        k += 3;
                    } else {
                        hit |= set[k] == c;
                        k += 1;
                    }
                }
                (hit != negate).then_some(close + 1)
            }
            x => (x == c).then_some(i + 1),
        }
    };
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && p[i] == '*' {
            star = Some((i + 1, j));
            i += 1;
        } else if let Some(next) = (i < p.len()).then(|| one(i, n[j])).flatten() {
            i = next;
            j += 1;
        } else if let Some((si, sj)) = star {
            // Let the last `*` take one more character and retry from there.
            i = si;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// Unit types a pattern of `queue.allowed_units` may name as its suffix.
const UNIT_SUFFIXES: [&str; 8] = [
    "service", "target", "timer", "socket", "path", "scope", "slice", "mount",
];

/// Whether a non-root caller may name `unit` under the `queue.allowed_units` pattern `pattern`
/// (SPEC §9 and §12): the name part and the suffix match separately (a pattern without a unit
/// suffix means `.service`, so `build-*` never admits `build-x.mount`), and a template
/// instance (`name@instance.suffix`) must be a plain name, `[A-Za-z0-9:_.-]+`: no `\` escape
/// can smuggle `/etc/shadow` into a template's `%I`.
pub fn unit_allowed(pattern: &str, unit: &str) -> bool {
    let Some((name, suffix)) = unit.rsplit_once('.') else {
        return false;
    };
    let (pname, psuffix) = match pattern.rsplit_once('.') {
        Some((n, s)) if UNIT_SUFFIXES.iter().any(|u| glob_match(s, u)) => (n, s),
        _ => (pattern, "service"),
    };
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b":_.-".contains(&c))
    };
    if let Some((_, instance)) = name.split_once('@')
        && !plain(instance)
    {
        return false;
    }
    glob_match(psuffix, suffix) && glob_match(pname, name)
}

/// D-6 step 1 field invariants: why an entry (e.g. from an edited state file) is corrupt.
pub fn corrupt_reason(e: &Entry) -> Option<String> {
    if !valid_id(&e.id) {
        return Some(format!("bad id {:?}", e.id));
    }
    if let Some(r) = &e.run_id
        && !valid_run_id(r)
    {
        return Some("bad run_id".into());
    }
    if let Some(j) = &e.job
        && !valid_job(j)
    {
        return Some("bad job slug".into());
    }
    if e.run_id.is_none() && e.job.is_none() {
        return Some("neither run_id nor job".into());
    }
    let want = if e.run_id.is_some() {
        Class::Interactive
    } else {
        Class::Job
    };
    if e.class != want {
        return Some(format!(
            "class {} does not match the identity",
            e.class.as_str()
        ));
    }
    if check_path(&e.cwd).is_err() {
        return Some("cwd is not an absolute path".into());
    }
    if let Some(w) = &e.worktree
        && check_path(w).is_err()
    {
        return Some("worktree is not an absolute path".into());
    }
    if let Some(f) = &e.run_state_file
        && check_path(f).is_err()
    {
        return Some("run_state_file is not an absolute path".into());
    }
    if e.evidence.len() > MAX_EVIDENCE {
        return Some("more than 32 evidence items".into());
    }
    if e.reason.chars().count() > MAX_REASON {
        return Some("reason over the cap".into());
    }
    match &e.target {
        Target::Unit { unit } if !valid_unit_name(unit) => {
            return Some(format!("bad unit name {unit:?}"));
        }
        Target::Exec { exec, env } => {
            match exec.first() {
                None => return Some("empty exec argv".into()),
                Some(a0) if !a0.starts_with('/') => return Some("relative argv[0]".into()),
                _ => {}
            }
            if exec.len() > MAX_ARGV || env.len() > MAX_ENV {
                return Some("argv or env over the limit".into());
            }
            if env.keys().any(|k| !valid_env_name(k) || forbidden_env(k)) {
                return Some("forbidden or invalid env name".into());
            }
        }
        _ => {}
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q1_id_format() {
        for ok in ["rq-a-0", "rq-lx4k2m9q-1", "rq-zzzzzzzzzzzz-zzzzzzzz"] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in [
            "rq--1",
            "rq-A-1",
            "rq-a",
            "rq-a-1-2",
            "rq-aaaaaaaaaaaaa-1",
            "rq-a-123456789",
            "x-a-1",
            "rq-a-",
        ] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn q1_run_id_and_job_formats() {
        assert!(valid_run_id("agent:7f3@host-1.x_y"));
        assert!(!valid_run_id("has space") && !valid_run_id("") && !valid_run_id(&"a".repeat(129)));
        assert!(valid_job("nightly-build-2"));
        assert!(!valid_job("Nightly") && !valid_job("a_b") && !valid_job(&"a".repeat(65)));
    }

    #[test]
    fn q1_reason_is_truncated_on_a_character_boundary() {
        let long: String = "é".repeat(600);
        let r = clamp_reason(&long);
        assert_eq!(r.chars().count(), 500);
        assert_eq!(r.len(), 1000, "two bytes per é, never a split character");
    }

    #[test]
    fn q2_status_text_round_trip() {
        for s in [
            "queued",
            "starting",
            "revived",
            "cancelled",
            "invalidated:cwd-missing",
            "gave-up:resurrection-cap",
        ] {
            assert_eq!(Status::parse(s).unwrap().text(), s);
        }
        for bad in [
            "resumed",
            "gave-up:",
            "invalidated:Bad",
            "done:x",
            "gave-up:a b",
        ] {
            assert!(Status::parse(bad).is_none(), "{bad}");
        }
        assert!(Status::Queued.is_open() && Status::Starting.is_open());
        assert!(!Status::Revived.is_open() && !Status::GaveUp("ttl".into()).is_open());
    }

    #[test]
    fn q3_evidence_clamp() {
        let input = vec![
            Some("relay-lease"),
            Some("bogus"),
            None,
            Some("active-subagent"),
            Some("relay-lease"),
            Some(MARKER),
        ];
        assert_eq!(
            clamp_evidence(input),
            vec!["relay-lease", "active-subagent", MARKER]
        );
        let many: Vec<Option<&str>> = STRONG
            .iter()
            .chain(WEAK.iter())
            .map(|s| Some(*s))
            .cycle()
            .take(200)
            .collect();
        assert_eq!(
            clamp_evidence(many).len(),
            10,
            "duplicates collapse before the 32 cap"
        );
    }

    #[test]
    fn d9_forbidden_env_names() {
        for bad in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "GCONV_PATH",
            "NOTIFY_SOCKET",
            "OUTLIVE_ENTRY_ID",
        ] {
            assert!(forbidden_env(bad), "{bad}");
        }
        for ok in ["PATH", "HOME", "LDX", "GCONV"] {
            assert!(!forbidden_env(ok), "{ok}");
        }
        assert!(!valid_env_name("A=B") && !valid_env_name("1X") && !valid_env_name(""));
    }

    #[test]
    fn unit_names_and_globs() {
        assert!(valid_unit_name("demo-run.service") && valid_unit_name("agent@7.service"));
        assert!(
            !valid_unit_name("demo")
                && !valid_unit_name("x.exe")
                && !valid_unit_name("a b.service")
        );
        assert!(glob_match("build-*.service", "build-7.service"));
        assert!(!glob_match("build-*.service", "deploy-7.service"));
        assert!(glob_match("agent@?.service", "agent@7.service"));
        assert!(glob_match("job-[a-c]*.service", "job-b1.service"));
        assert!(!glob_match("job-[!a-c]*.service", "job-b1.service"));
        assert!(glob_match("*", "anything.service"));
        assert!(glob_match("a*b*c", "aXXbYYc") && !glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("[ab", "[ab") && !glob_match("[ab", "a"));
        assert!(glob_match("", "") && !glob_match("", "x") && glob_match("**", ""));
        // Linear: many stars against a long name that almost matches end (the recursive
        // matcher would have taken some 10^16 steps here).
        assert!(!glob_match("*a*a*a*a*a*a*a*a*a*b", &"a".repeat(250)));
    }

    /// Security review finding 11: `["agent@*.service"]` admitted
    /// `agent@\x2fetc\x2fshadow.service` (`%I` = /etc/shadow) and `["build-*"]` admitted
    /// `build-x.mount`. The name and the suffix now match separately, a pattern without a
    /// suffix means `.service`, and a template instance must be a plain name.
    #[test]
    fn allowed_units_match_name_and_suffix_apart_and_instances_are_plain() {
        assert!(!unit_allowed(
            "agent@*.service",
            "agent@\\x2fetc\\x2fshadow.service"
        ));
        assert!(!unit_allowed("*", "agent@a\\x2db.service"));
        assert!(!unit_allowed("agent@*.service", "agent@.service"));
        assert!(unit_allowed(
            "agent@*.service",
            "agent@build-7:x_y.z.service"
        ));
        assert!(!unit_allowed("build-*", "build-x.mount"));
        assert!(!unit_allowed("build-*", "build-x.socket"));
        assert!(unit_allowed("build-*", "build-x.service"));
        assert!(unit_allowed("build-*.timer", "build-x.timer"));
        assert!(!unit_allowed("build-*.timer", "build-x.service"));
        assert!(unit_allowed("build-*.s*", "build-x.socket"));
        // `*` no longer crosses from the name into the suffix.
        assert!(!unit_allowed(
            "build-*.service",
            "build-x.mount.service.mount"
        ));
        assert!(unit_allowed("build-*.service", "build-x.mount.service"));
        assert!(!unit_allowed("*", "x.mount"));
        assert!(unit_allowed("*", "x.service"));
        // A dotted name without a unit suffix is all name.
        assert!(unit_allowed("app.v2-*", "app.v2-blue.service"));
        assert!(!unit_allowed("allowed-*.service", "other.service"));
    }

    #[test]
    fn q1_target_serialises_as_documented() {
        let u = Target::Unit {
            unit: "demo.service".into(),
        };
        assert_eq!(
            serde_json::to_value(&u).unwrap(),
            serde_json::json!({"unit": "demo.service"})
        );
        let e = Target::Exec {
            exec: vec!["/bin/true".into()],
            env: BTreeMap::from([("A".into(), "1".into())]),
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"exec": ["/bin/true"], "env": {"A": "1"}})
        );
        let back: Target = serde_json::from_value(serde_json::json!({"exec": ["/bin/x"]})).unwrap();
        assert!(matches!(back, Target::Exec { .. }));
    }
}
