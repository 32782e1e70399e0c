//! The configuration file (SPEC §9).
//!
//! One table, [`KEYS`], defines every key: its type, default, range and meaning. Parsing,
//! validation (unknown keys and out-of-range values are errors naming the key and the range),
//! `outlived --check-config`, the commented default file shipped in packages and the
//! `outlive.toml(5)` page are all derived from it, so they cannot drift apart.
//!
//! Every key is optional; a missing default file means all defaults.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

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

const fn int(key: &'static str, default: i64, min: i64, max: i64, doc: &'static str) -> KeySpec {
    KeySpec {
        key,
        kind: Kind::Int { min, max },
        default: DefaultValue::Int(default),
        reload: Reload::Applies,
        doc,
    }
}

const fn boolean(key: &'static str, default: bool, doc: &'static str) -> KeySpec {
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
        key: "metrics.textfile",
        kind: Kind::Path { optional: true },
        default: DefaultValue::Str(""),
        reload: Reload::Applies,
        doc: "Prometheus textfile written every tick (e.g. /var/lib/prometheus/node-exporter/outlive.prom); \
              empty is off.",
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

/// A validated value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Str(String),
    List(Vec<String>),
}

impl Value {
    /// As TOML text.
    pub fn to_toml(&self) -> String {
        match self {
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Str(s) => toml_string(s),
            Value::List(l) => format!(
                "[{}]",
                l.iter()
                    .map(|s| toml_string(s))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The agent's mode (SPEC §8): the system agent, or a user's (`--user`, implied for non-root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    System,
    User,
}

/// Defaults that depend on the mode and environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub config_file: PathBuf,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
}

impl Paths {
    /// Compute the paths of `mode` from an environment lookup (injected for tests).
    pub fn for_mode(mode: Mode, uid: u32, env: &dyn Fn(&str) -> Option<String>) -> Paths {
        let abs = |k: &str| {
            env(k).filter(|v| !v.is_empty()).and_then(|v| {
                // systemd may pass several directories separated by ':'; the first is ours.
                let first = v.split(':').next().unwrap_or("").to_string();
                Path::new(&first)
                    .is_absolute()
                    .then(|| PathBuf::from(first))
            })
        };
        match mode {
            Mode::System => Paths {
                config_file: PathBuf::from("/etc/outlive/outlive.toml"),
                state_dir: abs("STATE_DIRECTORY")
                    .unwrap_or_else(|| PathBuf::from("/var/lib/outlive")),
                runtime_dir: abs("RUNTIME_DIRECTORY")
                    .unwrap_or_else(|| PathBuf::from("/run/outlive")),
            },
            Mode::User => {
                let home = abs("HOME")
                    .unwrap_or_else(|| PathBuf::from(format!("/tmp/outlive-home-{uid}")));
                let config_home = abs("XDG_CONFIG_HOME").unwrap_or_else(|| home.join(".config"));
                let state_home = abs("XDG_STATE_HOME").unwrap_or_else(|| home.join(".local/state"));
                Paths {
                    config_file: config_home.join("outlive/outlive.toml"),
                    state_dir: abs("STATE_DIRECTORY").unwrap_or_else(|| state_home.join("outlive")),
                    runtime_dir: abs("RUNTIME_DIRECTORY")
                        .or_else(|| abs("XDG_RUNTIME_DIR").map(|d| d.join("outlive")))
                        // No runtime directory from the session: a private one in /tmp (the
                        // agent creates it 0700 and refuses one owned by someone else).
                        .unwrap_or_else(|| PathBuf::from(format!("/tmp/outlive-{uid}"))),
                }
            }
        }
    }

    /// The paths of this process's environment.
    pub fn from_env(mode: Mode) -> Paths {
        Paths::for_mode(mode, nix::unistd::getuid().as_raw(), &|k| {
            std::env::var(k).ok()
        })
    }
}

/// A configuration error: the file, the key, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.file {
            write!(f, "{}: ", p.display())?;
        }
        if let Some(k) = &self.key {
            write!(f, "{k}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Lock auto-heal (L-4 rows 7–11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoHeal {
    Off,
    Observe,
    On,
}

/// The configuration as applied, as every component holds it: one channel, to which start
/// and each reload (SIGHUP) send one new configuration. A component derives its settings
/// from it at the start of its step (a tick, a queue operation, an evaluation, a probe), so a
/// reloadable key reaches its component through the key table and that component only.
pub type Applied = tokio::sync::watch::Receiver<std::sync::Arc<Config>>;

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from (None: no file, all defaults).
    pub source: Option<PathBuf>,
    /// Every key's effective value (defaults included), for generic readers (posture).
    pub values: BTreeMap<&'static str, Value>,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub queue: QueueConfig,
    pub drainer: DrainerConfig,
    pub posture: PostureConfig,
    pub facts: FactsConfig,
    /// None when `metrics.textfile` is empty.
    pub metrics_textfile: Option<PathBuf>,
    pub journal_socket: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    pub enabled: bool,
    pub dry_run: bool,
    pub max_size: u32,
    pub max_attempts: u32,
    pub max_resurrections: u32,
    pub entry_ttl_hours: u32,
    pub include_operator_kills: bool,
    pub allowed_units: Vec<String>,
    pub auto_heal: AutoHeal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainerConfig {
    pub interval_sec: u32,
    pub required_calm_ticks: u32,
    pub grace_sec: u32,
    pub max_revived_alive: u32,
    pub backoff_base_sec: u32,
    pub breaker_threshold: u32,
    pub breaker_cooldown_min: u32,
    pub auto_resume_stale_pause: bool,
    pub stale_pause_window_min: u32,
    pub calm_gate: bool,
    pub pressure_held_notice_min: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostureConfig {
    pub anomaly_grace_sec: u32,
    pub dry_run_soak_days: u32,
    pub notice_hold_min: u32,
    pub accepted_gaps: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactsConfig {
    pub statfs_timeout_ms: u32,
}

impl Config {
    /// All defaults for these paths.
    pub fn defaults(paths: &Paths) -> Config {
        Config::from_values(None, BTreeMap::new(), paths)
    }

    /// Parse and validate TOML text. `file` names the source in errors.
    pub fn parse(text: &str, file: Option<&Path>, paths: &Paths) -> Result<Config, ConfigError> {
        let err = |key: Option<String>, message: String| ConfigError {
            file: file.map(Path::to_path_buf),
            key,
            message,
        };
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            err(
                None,
                format!(
                    "not valid TOML: {}",
                    e.to_string().trim_end().replace('\n', " ")
                ),
            )
        })?;
        let mut set = BTreeMap::new();
        walk(&table, "", &mut set).map_err(|(k, m)| err(Some(k), m))?;
        Ok(Config::from_values(file.map(Path::to_path_buf), set, paths))
    }

    /// Load `file`. A missing file is all defaults unless `must_exist` (an explicit --config).
    pub fn load(file: &Path, must_exist: bool, paths: &Paths) -> Result<Config, ConfigError> {
        match std::fs::read(file) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes).map_err(|_| ConfigError {
                    file: Some(file.to_path_buf()),
                    key: None,
                    message: "not valid UTF-8".into(),
                })?;
                Config::parse(&text, Some(file), paths)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                Ok(Config::defaults(paths))
            }
            Err(e) => Err(ConfigError {
                file: Some(file.to_path_buf()),
                key: None,
                message: format!("cannot read: {e}"),
            }),
        }
    }

