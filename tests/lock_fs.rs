//! The host lock on real filesystems (SPEC L-4, L-5, H-3), as root in a private mount
//! namespace: a stale foreign lock on ext4 is taken over with `auto_heal = "on"`; the same lock
//! on a FUSE mount (bindfs) is declined with the filesystem's class in the reason and the holder
//! never probed; with `observe` the lock file is byte-identical afterwards.

mod common;

use std::time::Duration;

use common::{
    Agent, AgentSpec, MountNs, TestSocket, fs_image, require, require_root, require_tools,
};

const T: Duration = Duration::from_secs(15);

fn ready() -> bool {
    require_root("mounting filesystems")
        && require_tools(&["unshare", "nsenter", "mkfs.ext4", "bindfs", "fusermount3"])
        && require(
            std::path::Path::new("/dev/fuse").exists(),
            "/dev/fuse (FUSE)",
        )
}

/// A stale lock left by another host: another host id and boot id, a pid that is gone, and a
/// heartbeat 10 minutes old.
fn foreign_record() -> String {
    serde_json::json!({
        "version": 1, "host_id": "0123456789abcdef0123456789abcdef", "hostname": "old-host",
        "boot_id": "fedcba9876543210fedcba9876543210", "pid": 4194000, "pid_start": 12345, "pid_ns": 4026531836u64,
        "acquired_at": 1_700_000_000_000u64, "agent_version": "0.0.9"
    })
    .to_string()
        + "\n"
}

/// Mount `what` and leave the foreign lock in `<mount>/state`, its mtime 10 minutes ago.
fn setup(dir: &std::path::Path, fuse: bool) -> (MountNs, std::path::PathBuf) {
    std::fs::write(dir.join("lock"), foreign_record()).unwrap();
    let script = if fuse {
        fs_image(&dir.join("backing.img"), 64, &["mkfs.ext4", "-q", "-F"]);
        "mkdir -p $D/backing $D/mnt && mount -o loop $D/backing.img $D/backing && \
         (bindfs -f $D/backing $D/mnt &) && \
         for i in $(seq 100); do grep -q \" $D/mnt \" /proc/self/mountinfo && break; sleep 0.05; done"
    } else {
        fs_image(&dir.join("fs.img"), 64, &["mkfs.ext4", "-q", "-F"]);
        "mkdir -p $D/mnt && mount -o loop $D/fs.img $D/mnt"
    };
    let ns = MountNs::start(
        dir,
        &format!(
            "{script}\nmkdir -p $D/mnt/state && cp $D/lock $D/mnt/state/resume-queue.lock && touch -d '10 minutes ago' $D/mnt/state/resume-queue.lock"
        ),
    );
    (ns, dir.join("mnt/state"))
}

fn agent(
    ns: &MountNs,
    state: &std::path::Path,
    heal: &str,
    n: &TestSocket,
    j: &TestSocket,
) -> Agent {
    Agent::start(AgentSpec {
        notify: Some(n.path.clone()),
        journal: Some(j.path.clone()),
        wrapper: ns.wrapper(),
        state_dir: Some(state.to_path_buf()),
        toml: format!("[queue.lock]\nauto_heal = \"{heal}\"\n"),
        ..AgentSpec::default()
    })
}

fn lock_stat(ns: &MountNs, state: &std::path::Path) -> String {
    let (code, out, err) = ns.sh(&format!(
        "cat {0}/resume-queue.lock; stat -c '%s %Y %i' {0}/resume-queue.lock",
        state.display()
    ));
    assert_eq!(code, 0, "{err}");
    out
}

#[test]
fn l5_stale_foreign_lock_on_ext4_is_taken_over_with_auto_heal_on() {
    if !ready() {
        return;
    }
    let d = common::open_tempdir();
    let (ns, state) = setup(d.path(), false);
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let _a = agent(&ns, &state, "on", &n, &j);
    let ready = n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    assert!(
        ready.get("STATUS").unwrap().contains("lock held"),
        "{ready:?}"
    );
    let healed = j.wait_for("lock-auto-healed", T, |d| {
        d.has("OUTLIVE_EVENT", "lock-auto-healed")
    });
    assert_eq!(
        healed.get("MESSAGE_ID"),
        Some("fab81cdfd22b43b3b0c2692062051f4b")
    );
    assert_eq!(healed.get("PRIORITY"), Some("5"));
    assert_eq!(healed.get("OUTLIVE_FROM_HOST"), Some("old-host"));
    assert_eq!(
        healed.get("OUTLIVE_TO_HOST"),
        Some(common::host_json(None)["hostname"].as_str().unwrap())
    );
    let now = lock_stat(&ns, &state);
    assert!(!now.contains("old-host"), "the lock is ours now: {now}");
    assert!(
        now.contains(common::host_json(None)["host_id"].as_str().unwrap()),
        "{now}"
    );
}

