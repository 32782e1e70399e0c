//! `org.outlive.Agent1` on a private dbus-daemon that uses the shipped policy (SPEC ):
//! the name (owned before READY, refused when taken, only root may own it), the properties,
//! GetHostFacts, ClassifyPath for privileged and unprivileged callers, the policy's denials,
//! PropertiesChanged only on change, and reconnection when the bus restarts under the agent.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::bus::{Agent1Proxy, PrivateBus, connect, has_owner, text};
use common::{Agent, AgentSpec, TestSocket, require_root, require_tools};
use futures_util::StreamExt;

const T: Duration = Duration::from_secs(15);

fn ready() -> bool {
    require_root("owning org.outlive.Agent1 needs root under the shipped policy")
        && require_tools(&["dbus-daemon", "busctl"])
}

fn system_agent(bus: &PrivateBus, notify: &TestSocket, journal: &TestSocket, toml: &str) -> Agent {
    let mut env = HashMap::new();
    env.insert("DBUS_SYSTEM_BUS_ADDRESS".to_string(), bus.address.clone());
    Agent::start(AgentSpec {
        args: vec![],
        env,
        notify: Some(notify.path.clone()),
        journal: Some(journal.path.clone()),
        toml: toml.to_string(),
        ..AgentSpec::default()
    })
}

#[tokio::test]
async fn x3_ready_only_after_the_bus_name_is_owned() {
    if !ready() {
        return;
    }
    let bus = PrivateBus::start();
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let client = connect(&bus.address).await;
    assert!(!has_owner(&client, "org.outlive.Agent1").await);
    let _a = system_agent(&bus, &n, &j, "");
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    assert!(
        has_owner(&client, "org.outlive.Agent1").await,
        "READY=1 before the name was owned"
    );
}

#[tokio::test]
async fn x1_name_taken_fails_the_start_with_exit_75() {
    if !ready() {
        return;
    }
    let bus = PrivateBus::start();
    let (n1, j1) = (TestSocket::notify(), TestSocket::journal());
    let _first = system_agent(&bus, &n1, &j1, "");
    n1.wait_for("READY=1", T, |d| d.has("READY", "1"));
    let (n2, j2) = (TestSocket::notify(), TestSocket::journal());
    let mut second = system_agent(&bus, &n2, &j2, "");
    assert_eq!(second.wait_exit(T), Some(75), "{}", second.stderr());
    assert!(
        second.stderr().contains("owned by another connection"),
        "{}",
        second.stderr()
    );
    n2.drain(Duration::from_millis(200));
    let seen = n2.seen();
    assert!(
        seen.iter()
            .any(|d| d.has("ERRNO", &libc::EADDRINUSE.to_string())),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|d| d.has("READY", "1")), "{seen:?}");
}

#[tokio::test]
async fn x1_only_root_may_own_the_name() {
    if !ready() {
        return;
    }
    let bus = PrivateBus::start();
    // An unprivileged agent (user mode, implied) pointed at a bus with the shipped policy.
    let home = common::open_tempdir();
    let run = home.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    nix::unistd::chown(
        &run,
        Some(nix::unistd::Uid::from_raw(common::NOBODY)),
        Some(nix::unistd::Gid::from_raw(common::NOBODY)),
    )
    .unwrap();
    let cfg = home.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{0}/state\"\nruntime_dir = \"{0}/run\"\n",
            home.path().display()
        ),
    )
    .unwrap();
    let (code, _, err) = common::run(
        common::as_nobody(&common::exe_for_others(common::outlived()))
            .arg("--config")
            .arg(&cfg)
            .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
            .env("HOME", home.path()),
    );
    assert_eq!(code, 77, "{err}");
    assert!(
        err.contains("does not allow this process to own org.outlive.Agent1"),
        "{err}"
    );
}