    fn from_values(
        source: Option<PathBuf>,
        set: BTreeMap<&'static str, Value>,
        paths: &Paths,
    ) -> Config {
        let mut values = BTreeMap::new();
        for k in KEYS {
            let v = set
                .get(k.key)
                .cloned()
                .unwrap_or_else(|| default_value(k, paths));
            values.insert(k.key, v);
        }
        Config::typed(source, values)
    }

    /// The typed configuration from every key's value.
    fn typed(source: Option<PathBuf>, values: BTreeMap<&'static str, Value>) -> Config {
        let b = |k: &str| matches!(values.get(k), Some(Value::Bool(true)));
        let n = |k: &str| match values.get(k) {
            Some(Value::Int(i)) => *i as u32,
            _ => 0,
        };
        let s = |k: &str| match values.get(k) {
            Some(Value::Str(s)) => s.clone(),
            _ => String::new(),
        };
        let l = |k: &str| match values.get(k) {
            Some(Value::List(l)) => l.clone(),
            _ => Vec::new(),
        };
        let textfile = s("metrics.textfile");
        Config {
            source,
            state_dir: PathBuf::from(s("state_dir")),
            runtime_dir: PathBuf::from(s("runtime_dir")),
            queue: QueueConfig {
                enabled: b("queue.enabled"),
                dry_run: b("queue.dry_run"),
                max_size: n("queue.max_size"),
                max_attempts: n("queue.max_attempts"),
                max_resurrections: n("queue.max_resurrections"),
                entry_ttl_hours: n("queue.entry_ttl_hours"),
                include_operator_kills: b("queue.include_operator_kills"),
                allowed_units: l("queue.allowed_units"),
                auto_heal: match s("queue.lock.auto_heal").as_str() {
                    "on" => AutoHeal::On,
                    "observe" => AutoHeal::Observe,
                    _ => AutoHeal::Off,
                },
            },
            drainer: DrainerConfig {
                interval_sec: n("drainer.interval_sec"),
                required_calm_ticks: n("drainer.required_calm_ticks"),
                grace_sec: n("drainer.grace_sec"),
                max_revived_alive: n("drainer.max_revived_alive"),
                backoff_base_sec: n("drainer.backoff_base_sec"),
                breaker_threshold: n("drainer.breaker_threshold"),
                breaker_cooldown_min: n("drainer.breaker_cooldown_min"),
                auto_resume_stale_pause: b("drainer.auto_resume_stale_pause"),
                stale_pause_window_min: n("drainer.stale_pause_window_min"),
                calm_gate: b("drainer.calm_gate"),
                pressure_held_notice_min: n("drainer.pressure_held_notice_min"),
            },
            posture: PostureConfig {
                anomaly_grace_sec: n("posture.anomaly_grace_sec"),
                dry_run_soak_days: n("posture.dry_run_soak_days"),
                notice_hold_min: n("posture.notice_hold_min"),
                accepted_gaps: l("posture.accepted_gaps"),
            },
            facts: FactsConfig {
                statfs_timeout_ms: n("facts.statfs_timeout_ms"),
            },
            metrics_textfile: (!textfile.is_empty()).then(|| PathBuf::from(textfile)),
            journal_socket: PathBuf::from(s("journal.socket")),
            values,
        }
    }

