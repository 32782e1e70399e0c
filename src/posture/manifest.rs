//! The manifest of the agent's own guards (SPEC G-1): which safety systems it has, where each
//! is configured, what it defaults to, how often it proves itself, and whether the promise
//! rests on it. Every boolean or optional key of SPEC §9 is a guard's `config_path` or
//! `dry_run_path`, or listed in [`NOT_A_GUARD`] with a reason; a test enforces it, so a new
//! switch cannot be added without deciding whether it is a safety system.

use crate::config::Value;

/// Where a guard's "configured on" comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GuardKind {
    /// A key of the configuration file.
    Config,
    /// Always on by design (no key); only the runtime can say it is not.
    CodeDefault,
}

/// How often a guard proves itself (G-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cadence {
    None,
    /// `drainer.interval_sec`.
    DrainerInterval,
    /// Half the systemd watchdog period; 1 s without one.
    HalfWatchdog,
}

/// One built-in guard.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GuardSpec {
    pub key: &'static str,
    pub kind: GuardKind,
    /// The §9 key whose value says whether it is configured on.
    pub config_path: Option<&'static str>,
    pub default_enabled: bool,
    /// The §9 key that puts it in dry run.
    pub dry_run_path: Option<&'static str>,
    /// A runtime status is expected (its absence is `missing`).
    pub expect_runtime: bool,
    pub cadence: Cadence,
    /// The component reads its configuration live (a changed file is not `diverged`).
    pub live_config: bool,
    /// The promise rests on it (G-7 `load-bearing-gap`).
    pub load_bearing: bool,
    #[expect(
        dead_code,
        reason = "G-1 lists each guard's component for readers of the manifest; no output projects it (G-10)"
    )]
    pub component: &'static str,
    pub description: &'static str,
}

/// The nine built-in guards, in the order of the SPEC's table.
pub(crate) const BUILTIN: [GuardSpec; 10] = [
    GuardSpec {
        key: "queue.resume",
        kind: GuardKind::Config,
        config_path: Some("queue.enabled"),
        default_enabled: true,
        dry_run_path: Some("queue.dry_run"),
        expect_runtime: true,
        cadence: Cadence::DrainerInterval,
        live_config: false,
        load_bearing: true,
        component: "queue",
        description: "reaped runs are queued and revived: the queue holds its lock, accepts work and its drainer ticks",
    },
    GuardSpec {
        key: "queue.lock.auto_heal",
        kind: GuardKind::Config,
        config_path: Some("queue.lock.auto_heal"),
        default_enabled: false,
        dry_run_path: None,
        expect_runtime: true,
        cadence: Cadence::None,
        live_config: false,
        load_bearing: false,
        component: "queue",
        description: "a lock left by another host on a host-local state directory is taken over when its holder is dead (observe: reported only)",
    },
    GuardSpec {
        key: "drainer.auto_resume_stale_pause",
        kind: GuardKind::Config,
        config_path: Some("drainer.auto_resume_stale_pause"),
        default_enabled: true,
        dry_run_path: None,
        expect_runtime: true,
        cadence: Cadence::None,
        live_config: false,
        load_bearing: false,
        component: "drainer",
        description: "a stale emergency pause heals itself once active runs are queued well after it",
    },
    GuardSpec {
        key: "drainer.calm_gate",
        kind: GuardKind::Config,
        config_path: Some("drainer.calm_gate"),
        default_enabled: true,
        dry_run_path: None,
        expect_runtime: true,
        cadence: Cadence::None,
        live_config: false,
        load_bearing: false,
        component: "drainer",
        description: "runs are revived only when memory and CPU have headroom",
    },
    GuardSpec {
        key: "state.host_local",
        kind: GuardKind::CodeDefault,
        config_path: None,
        default_enabled: true,
        dry_run_path: None,
        expect_runtime: true,
        cadence: Cadence::None,
        live_config: false,
        load_bearing: true,
        component: "facts",
        description: "the state directory is on a host-local, persistent filesystem",
    },
    GuardSpec {
        key: "capture.watch",
        kind: GuardKind::CodeDefault,
        config_path: None,
        default_enabled: true,
        dry_run_path: None,
        expect_runtime: true,
        cadence: Cadence::None,
        live_config: false,
        load_bearing: true,
        component: "capture",
        description: "runs reaped by someone else are captured: outlived is subscribed to the service manager and has reconciled every watched run since",
    },
    GuardSpec {
        key: "watchdog",
        kind: GuardKind::CodeDefault,
        config_path: None,
        default_enabled: true,
        dry_run_path: None,
        expect_runtime: true,
        cadence: Cadence::HalfWatchdog,
        live_config: false,
        load_bearing: false,
        component: "publish",
        description: "the service manager's watchdog is armed and fed only while the agent's loops progress",
    },
    GuardSpec {
        key: "publish.dbus",
        kind: GuardKind::CodeDefault,
        config_path: None,
        default_enabled: true,
        dry_run_path: None,
        expect_runtime: true,
        cadence: Cadence::None,
        live_config: false,
        load_bearing: false,
        component: "publish",
        description: "the agent owns org.outlive.Agent1 on the bus, so clients can reach it",
    },
    GuardSpec {
        key: "publish.journal",
        kind: GuardKind::CodeDefault,
        config_path: None,
        default_enabled: true,
        dry_run_path: None,
        expect_runtime: false,
        cadence: Cadence::None,
        live_config: false,
        load_bearing: false,
        component: "publish",
        description: "the journal accepts the agent's entries",
    },
    GuardSpec {
        key: "metrics.textfile",
        kind: GuardKind::Config,
        config_path: Some("metrics.textfile"),
        default_enabled: false,
        dry_run_path: None,
        expect_runtime: true,
        cadence: Cadence::DrainerInterval,
        live_config: false,
        load_bearing: false,
        component: "publish",
        description: "the metrics textfile for node_exporter is written every tick",
    },
];

