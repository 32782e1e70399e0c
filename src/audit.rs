//! Audit events and alerts (SPEC X-2, DESIGN §2): the vocabulary every layer uses to record a
//! decision. An event has a kind (`OUTLIVE_EVENT`, kebab-case, e.g. `lock-host-renamed`), a
//! plain-English message, a priority, fields (`OUTLIVE_<FIELD>`) and, for alerts, a fixed
//! `MESSAGE_ID`. Where events go (journal, stderr, `audit.jsonl`) is decided by whoever
//! implements [`AuditSink`]; lower layers only describe what happened.

use crate::sync::MutexExt;
use std::collections::HashMap;
use std::fmt;

/// Alert types, each with a `MESSAGE_ID` and priority kept forever (DESIGN §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alert {
    PostureDegraded,
    PostureRestored,
    QueueDisabled,
    LockAutoHealed,
    LockHostRenamed,
    RunRevived,
    RevivalGaveUp,
    WatchdogTrigger,
    StalePauseAutoResumed,
    PausedWithRunsWaiting,
    /// Queue notices without an alert of their own (breaker, overflow, TTL, …).
    QueueNotice,
    /// A watched run was reaped and queued (SPEC C-3).
    RunCaptured,
    /// A watched run ended and how cannot be known (SPEC C-3, row 9).
    RunUnknown,
}

impl Alert {
    /// Every alert type (for the catalog test).
    pub const ALL: [Alert; 13] = [
        Alert::PostureDegraded,
        Alert::PostureRestored,
        Alert::QueueDisabled,
        Alert::LockAutoHealed,
        Alert::LockHostRenamed,
        Alert::RunRevived,
        Alert::RevivalGaveUp,
        Alert::WatchdogTrigger,
        Alert::StalePauseAutoResumed,
        Alert::PausedWithRunsWaiting,
        Alert::QueueNotice,
        Alert::RunCaptured,
        Alert::RunUnknown,
    ];

    /// The journal `MESSAGE_ID` (32 lowercase hex digits).
    pub fn message_id(self) -> &'static str {
        match self {
            Alert::PostureDegraded => "732c4bc9ef3f4dd98cb6b773fa36edb3",
            Alert::PostureRestored => "1151efdae37c4b6e9cddb87dadbf6b50",
            Alert::QueueDisabled => "16178756b76b464797d26fe3e163f095",
            Alert::LockAutoHealed => "fab81cdfd22b43b3b0c2692062051f4b",
            Alert::LockHostRenamed => "d6ad853e949d4505bf5ac339eedba367",
            Alert::RunRevived => "234242b2aed347baac257c41c5caf85b",
            Alert::RevivalGaveUp => "2b024c8048ec43d5bd93e3e01858924d",
            Alert::WatchdogTrigger => "11c20c127c5f4bf48d18660cfba92206",
            Alert::StalePauseAutoResumed => "c6f308fc68cd4cd590855194b55b9493",
            Alert::PausedWithRunsWaiting => "11db55d58fda454ab22674b200f45ee7",
            Alert::QueueNotice => "e72663eda21f4861949d502c83bd09d2",
            Alert::RunCaptured => "eba0e2f9636746c8a0e832d894f9eb31",
            Alert::RunUnknown => "8fbff45fa25a4b5594c320928dfd5387",
        }
    }

    /// syslog priority (3 err, 4 warning, 5 notice, 6 info).
    pub fn priority(self) -> u8 {
        match self {
            Alert::RevivalGaveUp | Alert::WatchdogTrigger => 3,
            Alert::PostureDegraded
            | Alert::QueueDisabled
            | Alert::StalePauseAutoResumed
            | Alert::PausedWithRunsWaiting
            | Alert::QueueNotice
            | Alert::RunUnknown => 4,
            Alert::PostureRestored
            | Alert::LockAutoHealed
            | Alert::RunRevived
            | Alert::RunCaptured => 5,
            Alert::LockHostRenamed => 6,
        }
    }
}