#[tokio::test]
async fn x1_properties_and_host_facts() {
    if !ready() {
        return;
    }
    let bus = PrivateBus::start();
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let _a = system_agent(&bus, &n, &j, "");
    let r = n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    let conn = connect(&bus.address).await;
    let p = Agent1Proxy::new(&conn).await.unwrap();
    let host = common::host_json(None);
    assert_eq!(
        p.host_id().await.unwrap(),
        host["host_id"].as_str().unwrap()
    );
    assert_eq!(
        p.boot_id().await.unwrap(),
        host["boot_id"].as_str().unwrap()
    );
    assert_eq!(
        p.hostname().await.unwrap(),
        host["hostname"].as_str().unwrap()
    );
    assert_eq!(p.version().await.unwrap(), env!("CARGO_PKG_VERSION"));
    assert_eq!(
        p.status_text().await.unwrap(),
        r.get("STATUS").unwrap(),
        "StatusText is the STATUS= line"
    );
    assert!(!p.degraded().await.unwrap());
    let facts = p.get_host_facts().await.unwrap();
    assert_eq!(text(&facts["host_id"]), host["host_id"].as_str().unwrap());
    assert!(
        facts.contains_key("observing_namespace_differs")
            || facts.contains_key("observing_namespace_detail")
    );
    if let Ok(raw) = std::fs::read_to_string("/etc/machine-id") {
        assert!(
            !format!("{facts:?}").contains(raw.trim()),
            "GetHostFacts leaks the machine id"
        );
    }
}

#[tokio::test]
async fn x1_classify_path_full_for_root_mount_table_only_for_others() {
    if !ready() {
        return;
    }
    let bus = PrivateBus::start();
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let a = system_agent(&bus, &n, &j, "");
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    let dir = a.dir.path().display().to_string();
    let conn = connect(&bus.address).await;
    let p = Agent1Proxy::new(&conn).await.unwrap();

    let full = p.classify_path(&dir).await.unwrap();
    assert!(
        full.contains_key("magic"),
        "root gets a statfs-confirmed classification: {full:?}"
    );
    assert_ne!(text(&full["rule"]), "mount-table-only");
    let proc_ = p.classify_path("/proc").await.unwrap();
    assert_eq!(text(&proc_["class"]), "pseudo");

    let e = p
        .classify_path("relative/path")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("org.outlive.Error.InvalidArgument: path:"),
        "{e}"
    );
    let e = p
        .classify_path("/nonexistent/outlive")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("org.outlive.Error.NotFound"), "{e}");
    let long = format!("/{}", "a".repeat(5000));
    let e = p.classify_path(&long).await.unwrap_err().to_string();
    assert!(
        e.contains("InvalidArgument: path: longer than 4096 bytes"),
        "{e}"
    );

    // Unprivileged: classified from the mount table only, the path not touched.
    let call = |path: &str| {
        bus.busctl_as_nobody(&[
            "call",
            "org.outlive.Agent1",
            "/org/outlive/Agent1",
            "org.outlive.Agent1",
            "ClassifyPath",
            "s",
            path,
        ])
    };
    let (code, out, err) = call(&dir);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"mount-table-only\""), "{out}");
    assert!(
        !out.contains("\"magic\""),
        "no statfs for unprivileged callers: {out}"
    );
    // A path that does not exist is not touched either, so it is not NotFound.
    let (code, out, err) = call("/nonexistent/outlive");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("mount-table-only"), "{out}");
    // Rate-limited (§12 X-1 bounds): 20 calls a second per uid, 40 at once; two were made
    // above, and each busctl call takes a few ms, refilling a little meanwhile.
    let mut refused = None;
    for i in 0..200 {
        let (code, _, err) = call("/");
        if code != 0 {
            refused = Some((i, err));
            break;
        }
    }
    let (i, err) = refused.expect("unprivileged ClassifyPath is never rate-limited");
    assert!((38..120).contains(&i), "refused after {i} more calls");
    assert!(
        err.contains("may make 20 calls per second (40 at once)"),
        "{err}"
    );
}

