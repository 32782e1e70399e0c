//! The key table (SPEC §9): every key of the configuration, its type, range, default,
//! whether a reload applies it, and what it means. Everything else is derived from it.

/// The type and range of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Int {
        min: i64,
        max: i64,
    },
    /// An absolute path; `optional` allows "" (off).
    Path {
        optional: bool,
    },
    Choice(&'static [&'static str]),
    /// A list of strings matching a pattern description.
    List(ListOf),
}

/// What the items of a list key are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListOf {
    /// systemd unit-name globs (`*`, `?`, `[…]` allowed).
    UnitGlobs,
    /// guard keys (`[a-z0-9._-]`).
    GuardKeys,
}

/// A default value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultValue {
    Bool(bool),
    Int(i64),
    Str(&'static str),
    EmptyList,
    /// Depends on the mode and environment (state and runtime directories).
    StateDir,
    RuntimeDir,
}

/// Whether a reload (SIGHUP) applies a key or it waits for the next start (G-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    Applies,
    NextStart,
}

/// One configuration key.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    pub key: &'static str,
    pub kind: Kind,
    pub default: DefaultValue,
    pub reload: Reload,
    pub doc: &'static str,
}

pub(super) const fn int(
    key: &'static str,
    default: i64,
    min: i64,
    max: i64,
    doc: &'static str,
) -> KeySpec {
    KeySpec {
        key,
        kind: Kind::Int { min, max },
        default: DefaultValue::Int(default),
        reload: Reload::Applies,
        doc,
    }
}

pub(super) const fn boolean(key: &'static str, default: bool, doc: &'static str) -> KeySpec {
    KeySpec {
        key,
        kind: Kind::Bool,
        default: DefaultValue::Bool(default),
        reload: Reload::Applies,
        doc,
    }
}

/// The sections (TOML tables) keys live in.
pub const SECTIONS: &[&str] = &[
    "queue",
    "queue.lock",
    "drainer",
    "posture",
    "facts",
    "capture",
    "metrics",
    "journal",
];

