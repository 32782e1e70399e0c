//! The revival queue over D-Bus and `outlivectl` (SPEC Q-4, Q-9, Q-10, L-6, L-8, X-1, X-2, §8),
//! against a private dbus-daemon with the shipped policy and test users: a member of group
//! `outlive` and a stranger. The agent resolves their groups from the user database; the bus
//! policy filters first, and the agent enforces everything again.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::bus::{MEMBER, PERMISSIVE_POLICY, PrivateBus, STRANGER, connect};
use common::{Agent, TestSocket, bus_agent, require_root, require_tools};
use futures_util::StreamExt;

const T: Duration = Duration::from_secs(15);
const ROOT: (u32, u32) = (0, 0);
const CONFIG: &str = "[queue]\ndry_run = false\nallowed_units = [\"allowed-*.service\"]\n";

fn ready() -> bool {
    require_root("owning the bus name, test users in a mount namespace")
        && require_tools(&["dbus-daemon", "busctl", "unshare", "nsenter"])
}

/// A bus and an agent on it (kept alive for the test's duration).
struct Setup {
    bus: PrivateBus,
    _agent: Agent,
    _n: TestSocket,
    _j: TestSocket,
}

fn setup(bus: PrivateBus, toml: &str) -> Setup {
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let agent = bus_agent(&bus, &n, &j, toml);
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    Setup {
        bus,
        _agent: agent,
        _n: n,
        _j: j,
    }
}

fn enqueue(s: &Setup, who: (u32, u32), run: &str, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "enqueue",
        "--run-id",
        run,
        "--evidence",
        "active-subagent",
        "--cwd",
        "/",
    ];
    args.extend_from_slice(extra);
    if !extra.contains(&"--unit") {
        args.extend_from_slice(&["--", "/bin/true"]);
    }
    s.bus.outlivectl_as(who, &args)
}

