//! Files the agent writes as root (SPEC Q-14 as amended in §12; core review findings 5, 9, 13),
//! against the real agent:
//!
//! - a symbolic link at the lock path and at every temporary name an older agent used, and a
//!   FIFO at the lock path: the victims stay byte-identical, the agent stays up, and it says
//!   why the queue is disabled;
//! - a state directory others may write in disables the queue `state-dir-unsafe`, loudly, and
//!   nothing is written in it; fixed, it is taken by itself;
//! - a state directory that hangs (a stopped FUSE daemon) still lets the agent reach READY,
//!   with the queue disabled `acquisition-error` and a STATUS that says why;
//! - a change refused after its rename (the directory fsync failed, `fault-hooks`) is not
//!   found applied after a restart.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::bus::PrivateBus;
use common::{Agent, AgentSpec, MountNs, TestSocket, require, require_root, require_tools};
use nix::sys::signal::Signal;
use zbus::wire::Variant;

const T: Duration = Duration::from_secs(15);

fn status(d: &common::Datagram) -> String {
    d.get("STATUS").unwrap_or_default().to_string()
}

/// A private state directory (0700) under a fresh temporary directory.
fn private_state(dir: &Path) -> PathBuf {
    let s = dir.join("state");
    std::fs::create_dir_all(&s).unwrap();
    std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o700)).unwrap();
    s
}

fn victim(dir: &Path, name: &str) -> PathBuf {
    let v = dir.join(name);
    std::fs::write(&v, format!("precious {name}\n")).unwrap();
    v
}

async fn enqueue(conn: &zbus::Connection, run: &str) -> Result<(), String> {
    let d: HashMap<&str, Variant<'_>> = HashMap::from([
        ("run_id", Variant::from(run)),
        ("cwd", Variant::from("/")),
        ("exec", Variant::from(vec!["/bin/true".to_string()])),
        (
            "evidence",
            Variant::from(vec!["active-subagent".to_string()]),
        ),
    ]);
    conn.call_method(
        Some("org.outlive.Agent1"),
        "/org/outlive/Agent1/ResumeQueue",
        Some("org.outlive.ResumeQueue1"),
        "Enqueue",
        &(d,),
    )
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// §12 Q-14 (core review finding 5): a link at the lock path is neither followed nor
/// truncated, and a FIFO there never blocks the agent; both leave the queue disabled with the
/// reason, the agent up.
#[test]
fn q14_a_link_or_a_fifo_at_the_lock_path_is_refused_loudly_without_blocking() {
    for fifo in [false, true] {
        let d = common::open_tempdir();
        let state = private_state(d.path());
        let v = victim(d.path(), "victim");
        let lock = state.join("resume-queue.lock");
        if fifo {
            nix::unistd::mkfifo(&lock, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        } else {
            std::os::unix::fs::symlink(&v, &lock).unwrap();
        }
        let n = TestSocket::notify();
        let mut a = Agent::start(AgentSpec {
            notify: Some(n.path.clone()),
            state_dir: Some(state.clone()),
            toml: "[drainer]\ninterval_sec = 1\n".into(),
            ..AgentSpec::default()
        });
        let ready = n.wait_for("READY=1", T, |d| d.has("READY", "1"));
        let s = status(&ready);
        assert!(
            s.starts_with("DEGRADED: queue.resume off-runtime-divergent (acquisition-error)"),
            "fifo {fifo}: {s}"
        );
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            a.wait_exit(Duration::from_millis(10)),
            None,
            "the agent stays up"
        );
        assert_eq!(std::fs::read(&v).unwrap(), b"precious victim\n");
        let m = std::fs::symlink_metadata(&lock).unwrap();
        assert!(
            if fifo {
                m.file_type().is_fifo_like()
            } else {
                m.file_type().is_symlink()
            },
            "left as it was"
        );
        let why = a.stderr();
        assert!(
            why.contains(if fifo {
                "is a FIFO"
            } else {
                "is a symbolic link"
            }),
            "the reason names what stands there: {why}"
        );
    }
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}

impl FifoLike for std::fs::FileType {
    fn is_fifo_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_fifo(self)
    }
}

