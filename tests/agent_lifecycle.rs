//! The agent's lifecycle against sockets the tests bind (SPEC, §9): notifications
//! on a NOTIFY_SOCKET, audit events on a journal socket, fatal starts, reload, and the watchdog
//! fed only while loops progress (with the `fault-hooks` feature).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Agent, AgentSpec, TestSocket, outlived, require_root, run};
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(15);

fn start(notify: &TestSocket, journal: &TestSocket, extra: AgentSpec) -> Agent {
    Agent::start(AgentSpec {
        notify: Some(notify.path.clone()),
        journal: Some(journal.path.clone()),
        ..extra
    })
}

#[test]
fn x3_ready_with_status_then_stopping_on_sigterm() {
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let mut a = start(&n, &j, AgentSpec::default());
    let ready = n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    assert!(
        ready.get("STATUS").is_some_and(|s| !s.is_empty()),
        "READY comes with a status: {ready:?}"
    );
    j.wait_for("the started event", T, |d| {
        d.has("OUTLIVE_EVENT", "started") && d.has("SYSLOG_IDENTIFIER", "outlived")
    });
    a.signal(Signal::SIGTERM);
    let stopping = n.wait_for("STOPPING=1", T, |d| d.has("STOPPING", "1"));
    assert_eq!(
        stopping.get("STATUS"),
        Some(""),
        "the status is cleared on stop: {stopping:?}"
    );
    assert_eq!(a.wait_exit(T), Some(0), "stderr: {}", a.stderr());
    j.wait_for("the stopped event", T, |d| {
        d.has("OUTLIVE_EVENT", "stopped")
    });
}

#[test]
fn x3_sighup_sends_reloading_with_monotonic_usec_then_ready() {
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let a = start(&n, &j, AgentSpec::default());
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    let before = outlive::clock::monotonic_usec();
    a.append_config("[drainer]\ninterval_sec = 7\n");
    a.signal(Signal::SIGHUP);
    let reloading = n.wait_for("RELOADING=1", T, |d| d.has("RELOADING", "1"));
    let usec: u64 = reloading
        .get("MONOTONIC_USEC")
        .expect("MONOTONIC_USEC with RELOADING")
        .parse()
        .unwrap();
    assert!(
        usec >= before && usec <= outlive::clock::monotonic_usec(),
        "MONOTONIC_USEC={usec} is not now"
    );
    let ready = n.wait_for("READY=1 after the reload", T, |d| {
        d.has("READY", "1") && d.at > reloading.at
    });
    assert!(ready.at >= reloading.at);
    j.wait_for("config-reloaded", T, |d| {
        d.has("OUTLIVE_EVENT", "config-reloaded")
    });
}

#[test]
fn x3_reload_with_a_broken_file_keeps_running_and_says_so() {
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let mut a = start(&n, &j, AgentSpec::default());
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    a.append_config("[queue]\nmax_size = 0\n");
    a.signal(Signal::SIGHUP);
    let e = j.wait_for("config-unreadable", T, |d| {
        d.has("OUTLIVE_EVENT", "config-unreadable")
    });
    assert_eq!(
        e.get("MESSAGE_ID"),
        Some("e72663eda21f4861949d502c83bd09d2"),
        "generic queue-notice id: {e:?}"
    );
    assert!(
        e.get("MESSAGE")
            .unwrap()
            .contains("queue.max_size: 0 is out of range (1–10000)"),
        "{e:?}"
    );
    let reloading = n.wait_for("RELOADING=1", T, |d| d.has("RELOADING", "1"));
    n.wait_for("READY=1 after the failed reload", T, |d| {
        d.has("READY", "1") && d.at > reloading.at
    });
    assert_eq!(
        a.wait_exit(Duration::from_millis(300)),
        None,
        "the agent must keep running"
    );
}

#[test]
fn g4_reload_audits_keys_that_wait_for_the_next_start() {
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let a = start(&n, &j, AgentSpec::default());
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    // Rewrite the file with another state_dir (a key a reload cannot apply).
    let text = std::fs::read_to_string(&a.config).unwrap();
    let moved = text.replace("/state\"", "/state-moved\"");
    assert_ne!(text, moved);
    std::fs::write(&a.config, moved).unwrap();
    a.signal(Signal::SIGHUP);
    let e = j.wait_for("config-reload-pending", T, |d| {
        d.has("OUTLIVE_EVENT", "config-reload-pending")
    });
    assert_eq!(e.get("OUTLIVE_KEYS"), Some("state_dir"), "{e:?}");
}

