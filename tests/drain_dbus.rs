//! The drainer over D-Bus and `outlivectl` (SPEC D-1, D-3, D-9, D-10, D-11, X-1) where there is
//! no systemd (as on this test host, in a container, or on macOS): `Drain()`, `ReportQuota()`,
//! a revival by a detached spawn as the enqueuer, and the error mapping. Revival through
//! systemd is shown under a real systemd in `box_e2e.rs`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::bus::{MEMBER, PrivateBus, STRANGER};
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
    j: TestSocket,
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
        j,
    }
}

fn json(s: &Setup, who: (u32, u32), args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let (code, out, err) = s.bus.outlivectl_as(who, &a);
    assert_eq!(code, 0, "outlivectl {args:?}: {out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `outlivectl drain --json`, retried while a scheduled tick is running (`Busy`).
fn drain(s: &Setup, who: (u32, u32)) -> serde_json::Value {
    let end = Instant::now() + T;
    loop {
        let (code, out, err) = s.bus.outlivectl_as(who, &["--json", "drain"]);
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

fn enqueue(s: &Setup, who: (u32, u32), run: &str, argv: &[&str]) -> String {
    let mut a = vec![
        "enqueue",
        "--run-id",
        run,
        "--evidence",
        "active-subagent",
        "--cwd",
        "/",
        "--reason",
        "age-limit",
        "--",
    ];
    a.extend_from_slice(argv);
    let v = json(s, who, &a);
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

fn wait_status(s: &Setup, id: &str, want: &str) -> serde_json::Value {
    let end = Instant::now() + T;
    loop {
        let e = entry(s, id);
        if e["status"] == want {
            return e;
        }
        assert!(Instant::now() < end, "{id} never became {want}: {e}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn queue_prop(s: &Setup, name: &str) -> serde_json::Value {
    json(s, ROOT, &["queue"])["queue"][name].clone()
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn d9_drain_revives_a_member_run_by_detached_spawn_that_outlives_the_agent() {
    if !ready() {
        return;
    }
    let mut s = setup(CONFIG);
    // Drain is a mutation: the stranger is refused (by the policy or the agent).
    let (code, _, err) = s.bus.outlivectl_as(STRANGER, &["drain"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("AccessDenied"), "{err}");
    assert_eq!(drain(&s, ROOT)["outcome"], "empty");
    let script = "echo pid=$$ uid=$(id -u) cwd=$(pwd) entry=$OUTLIVE_ENTRY_ID run=$OUTLIVE_RUN_ID; \
                  cat \"$OUTLIVE_CONTINUATION\"; exec sleep 300";
    let id = enqueue(&s, MEMBER, "spawned", &["/bin/sh", "-c", script]);
    let r = drain(&s, MEMBER);
    assert_eq!(r["outcome"], "revived", "{r}");
    assert_eq!(r["entry_id"], id.as_str());
    assert_eq!(entry(&s, &id)["status"], "starting");
    // Verified once the 1 s grace has passed (the loop wakes for it; no further drain).
    let e = wait_status(&s, &id, "revived");
    assert_eq!(e["attempts"], 0);
    let log_path = s.agent.runtime_dir.join(format!("runs/{id}.log"));
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains(&format!("uid={} cwd=/ entry={id} run=spawned", MEMBER.0)),
        "{log}"
    );
    assert!(
        log.contains("restarted by outlive") && log.contains("It was not resumed"),
        "the member read its continuation: {log}"
    );
    let pid: i32 = log
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .unwrap()
        .parse()
        .unwrap();
    let ev = s.j.wait_for("the revival in the journal", T, |d| {
        d.has("MESSAGE_ID", "234242b2aed347baac257c41c5caf85b")
    });
    assert_eq!(ev.get("OUTLIVE_ENTRY_ID"), Some(id.as_str()));
    assert!(ev.get("MESSAGE").unwrap().contains("revived"));
    // The run is detached: stopping the agent does not stop it.
    s.agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(s.agent.wait_exit(T), Some(0));
    assert!(alive(pid), "the revived run died with the agent");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[test]
fn d3_drain_maps_paused_and_disabled_to_errors() {
    if !ready() {
        return;
    }
    let s = setup(CONFIG);
    let (code, _, err) = s.bus.outlivectl_as(
        ROOT,
        &["pause", "--kind", "maintenance", "--reason", "disk swap"],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = s.bus.outlivectl_as(MEMBER, &["drain"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("org.outlive.Error.QueuePaused") && err.contains("outlivectl resume"),
        "{err}"
    );
    drop(s);
    let s = setup("[queue]\nenabled = false\n");
    let (code, _, err) = s.bus.outlivectl_as(ROOT, &["drain"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("org.outlive.Error.QueueDisabled") && err.contains("queue-off"),
        "{err}"
    );
}

#[test]
fn d10_report_quota_gates_a_drain_and_the_signal_is_published() {
    if !ready() {
        return;
    }
    let s = setup(CONFIG);
    assert_eq!(queue_prop(&s, "QuotaSignal"), "absent");
    let id = enqueue(&s, ROOT, "q", &["/bin/sleep", "5"]);
    let (code, _, err) = s.bus.outlivectl_as(
        STRANGER,
        &["quota", "--can-spawn", "false", "--valid-for", "60"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("AccessDenied"), "{err}");
    let v = json(
        &s,
        MEMBER,
        &["quota", "--can-spawn", "false", "--valid-for", "60"],
    );
    assert_eq!(v["can_spawn"], false);
    assert_eq!(queue_prop(&s, "QuotaSignal"), "fresh");
    let r = drain(&s, ROOT);
    assert_eq!(r["outcome"], "quota", "{r}");
    assert_eq!(entry(&s, &id)["status"], "queued");
    // A 1 s report expires: then the gate passes and the signal reads stale.
    json(
        &s,
        MEMBER,
        &["quota", "--can-spawn", "false", "--valid-for", "1"],
    );
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(queue_prop(&s, "QuotaSignal"), "stale");
    let r = drain(&s, ROOT);
    assert_eq!(r["outcome"], "revived", "{r}");
    s.j.wait_for("the quota report audited", T, |d| {
        d.has("OUTLIVE_EVENT", "quota-reported")
    });
}

#[test]
fn d1_a_drain_while_a_tick_runs_is_busy() {
    if !ready() {
        return;
    }
    if !cfg!(feature = "fault-hooks") {
        assert!(common::require(
            false,
            "the fault-hooks feature (make test enables it)"
        ));
        return;
    }
    let s = setup(CONFIG);
    assert_eq!(drain(&s, ROOT)["outcome"], "empty");
    std::fs::write(s.agent.runtime_dir.join("fault-wedge-drainer"), "").unwrap();
    // A drain wakes the loop, whose next wake then wedges holding the drainer (a scheduled
    // wake may get there first): drains succeed until one is answered Busy.
    let end = Instant::now() + T;
    loop {
        let (code, out, err) = s.bus.outlivectl_as(ROOT, &["drain"]);
        if code == 1 && err.contains("org.outlive.Error.Busy") {
            assert!(err.contains("try again"), "{err}");
            break;
        }
        assert!(Instant::now() < end, "never Busy: {code} {out}{err}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// D-6 with H-5: a working directory that exists on the machine but is hidden from the agent's
/// mount namespace (here bound over as systemd's sandboxing does) is undecided, not
/// `cwd-missing`: the entry stays queued. A directory missing everywhere is invalidated.
#[test]
fn d6_a_path_hidden_from_the_agents_namespace_is_undecided() {
    if !ready() {
        return;
    }
    let host = common::open_tempdir();
    std::fs::create_dir_all(host.path().join("home/proj")).unwrap();
    std::fs::create_dir(host.path().join("run")).unwrap();
    // As systemd hides a tree from a sandboxed service (ProtectHome=yes, InaccessiblePaths=):
    // an empty directory of its /run tmpfs bound over it.
    let ns = common::MountNs::start(
        host.path(),
        "mount -n -t tmpfs tmpfs \"$D/run\" && mkdir -p \"$D/run/systemd/inaccessible/dir\" && \
         mount -n --bind \"$D/run/systemd/inaccessible/dir\" \"$D/home\"",
    );
    let bus = PrivateBus::start();
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let mut env = std::collections::HashMap::new();
    env.insert("DBUS_SYSTEM_BUS_ADDRESS".to_string(), bus.address.clone());
    let agent = Agent::start(common::AgentSpec {
        args: vec![],
        env,
        notify: Some(n.path.clone()),
        journal: Some(j.path.clone()),
        toml: CONFIG.to_string(),
        wrapper: ns.wrapper(),
        ..common::AgentSpec::default()
    });
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    let s = Setup {
        bus,
        agent,
        _n: n,
        j,
    };
    let hidden = host.path().join("home/proj");
    let hidden = hidden.to_str().unwrap();
    let id = enqueue_at(&s, hidden, "hidden");
    let r = drain(&s, ROOT);
    assert_eq!(r["outcome"], "empty", "{r}");
    assert!(r["detail"].as_str().unwrap().contains("(H-5)"), "{r}");
    let e = entry(&s, &id);
    assert_eq!(e["status"], "queued", "{e}");
    s.j.wait_for("check-undecided audited", T, |d| {
        d.has("OUTLIVE_EVENT", "check-undecided")
    });
    let gone = host.path().join("gone");
    let gone_id = enqueue_at(&s, gone.to_str().unwrap(), "gone");
    let r = drain(&s, ROOT);
    assert_eq!(r["outcome"], "invalidated", "{r}");
    assert_eq!(entry(&s, &gone_id)["status"], "invalidated:cwd-missing");
    drop(ns);
}

fn enqueue_at(s: &Setup, cwd: &str, run: &str) -> String {
    let v = json(
        s,
        ROOT,
        &[
            "enqueue",
            "--run-id",
            run,
            "--evidence",
            "active-subagent",
            "--cwd",
            cwd,
            "--",
            "/bin/true",
        ],
    );
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_string()
}

const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Issue "Prove it", clock steps: the agent runs under libfaketime (preloaded into the agent
/// only; the machine's clock is never touched) and its wall clock is stepped by +25 h and then
/// -25 h while entries wait. Waiting time, TTL and backoff run on the boot clock: no entry
/// expires early, a backoff is neither cut short by the forward step nor stretched by the
/// backward one (the entry is retried once its 8 s have really passed, not stranded), and the
/// breaker stays closed.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn clock_steps_of_25_hours_expire_nothing_and_leave_backoff_and_breaker_alone() {
    if !ready()
        || !common::require(
            Path::new(FAKETIME).exists(),
            "libfaketime (Debian faketime)",
        )
    {
        return;
    }
    let bus = PrivateBus::with_users();
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let clock = common::open_tempdir();
    let step = clock.path().join("faketime");
    std::fs::write(&step, "+0\n").unwrap();
    let mut env = std::collections::HashMap::new();
    env.insert("DBUS_SYSTEM_BUS_ADDRESS".to_string(), bus.address.clone());
    env.insert("LD_PRELOAD".to_string(), FAKETIME.to_string());
    env.insert(
        "FAKETIME_TIMESTAMP_FILE".to_string(),
        step.to_string_lossy().into_owned(),
    );
    env.insert("FAKETIME_NO_CACHE".to_string(), "1".to_string());
    // The boot and monotonic clocks stay real, as a wall-clock step leaves them on a host.
    env.insert("FAKETIME_DONT_FAKE_MONOTONIC".to_string(), "1".to_string());
    let agent = Agent::start(common::AgentSpec {
        args: vec![],
        env,
        notify: Some(n.path.clone()),
        journal: Some(j.path.clone()),
        wrapper: bus.agent_wrapper(),
        // Ticks never revive (100 calm ticks needed); Drain (which skips only the calm gate)
        // does, one entry at a time, so each choice it makes can be checked.
        toml: "[queue]\ndry_run = false\nentry_ttl_hours = 1\n[drainer]\ninterval_sec = 1\n\
               grace_sec = 1\nrequired_calm_ticks = 100\nbackoff_base_sec = 8\nbreaker_threshold = 3\n"
            .into(),
        ..common::AgentSpec::default()
    });
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    let s = Setup {
        bus,
        agent,
        _n: n,
        j,
    };
    let wall = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    // An interactive run that fails, and four jobs that wait behind it.
    let fail = enqueue(&s, ROOT, "fails", &["/bin/sh", "-c", "exit 3"]);
    let jobs: Vec<String> = (0..4)
        .map(|i| {
            let job = format!("job-{i}");
            let v = json(
                &s,
                ROOT,
                &[
                    "enqueue",
                    "--job",
                    &job,
                    "--resume-on-reap",
                    "--evidence",
                    "structural-long-work",
                    "--cwd",
                    "/",
                    "--",
                    "/bin/sleep",
                    "20",
                ],
            );
            v["id"].as_str().unwrap().to_string()
        })
        .collect();
    let r = drain(&s, ROOT);
    assert_eq!(r["entry_id"], fail.as_str(), "{r}");
    // The attempt fails once its grace has passed: backoff 8 s from now.
    let end = Instant::now() + T;
    while entry(&s, &fail)["attempts"] != 1 {
        assert!(Instant::now() < end, "{}", entry(&s, &fail));
        std::thread::sleep(Duration::from_millis(100));
    }
    let failed_at = Instant::now();
    assert_eq!(entry(&s, &fail)["status"], "queued");
    // +25 h.
    std::fs::write(&step, "+25h\n").unwrap();
    std::thread::sleep(Duration::from_millis(1500)); // ticks run on the stepped clock
    let r = drain(&s, ROOT);
    assert_eq!(
        r["entry_id"],
        jobs[0].as_str(),
        "the failed run's backoff holds after a +25 h step: {r}"
    );
    let stepped = entry(&s, &jobs[0]);
    let at = stepped["history"].as_array().unwrap().last().unwrap()["at"]
        .as_i64()
        .unwrap();
    assert!(
        at - wall() > 24 * 3_600_000,
        "the agent's wall clock was stepped (faketime is in effect): {at} vs {}",
        wall()
    );
    for id in &jobs[1..] {
        let e = entry(&s, id);
        assert_eq!(e["status"], "queued", "nothing expires early: {e}");
        assert!(
            e["waited_ms"].as_u64().unwrap() < 60_000,
            "waiting time is boot-clock time: {e}"
        );
    }
    assert_eq!(entry(&s, &fail)["attempts"], 1);
    // -25 h (from the real time: 50 h back from the last step).
    std::fs::write(&step, "-25h\n").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    if failed_at.elapsed() < Duration::from_secs(7) {
        let r = drain(&s, ROOT);
        assert_eq!(
            r["entry_id"],
            jobs[1].as_str(),
            "the backoff still holds after a -25 h step: {r}"
        );
    }
    for id in &jobs[2..] {
        let e = entry(&s, id);
        assert_eq!(e["status"], "queued", "nothing expires: {e}");
    }
    // Once 8 s have really passed, the failed run is retried: not stranded 25 h away.
    while failed_at.elapsed() < Duration::from_millis(8500) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = drain(&s, ROOT);
    assert_eq!(
        r["entry_id"],
        fail.as_str(),
        "retried after its backoff: {r}"
    );
    let end = Instant::now() + T;
    while entry(&s, &fail)["attempts"] != 2 {
        assert!(Instant::now() < end, "{}", entry(&s, &fail));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Two failures in a row: the breaker (3) stays closed through both steps.
    let q = json(&s, ROOT, &["queue"]);
    assert!(
        q["queue"]["breaker_open_until"].is_null() || q["queue"]["breaker_open_until"] == 0,
        "{q}"
    );
    for id in &jobs[2..] {
        assert_eq!(entry(&s, id)["status"], "queued");
    }
}
