//! The systemd box (DESIGN §4.3): a real systemd booted as PID 1 of private namespaces, with
//! journald and the system bus, isolated so that the machine is left unchanged (the recipe is
//! `tests/box/box-init.sh`). One box at a time: an exclusive flock on
//! `/run/lock/outlive-box.lock`, and the nextest group `box`.
//!
//! Whether a box changed the machine is checked two ways ([`machine_changes`]):
//!
//! - what the box did to the machine's filesystems is watched with fanotify, attributed by pid
//!   namespace: the box runs in a pid namespace nested in one of the watch's own, whose reader
//!   sees the pid of every box process that created, removed, renamed, wrote or chmod'ed a
//!   file, and pid 0 for everyone else on the machine. So a shell writing its own files in
//!   `/tmp` meanwhile is not the box, and a box that plants a file in the machine's `/tmp` or
//!   removes one from `/run/lock` is caught, whatever the name;
//! - a snapshot before and after of what fanotify cannot see: the mount table (superblock
//!   options are shared), kernel settings, and the trees on a filesystem fanotify cannot watch.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::watch::{MachineWatch, Reader};
use super::{outlivectl, outlived, repo, run};

const LOCK: &str = "/run/lock/outlive-box.lock";
const CGROUP_ROOTS: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"];

/// What the box will hold: an install tree, configuration, units, the state image.
pub(crate) struct Stage {
    pub(crate) dir: PathBuf,
    pub(crate) root: PathBuf,
}

impl Stage {
    /// A fresh stage with outlive installed by the project's own `make install`
    /// (`PREFIX=/usr/local`), using the binaries this test run built.
    pub(crate) fn new(name: &str) -> Stage {
        Stage::with_binaries(name, outlived(), outlivectl())
    }

    /// The same with the release binaries (`make test` builds them first), for what is
    /// measured: the debug build is ten times slower at dispatching calls.
    pub(crate) fn new_release(name: &str) -> Stage {
        let (d, c) = (
            repo().join("target/release/outlived"),
            repo().join("target/release/outlivectl"),
        );
        assert!(
            d.exists() && c.exists(),
            "the release binaries are missing: `make build` (make test builds them first)"
        );
        Stage::with_binaries(name, d.to_str().unwrap(), c.to_str().unwrap())
    }

    fn with_binaries(name: &str, outlived: &str, outlivectl: &str) -> Stage {
        let stage = Stage::empty(name);
        let (code, out, err) = run(Command::new("make")
            .current_dir(repo())
            .args(["-s", "install", "PREFIX=/usr/local"])
            .arg(format!("DESTDIR={}", stage.root.display()))
            .arg(format!("OUTLIVED={outlived}"))
            .arg(format!("OUTLIVECTL={outlivectl}")));
        assert_eq!(code, 0, "make install failed:\n{out}\n{err}");
        stage
    }

    /// A fresh stage with nothing installed (a test installs a package inside the box).
    pub(crate) fn empty(name: &str) -> Stage {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("box-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Stage { dir, root }
    }

    /// Write a file into the box's tree (`rel` is absolute inside the box).
    pub(crate) fn file(&self, rel: &str, contents: &str) {
        let p = self.root.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, contents).unwrap();
    }

    /// Copy a file into the box's tree (`rel` is absolute inside the box). Only the stage's
    /// tree is seen inside the box: the stage directory itself may live under the machine's
    /// `/tmp`, which the box replaces with its own.
    pub(crate) fn copy(&self, rel: &str, from: &Path) {
        let p = self.root.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::copy(from, &p).unwrap();
    }

    /// Put the state directory on a fresh ext4 image of `mib` MiB.
    pub(crate) fn state_image(&self, mib: u64) {
        let img = self.dir.join("state.img");
        let f = File::create(&img).unwrap();
        f.set_len(mib << 20).unwrap();
        let (code, _, err) = run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
        assert_eq!(code, 0, "mkfs.ext4: {err}");
    }

    /// The boot id the box's kernel shows (`/proc/sys/kernel/random/boot_id`), to fake a host
    /// restart (DESIGN §4.3): boot a box, halt it, set another id, boot again on the same state
    /// image. The machine keeps its own.
    pub(crate) fn boot_id(&self, id: &str) {
        std::fs::write(self.dir.join("boot_id"), format!("{id}\n")).unwrap();
    }

