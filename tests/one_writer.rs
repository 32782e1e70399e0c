//! Exactly one writer (SPEC L-2, L-6, L-8 as amended in §12; core review findings 3 and 4),
//! against real agents on private buses:
//!
//! - two agents, each pid 1 in a pid namespace of its own (so both would name a temporary
//!   file `resume-queue.lock.1.tmp`), start together on one state directory, 100 rounds: every
//!   mutation either acknowledged is in the state file afterwards, and at most one of them
//!   acknowledged anything;
//! - the lock file deleted under a running holder, then a second agent started: no
//!   acknowledged mutation is missing afterwards;
//! - `outlivectl lock clear` racing a starting agent: the agent never ends up holding a lock
//!   file that is no longer the one its path names, and what it acknowledges is kept.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::bus::PrivateBus;
use common::{Agent, AgentSpec, TestSocket, require_root, require_tools};
use zbus::wire::Variant;

const T: Duration = Duration::from_secs(15);

fn ready() -> bool {
    require_root("owning the bus name, pid namespaces")
        && require_tools(&["dbus-daemon", "unshare"])
}

/// An agent on `bus`, as pid 1 of a pid namespace of its own.
fn agent_in_pidns(bus: &PrivateBus, state: &Path, notify: &TestSocket) -> Agent {
    let mut env = HashMap::new();
    env.insert("DBUS_SYSTEM_BUS_ADDRESS".to_string(), bus.address.clone());
    Agent::start(AgentSpec {
        args: vec![],
        env,
        notify: Some(notify.path.clone()),
        state_dir: Some(state.to_path_buf()),
        wrapper: vec![
            "unshare".into(),
            "--pid".into(),
            "--fork".into(),
            "--kill-child".into(),
        ],
        toml: "[queue]\nmax_size = 10000\n[drainer]\ninterval_sec = 1\n".into(),
        ..AgentSpec::default()
    })
}

/// `Enqueue` of a run: Ok(id) when acknowledged, Err(why) otherwise (refused, no agent yet).
async fn enqueue(conn: &zbus::Connection, run: &str) -> Result<String, String> {
    let d: HashMap<&str, Variant<'_>> = HashMap::from([
        ("run_id", Variant::from(run)),
        ("cwd", Variant::from("/")),
        ("exec", Variant::from(vec!["/bin/true".to_string()])),
        (
            "evidence",
            Variant::from(vec!["active-subagent".to_string()]),
        ),
    ]);
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        conn.call_method(
            Some("org.outlive.Agent1"),
            "/org/outlive/Agent1/ResumeQueue",
            Some("org.outlive.ResumeQueue1"),
            "Enqueue",
            &(d,),
        ),
    )
    .await
    .map_err(|_| "timeout".to_string())?
    .map_err(|e| e.to_string())?;
    let (admitted, why, id): (bool, String, String) =
        reply.body().deserialize().map_err(|e| e.to_string())?;
    if admitted && why.is_empty() {
        Ok(id)
    } else {
        Err(why)
    }
}

/// Enqueue runs `<prefix>-<n>` as fast as the agent answers until `until`; the acknowledged
/// (run, id) pairs.
async fn flood(address: String, prefix: String, until: Instant) -> Vec<(String, String)> {
    let conn = common::bus::connect(&address).await;
    let mut acked = vec![];
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        let run = format!("{prefix}-{n}");
        if let Ok(id) = enqueue(&conn, &run).await {
            acked.push((run, id));
        }
    }
    acked
}

/// The run ids of the entries in the state file.
fn runs_on_disk(state: &Path) -> Vec<String> {
    let bytes = std::fs::read(state.join("resume-queue.json")).unwrap_or_default();
    if bytes.is_empty() {
        return vec![];
    }
    outlive::queue::store::parse(&bytes)
        .expect("the state file parses")
        .entries
        .into_iter()
        .filter_map(|e| e.run_id)
        .collect()
}