/// Boolean or optional keys of §9 that are not guards, and why.
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "read by the G-1 test that every key is a guard or listed here"
    )
)]
pub(crate) const NOT_A_GUARD: &[(&str, &str)] = &[
    (
        "queue.include_operator_kills",
        "an eligibility policy (which reaps count), not a safety system",
    ),
    (
        "queue.allowed_units",
        "an authorization list for members of outlive, not a safety system",
    ),
    (
        "drainer.pressure_held_notice_min",
        "when a notice is raised; the calm gate itself is `drainer.calm_gate`",
    ),
    (
        "capture.units",
        "which units capture watches; whether capture is on is the built-in guard capture.watch",
    ),
    (
        "capture.max_watched",
        "a bound on watch records, not a safety system",
    ),
    (
        "capture.evidence_policy",
        "the default evidence of watched runs (Q-4 policy), not a safety system",
    ),
    (
        "posture.accepted_gaps",
        "the operator's acceptance of gaps, read by the posture itself",
    ),
];

/// The built-in guard `key`.
pub(crate) fn builtin(key: &str) -> Option<&'static GuardSpec> {
    BUILTIN.iter().find(|g| g.key == key)
}

/// Whether a configuration value means "on": true, a non-empty path, a choice other than
/// `off`.
pub(crate) fn value_enabled(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Int(i) => *i != 0,
        Value::Str(s) => !s.is_empty() && s != "off",
        Value::List(l) => !l.is_empty(),
    }
}

/// Whether a guard's own value means dry run (`observe`).
pub(crate) fn value_dry_run(v: &Value) -> bool {
    matches!(v, Value::Str(s) if s == "observe")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KEYS, Kind};

    /// A key that can switch something on or off: a boolean, an optional path, a choice, a
    /// list, or a number whose 0 disables.
    fn is_switch(k: &crate::config::KeySpec) -> bool {
        match k.kind {
            Kind::Bool | Kind::Choice(_) | Kind::List(_) => true,
            Kind::Path { optional } => optional,
            Kind::Int { min, .. } => min == 0 && k.doc.contains("disables"),
        }
    }

    #[test]
    fn g1_every_boolean_or_optional_key_is_a_guard_or_listed_as_not_one() {
        let mut uncovered = vec![];
        for k in KEYS.iter().filter(|k| is_switch(k)) {
            let guard = BUILTIN
                .iter()
                .any(|g| g.config_path == Some(k.key) || g.dry_run_path == Some(k.key));
            let listed = NOT_A_GUARD.iter().any(|(n, _)| *n == k.key);
            assert!(
                !(guard && listed),
                "{} is both a guard and listed as not one",
                k.key
            );
            if !guard && !listed {
                uncovered.push(k.key);
            }
        }
        assert!(
            uncovered.is_empty(),
            "decide whether these are guards (G-1): {uncovered:?}"
        );
        // Everything the manifest names is a real key.
        for g in &BUILTIN {
            for p in [g.config_path, g.dry_run_path].into_iter().flatten() {
                assert!(KEYS.iter().any(|k| k.key == p), "{} names {p}", g.key);
            }
        }
        for (n, why) in NOT_A_GUARD {
            assert!(KEYS.iter().any(|k| k.key == *n), "{n} is not a key");
            assert!(!why.is_empty());
        }
    }

    #[test]
    fn g1_manifest_matches_the_spec_table() {
        let keys: Vec<&str> = BUILTIN.iter().map(|g| g.key).collect();
        assert_eq!(
            keys,
            [
                "queue.resume",
                "queue.lock.auto_heal",
                "drainer.auto_resume_stale_pause",
                "drainer.calm_gate",
                "state.host_local",
                "capture.watch",
                "watchdog",
                "publish.dbus",
                "publish.journal",
                "metrics.textfile"
            ]
        );
        let lb: Vec<&str> = BUILTIN
            .iter()
            .filter(|g| g.load_bearing)
            .map(|g| g.key)
            .collect();
        assert_eq!(lb, ["queue.resume", "state.host_local", "capture.watch"]);
        // Defaults off: auto-heal and metrics.
        let off: Vec<&str> = BUILTIN
            .iter()
            .filter(|g| !g.default_enabled)
            .map(|g| g.key)
            .collect();
        assert_eq!(off, ["queue.lock.auto_heal", "metrics.textfile"]);
        // Each config guard's default agrees with the configuration's default.
        let paths = crate::config::Paths {
            config_file: "/nonexistent/outlive.toml".into(),
            state_dir: "/var/lib/outlive".into(),
            runtime_dir: "/run/outlive".into(),
        };
        let defaults = crate::config::Config::defaults(&paths);
        for g in BUILTIN.iter().filter(|g| g.kind == GuardKind::Config) {
            let v = &defaults.values[g.config_path.unwrap()];
            assert_eq!(value_enabled(v), g.default_enabled, "{}", g.key);
        }
    }

    #[test]
    fn g1_values_read_as_on_off_and_observe() {
        assert!(value_enabled(&Value::Bool(true)));
        assert!(!value_enabled(&Value::Str(String::new())));
        assert!(value_enabled(&Value::Str("/var/lib/x.prom".into())));
        assert!(!value_enabled(&Value::Str("off".into())));
        assert!(value_enabled(&Value::Str("observe".into())));
        assert!(value_dry_run(&Value::Str("observe".into())));
        assert!(!value_dry_run(&Value::Str("on".into())));
    }
}
