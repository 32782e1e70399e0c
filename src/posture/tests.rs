//! The posture service: rows from the configuration on disk, what was applied and the
//! runtime; drop-ins and reports; anomalies into the attention item. Injected clock; real
//! files in a temporary directory.

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};

use super::attention::Causes;
use super::rows::{Runtime, RuntimeRead};
use super::*;
use crate::clock::fake::FakeClock;

const S: u64 = 1000;

struct Fix {
    dir: tempfile::TempDir,
    clock: Arc<FakeClock>,
    p: Posture,
    /// The runtime each built-in getter returns, by key.
    rt: Arc<Mutex<HashMap<&'static str, RuntimeRead>>>,
}

fn on(clock: &FakeClock) -> RuntimeRead {
    RuntimeRead::Status(Runtime {
        enabled: true,
        last_tick_boot: Some(clock.boot_ms()),
        last_tick_wall: Some(clock.wall_ms()),
        ..Runtime::default()
    })
}

fn paths(dir: &Path) -> Paths {
    Paths {
        config_file: dir.join("outlive.toml"),
        state_dir: dir.join("state"),
        runtime_dir: dir.join("run"),
    }
}

impl Fix {
    fn new(toml: &str) -> Fix {
        Fix::with(toml, |_| {})
    }

    fn with(toml: &str, prepare: impl FnOnce(&Path)) -> Fix {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.path().join("outlive.toml"), toml).unwrap();
        prepare(dir.path());
        let clock = FakeClock::new();
        let paths = paths(dir.path());
        let config = Config::load(&paths.config_file, true, &paths).unwrap();
        let settings = Settings::from_config(&config, false, None);
        let att = Posture::attention_for(&settings, clock.clone());
        let mut p = Posture::new(
            &paths.config_file,
            true,
            paths.clone(),
            config,
            settings,
            nix::unistd::geteuid().as_raw(),
            att,
            clock.clone(),
        );
        let rt: Arc<Mutex<HashMap<&'static str, RuntimeRead>>> = Arc::default();
        for g in &BUILTIN {
            rt.lock().unwrap().insert(g.key, on(&clock));
            let rt2 = Arc::clone(&rt);
            let key = g.key;
            p.register(key, Box::new(move || rt2.lock().unwrap()[key].clone()));
        }
        Fix { dir, clock, p, rt }
    }

    fn set(&self, key: &'static str, r: RuntimeRead) {
        self.rt.lock().unwrap().insert(key, r);
    }

    /// Every getter ticks now.
    fn tick_all(&self) {
        let mut m = self.rt.lock().unwrap();
        for v in m.values_mut() {
            if let RuntimeRead::Status(r) = v
                && r.enabled
            {
                r.last_tick_boot = Some(self.clock.boot_ms());
                r.last_tick_wall = Some(self.clock.wall_ms());
            }
        }
    }

    fn eval(&mut self) -> Outcome {
        self.p.evaluate(&QueueFacts::default())
    }

    fn row(&self, key: &str) -> Row {
        self.p
            .published()
            .rows
            .iter()
            .find(|r| r.key == key)
            .unwrap_or_else(|| panic!("no row {key}"))
            .clone()
    }

    fn eff(&self, key: &str) -> &'static str {
        self.row(key).effective
    }
}

#[test]
fn g6_defaults_read_as_the_manifest_says() {
    let mut f = Fix::new("");
    f.eval();
    assert_eq!(
        f.eff("queue.resume"),
        "on-dry-run",
        "dry run is the default"
    );
    let r = f.row("queue.lock.auto_heal");
    assert_eq!((r.effective, r.off_class), ("off", Some("dark-default")));
    assert_eq!(f.row("metrics.textfile").off_class, Some("dark-default"));
    for k in [
        "drainer.calm_gate",
        "state.host_local",
        "capture.watch",
        "watchdog",
        "publish.dbus",
    ] {
        assert_eq!(f.eff(k), "on-confirmed", "{k}");
    }
    let p = f.p.published();
    assert_eq!(
        p.summary["on-confirmed"] + p.summary["on-dry-run"] + p.summary["off"],
        10
    );
    assert_eq!(p.summary.len(), 10, "all ten states, zeros included");
    assert!(p.anomalies.is_empty(), "{:?}", p.anomalies);
    assert!(!p.degraded);
    assert_eq!(p.on, (8, 10));
}