/// Every key of SPEC §9, in the order of the specification.
pub const KEYS: &[KeySpec] = &[
    KeySpec {
        key: "state_dir",
        kind: Kind::Path { optional: false },
        default: DefaultValue::StateDir,
        reload: Reload::NextStart,
        doc: "Directory of the queue state, the lock, the audit log and continuations. Must be host-local \
              (a shared volume is refused by the lock). Default /var/lib/outlive ($STATE_DIRECTORY under \
              systemd; $XDG_STATE_HOME/outlive in user mode).",
    },
    KeySpec {
        key: "runtime_dir",
        kind: Kind::Path { optional: false },
        default: DefaultValue::RuntimeDir,
        reload: Reload::NextStart,
        doc: "Directory for audit lines while the lock is not held, and continuation copies for revived runs. \
              Default /run/outlive ($RUNTIME_DIRECTORY under systemd; $XDG_RUNTIME_DIR/outlive in user mode).",
    },
    boolean(
        "queue.enabled",
        true,
        "Accept and revive runs. false refuses every enqueue with QueueDisabled (queue-off).",
    ),
    boolean(
        "queue.dry_run",
        true,
        "Observe only: entries are queued and validated, but nothing is revived. Set false to revive.",
    ),
    int(
        "queue.max_size",
        50,
        1,
        10000,
        "Most open (queued or starting) entries.",
    ),
    int(
        "queue.max_attempts",
        3,
        1,
        20,
        "Failed revival attempts before an entry gives up.",
    ),
    int(
        "queue.max_resurrections",
        2,
        0,
        100,
        "Revivals of one run or job within 24 hours before a new reap is recorded as gave-up:resurrection-cap.",
    ),
    int(
        "queue.entry_ttl_hours",
        24,
        1,
        720,
        "Hours an entry may wait (paused time excluded) before it gives up.",
    ),
    boolean(
        "queue.include_operator_kills",
        false,
        "Also queue runs that an operator killed (origin operator).",
    ),
    KeySpec {
        key: "queue.allowed_units",
        kind: Kind::List(ListOf::UnitGlobs),
        default: DefaultValue::EmptyList,
        reload: Reload::Applies,
        doc: "Unit-name globs that members of the outlive group (not root) may enqueue as unit targets.",
    },
    KeySpec {
        key: "queue.lock.auto_heal",
        kind: Kind::Choice(&["off", "observe", "on"]),
        default: DefaultValue::Str("off"),
        reload: Reload::Applies,
        doc: "What to do with a lock left by another host: off refuses; observe reports what it would do; \
              on takes over a stale lock on a host-local filesystem.",
    },
    int(
        "drainer.interval_sec",
        60,
        1,
        240,
        "Seconds between drainer ticks.",
    ),
    int(
        "drainer.required_calm_ticks",
        3,
        1,
        100,
        "Consecutive calm ticks before a revival.",
    ),
    int(
        "drainer.grace_sec",
        15,
        1,
        600,
        "Seconds after an attempt before it is verified.",
    ),
    int(
        "drainer.max_revived_alive",
        10,
        1,
        1000,
        "Most revived runs alive at once (session cap).",
    ),
    int(
        "drainer.backoff_base_sec",
        120,
        1,
        86400,
        "Backoff after a failed attempt; doubles with each attempt.",
    ),
    int(
        "drainer.breaker_threshold",
        3,
        1,
        100,
        "Consecutive failed attempts that open the breaker.",
    ),
    int(
        "drainer.breaker_cooldown_min",
        30,
        1,
        1440,
        "Minutes the breaker stays open.",
    ),
    boolean(
        "drainer.auto_resume_stale_pause",
        true,
        "Let a stale emergency pause heal itself (SPEC P-5).",
    ),
    int(
        "drainer.stale_pause_window_min",
        60,
        0,
        10080,
        "Minutes after an emergency pause after which a newly queued active run makes the pause stale.",
    ),
    boolean(
        "drainer.calm_gate",
        true,
        "Revive only when memory and CPU pressure are calm.",
    ),
    int(
        "drainer.pressure_held_notice_min",
        20,
        0,
        1440,
        "Minutes the calm gate may hold the oldest ready entry before a notice (0 disables).",
    ),
    int(
        "posture.anomaly_grace_sec",
        120,
        0,
        3600,
        "Seconds an anomaly must persist before it is alerted.",
    ),
    int(
        "posture.dry_run_soak_days",
        7,
        0,
        365,
        "Days a load-bearing guard may stay in dry run before that is an anomaly.",
    ),
    int(
        "posture.notice_hold_min",
        60,
        1,
        10080,
        "Minutes a one-off notice stays in the attention item.",
    ),
    KeySpec {
        key: "posture.accepted_gaps",
        kind: Kind::List(ListOf::GuardKeys),
        default: DefaultValue::EmptyList,
        reload: Reload::Applies,
        doc: "Guard keys whose load-bearing gap is accepted (audited at start).",
    },
    int(
        "facts.statfs_timeout_ms",
        3000,
        100,
        60000,
        "Milliseconds a statfs or path resolution may take.",
    ),
    KeySpec {
        key: "capture.units",
        kind: Kind::List(ListOf::UnitGlobs),
        default: DefaultValue::EmptyList,
        reload: Reload::Applies,
        doc: "Unit-name globs: every loaded unit that matches is watched while it matches, and revived with \
              StartUnit when someone else reaps it.",
    },
    int(
        "capture.max_watched",
        200,
        1,
        10000,
        "Most watch records kept; ended ones are pruned first (and 7 days after they ended).",
    ),
    KeySpec {
        key: "capture.evidence_policy",
        kind: Kind::Choice(&["autonomous", "declared"]),
        default: DefaultValue::Str("autonomous"),
        reload: Reload::Applies,
        doc: "The default for watched runs: autonomous runs carry build-or-autonomous-active while active; \
              declared runs only the evidence they declare.",
    },
    KeySpec {
        key: "metrics.textfile",
        kind: Kind::Path { optional: true },
        default: DefaultValue::Str(""),
        reload: Reload::Applies,
        doc: "Prometheus textfile written every tick; empty is off. /run/outlive/metrics/outlive.prom is in a \
              directory outlived creates (root, 0755) for node_exporter's --collector.textfile.directory; any \
              other directory must be root's, writable by root alone, and granted with ReadWritePaths= in a \
              drop-in.",
    },
    KeySpec {
        key: "journal.socket",
        kind: Kind::Path { optional: false },
        default: DefaultValue::Str("/run/systemd/journal/socket"),
        reload: Reload::NextStart,
        doc: "The journal's native socket.",
    },
];

/// Look a key up.
pub fn spec(key: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|k| k.key == key)
}