/// syslog priorities used for events that are not alerts.
pub mod priority {
    pub const ERR: u8 = 3;
    pub const WARNING: u8 = 4;
    pub const NOTICE: u8 = 5;
    pub const INFO: u8 = 6;
}

/// Defines [`EventKind`], its names and [`EventKind::ALL`] from one list.
macro_rules! event_kinds {
    ($($variant:ident => $name:literal,)*) => {
        /// What an audit event is about: `OUTLIVE_EVENT` in the journal. A closed
        /// vocabulary, so that operators and tests can count events and no call site can invent
        /// a kind by a typo.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum EventKind {
            $($variant,)*
            /// Events the unit tests make.
            #[cfg(test)]
            Test,
        }

        impl EventKind {
            /// Every kind the agent writes.
            pub const ALL: &[EventKind] = &[$(EventKind::$variant,)*];

            /// The kebab-case name written as `OUTLIVE_EVENT`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(EventKind::$variant => $name,)*
                    #[cfg(test)]
                    EventKind::Test => "test",
                }
            }
        }
    };
}

event_kinds! {
    AcceptedGaps => "accepted-gaps",
    AttemptFailed => "attempt-failed",
    AttemptStopped => "attempt-stopped",
    AuditWriteFailed => "audit-write-failed",
    AutoResumedStalePause => "auto-resumed-stale-pause",
    BreakerClosed => "breaker-closed",
    BreakerOpened => "breaker-opened",
    BusLost => "bus-lost",
    BusReconnected => "bus-reconnected",
    Cancelled => "cancelled",
    CheckUndecided => "check-undecided",
    ConfigReloadFailed => "config-reload-failed",
    ConfigReloadPending => "config-reload-pending",
    ConfigReloaded => "config-reloaded",
    ConfigUnreadable => "config-unreadable",
    EnqueueRefused => "enqueue-refused",
    Enqueued => "enqueued",
    EntryExpired => "entry-expired",
    GaveUp => "gave-up",
    GuardDropinRejected => "guard-dropin-rejected",
    Invalidated => "invalidated",
    LockAutoHealed => "lock-auto-healed",
    LockHostRenamed => "lock-host-renamed",
    LockReclaimed => "lock-reclaimed",
    ManagerReachable => "manager-reachable",
    ManagerUnreachable => "manager-unreachable",
    MetricsWriteFailed => "metrics-write-failed",
    NoLinger => "no-linger",
    ObserveOnly => "observe-only",
    OperatorStop => "operator-stop",
    Overflow => "overflow",
    PauseUpgraded => "pause-upgraded",
    Paused => "paused",
    PausedWaiting => "paused-waiting",
    PersistFailed => "persist-failed",
    PersistRecovered => "persist-recovered",
    PostureDegraded => "posture-degraded",
    PostureRestored => "posture-restored",
    PressureHeld => "pressure-held",
    QueueDisabled => "queue-disabled",
    QueueEnabled => "queue-enabled",
    QuotaReported => "quota-reported",
    Requeued => "requeued",
    Resumed => "resumed",
    ResurrectionCap => "resurrection-cap",
    ResurrectionOverride => "resurrection-override",
    RevivalGaveUp => "revival-gave-up",
    Revived => "revived",
    RevivedByHand => "revived-by-hand",
    RunCaptured => "run-captured",
    RunEnded => "run-ended",
    RunEvidence => "run-evidence",
    RunNeverStarted => "run-never-started",
    RunStarted => "run-started",
    RunUnknown => "run-unknown",
    RunUnwatched => "run-unwatched",
    RunWatched => "run-watched",
    CaptureLost => "capture-lost",
    CaptureRestored => "capture-restored",
    WatchCap => "watch-cap",
    Started => "started",
    StateCorrupt => "state-corrupt",
    StateSalvaged => "state-salvaged",
    StopAll => "stop-all",
    StopDropped => "stop-dropped",
    Stopped => "stopped",
    TickOutcome => "tick-outcome",
    TransitionRefused => "transition-refused",
    TtlExpired => "ttl-expired",
    WatchdogTrigger => "watchdog-trigger",
    WouldRevive => "would-revive",
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `OUTLIVE_EVENT`.
    pub kind: String,
    /// `MESSAGE`: plain English for the operator.
    pub message: String,
    pub priority: u8,
    pub alert: Option<Alert>,
    /// `(FIELD, value)`, written as `OUTLIVE_FIELD=value`. Names are upper-case
    /// `[A-Z0-9_]`, set through [`Event::field`], which normalises them.
    pub fields: Vec<(String, String)>,
    /// Wall-clock milliseconds when the event happened.
    pub at_ms: u64,
}

