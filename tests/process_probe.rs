//! Process liveness and start time (SPEC H-1, H-2) against the real kernel: a live child, a
//! reaped child, a zombie, a root process probed by a child that dropped to an unprivileged uid
//! (EPERM means alive), the same with `/proc` mounted `hidepid=invisible` (start time unreadable:
//! still alive), and a recorded start time that does not match (a recycled pid: dead).

mod common;

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outlive::facts::identity;
use outlive::facts::process::{
    KernelProber, Liveness, RecordedProcess, SameProcess, probe, same_process,
};

fn stat_start(pid: u32) -> u64 {
    outlive::facts::process::parse_stat(
        &std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap(),
    )
    .unwrap()
    .1
}

#[test]
fn h1_live_child_is_alive_with_its_start_time() {
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = child.id();
    assert_eq!(
        probe(pid as i64),
        Liveness::Alive {
            start_time: Some(stat_start(pid))
        }
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn h1_reaped_child_is_dead() {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    assert_eq!(probe(pid as i64), Liveness::Dead);
}

#[test]
fn h1_zombie_is_dead() {
    let mut child = Command::new("true").stdout(Stdio::null()).spawn().unwrap();
    let pid = child.id();
    // Not reaped yet: wait until the kernel shows it as a zombie.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        if outlive::facts::process::parse_stat(&s).unwrap().0 == 'Z' {
            break;
        }
        assert!(Instant::now() < end, "child never became a zombie");
        std::thread::sleep(Duration::from_millis(5));
    }
    // kill(pid, 0) still succeeds on a zombie; the probe must not call it alive.
    assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok());
    assert_eq!(probe(pid as i64), Liveness::Dead);
    child.wait().unwrap();
}

/// Fork; in the child optionally mount a hidepid /proc, drop to nobody, probe `target`, and
/// report (kill errno, liveness) through a pipe.
fn probe_from_unprivileged_child(target: i32, hidepid: bool) -> (i32, Liveness) {
    let (r, w) = nix::unistd::pipe().unwrap();
    // SAFETY: the child only makes system calls and exits with _exit; nextest runs this test
    // alone in its process, so no other thread holds a lock the child could need.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let code = (|| -> Option<u8> {
                if hidepid {
                    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).ok()?;
                    use nix::mount::{MsFlags, mount};
                    mount(
                        None::<&str>,
                        "/",
                        None::<&str>,
                        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                        None::<&str>,
                    )
                    .ok()?;
                    mount(
                        Some("proc"),
                        "/proc",
                        Some("proc"),
                        MsFlags::empty(),
                        Some("hidepid=invisible"),
                    )
                    .ok()?;
                }
                nix::unistd::setgid(nix::unistd::Gid::from_raw(common::NOBODY)).ok()?;
                nix::unistd::setuid(nix::unistd::Uid::from_raw(common::NOBODY)).ok()?;
                let errno = match nix::sys::signal::kill(nix::unistd::Pid::from_raw(target), None) {
                    Ok(()) => 0,
                    Err(e) => e as i32,
                };
                let l = probe(target as i64);
                let msg = format!("{errno} {l:?}");
                nix::unistd::write(&w, msg.as_bytes()).ok()?;
                Some(0)
            })()
            .unwrap_or(1);
            // SAFETY: leaving the forked child without running the parent's destructors.
            unsafe { libc::_exit(code as i32) };
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(w);
            let mut out = String::new();
            // SAFETY: `r` is the read end we own.
            let mut f = std::fs::File::from(unsafe {
                OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(r))
            });
            f.read_to_string(&mut out).unwrap();
            nix::sys::wait::waitpid(child, None).unwrap();
            let (errno, l) = out
                .split_once(' ')
                .unwrap_or_else(|| panic!("child reported nothing: {out:?}"));
            let liveness = if l == "Dead" {
                Liveness::Dead
            } else if l.contains("None") {
                Liveness::Alive { start_time: None }
            } else {
                Liveness::Alive {
                    start_time: Some(
                        l.trim_start_matches("Alive { start_time: Some(")
                            .trim_end_matches(") }")
                            .parse()
                            .unwrap(),
                    ),
                }
            };
            (errno.parse().unwrap(), liveness)
        }
    }
}

#[test]
fn h1_eperm_means_alive() {
    if !common::require_root("dropping to an unprivileged uid to probe a root process") {
        return;
    }
    let me = std::process::id() as i32;
    let (errno, l) = probe_from_unprivileged_child(me, false);
    assert_eq!(
        errno,
        libc::EPERM,
        "the child must have been refused by kill(2)"
    );
    assert_eq!(
        l,
        Liveness::Alive {
            start_time: Some(stat_start(me as u32))
        }
    );
}

#[test]
fn h1_hidden_start_time_counts_as_alive() {
    if !common::require_root("mounting a hidepid /proc and dropping privileges") {
        return;
    }
    let me = std::process::id() as i32;
    let (errno, l) = probe_from_unprivileged_child(me, true);
    assert_eq!(errno, libc::EPERM);
    assert_eq!(l, Liveness::Alive { start_time: None });
}

#[test]
fn h2_recycled_pid_is_detected_by_start_time() {
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = child.id();
    let boot = identity::boot_id().unwrap();
    let ns = identity::pid_ns();
    let start = stat_start(pid);
    let rec = |s| RecordedProcess {
        pid: pid as i64,
        start_time: s,
        boot_id: Some(boot),
        pid_ns: ns,
    };
    assert!(matches!(
        same_process(&rec(start), &boot, ns, &KernelProber),
        SameProcess::Alive(_)
    ));
    let got = same_process(&rec(start + 1), &boot, ns, &KernelProber);
    assert_eq!(
        got,
        SameProcess::Dead("the pid was recycled (start time differs)")
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(matches!(
        same_process(&rec(start), &boot, ns, &KernelProber),
        SameProcess::Dead(_)
    ));
}