    /// Put a file into the state directory before boot (`mtime_ago` seconds old).
    pub(crate) fn state_file(&self, name: &str, contents: &[u8], mtime_ago: u64) {
        let p = self.dir.join("state").join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, contents).unwrap();
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(mtime_ago);
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    /// Make the box's target want a unit.
    pub(crate) fn want(&self, unit: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("wants"))
            .unwrap();
        writeln!(f, "{unit}").unwrap();
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A booted box.
pub(crate) struct SystemdBox {
    /// `unshare` of the watch's pid namespace, in which the box's own is nested.
    unshare: Child,
    /// systemd's pid as seen from the machine.
    pub(crate) pid: i32,
    cgroups_before: BTreeSet<PathBuf>,
    _lock: File,
    halted: bool,
    /// The watch's reader, when [`machine_changes`] watches this box.
    reader: Option<Reader>,
}

/// The watch of the test running now ([`machine_changes`]); boxes booted meanwhile report to it.
static WATCH: Mutex<Option<Arc<MachineWatch>>> = Mutex::new(None);

/// Run a box test and return what it changed on the machine (DESIGN §4.3): what its
/// processes did to the machine's filesystems, as the watch saw it, and the difference of a
/// snapshot before and after (see the module doc). Empty when the machine is as it was.
pub(crate) fn machine_changes(test: impl FnOnce()) -> Vec<String> {
    let watch = MachineWatch::start().expect("fanotify (root, Linux >= 5.9)");
    *WATCH.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&watch));
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            *WATCH.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
    let _clear = Clear;
    // The trees the watch covers are the watch's (it knows who did what, so other programs
    // busy there meanwhile are never blamed); the snapshot keeps the rest.
    let busy: Vec<&Path> = super::watch::WATCHED
        .iter()
        .map(Path::new)
        .filter(|p| watch.covers(p))
        .collect();
    let before = HostSnapshot::take(&busy);
    test();
    let mut out = watch.findings();
    out.extend(before.diff(&HostSnapshot::take(&busy)));
    out
}

/// Run a box test and assert that the machine is as it was ([`machine_changes`]).
pub(crate) fn unchanged_machine(test: impl FnOnce()) {
    let changes = machine_changes(test);
    assert!(
        changes.is_empty(),
        "the box changed the machine:\n{}",
        changes.join("\n")
    );
}

fn cgroup_dirs() -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for root in CGROUP_ROOTS {
        let mut stack = vec![PathBuf::from(root)];
        while let Some(d) = stack.pop() {
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        out.insert(e.path());
                        stack.push(e.path());
                    }
                }
            }
        }
    }
    out
}

/// Whether this machine can boot a box (root, systemd, unshare, nsenter).
pub(crate) fn available() -> Result<(), String> {
    if !super::is_root() {
        return Err("root (booting systemd in namespaces)".into());
    }
    for t in ["unshare", "nsenter", "setsid", "mkfs.ext4", "make"] {
        if !super::have(t) {
            return Err(format!("{t} (run .ci/run)"));
        }
    }
    if !Path::new("/lib/systemd/systemd").exists() {
        return Err("/lib/systemd/systemd (Debian package systemd)".into());
    }
    if !super::have("dbus-daemon") {
        return Err("dbus-daemon (Debian package dbus-daemon)".into());
    }
    Ok(())
}