impl Event {
    /// An informational event of `kind`.
    /// An event of the kind of `other` (a count of its repeats).
    fn same_kind(other: &Event, message: impl Into<String>) -> Event {
        Event {
            kind: other.kind.clone(),
            ..Event::new(EventKind::Started, message)
        }
    }

    pub fn new(kind: EventKind, message: impl Into<String>) -> Event {
        Event {
            kind: kind.as_str().to_string(),
            message: message.into(),
            priority: priority::INFO,
            alert: None,
            fields: Vec::new(),
            at_ms: crate::clock::wall_ms(),
        }
    }

    /// Mark the event as an alert (sets `MESSAGE_ID` and the alert's priority).
    pub fn alert(mut self, a: Alert) -> Event {
        self.alert = Some(a);
        self.priority = a.priority();
        self
    }

    /// Set the priority.
    pub fn priority(mut self, p: u8) -> Event {
        self.priority = p.min(7);
        self
    }

    /// Add a field; the name is normalised to `[A-Z0-9_]` (other characters become `_`).
    /// Add a field; an empty value is left out (no `OUTLIVE_ENTRY_ID=` with nothing after it).
    pub fn field(mut self, name: &str, value: impl fmt::Display) -> Event {
        let value = value.to_string();
        if !value.is_empty() {
            self.fields.push((field_name(name), value));
        }
        self
    }

    /// A field's value.
    pub fn get(&self, name: &str) -> Option<&str> {
        let n = field_name(name);
        self.fields
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.as_str())
    }

    /// The event as one JSON object using journal field names (the stderr fallback and the
    /// lines of `audit.jsonl`).
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert(
            "TIMESTAMP".into(),
            crate::clock::rfc3339_ms(self.at_ms).into(),
        );
        m.insert("AT_MS".into(), self.at_ms.into());
        m.insert("PRIORITY".into(), self.priority.to_string().into());
        m.insert("SYSLOG_IDENTIFIER".into(), SYSLOG_IDENTIFIER.into());
        if let Some(a) = self.alert {
            m.insert("MESSAGE_ID".into(), a.message_id().into());
        }
        m.insert("OUTLIVE_EVENT".into(), self.kind.clone().into());
        m.insert("MESSAGE".into(), self.message.clone().into());
        for (k, v) in &self.fields {
            m.insert(format!("OUTLIVE_{k}"), v.clone().into());
        }
        serde_json::Value::Object(m)
    }

    /// Parse a line of `audit.jsonl` back (for `outlivectl audit`).
    pub fn from_json(v: &serde_json::Value) -> Option<Event> {
        let o = v.as_object()?;
        let s = |k: &str| o.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let alert =
            s("MESSAGE_ID").and_then(|id| Alert::ALL.into_iter().find(|a| a.message_id() == id));
        let fields = o
            .iter()
            .filter(|(k, _)| k.starts_with("OUTLIVE_") && *k != "OUTLIVE_EVENT")
            .map(|(k, v)| {
                (
                    k["OUTLIVE_".len()..].to_string(),
                    v.as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        Some(Event {
            kind: s("OUTLIVE_EVENT")?,
            message: s("MESSAGE").unwrap_or_default(),
            priority: s("PRIORITY")
                .and_then(|p| p.parse().ok())
                .unwrap_or(priority::INFO),
            alert,
            fields,
            at_ms: o.get("AT_MS").and_then(|x| x.as_u64()).unwrap_or(0),
        })
    }
}

/// Text for a person, with every control character (C0, DEL, C1) shown as `\xNN` instead of
/// sent: a message quotes what callers and files supplied, and a terminal acts on escape
/// sequences (§12, human output). `keep_lines` keeps line breaks and tabs (a block of text);
/// without it a field stays on its line.
pub fn escape_controls(s: &str, keep_lines: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let code = c as u32;
        let control = code < 0x20 || (0x7f..=0x9f).contains(&code);
        if control && !(keep_lines && (c == '\n' || c == '\t')) {
            let _ = write!(out, "\\x{code:02x}");
        } else {
            out.push(c);
        }
    }
    out
}

/// `SYSLOG_IDENTIFIER` of every entry (DESIGN §2).
pub const SYSLOG_IDENTIFIER: &str = "outlived";

/// Normalise a field name to the journal's `[A-Z0-9_]`, not starting with a digit or `_`.
pub fn field_name(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    while s.starts_with('_') {
        s.remove(0);
    }
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, 'F');
    }
    s
}

