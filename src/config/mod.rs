//! The configuration file (SPEC §9).
//!
//! One table, [`KEYS`], defines every key: its type, default, range and meaning. Parsing,
//! validation (unknown keys and out-of-range values are errors naming the key and the range),
//! `outlived --check-config`, the commented default file shipped in packages and the
//! `outlive.toml(5)` page are all derived from it, so they cannot drift apart.
//!
//! Every key is optional; a missing default file means all defaults. In layers: the table
//! (`keys.rs`), a file read against it into the typed [`Config`] (`parse.rs`), the
//! configuration as text (`render.rs`); this file holds the types, loading and reload. The
//! applied configuration reaches the agent's parts through one channel ([`Applied`]).

mod keys;
mod parse;
mod render;

pub use keys::*;
pub use parse::*;
pub use render::*;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

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
    pub capture: CaptureConfig,
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

/// `[capture]` (SPEC C-1, C-2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    pub units: Vec<String>,
    pub max_watched: u32,
    /// `autonomous` or `declared`.
    pub evidence_policy: String,
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
