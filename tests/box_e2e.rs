//! End to end under a real systemd (DESIGN §4.3): the shipped unit and binaries, installed by
//! the project's `make install` into a box with journald and the system bus. Each test asserts
//! what an operator sees (`systemctl show`, `busctl`, `journalctl`, `outlivectl`) and that the
//! machine's own /tmp, /etc, /var, /usr, /run and /dev are unchanged afterwards.

mod common;

use std::time::Duration;

use common::boxed::{HostSnapshot, Stage, SystemdBox, available};

fn box_available() -> bool {
    common::require(available().is_ok(), &available().err().unwrap_or_default())
}

fn journal_json(b: &SystemdBox, filter: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["journalctl", "--no-pager", "-o", "json"];
    args.extend_from_slice(filter);
    let (_, out, _) = b.run(&args);
    out.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// X-1 (HostId), X-2: the agent under the shipped unit: active with a status, the
/// same host id over the bus as `outlivectl host`, journal entries, and a watchdog restart of
/// a stopped agent.
#[test]
fn box_outlived_runs_under_the_shipped_unit_and_the_watchdog_restarts_it() {
    if !box_available() {
        return;
    }
    let before = HostSnapshot::take(&[]);
    {
        let stage = Stage::new("lifecycle");
        stage.state_image(64);
        stage.want("outlived.service");
        // A short watchdog for the test; TimeoutAbortSec bounds the wait for a stopped process
        // to die after the watchdog's SIGABRT.
        stage.file(
            "/etc/systemd/system/outlived.service.d/test.conf",
            "[Service]\nWatchdogSec=3s\nTimeoutAbortSec=2s\nRestartSec=1s\n",
        );
        let b = SystemdBox::boot(&stage);
        b.wait_for("outlived to be active", Duration::from_secs(20), |b| {
            b.show("outlived", "ActiveState") == "active"
        });

        let status = b.show("outlived", "StatusText");
        assert!(!status.is_empty(), "StatusText is empty");
        // Default configuration: dry run (observe-only), the lock held on the ext4 state dir.
        assert!(
            status.starts_with("observe-only: queue: 0 waiting"),
            "{status}"
        );
        assert!(status.contains("lock held"), "{status}");

        // HostId over the real system bus equals outlivectl's, in the box and on the machine.
        let (code, out, err) = b.run(&[
            "busctl",
            "get-property",
            "org.outlive.Agent1",
            "/org/outlive/Agent1",
            "org.outlive.Agent1",
            "HostId",
        ]);
        assert_eq!(code, 0, "busctl: {err}");
        let bus_host_id = out
            .trim()
            .trim_start_matches("s ")
            .trim_matches('"')
            .to_string();
        let (code, out, err) = b.run(&["/usr/local/bin/outlivectl", "host", "--json"]);
        assert_eq!(code, 0, "outlivectl in the box: {err}");
        let inside: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(inside["host_id"].as_str(), Some(bus_host_id.as_str()));
        assert_eq!(
            common::host_json(None)["host_id"].as_str(),
            Some(bus_host_id.as_str())
        );

        // The state directory is on the ext4 image, seen as local-persistent by the agent.
        let (code, out, err) = b.run(&[
            "/usr/local/bin/outlivectl",
            "host",
            "--json",
            "--path",
            "/var/lib/outlive",
        ]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["path"]["class"], "local-persistent", "{v}");
        assert_eq!(v["path"]["fstype"], "ext4");

        // Journal entries with SYSLOG_IDENTIFIER=outlived, written by the native writer.
        let started = journal_json(&b, &["SYSLOG_IDENTIFIER=outlived", "OUTLIVE_EVENT=started"]);
        assert!(
            !started.is_empty(),
            "no `started` entry from outlived in the journal"
        );
        assert_eq!(
            started[0]["OUTLIVE_HOST_ID"].as_str(),
            Some(bus_host_id.as_str())
        );
        // Ordinary diagnostics reach the journal through tracing-journald (it adds TARGET).
        let diag = journal_json(&b, &["SYSLOG_IDENTIFIER=outlived", "TARGET=outlive::agent"]);
        assert!(
            diag.iter().any(|e| e["MESSAGE"]
                .as_str()
                .is_some_and(|m| m.contains("configuration"))),
            "no tracing diagnostic from outlived in the journal: {diag:?}"
        );

        // Running well past every loop's stale window (the bus loop pings every 1.5 s and
        // would be stale after 6.5 s), the watchdog stays fed: no restart.
        std::thread::sleep(Duration::from_secs(8));
        assert_eq!(
            b.show("outlived", "NRestarts"),
            "0",
            "restarted while healthy"
        );
        assert!(!b.show("outlived", "StatusText").starts_with("wedged"));

        // kill -STOP: no more WATCHDOG=1; systemd's watchdog fires and restarts the agent.
        let pid = b.show("outlived", "MainPID");
        let restarts: u32 = b.show("outlived", "NRestarts").parse().unwrap();
        let (code, _, err) = b.run(&["kill", "-STOP", &pid]);
        assert_eq!(code, 0, "{err}");
        let t0 = std::time::Instant::now();
        b.wait_for("a watchdog restart", Duration::from_secs(15), |b| {
            b.show("outlived", "NRestarts").parse::<u32>().unwrap_or(0) > restarts
        });
        let took = t0.elapsed();
        b.wait_for("outlived active again", Duration::from_secs(15), |b| {
            b.show("outlived", "ActiveState") == "active"
        });
        assert_ne!(b.show("outlived", "MainPID"), pid, "a new process");
        let (_, j, _) = b.run(&["journalctl", "--no-pager", "-u", "outlived"]);
        assert!(
            j.contains("Watchdog timeout"),
            "no watchdog timeout in the journal:\n{j}"
        );
        // WatchdogSec 3 s + abort 2 s + restart 1 s, with room for a loaded machine.
        assert!(took < Duration::from_secs(12), "restart took {took:?}");
        b.halt();
    }
    let after = HostSnapshot::take(&[]);
    let diff = before.diff(&after);
    assert!(
        diff.is_empty(),
        "the box changed the machine:\n{}",
        diff.join("\n")
    );
}

fn lock_record(host_id: &str, hostname: &str) -> Vec<u8> {
    format!(
        "{}\n",
        serde_json::json!({
            "version": 1, "host_id": host_id, "hostname": hostname, "boot_id": "fedcba9876543210fedcba9876543210",
            "pid": 4194000, "pid_start": 1, "acquired_at": 1_700_000_000_000u64, "agent_version": "0.0.9"
        })
    )
    .into_bytes()
}

/// `stat` and checksum of every file under the state directory (lost+found aside).
fn state_listing(b: &SystemdBox) -> String {
    let (code, out, err) = b.sh("cd /var/lib/outlive && for f in $(ls -A | grep -v lost+found); do stat -c '%n %s %Y %i' $f; sha256sum $f; done");
    assert_eq!(code, 0, "{err}");
    out
}

/// L-4 row 5 (a): a lock left under another hostname with this host's id is a rename of this
/// host, proven by identity: the queue is enabled and the journal says so (d6ad853e…). Q/X-1
/// (c): an unprivileged user reads the queue but may not cancel; a member of `outlive` may.
#[test]
fn box_host_rename_is_healed_and_only_members_may_act() {
    if !box_available() {
        return;
    }
    let before = HostSnapshot::take(&[]);
    {
        let host_id = common::host_json(None)["host_id"]
            .as_str()
            .unwrap()
            .to_string();
        let stage = Stage::new("rename");
        stage.state_image(64);
        stage.state_file(
            "resume-queue.lock",
            &lock_record(&host_id, "before-the-rename"),
            3600,
        );
        stage.want("outlived.service");
        let b = SystemdBox::boot(&stage);
        b.wait_for("outlived active", Duration::from_secs(20), |b| {
            b.show("outlived", "ActiveState") == "active"
        });
        assert!(
            b.show("outlived", "StatusText").contains("lock held"),
            "{}",
            b.show("outlived", "StatusText")
        );
        let renamed = journal_json(&b, &["MESSAGE_ID=d6ad853e949d4505bf5ac339eedba367"]);
        assert_eq!(renamed.len(), 1, "{renamed:?}");
        assert_eq!(renamed[0]["OUTLIVE_FROM"], "before-the-rename");
        assert_eq!(renamed[0]["OUTLIVE_EVENT"], "lock-host-renamed");
        assert_eq!(renamed[0]["PRIORITY"], "6");
        let (_, out, _) = b.run(&[
            "busctl",
            "get-property",
            "org.outlive.Agent1",
            "/org/outlive/Agent1/ResumeQueue",
            "org.outlive.ResumeQueue1",
            "Enabled",
        ]);
        assert_eq!(out.trim(), "b true");

        // (c) users: a stranger and a member of outlive, created in the box's /etc overlay.
        let (code, _, err) = b.sh(
            "groupadd --system outlive && useradd --create-home --user-group stranger && \
             useradd --create-home --user-group --groups outlive member && \
             busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig",
        );
        // dbus-daemon resolves `<policy group="outlive">` when it loads its configuration: a
        // group created afterwards counts only after a reload (what the packages do too).
        assert_eq!(code, 0, "{err}");
        let ctl = "/usr/local/bin/outlivectl";
        let (code, out, err) = b.run(&[
            ctl,
            "enqueue",
            "--run-id",
            "box-run",
            "--evidence",
            "active-subagent",
            "--cwd",
            "/",
            "--",
            "/bin/sleep",
            "600",
        ]);
        assert_eq!(code, 0, "{out}{err}");
        let id = out.trim().trim_start_matches("queued as ").to_string();
        let as_user = |user: &str, args: &[&str]| {
            let mut a = vec![
                "setpriv",
                "--reuid",
                user,
                "--regid",
                user,
                "--init-groups",
                ctl,
            ];
            a.extend_from_slice(args);
            b.run(&a)
        };
        let (code, out, err) = as_user("stranger", &["queue"]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(&id), "{out}");
        let (code, _, err) = as_user("stranger", &["cancel", &id]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("AccessDenied"), "{err}");
        let (code, out, err) = as_user("member", &["cancel", &id]);
        assert_eq!(code, 0, "{out}{err}");
        b.halt();
    }
    let diff = before.diff(&HostSnapshot::take(&[]));
    assert!(
        diff.is_empty(),
        "the box changed the machine:\n{}",
        diff.join("\n")
    );
}

/// L-4 row 7, L-6 (b): a lock of another host with auto_heal = "off": the queue is disabled
/// (foreign-host) over the real bus, the journal holds the alert (16178756…), a pause is
/// refused with QueueDisabled, and nothing under the state directory changes.
#[test]
fn box_foreign_lock_disables_the_queue_and_nothing_is_written() {
    if !box_available() {
        return;
    }
    let before = HostSnapshot::take(&[]);
    {
        let stage = Stage::new("foreign");
        stage.state_image(64);
        stage.state_file(
            "resume-queue.lock",
            &lock_record("0123456789abcdef0123456789abcdef", "other-host"),
            600,
        );
        stage.state_file(
            "resume-queue.json",
            b"{\"version\":1,\"entries\":[]}\n",
            600,
        );
        stage.want("outlived.service");
        let b = SystemdBox::boot(&stage);
        b.wait_for("outlived active", Duration::from_secs(20), |b| {
            b.show("outlived", "ActiveState") == "active"
        });
        let listing = state_listing(&b);
        let (_, out, _) = b.run(&[
            "busctl",
            "get-property",
            "org.outlive.Agent1",
            "/org/outlive/Agent1/ResumeQueue",
            "org.outlive.ResumeQueue1",
            "DisabledReason",
        ]);
        assert_eq!(out.trim(), "s \"foreign-host\"");
        let status = b.show("outlived", "StatusText");
        assert!(status.contains("queue disabled (foreign-host)"), "{status}");
        let alerts = journal_json(&b, &["MESSAGE_ID=16178756b76b464797d26fe3e163f095"]);
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0]["OUTLIVE_REASON"], "foreign-host");
        assert_eq!(alerts[0]["PRIORITY"], "4");
        let (code, _, err) = b.run(&[
            "/usr/local/bin/outlivectl",
            "pause",
            "--kind",
            "maintenance",
            "--reason",
            "x",
        ]);
        assert_eq!(code, 1);
        assert!(err.contains("org.outlive.Error.QueueDisabled"), "{err}");
        // Reload re-evaluates (same outcome): still nothing written, still one alert.
        b.run(&["systemctl", "reload", "outlived"]);
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(
            state_listing(&b),
            listing,
            "something under the state directory changed"
        );
        assert!(listing.contains("other-host") || listing.contains("resume-queue.lock"));
        assert_eq!(
            journal_json(&b, &["MESSAGE_ID=16178756b76b464797d26fe3e163f095"]).len(),
            1
        );
        let (_, runtime, _) = b.sh("ls /run/outlive");
        assert!(
            runtime.contains("audit.jsonl"),
            "audit lines go to the runtime directory: {runtime}"
        );
        b.halt();
    }
    let diff = before.diff(&HostSnapshot::take(&[]));
    assert!(
        diff.is_empty(),
        "the box changed the machine:\n{}",
        diff.join("\n")
    );
}