/// §12 Q-14 (core review finding 5): links planted at every temporary name an agent ever
/// used in the state directory (the lock's `resume-queue.lock.1.tmp` as pid 1, the state's
/// `resume-queue.json.tmp`, the boot snapshot's `.posture-boot.json.tmp`, a continuation's):
/// the agent starts, takes the lock, writes its state through a mutation and a reload, and no
/// victim changes; the state file stays a regular file.
#[tokio::test]
async fn q14_links_at_the_old_temporary_names_are_never_written_through() {
    if !require_root("owning the bus name, a pid namespace")
        || !require_tools(&["dbus-daemon", "unshare"])
    {
        return;
    }
    let bus = PrivateBus::start();
    let d = common::open_tempdir();
    let state = private_state(d.path());
    std::fs::create_dir(state.join("continuations")).unwrap();
    let mut victims = vec![];
    for name in [
        "resume-queue.lock.1.tmp",
        "resume-queue.json.tmp",
        ".posture-boot.json.tmp",
        "continuations/rq-0-1.txt.tmp",
    ] {
        let v = victim(d.path(), &name.replace('/', "-"));
        std::os::unix::fs::symlink(&v, state.join(name)).unwrap();
        victims.push(v);
    }
    let n = TestSocket::notify();
    let mut env = HashMap::new();
    env.insert("DBUS_SYSTEM_BUS_ADDRESS".to_string(), bus.address.clone());
    let a = Agent::start(AgentSpec {
        args: vec![],
        env,
        notify: Some(n.path.clone()),
        state_dir: Some(state.clone()),
        wrapper: vec!["unshare".into(), "--pid".into(), "--fork".into()],
        ..AgentSpec::default()
    });
    let ready = n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    assert!(status(&ready).contains("lock held"), "{ready:?}");
    let conn = common::bus::connect(&bus.address).await;
    enqueue(&conn, "written").await.expect("acknowledged");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(a.inner_pid()), Signal::SIGHUP).unwrap();
    n.wait_for("the reload", T, |d| d.has("READY", "1") && d.at > ready.at);
    for v in &victims {
        let name = v.file_name().unwrap().to_string_lossy().to_string();
        assert_eq!(
            std::fs::read_to_string(v).unwrap(),
            format!("precious {name}\n"),
            "{name} was written through"
        );
    }
    let m = std::fs::symlink_metadata(state.join("resume-queue.json")).unwrap();
    assert!(m.is_file(), "the state file is a regular file");
    assert!(
        std::fs::read_to_string(state.join("resume-queue.json"))
            .unwrap()
            .contains("\"written\"")
    );
}

/// §12 Q-14 (core review finding 5, "perm1"): a state directory others may write in is never
/// used: the queue is disabled `state-dir-unsafe`, loudly, nothing is written there, and once
/// fixed it is taken by itself (retried every tick).
#[test]
fn q14_a_state_directory_others_may_write_in_is_state_dir_unsafe() {
    let d = common::open_tempdir();
    let state = private_state(d.path());
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let mut a = Agent::start(AgentSpec {
        notify: Some(n.path.clone()),
        journal: Some(j.path.clone()),
        state_dir: Some(state.clone()),
        toml: "[drainer]\ninterval_sec = 1\n".into(),
        ..AgentSpec::default()
    });
    let ready = n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    assert!(
        status(&ready)
            .starts_with("DEGRADED: queue.resume off-runtime-divergent (state-dir-unsafe)"),
        "{ready:?}"
    );
    let ev = j.wait_for("queue-disabled", T, |d| {
        d.has("OUTLIVE_EVENT", "queue-disabled")
    });
    assert_eq!(ev.get("OUTLIVE_REASON"), Some("state-dir-unsafe"));
    assert!(
        ev.get("MESSAGE")
            .unwrap()
            .contains("writable by group or others"),
        "{ev:?}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        std::fs::read_dir(&state).unwrap().count(),
        0,
        "nothing written in an unsafe state directory"
    );
    assert_eq!(a.wait_exit(Duration::from_millis(10)), None);
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let end = Instant::now() + T;
    loop {
        n.drain(Duration::from_millis(50));
        if n.seen()
            .iter()
            .rev()
            .find_map(|d| d.get("STATUS").map(str::to_string))
            .is_some_and(|s| s.contains("lock held"))
        {
            break;
        }
        assert!(Instant::now() < end, "never took the lock once fixed");
    }
}

