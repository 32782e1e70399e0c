//! One configuration path (X-3 reload, G-4): for every key the key table marks reloadable,
//! editing it and sending SIGHUP makes the part that uses it use the new value. A reload sends
//! one new configuration down one channel, and each part takes its settings from it at the
//! start of its step and says so in the debug log ("queue uses …", "drainer uses …", "posture
//! uses …", "facts use …"); the metrics textfile is seen being written where the new value
//! says. A reloadable key added to the table without a row here fails the test.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Agent, AgentSpec};
use nix::sys::signal::Signal;
use outlive::config::{KEYS, Reload};

/// How a row sees that the part uses the new value.
enum Seen {
    /// A debug line with both texts, written after the SIGHUP.
    Log(&'static str, &'static str),
    /// This file (relative to the runtime directory) is written.
    File(&'static str),
}

use Seen::{File, Log};

/// key, its new value as TOML, and how the part that uses it is seen using it.
const ROWS: &[(&str, &str, Seen)] = &[
    (
        "queue.enabled",
        "false",
        Log("queue uses", "enabled: false"),
    ),
    (
        "queue.dry_run",
        "false",
        Log("queue uses", "dry_run: false"),
    ),
    ("queue.max_size", "7", Log("queue uses", "max_size: 7,")),
    (
        "queue.max_attempts",
        "5",
        Log("queue uses", "max_attempts: 5,"),
    ),
    (
        "queue.max_resurrections",
        "4",
        Log("queue uses", "max_resurrections: 4,"),
    ),
    (
        "queue.entry_ttl_hours",
        "2",
        Log("queue uses", "ttl_ms: 7200000,"),
    ),
    (
        "queue.include_operator_kills",
        "true",
        Log("queue uses", "include_operator_kills: true"),
    ),
    (
        "queue.allowed_units",
        "[\"x-*.service\"]",
        Log("drainer uses", "allowed_units: [\"x-*.service\"]"),
    ),
    (
        "capture.max_watched",
        "7",
        Log("queue uses", "max_watched: 7,"),
    ),
    (
        "capture.evidence_policy",
        "\"declared\"",
        Log("queue uses", "evidence_policy: Declared"),
    ),
    (
        "capture.units",
        "[\"x-*.service\"]",
        Log("capture uses", "units: [\"x-*.service\"]"),
    ),
    (
        "queue.lock.auto_heal",
        "\"observe\"",
        Log("queue uses", "auto_heal: Observe"),
    ),
    (
        "drainer.interval_sec",
        "2",
        Log("drainer loop uses", "interval: 2s"),
    ),
    (
        "drainer.required_calm_ticks",
        "4",
        Log("drainer uses", "required_calm_ticks: 4,"),
    ),
    (
        "drainer.grace_sec",
        "16",
        Log("drainer uses", "grace_ms: 16000,"),
    ),
    (
        "drainer.max_revived_alive",
        "9",
        Log("drainer uses", "max_revived_alive: 9,"),
    ),
    (
        "drainer.backoff_base_sec",
        "99",
        Log("drainer uses", "backoff_base_ms: 99000,"),
    ),
    (
        "drainer.breaker_threshold",
        "4",
        Log("drainer uses", "breaker_threshold: 4,"),
    ),
    (
        "drainer.breaker_cooldown_min",
        "40",
        Log("drainer uses", "breaker_cooldown_ms: 2400000,"),
    ),
    (
        "drainer.auto_resume_stale_pause",
        "false",
        Log("drainer uses", "auto_resume_stale_pause: false"),
    ),
    (
        "drainer.stale_pause_window_min",
        "5",
        Log("drainer uses", "stale_pause_window_ms: 300000,"),
    ),
    (
        "drainer.calm_gate",
        "false",
        Log("drainer uses", "calm_gate: false"),
    ),
    (
        "drainer.pressure_held_notice_min",
        "3",
        Log("drainer uses", "pressure_held_notice_ms: 180000,"),
    ),
    (
        "posture.anomaly_grace_sec",
        "30",
        Log("posture uses", "grace_ms: 30000,"),
    ),
    (
        "posture.dry_run_soak_days",
        "2",
        Log("posture uses", "soak_ms: 172800000,"),
    ),
    (
        "posture.notice_hold_min",
        "5",
        Log("posture uses", "hold_ms: 300000,"),
    ),
    (
        "posture.accepted_gaps",
        "[\"queue.resume\"]",
        Log("posture uses", "accepted_gaps: [\"queue.resume\"]"),
    ),
    (
        "facts.statfs_timeout_ms",
        "1234",
        Log("facts use a statfs timeout of", "1234 ms"),
    ),
    ("metrics.textfile", "METRICS", File("metrics/outlive.prom")),
];

/// What every configuration of the test holds besides the row's key: ticks every second, so
/// the drainer takes its settings at once.
const BASE: &[(&str, &str)] = &[("drainer.interval_sec", "1")];

/// The TOML for `values` (key ⇒ value), one table per section.
fn render(values: &BTreeMap<&str, String>) -> String {
    let mut sections: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (k, v) in values {
        let (sec, name) = k.rsplit_once('.').unwrap();
        sections
            .entry(sec)
            .or_default()
            .push(format!("{name} = {v}"));
    }
    sections
        .iter()
        .map(|(s, lines)| format!("\n[{s}]\n{}\n", lines.join("\n")))
        .collect()
}

fn wait(what: &str, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < end, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_key_the_table_marks_reloadable_has_a_row() {
    let mut reloadable: Vec<&str> = KEYS
        .iter()
        .filter(|k| k.reload == Reload::Applies)
        .map(|k| k.key)
        .collect();
    let mut rows: Vec<&str> = ROWS.iter().map(|r| r.0).collect();
    reloadable.sort();
    rows.sort();
    assert_eq!(rows, reloadable, "a row per reloadable key of config::KEYS");
}

#[test]
fn g4_sighup_brings_every_reloadable_key_to_the_part_that_uses_it() {
    let base: BTreeMap<&str, String> = BASE.iter().map(|(k, v)| (*k, v.to_string())).collect();
    let a = Agent::start(AgentSpec {
        toml: render(&base),
        ..AgentSpec::default()
    });
    let head = std::fs::read_to_string(&a.config).unwrap();
    let head = head[..head.find("\n[drainer]").unwrap()].to_string();
    wait("the agent starts its drainer", || {
        a.stderr().contains("started")
    });
    for (key, value, seen) in ROWS {
        let mut values = base.clone();
        let metrics = a.runtime_dir.join("metrics/outlive.prom");
        let v = match *value {
            "METRICS" => format!("{:?}", metrics.display().to_string()),
            v => v.to_string(),
        };
        values.insert(key, v);
        std::fs::write(&a.config, format!("{head}{}", render(&values))).unwrap();
        let from = a.stderr().len();
        a.signal(Signal::SIGHUP);
        match seen {
            Log(part, text) => wait(
                &format!(
                    "{key} = {value}: no \"{part} … {text}\" after the reload:\n{}",
                    &a.stderr()[from..]
                ),
                || {
                    a.stderr()[from..]
                        .lines()
                        .any(|l| l.contains(part) && l.contains(text))
                },
            ),
            File(rel) => wait(&format!("{key}: {rel} is not written"), || {
                a.runtime_dir.join(rel).is_file()
            }),
        }
    }
    // And back: the last row's key returns to its default with the next reload.
    std::fs::write(&a.config, format!("{head}{}", render(&base))).unwrap();
    let metrics = a.runtime_dir.join("metrics/outlive.prom");
    std::fs::remove_file(&metrics).unwrap();
    a.signal(Signal::SIGHUP);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !metrics.exists(),
        "metrics.textfile off again, yet the file is written"
    );
}
