//! No borrowed privilege and nothing leaked to strangers (SPEC §12 Q-1, D-6 check 2, paths of
//! members' runs, G-10; security review findings 2, 5, 7, 11 and 12), against the agent on a
//! private bus with the shipped policy and test users, where there is no systemd: revival is a
//! detached spawn (D-9), so what the revived run gets (uid, gid, groups, working directory) is
//! read from its own output. The same rules under systemd (the transient unit's `User=`,
//! `Group=`, `NoNewPrivileges=`, `RestrictSUIDSGID=`) are shown in `box_e2e.rs`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::bus::{MEMBER, OUTLIVE_GID, PrivateBus, ROOT_GROUP_USER, STRANGER};
use common::{Agent, TestSocket, bus_agent, require_root, require_tools};

const T: Duration = Duration::from_secs(15);
const ROOT: (u32, u32) = (0, 0);
/// Live, a long interval (only the first tick and manual drains), a 1 s grace.
const CONFIG: &str = "[queue]\ndry_run = false\n[drainer]\ninterval_sec = 240\ngrace_sec = 1\n";

fn ready() -> bool {
    require_root("owning the bus name, test users in a mount namespace")
        && require_tools(&["dbus-daemon", "busctl", "unshare", "nsenter"])
}

struct Setup {
    bus: PrivateBus,
    agent: Agent,
    _n: TestSocket,
    _j: TestSocket,
}

fn setup(toml: &str) -> Setup {
    let bus = PrivateBus::with_users();
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let agent = bus_agent(&bus, &n, &j, toml);
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    Setup {
        bus,
        agent,
        _n: n,
        _j: j,
    }
}