/// Issue 12 (security review finding 12): a runtime directory others may write in is refused
/// at start, with STATUS and ERRNO.
#[test]
fn x3_a_runtime_directory_others_may_write_in_is_a_start_error() {
    let d = common::open_tempdir();
    let run = d.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let n = TestSocket::notify();
    let mut a = Agent::start(AgentSpec {
        notify: Some(n.path.clone()),
        runtime_dir: Some(run.clone()),
        ..AgentSpec::default()
    });
    assert_ne!(a.wait_exit(T), Some(0));
    let fatal = n.wait_for("ERRNO", T, |d| d.get("ERRNO").is_some());
    assert!(
        status(&fatal).contains("writable by group or others"),
        "{fatal:?}"
    );
}

/// Core review finding 9: a state directory that hangs (its FUSE daemon stopped) does not hang
/// the start: READY comes, the queue disabled `acquisition-error`, the STATUS saying why; when
/// the filesystem answers again, the lock is taken by itself.
#[test]
fn l3_a_hung_state_directory_still_reaches_ready_disabled_and_recovers() {
    if !require_root("mounting FUSE")
        || !require_tools(&["unshare", "nsenter", "bindfs", "fusermount3"])
        || !require(Path::new("/dev/fuse").exists(), "/dev/fuse (FUSE)")
    {
        return;
    }
    let d = common::open_tempdir();
    let ns = MountNs::start(
        d.path(),
        "mkdir -p $D/backing $D/mnt && chmod 700 $D/backing && (bindfs -f $D/backing $D/mnt &) && \
         for i in $(seq 100); do grep -q \" $D/mnt \" /proc/self/mountinfo && break; sleep 0.05; done",
    );
    let state = d.path().join("mnt");
    let (code, pid, err) = ns.sh("pgrep -f 'bindfs -f'");
    assert_eq!(code, 0, "bindfs: {err}");
    let bindfs = pid.trim().lines().next().unwrap().to_string();
    let (code, _, err) = ns.sh(&format!("kill -STOP {bindfs}"));
    assert_eq!(code, 0, "{err}");
    let n = TestSocket::notify();
    let started = Instant::now();
    let mut a = Agent::start(AgentSpec {
        notify: Some(n.path.clone()),
        state_dir: Some(state.clone()),
        wrapper: ns.wrapper(),
        toml: "[drainer]\ninterval_sec = 1\n[facts]\nstatfs_timeout_ms = 500\n".into(),
        ..AgentSpec::default()
    });
    let ready = n.wait_for("READY=1", Duration::from_secs(30), |d| d.has("READY", "1"));
    let s = status(&ready);
    assert!(
        s.starts_with("DEGRADED: queue.resume off-runtime-divergent (acquisition-error)"),
        "{s}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "READY came after {:?}",
        started.elapsed()
    );
    assert!(
        a.stderr().contains("did not answer"),
        "the reason says the state directory did not answer: {}",
        a.stderr()
    );
    assert_eq!(a.wait_exit(Duration::from_millis(10)), None);
    let (code, _, err) = ns.sh(&format!("kill -CONT {bindfs}"));
    assert_eq!(code, 0, "{err}");
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        n.drain(Duration::from_millis(50));
        if n.seen()
            .iter()
            .rev()
            .find_map(|d| d.get("STATUS").map(str::to_string))
            .is_some_and(|s| s.contains("lock held"))
        {
            break;
        }
        assert!(Instant::now() < end, "never recovered: {}", a.stderr());
    }
}

