//! Test harness shared by the integration tests (DESIGN §4): sockets the tests bind for
//! service-manager notifications and the journal, a private dbus-daemon with the shipped
//! policy, the agent as a child process, and the systemd box (`boxed.rs`).
//!
//! A test that needs root, FUSE, a tool or systemd calls [`require`]: outside CI it prints why
//! it skips; under `CI=true` a skip is a failure.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness: what is dead differs per binary"
)]

pub(crate) mod boxed;
pub(crate) mod bus;
pub(crate) mod watch;

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The built agent, or the one `OUTLIVE_TEST_OUTLIVED` names (to show that a test fails on an
/// older build: `OUTLIVE_TEST_OUTLIVED=/path/to/old/outlived cargo nextest run …`).
pub(crate) fn outlived() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("OUTLIVE_TEST_OUTLIVED")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_outlived").to_string())
    })
}

/// The built CLI, or the one `OUTLIVE_TEST_OUTLIVECTL` names (as for the agent).
pub(crate) fn outlivectl() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("OUTLIVE_TEST_OUTLIVECTL")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_outlivectl").to_string())
    })
}

/// `bin` as a path any user may execute. Test users cannot reach a checkout under a private
/// directory (a clone in `/root`), so there a copy is made once, by size and mtime, in a
/// root-owned 0755 directory under the system temp dir.
pub(crate) fn exe_for_others(bin: &str) -> String {
    use std::os::unix::fs::MetadataExt;
    let reachable = Path::new(bin)
        .ancestors()
        .skip(1)
        .all(|d| std::fs::metadata(d).is_ok_and(|m| m.mode() & 0o001 != 0));
    if reachable || !is_root() {
        return bin.to_string();
    }
    let m = std::fs::metadata(bin).expect("the binary");
    let dir = std::env::temp_dir().join("outlive-test-bin");
    let _ = std::fs::create_dir(&dir);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let name = Path::new(bin)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let copy = dir.join(format!(
        "{name}-{}-{}",
        m.size(),
        m.mtime_nsec() + m.mtime() * 1_000_000_000
    ));
    if !copy.exists() {
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        std::fs::copy(bin, &tmp).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &copy).unwrap();
    }
    copy.to_string_lossy().to_string()
}

/// The repository root.
pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The newest package `make deb` / `make rpm` built: `target/<dir>/<prefix>*<suffix>`.
pub(crate) fn built_package(dir: &str, prefix: &str, suffix: &str) -> Option<PathBuf> {
    let d = repo().join("target").join(dir);
    std::fs::read_dir(d)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(prefix) && n.ends_with(suffix)
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

/// An unprivileged uid/gid for tests that must not be root (`nobody`).
pub(crate) const NOBODY: u32 = 65534;

/// Whether this process is root.
pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether a command is on PATH.
pub(crate) fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Check a precondition. False (with a message) means "skip"; under CI=true it panics, since
/// CI must run every test.
pub(crate) fn require(ok: bool, why: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("required for this test and missing in CI: {why}");
    }
    eprintln!("SKIPPED: {why}");
    false
}

/// Require root (and say why the test needs it).
pub(crate) fn require_root(why: &str) -> bool {
    require(is_root(), &format!("root ({why})"))
}

/// Require commands on PATH.
pub(crate) fn require_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    require(
        missing.is_empty(),
        &format!("tools {missing:?} (run .ci/run to install them)"),
    )
}

/// A temporary directory readable by unprivileged test users (tempfile makes 0700 ones).
pub(crate) fn open_tempdir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("outlive-test-")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    d
}

/// One datagram received on a test socket.
#[derive(Debug, Clone)]
pub(crate) struct Datagram {
    pub(crate) at: Instant,
    pub(crate) fields: Vec<(String, String)>,
}

