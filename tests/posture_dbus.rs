//! The guard posture over D-Bus and `outlivectl` (SPEC §6, X-1, §8) against a private
//! dbus-daemon with the shipped policy and test users: an external guard reported by the owner
//! of its drop-in, staleness and its one alert; a user's drop-in contesting root's key and
//! growing to 64 MiB (§12 G-2); PropertiesChanged for `Summary` only on change; the attention
//! item, `outlivectl status`, `guards` and `ack`.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::bus::{MEMBER, PrivateBus, STRANGER, connect};
use common::{Agent, AgentSpec, TestSocket, require_root, require_tools};
use futures_util::StreamExt;

const T: Duration = Duration::from_secs(15);
const ROOT: (u32, u32) = (0, 0);
const GUARDS: &str = "/org/outlive/Agent1/Guards";

fn ready() -> bool {
    require_root("owning the bus name, test users in a mount namespace")
        && require_tools(&["dbus-daemon", "busctl", "unshare", "nsenter"])
}

const DROPIN: &str = "[[guard]]\nkey = \"backup.snapshots\"\ndescription = \"hourly snapshots of /srv are taken\"\n\
                      default_enabled = true\nenabled = true\ncadence_ms = 1000\n";

struct Setup {
    bus: PrivateBus,
    agent: Agent,
    n: TestSocket,
    j: TestSocket,
}

/// An agent on a bus with test users, a watchdog (so that row is quiet), a drop-in owned by
/// the stranger, a 1 s tick and a 1 s anomaly grace.
fn setup(extra: &str) -> Setup {
    setup_with(
        extra,
        vec![("50-backup.toml".into(), DROPIN.into(), STRANGER.0)],
    )
}

/// [`setup`] with these drop-ins (name, text, owner).
fn setup_with(extra: &str, dropins: Vec<(String, String, u32)>) -> Setup {
    let bus = PrivateBus::with_users();
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let mut env = HashMap::new();
    env.insert("DBUS_SYSTEM_BUS_ADDRESS".to_string(), bus.address.clone());
    let agent = Agent::start(AgentSpec {
        args: vec![],
        env,
        notify: Some(n.path.clone()),
        journal: Some(j.path.clone()),
        watchdog_usec: Some(4_000_000),
        toml: format!("[drainer]\ninterval_sec = 1\n[posture]\nanomaly_grace_sec = 1\n{extra}"),
        wrapper: bus.agent_wrapper(),
        dropins,
        ..AgentSpec::default()
    });
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    Setup { bus, agent, n, j }
}