#[test]
fn g3_a_queue_that_failed_its_lock_reads_off_runtime_divergent_never_missing() {
    let mut f = Fix::new("[queue]\ndry_run = false\n");
    f.set(
        "queue.resume",
        RuntimeRead::Status(Runtime {
            enabled: false,
            reason_code: Some("foreign-host".into()),
            ..Runtime::default()
        }),
    );
    f.eval();
    let r = f.row("queue.resume");
    assert_eq!(
        (r.effective, r.reason_code.as_deref()),
        ("off-runtime-divergent", Some("foreign-host"))
    );
    assert_eq!(
        f.p.published().anomalies,
        ["queue.resume: off-runtime-divergent (foreign-host)"]
    );
    // After the grace it degrades the posture, with one entry.
    f.clock.pass(120 * S);
    let out = f.eval();
    let kinds: Vec<&str> = out.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["posture-degraded"]);
    assert!(f.p.published().degraded);
    assert_eq!(
        f.p.published().headline.as_deref(),
        Some("queue.resume off-runtime-divergent (foreign-host)")
    );
    // A getter that was never registered would be missing: the agent registers all of them.
    let mut g = Fix::new("");
    g.p.getters.remove("publish.dbus");
    g.eval();
    assert_eq!(g.eff("publish.dbus"), "missing");
}

/// §12 G-6 (core review finding 7, "v5c"): a queue disabled at runtime reads
/// off-runtime-divergent, and stays an anomaly, even after its configuration file was edited
/// (here dry_run turned off, not yet reloaded); the divergence is shown beside it.
#[test]
fn g6_a_disabled_queue_stays_off_runtime_divergent_after_its_file_was_edited() {
    let mut f = Fix::new("");
    f.set(
        "queue.resume",
        RuntimeRead::Status(Runtime {
            enabled: false,
            reason_code: Some("foreign-host".into()),
            ..Runtime::default()
        }),
    );
    f.eval();
    assert_eq!(f.eff("queue.resume"), "off-runtime-divergent");
    std::fs::write(
        f.dir.path().join("outlive.toml"),
        "[queue]\ndry_run = false\n",
    )
    .unwrap();
    f.eval();
    let r = f.row("queue.resume");
    assert_eq!(
        (r.effective, r.reason_code.as_deref(), r.diverged),
        ("off-runtime-divergent", Some("foreign-host"), true)
    );
    assert_eq!(
        f.p.published().anomalies,
        ["queue.resume: off-runtime-divergent (foreign-host)"]
    );
    // Even an edit that switches the queue off does not hide what is running now.
    std::fs::write(
        f.dir.path().join("outlive.toml"),
        "[queue]\nenabled = false\n",
    )
    .unwrap();
    f.eval();
    assert_eq!(f.eff("queue.resume"), "off-runtime-divergent");
}

#[test]
fn g4_switched_off_in_the_file_and_applied_is_off_diverged_from_default() {
    let mut f = Fix::new("[drainer]\ncalm_gate = false\n");
    f.set("drainer.calm_gate", RuntimeRead::Status(Runtime::default()));
    f.eval();
    let r = f.row("drainer.calm_gate");
    assert_eq!(
        (r.effective, r.off_class),
        ("off", Some("diverged-from-default"))
    );
    assert_eq!(
        f.p.published().anomalies,
        ["drainer.calm_gate: diverged-from-default"]
    );
}

#[test]
fn g4_a_changed_file_not_yet_applied_is_diverged_pending_restart_until_reload() {
    let mut f = Fix::new("");
    f.eval();
    std::fs::write(
        f.dir.path().join("outlive.toml"),
        "[drainer]\ncalm_gate = false\n",
    )
    .unwrap();
    f.eval();
    assert_eq!(f.eff("drainer.calm_gate"), "diverged-pending-restart");
    // Reload applies it.
    let paths = paths(f.dir.path());
    let c = Config::load(&paths.config_file, true, &paths).unwrap();
    let s = Settings::from_config(&c, false, None);
    f.p.reload(c, s);
    f.set("drainer.calm_gate", RuntimeRead::Status(Runtime::default()));
    f.eval();
    assert_eq!(f.eff("drainer.calm_gate"), "off");
}

#[test]
fn g4_an_unreadable_file_makes_config_rows_errored_with_one_notice() {
    let mut f = Fix::new("");
    f.eval();
    std::fs::write(f.dir.path().join("outlive.toml"), "[drainer\n").unwrap();
    let out = f.eval();
    let notices: Vec<&Event> = out
        .events
        .iter()
        .filter(|e| e.kind == "config-unreadable")
        .collect();
    assert_eq!(notices.len(), 1);
    assert_eq!(notices[0].get("reason"), Some("config-unreadable"));
    let r = f.row("drainer.calm_gate");
    assert_eq!(
        (r.effective, r.reason_code.as_deref()),
        ("errored", Some("config-unreadable"))
    );
    assert_eq!(
        f.eff("watchdog"),
        "on-confirmed",
        "code-default rows are not config rows"
    );
    let out = f.eval();
    assert!(
        out.events.iter().all(|e| e.kind != "config-unreadable"),
        "one notice"
    );
    std::fs::write(f.dir.path().join("outlive.toml"), "").unwrap();
    f.eval();
    assert_eq!(f.eff("drainer.calm_gate"), "on-confirmed");
}