impl Datagram {
    /// A field's value.
    pub(crate) fn get(&self, k: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
    /// Whether a field is present with a value.
    pub(crate) fn has(&self, k: &str, v: &str) -> bool {
        self.get(k) == Some(v)
    }
}

/// A datagram socket a test binds to play systemd's notify socket or the journal.
pub(crate) struct TestSocket {
    _dir: tempfile::TempDir,
    pub(crate) path: PathBuf,
    sock: UnixDatagram,
    seen: std::cell::RefCell<Vec<Datagram>>,
    journal: bool,
}

impl TestSocket {
    fn bind(name: &str, journal: bool) -> TestSocket {
        let dir = open_tempdir();
        let path = dir.path().join(name);
        let sock = UnixDatagram::bind(&path).expect("bind test socket");
        sock.set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        TestSocket {
            _dir: dir,
            path,
            sock,
            seen: Default::default(),
            journal,
        }
    }

    /// A socket speaking sd_notify's protocol (`KEY=VALUE` lines).
    pub(crate) fn notify() -> TestSocket {
        TestSocket::bind("notify", false)
    }

    /// A socket speaking the journal's native protocol.
    pub(crate) fn journal() -> TestSocket {
        TestSocket::bind("journal", true)
    }

    /// Read and drop everything sent from now on, on a thread of its own, as a journald that
    /// keeps up would (a flood of events must not wait on a full socket buffer). Nothing sent
    /// afterwards is seen by [`TestSocket::wait_for`].
    pub(crate) fn discard(&self) {
        let sock = self.sock.try_clone().expect("clone the test socket");
        sock.set_read_timeout(None).unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while sock.recv(&mut buf).is_ok() {}
        });
    }

    fn parse(&self, b: &[u8]) -> Vec<(String, String)> {
        if self.journal {
            outlive::publish::journal::parse_native(b).unwrap_or_default()
        } else {
            String::from_utf8_lossy(b)
                .lines()
                .filter_map(|l| {
                    l.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect()
        }
    }

    /// Receive everything that arrives within `d`.
    pub(crate) fn drain(&self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.recv_one();
        }
    }

    fn recv_one(&self) -> bool {
        let mut buf = vec![0u8; 1 << 17];
        match self.sock.recv(&mut buf) {
            Ok(n) => {
                let d = Datagram {
                    at: Instant::now(),
                    fields: self.parse(&buf[..n]),
                };
                self.seen.borrow_mut().push(d);
                true
            }
            Err(_) => false,
        }
    }

    /// Wait until a datagram satisfies `pred`; returns it. Panics with what was seen after
    /// `timeout`.
    pub(crate) fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Datagram) -> bool,
    ) -> Datagram {
        let end = Instant::now() + timeout;
        let mut checked = 0;
        loop {
            {
                let seen = self.seen.borrow();
                if let Some(d) = seen[checked..].iter().find(|d| pred(d)) {
                    return d.clone();
                }
                checked = seen.len();
            }
            if Instant::now() > end {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; received: {:#?}",
                    self.seen.borrow()
                );
            }
            self.recv_one();
        }
    }

    /// Everything received so far.
    pub(crate) fn seen(&self) -> Vec<Datagram> {
        self.seen.borrow().clone()
    }
}

/// The agent running as a child process.
pub(crate) struct Agent {
    pub(crate) child: Child,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) config: PathBuf,
    pub(crate) state_dir: PathBuf,
    pub(crate) runtime_dir: PathBuf,
    stderr_path: PathBuf,
}

/// How to start an agent.
pub(crate) struct AgentSpec {
    pub(crate) args: Vec<String>,
    pub(crate) env: HashMap<String, String>,
    /// Extra TOML appended to the generated configuration.
    pub(crate) toml: String,
    pub(crate) journal: Option<PathBuf>,
    pub(crate) notify: Option<PathBuf>,
    pub(crate) watchdog_usec: Option<u64>,
    /// Run the agent through this wrapper command (e.g. `unshare --uts`).
    pub(crate) wrapper: Vec<String>,
    /// The state directory (default: `state` in the agent's temp dir).
    pub(crate) state_dir: Option<PathBuf>,
    /// Drop-ins for `guards.d/` beside the configuration: (file name, text, owner uid).
    pub(crate) dropins: Vec<(String, String, u32)>,
    /// The runtime directory (default: `run` in the agent's temp dir).
    pub(crate) runtime_dir: Option<PathBuf>,
}