fn guards(s: &Setup, who: (u32, u32)) -> Vec<serde_json::Value> {
    let (code, out, err) = s.bus.outlivectl_as(who, &["--json", "guards"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["guards"].as_array().unwrap().clone()
}

fn row(s: &Setup, key: &str) -> serde_json::Value {
    guards(s, ROOT)
        .into_iter()
        .find(|r| r["key"] == key)
        .unwrap_or_else(|| panic!("no row {key}"))
}

fn wait_row(s: &Setup, key: &str, effective: &str, timeout: Duration) -> serde_json::Value {
    let end = Instant::now() + timeout;
    loop {
        let r = row(s, key);
        if r["effective"] == effective {
            return r;
        }
        assert!(Instant::now() < end, "{key} never became {effective}: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn report(s: &Setup, who: (u32, u32), key: &str) -> (i32, String, String) {
    s.bus.busctl_as(
        who,
        &[
            "call",
            "org.outlive.Agent1",
            GUARDS,
            "org.outlive.Guards1",
            "ReportGuard",
            "sbbta{sv}",
            key,
            "true",
            "false",
            "0",
            "0",
        ],
    )
}

#[test]
fn g2_an_external_guard_is_reported_by_its_owner_goes_stale_and_alerts_once() {
    if !ready() {
        return;
    }
    let s = setup("");
    // Declared, never reported: missing. Everyone may read the rows.
    let r = wait_row(&s, "backup.snapshots", "missing", T);
    assert_eq!(r["source"], "50-backup.toml");
    let seen_by_stranger = guards(&s, STRANGER);
    assert_eq!(
        seen_by_stranger.len(),
        11,
        "ten built-in rows and the drop-in's"
    );
    // Another user, even a member of outlive, cannot report it; its owner can.
    let (code, _, err) = report(&s, MEMBER, "backup.snapshots");
    assert_ne!(code, 0);
    assert!(err.contains("only root and uid"), "{err}");
    let (code, _, err) = report(&s, STRANGER, "nope.key");
    assert_ne!(code, 0);
    assert!(err.contains("no guard nope.key is declared"), "{err}");
    let (code, _, err) = report(&s, STRANGER, "backup.snapshots");
    assert_eq!(code, 0, "{err}");
    let r = wait_row(&s, "backup.snapshots", "on-confirmed", T);
    assert_eq!(r["runtime_enabled"], true);
    // No more reports: stale after 5 × 1 s, then one posture-degraded entry after the grace.
    let r = wait_row(&s, "backup.snapshots", "on-stale", Duration::from_secs(10));
    assert_eq!(r["stale"], true);
    let ev = s.j.wait_for("the posture-degraded entry", T, |d| {
        d.has("MESSAGE_ID", "732c4bc9ef3f4dd98cb6b773fa36edb3")
    });
    assert!(
        ev.get("OUTLIVE_ANOMALIES")
            .unwrap()
            .contains("backup.snapshots: on-stale"),
        "{ev:?}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let n =
        s.j.seen()
            .iter()
            .filter(|d| d.has("MESSAGE_ID", "732c4bc9ef3f4dd98cb6b773fa36edb3"))
            .count();
    assert_eq!(n, 1, "one entry while the anomaly persists");
    // The owner reports again: the row recovers and the item closes with one restored entry.
    let (code, _, err) = report(&s, STRANGER, "backup.snapshots");
    assert_eq!(code, 0, "{err}");
    s.j.wait_for("posture-restored", T, |d| {
        d.has("MESSAGE_ID", "1151efdae37c4b6e9cddb87dadbf6b50")
    });
}

#[tokio::test(flavor = "current_thread")]
async fn x1_summary_emits_properties_changed_on_change_and_only_then() {
    if !ready() {
        return;
    }
    let s = setup("");
    let conn = connect(&s.bus.address).await;
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.freedesktop.DBus.Properties")
        .member("PropertiesChanged")
        .path(GUARDS)
        .build()
        .unwrap();
    let mut changes = zbus::MessageStream::for_match_rule(rule, &conn, None)
        .await
        .unwrap();
    // Let the start settle (the drop-in's row goes missing → its anomaly after the grace).
    tokio::time::sleep(Duration::from_secs(3)).await;
    while tokio::time::timeout(Duration::from_millis(100), changes.next())
        .await
        .is_ok()
    {}
    // Three ticks with nothing changing: no signal for Summary.
    let quiet = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            let m = changes.next().await.unwrap().unwrap();
            let (_, changed, _): (
                String,
                HashMap<String, zbus::wire::OwnedVariant>,
                Vec<String>,
            ) = m.body().deserialize().unwrap();
            if changed.contains_key("Summary") {
                return changed;
            }
        }
    })
    .await;
    assert!(
        quiet.is_err(),
        "Summary changed while nothing did: {quiet:?}"
    );
    // A report changes the drop-in's row (missing → on-confirmed): Summary changes.
    let (code, _, err) = report(&s, STRANGER, "backup.snapshots");
    assert_eq!(code, 0, "{err}");
    let changed = tokio::time::timeout(T, async {
        loop {
            let m = changes.next().await.unwrap().unwrap();
            let (_, changed, _): (
                String,
                HashMap<String, zbus::wire::OwnedVariant>,
                Vec<String>,
            ) = m.body().deserialize().unwrap();
            if changed.contains_key("Summary") {
                return changed;
            }
        }
    })
    .await
    .expect("PropertiesChanged for Summary");
    let summary: HashMap<String, u32> = changed["Summary"].try_clone().unwrap().try_into().unwrap();
    assert_eq!(summary.len(), 10, "{summary:?}");
    assert!(summary["on-confirmed"] >= 1);
}

#[test]
fn g9_a_notice_opens_the_item_status_shows_it_and_ack_clears_it() {
    if !ready() {
        return;
    }
    let s = setup("[queue]\ndry_run = false\n");
    // Quiet the drop-in's row first.
    assert_eq!(report(&s, STRANGER, "backup.snapshots").0, 0);
    wait_row(&s, "backup.snapshots", "on-confirmed", T);
    // An entry whose working directory is gone: the next drain invalidates it (a one-off
    // notice, raised live).
    let (code, out, err) = s.bus.outlivectl_as(
        ROOT,
        &[
            "enqueue",
            "--run-id",
            "gone",
            "--evidence",
            "active-subagent",
            "--cwd",
            "/nonexistent/project",
            "--",
            "/bin/true",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let end = Instant::now() + T;
    loop {
        let (code, out, err) = s.bus.outlivectl_as(ROOT, &["--json", "drain"]);
        if code == 0 && out.contains("invalidated") {
            break;
        }
        assert!(Instant::now() < end, "{code} {out}{err}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, out, err) = s.bus.outlivectl_as(STRANGER, &["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("DEGRADED posture"), "{out}");
    assert!(out.contains("attention: open since"), "{out}");
    assert!(out.contains("invalidated: "), "{out}");
    assert!(out.contains("`outlivectl ack`"), "{out}");
    // The stranger may not acknowledge; a member may.
    let (code, _, err) = s.bus.outlivectl_as(STRANGER, &["ack"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("AccessDenied"), "{err}");
    let (code, out, err) = s.bus.outlivectl_as(MEMBER, &["ack"]);
    assert_eq!(code, 0, "{out}{err}");
    s.j.wait_for("posture-restored after the ack", T, |d| {
        d.has("MESSAGE_ID", "1151efdae37c4b6e9cddb87dadbf6b50")
    });
    let end = Instant::now() + T;
    loop {
        let (_, out, _) = s.bus.outlivectl_as(STRANGER, &["status"]);
        if out.contains("attention: nothing needs attention") {
            assert!(!out.contains("DEGRADED"), "{out}");
            break;
        }
        assert!(Instant::now() < end, "{out}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The guards table, for people.
    let (code, out, err) = s.bus.outlivectl_as(STRANGER, &["guards"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("   GUARD") || out.contains("GUARD"),
        "{out}"
    );
    assert!(
        out.contains("backup.snapshots") && out.contains("50-backup.toml"),
        "{out}"
    );
}

/// Issue "Prove it", the authorization matrix: every method of the agent, called as root, as a
/// member of `outlive`, and as an unprivileged user who owns a drop-in (the only one who may
/// report its guard besides root), through a private dbus-daemon with the shipped policy and
/// against the agent itself. "allow" means anything but AccessDenied (a NotFound for an unknown
/// id is an allowed call); "deny" means AccessDenied, from the policy or from the agent.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn x1_every_method_as_root_member_owner_and_stranger() {
    if !ready() {
        return;
    }
    let s = setup("");
    const Q: (&str, &str) = (
        "/org/outlive/Agent1/ResumeQueue",
        "org.outlive.ResumeQueue1",
    );
    const G: (&str, &str) = ("/org/outlive/Agent1/Guards", "org.outlive.Guards1");
    const A: (&str, &str) = ("/org/outlive/Agent1", "org.outlive.Agent1");
    const P: &str = "org.freedesktop.DBus.Properties";
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum E {
        Allow,
        Deny,
    }
    use E::{Allow, Deny};
    // (object, interface, method, signature and arguments, [root, member, stranger-owner])
    type Row<'a> = ((&'a str, &'a str), &'a str, Vec<&'a str>, [E; 3]);
    let table: Vec<Row> = vec![
        (Q, "List", vec![], [Allow, Allow, Allow]),
        (
            Q,
            "Enqueue",
            vec![
                "a{sv}",
                "3",
                "run_id",
                "s",
                "m-1",
                "cwd",
                "s",
                "/",
                "exec",
                "as",
                "1",
                "/bin/true",
            ],
            [Allow, Allow, Deny],
        ),
        (Q, "Cancel", vec!["s", "rq-zzzz-1"], [Allow, Allow, Deny]),
        (Q, "Requeue", vec!["s", "rq-zzzz-1"], [Allow, Allow, Deny]),
        (Q, "Stop", vec!["s", "never-queued"], [Allow, Allow, Deny]),
        (
            Q,
            "Pause",
            vec!["ss", "maintenance", "matrix"],
            [Allow, Allow, Deny],
        ),
        (Q, "Resume", vec![], [Allow, Allow, Deny]),
        (Q, "StopAll", vec![], [Allow, Allow, Deny]),
        (Q, "Resume", vec![], [Allow, Allow, Deny]),
        (Q, "Drain", vec![], [Allow, Allow, Deny]),
        (
            Q,
            "ReportQuota",
            vec!["bu", "true", "60"],
            [Allow, Allow, Deny],
        ),
        (G, "GetGuards", vec![], [Allow, Allow, Allow]),
        (
            G,
            "ReportGuard",
            vec!["sbbta{sv}", "backup.snapshots", "true", "false", "0", "0"],
            [Allow, Deny, Allow],
        ),
        (G, "AckAttention", vec![], [Allow, Allow, Deny]),
        (A, "GetHostFacts", vec![], [Allow, Allow, Allow]),
        (A, "ClassifyPath", vec!["s", "/"], [Allow, Allow, Allow]),
        (A, "Reevaluate", vec![], [Allow, Deny, Deny]),
    ];
    let who = [("root", ROOT), ("member", MEMBER), ("stranger", STRANGER)];
    let mut report = Vec::new();
    for ((path, iface), method, args, expect) in &table {
        for (i, (name, id)) in who.iter().enumerate() {
            let mut a = vec!["call", "org.outlive.Agent1", path, iface, method];
            a.extend(args.iter().copied());
            let (code, out, err) = s.bus.busctl_as(*id, &a);
            let denied = code != 0
                && (err.contains("AccessDenied")
                    || err.contains("Access denied")
                    || err.contains("only root")
                    || err.contains("not allowed"));
            let got = if denied { Deny } else { Allow };
            if got != expect[i] {
                report.push(format!(
                    "{iface}.{method} as {name}: expected {:?}, got {got:?} ({code}: {out}{err})",
                    expect[i]
                ));
            }
        }
    }
    // Properties are readable by everyone.
    for (name, id) in who {
        let (code, _, err) = s.bus.busctl_as(
            id,
            &["get-property", "org.outlive.Agent1", Q.0, Q.1, "Waiting"],
        );
        if code != 0 {
            report.push(format!("{P}.Get Waiting as {name}: {err}"));
        }
    }
    assert!(
        report.is_empty(),
        "authorization matrix:\n{}",
        report.join("\n")
    );
}

/// §12 G-2, the security review's reproduction (finding 5): alice owns a drop-in of her own;
/// she declares root's key in it too and waits for a routine reload. Root's guard read errored
/// and root's report was refused ("no guard … is declared"). Now root's declaration stands and
/// her file is ignored. Then she grows her file to 64 MiB while another user calls ReportGuard
/// in a loop: the agent read it whole at every evaluation (387 MB resident in the review); now
/// it is refused from its size, unread.
#[test]
fn g2_a_users_drop_in_neither_takes_roots_key_nor_grows_the_agent() {
    if !ready() {
        return;
    }
    let alice = MEMBER.0;
    let s = setup_with(
        "",
        vec![
            ("10-backup.toml".into(), DROPIN.into(), 0),
            (
                "20-alice.toml".into(),
                DROPIN.replace("backup.snapshots", "alice.key"),
                alice,
            ),
        ],
    );
    wait_row(&s, "backup.snapshots", "missing", T);
    let file = s.agent.dir.path().join("guards.d/20-alice.toml");
    // Alice edits her own file (ownership and mode unchanged) to claim root's key.
    std::fs::write(
        &file,
        format!(
            "{}{DROPIN}",
            DROPIN.replace("backup.snapshots", "alice.key")
        ),
    )
    .unwrap();
    s.agent.signal(nix::sys::signal::Signal::SIGHUP);
    s.n.wait_for("the reload done", T, |d| d.has("READY", "1"));
    let (code, _, err) = report(&s, ROOT, "backup.snapshots");
    assert_eq!(code, 0, "root's report: {err}");
    let r = wait_row(&s, "backup.snapshots", "on-confirmed", T);
    assert_eq!(r["source"], "10-backup.toml");
    let r = wait_row(&s, "alice.key", "errored", T);
    assert!(
        r.to_string().contains("already declared by 10-backup.toml"),
        "{r}"
    );

    // 64 MiB, and a stranger keeps the agent evaluating.
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    s.agent.signal(nix::sys::signal::Signal::SIGHUP);
    for _ in 0..30 {
        report(&s, STRANGER, "no.such.key");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Refused from its size: no key was read, so the row is the file's.
    let r = wait_row(&s, "guards.d/20-alice.toml", "errored", T);
    assert!(r.to_string().contains("64 KiB"), "{r}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.agent.pid())).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        hwm_kib < 48 * 1024,
        "the agent's peak resident memory reached {hwm_kib} KiB"
    );
    assert_eq!(
        row(&s, "backup.snapshots")["source"],
        "10-backup.toml",
        "root's guard still stands"
    );
}