#[test]
fn s9_invalid_configuration_is_fatal_with_status_and_errno() {
    let n = TestSocket::notify();
    let d = common::open_tempdir();
    let cfg = d.path().join("bad.toml");
    let state = d.path().join("state");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\n[drainer]\ninterval = 5\n",
            state.display()
        ),
    )
    .unwrap();
    let (code, _, err) = run(Command::new(outlived())
        .args(["--no-bus", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &n.path));
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("drainer.interval: unknown key (did you mean `drainer.interval_sec`?)"),
        "{err}"
    );
    assert!(
        err.contains(&cfg.display().to_string()),
        "names the file: {err}"
    );
    assert!(
        !state.exists(),
        "nothing is written before the configuration is valid"
    );
    // A file that is not TOML at all: the file and the line, exit 78, nothing written.
    std::fs::write(
        &cfg,
        format!("state_dir = \"{}\"\n[queue\n", state.display()),
    )
    .unwrap();
    let (code, _, err) = run(Command::new(outlived())
        .args(["--no-bus", "--config"])
        .arg(&cfg));
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains(&cfg.display().to_string()) && err.contains("line 2"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!state.exists());
    n.drain(Duration::from_millis(200));
    let seen = n.seen();
    assert!(
        seen.iter().any(|d| d.has("ERRNO", "22")
            && d.get("STATUS")
                .is_some_and(|s| s.contains("drainer.interval"))),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|d| d.has("READY", "1")),
        "never READY: {seen:?}"
    );
}

#[test]
fn s8_check_config_prints_the_effective_configuration() {
    let d = common::open_tempdir();
    let cfg = d.path().join("c.toml");
    std::fs::write(&cfg, "[queue]\ndry_run = false\n").unwrap();
    let (code, out, err) = run(Command::new(outlived())
        .arg("--check-config")
        .arg("--config")
        .arg(&cfg));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("dry_run = false") && out.contains("max_size = 50"),
        "{out}"
    );
    let parsed: toml::Table = out.parse().expect("the output is TOML");
    assert!(parsed.contains_key("queue"));
}

/// Run the agent in a private mount namespace where the machine id files read `contents`
/// (None: both files absent).
fn with_machine_id(contents: Option<&str>) -> (i32, String, Vec<common::Datagram>) {
    let n = TestSocket::notify();
    let d = common::open_tempdir();
    let fake = d.path().join("machine-id");
    let script = match contents {
        Some(c) => {
            std::fs::write(&fake, c).unwrap();
            format!(
                "mount --bind {f} /etc/machine-id && \
                 {{ [ ! -e /var/lib/dbus/machine-id ] || mount --bind {f} /var/lib/dbus/machine-id; }} && exec \"$@\"",
                f = fake.display()
            )
        }
        None => "mount -t tmpfs tmpfs /etc && mount -t tmpfs tmpfs /var/lib/dbus && exec \"$@\""
            .to_string(),
    };
    let cfg = d.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!("runtime_dir = \"{}\"\n", d.path().join("run").display()),
    )
    .unwrap();
    let (code, _, err) = run(Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
            outlived(),
            "--no-bus",
            "--config",
        ])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &n.path));
    n.drain(Duration::from_millis(200));
    (code, err, n.seen())
}

#[test]
fn h1_uninitialized_or_empty_machine_id_is_fatal() {
    if !require_root("bind-mounting over /etc/machine-id in a private mount namespace") {
        return;
    }
    for (contents, errno) in [
        (Some("uninitialized\n"), "22"),
        (Some(""), "22"),
        (None, "2"),
    ] {
        let (code, err, seen) = with_machine_id(contents);
        assert_eq!(code, 1, "{contents:?}: {err}");
        assert!(err.contains("machine id"), "{contents:?}: {err}");
        assert!(
            seen.iter().any(|d| d.has("ERRNO", errno)
                && d.get("STATUS").is_some_and(|s| s.starts_with("failed:"))),
            "{contents:?}: {seen:?}"
        );
        assert!(
            !seen.iter().any(|d| d.has("READY", "1")),
            "{contents:?}: never READY"
        );
    }
}

