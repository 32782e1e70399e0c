//! Reading a configuration file: the TOML walked against the key table, each value checked
//! against its key's type and range (errors name the key, the range and, for an unknown key,
//! the nearest known one), then the typed configuration built from the values.

use super::*;

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

pub(super) fn split_key(key: &str) -> (&str, &str) {
    match key.rsplit_once('.') {
        Some((s, n)) => (s, n),
        None => ("", key),
    }
}

pub(super) fn default_value(k: &KeySpec, paths: &Paths) -> Value {
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

pub(super) fn walk(
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

impl Config {
    pub(super) fn from_values(
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
    pub(super) fn typed(source: Option<PathBuf>, values: BTreeMap<&'static str, Value>) -> Config {
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
            capture: CaptureConfig {
                units: l("capture.units"),
                max_watched: n("capture.max_watched"),
                evidence_policy: s("capture.evidence_policy"),
            },
            metrics_textfile: (!textfile.is_empty()).then(|| PathBuf::from(textfile)),
            journal_socket: PathBuf::from(s("journal.socket")),
            values,
        }
    }
}