impl Default for AgentSpec {
    fn default() -> Self {
        AgentSpec {
            args: vec!["--no-bus".into()],
            env: HashMap::new(),
            toml: String::new(),
            journal: None,
            notify: None,
            watchdog_usec: None,
            wrapper: Vec::new(),
            state_dir: None,
            dropins: Vec::new(),
            runtime_dir: None,
        }
    }
}

impl Agent {
    /// Start an agent with a private state and runtime directory.
    pub(crate) fn start(spec: AgentSpec) -> Agent {
        let dir = open_tempdir();
        let state_dir = spec
            .state_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("state"));
        let runtime_dir = spec
            .runtime_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("run"));
        let config = dir.path().join("outlive.toml");
        let journal = spec
            .journal
            .clone()
            .unwrap_or_else(|| dir.path().join("no-journal-socket"));
        let mut toml = format!(
            "state_dir = {:?}\nruntime_dir = {:?}\n[journal]\nsocket = {:?}\n",
            state_dir.display().to_string(),
            runtime_dir.display().to_string(),
            journal.display().to_string()
        );
        toml.push_str(&spec.toml);
        std::fs::write(&config, toml).unwrap();
        if !spec.dropins.is_empty() {
            let g = dir.path().join("guards.d");
            std::fs::create_dir(&g).unwrap();
            std::fs::set_permissions(&g, std::fs::Permissions::from_mode(0o755)).unwrap();
            for (name, text, owner) in &spec.dropins {
                let p = g.join(name);
                std::fs::write(&p, text).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
                if is_root() {
                    nix::unistd::chown(&p, Some(nix::unistd::Uid::from_raw(*owner)), None).unwrap();
                }
            }
        }
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut argv: Vec<String> = spec.wrapper.clone();
        argv.push(outlived().to_string());
        argv.push("--config".into());
        argv.push(config.display().to_string());
        argv.extend(spec.args.iter().cloned());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        cmd.env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID");
        cmd.env_remove("JOURNAL_STREAM").env("OUTLIVE_LOG", "debug");
        if let Some(n) = &spec.notify {
            cmd.env("NOTIFY_SOCKET", n);
        }
        if let Some(w) = spec.watchdog_usec {
            cmd.env("WATCHDOG_USEC", w.to_string());
        }
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        // Own process group, so a test failure never leaves the agent behind.
        cmd.process_group(0);
        let child = cmd.spawn().expect("spawn outlived");
        Agent {
            child,
            dir,
            config,
            state_dir,
            runtime_dir,
            stderr_path,
        }
    }

    /// The agent's pid.
    pub(crate) fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Send a signal.
    pub(crate) fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// The agent's own pid when it runs under a wrapper that forks (`unshare --fork`): the
    /// wrapper's first child.
    pub(crate) fn inner_pid(&self) -> i32 {
        let pid = self.pid();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()
            .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))
            .unwrap_or(pid)
    }

    /// SIGKILL the processes the agent spawned and still parents (runs started without a
    /// service manager, SPEC C-10, and their revivals): they run in sessions of their own, so
    /// ending the agent's process group does not end them.
    pub(crate) fn kill_children(&self) {
        let pid = self.pid();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return;
        };
        for t in tasks.flatten() {
            let c = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for child in c.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(child),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// Wait for the agent to exit; its exit code (or 128+signal).
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                use std::os::unix::process::ExitStatusExt;
                return Some(st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)));
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the agent wrote on stderr so far.
    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Append to the configuration file (for reload tests).
    pub(crate) fn append_config(&self, toml: &str) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.config)
            .unwrap();
        f.write_all(toml.as_bytes()).unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