#[tokio::test]
async fn x1_policy_denies_what_ordinary_users_may_not_call() {
    if !ready() {
        return;
    }
    let bus = PrivateBus::start();
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let _a = system_agent(&bus, &n, &j, "");
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    let nobody = |args: &[&str]| bus.busctl_as_nobody(args);
    // Allowed to everyone: properties, introspection, Ping, the read methods.
    let (code, _, err) = nobody(&[
        "get-property",
        "org.outlive.Agent1",
        "/org/outlive/Agent1",
        "org.outlive.Agent1",
        "HostId",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = nobody(&["introspect", "org.outlive.Agent1", "/org/outlive/Agent1"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = nobody(&[
        "call",
        "org.outlive.Agent1",
        "/org/outlive/Agent1",
        "org.freedesktop.DBus.Peer",
        "Ping",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = nobody(&[
        "call",
        "org.outlive.Agent1",
        "/org/outlive/Agent1",
        "org.outlive.Agent1",
        "GetHostFacts",
    ]);
    assert_eq!(code, 0, "{err}");
    // Not allowed: the raw machine id through Peer.GetMachineId.
    let (code, out, err) = nobody(&[
        "call",
        "org.outlive.Agent1",
        "/org/outlive/Agent1",
        "org.freedesktop.DBus.Peer",
        "GetMachineId",
    ]);
    assert_ne!(code, 0, "GetMachineId answered an ordinary user: {out}");
    assert!(
        err.contains("Access denied") || err.contains("AccessDenied"),
        "{err}"
    );
}

#[tokio::test]
async fn x1_hostname_change_emits_properties_changed_and_nothing_else_does() {
    if !ready() || !require_tools(&["unshare", "nsenter", "hostname"]) {
        return;
    }
    let bus = PrivateBus::start();
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let mut env = HashMap::new();
    env.insert("DBUS_SYSTEM_BUS_ADDRESS".to_string(), bus.address.clone());
    let a = Agent::start(AgentSpec {
        args: vec![],
        env,
        notify: Some(n.path.clone()),
        journal: Some(j.path.clone()),
        toml: "[drainer]\ninterval_sec = 1\n".into(),
        wrapper: vec!["unshare".into(), "--uts".into()],
        ..AgentSpec::default()
    });
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    let conn = connect(&bus.address).await;
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.freedesktop.DBus.Properties")
        .member("PropertiesChanged")
        .path("/org/outlive/Agent1")
        .build()
        .unwrap();
    let mut changes = zbus::MessageStream::for_match_rule(rule, &conn, None)
        .await
        .unwrap();
    // Several ticks with nothing changing: no PropertiesChanged.
    let quiet = tokio::time::timeout(Duration::from_millis(3500), changes.next()).await;
    assert!(
        quiet.is_err(),
        "PropertiesChanged while nothing changed: {quiet:?}"
    );
    let (code, _, err) = common::run(std::process::Command::new("nsenter").args([
        "-t",
        &a.pid().to_string(),
        "-u",
        "hostname",
        "renamed-outlive-host",
    ]));
    assert_eq!(code, 0, "{err}");
    let msg = tokio::time::timeout(T, changes.next())
        .await
        .expect("no PropertiesChanged after a rename")
        .unwrap()
        .unwrap();
    let (iface, changed, _): (
        String,
        HashMap<String, zbus::wire::OwnedVariant>,
        Vec<String>,
    ) = msg.body().deserialize().unwrap();
    assert_eq!(iface, "org.outlive.Agent1");
    assert_eq!(text(&changed["Hostname"]), "renamed-outlive-host");
    let p = Agent1Proxy::new(&conn).await.unwrap();
    assert_eq!(p.hostname().await.unwrap(), "renamed-outlive-host");
}

#[tokio::test]
async fn x1_bus_restart_reconnects_reowns_the_name_and_reserves_objects() {
    if !ready() {
        return;
    }
    let mut bus = PrivateBus::start();
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let mut a = system_agent(&bus, &n, &j, "");
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    bus.restart();
    j.wait_for("bus-lost", T, |d| d.has("OUTLIVE_EVENT", "bus-lost"));
    j.wait_for("bus-reconnected", Duration::from_secs(40), |d| {
        d.has("OUTLIVE_EVENT", "bus-reconnected")
    });
    let conn = connect(&bus.address).await;
    let end = Instant::now() + T;
    while !has_owner(&conn, "org.outlive.Agent1").await {
        assert!(Instant::now() < end, "the name was not owned again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p = Agent1Proxy::new(&conn).await.unwrap();
    assert_eq!(
        p.host_id().await.unwrap(),
        common::host_json(None)["host_id"].as_str().unwrap()
    );
    assert_eq!(
        a.wait_exit(Duration::from_millis(100)),
        None,
        "the agent must survive the bus restart"
    );
}

#[tokio::test]
async fn h3_a_running_agent_sees_mount_table_changes() {
    if !ready() || !require_tools(&["unshare", "nsenter"]) {
        return;
    }
    let bus = PrivateBus::start();
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let mut env = HashMap::new();
    env.insert("DBUS_SYSTEM_BUS_ADDRESS".to_string(), bus.address.clone());
    let a = Agent::start(AgentSpec {
        args: vec![],
        env,
        notify: Some(n.path.clone()),
        journal: Some(j.path.clone()),
        wrapper: vec![
            "unshare".into(),
            "--mount".into(),
            "--propagation".into(),
            "private".into(),
        ],
        ..AgentSpec::default()
    });
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    let target = a.dir.path().join("mnt");
    std::fs::create_dir(&target).unwrap();
    let t = target.display().to_string();
    let conn = connect(&bus.address).await;
    let p = Agent1Proxy::new(&conn).await.unwrap();
    let before = p.classify_path(&t).await.unwrap();
    assert_ne!(text(&before["fstype"]), "tmpfs", "{before:?}");
    // Mount a tmpfs in the agent's mount namespace: the cached table must be re-read.
    let pid = a.pid().to_string();
    let (code, _, err) = common::run(
        std::process::Command::new("nsenter")
            .args(["-t", &pid, "-m", "mount", "-t", "tmpfs", "tmpfs", &t]),
    );
    assert_eq!(code, 0, "{err}");
    let after = p.classify_path(&t).await.unwrap();
    assert_eq!(text(&after["fstype"]), "tmpfs", "{after:?}");
    assert_eq!(text(&after["class"]), "local-volatile");
    let (code, _, err) =
        common::run(std::process::Command::new("nsenter").args(["-t", &pid, "-m", "umount", &t]));
    assert_eq!(code, 0, "{err}");
    let again = p.classify_path(&t).await.unwrap();
    assert_eq!(text(&again["fstype"]), text(&before["fstype"]), "{again:?}");
}

/// on a bus with the shipped policy, the bus loop's self-ping is answered, so the loop
/// keeps beating and the watchdog keeps being fed well past the loop's stale window.
#[tokio::test]
async fn x4_bus_loop_keeps_beating_on_the_policy_bus() {
    if !ready() {
        return;
    }
    let bus = PrivateBus::start();
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let mut env = HashMap::new();
    env.insert("DBUS_SYSTEM_BUS_ADDRESS".to_string(), bus.address.clone());
    // Watchdog 2 s: the bus loop pings every second and would be stale after 6 s of silence.
    let mut a = Agent::start(AgentSpec {
        args: vec![],
        env,
        notify: Some(n.path.clone()),
        journal: Some(j.path.clone()),
        watchdog_usec: Some(2_000_000),
        ..AgentSpec::default()
    });
    let ready = n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    n.drain(Duration::from_secs(9));
    let seen = n.seen();
    assert!(
        !seen.iter().any(|d| d.has("WATCHDOG", "trigger")),
        "the watchdog was triggered: {seen:?}"
    );
    let late = seen
        .iter()
        .filter(|d| d.has("WATCHDOG", "1") && d.at > ready.at + Duration::from_secs(7))
        .count();
    assert!(late >= 2, "WATCHDOG=1 stopped: {seen:?}");
    assert_eq!(
        a.wait_exit(Duration::from_millis(10)),
        None,
        "{}",
        a.stderr()
    );
    assert!(
        !a.stderr().contains("ping"),
        "self-ping trouble: {}",
        a.stderr()
    );
}
