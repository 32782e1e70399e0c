//! The systemd box (DESIGN §4.3): a real systemd booted as PID 1 of private namespaces, with
//! journald and the system bus, isolated so that the machine is left unchanged (the recipe is
//! `tests/box/box-init.sh`). One box at a time: an exclusive flock on
//! `/run/lock/outlive-box.lock`, and the nextest group `box`.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{outlivectl, outlived, repo, run};

const LOCK: &str = "/run/lock/outlive-box.lock";
const CGROUP_ROOTS: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"];

/// What the box will hold: an install tree, configuration, units, the state image.
pub struct Stage {
    pub dir: PathBuf,
    pub root: PathBuf,
}

impl Stage {
    /// A fresh stage with outlive installed by the project's own `make install`
    /// (`PREFIX=/usr/local`), using the binaries this test run built.
    pub fn new(name: &str) -> Stage {
        let stage = Stage::empty(name);
        let (code, out, err) = run(Command::new("make")
            .current_dir(repo())
            .args(["-s", "install", "PREFIX=/usr/local"])
            .arg(format!("DESTDIR={}", stage.root.display()))
            .arg(format!("OUTLIVED={}", outlived()))
            .arg(format!("OUTLIVECTL={}", outlivectl())));
        assert_eq!(code, 0, "make install failed:\n{out}\n{err}");
        stage
    }

    /// A fresh stage with nothing installed (a test installs a package inside the box).
    pub fn empty(name: &str) -> Stage {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("box-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Stage { dir, root }
    }

    /// Write a file into the box's tree (`rel` is absolute inside the box).
    pub fn file(&self, rel: &str, contents: &str) {
        let p = self.root.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, contents).unwrap();
    }

    /// Put the state directory on a fresh ext4 image of `mib` MiB.
    pub fn state_image(&self, mib: u64) {
        let img = self.dir.join("state.img");
        let f = File::create(&img).unwrap();
        f.set_len(mib << 20).unwrap();
        let (code, _, err) = run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
        assert_eq!(code, 0, "mkfs.ext4: {err}");
    }

    /// Put a file into the state directory before boot (`mtime_ago` seconds old).
    pub fn state_file(&self, name: &str, contents: &[u8], mtime_ago: u64) {
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
    pub fn want(&self, unit: &str) {
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
pub struct SystemdBox {
    unshare: Child,
    /// systemd's pid as seen from the machine.
    pub pid: i32,
    cgroups_before: BTreeSet<PathBuf>,
    _lock: File,
    halted: bool,
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
pub fn available() -> Result<(), String> {
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
    pub fn boot(stage: &Stage) -> SystemdBox {
        std::fs::create_dir_all("/run/lock").unwrap();
        let lock = File::create(LOCK).expect("box lock file");
        lock.lock().expect("box lock");
        let cgroups_before = cgroup_dirs();
        let init = repo().join("tests/box/box-init.sh");
        let log = File::create(stage.dir.join("box.log")).unwrap();
        let unshare = Command::new("setsid")
            .args([
                "unshare",
                "--fork",
                "--pid",
                "--mount-proc",
                "--mount",
                "--uts",
                "--ipc",
                "--net",
            ])
            .args(["--propagation", "private"])
            .arg(&init)
            .arg(&stage.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn unshare");
        let mut b = SystemdBox {
            pid: 0,
            unshare,
            cgroups_before,
            _lock: lock,
            halted: false,
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
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        run(Command::new("nsenter")
            .arg("-t")
            .arg(self.pid.to_string())
            .arg("-a")
            .args(args))
    }

    /// Run a shell script inside the box.
    pub fn sh(&self, script: &str) -> (i32, String, String) {
        self.run(&["/bin/sh", "-c", script])
    }

    /// `systemctl show -p <prop> --value <unit>`.
    pub fn show(&self, unit: &str, prop: &str) -> String {
        self.run(&["systemctl", "show", "-p", prop, "--value", unit])
            .1
            .trim()
            .to_string()
    }

    /// Poll `f` until true; panics with `what` after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut f: impl FnMut(&SystemdBox) -> bool) {
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
    pub fn halt(mut self) {
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
        loop {
            if self.unshare.try_wait().ok().flatten().is_some() {
                break;
            }
            if Instant::now() > end {
                // Killing PID 1 of the box kills every process in it.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                let _ = self.unshare.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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

fn find_box_systemd(unshare_pid: i32) -> Option<i32> {
    // unshare --fork: its child is PID 1 of the box (the init script, then systemd).
    let children =
        std::fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children")).ok()?;
    let pid: i32 = children.split_whitespace().next()?.parse().ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "systemd").then_some(pid)
}

/// A listing of the machine's trees that a box must not change (DESIGN §4.3): path, type,
/// mode, owner, size and mtime, not crossing into other mounts.
#[derive(Debug, PartialEq, Eq)]
pub struct HostSnapshot(BTreeSet<String>);

impl HostSnapshot {
    /// Take it. Paths under `exclude` prefixes (and the ones in `OUTLIVE_BOX_SNAPSHOT_EXCLUDE`,
    /// colon-separated) are left out.
    pub fn take(exclude: &[&Path]) -> HostSnapshot {
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
    pub fn diff(&self, after: &HostSnapshot) -> Vec<String> {
        let mut d: Vec<String> = self
            .0
            .difference(&after.0)
            .map(|l| format!("- {l}"))
            .collect();
        d.extend(after.0.difference(&self.0).map(|l| format!("+ {l}")));
        d
    }
}