    /// A key's effective value.
    pub fn value(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    /// Keys whose value differs from `other` and that a reload cannot apply.
    pub fn pending_on_reload(&self, newer: &Config) -> Vec<&'static str> {
        KEYS.iter()
            .filter(|k| {
                k.reload == Reload::NextStart && self.values.get(k.key) != newer.values.get(k.key)
            })
            .map(|k| k.key)
            .collect()
    }

    /// What a reload applies (G-4): `newer` with the keys a reload cannot apply kept at their
    /// running values; returns it and the names of those keys that differ (to be audited).
    pub fn apply_reload(&self, newer: &Config) -> (Config, Vec<&'static str>) {
        let pending = self.pending_on_reload(newer);
        let mut values = newer.values.clone();
        for k in &pending {
            if let Some(v) = self.values.get(k) {
                values.insert(k, v.clone());
            }
        }
        (Config::typed(newer.source.clone(), values), pending)
    }

    /// The effective configuration as TOML (`outlived --check-config`).
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let mut section = "";
        for k in KEYS {
            let (sec, name) = split_key(k.key);
            if sec != section {
                out.push_str(&format!("\n[{sec}]\n"));
                section = sec;
            }
            let v = &self.values[k.key];
            out.push_str(&format!("{name} = {}\n", v.to_toml()));
        }
        out.trim_start().to_string()
    }
}

fn split_key(key: &str) -> (&str, &str) {
    match key.rsplit_once('.') {
        Some((s, n)) => (s, n),
        None => ("", key),
    }
}

fn default_value(k: &KeySpec, paths: &Paths) -> Value {
    match k.default {
        DefaultValue::Bool(b) => Value::Bool(b),
        DefaultValue::Int(i) => Value::Int(i),
        DefaultValue::Str(s) => Value::Str(s.to_string()),
        DefaultValue::EmptyList => Value::List(Vec::new()),
        DefaultValue::StateDir => Value::Str(paths.state_dir.to_string_lossy().into_owned()),
        DefaultValue::RuntimeDir => Value::Str(paths.runtime_dir.to_string_lossy().into_owned()),
    }
}