/// Issue "Keep the promise under faults", 7 (core review finding 13), against the agent: the
/// state directory's fsync fails after the state file was renamed (`fault-hooks`). The enqueue
/// is refused PersistFailed, and after a restart it is not there.
#[tokio::test]
async fn q14_a_refused_change_is_not_found_applied_after_a_restart() {
    if !require_root("owning the bus name") || !require_tools(&["dbus-daemon"]) {
        return;
    }
    let bus = PrivateBus::start();
    let d = common::open_tempdir();
    let state = private_state(d.path());
    let spec = |n: &TestSocket| {
        let mut env = HashMap::new();
        env.insert("DBUS_SYSTEM_BUS_ADDRESS".to_string(), bus.address.clone());
        AgentSpec {
            args: vec![],
            env,
            notify: Some(n.path.clone()),
            state_dir: Some(state.clone()),
            ..AgentSpec::default()
        }
    };
    let n = TestSocket::notify();
    let mut a = Agent::start(spec(&n));
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    let conn = common::bus::connect(&bus.address).await;
    enqueue(&conn, "kept").await.expect("acknowledged");
    let hook = a.runtime_dir.join("fault-dir-sync-fails-resume-queue.json");
    std::fs::write(&hook, b"").unwrap();
    let e = enqueue(&conn, "refused").await.expect_err("refused");
    assert!(e.contains("PersistFailed"), "{e}");
    std::fs::remove_file(&hook).unwrap();
    a.signal(Signal::SIGKILL);
    a.wait_exit(T);
    drop(a);
    let n2 = TestSocket::notify();
    let _b = Agent::start(spec(&n2));
    n2.wait_for("READY=1", T, |d| d.has("READY", "1"));
    let runs: Vec<String> =
        outlive::queue::store::parse(&std::fs::read(state.join("resume-queue.json")).unwrap())
            .unwrap()
            .entries
            .into_iter()
            .filter_map(|e| e.run_id)
            .collect();
    assert_eq!(runs, vec!["kept"], "the refused change is not there");
}