/// Where events are recorded. Implemented by the publishing layer (journal + `audit.jsonl`).
pub trait AuditSink: Send + Sync {
    /// Record one event.
    fn record(&self, event: &Event);
    /// Write what was held back and is due (the counts of repeated refusals whose window
    /// ended); called after every tick.
    fn flush(&self) {}
    /// Write everything held back (at stop).
    fn close(&self) {}
}

/// Refusals a caller can repeat at will: counted, not written one by one (§12 X-1, member
/// floods).
pub const REPEATABLE: [EventKind; 1] = [EventKind::EnqueueRefused];
/// How long identical refusals are counted before their count is written.
pub const REPEAT_WINDOW_MS: u64 = 10 * 60 * 1000;
/// Most refusal windows open at once (beyond that, the oldest is closed early).
const REPEAT_WINDOWS_MAX: usize = 1024;

/// One window of identical refusals.
#[derive(Debug, Clone)]
struct Window {
    first: Event,
    since_boot: u64,
    last_wall: u64,
    repeated: u64,
}

/// Repeated refusals coalesced (§12 X-1): the first refusal of a kind, caller uid and reason
/// is written and opens a 10-minute window; identical ones within it are counted; when the
/// window ends, one line says how many there were. A flood of refusals then costs the audit
/// log two lines per window, and the history before it stays. Pure: the caller passes the
/// boot clock.
#[derive(Debug, Default)]
pub struct Repeats {
    open: HashMap<(String, String, String), Window>,
}

impl Repeats {
    /// What to write for `e` now: nothing when it repeats within an open window; else the
    /// summaries of windows that are over, then `e`.
    pub fn admit(&mut self, e: &Event, boot: u64) -> Vec<Event> {
        if !REPEATABLE.iter().any(|k| k.as_str() == e.kind) {
            return vec![e.clone()];
        }
        let key = (
            e.kind.clone(),
            e.get("uid").unwrap_or_default().to_string(),
            e.get("why").unwrap_or_default().to_string(),
        );
        if let Some(w) = self.open.get_mut(&key)
            && boot.saturating_sub(w.since_boot) < REPEAT_WINDOW_MS
        {
            w.repeated += 1;
            w.last_wall = e.at_ms;
            return vec![];
        }
        let mut out = self.flush(boot);
        if let Some(w) = self.open.remove(&key) {
            out.extend(summary(&w));
        }
        if self.open.len() >= REPEAT_WINDOWS_MAX
            && let Some(oldest) = self
                .open
                .iter()
                .min_by_key(|(_, w)| w.since_boot)
                .map(|(k, _)| k.clone())
            && let Some(w) = self.open.remove(&oldest)
        {
            out.extend(summary(&w));
        }
        self.open.insert(
            key,
            Window {
                first: e.clone(),
                since_boot: boot,
                last_wall: e.at_ms,
                repeated: 0,
            },
        );
        out.push(e.clone());
        out
    }

    /// The counts of every window (at stop), each closed.
    pub fn close(&mut self) -> Vec<Event> {
        self.flush(u64::MAX)
    }