fn entries(s: &Setup, who: (u32, u32)) -> Vec<serde_json::Value> {
    let (code, out, err) = s.bus.outlivectl_as(who, &["queue", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["entries"].as_array().unwrap().clone()
}

fn id_of(s: &Setup, run: &str) -> String {
    entries(s, ROOT)
        .iter()
        .find(|e| e["run_id"] == run)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn x1_authorization_matrix_through_the_shipped_policy() {
    if !ready() {
        return;
    }
    let s = setup(PrivateBus::with_users(), CONFIG);
    // Root and the member may enqueue; the member's exec target is recorded as the member.
    let (code, out, err) = enqueue(&s, ROOT, "by-root", &[]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = enqueue(&s, MEMBER, "by-member", &[]);
    assert_eq!(code, 0, "{out}{err}");
    let mine = entries(&s, ROOT)
        .into_iter()
        .find(|e| e["run_id"] == "by-member")
        .unwrap();
    assert_eq!(
        (mine["uid"].as_u64(), mine["gid"].as_u64()),
        (Some(MEMBER.0 as u64), Some(MEMBER.1 as u64))
    );
    // A member's unit target outside queue.allowed_units is refused by the agent.
    let (code, _, err) = enqueue(&s, MEMBER, "unit-1", &["--unit", "other.service"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("org.outlive.Error.AccessDenied") && err.contains("queue.allowed_units"),
        "{err}"
    );
    let (code, _, err) = enqueue(&s, MEMBER, "unit-2", &["--unit", "allowed-7.service"]);
    assert_eq!(code, 0, "{err}");
    // Only root may enqueue as another user.
    let (code, _, err) = enqueue(&s, MEMBER, "as-root", &["--as-uid", "0"]);
    assert_eq!(code, 1);
    assert!(err.contains("AccessDenied"), "{err}");
    // The stranger may read, redacted: not the cwd, the argv or the env names of others' runs.
    let seen = entries(&s, STRANGER);
    assert_eq!(seen.len(), 3);
    for e in &seen {
        for k in [
            "cwd",
            "exec",
            "unit",
            "uid",
            "reason",
            "env_names",
            "run_id",
        ] {
            assert!(e.get(k).is_none(), "{k} shown to a stranger: {e}");
        }
    }
    // … and may not act: the bus policy refuses before the agent sees the call.
    let root_id = id_of(&s, "by-root");
    let (code, _, err) = s.bus.outlivectl_as(STRANGER, &["cancel", &root_id]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("org.freedesktop.DBus.Error.AccessDenied"),
        "{err}"
    );
    let (code, _, err) = enqueue(&s, STRANGER, "by-stranger", &[]);
    assert_eq!(code, 1);
    assert!(err.contains("AccessDenied"), "{err}");
    let (code, _, err) = s.bus.outlivectl_as(
        STRANGER,
        &["pause", "--kind", "maintenance", "--reason", "x"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("AccessDenied"), "{err}");
    // The member may cancel (anyone's run: membership is the privilege).
    let (code, _, err) = s.bus.outlivectl_as(MEMBER, &["cancel", &root_id]);
    assert_eq!(code, 0, "{err}");
    // Reevaluate is root only: the policy lets the member send it, the agent refuses.
    let call = [
        "call",
        "org.outlive.Agent1",
        "/org/outlive/Agent1",
        "org.outlive.Agent1",
        "Reevaluate",
    ];
    let (code, _, err) = s.bus.busctl_as(MEMBER, &call);
    assert_ne!(code, 0);
    assert!(err.contains("only root"), "{err}");
    let (code, _, err) = s.bus.busctl_as(STRANGER, &call);
    assert_ne!(code, 0);
    assert!(
        err.contains("Access denied") || err.contains("AccessDenied"),
        "{err}"
    );
    let (code, _, err) = s.bus.busctl_as(ROOT, &call);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn x1_the_agent_enforces_on_its_own_behind_a_permissive_policy() {
    if !ready() {
        return;
    }
    let dir = common::open_tempdir();
    let policy = dir.path().join("permissive.conf");
    std::fs::write(&policy, PERMISSIVE_POLICY).unwrap();
    let s = setup(PrivateBus::start_with(&policy, true), CONFIG);
    let (code, _, err) = enqueue(&s, ROOT, "r", &[]);
    assert_eq!(code, 0, "{err}");
    let id = id_of(&s, "r");
    for args in [
        vec!["cancel", id.as_str()],
        vec!["requeue", id.as_str()],
        vec!["pause", "--kind", "emergency", "--reason", "x"],
        vec!["resume"],
        vec!["stop", "r"],
        vec!["stop-all"],
    ] {
        let (code, _, err) = s.bus.outlivectl_as(STRANGER, &args);
        assert_eq!(code, 1, "{args:?}");
        assert!(
            err.contains("org.outlive.Error.AccessDenied"),
            "{args:?}: {err}"
        );
    }
    let (code, _, err) = enqueue(&s, STRANGER, "s", &[]);
    assert_eq!(code, 1);
    assert!(err.contains("org.outlive.Error.AccessDenied"), "{err}");
    assert_eq!(
        entries(&s, ROOT).len(),
        1,
        "nothing was written for the stranger"
    );
}

/// A call's outcome: the error name and message on failure.
type Outcome = Result<(), (String, String)>;

/// Call a ResumeQueue1 method with raw arguments.
async fn call<B>(conn: &zbus::Connection, method: &str, body: &B) -> Outcome
where
    B: serde::Serialize + zbus::wire::DynamicType,
{
    call_at(
        conn,
        "/org/outlive/Agent1/ResumeQueue",
        "org.outlive.ResumeQueue1",
        method,
        body,
    )
    .await
}

#[tokio::test]
async fn x1_refusals_are_typed_errors() {
    if !ready() {
        return;
    }
    use zbus::wire::Variant;
    let s = setup(PrivateBus::start(), CONFIG);
    let (code, _, err) = enqueue(&s, ROOT, "r", &[]);
    assert_eq!(code, 0, "{err}");
    let id = id_of(&s, "r");
    let conn = connect(&s.bus.address).await;
    let dict = |pairs: Vec<(&'static str, Variant<'static>)>| {
        pairs.into_iter().collect::<HashMap<&str, Variant<'_>>>()
    };
    let cases: Vec<(Outcome, &str, &str)> = vec![
        (
            call(&conn, "Cancel", &("rq-zzzz-1",)).await,
            "org.outlive.Error.NotFound",
            "no open entry",
        ),
        (
            call(&conn, "Cancel", &("bogus",)).await,
            "org.outlive.Error.InvalidArgument",
            "id:",
        ),
        (
            call(&conn, "Requeue", &(id.as_str(),)).await,
            "org.outlive.Error.NotGaveUp",
            "did not give up",
        ),
        (
            call(&conn, "Pause", &("deliberate-halt", "x")).await,
            "org.outlive.Error.InvalidArgument",
            "kind:",
        ),
        (
            call(
                &conn,
                "Enqueue",
                &(dict(vec![("bogus", Variant::from("x"))]),),
            )
            .await,
            "org.outlive.Error.InvalidArgument",
            "bogus: unknown key",
        ),
        (
            call(
                &conn,
                "Enqueue",
                &(dict(vec![("run_id", Variant::from(vec![1u8, 2]))]),),
            )
            .await,
            "org.outlive.Error.InvalidArgument",
            "run_id: expected type s, got ay",
        ),
        (
            call(
                &conn,
                "Enqueue",
                &(dict(vec![
                    ("run_id", Variant::from("r2")),
                    ("cwd", Variant::from("/")),
                ]),),
            )
            .await,
            "org.outlive.Error.InvalidArgument",
            "unit: one of unit or exec is required",
        ),
        (
            call(
                &conn,
                "Enqueue",
                &(dict(vec![
                    ("run_id", Variant::from("r3")),
                    ("cwd", Variant::from("/")),
                    ("exec", Variant::from(vec!["/bin/true".to_string()])),
                    (
                        "env",
                        Variant::from(HashMap::from([("LD_PRELOAD".to_string(), "x".to_string())])),
                    ),
                ]),),
            )
            .await,
            "org.outlive.Error.InvalidArgument",
            "env: LD_PRELOAD may not be set",
        ),
        (
            call(&conn, "Cancel", &(7u32,)).await,
            "org.freedesktop.DBus.Error.InvalidArgs",
            "",
        ),
    ];
    for (got, name, text) in cases {
        let (n, m) = got.expect_err("a refusal");
        assert_eq!(n, name, "{m}");
        assert!(m.contains(text), "{name}: {m}");
    }
    // The agent is still up and nothing was written for the refusals.
    assert_eq!(entries(&s, ROOT).len(), 1);
}

/// The queue object's PropertiesChanged signals, as a client subscribes to them.
async fn queue_changes(conn: &zbus::Connection) -> zbus::MessageStream {
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.freedesktop.DBus.Properties")
        .member("PropertiesChanged")
        .path("/org/outlive/Agent1/ResumeQueue")
        .build()
        .unwrap();
    zbus::MessageStream::for_match_rule(rule, conn, None)
        .await
        .unwrap()
}

#[tokio::test]
async fn x1_properties_changed_for_waiting_and_never_for_last_tick_at() {
    if !ready() {
        return;
    }
    let s = setup(
        PrivateBus::start(),
        &format!("{CONFIG}[drainer]\ninterval_sec = 1\n"),
    );
    let conn = connect(&s.bus.address).await;
    let mut changes = queue_changes(&conn).await;
    // Ticks every second change LastTickAt: it must not signal.
    let quiet = tokio::time::timeout(Duration::from_millis(2500), changes.next()).await;
    assert!(
        quiet.is_err(),
        "a signal while only LastTickAt changed: {quiet:?}"
    );
    let (code, _, err) = enqueue(&s, ROOT, "r", &[]);
    assert_eq!(code, 0, "{err}");
    let msg = tokio::time::timeout(T, changes.next())
        .await
        .expect("no PropertiesChanged")
        .unwrap()
        .unwrap();
    let (iface, changed, _): (
        String,
        HashMap<String, zbus::wire::OwnedVariant>,
        Vec<String>,
    ) = msg.body().deserialize().unwrap();
    assert_eq!(iface, "org.outlive.ResumeQueue1");
    assert_eq!(
        u32::try_from(changed["Waiting"].try_clone().unwrap()).unwrap(),
        1
    );
    assert!(!changed.contains_key("LastTickAt"));
}

/// X-1 (issue 15): one change of state is one PropertiesChanged holding every property it
/// changed: a `Pause` sends `Paused`, `PauseKind`, `PauseReason` and `PausedAt` together, so
/// no client ever sees `Paused=true` with an empty kind; `Resume` clears them together.
#[tokio::test]
async fn x1_a_pause_is_one_properties_changed_with_all_its_properties() {
    if !ready() {
        return;
    }
    let s = setup(PrivateBus::start(), CONFIG);
    let conn = connect(&s.bus.address).await;
    let mut changes = queue_changes(&conn).await;
    let pause_props = ["Paused", "PauseKind", "PauseReason", "PausedAt"];
    for (args, paused) in [
        (
            vec!["pause", "--kind", "maintenance", "--reason", "disk swap"],
            true,
        ),
        (vec!["resume"], false),
    ] {
        let (code, _, err) = s.bus.outlivectl_as(ROOT, &args);
        assert_eq!(code, 0, "{args:?}: {err}");
        let mut signals = Vec::new();
        while let Ok(Some(Ok(msg))) =
            tokio::time::timeout(Duration::from_millis(1500), changes.next()).await
        {
            let (_, changed, _): (
                String,
                HashMap<String, zbus::wire::OwnedVariant>,
                Vec<String>,
            ) = msg.body().deserialize().unwrap();
            signals.push(changed);
        }
        let with_pause: Vec<_> = signals
            .iter()
            .filter(|c| pause_props.iter().any(|p| c.contains_key(*p)))
            .collect();
        assert_eq!(with_pause.len(), 1, "{args:?}: {signals:?}");
        let c = with_pause[0];
        for p in pause_props {
            assert!(c.contains_key(p), "{args:?}: {p} missing from {c:?}");
        }
        assert_eq!(
            bool::try_from(c["Paused"].try_clone().unwrap()).unwrap(),
            paused
        );
        let kind = String::try_from(c["PauseKind"].try_clone().unwrap()).unwrap();
        assert_eq!(kind, if paused { "maintenance" } else { "" });
    }
}

fn foreign_lock(state: &std::path::Path) -> Vec<u8> {
    std::fs::create_dir_all(state).unwrap();
    let rec = serde_json::json!({
        "version": 1, "host_id": "0123456789abcdef0123456789abcdef", "hostname": "other-host",
        "boot_id": "fedcba9876543210fedcba9876543210", "pid": 4242, "pid_start": 1, "acquired_at": 1,
        "agent_version": "0.0.0"
    });
    let bytes = format!("{rec}\n").into_bytes();
    std::fs::write(state.join("resume-queue.lock"), &bytes).unwrap();
    bytes
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn l6_l8_foreign_lock_disables_the_queue_until_lock_clear() {
    if !ready() {
        return;
    }
    // The agent's state directory is in its temp dir: write the foreign lock before it starts.
    let bus = PrivateBus::start();
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let dir = common::open_tempdir();
    let state = dir.path().join("state");
    let lock_bytes = foreign_lock(&state);
    let toml = CONFIG.to_string();
    let mut env = HashMap::new();
    env.insert("DBUS_SYSTEM_BUS_ADDRESS".to_string(), bus.address.clone());
    let cfg = dir.path().join("outlive.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\nruntime_dir = \"{}\"\n[journal]\nsocket = \"{}\"\n{toml}",
            state.display(),
            dir.path().join("run").display(),
            j.path.display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(common::outlived())
        .arg("--config")
        .arg(&cfg)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .env("NOTIFY_SOCKET", &n.path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ready = n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    assert!(
        ready
            .get("STATUS")
            .unwrap()
            .starts_with("DEGRADED: queue.resume off-runtime-divergent (foreign-host)"),
        "{ready:?}"
    );
    let ev = j.wait_for("queue-disabled", T, |d| {
        d.has("OUTLIVE_EVENT", "queue-disabled")
    });
    assert_eq!(
        ev.get("MESSAGE_ID"),
        Some("16178756b76b464797d26fe3e163f095")
    );
    assert_eq!(ev.get("OUTLIVE_REASON"), Some("foreign-host"));
    let (code, out, _) = bus.busctl(&[
        "get-property",
        "org.outlive.Agent1",
        "/org/outlive/Agent1/ResumeQueue",
        "org.outlive.ResumeQueue1",
        "DisabledReason",
    ]);
    assert_eq!((code, out.trim()), (0, "s \"foreign-host\""));
    let ctl = |args: &[&str]| bus.outlivectl_as(ROOT, args);
    let (code, _, err) = ctl(&["pause", "--kind", "maintenance", "--reason", "x"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("org.outlive.Error.QueueDisabled") && err.contains("outlivectl lock"),
        "{err}"
    );
    let (code, out, _) = ctl(&["queue"]);
    assert_eq!(code, 0);
    assert!(out.contains("DISABLED (foreign-host)"), "{out}");
    // outlivectl lock explains it: row 7, both hosts, the recovery.
    let cfg_s = cfg.display().to_string();
    let (code, out, err) = ctl(&["lock", "--config", &cfg_s]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("L-4 row 7: disabled (foreign-host)") && out.contains("other-host"),
        "{out}"
    );
    assert!(out.contains("outlivectl lock clear"), "{out}");
    let (code, out, _) = ctl(&["lock", "--config", &cfg_s, "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["decision"]["reason"], "foreign-host");
    assert_eq!(v["agent"]["DisabledReason"], "foreign-host");
    // Nothing under the state directory was written.
    let names: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["resume-queue.lock"]);
    assert_eq!(
        std::fs::read(state.join("resume-queue.lock")).unwrap(),
        lock_bytes
    );
    // The operator verified the other host is gone: clear, and the agent re-evaluates.
    let (code, out, err) = ctl(&["lock", "clear", "--config", &cfg_s]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("removed") && out.contains("other-host") && out.contains("queue enabled"),
        "{out}"
    );
    j.wait_for("queue-enabled", T, |d| {
        d.has("OUTLIVE_EVENT", "queue-enabled")
    });
    let (code, _, err) = ctl(&["pause", "--kind", "maintenance", "--reason", "x"]);
    assert_eq!(code, 0, "{err}");
    // With the agent holding it, a second clear is refused and names the holder.
    let (code, _, err) = ctl(&["lock", "clear", "--config", &cfg_s]);
    assert_eq!(code, 1);
    assert!(
        err.contains("live holder") && err.contains("outlived"),
        "{err}"
    );
    // The audit trail: both places, merged.
    let (code, out, err) = ctl(&["audit", "--config", &cfg_s]);
    assert_eq!(code, 0, "{err}");
    let pos = |k: &str| out.find(k).unwrap_or_else(|| panic!("{k} not in:\n{out}"));
    assert!(pos("queue-disabled") < pos("queue-enabled") && pos("queue-enabled") < pos("paused"));
    let _ = child.kill();
    let _ = child.wait();
}

/// Call any method of the agent with raw arguments.
async fn call_at<B>(
    conn: &zbus::Connection,
    path: &str,
    iface: &str,
    method: &str,
    body: &B,
) -> Outcome
where
    B: serde::Serialize + zbus::wire::DynamicType,
{
    match conn
        .call_method(Some("org.outlive.Agent1"), path, Some(iface), method, body)
        .await
    {
        Ok(_) => Ok(()),
        Err(zbus::Error::MethodError(name, msg, _)) => {
            Err((name.to_string(), msg.unwrap_or_default()))
        }
        Err(zbus::Error::FDO(e)) => {
            use zbus::DBusError;
            Err((
                e.name().to_string(),
                e.description().unwrap_or_default().to_string(),
            ))
        }
        Err(e) => Err(("?".into(), e.to_string())),
    }
}

/// Issue "Prove it", bad input: every method of the three interfaces called with wrong
/// argument types, and `Enqueue` with unknown, missing, oversized, relative and forbidden
/// input, huge argv and env, and unknown ids: each is answered with the right error, the agent
/// stays up, and nothing is written (the state file is byte-identical and no entry appears).
#[tokio::test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
async fn x1_bad_input_is_refused_with_typed_errors_and_nothing_is_written() {
    if !ready() {
        return;
    }
    use zbus::wire::Variant;
    let s = setup(PrivateBus::start(), CONFIG);
    let (code, _, err) = enqueue(&s, ROOT, "keep", &[]);
    assert_eq!(code, 0, "{err}");
    let state_file = s._agent.state_dir.join("resume-queue.json");
    let before = std::fs::read(&state_file).unwrap();
    let conn = connect(&s.bus.address).await;
    const Q: (&str, &str) = (
        "/org/outlive/Agent1/ResumeQueue",
        "org.outlive.ResumeQueue1",
    );
    const G: (&str, &str) = ("/org/outlive/Agent1/Guards", "org.outlive.Guards1");
    const A: (&str, &str) = ("/org/outlive/Agent1", "org.outlive.Agent1");
    const INVALID_ARGS: &str = "org.freedesktop.DBus.Error.InvalidArgs";
    const INVALID: &str = "org.outlive.Error.InvalidArgument";

    // Wrong types (an `ay` or a number where a string is expected, missing arguments): refused
    // by the bus binding before any of the agent's code runs.
    let bytes = vec![0xffu8, 0xfe];
    let wrong: Vec<(Outcome, &str)> = vec![
        (
            call_at(&conn, Q.0, Q.1, "Enqueue", &("run_id",)).await,
            "Enqueue(s)",
        ),
        (
            call_at(&conn, Q.0, Q.1, "Cancel", &(bytes.clone(),)).await,
            "Cancel(ay)",
        ),
        (
            call_at(&conn, Q.0, Q.1, "Requeue", &(7u32,)).await,
            "Requeue(u)",
        ),
        (
            call_at(&conn, Q.0, Q.1, "Pause", &("maintenance",)).await,
            "Pause(s)",
        ),
        (call_at(&conn, Q.0, Q.1, "Stop", &(true,)).await, "Stop(b)"),
        (
            call_at(&conn, Q.0, Q.1, "ReportQuota", &("yes", 5u32)).await,
            "ReportQuota(su)",
        ),
        (
            call_at(&conn, G.0, G.1, "ReportGuard", &("k", true)).await,
            "ReportGuard(sb)",
        ),
        (
            call_at(&conn, A.0, A.1, "ClassifyPath", &(bytes.clone(),)).await,
            "ClassifyPath(ay)",
        ),
    ];
    for (got, what) in wrong {
        let (name, msg) = got.expect_err(what);
        assert_eq!(name, INVALID_ARGS, "{what}: {msg}");
    }

    // Enqueue's dictionary, decoded by the agent: each refusal names its field.
    let dict = |pairs: Vec<(&'static str, Variant<'static>)>| {
        pairs.into_iter().collect::<HashMap<&str, Variant<'_>>>()
    };
    let exec = |argv: Vec<String>| Variant::from(argv);
    let base = |extra: Vec<(&'static str, Variant<'static>)>| {
        let mut v = vec![
            ("run_id", Variant::from("bad")),
            ("cwd", Variant::from("/")),
            (
                "evidence",
                Variant::from(vec!["active-subagent".to_string()]),
            ),
        ];
        v.extend(extra);
        dict(v)
    };
    let huge_env: HashMap<String, String> = (0..5000)
        .map(|i| (format!("V{i}"), "x".repeat(100)))
        .collect();
    let cases: Vec<(HashMap<&str, Variant<'_>>, &str)> = vec![
        (
            dict(vec![("colour", Variant::from("blue"))]),
            "colour: unknown key",
        ),
        (
            dict(vec![("run_id", Variant::from(7u32))]),
            "run_id: expected type s, got u",
        ),
        (
            base(vec![("user", Variant::from("root"))]),
            "user: expected a non-negative integer (any of y n q i u x t), got s",
        ),
        (base(vec![]), "one of unit or exec is required"),
        (base(vec![("exec", exec(vec![]))]), "exec"),
        (base(vec![("exec", exec(vec!["bin/true".into()]))]), "exec"),
        (
            dict(vec![
                ("run_id", Variant::from("bad")),
                ("cwd", Variant::from("relative/dir")),
                ("exec", exec(vec!["/bin/true".into()])),
            ]),
            "cwd",
        ),
        (
            dict(vec![
                ("run_id", Variant::from("r".repeat(5000))),
                ("cwd", Variant::from("/")),
                ("exec", exec(vec!["/bin/true".into()])),
            ]),
            "run_id",
        ),
        (
            base(vec![("reason", Variant::from("x".repeat(100_000)))]),
            "reason",
        ),
        (
            base(vec![(
                "exec",
                exec(
                    std::iter::once("/bin/echo".to_string())
                        .chain((0..20_000).map(|i| format!("arg-{i}")))
                        .collect(),
                ),
            )]),
            "exec",
        ),
        (
            base(vec![
                ("exec", exec(vec!["/bin/true".into()])),
                ("env", Variant::from(huge_env)),
            ]),
            "env",
        ),
        (
            base(vec![
                ("exec", exec(vec!["/bin/true".into()])),
                (
                    "env",
                    Variant::from(HashMap::from([(
                        "OUTLIVE_ENTRY_ID".to_string(),
                        "x".to_string(),
                    )])),
                ),
            ]),
            "env",
        ),
        (
            base(vec![
                ("exec", exec(vec!["/bin/true".into()])),
                (
                    "env",
                    Variant::from(HashMap::from([("BAD=NAME".to_string(), "x".to_string())])),
                ),
            ]),
            "env",
        ),
        (
            base(vec![("unit", Variant::from("not a unit name"))]),
            "unit",
        ),
        (
            base(vec![
                ("exec", exec(vec!["/bin/true".into()])),
                ("disposition", Variant::from("whatever")),
            ]),
            "disposition",
        ),
    ];
    for (d, field) in cases {
        let got = call_at(&conn, Q.0, Q.1, "Enqueue", &(d,)).await;
        let (name, msg) = got.expect_err(field);
        assert_eq!(name, INVALID, "{field}: {msg}");
        assert!(msg.contains(field), "the refusal names {field}: {msg}");
    }

    // Unknown and malformed ids, unknown kinds.
    for (got, name, text) in [
        (
            call_at(&conn, Q.0, Q.1, "Cancel", &("rq-zzzz-9",)).await,
            "org.outlive.Error.NotFound",
            "",
        ),
        (
            call_at(&conn, Q.0, Q.1, "Requeue", &("rq-zzzz-9",)).await,
            "org.outlive.Error.NotFound",
            "",
        ),
        (
            call_at(&conn, Q.0, Q.1, "Cancel", &("../../etc/passwd",)).await,
            INVALID,
            "id",
        ),
        (
            call_at(&conn, Q.0, Q.1, "Pause", &("forever", "x")).await,
            INVALID,
            "kind",
        ),
        (
            call_at(&conn, Q.0, Q.1, "Stop", &("x".repeat(5000),)).await,
            INVALID,
            "run_id",
        ),
        (
            call_at(&conn, A.0, A.1, "ClassifyPath", &("relative/path",)).await,
            INVALID,
            "path",
        ),
    ] {
        let (n, m) = got.expect_err(name);
        assert_eq!(n, name, "{m}");
        assert!(m.contains(text), "{name}: {m}");
    }

    // Through outlivectl: a path that is not UTF-8, and one that does not exist, are clear
    // errors, not panics.
    use std::os::unix::ffi::OsStrExt;
    let not_utf8 = std::ffi::OsStr::from_bytes(b"/tmp/\xff\xfe");
    let out = common::bus::as_user(common::outlivectl(), ROOT)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &s.bus.address)
        .args([
            "enqueue",
            "--run-id",
            "bad",
            "--evidence",
            "active-subagent",
            "--cwd",
        ])
        .arg(not_utf8)
        .args(["--", "/bin/true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(1) | Some(2)) && err.contains("cwd"),
        "{:?} {err}",
        out.status
    );
    assert!(!err.contains("panicked"), "{err}");
    let (code, _, err) = s
        .bus
        .outlivectl_as(ROOT, &["host", "--path", "relative/path"]);
    assert_eq!(code, 1, "{err}");
    // (outlivectl resolves a relative path against its working directory, as a CLI does.)
    assert!(err.contains("relative/path"), "{err}");

    // Still up, nothing written.
    assert_eq!(entries(&s, ROOT).len(), 1);
    assert_eq!(
        std::fs::read(&state_file).unwrap(),
        before,
        "a refusal wrote the state file"
    );
}

/// Security review finding 7, member floods (§12 Q-9, X-1): 4,000 `Stop` calls grew the state
/// file to 637 KB with 4,000 stops, and 50,000 refused `Enqueue` calls filled both audit files
/// with refusals, wiping the earlier history. Now stops are kept per run, at most 1,000 (the
/// file grows by at most 64 KiB), identical refusals are counted rather than written one by
/// one (the history before the flood stays), and a member's mutations are rate-limited.
#[tokio::test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
async fn q9_floods_of_stops_and_refusals_neither_bloat_the_state_nor_wipe_the_audit() {
    if !ready() {
        return;
    }
    use zbus::wire::Variant;
    let s = setup(PrivateBus::with_users(), CONFIG);
    s._j.discard();
    let (code, _, err) = enqueue(&s, ROOT, "history", &[]);
    assert_eq!(code, 0, "{err}");
    let state_file = s._agent.state_dir.join("resume-queue.json");
    let before = std::fs::metadata(&state_file).unwrap().len();
    let conn = connect(&s.bus.address).await;

    // 4,000 stops of distinct runs, 32 in flight at a time.
    let ids: Vec<String> = (0..4000).map(|i| format!("flood-{i}")).collect();
    for chunk in ids.chunks(32) {
        let mut calls = tokio::task::JoinSet::new();
        for id in chunk {
            let (c, id) = (conn.clone(), id.clone());
            calls.spawn(async move { call(&c, "Stop", &(id.as_str(),)).await });
        }
        while let Some(r) = calls.join_next().await {
            r.unwrap().expect("Stop");
        }
    }
    // The same run stopped again replaces its stop.
    call(&conn, "Stop", &("flood-3999",)).await.unwrap();
    let after = std::fs::metadata(&state_file).unwrap().len();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    let stops = state["stops"].as_array().unwrap();
    assert!(stops.len() <= 1000, "{} stops kept", stops.len());
    assert!(
        after.saturating_sub(before) <= 64 * 1024,
        "the state grew from {before} to {after} bytes"
    );
    assert_eq!(
        stops.iter().filter(|x| x["run_id"] == "flood-3999").count(),
        1
    );
    assert!(stops.iter().any(|x| x["run_id"] == "flood-3999"));
    assert!(
        !stops.iter().any(|x| x["run_id"] == "flood-0"),
        "oldest first out"
    );

    // 50,000 refused enqueues: the open entry of "history" makes each a duplicate.
    let dict: std::sync::Arc<HashMap<&str, Variant<'static>>> = std::sync::Arc::new(
        [
            ("run_id", Variant::from("history")),
            ("cwd", Variant::from("/")),
            ("exec", Variant::from(vec!["/bin/true".to_string()])),
            (
                "evidence",
                Variant::from(vec!["active-subagent".to_string()]),
            ),
        ]
        .into_iter()
        .collect(),
    );
    let mut refused = 0u32;
    for _ in 0..(50_000 / 50) {
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let (c, d) = (conn.clone(), dict.clone());
            calls.spawn(async move {
                c.call_method(
                    Some("org.outlive.Agent1"),
                    "/org/outlive/Agent1/ResumeQueue",
                    Some("org.outlive.ResumeQueue1"),
                    "Enqueue",
                    &(&*d,),
                )
                .await
            });
        }
        while let Some(r) = calls.join_next().await {
            let (admitted, why, _): (bool, String, String) =
                r.unwrap().expect("Enqueue").body().deserialize().unwrap();
            assert!(!admitted && why == "duplicate-open-entry", "{why}");
            refused += 1;
        }
    }
    assert_eq!(refused, 50_000);
    let config = s._agent.config.to_str().unwrap().to_string();
    let (code, out, err) = s
        .bus
        .outlivectl_as(ROOT, &["--json", "audit", "--config", &config]);
    assert_eq!(code, 0, "{err}");
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["OUTLIVE_EVENT"] == "enqueued" && e["OUTLIVE_KEY"] == "run:history"),
        "the history before the flood is gone ({} events)",
        events.len()
    );
    let lines = events
        .iter()
        .filter(|e| e["OUTLIVE_EVENT"] == "enqueue-refused")
        .count();
    assert!(
        lines <= 4,
        "{lines} refusal lines for 50,000 identical refusals"
    );

    // A member's mutations: 10 a second, 20 at once, then Busy.
    let (mut ok, mut busy) = (0, 0);
    for i in 0..40 {
        let (code, _, err) = s
            .bus
            .outlivectl_as(MEMBER, &["stop", &format!("member-{i}")]);
        match code {
            0 => ok += 1,
            _ if err.contains("org.outlive.Error.Busy") => busy += 1,
            _ => panic!("{err}"),
        }
    }
    assert!(busy > 0 && ok >= 20, "{ok} accepted, {busy} Busy");
}

/// §12 human output, the security review's reproduction (finding 8): a member's session and
/// reason, and a pause reason, carried escape sequences that retitled root's terminal, cleared
/// it and painted a fake status line through `outlivectl`. Every table and text screen, and the
/// journal's MESSAGE, now show them as `\xNN`.
#[test]
fn human_output_shows_control_characters_instead_of_sending_them() {
    if !ready() {
        return;
    }
    const EVIL: &str = "ok\x1b]0;pwned-title\x07\x1b[2J\x1b[31mFAKE: all runs revived\x1b[0m";
    const SHOWN: &str = "ok\\x1b]0;pwned-title\\x07\\x1b[2J\\x1b[31mFAKE: all runs revived\\x1b[0m";
    let s = setup(PrivateBus::with_users(), CONFIG);
    let (code, out, err) = enqueue(
        &s,
        MEMBER,
        "evil",
        &["--session", EVIL, "--reason", &format!("{EVIL}\nFAKE LINE")],
    );
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = s
        .bus
        .outlivectl_as(ROOT, &["pause", "--kind", "maintenance", "--reason", EVIL]);
    assert_eq!(code, 0, "{err}");
    let config = s._agent.config.to_str().unwrap().to_string();
    for args in [
        vec!["queue"],
        vec!["status"],
        vec!["guards"],
        vec!["audit", "--config", &config],
    ] {
        let (code, out, err) = s.bus.outlivectl_as(ROOT, &args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(
            !out.chars().any(|c| c == '\x1b' || c == '\x07'),
            "outlivectl {args:?} sent control characters:\n{out:?}"
        );
        assert!(
            !out.lines().any(|l| l.starts_with("FAKE LINE")),
            "outlivectl {args:?} let a field break its line:\n{out}"
        );
        if args[0] != "guards" {
            assert!(out.contains(SHOWN), "outlivectl {args:?}:\n{out}");
        }
    }
    // The journal: the pause's MESSAGE quotes the reason, shown.
    let d = s._j.wait_for("the pause in the journal", T, |d| {
        d.has("OUTLIVE_EVENT", "paused")
    });
    let message = d.get("MESSAGE").unwrap_or_default();
    assert!(message.contains(SHOWN), "{message:?}");
    assert!(!message.contains('\x1b'), "{message:?}");
}