/// §12 H-1/L-4 (core review findings 2 and 10): `outlivectl lock`, the tool meant to explain
/// a refusal, never panics on the reviewer's malformed record and never blocks on a FIFO at
/// the lock path; `lock clear` refuses a FIFO without blocking.
#[test]
fn l8_outlivectl_lock_never_panics_and_never_blocks_on_a_fifo() {
    let d = common::open_tempdir();
    let state = private_state(d.path());
    let lock = state.join("resume-queue.lock");
    let bad = "01234567-89ab-cdef-0123-4567-9abcdef";
    let rec = serde_json::json!({"version": 1, "host_id": bad, "hostname": "other",
        "boot_id": bad, "pid": 4194000, "acquired_at": 1});
    std::fs::write(&lock, format!("{rec}\n")).unwrap();
    let ctl = |args: &[&str]| {
        let mut c = std::process::Command::new("timeout");
        c.arg("10")
            .arg(common::outlivectl())
            .args(args)
            .arg("--state-dir")
            .arg(&state)
            .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent");
        common::run(&mut c)
    };
    let (code, out, err) = ctl(&["--json", "lock"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("panicked"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["decision"]["reason"], "foreign-host", "{v}");
    std::fs::remove_file(&lock).unwrap();
    nix::unistd::mkfifo(&lock, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let started = Instant::now();
    let (code, out, err) = ctl(&["--json", "lock"]);
    assert_ne!(code, 124, "outlivectl lock blocked on the FIFO");
    assert!(started.elapsed() < Duration::from_secs(5));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    assert!(
        v["decision"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("is a FIFO")),
        "{out}{err}"
    );
    if common::is_root() {
        let (code, out, err) = ctl(&["lock", "clear"]);
        assert_ne!(code, 124, "lock clear blocked on the FIFO");
        assert_eq!(code, 1, "{out}{err}");
        assert!(err.contains("is a FIFO"), "{err}");
        assert!(
            std::fs::symlink_metadata(&lock)
                .unwrap()
                .file_type()
                .is_fifo_like(),
            "left alone"
        );
    }
}

/// §12 and issue 12, 4 (security review finding 3): the metrics textfile. In the directory the
/// agent owns (`<runtime_dir>/metrics`, created root 0755) it is written every tick; a link
/// planted at the file or at the temporary names an older agent used, and a FIFO there, are
/// never followed and never block the agent; the queue's state is untouched. A directory others
/// may write in is refused (`metrics-dir-unsafe`), in the journal and the posture.
#[test]
fn x5_the_metrics_file_never_follows_or_blocks_on_what_is_planted() {
    let d = common::open_tempdir();
    let state = private_state(d.path());
    let run = d.path().join("run");
    let prom = run.join("metrics/outlive.prom");
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let mut a = Agent::start(AgentSpec {
        notify: Some(n.path.clone()),
        journal: Some(j.path.clone()),
        state_dir: Some(state.clone()),
        runtime_dir: Some(run.clone()),
        toml: format!(
            "[drainer]\ninterval_sec = 1\n[metrics]\ntextfile = {:?}\n",
            prom.display().to_string()
        ),
        ..AgentSpec::default()
    });
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    let end = Instant::now() + T;
    while !prom.exists() {
        assert!(Instant::now() < end, "no metrics file: {}", a.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = std::fs::metadata(run.join("metrics")).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o755);
    let before = std::fs::read(state.join("resume-queue.json")).unwrap();
    let pid = a.pid();
    for name in [
        format!(".outlive.prom.{pid}.tmp"),
        ".outlive.prom.1.tmp".into(),
    ] {
        std::os::unix::fs::symlink(
            state.join("resume-queue.json"),
            run.join("metrics").join(name),
        )
        .unwrap();
    }
    nix::unistd::mkfifo(
        &run.join(format!("metrics/.outlive.prom.{}.tmp", pid + 1)),
        nix::sys::stat::Mode::from_bits_truncate(0o666),
    )
    .unwrap();
    std::fs::remove_file(&prom).unwrap();
    std::os::unix::fs::symlink(state.join("resume-queue.json"), &prom).unwrap();
    // A few ticks: written again as a regular file, nothing followed, the agent not wedged.
    let end = Instant::now() + T;
    while !std::fs::symlink_metadata(&prom).unwrap().is_file() {
        assert!(Instant::now() < end, "the metrics file stays a link");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        std::fs::read(state.join("resume-queue.json")).unwrap(),
        before,
        "the queue state was written through a planted link"
    );
    assert!(
        std::fs::read_to_string(&prom)
            .unwrap()
            .contains("outlive_info")
    );
    assert_eq!(a.wait_exit(Duration::from_millis(10)), None);
    drop(a);

    // A directory others may write in: refused, said so.
    let open = d.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let j2 = TestSocket::journal();
    let n2 = TestSocket::notify();
    let _b = Agent::start(AgentSpec {
        notify: Some(n2.path.clone()),
        journal: Some(j2.path.clone()),
        state_dir: Some(state.clone()),
        toml: format!(
            "[drainer]\ninterval_sec = 1\n[metrics]\ntextfile = {:?}\n",
            open.join("outlive.prom").display().to_string()
        ),
        ..AgentSpec::default()
    });
    let ev = j2.wait_for("metrics-write-failed", T, |d| {
        d.has("OUTLIVE_EVENT", "metrics-write-failed")
    });
    assert_eq!(
        ev.get("OUTLIVE_REASON"),
        Some("metrics-dir-unsafe"),
        "{ev:?}"
    );
    assert!(!open.join("outlive.prom").exists());
}

/// Issue 15, 3: a textfile the agent cannot use says why, in the journal and in the posture
/// (`systemctl status` names the row and its reason): a directory others may write in is
/// `metrics-dir-unsafe`, a write that fails (here: a directory sits at the file's path) is
/// `metrics-write-failed`.
#[test]
fn x5_an_unusable_textfile_shows_in_the_journal_and_the_posture() {
    let d = common::open_tempdir();
    let unsafe_dir = d.path().join("open");
    std::fs::create_dir(&unsafe_dir).unwrap();
    std::fs::set_permissions(&unsafe_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let safe_dir = d.path().join("safe");
    std::fs::create_dir(&safe_dir).unwrap();
    std::fs::set_permissions(&safe_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(safe_dir.join("outlive.prom")).unwrap();
    for (path, reason) in [
        (unsafe_dir.join("outlive.prom"), "metrics-dir-unsafe"),
        (safe_dir.join("outlive.prom"), "metrics-write-failed"),
    ] {
        let state = private_state(&d.path().join(reason));
        let (n, j) = (TestSocket::notify(), TestSocket::journal());
        let _a = Agent::start(AgentSpec {
            notify: Some(n.path.clone()),
            journal: Some(j.path.clone()),
            state_dir: Some(state),
            toml: format!(
                "[drainer]\ninterval_sec = 1\n[posture]\nanomaly_grace_sec = 0\n[metrics]\ntextfile = {:?}\n",
                path.display().to_string()
            ),
            ..AgentSpec::default()
        });
        let ev = j.wait_for("metrics-write-failed", T, |d| {
            d.has("OUTLIVE_EVENT", "metrics-write-failed")
        });
        assert_eq!(ev.get("OUTLIVE_REASON"), Some(reason), "{ev:?}");
        let want = format!("metrics.textfile off-runtime-divergent ({reason})");
        n.wait_for(&want, T, |d| {
            d.get("STATUS")
                .is_some_and(|s| s.starts_with("DEGRADED:") && s.contains(&want))
        });
    }
}

/// L-6 as amended (issue 15, 2): while the queue is disabled (here: a lock held by another
/// host), the metrics still count the entries on disk, read and never written, and say what an
/// alert needs: the queue disabled and why, degraded, how long the oldest entry has waited. The
/// lock and the state are left as they were.
#[test]
fn l6_metrics_count_the_entries_on_disk_while_the_queue_is_disabled() {
    let d = common::open_tempdir();
    let state = private_state(d.path());
    let mut st = outlive::queue::store::State::empty();
    st.entries.push(
        serde_json::from_value(serde_json::json!({
            "id": "rq-a-1", "run_id": "run-7", "session": "agent 7",
            "target": {"exec": ["/bin/true"]}, "uid": 0, "gid": 0, "cwd": "/",
            "class": "interactive", "status": "queued", "reaped_at": 1, "queued_at": 1,
            "reason": "oom", "evidence": ["active-subagent"]
        }))
        .unwrap(),
    );
    let state_file = state.join("resume-queue.json");
    std::fs::write(&state_file, serde_json::to_vec(&st).unwrap()).unwrap();
    std::fs::set_permissions(&state_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let rec = serde_json::json!({
        "version": 1, "host_id": "0123456789abcdef0123456789abcdef", "hostname": "other-host",
        "boot_id": "fedcba9876543210fedcba9876543210", "pid": 4242, "pid_start": 1,
        "acquired_at": 1, "agent_version": "0.0.0"
    });
    let lock = state.join("resume-queue.lock");
    std::fs::write(&lock, format!("{rec}\n")).unwrap();
    let before = (
        std::fs::read(&state_file).unwrap(),
        std::fs::read(&lock).unwrap(),
    );
    let run = d.path().join("run");
    let prom = run.join("metrics/outlive.prom");
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let a = Agent::start(AgentSpec {
        notify: Some(n.path.clone()),
        journal: Some(j.path.clone()),
        state_dir: Some(state.clone()),
        runtime_dir: Some(run),
        toml: format!(
            "[drainer]\ninterval_sec = 1\n[metrics]\ntextfile = {:?}\n",
            prom.display().to_string()
        ),
        ..AgentSpec::default()
    });
    j.wait_for("queue-disabled", T, |d| {
        d.has("OUTLIVE_REASON", "foreign-host")
    });
    let end = Instant::now() + T;
    loop {
        let text = std::fs::read_to_string(&prom).unwrap_or_default();
        if text.contains("outlive_queue_entries{status=\"queued\"} 1")
            && text.contains("outlive_queue_enabled{reason=\"foreign-host\"} 0")
            && text.contains("outlive_degraded 1")
            && !text.contains("outlive_queue_oldest_waiting_seconds 0.000")
        {
            break;
        }
        assert!(
            Instant::now() < end,
            "the metrics do not count the queued entry on disk:\n{text}\n{}",
            a.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = (
        std::fs::read(&state_file).unwrap(),
        std::fs::read(&lock).unwrap(),
    );
    assert!(
        before == after,
        "the disabled agent wrote the state or the lock"
    );
}