fn type_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// What a key expects, in words (for errors and documentation).
pub fn expectation(kind: Kind) -> String {
    match kind {
        Kind::Bool => "true or false".into(),
        Kind::Int { min, max } => format!("an integer from {min} to {max}"),
        Kind::Path { optional: false } => "an absolute path".into(),
        Kind::Path { optional: true } => "an absolute path, or \"\" for off".into(),
        Kind::Choice(c) => format!(
            "one of {}",
            c.iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Kind::List(ListOf::UnitGlobs) => {
            "an array of unit-name globs (e.g. [\"build-*.service\"])".into()
        }
        Kind::List(ListOf::GuardKeys) => {
            "an array of guard keys (e.g. [\"drainer.calm_gate\"])".into()
        }
    }
}

fn walk(
    table: &toml::Table,
    prefix: &str,
    out: &mut BTreeMap<&'static str, Value>,
) -> Result<(), (String, String)> {
    for (name, v) in table {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        if SECTIONS.contains(&key.as_str()) {
            match v {
                toml::Value::Table(t) => walk(t, &key, out)?,
                other => {
                    return Err((
                        key,
                        format!("expected a table [{name}], got {}", type_name(other)),
                    ));
                }
            }
            continue;
        }
        let Some(s) = spec(&key) else {
            let hint = suggest(&key)
                .map(|k| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            return Err((key, format!("unknown key{hint}")));
        };
        out.insert(s.key, validate(s, v).map_err(|m| (key.clone(), m))?);
    }
    Ok(())
}

fn validate(s: &KeySpec, v: &toml::Value) -> Result<Value, String> {
    let wrong = || format!("expected {}, got {}", expectation(s.kind), type_name(v));
    match (s.kind, v) {
        (Kind::Bool, toml::Value::Boolean(b)) => Ok(Value::Bool(*b)),
        (Kind::Int { min, max }, toml::Value::Integer(i)) => {
            if *i < min || *i > max {
                Err(format!("{i} is out of range ({min}–{max})"))
            } else {
                Ok(Value::Int(*i))
            }
        }
        (Kind::Path { optional }, toml::Value::String(p)) => {
            if p.is_empty() && optional {
                Ok(Value::Str(String::new()))
            } else if !Path::new(p).is_absolute() {
                Err(format!("{p:?} is not {}", expectation(s.kind)))
            } else if p.len() > 4096 || p.contains('\0') {
                Err("path too long or contains NUL".into())
            } else {
                Ok(Value::Str(p.clone()))
            }
        }
        (Kind::Choice(choices), toml::Value::String(c)) => {
            if choices.contains(&c.as_str()) {
                Ok(Value::Str(c.clone()))
            } else {
                Err(format!("{c:?} is not {}", expectation(s.kind)))
            }
        }
        (Kind::List(of), toml::Value::Array(items)) => {
            let mut out = Vec::new();
            for (i, it) in items.iter().enumerate() {
                let toml::Value::String(item) = it else {
                    return Err(format!(
                        "item {i}: expected a string, got {}",
                        type_name(it)
                    ));
                };
                let ok = match of {
                    ListOf::UnitGlobs => is_unit_glob(item),
                    ListOf::GuardKeys => {
                        !item.is_empty()
                            && item.len() <= 128
                            && item.bytes().all(|b| {
                                b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                            })
                    }
                };
                if !ok {
                    return Err(format!(
                        "item {i}: {item:?} is not valid; expected {}",
                        expectation(s.kind)
                    ));
                }
                out.push(item.clone());
            }
            Ok(Value::List(out))
        }
        _ => Err(wrong()),
    }
}

/// A systemd unit name, optionally with glob characters.
pub fn is_unit_glob(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":-_.\\@*?[]!".contains(&b))
        && s.contains('.')
}

fn suggest(key: &str) -> Option<&'static str> {
    let last = key.rsplit('.').next().unwrap_or(key);
    let name = |k: &'static str| k.rsplit('.').next().unwrap_or(k);
    // The same name in another section, then a prefix of a name, then a near miss.
    KEYS.iter()
        .map(|k| k.key)
        .find(|k| name(k) == last && *k != key)
        .or_else(|| {
            KEYS.iter()
                .map(|k| k.key)
                .filter(|k| {
                    name(k).starts_with(last)
                        || last.starts_with(name(k))
                        || edit_distance(name(k), last) <= 2
                })
                .min_by_key(|k| (edit_distance(k, key), edit_distance(name(k), last)))
        })
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

/// One key as the documentation shows it: the shipped file, `outlive.toml(5)`.
#[derive(Debug, Clone)]
pub struct KeyDoc {
    /// The TOML table ("" for top-level keys).
    pub section: &'static str,
    /// The key's name within its table.
    pub name: &'static str,
    /// The system agent's default, as TOML.
    pub default_toml: String,
    /// What it expects, in words ("an integer from 1 to 20").
    pub expects: String,
    /// Read only at start, not on reload.
    pub next_start: bool,
    pub doc: &'static str,
}

/// The paths of the system agent (root, installed), which the documentation shows.
pub fn system_paths() -> Paths {
    Paths {
        config_file: PathBuf::from("/etc/outlive/outlive.toml"),
        state_dir: PathBuf::from("/var/lib/outlive"),
        runtime_dir: PathBuf::from("/run/outlive"),
    }
}

/// Every key, documented, in table order.
pub fn documented_keys() -> Vec<KeyDoc> {
    let paths = system_paths();
    KEYS.iter()
        .map(|k| {
            let (section, name) = split_key(k.key);
            KeyDoc {
                section,
                name,
                default_toml: default_value(k, &paths).to_toml(),
                expects: expectation(k.kind),
                next_start: k.reload == Reload::NextStart,
                doc: k.doc,
            }
        })
        .collect()
}

/// The commented default file shipped as `/etc/outlive/outlive.toml`: every key, commented
/// out, with its meaning, default and range.
pub fn commented_default_file() -> String {
    let mut out = String::from(
        "# /etc/outlive/outlive.toml: configuration of outlived (see outlive.toml(5)).\n\
         # Every key is optional; the values shown are the defaults. Unknown keys and values out of\n\
         # range are errors: check with `outlived --check-config`, apply with\n\
         # `systemctl reload outlived`.\n",
    );
    let mut section = "";
    for k in documented_keys() {
        if k.section != section {
            out.push_str(&format!("\n[{}]\n", k.section));
            section = k.section;
        }
        out.push('\n');
        for line in wrap(k.doc, 94) {
            out.push_str(&format!("# {line}\n"));
        }
        out.push_str(&format!("# Expects {}.", k.expects));
        if k.next_start {
            out.push_str(" Takes effect at the next start, not on reload.");
        }
        out.push('\n');
        out.push_str(&format!("#{} = {}\n", k.name, k.default_toml));
    }
    out
}

/// Word-wrap text to `width` columns.
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for w in text.split_whitespace() {
        if !cur.is_empty() && cur.len() + 1 + w.len() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(w);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> Paths {
        Paths::for_mode(Mode::System, 0, &|_| None)
    }

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Some(Path::new("/etc/outlive/outlive.toml")), &paths())
    }

    #[test]
    fn defaults_match_spec_section_9() {
        let c = Config::defaults(&paths());
        assert_eq!(c.state_dir, Path::new("/var/lib/outlive"));
        assert_eq!(c.runtime_dir, Path::new("/run/outlive"));
        assert!(c.queue.enabled && c.queue.dry_run);
        assert_eq!(
            (
                c.queue.max_size,
                c.queue.max_attempts,
                c.queue.max_resurrections
            ),
            (50, 3, 2)
        );
        assert_eq!(c.queue.entry_ttl_hours, 24);
        assert!(!c.queue.include_operator_kills && c.queue.allowed_units.is_empty());
        assert_eq!(c.queue.auto_heal, AutoHeal::Off);
        let d = &c.drainer;
        assert_eq!(
            (
                d.interval_sec,
                d.required_calm_ticks,
                d.grace_sec,
                d.max_revived_alive
            ),
            (60, 3, 15, 10)
        );
        assert_eq!(
            (
                d.backoff_base_sec,
                d.breaker_threshold,
                d.breaker_cooldown_min
            ),
            (120, 3, 30)
        );
        assert!(d.auto_resume_stale_pause && d.calm_gate);
        assert_eq!(
            (d.stale_pause_window_min, d.pressure_held_notice_min),
            (60, 20)
        );
        let p = &c.posture;
        assert_eq!(
            (p.anomaly_grace_sec, p.dry_run_soak_days, p.notice_hold_min),
            (120, 7, 60)
        );
        assert_eq!(c.facts.statfs_timeout_ms, 3000);
        assert_eq!(c.metrics_textfile, None);
        assert_eq!(c.journal_socket, Path::new("/run/systemd/journal/socket"));
    }

    #[test]
    fn every_key_reaches_the_typed_config() {
        let base = Config::defaults(&paths());
        for k in KEYS {
            let v = match (k.kind, k.default) {
                (Kind::Bool, DefaultValue::Bool(b)) => (!b).to_string(),
                (Kind::Int { min, max }, DefaultValue::Int(d)) => {
                    (if d == max { min } else { d + 1 }).to_string()
                }
                (Kind::Path { .. }, _) => "\"/srv/elsewhere\"".into(),
                (Kind::Choice(c), _) => format!("\"{}\"", c[1]),
                (Kind::List(ListOf::UnitGlobs), _) => "[\"a-*.service\"]".into(),
                (Kind::List(ListOf::GuardKeys), _) => "[\"queue.resume\"]".into(),
                other => panic!("{}: untested kind {other:?}", k.key),
            };
            let (sec, name) = split_key(k.key);
            let text = if sec.is_empty() {
                format!("{name} = {v}\n")
            } else {
                format!("[{sec}]\n{name} = {v}\n")
            };
            let c = parse(&text).unwrap_or_else(|e| panic!("{}: {e}", k.key));
            let mut cmp = c.clone();
            cmp.values = base.values.clone();
            cmp.source = None;
            assert_ne!(
                cmp, base,
                "{} is parsed but never reaches the typed Config",
                k.key
            );
        }
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let e = parse("[queue]\nmax_sise = 5\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("queue.max_sise"));
        assert!(
            e.to_string()
                .starts_with("/etc/outlive/outlive.toml: queue.max_sise: unknown key"),
            "{e}"
        );
        let e = parse("[drainer]\nmax_size = 5\n").unwrap_err();
        assert!(
            e.to_string().contains("did you mean `queue.max_size`"),
            "{e}"
        );
        let e = parse("[drainer]\ninterval = 5\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("did you mean `drainer.interval_sec`"),
            "{e}"
        );
        let e = parse("[queue]\nmax_atempts = 5\n").unwrap_err();
        assert!(
            e.to_string().contains("did you mean `queue.max_attempts`"),
            "{e}"
        );
        let e = parse("bogus = 1\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("bogus"));
        let e = parse("[nonsense]\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("nonsense"));
    }

    #[test]
    fn out_of_range_values_name_key_and_range() {
        let e = parse("[queue]\nmax_size = 0\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/outlive/outlive.toml: queue.max_size: 0 is out of range (1–10000)"
        );
        let e = parse("[drainer]\ninterval_sec = 241\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("drainer.interval_sec: 241 is out of range (1–240)"),
            "{e}"
        );
        let e = parse("[queue.lock]\nauto_heal = \"yes\"\n").unwrap_err();
        assert!(
            e.to_string().contains(
                "queue.lock.auto_heal: \"yes\" is not one of \"off\", \"observe\", \"on\""
            ),
            "{e}"
        );
        let e = parse("[queue]\ndry_run = \"false\"\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("queue.dry_run: expected true or false, got a string"),
            "{e}"
        );
        let e = parse("state_dir = \"relative/dir\"\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("state_dir: \"relative/dir\" is not an absolute path"),
            "{e}"
        );
        let e = parse("queue = 3\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("queue"));
        let e = parse("[queue]\nallowed_units = [\"ok.service\", 3]\n").unwrap_err();
        assert!(e.to_string().contains("queue.allowed_units: item 1"), "{e}");
        let e = parse("[queue]\nallowed_units = [\"rm -rf\"]\n").unwrap_err();
        assert!(e.to_string().contains("queue.allowed_units: item 0"), "{e}");
        // Boundaries are inclusive.
        assert!(parse("[drainer]\ninterval_sec = 240\nstale_pause_window_min = 0\n").is_ok());
    }

    #[test]
    fn bad_toml_is_an_error_naming_the_file() {
        let e = parse("[queue\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/etc/outlive/outlive.toml: not valid TOML"),
            "{e}"
        );
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn metrics_textfile_empty_is_off() {
        assert_eq!(
            parse("[metrics]\ntextfile = \"\"\n")
                .unwrap()
                .metrics_textfile,
            None
        );
        assert_eq!(
            parse("[metrics]\ntextfile = \"/var/lib/prometheus/node-exporter/outlive.prom\"\n")
                .unwrap()
                .metrics_textfile,
            Some(PathBuf::from(
                "/var/lib/prometheus/node-exporter/outlive.prom"
            ))
        );
    }

    #[test]
    fn check_config_output_round_trips() {
        let c = parse("[queue]\ndry_run = false\nallowed_units = [\"x-*.service\"]\n").unwrap();
        let again = parse(&c.to_toml()).unwrap();
        assert_eq!(again.values, c.values);
    }

    #[test]
    fn commented_default_file_parses_to_defaults_when_uncommented() {
        let text = commented_default_file();
        let uncommented: String = text
            .lines()
            .map(|l| {
                if l.starts_with('#') && l.contains(" = ") && !l.starts_with("# ") {
                    &l[1..]
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = parse(&uncommented).unwrap();
        assert_eq!(c.values, Config::defaults(&paths()).values);
        for k in KEYS {
            assert!(
                text.contains(&format!("#{} = ", split_key(k.key).1)),
                "{} missing",
                k.key
            );
        }
    }

    #[test]
    fn paths_by_mode() {
        let env = |k: &str| match k {
            "HOME" => Some("/home/u".to_string()),
            "XDG_RUNTIME_DIR" => Some("/run/user/1000".to_string()),
            _ => None,
        };
        let p = Paths::for_mode(Mode::User, 1000, &env);
        assert_eq!(
            p.config_file,
            Path::new("/home/u/.config/outlive/outlive.toml")
        );
        assert_eq!(p.state_dir, Path::new("/home/u/.local/state/outlive"));
        assert_eq!(p.runtime_dir, Path::new("/run/user/1000/outlive"));
        let p = Paths::for_mode(Mode::User, 1000, &|k| {
            (k == "HOME").then(|| "/home/u".to_string())
        });
        assert_eq!(p.runtime_dir, Path::new("/tmp/outlive-1000"));
        let sd = |k: &str| match k {
            "STATE_DIRECTORY" => Some("/var/lib/outlive:/var/lib/other".to_string()),
            "RUNTIME_DIRECTORY" => Some("/run/outlive".to_string()),
            _ => None,
        };
        let p = Paths::for_mode(Mode::System, 0, &sd);
        assert_eq!(p.state_dir, Path::new("/var/lib/outlive"));
        // A relative STATE_DIRECTORY is ignored, not trusted.
        let p = Paths::for_mode(Mode::System, 0, &|k| {
            (k == "STATE_DIRECTORY").then(|| "rel".to_string())
        });
        assert_eq!(p.state_dir, Path::new("/var/lib/outlive"));
    }

    #[test]
    fn reload_pending_keys() {
        let a = parse("").unwrap();
        let b = parse(
            "state_dir = \"/srv/x\"\n[journal]\nsocket = \"/tmp/j\"\n[queue]\ndry_run = false\n",
        )
        .unwrap();
        assert_eq!(a.pending_on_reload(&b), vec!["state_dir", "journal.socket"]);
        let (applied, pending) = a.apply_reload(&b);
        assert_eq!(pending, vec!["state_dir", "journal.socket"]);
        assert_eq!(applied.state_dir, a.state_dir);
        assert_eq!(applied.journal_socket, a.journal_socket);
        assert_eq!(applied.value("state_dir"), a.value("state_dir"));
        assert!(!applied.queue.dry_run, "live keys are applied");
    }
}