    /// The counts of windows that are over by `boot` (those that counted any), each closed.
    pub fn flush(&mut self, boot: u64) -> Vec<Event> {
        let over: Vec<_> = self
            .open
            .iter()
            .filter(|(_, w)| boot.saturating_sub(w.since_boot) >= REPEAT_WINDOW_MS)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = vec![];
        for k in over {
            if let Some(w) = self.open.remove(&k) {
                out.extend(summary(&w));
            }
        }
        out.sort_by_key(|e| e.at_ms);
        out
    }
}

/// The line that counts a window's repeats (none when nothing repeated).
fn summary(w: &Window) -> Option<Event> {
    if w.repeated == 0 {
        return None;
    }
    let f = &w.first;
    let uid = f.get("uid").unwrap_or("?");
    let why = f.get("why").unwrap_or("?");
    let mut e = Event::same_kind(
        f,
        format!(
            "{n} more {kind} from uid {uid} ({why}) between {from} and {to} were counted, not written one by one",
            n = w.repeated,
            kind = f.kind,
            from = crate::clock::rfc3339_ms(f.at_ms),
            to = crate::clock::rfc3339_ms(w.last_wall),
        ),
    )
    .priority(f.priority)
    .field("uid", uid)
    .field("why", why)
    .field("repeated", w.repeated);
    e.at_ms = w.last_wall;
    Some(e)
}

/// The audit log file: one JSON object per line, `audit.jsonl`.
pub const AUDIT_FILE: &str = "audit.jsonl";
/// Rotation threshold: at 5 MiB the file becomes `audit.jsonl.1` (two files are kept).
pub const AUDIT_MAX_BYTES: u64 = 5 * 1024 * 1024;

/// `audit.jsonl` in a directory that changes with the lock (L-6): the state directory while
/// the lock is held, the runtime directory otherwise.
pub struct AuditLog {
    dir: std::sync::Mutex<std::path::PathBuf>,
    max_bytes: u64,
    failures: std::sync::atomic::AtomicU64,
}

impl AuditLog {
    /// A log writing into `dir`.
    pub fn new(dir: &std::path::Path) -> AuditLog {
        AuditLog::with_limit(dir, AUDIT_MAX_BYTES)
    }