#[test]
fn l4_row8_foreign_lock_on_fuse_is_declined_and_the_holder_never_probed() {
    if !ready() {
        return;
    }
    let d = common::open_tempdir();
    let (ns, state) = setup(d.path(), true);
    let before = lock_stat(&ns, &state);
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let _a = agent(&ns, &state, "on", &n, &j);
    let ready = n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    assert!(
        ready
            .get("STATUS")
            .unwrap()
            .starts_with("DEGRADED: queue.resume off-runtime-divergent (foreign-host)"),
        "{ready:?}"
    );
    let e = j.wait_for("queue-disabled", T, |d| {
        d.has("OUTLIVE_EVENT", "queue-disabled")
    });
    assert_eq!(e.get("OUTLIVE_ROW"), Some("8"));
    assert_eq!(e.get("OUTLIVE_CLASS"), Some("unknown"));
    assert!(
        e.get("MESSAGE")
            .unwrap()
            .contains("auto-heal declined: state directory is unknown"),
        "{e:?}"
    );
    // Never probed: no liveness and no heartbeat facts were gathered.
    assert_eq!(e.get("OUTLIVE_HOLDER_ALIVE"), None, "{e:?}");
    assert_eq!(e.get("OUTLIVE_HEARTBEAT_AGE_MS"), None, "{e:?}");
    assert_eq!(
        lock_stat(&ns, &state),
        before,
        "the lock on the shared volume is untouched"
    );
}

#[test]
fn l4_row11_observe_reports_and_leaves_the_lock_byte_identical() {
    if !ready() {
        return;
    }
    let d = common::open_tempdir();
    let (ns, state) = setup(d.path(), false);
    let before = lock_stat(&ns, &state);
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let a = agent(&ns, &state, "observe", &n, &j);
    let ready = n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    assert!(
        ready
            .get("STATUS")
            .unwrap()
            .starts_with("DEGRADED: queue.resume off-runtime-divergent (would-auto-heal)"),
        "{ready:?}"
    );
    let e = j.wait_for("queue-disabled", T, |d| {
        d.has("OUTLIVE_EVENT", "queue-disabled")
    });
    assert_eq!(e.get("OUTLIVE_REASON"), Some("would-auto-heal"));
    assert_eq!(e.get("OUTLIVE_CLASS"), Some("local-persistent"));
    assert_eq!(e.get("OUTLIVE_HOLDER_ALIVE"), Some("false"));
    assert!(
        e.get("OUTLIVE_HEARTBEAT_AGE_MS")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 600_000,
        "{e:?}"
    );
    a.signal(nix::sys::signal::Signal::SIGHUP);
    n.wait_for("READY=1 after a reload", T, |d| d.has("RELOADING", "1"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        lock_stat(&ns, &state),
        before,
        "bytes, size, mtime and inode unchanged"
    );
    let (_, listing, _) = ns.sh(&format!("ls -A {}", state.display()));
    assert_eq!(
        listing.trim(),
        "resume-queue.lock",
        "nothing else was written under the state directory"
    );
}

/// L-5, the takeover race: two agents heal the same stale foreign lock at the same moment.
/// Exactly one wins and audits the heal; the other reports `live-holder` and never overwrote:
/// the lock's bytes are the winner's record.
#[test]
fn l5_two_agents_healing_one_stale_lock_at_once_exactly_one_wins() {
    if !ready() {
        return;
    }
    let rounds: usize = std::env::var("OUTLIVE_TAKEOVER_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    for round in 0..rounds {
        let d = common::open_tempdir();
        let (ns, state) = setup(d.path(), false);
        let socks: Vec<(TestSocket, TestSocket)> = (0..2)
            .map(|_| (TestSocket::notify(), TestSocket::journal()))
            .collect();
        let agents: Vec<Agent> = socks
            .iter()
            .map(|(n, j)| agent(&ns, &state, "on", n, j))
            .collect();
        let statuses: Vec<String> = socks
            .iter()
            .map(|(n, _)| {
                n.wait_for("READY=1", T, |d| d.has("READY", "1"))
                    .get("STATUS")
                    .unwrap()
                    .to_string()
            })
            .collect();
        let winners: Vec<usize> = (0..2)
            .filter(|&i| statuses[i].contains("lock held"))
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {statuses:#?}");
        let (w, l) = (winners[0], 1 - winners[0]);
        assert!(
            statuses[l].contains("(live-holder)"),
            "round {round}: the loser says why: {}",
            statuses[l]
        );
        socks[w].1.wait_for("the winner's heal", T, |d| {
            d.has("OUTLIVE_EVENT", "lock-auto-healed")
        });
        socks[l].1.drain(Duration::from_millis(200));
        assert!(
            !socks[l]
                .1
                .seen()
                .iter()
                .any(|d| d.has("OUTLIVE_EVENT", "lock-auto-healed")),
            "round {round}: the loser audited a heal"
        );
        let (code, text, err) = ns.sh(&format!("cat {}/resume-queue.lock", state.display()));
        assert_eq!(code, 0, "{err}");
        let rec: serde_json::Value = serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("round {round}: the lock does not parse ({e}): {text}"));
        assert_eq!(
            rec["pid"].as_i64(),
            Some(agents[w].pid() as i64),
            "round {round}: the lock's bytes are the winner's"
        );
        assert_ne!(rec["hostname"], "old-host");
    }
}