impl SystemdBox {
    /// Boot a box from `stage` and wait until its boot has finished.
    pub(crate) fn boot(stage: &Stage) -> SystemdBox {
        std::fs::create_dir_all("/run/lock").unwrap();
        let lock = File::create(LOCK).expect("box lock file");
        lock.lock().expect("box lock");
        let cgroups_before = cgroup_dirs();
        let init = repo().join("tests/box/box-init.sh");
        let log = File::create(stage.dir.join("box.log")).unwrap();
        let watch = WATCH.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // The watch's pid namespace: its init (sh) runs the reader, then the box in a nested
        // pid namespace of its own, and stays until the test ends it (`wait` for the reader).
        let boot_box = "unshare --fork --pid --mount-proc --mount --uts --ipc --net \
             --propagation private \"$0\" \"$1\"";
        let script = if watch.is_some() {
            format!("cat <&3 >&4 & exec 3<&- 4>&-; {boot_box}; wait")
        } else {
            format!("{boot_box}; wait")
        };
        let mut cmd = Command::new("setsid");
        cmd.args(["unshare", "--fork", "--pid", "sh", "-c", &script])
            .arg(&init)
            .arg(&stage.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut reader = None;
        let mut pipe_w = None;
        if let Some(w) = &watch {
            let mut fds = [0; 2];
            // SAFETY: `fds` is a valid out-array of two descriptors.
            assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            // SAFETY: fresh descriptors we own.
            let (r, wr) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
            let (fan, wfd) = (w.raw_fd(), wr.as_raw_fd());
            // SAFETY: only fcntl, dup2 and close between fork and exec (async-signal-safe).
            // Both are first copied above 3 and 4 (either may be 3 or 4 already, and a dup2 of
            // a descriptor onto itself would keep its close-on-exec flag).
            unsafe {
                cmd.pre_exec(move || {
                    let a = libc::fcntl(fan, libc::F_DUPFD, 10);
                    let b = libc::fcntl(wfd, libc::F_DUPFD, 10);
                    if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(a);
                    libc::close(b);
                    Ok(())
                });
            }
            reader = Some(Reader::new(Arc::clone(w), r));
            pipe_w = Some(wr);
        }
        let unshare = cmd.spawn().expect("spawn unshare");
        // Only the reader writes the pipe now.
        drop(pipe_w);
        let mut b = SystemdBox {
            pid: 0,
            unshare,
            cgroups_before,
            _lock: lock,
            halted: false,
            reader,
        };
        let end = Instant::now() + Duration::from_secs(20);
        while b.pid == 0 {
            if let Some(pid) = find_box_systemd(b.unshare.id() as i32) {
                b.pid = pid;
                break;
            }
            if Instant::now() > end || b.unshare.try_wait().ok().flatten().is_some() {
                let log = std::fs::read_to_string(stage.dir.join("box.log")).unwrap_or_default();
                panic!("the box did not start systemd:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // "offline" until systemd's private socket exists; then --wait covers the boot.
        let end = Instant::now() + Duration::from_secs(60);
        let (code, state, err) = loop {
            let (code, out, err) =
                b.run(&["timeout", "60", "systemctl", "is-system-running", "--wait"]);
            let state = out.trim().to_string();
            if !(state == "offline" || state.is_empty()) || Instant::now() > end {
                break (code, state, err);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if state != "running" {
            let (_, units, _) = b.run(&["systemctl", "list-units", "--failed", "--no-pager"]);
            panic!("box boot ended {state:?} (code {code}, {err}); failed units:\n{units}");
        }
        b
    }

    /// Run a command inside the box (all namespaces; `nsenter` resets the cwd to /).
    pub(crate) fn run(&self, args: &[&str]) -> (i32, String, String) {
        run(Command::new("nsenter")
            .arg("-t")
            .arg(self.pid.to_string())
            .arg("-a")
            .args(args))
    }

    /// Run a shell script inside the box.
    pub(crate) fn sh(&self, script: &str) -> (i32, String, String) {
        self.run(&["/bin/sh", "-c", script])
    }

    /// `systemctl show -p <prop> --value <unit>`.
    pub(crate) fn show(&self, unit: &str, prop: &str) -> String {
        self.run(&["systemctl", "show", "-p", prop, "--value", unit])
            .1
            .trim()
            .to_string()
    }

    /// Poll `f` until true; panics with `what` after `timeout`.
    pub(crate) fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&SystemdBox) -> bool,
    ) {
        let end = Instant::now() + timeout;
        while !f(self) {
            if Instant::now() > end {
                let (_, j, _) = self.run(&["journalctl", "--no-pager", "-n", "60"]);
                panic!("timed out after {timeout:?} waiting for {what}; journal tail:\n{j}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Halt the box and remove the empty cgroups it left.
    pub(crate) fn halt(mut self) {
        self.halt_inner();
    }

    fn halt_inner(&mut self) {
        if self.halted {
            return;
        }
        self.halted = true;
        let rtmin3 = libc::SIGRTMIN() + 3;
        // SAFETY: sending a signal to a pid we own; no memory is involved.
        unsafe { libc::kill(self.pid, rtmin3) };
        let end = Instant::now() + Duration::from_secs(30);
        while is_box_systemd(self.pid) {
            if Instant::now() > end {
                // Killing PID 1 of the box kills every process in it.
                // SAFETY: sending a signal to a pid we own; no memory is involved.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                let stop = Instant::now() + Duration::from_secs(10);
                while is_box_systemd(self.pid) && Instant::now() < stop {
                    std::thread::sleep(Duration::from_millis(20));
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The box is gone; its watch reads up to a sentinel, then its namespace ends.
        if let Some(r) = &mut self.reader
            && !r.finish()
        {
            eprintln!("the box watch never saw its sentinel: what the box did last is unknown");
            if let Some(w) = WATCH.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                w.lost();
            }
        }
        if let Some(init) = first_child(self.unshare.id() as i32) {
            // SAFETY: PID 1 of the watch's namespace; killing it ends the namespace.
            unsafe { libc::kill(init, libc::SIGKILL) };
        }
        let _ = self.unshare.wait();
        self.reader = None;
        let mut new: Vec<PathBuf> = cgroup_dirs()
            .difference(&self.cgroups_before)
            .cloned()
            .collect();
        // Deepest first; rmdir removes only empty cgroups.
        new.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for d in new {
            let _ = std::fs::remove_dir(&d);
        }
    }
}

impl Drop for SystemdBox {
    fn drop(&mut self) {
        self.halt_inner();
    }
}

fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn first_child(pid: i32) -> Option<i32> {
    children(pid).first().copied()
}

fn is_box_systemd(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "systemd")
}

/// PID 1 of the box: the child of the inner `unshare` (the init script, then systemd), under
/// the watch namespace's init (sh).
fn find_box_systemd(unshare_pid: i32) -> Option<i32> {
    let sh = first_child(unshare_pid)?;
    children(sh)
        .into_iter()
        .flat_map(children)
        .find(|&p| is_box_systemd(p))
}

/// A listing of the machine's trees that a box must not change (DESIGN §4.3): path, type,
/// mode, owner, size and mtime, not crossing into other mounts.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct HostSnapshot(BTreeSet<String>);

impl HostSnapshot {
    /// Take it. Paths under `exclude` prefixes (and the ones in `OUTLIVE_BOX_SNAPSHOT_EXCLUDE`,
    /// colon-separated) are left out.
    pub(crate) fn take(exclude: &[&Path]) -> HostSnapshot {
        let mut excl: Vec<PathBuf> = exclude.iter().map(|p| p.to_path_buf()).collect();
        excl.push(repo());
        excl.push(PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
        excl.push(PathBuf::from(LOCK));
        if let Ok(v) = std::env::var("OUTLIVE_BOX_SNAPSHOT_EXCLUDE") {
            excl.extend(v.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
        }
        let mut out = BTreeSet::new();
        for root in ["/tmp", "/etc", "/var", "/usr", "/run", "/dev", "/home"] {
            let Ok(meta) = std::fs::symlink_metadata(root) else {
                continue;
            };
            let dev = meta.dev();
            let mut stack = vec![PathBuf::from(root)];
            while let Some(p) = stack.pop() {
                if excl.iter().any(|e| p.starts_with(e)) {
                    continue;
                }
                let Ok(m) = std::fs::symlink_metadata(&p) else {
                    continue;
                };
                out.insert(format!(
                    "{} mode={:o} uid={} size={} mtime={}.{}",
                    p.display(),
                    m.mode(),
                    m.uid(),
                    if m.is_dir() { 0 } else { m.size() },
                    m.mtime(),
                    m.mtime_nsec()
                ));
                if m.is_dir()
                    && m.dev() == dev
                    && let Ok(rd) = std::fs::read_dir(&p)
                {
                    stack.extend(rd.flatten().map(|e| e.path()));
                }
            }
        }
        // Superblock options are shared with every namespace: a remount inside the box (systemd
        // remounts /sys/fs/cgroup read-only on hybrid hosts) would change the machine without
        // touching a single file.
        if let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") {
            out.extend(mi.lines().map(|l| format!("mount: {l}")));
        }
        // Kernel settings (the box masks systemd-sysctl, and container= keeps PID 1 from writing
        // core_pattern and friends); counters that change by themselves are left out.
        const VOLATILE: [&str; 12] = [
            "fs/quota/",
            "fs/dentry-state",
            "fs/file-nr",
            "fs/inode-nr",
            "fs/inode-state",
            "fs/aio-nr",
            "kernel/ns_last_pid",
            "kernel/random/uuid",
            "kernel/random/entropy_avail",
            "kernel/pty/nr",
            "kernel/perf_event_max_sample_rate",
            "net/",
        ];
        let mut stack = vec![PathBuf::from("/proc/sys")];
        while let Some(p) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&p) else {
                continue;
            };
            for e in rd.flatten() {
                let path = e.path();
                let rel = path
                    .strip_prefix("/proc/sys")
                    .unwrap()
                    .display()
                    .to_string();
                if VOLATILE.iter().any(|v| rel.starts_with(v)) {
                    continue;
                }
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(path);
                } else if let Ok(v) = std::fs::read(&path) {
                    let v = String::from_utf8_lossy(&v[..v.len().min(300)]).replace('\n', " ");
                    out.insert(format!("sysctl: {rel}={v}"));
                }
            }
        }
        HostSnapshot(out)
    }

    /// The lines that differ (removed with `-`, added with `+`).
    pub(crate) fn diff(&self, after: &HostSnapshot) -> Vec<String> {
        let mut d: Vec<String> = self
            .0
            .difference(&after.0)
            .map(|l| format!("- {l}"))
            .collect();
        d.extend(after.0.difference(&self.0).map(|l| format!("+ {l}")));
        d
    }
}