#[test]
fn x4_wedged_loop_gets_watchdog_trigger_and_no_more_pings() {
    if !cfg!(feature = "fault-hooks") {
        assert!(common::require(
            false,
            "the fault-hooks feature (make test enables it)"
        ));
        return;
    }
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let wd = Duration::from_secs(2);
    let a = start(
        &n,
        &j,
        AgentSpec {
            watchdog_usec: Some(wd.as_micros() as u64),
            ..AgentSpec::default()
        },
    );
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    // Fed while the loops progress.
    let first = n.wait_for("WATCHDOG=1", T, |d| d.has("WATCHDOG", "1"));
    n.wait_for("a second WATCHDOG=1", T, |d| {
        d.has("WATCHDOG", "1") && d.at > first.at
    });
    std::fs::write(a.runtime_dir.join("fault-wedge-drainer"), "").unwrap();
    let asked = Instant::now();
    let trigger = n.wait_for("WATCHDOG=trigger", Duration::from_secs(20), |d| {
        d.has("WATCHDOG", "trigger")
    });
    let status = trigger.get("STATUS").unwrap_or_default().to_string();
    assert!(status.starts_with("wedged: drainer since "), "{status}");
    // The wedge starts at the loop's next wake (≤ wake = wd/2), then it is seen within one
    // watchdog period plus the loop's slack (5 s for a 1 s period); 1 s for scheduling.
    let limit = wd / 2 + wd + Duration::from_secs(5) + Duration::from_secs(1);
    assert!(
        trigger.at.duration_since(asked) <= limit,
        "took {:?} > {limit:?}",
        trigger.at.duration_since(asked)
    );
    n.drain(Duration::from_millis(1500));
    let after: Vec<_> = n
        .seen()
        .into_iter()
        .filter(|d| d.at > trigger.at && d.has("WATCHDOG", "1"))
        .collect();
    assert!(after.is_empty(), "WATCHDOG=1 after the trigger: {after:?}");
    let alert = j.wait_for("the watchdog alert", T, |d| {
        d.has("OUTLIVE_EVENT", "watchdog-trigger")
    });
    assert_eq!(
        alert.get("MESSAGE_ID"),
        Some("11c20c127c5f4bf48d18660cfba92206")
    );
    assert_eq!(alert.get("PRIORITY"), Some("3"));
    assert_eq!(alert.get("OUTLIVE_LOOP"), Some("drainer"));
}

#[test]
fn x4_without_a_service_manager_a_wedge_exits_70() {
    if !cfg!(feature = "fault-hooks") {
        assert!(common::require(
            false,
            "the fault-hooks feature (make test enables it)"
        ));
        return;
    }
    let j = TestSocket::journal();
    // A 1 s interval: the loop beats every second and is stale 6 s after its last beat.
    let mut a = Agent::start(AgentSpec {
        journal: Some(j.path.clone()),
        toml: "[drainer]\ninterval_sec = 1\n".into(),
        ..AgentSpec::default()
    });
    j.wait_for("started", T, |d| d.has("OUTLIVE_EVENT", "started"));
    std::fs::create_dir_all(&a.runtime_dir).unwrap();
    std::fs::write(a.runtime_dir.join("fault-wedge-drainer"), "").unwrap();
    assert_eq!(
        a.wait_exit(Duration::from_secs(15)),
        Some(70),
        "stderr: {}",
        a.stderr()
    );
    assert!(a.stderr().contains("wedged: drainer"), "{}", a.stderr());
    j.wait_for("the watchdog alert", T, |d| {
        d.has("OUTLIVE_EVENT", "watchdog-trigger") && d.has("OUTLIVE_LOOP", "drainer")
    });
}

#[test]
fn x2_no_journal_means_json_lines_on_stderr() {
    let n = TestSocket::notify();
    let mut a = Agent::start(AgentSpec {
        notify: Some(n.path.clone()),
        ..AgentSpec::default()
    });
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    a.signal(Signal::SIGTERM);
    assert_eq!(a.wait_exit(T), Some(0));
    let lines: Vec<serde_json::Value> = a
        .stderr()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let started = lines
        .iter()
        .find(|v| v["OUTLIVE_EVENT"] == "started")
        .expect("a started line on stderr");
    assert_eq!(started["SYSLOG_IDENTIFIER"], "outlived");
    assert!(started["MESSAGE"].as_str().unwrap().contains("started"));
}