    /// With a rotation threshold (tests).
    pub fn with_limit(dir: &std::path::Path, max_bytes: u64) -> AuditLog {
        AuditLog {
            dir: std::sync::Mutex::new(dir.to_path_buf()),
            max_bytes,
            failures: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Write into `dir` from now on.
    pub fn set_dir(&self, dir: &std::path::Path) {
        *self.dir.locked() = dir.to_path_buf();
    }

    /// The directory written to now.
    pub fn dir(&self) -> std::path::PathBuf {
        self.dir.locked().clone()
    }

    /// Appends that failed (the journal still has them).
    pub fn failures(&self) -> u64 {
        self.failures.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Append one event, rotating first when the file would grow past the threshold (through
    /// `crate::files`: no link followed, nothing but a regular file written, never blocking).
    pub fn append(&self, ev: &Event) -> std::io::Result<()> {
        let dir = self.dir.locked();
        let mut line = ev.to_json().to_string();
        line.push('\n');
        crate::files::Dir::open(&dir)?.append(
            AUDIT_FILE,
            line.as_bytes(),
            self.max_bytes,
            &format!("{AUDIT_FILE}.1"),
        )
    }
}

/// Read the audit events under `dirs` (each `audit.jsonl.1` then `audit.jsonl`), oldest first.
/// Lines that do not parse are skipped.
pub fn read_logs(dirs: &[&std::path::Path]) -> Vec<Event> {
    let mut out = Vec::new();
    for d in dirs {
        for name in [format!("{AUDIT_FILE}.1"), AUDIT_FILE.to_string()] {
            if let Ok(text) = std::fs::read_to_string(d.join(name)) {
                out.extend(
                    text.lines()
                        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                        .filter_map(|v| Event::from_json(&v)),
                );
            }
        }
    }
    out.sort_by_key(|e| e.at_ms);
    out
}

/// Decides whether an event is written, and hears it first: the posture's attention item
/// takes queue notices and coalesces identical ones (SPEC G-9). `None`: do not write it.
pub trait NoticeGate: Send + Sync {
    fn admit(&self, event: &Event) -> Option<Event>;
}

/// The agent's sink: every event to `audit.jsonl` and to each further sink (the journal),
/// through the notice gate once one is installed.
pub struct Auditor {
    pub log: AuditLog,
    sinks: Vec<std::sync::Arc<dyn AuditSink>>,
    gate: std::sync::OnceLock<std::sync::Arc<dyn NoticeGate>>,
    repeats: std::sync::Mutex<Repeats>,
}

impl Auditor {
    /// An auditor over `log` and `sinks`.
    pub fn new(log: AuditLog, sinks: Vec<std::sync::Arc<dyn AuditSink>>) -> Auditor {
        Auditor {
            log,
            sinks,
            gate: std::sync::OnceLock::new(),
            repeats: std::sync::Mutex::new(Repeats::default()),
        }
    }

    /// Install the notice gate (once).
    pub fn set_gate(&self, gate: std::sync::Arc<dyn NoticeGate>) {
        let _ = self.gate.set(gate);
    }
}

impl Auditor {
    /// Through the gate (G-9) and to the sinks; `to_file`: also to `audit.jsonl`. Returns the
    /// error of a failed append.
    fn deliver(&self, event: &Event, to_file: bool) -> Option<std::io::Error> {
        let admitted;
        let event = match self.gate.get() {
            Some(g) => match g.admit(event) {
                Some(e) => {
                    admitted = e;
                    &admitted
                }
                None => return None,
            },
            None => event,
        };
        let failed = if to_file {
            self.log.append(event).err()
        } else {
            None
        };
        for s in &self.sinks {
            s.record(event);
        }
        failed
    }
}

impl AuditSink for Auditor {
    fn record(&self, event: &Event) {
        let due = self
            .repeats
            .locked()
            .admit(event, crate::clock::boottime_ms());
        for e in &due {
            self.write(e);
        }
    }

    fn flush(&self) {
        self.held_back(|r| r.flush(crate::clock::boottime_ms()));
    }

    fn close(&self) {
        self.held_back(Repeats::close);
    }
}

impl Auditor {
    /// Write what `take` releases of the held-back repeats.
    fn held_back(&self, take: impl FnOnce(&mut Repeats) -> Vec<Event>) {
        let due = take(&mut self.repeats.locked());
        for e in &due {
            self.write(e);
        }
    }

    /// One event to the file and the sinks; a failed append is itself a notice.
    fn write(&self, event: &Event) {
        let Some(e) = self.deliver(event, true) else {
            return;
        };
        self.log
            .failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A failure to keep the local audit trail is itself a notice (not only a counter): it
        // reaches the journal and the attention item, which coalesces identical ones (one entry
        // per 10 minutes) and keeps it while appends keep failing.
        let dir = self.log.dir();
        let notice = Event::new(
            EventKind::AuditWriteFailed,
            format!(
                "cannot append to {} ({e}): audit events still reach the journal, but `outlivectl audit` misses \
                 them until the file can be written again",
                dir.join(AUDIT_FILE).display()
            ),
        )
        .alert(Alert::QueueNotice)
        .field("path", dir.join(AUDIT_FILE).display());
        let _ = self.deliver(&notice, false);
    }
}

/// A sink that keeps events in memory (tests, and the CLI's direct calls).
#[derive(Default)]
pub struct MemorySink {
    pub events: std::sync::Mutex<Vec<Event>>,
}

impl AuditSink for MemorySink {
    fn record(&self, event: &Event) {
        self.events.locked().push(event.clone());
    }
}

impl MemorySink {
    /// Events of `kind` recorded so far.
    pub fn of_kind(&self, kind: &str) -> Vec<Event> {
        self.events
            .locked()
            .iter()
            .filter(|e| e.kind == kind)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 15: an empty field is left out, not sent as `OUTLIVE_ENTRY_ID=`.
    #[test]
    fn x2_empty_fields_are_left_out() {
        let e = Event::new(EventKind::TickOutcome, "drainer: empty")
            .field("outcome", "empty")
            .field("entry_id", "");
        assert_eq!(e.get("outcome"), Some("empty"));
        assert_eq!(e.get("entry_id"), None);
        assert!(
            !e.fields.iter().any(|(k, _)| k == "ENTRY_ID"),
            "{:?}",
            e.fields
        );
    }

    /// kinds are kebab-case names, each once, and include those the specification names.
    #[test]
    fn x2_event_kinds_are_a_closed_kebab_case_vocabulary() {
        let names: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "a kind named twice");
        for n in &names {
            assert!(
                !n.is_empty()
                    && !n.starts_with('-')
                    && !n.ends_with('-')
                    && n.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{n} is not kebab-case"
            );
        }
        for named in [
            "lock-host-renamed",
            "lock-auto-healed",
            "queue-disabled",
            "revived",
            "gave-up",
            "breaker-opened",
            "ttl-expired",
            "paused-waiting",
            "auto-resumed-stale-pause",
            "posture-degraded",
            "posture-restored",
            "watchdog-trigger",
        ] {
            assert!(names.contains(&named), "{named} (X-2) is not a kind");
        }
        assert_eq!(Event::new(EventKind::Revived, "m").kind, "revived");
    }

    #[test]
    fn x2_message_ids_are_distinct_32_hex() {
        let mut seen = std::collections::HashSet::new();
        for a in Alert::ALL {
            let id = a.message_id();
            assert_eq!(id.len(), 32);
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
            assert!(seen.insert(id), "{a:?} reuses {id}");
        }
    }

    #[test]
    fn x2_priorities_follow_design_table() {
        assert_eq!(Alert::PostureDegraded.priority(), 4);
        assert_eq!(Alert::PostureRestored.priority(), 5);
        assert_eq!(Alert::QueueDisabled.priority(), 4);
        assert_eq!(Alert::LockAutoHealed.priority(), 5);
        assert_eq!(Alert::LockHostRenamed.priority(), 6);
        assert_eq!(Alert::RunRevived.priority(), 5);
        assert_eq!(Alert::RevivalGaveUp.priority(), 3);
        assert_eq!(Alert::WatchdogTrigger.priority(), 3);
        assert_eq!(Alert::StalePauseAutoResumed.priority(), 4);
        assert_eq!(Alert::PausedWithRunsWaiting.priority(), 4);
        assert_eq!(Alert::QueueNotice.priority(), 4);
    }

    #[test]
    fn field_names_are_normalised() {
        assert_eq!(field_name("from_host"), "FROM_HOST");
        assert_eq!(field_name("lock.path"), "LOCK_PATH");
        assert_eq!(field_name("_x"), "X");
        assert_eq!(field_name("9lives"), "F9LIVES");
        assert_eq!(field_name(""), "F");
    }

    #[test]
    fn x2_audit_log_rotates_at_the_limit_and_reads_both_dirs() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let log = AuditLog::with_limit(a.path(), 600);
        for i in 0..10 {
            let mut e = Event::new(EventKind::Test, format!("event {i}"));
            e.at_ms = i;
            log.append(&e).unwrap();
        }
        let cur = std::fs::metadata(a.path().join(AUDIT_FILE)).unwrap().len();
        assert!(cur <= 600, "the current file stays under the limit: {cur}");
        assert!(
            a.path().join(format!("{AUDIT_FILE}.1")).exists(),
            "rotated once at least"
        );
        log.set_dir(b.path());
        let mut e = Event::new(EventKind::Test, "in the runtime dir");
        e.at_ms = 100;
        log.append(&e).unwrap();
        let all = read_logs(&[a.path(), b.path()]);
        assert_eq!(all.last().unwrap().message, "in the runtime dir");
        assert!(all.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        // Two files are kept: the oldest events are gone, the newest are there.
        assert!(all.iter().any(|e| e.message == "event 9"));
        assert!(!all.iter().any(|e| e.message == "event 0"));
    }

    /// Core review finding 14: a failed append is a notice on the other sinks (the journal)
    /// and through the gate, not only a counter; and a FIFO or link at the log's name is
    /// refused without blocking or following it.
    #[test]
    fn x2_a_failed_append_is_a_notice_not_only_a_counter() {
        let d = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(
            &d.path().join(AUDIT_FILE),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let sink = std::sync::Arc::new(MemorySink::default());
        let a = Auditor::new(AuditLog::new(d.path()), vec![sink.clone()]);
        a.record(&Event::new(EventKind::Started, "hello"));
        assert_eq!(a.log.failures(), 1);
        assert_eq!(
            sink.of_kind("started").len(),
            1,
            "the journal still gets it"
        );
        let n = sink.of_kind("audit-write-failed");
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].alert, Some(Alert::QueueNotice));
        assert!(n[0].message.contains("FIFO"), "{}", n[0].message);
    }

    #[test]
    fn json_round_trip() {
        let e = Event::new(EventKind::LockHostRenamed, "renamed")
            .alert(Alert::LockHostRenamed)
            .field("from", "a")
            .field("to", "b");
        let back = Event::from_json(&e.to_json()).unwrap();
        assert_eq!(back, e);
    }

    fn refused(uid: u32, why: &str, at: u64) -> Event {
        let mut e = Event::new(
            EventKind::EnqueueRefused,
            format!("did not queue run:x{at}: {why}"),
        )
        .field("key", format!("run:x{at}"))
        .field("why", why)
        .field("uid", uid);
        e.at_ms = at;
        e
    }

    /// §12 X-1 (security review finding 7): 50,000 refused enqueues filled both audit files.
    /// Identical refusals (kind, caller uid, reason) are now written once per 10-minute window
    /// and counted; the count is one line when the window ends.
    #[test]
    fn x1_repeated_refusals_are_counted_not_written_one_by_one() {
        let mut r = Repeats::default();
        let min = 60_000;
        let mut written = r.admit(&refused(1000, "duplicate-open-entry", 1), 0);
        assert_eq!(written.len(), 1);
        for i in 0..50_000u64 {
            written.extend(r.admit(&refused(1000, "duplicate-open-entry", 2 + i), i / 100));
        }
        assert_eq!(written.len(), 1, "nothing more within the window");
        // Another caller, or another reason, is its own line.
        assert_eq!(
            r.admit(&refused(1001, "duplicate-open-entry", 3), 5).len(),
            1
        );
        assert_eq!(r.admit(&refused(1000, "operator-kill", 4), 5).len(), 1);
        // Other events are never held back.
        let other = Event::new(EventKind::Enqueued, "queued");
        assert_eq!(r.admit(&other, 6), vec![other.clone()]);
        // Nothing is due before the window ends; then one count line for the first window.
        assert!(r.flush(9 * min).is_empty());
        let due = r.flush(10 * min);
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!(due[0].get("repeated"), Some("50000"));
        assert_eq!(due[0].get("uid"), Some("1000"));
        assert!(
            due[0]
                .message
                .contains("50000 more enqueue-refused from uid 1000")
        );
        // The next identical refusal opens a new window and is written.
        assert_eq!(
            r.admit(&refused(1000, "duplicate-open-entry", 9), 11 * min)
                .len(),
            1
        );
        r.admit(&refused(1000, "duplicate-open-entry", 10), 11 * min);
        // A window that is not over is counted at close (stop).
        let closing = r.close();
        assert_eq!(closing.len(), 1, "{closing:?}");
        assert_eq!(closing[0].get("repeated"), Some("1"));
        assert!(r.close().is_empty());
    }

    /// A refusal repeated after its window ended writes the count, then itself.
    #[test]
    fn x1_a_refusal_after_its_window_writes_the_count_first() {
        let mut r = Repeats::default();
        r.admit(&refused(7, "duplicate-open-entry", 1), 0);
        r.admit(&refused(7, "duplicate-open-entry", 2), 1);
        let out = r.admit(&refused(7, "duplicate-open-entry", 3), REPEAT_WINDOW_MS);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].get("repeated"), Some("1"));
        assert!(out[1].get("repeated").is_none());
    }
}
