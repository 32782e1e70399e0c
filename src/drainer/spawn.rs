//! Revival without a service manager (SPEC D-9): where there is no systemd (macOS, containers),
//! an exec target is spawned detached: a new session (setsid), stdio to
//! `<runtime_dir>/runs/<id>.log`, the entry's uid and gid with that user's groups, then the
//! entry's cwd (entered as that user) and environment. It is tracked by pid and start time;
//! the agent keeps the child handle to reap it and to learn its exit status.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// What to spawn.
#[derive(Debug, Clone)]
pub(crate) struct SpawnSpec {
    pub id: String,
    pub argv: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub env: BTreeMap<String, String>,
}

/// The groups of `uid` in the user database with `gid` as the primary group, as a login would
/// set them; only `gid` for a uid the database does not know.
fn groups_of(uid: u32, gid: u32) -> Vec<libc::gid_t> {
    match crate::facts::users::account(uid) {
        crate::facts::users::Lookup::Found(a) => crate::facts::users::login_groups(&a, gid),
        _ => vec![gid],
    }
}

/// The log file of a spawned run, in `<runtime_dir>/runs/`.
fn log_name(id: &str) -> String {
    format!("{id}.log")
}

/// Spawn detached. Returns the child, its pid and start time.
pub(crate) fn spawn(spec: &SpawnSpec, runtime_dir: &Path) -> std::io::Result<(Child, i64, u64)> {
    let runs = crate::files::Dir::create(runtime_dir, 0o755)?.subdir("runs", 0o700)?;
    let (log, _) = runs.open_append(&log_name(&spec.id))?;
    let groups = groups_of(spec.uid, spec.gid);
    let (uid, gid) = (spec.uid, spec.gid);
    // The directory is entered in the child after the switch to the run's user (not by
    // Command::current_dir, which would enter it as root, before pre_exec): a run never starts
    // in a directory its user could not enter.
    let cwd = CString::new(spec.cwd.as_str())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "cwd contains NUL"))?;
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let switch_user = nix::unistd::geteuid().is_root() && (uid != 0 || gid != 0);
    // SAFETY: only async-signal-safe system calls run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if switch_user
                && (libc::setgroups(groups.len() as _, groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::chdir(cwd.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let pid = child.id() as i64;
    let start = crate::facts::process::probe(pid);
    let start_time = match start {
        crate::facts::process::Liveness::Alive {
            start_time: Some(s),
        } => s,
        _ => 0,
    };
    Ok((child, pid, start_time))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn d9_spawned_run_is_detached_with_its_cwd_env_and_log() {
        let d = tempfile::tempdir().unwrap();
        let me = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let spec = SpawnSpec {
            id: "rq-a-1".into(),
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo \"$OUTLIVE_ENTRY_ID $(pwd) $(ps -o sid= -p $$ | tr -d ' ') $$\"".into(),
            ],
            cwd: "/tmp".into(),
            uid: me.0,
            gid: me.1,
            env: BTreeMap::from([("OUTLIVE_ENTRY_ID".into(), "rq-a-1".into())]),
        };
        let (mut child, pid, start) = spawn(&spec, d.path()).unwrap();
        assert!(pid > 0 && start > 0);
        assert!(child.wait().unwrap().success());
        let log = std::fs::read_to_string(d.path().join("runs").join(log_name("rq-a-1"))).unwrap();
        let f: Vec<&str> = log.split_whitespace().collect();
        assert_eq!(f[0], "rq-a-1");
        assert_eq!(f[1], "/tmp");
        assert_eq!(f[2], f[3], "a session of its own (sid == pid): {log}");
    }
}