/// L-2 and L-6 as amended (core review finding 3): two agents, each pid 1 in its own pid
/// namespace, start together on one state directory. Whatever either acknowledged is in the
/// state file, and at most one of them acknowledged anything.
#[tokio::test]
async fn l2_l6_two_agents_in_their_own_pid_namespaces_never_both_write() {
    if !ready() {
        return;
    }
    let rounds: usize = std::env::var("OUTLIVE_PIDNS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let (bus_a, bus_b) = (PrivateBus::start(), PrivateBus::start());
    for round in 0..rounds {
        let dir = common::open_tempdir();
        let state = dir.path().join("state");
        let (na, nb) = (TestSocket::notify(), TestSocket::notify());
        // Clients first, so that the first calls arrive the moment each agent owns its name.
        let until = Instant::now() + Duration::from_millis(400);
        let fa = tokio::spawn(flood(bus_a.address.clone(), format!("a{round}"), until));
        let fb = tokio::spawn(flood(bus_b.address.clone(), format!("b{round}"), until));
        let a = agent_in_pidns(&bus_a, &state, &na);
        let b = agent_in_pidns(&bus_b, &state, &nb);
        let (acked_a, acked_b) = (fa.await.unwrap(), fb.await.unwrap());
        drop((a, b));
        let on_disk = runs_on_disk(&state);
        for (run, id) in acked_a.iter().chain(acked_b.iter()) {
            assert!(
                on_disk.contains(run),
                "round {round}: {run} ({id}) was acknowledged and is not in the state file \
                 (a: {} acknowledged, b: {})",
                acked_a.len(),
                acked_b.len()
            );
        }
        assert!(
            acked_a.is_empty() || acked_b.is_empty(),
            "round {round}: both agents acknowledged mutations ({} and {}): two writers",
            acked_a.len(),
            acked_b.len()
        );
    }
}

/// L-6 as amended (core review finding 4): the lock file deleted under a running holder, a
/// second agent started on the same state directory: the first one notices before its next
/// write and refuses (`QueueDisabled`), so nothing either acknowledged is lost.
#[tokio::test]
async fn l6_a_lock_deleted_under_its_holder_loses_no_acknowledged_mutation() {
    if !ready() {
        return;
    }
    let (bus_a, bus_b) = (PrivateBus::start(), PrivateBus::start());
    let dir = common::open_tempdir();
    let state = dir.path().join("state");
    let (na, nb) = (TestSocket::notify(), TestSocket::notify());
    let mut env = HashMap::new();
    env.insert("DBUS_SYSTEM_BUS_ADDRESS".to_string(), bus_a.address.clone());
    let spec = |bus: &PrivateBus, n: &TestSocket| {
        let mut env = HashMap::new();
        env.insert("DBUS_SYSTEM_BUS_ADDRESS".to_string(), bus.address.clone());
        AgentSpec {
            args: vec![],
            env,
            notify: Some(n.path.clone()),
            state_dir: Some(state.clone()),
            // Ticks far apart: the first agent's heartbeat does not find the loss first.
            toml: "[drainer]\ninterval_sec = 240\n".into(),
            ..AgentSpec::default()
        }
    };
    let _a = Agent::start(spec(&bus_a, &na));
    na.wait_for("READY=1", T, |d| d.has("READY", "1"));
    let ca = common::bus::connect(&bus_a.address).await;
    let mut acked = vec![];
    acked.push(
        enqueue(&ca, "before")
            .await
            .map(|_| "before")
            .expect("held"),
    );
    std::fs::remove_file(state.join("resume-queue.lock")).unwrap();
    let _b = Agent::start(spec(&bus_b, &nb));
    let ready_b = nb.wait_for("READY=1", T, |d| d.has("READY", "1"));
    assert!(
        ready_b.get("STATUS").unwrap().contains("lock held"),
        "{ready_b:?}"
    );
    let cb = common::bus::connect(&bus_b.address).await;
    let through_a = enqueue(&ca, "through-a").await;
    let through_b = enqueue(&cb, "through-b").await;
    if through_a.is_ok() {
        acked.push("through-a");
    }
    if through_b.is_ok() {
        acked.push("through-b");
    }
    let e = through_a.expect_err("the first agent lost its lock: it must refuse");
    assert!(
        e.contains("lock-lost") || e.contains("QueueDisabled"),
        "{e}"
    );
    let on_disk = runs_on_disk(&state);
    for run in &acked {
        assert!(
            on_disk.contains(&run.to_string()),
            "{run} was acknowledged and is missing: {on_disk:?}"
        );
    }
    assert!(
        acked.contains(&"through-b"),
        "the second agent holds the lock"
    );
}

/// The pids holding a flock on the file `path` names now (from /proc/locks).
fn holders_of(path: &Path) -> Vec<i64> {
    match std::fs::File::open(path) {
        Ok(f) => outlive::queue::lock::flock_holders(&f).unwrap_or_default(),
        Err(_) => vec![],
    }
}

/// L-8 as amended: `outlivectl lock clear` racing a starting agent. Whichever wins, the agent
/// never holds a lock file its path no longer names: once it says "lock held", the file at the
/// lock path is the one it holds the flock of, and what it acknowledges is kept.
#[tokio::test]
async fn l8_lock_clear_racing_a_starting_agent_leaves_one_true_holder() {
    if !ready() {
        return;
    }
    let bus = PrivateBus::start();
    for round in 0..12u64 {
        let dir = common::open_tempdir();
        let state: PathBuf = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        // A lock left by this host's previous agent (a crash): the agent reclaims it, and
        // `lock clear` would remove it.
        let id = outlive::facts::identity::identity().unwrap();
        let rec = serde_json::json!({"version": 1, "host_id": id.host_id.to_hex(),
            "hostname": id.hostname, "pid": 4194000, "acquired_at": 1});
        std::fs::write(state.join("resume-queue.lock"), format!("{rec}\n")).unwrap();
        let n = TestSocket::notify();
        let mut env = HashMap::new();
        env.insert("DBUS_SYSTEM_BUS_ADDRESS".to_string(), bus.address.clone());
        let clear = {
            let state = state.clone();
            let address = bus.address.clone();
            std::thread::spawn(move || {
                // Start at varying moments of the agent's start.
                std::thread::sleep(Duration::from_millis(round * 3));
                common::run(
                    std::process::Command::new(common::outlivectl())
                        .env("DBUS_SYSTEM_BUS_ADDRESS", address)
                        .args(["lock", "clear", "--state-dir"])
                        .arg(&state),
                )
            })
        };
        let agent = Agent::start(AgentSpec {
            args: vec![],
            env,
            notify: Some(n.path.clone()),
            state_dir: Some(state.clone()),
            toml: "[drainer]\ninterval_sec = 1\n".into(),
            ..AgentSpec::default()
        });
        let (code, out, err) = clear.join().unwrap();
        assert!(
            code == 0 || err.contains("live holder") || err.contains("no lock file"),
            "round {round}: lock clear: {code} {out} {err}"
        );
        // Whatever happened, within a few ticks the agent holds the lock its path names.
        n.wait_for("READY=1", T, |d| d.has("READY", "1"));
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            n.drain(Duration::from_millis(50));
            let held = n
                .seen()
                .iter()
                .rev()
                .find_map(|d| d.get("STATUS").map(str::to_string))
                .is_some_and(|s| s.contains("lock held"));
            if held && holders_of(&state.join("resume-queue.lock")) == vec![agent.pid() as i64] {
                break;
            }
            assert!(
                Instant::now() < end,
                "round {round}: the agent does not hold the file its lock path names (holders {:?}, \
                 clear said {code} {out} {err})",
                holders_of(&state.join("resume-queue.lock"))
            );
        }
        let conn = common::bus::connect(&bus.address).await;
        enqueue(&conn, &format!("kept-{round}"))
            .await
            .expect("acknowledged");
        assert!(runs_on_disk(&state).contains(&format!("kept-{round}")));
        drop(agent);
    }
}