#[test]
fn g6_no_bus_reads_a_quiet_dark_default_off() {
    let mut f = Fix::new("");
    f.p.settings.no_bus = true;
    f.p.snapshot_boot();
    f.set("publish.dbus", RuntimeRead::Status(Runtime::default()));
    f.eval();
    let r = f.row("publish.dbus");
    assert_eq!(
        (r.effective, r.off_class, r.default_enabled),
        ("off", Some("dark-default"), false)
    );
    assert!(f.p.published().anomalies.is_empty());
}

fn rep(enabled: bool, dry_run: bool, tick_at_ms: u64) -> GuardReport {
    GuardReport {
        enabled,
        dry_run,
        tick_at_ms,
        ..GuardReport::default()
    }
}

const DROPIN: &str = "[[guard]]\nkey = \"backup.snapshots\"\ndescription = \"snapshots are taken\"\n\
                      default_enabled = true\nenabled = true\ncadence_ms = 10000\n";

fn with_dropin(text: &'static str) -> impl FnOnce(&Path) {
    move |d: &Path| {
        let g = d.join("guards.d");
        std::fs::create_dir(&g).unwrap();
        std::fs::set_permissions(&g, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(g.join("50-backup.toml"), text).unwrap();
        std::fs::set_permissions(
            g.join("50-backup.toml"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
    }
}

#[test]
fn g2_an_external_guard_is_missing_then_confirmed_then_stale() {
    let mut f = Fix::with("", with_dropin(DROPIN));
    let me = nix::unistd::geteuid().as_raw();
    f.eval();
    let r = f.row("backup.snapshots");
    assert_eq!(
        (r.effective, r.source.as_str()),
        ("missing", "50-backup.toml")
    );
    f.p.report(
        me,
        "backup.snapshots",
        GuardReport {
            enabled: true,
            dry_run: false,
            tick_at_ms: 0,
            verdict_unknown: None,
            reason_code: None,
        },
    )
    .unwrap();
    f.eval();
    assert_eq!(f.eff("backup.snapshots"), "on-confirmed");
    // Exactly 5 × the cadence is not stale; 1 ms more is.
    f.clock.pass(50 * S);
    f.tick_all();
    f.eval();
    assert_eq!(f.eff("backup.snapshots"), "on-confirmed");
    f.clock.pass(1);
    f.tick_all();
    f.eval();
    assert_eq!(f.eff("backup.snapshots"), "on-stale");
    // tick_at is informational and clamped to now.
    f.p.report(
        me,
        "backup.snapshots",
        GuardReport {
            enabled: true,
            dry_run: false,
            tick_at_ms: u64::MAX,
            verdict_unknown: None,
            reason_code: None,
        },
    )
    .unwrap();
    f.eval();
    let r = f.row("backup.snapshots");
    assert_eq!(r.last_tick_at, Some(f.clock.wall_ms()));
    assert_eq!(r.effective, "on-confirmed");
    // The reporter's dry run outranks the drop-in's.
    f.p.report(
        me,
        "backup.snapshots",
        GuardReport {
            enabled: true,
            dry_run: true,
            tick_at_ms: 0,
            verdict_unknown: None,
            reason_code: None,
        },
    )
    .unwrap();
    f.eval();
    assert_eq!(f.eff("backup.snapshots"), "on-dry-run");
}

#[test]
fn g2_only_root_and_the_files_owner_may_report_and_unknown_keys_are_not_found() {
    let mut f = Fix::with("", with_dropin(DROPIN));
    let me = nix::unistd::geteuid().as_raw();
    let other = me + 4242;
    assert!(matches!(
        f.p.report(
            other,
            "backup.snapshots",
            GuardReport {
                enabled: true,
                dry_run: false,
                tick_at_ms: 0,
                verdict_unknown: None,
                reason_code: None
            }
        ),
        Err(ReportError::AccessDenied(_))
    ));
    if me != 0 {
        f.p.report(
            0,
            "backup.snapshots",
            GuardReport {
                enabled: true,
                dry_run: false,
                tick_at_ms: 0,
                verdict_unknown: None,
                reason_code: None,
            },
        )
        .unwrap();
    }
    assert!(matches!(
        f.p.report(
            me,
            "nope",
            GuardReport {
                enabled: true,
                dry_run: false,
                tick_at_ms: 0,
                verdict_unknown: None,
                reason_code: None
            }
        ),
        Err(ReportError::NotFound(_))
    ));
    assert!(matches!(
        f.p.report(me, "queue.resume", rep(true, false, 0)),
        Err(ReportError::NotFound(w)) if w.contains("built-in")
    ));
    // A malformed report is errored.
    assert!(matches!(
        f.p.report(
            me,
            "backup.snapshots",
            GuardReport {
                reason_code: Some("Free Text".into()),
                ..rep(true, false, 0)
            }
        ),
        Err(ReportError::Invalid(_))
    ));
    f.eval();
    assert_eq!(f.eff("backup.snapshots"), "errored");
}

#[test]
fn g2_a_bad_drop_in_reads_errored_with_its_file_as_source() {
    let mut f = Fix::with("", with_dropin("[[guard]]\nkey = \"x\"\n"));
    f.eval();
    let r = f.row("x");
    assert_eq!(
        (r.effective, r.source.as_str()),
        ("errored", "50-backup.toml")
    );
    assert!(r.description.contains("is required"), "{}", r.description);
    assert_eq!(f.p.rejected_dropins().len(), 1);
}

#[test]
fn g2_reload_picks_up_new_drop_ins() {
    let mut f = Fix::new("");
    f.eval();
    with_dropin(DROPIN)(f.dir.path());
    f.eval();
    assert!(
        f.p.published()
            .rows
            .iter()
            .all(|r| r.key != "backup.snapshots")
    );
    let paths = paths(f.dir.path());
    let c = Config::load(&paths.config_file, true, &paths).unwrap();
    f.p.reload(c.clone(), Settings::from_config(&c, false, None));
    f.eval();
    assert_eq!(f.eff("backup.snapshots"), "missing");
}

#[test]
fn g7_load_bearing_gap_after_the_dry_run_soak_unless_accepted() {
    let day = 24 * 3600 * S;
    let mut f = Fix::new("[posture]\ndry_run_soak_days = 7\n");
    let start = f.clock.wall_ms();
    let q = QueueFacts {
        causes: Causes::default(),
        dry_run_since: Some(start),
    };
    f.p.evaluate(&q);
    f.clock.pass(7 * day);
    f.tick_all();
    f.p.evaluate(&q);
    assert!(
        f.p.published().anomalies.is_empty(),
        "exactly the soak is no gap"
    );
    f.clock.pass(1);
    f.tick_all();
    f.p.evaluate(&q);
    assert_eq!(
        f.p.published().anomalies,
        ["queue.resume: load-bearing-gap"]
    );
    let mut g = Fix::new("[posture]\ndry_run_soak_days = 7\naccepted_gaps = [\"queue.resume\"]\n");
    g.clock.pass(8 * day);
    g.tick_all();
    g.p.evaluate(&q);
    assert!(g.p.published().anomalies.is_empty());
    assert!(
        g.p.accepted_gaps_event().is_some(),
        "accepted gaps are audited at start"
    );
}

#[test]
fn g7_flapping_is_more_than_three_changes_in_ten_evaluations_and_alerts_at_once() {
    let mut f = Fix::new("");
    f.eval();
    let off = RuntimeRead::Status(Runtime::default());
    for i in 0..4 {
        f.set(
            "publish.dbus",
            if i % 2 == 0 {
                off.clone()
            } else {
                on(&f.clock)
            },
        );
        let out = f.eval();
        if i < 3 {
            assert!(out.events.is_empty(), "evaluation {i}: {:?}", out.events);
        } else {
            // Four changes: flapping, alertable without the grace.
            let kinds: Vec<&str> = out.events.iter().map(|e| e.kind.as_str()).collect();
            assert_eq!(kinds, ["posture-degraded"]);
            assert!(out.events[0].message.contains("flapping"));
        }
    }
}

#[test]
fn g10_posture_changed_carries_only_changed_rows() {
    let mut f = Fix::new("");
    let first = f.eval();
    assert_eq!(first.changed_rows.len(), 10, "every row is new");
    f.clock.pass(S);
    f.tick_all();
    let again = f.eval();
    assert!(
        again.changed_rows.is_empty(),
        "a tick alone changes nothing: {:?}",
        again.changed_rows
    );
    f.set("watchdog", RuntimeRead::Status(Runtime::default()));
    let changed = f.eval().changed_rows;
    assert_eq!(changed.len(), 1);
    assert_eq!(
        (changed[0].key.as_str(), changed[0].effective),
        ("watchdog", "off-runtime-divergent")
    );
    for r in &f.p.published().rows {
        for k in r.to_json().as_object().unwrap().keys() {
            assert!(super::rows::ROW_FIELDS.contains(&k.as_str()));
        }
    }
}