/// Run a command and return (status code, stdout, stderr).
pub(crate) fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A command that runs as uid/gid `NOBODY`.
pub(crate) fn as_nobody(program: &str) -> Command {
    let mut c = Command::new(program);
    // std drops supplementary groups when root changes uid.
    c.uid(NOBODY).gid(NOBODY);
    c
}

/// `outlivectl host --json [--path P]` parsed.
pub(crate) fn host_json(path: Option<&Path>) -> serde_json::Value {
    let mut c = Command::new(outlivectl());
    c.args(["host", "--json"]);
    if let Some(p) = path {
        c.arg("--path").arg(p);
    }
    let (code, out, err) = run(&mut c);
    assert_eq!(code, 0, "outlivectl host failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON {e}: {out}"))
}

/// An agent on `bus` (system mode as root, in the bus's namespace when it has test users).
pub(crate) fn bus_agent(
    bus: &bus::PrivateBus,
    notify: &TestSocket,
    journal: &TestSocket,
    toml: &str,
) -> Agent {
    Agent::start(AgentSpec {
        toml: toml.to_string(),
        ..bus_spec(bus, notify, journal)
    })
}

/// An agent on `bus` (its system bus), reporting to `notify` and `journal`: the spec to
/// start, for tests that add to it.
pub(crate) fn bus_spec(
    bus: &bus::PrivateBus,
    notify: &TestSocket,
    journal: &TestSocket,
) -> AgentSpec {
    let mut env = HashMap::new();
    env.insert("DBUS_SYSTEM_BUS_ADDRESS".to_string(), bus.address.clone());
    AgentSpec {
        args: vec![],
        env,
        notify: Some(notify.path.clone()),
        journal: Some(journal.path.clone()),
        wrapper: bus.agent_wrapper(),
        ..AgentSpec::default()
    }
}

/// A private mount namespace kept alive while a test runs agents in it (`wrapper()`): a
/// script mounts what the test needs, then the namespace idles. Dropping it kills the whole
/// process group (FUSE daemons included), which ends the namespace and its mounts; loop
/// devices mounted with `-o loop` detach themselves.
pub(crate) struct MountNs {
    child: Child,
}

impl MountNs {
    /// Run `script` (sh) in a new mount namespace; `$D` is `dir`.
    pub(crate) fn start(dir: &Path, script: &str) -> MountNs {
        use std::io::BufRead;
        let full = format!(
            "set -eu\nD={}\n{script}\necho mounted\nexec sleep 100000\n",
            shell_quote(&dir.display().to_string())
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c", &full])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().expect("unshare");
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let _ = out.read_line(&mut line);
        if line.trim() != "mounted" {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
            let _ = child.kill();
            panic!("mount script failed: {line}{err}");
        }
        MountNs { child }
    }

    /// A wrapper that runs a command inside the namespace.
    pub(crate) fn wrapper(&self) -> Vec<String> {
        vec![
            "nsenter".into(),
            "-t".into(),
            self.child.id().to_string(),
            "-m".into(),
            "--".into(),
        ]
    }

    /// Run a shell command inside the namespace.
    pub(crate) fn sh(&self, script: &str) -> (i32, String, String) {
        let mut args = self.wrapper();
        args.extend(["sh".to_string(), "-c".to_string(), script.to_string()]);
        run(Command::new(&args[0]).args(&args[1..]))
    }
}

impl Drop for MountNs {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

/// Quote for sh.
pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A sparse image file formatted with `mkfs` (e.g. `["mkfs.ext4", "-q", "-F"]`).
pub(crate) fn fs_image(path: &Path, mib: u64, mkfs: &[&str]) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    let (code, _, err) = run(Command::new(mkfs[0]).args(&mkfs[1..]).arg(path));
    assert_eq!(code, 0, "{mkfs:?}: {err}");
}
