//! Capture without systemd (SPEC C-10, C-4; issue 14, item 9): on a host not booted with
//! systemd (this machine: systemd is installed but is not PID 1), `outlivectl run` spawns the
//! run as the drainer's spawn path does and tracks it by pid and start time; a SIGKILL of that
//! process is read from its wait status, queued and revived detached. A changed boot id (the
//! `fault-boot-id` hook: no machine can be rebooted in a test) makes the run that was alive a
//! `host-restart`. The same as an operator runs it: a user agent under `dbus-run-session`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::bus::PrivateBus;
use common::{Agent, AgentSpec, TestSocket, outlivectl, require_root, require_tools, run};

const T: Duration = Duration::from_secs(15);

fn ctl(bus: &PrivateBus, args: &[&str]) -> (i32, String, String) {
    run(Command::new(outlivectl())
        .args(args)
        .current_dir("/")
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address))
}

/// A record as the state file holds it.
fn record(a: &Agent, run_id: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(a.state_dir.join("resume-queue.json")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v["runs"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["run_id"] == run_id).cloned())
        .unwrap_or_default()
}

fn entry(a: &Agent, id: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(a.state_dir.join("resume-queue.json")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v["entries"]
        .as_array()
        .and_then(|es| es.iter().find(|e| e["id"] == id).cloned())
        .unwrap_or_default()
}

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pid of a record's invocation `pid:<pid>:<start>`.
fn pid_of(r: &serde_json::Value) -> i32 {
    r["invocation_id"]
        .as_str()
        .unwrap()
        .split(':')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// `run_id`'s record once it is tracked by its process (invocation `pid:<pid>:<start>`).
fn tracked(a: &Agent, run_id: &str) -> serde_json::Value {
    let mut r = serde_json::Value::Null;
    wait("the run's pid on its record", T, || {
        r = record(a, run_id);
        r["invocation_id"]
            .as_str()
            .is_some_and(|i| i.starts_with("pid:"))
    });
    r
}

/// SIGKILL `pid`, the process of `run_id`: captured from its wait status within a second as
/// `killed`, queued, and revived detached (a session of its own). The entry and the revived pid.
fn kill_is_captured_and_revived_detached(a: &Agent, run_id: &str, pid: i32) -> (String, i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t0 = Instant::now();
    let mut r = serde_json::Value::Null;
    wait("the kill to be captured", T, || {
        r = record(a, run_id);
        r["entry_id"].is_string()
    });
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "captured in {:?}",
        t0.elapsed()
    );
    assert_eq!(r["state"], "ended:killed", "{r}");
    let id = r["entry_id"].as_str().unwrap().to_string();
    assert_eq!(entry(a, &id)["reason"], "killed");
    let mut e = serde_json::Value::Null;
    wait("the revival", Duration::from_secs(30), || {
        e = entry(a, &id);
        e["status"] == "revived"
    });
    let revived = e["attempt_pid"][0].as_i64().unwrap() as i32;
    let (_, sid, _) = run(Command::new("ps").args(["-o", "sid=", "-p", &revived.to_string()]));
    assert_eq!(
        sid.trim(),
        revived.to_string(),
        "detached: a session of its own"
    );
    (id, revived)
}

const CONFIG: &str = "[queue]\ndry_run = false\n\n[drainer]\ninterval_sec = 1\ngrace_sec = 1\n\
                      required_calm_ticks = 1\nbackoff_base_sec = 1\ncalm_gate = false\n";

#[test]
fn c10_a_spawned_run_is_captured_revived_detached_and_a_new_boot_is_a_host_restart() {
    if !(require_root("owning org.outlive.Agent1 under the shipped policy")
        && require_tools(&["dbus-daemon"])
        && common::require(
            !std::path::Path::new("/run/systemd/system").exists(),
            "a host not booted with systemd",
        ))
    {
        return;
    }
    let bus = PrivateBus::start();
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let mut a = common::bus_agent(&bus, &n, &j, CONFIG);
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));

    let (code, out, err) = ctl(
        &bus,
        &["--json", "run", "--run-id", "nosd", "--", "sleep", "1000"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["run_id"], "nosd");
    let mut r = tracked(&a, "nosd");
    assert_eq!(r["state"], "active", "{r}");
    let pid = pid_of(&r);
    let (_, env, _) = run(Command::new("sh")
        .arg("-c")
        .arg(format!("tr '\\0' '\\n' < /proc/{pid}/environ")));
    assert!(env.contains("OUTLIVE_RUN_ID=nosd"), "{env}");

    // kill -9: read from the wait status, queued, revived detached.
    let (id, revived) = kill_is_captured_and_revived_detached(&a, "nosd", pid);
    wait("the record to follow the revival", T, || {
        r = record(&a, "nosd");
        r["state"] == "active"
            && r["invocation_id"]
                .as_str()
                .is_some_and(|i| i.starts_with(&format!("pid:{revived}:")))
    });

    // Another boot: the run that was alive is a host restart.
    a.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(a.wait_exit(T).is_some(), "the agent stops");
    std::fs::write(
        a.runtime_dir.join("fault-boot-id"),
        "5f1d0c0e2a1b4c3d9e8f7a6b5c4d3e2f\n",
    )
    .unwrap();
    let (n2, j2) = (TestSocket::notify(), TestSocket::journal());
    let b = Agent::start(AgentSpec {
        state_dir: Some(a.state_dir.clone()),
        runtime_dir: Some(a.runtime_dir.clone()),
        toml: CONFIG.into(),
        ..common::bus_spec(&bus, &n2, &j2)
    });
    n2.wait_for("READY=1", T, |d| d.has("READY", "1"));
    wait("a host-restart entry", T, || {
        r = record(&a, "nosd");
        r["entry_id"]
            .as_str()
            .is_some_and(|x| x != id && entry(&a, x)["reason"] == "host-restart")
    });
    // The host-restart entry is revived by the new agent in its turn.
    wait("the host-restart revival", Duration::from_secs(30), || {
        let r = record(&a, "nosd");
        r["entry_id"]
            .as_str()
            .is_some_and(|x| entry(&a, x)["status"] == "revived")
    });
    b.kill_children();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(revived),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Item 9 as an operator would run it: a user agent under `dbus-run-session -- outlived
/// --user` (its session bus is the only bus), and `outlivectl --user run` in that session.
#[test]
fn c10_a_user_agent_under_dbus_run_session_captures_and_revives_its_runs() {
    if !(require_tools(&["dbus-run-session", "dbus-daemon"])
        && common::require(
            !std::path::Path::new("/run/systemd/system").exists(),
            "a host not booted with systemd",
        ))
    {
        return;
    }
    // dbus-run-session's own bus, at an address the test can give outlivectl.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("session-bus");
    let conf = dir.path().join("session.conf");
    std::fs::write(
        &conf,
        format!(
            "<busconfig><type>session</type><listen>unix:path={}</listen><auth>EXTERNAL</auth>\
             <policy context=\"default\"><allow send_destination=\"*\" eavesdrop=\"true\"/>\
             <allow eavesdrop=\"true\"/><allow own=\"*\"/></policy></busconfig>",
            socket.display()
        ),
    )
    .unwrap();
    let address = format!("unix:path={}", socket.display());
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let a = Agent::start(AgentSpec {
        args: vec!["--user".into()],
        wrapper: vec![
            "dbus-run-session".into(),
            format!("--config-file={}", conf.display()),
            "--".into(),
        ],
        notify: Some(n.path.clone()),
        journal: Some(j.path.clone()),
        toml: CONFIG.into(),
        ..AgentSpec::default()
    });
    let ctl = |args: &[&str]| {
        run(Command::new(outlivectl())
            .arg("--user")
            .args(args)
            .current_dir("/")
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
            .env("DBUS_SESSION_BUS_ADDRESS", &address))
    };
    // The session dbus-daemon inherits NOTIFY_SOCKET and says READY=1 itself: the agent is
    // ready when it owns its name.
    wait("org.outlive.Agent1 on the session bus", T, || {
        ctl(&["status"]).0 == 0
    });
    let (code, out, err) = ctl(&[
        "--json", "run", "--run-id", "user-run", "--", "sleep", "1000",
    ]);
    assert_eq!(code, 0, "{out}{err}\nagent: {}", a.stderr());
    let r = tracked(&a, "user-run");
    let pid = pid_of(&r);
    let (code, out, _) = ctl(&["--json", "runs"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("\"user-run\"") && out.contains("\"active\""),
        "{out}"
    );

    let (_, revived) = kill_is_captured_and_revived_detached(&a, "user-run", pid);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(revived),
        nix::sys::signal::Signal::SIGKILL,
    );
}