fn json(s: &Setup, who: (u32, u32), args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let (code, out, err) = s.bus.outlivectl_as(who, &a);
    assert_eq!(code, 0, "outlivectl {args:?}: {out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `outlivectl enqueue` of an exec run: `opts` before `--`, `argv` after. The exit code and
/// output.
fn enqueue(
    s: &Setup,
    who: (u32, u32),
    run: &str,
    opts: &[&str],
    argv: &[&str],
) -> (i32, String, String) {
    let mut a = vec![
        "--json",
        "enqueue",
        "--run-id",
        run,
        "--evidence",
        "active-subagent",
    ];
    if !opts.contains(&"--cwd") {
        a.extend_from_slice(&["--cwd", "/"]);
    }
    a.extend_from_slice(opts);
    a.push("--");
    a.extend_from_slice(argv);
    s.bus.outlivectl_as(who, &a)
}

fn admitted(r: (i32, String, String)) -> String {
    let (code, out, err) = r;
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_string()
}

fn entry(s: &Setup, id: &str) -> serde_json::Value {
    let v = json(s, ROOT, &["queue"]);
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no {id} in {v}"))
}

/// `outlivectl drain --json`, retried while a scheduled tick is running (`Busy`).
fn drain(s: &Setup) -> serde_json::Value {
    let end = Instant::now() + T;
    loop {
        let (code, out, err) = s.bus.outlivectl_as(ROOT, &["--json", "drain"]);
        if code == 0 {
            return serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        }
        assert!(
            err.contains("org.outlive.Error.Busy") && Instant::now() < end,
            "drain: {code} {out}{err}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The output of a spawned run, once it has written a line.
fn run_log(s: &Setup, id: &str) -> String {
    let path = s.agent.runtime_dir.join(format!("runs/{id}.log"));
    let end = Instant::now() + T;
    loop {
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        if log.contains('\n') {
            return log;
        }
        assert!(Instant::now() < end, "{} stayed empty", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

const WHO_AM_I: &str = "echo uid=$(id -u) gid=$(id -g) groups=$(id -G | tr ' ' ,) cwd=$(pwd)";

/// Security review finding 2 (High), the reviewer's reproduction: root queues a user's run
/// naming only the user (`--as-uid`), and the revived run got gid 0 and group root. Now it gets
/// that user's primary group and the groups of its login; an unknown uid is refused; gid 0 for
/// a non-zero uid only when the group is named.
#[test]
fn q1_a_root_caller_naming_only_the_user_gets_that_users_primary_group() {
    if !ready() {
        return;
    }
    let s = setup(CONFIG);
    let member = MEMBER.0.to_string();
    let id = admitted(enqueue(
        &s,
        ROOT,
        "as-member",
        &["--as-uid", &member],
        &["/bin/sh", "-c", WHO_AM_I],
    ));
    let e = entry(&s, &id);
    assert_eq!(
        (e["uid"].as_u64(), e["gid"].as_u64()),
        (Some(u64::from(MEMBER.0)), Some(u64::from(MEMBER.1))),
        "the entry: {e}"
    );
    assert_eq!(e["enqueued_by"], 0, "who queued it: {e}");
    let r = drain(&s);
    assert_eq!(r["outcome"], "revived", "{r}");
    let log = run_log(&s, &id);
    assert!(
        log.starts_with(&format!(
            "uid={} gid={} groups={},{OUTLIVE_GID} ",
            MEMBER.0, MEMBER.1, MEMBER.1
        )),
        "the revived run: {log}"
    );

    // An unknown uid is refused, with or without a group, naming the field.
    for extra in [&[][..], &["--as-gid", "60002"][..]] {
        let mut opts = vec!["--as-uid", "4242"];
        opts.extend_from_slice(extra);
        let (code, out, err) = enqueue(&s, ROOT, "as-nobody", &opts, &["/bin/true"]);
        assert_eq!(code, 1, "{out}{err}");
        assert!(
            err.contains("org.outlive.Error.InvalidArgument")
                && err.contains("user")
                && err.contains("4242"),
            "{err}"
        );
    }

    // A user whose primary group is 0: refused unless the group is named.
    let rg = ROOT_GROUP_USER.0.to_string();
    let (code, out, err) = enqueue(&s, ROOT, "as-rg", &["--as-uid", &rg], &["/bin/true"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("org.outlive.Error.InvalidArgument")
            && err.contains("group")
            && err.contains("--as-gid"),
        "{err}"
    );
    let id = admitted(enqueue(
        &s,
        ROOT,
        "as-rg",
        &["--as-uid", &rg, "--as-gid", "0"],
        &["/bin/true"],
    ));
    assert_eq!(entry(&s, &id)["gid"], 0);

    // A named group is kept.
    let stranger_gid = STRANGER.1.to_string();
    let id = admitted(enqueue(
        &s,
        ROOT,
        "as-member-2",
        &["--as-uid", &member, "--as-gid", &stranger_gid],
        &["/bin/true"],
    ));
    assert_eq!(entry(&s, &id)["gid"].as_u64(), Some(u64::from(STRANGER.1)));

    // Root's own run stays root's.
    let id = admitted(enqueue(&s, ROOT, "as-root", &[], &["/bin/true"]));
    let e = entry(&s, &id);
    assert_eq!((e["uid"].as_u64(), e["gid"].as_u64()), (Some(0), Some(0)));
}

/// Security review, spawn path: the working directory was entered as root (with
/// CAP_DAC_READ_SEARCH) before the switch to the run's user, so a run could start inside a
/// directory its user cannot enter. The directory is now changed after the switch: a member's
/// run whose cwd is a root-only directory is not started there.
#[test]
fn d9_the_spawn_path_changes_directory_after_switching_user() {
    if !ready() {
        return;
    }
    let s = setup(CONFIG);
    let base = common::open_tempdir();
    // The member may look at the directory (its parent is open), not enter it.
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = base.path().join("root-only");
    std::fs::create_dir(&secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
    let cwd = secret.to_str().unwrap();
    let id = admitted(enqueue(
        &s,
        MEMBER,
        "into-root-only",
        &["--cwd", cwd],
        &["/bin/sh", "-c", WHO_AM_I],
    ));
    let r = drain(&s);
    assert_ne!(r["outcome"], "revived", "{r}");
    std::thread::sleep(Duration::from_millis(300));
    let log = std::fs::read_to_string(s.agent.runtime_dir.join(format!("runs/{id}.log")))
        .unwrap_or_default();
    assert!(
        !log.contains("uid="),
        "the member's run started in a directory it cannot enter: {log}"
    );
    let e = entry(&s, &id);
    assert_ne!(e["status"], "revived", "{e}");
    assert_ne!(e["status"], "starting", "{e}");
}

/// Rewrite the test namespace's `/etc/group` in place (it is bind-mounted by inode): `outlive`
/// without the member.
fn remove_member_from_outlive(s: &Setup) {
    let path = s.bus.dir.path().join("group");
    let text = std::fs::read_to_string(&path).unwrap();
    let edited: String = text
        .lines()
        .map(|l| {
            if l.starts_with("outlive:") {
                format!("outlive:x:{OUTLIVE_GID}:\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert_ne!(text, edited);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut f, edited.as_bytes()).unwrap();
}

/// SPEC D-6 check 2 (security review finding 11): authorization was checked only at enqueue,
/// so a member removed from `outlive` still got their queued runs started. Now it is checked
/// again at the attempt: the run is `invalidated:not-authorized` and never started.
#[test]
fn d6_a_member_removed_from_the_group_has_queued_runs_invalidated() {
    if !ready() {
        return;
    }
    let s = setup(CONFIG);
    let id = admitted(enqueue(
        &s,
        MEMBER,
        "leaver",
        &[],
        &["/bin/sh", "-c", WHO_AM_I],
    ));
    remove_member_from_outlive(&s);
    let r = drain(&s);
    assert_eq!(r["outcome"], "invalidated", "{r}");
    assert!(
        r["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("no longer a member of group `outlive`"),
        "{r}"
    );
    assert_eq!(entry(&s, &id)["status"], "invalidated:not-authorized");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !s.agent.runtime_dir.join(format!("runs/{id}.log")).exists(),
        "the run was started"
    );
}

/// Security review finding 7: a member's `ClassifyPath` and the D-6 checks of a member's run
/// were made with root's credentials (CAP_DAC_READ_SEARCH), so a member could learn what exists
/// inside directories closed to them. Now both use the member's own: inside a directory the
/// member cannot enter, an existing path and a missing one get the same answer (AccessDenied;
/// undecided), while root still sees the difference.
#[test]
fn x1_members_paths_are_checked_with_their_own_credentials() {
    if !ready() {
        return;
    }
    let s = setup(CONFIG);
    let base = common::open_tempdir();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let closed = base.path().join("closed");
    std::fs::create_dir_all(closed.join("inside")).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    let open = base.path().join("open");
    std::fs::create_dir(&open).unwrap();
    let inside = closed.join("inside").to_str().unwrap().to_string();
    let missing = closed.join("missing").to_str().unwrap().to_string();
    let classify = |who: (u32, u32), path: &str| {
        s.bus.busctl_as(
            who,
            &[
                "call",
                "org.outlive.Agent1",
                "/org/outlive/Agent1",
                "org.outlive.Agent1",
                "ClassifyPath",
                "s",
                path,
            ],
        )
    };
    // Root tells them apart.
    let (code, out, err) = classify(ROOT, &inside);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = classify(ROOT, &missing);
    assert_eq!(code, 1);
    assert!(
        err.contains("NotFound") || err.contains("no such file"),
        "{err}"
    );
    // The member does not.
    for p in [&inside, &missing] {
        let (code, out, err) = classify(MEMBER, p);
        assert_eq!(code, 1, "{p}: {out}");
        assert!(err.contains("Permission denied"), "{p}: {err}");
    }
    // What the member can reach, it may classify fully.
    let (code, out, err) = classify(MEMBER, open.to_str().unwrap());
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("mount-table-only"), "{out}");

    // A member's runs: cwd inside the closed directory is undecided whether it exists or not
    // (root's view would have revived one and invalidated the other as cwd-missing).
    let a = admitted(enqueue(
        &s,
        MEMBER,
        "inside",
        &["--cwd", &inside],
        &["/bin/true"],
    ));
    let b = admitted(enqueue(
        &s,
        MEMBER,
        "missing",
        &["--cwd", &missing],
        &["/bin/true"],
    ));
    let r = drain(&s);
    assert_eq!(r["outcome"], "empty", "{r}");
    assert!(
        r["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("could not be checked"),
        "{r}"
    );
    for id in [&a, &b] {
        assert_eq!(entry(&s, id)["status"], "queued");
    }
    // Root's run in the same place is checked as root.
    let c = admitted(enqueue(
        &s,
        ROOT,
        "root-missing",
        &["--cwd", &missing],
        &["/bin/true"],
    ));
    let r = drain(&s);
    assert_eq!(r["outcome"], "invalidated", "{r}");
    assert_eq!(entry(&s, &c)["status"], "invalidated:cwd-missing");
}

/// Security review finding 11: `allowed_units` was one glob over the whole name, so
/// `agent@*.service` admitted an escaped instance (`%I` = /etc/shadow), and a pattern whose
/// last dot is not a unit suffix (`app.v2-*`) any unit type. The name and suffix now match
/// apart (no unit suffix in the pattern means `.service`), and an instance must be a plain
/// name.
#[test]
fn x1_allowed_units_match_name_and_suffix_apart() {
    if !ready() {
        return;
    }
    let s = setup(
        "[queue]\ndry_run = false\nallowed_units = [\"agent@*.service\", \"app.v2-*\"]\n\
         [drainer]\ninterval_sec = 240\n",
    );
    let n = std::cell::Cell::new(0);
    let unit = |name: &str| {
        n.set(n.get() + 1);
        s.bus.outlivectl_as(
            MEMBER,
            &[
                "enqueue",
                "--run-id",
                &format!("unit-{}", n.get()),
                "--evidence",
                "active-subagent",
                "--cwd",
                "/",
                "--unit",
                name,
            ],
        )
    };
    for refused in [
        "agent@\\x2fetc\\x2fshadow.service",
        "app.v2-x.mount",
        "app.v2-x.socket",
    ] {
        let (code, out, err) = unit(refused);
        assert_eq!(code, 1, "{refused} admitted: {out}");
        assert!(
            err.contains("AccessDenied") && err.contains("queue.allowed_units"),
            "{refused}: {err}"
        );
    }
    for admitted in ["agent@build-7.service", "app.v2-x.service"] {
        let (code, out, err) = unit(admitted);
        assert_eq!(code, 0, "{admitted}: {out}{err}");
    }
}

/// SPEC §12 G-10 (security review finding 5): `Attention` and `AttentionRaised` carried notice
/// messages, which name members' paths, to everyone. Now a stranger reads kinds, entry ids and
/// counts only, the broadcast signal carries the entry id (or a count), the property's change
/// signal carries no value, and a stranger's `List` rows have no session; root and members
/// still read the message.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn g10_strangers_learn_kinds_ids_and_counts_only() {
    if !ready() {
        return;
    }
    use futures_util::StreamExt;
    let s = setup(CONFIG);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let conn = rt.block_on(common::bus::connect(&s.bus.address));
    let signals = |member: &'static str, interface: &'static str| {
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .path("/org/outlive/Agent1/Guards")
            .interface(interface)
            .member(member)
            .build()
            .unwrap();
        rt.block_on(zbus::MessageStream::for_match_rule(rule, &conn, None))
            .unwrap()
    };
    let mut raised = signals("AttentionRaised", "org.outlive.Guards1");
    let mut changed = signals("PropertiesChanged", "org.freedesktop.DBus.Properties");

    let base = common::open_tempdir();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = base.path().join("secret-project-xyz");
    let id = admitted(enqueue(
        &s,
        MEMBER,
        "leaky",
        &[
            "--cwd",
            secret.to_str().unwrap(),
            "--session",
            "tmux-secret-session",
        ],
        &["/bin/true"],
    ));
    let r = drain(&s);
    assert_eq!(r["outcome"], "invalidated", "{r}");

    // The broadcast signal: the kind and the entry id, nothing else.
    let (kind, detail): (String, String) = rt.block_on(async {
        let m = tokio::time::timeout(T, raised.next())
            .await
            .expect("AttentionRaised")
            .unwrap()
            .unwrap();
        m.body().deserialize().unwrap()
    });
    assert_eq!(detail, id, "AttentionRaised({kind}, {detail})");
    assert!(!kind.contains("secret"), "{kind}");
    // The property's change signal names it and carries no value.
    rt.block_on(async {
        let end = tokio::time::Instant::now() + T;
        loop {
            let m = tokio::time::timeout_at(end, changed.next())
                .await
                .expect("PropertiesChanged for Attention")
                .unwrap()
                .unwrap();
            let (_, values, invalidated): (
                String,
                std::collections::HashMap<String, zbus::wire::OwnedVariant>,
                Vec<String>,
            ) = m.body().deserialize().unwrap();
            assert!(!values.contains_key("Attention"), "a value was broadcast");
            if invalidated.iter().any(|p| p == "Attention") {
                break;
            }
        }
    });

    let attention = |who: (u32, u32)| {
        let (code, out, err) = s.bus.busctl_as(
            who,
            &[
                "--json=short",
                "get-property",
                "org.outlive.Agent1",
                "/org/outlive/Agent1/Guards",
                "org.outlive.Guards1",
                "Attention",
            ],
        );
        assert_eq!(code, 0, "{err}");
        out
    };
    let stranger = attention(STRANGER);
    assert!(!stranger.contains("secret-project"), "{stranger}");
    assert!(
        stranger.contains(&id) && stranger.contains("invalidated"),
        "{stranger}"
    );
    let member = attention(MEMBER);
    assert!(member.contains("secret-project"), "{member}");
    let root = attention(ROOT);
    assert!(root.contains("secret-project"), "{root}");

    // The stranger's List: no session, no path.
    let v = json(&s, STRANGER, &["queue"]);
    let text = v.to_string();
    assert!(
        !text.contains("tmux-secret-session") && !text.contains("secret-project"),
        "{text}"
    );
    let v = json(&s, MEMBER, &["queue"]);
    assert!(v.to_string().contains("tmux-secret-session"), "{v}");
    // The stranger's status screen shows the notice without its message.
    let (code, out, err) = s.bus.outlivectl_as(STRANGER, &["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("secret-project"), "{out}");
    assert!(out.contains(&id), "{out}");
}
