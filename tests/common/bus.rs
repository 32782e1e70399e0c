//! A private dbus-daemon configured like Debian's system bus (deny by default, holes punched by
//! policy files) that includes the project's own `systemd/org.outlive.Agent1.conf`, so that
//! AccessDenied is asserted against the shipped policy, not assumed (DESIGN §4.2).
//!
//! With test users ([`PrivateBus::with_users`]) the daemon runs in a mount namespace where
//! `/etc/passwd` and `/etc/group` are the machine's plus a member of group `outlive`, a
//! stranger and a user whose primary group is gid 0; agents that must resolve those groups are started in the same namespace
//! ([`PrivateBus::agent_wrapper`]). The machine's own files are never touched.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{open_tempdir, repo, run};

/// A member of group `outlive` (uid, gid), present only inside [`PrivateBus::with_users`].
pub(crate) const MEMBER: (u32, u32) = (60001, 60001);
/// A user in no special group.
pub(crate) const STRANGER: (u32, u32) = (60002, 60002);
/// A user whose primary group is root's (gid 0): a run as this uid gets gid 0 only when the
/// enqueuer names the group explicitly (SPEC §12 Q-1).
pub(crate) const ROOT_GROUP_USER: (u32, u32) = (60003, 0);
/// The gid of `outlive` inside the test namespace.
pub(crate) const OUTLIVE_GID: u32 = 60000;

/// A running private bus. Killed on drop.
pub(crate) struct PrivateBus {
    child: Child,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) socket: PathBuf,
    pub(crate) address: String,
    config: PathBuf,
    users: bool,
}

/// The system bus configuration, listening on `socket`, including `policy`.
pub(crate) fn system_like_config(socket: &Path, policy: &Path) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="UpdateActivationEnvironment"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"#,
        socket = socket.display(),
        policy = policy.display()
    )
}

/// A policy that lets everyone call everything (to show the agent enforces on its own).
pub(crate) const PERMISSIVE_POLICY: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="root"><allow own="org.outlive.Agent1"/></policy>
  <policy context="default"><allow send_destination="org.outlive.Agent1"/></policy>
</busconfig>
"#;

/// `/etc/passwd` and `/etc/group` of the machine, plus the test users.
fn user_files(dir: &Path) {
    let mut passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd.push_str(&format!(
        "outlive-member:x:{}:{}::/nonexistent:/usr/sbin/nologin\noutlive-stranger:x:{}:{}::/nonexistent:/usr/sbin/nologin\n\
         outlive-rootgroup:x:{}:{}::/nonexistent:/usr/sbin/nologin\n",
        MEMBER.0, MEMBER.1, STRANGER.0, STRANGER.1, ROOT_GROUP_USER.0, ROOT_GROUP_USER.1
    ));
    let mut group: String = std::fs::read_to_string("/etc/group")
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with("outlive:"))
        .map(|l| format!("{l}\n"))
        .collect();
    group.push_str(&format!(
        "outlive:x:{OUTLIVE_GID}:outlive-member\noutlive-member:x:{}:\noutlive-stranger:x:{}:\n",
        MEMBER.1, STRANGER.1
    ));
    std::fs::write(dir.join("passwd"), passwd).unwrap();
    std::fs::write(dir.join("group"), group).unwrap();
}

impl PrivateBus {
    /// Start a bus with the shipped policy.
    pub(crate) fn start() -> PrivateBus {
        PrivateBus::start_with(&repo().join("systemd/org.outlive.Agent1.conf"), false)
    }

    /// Start a bus with the shipped policy in a mount namespace where the test users exist
    /// ([`MEMBER`] in group `outlive`, [`STRANGER`]). Needs root.
    pub(crate) fn with_users() -> PrivateBus {
        PrivateBus::start_with(&repo().join("systemd/org.outlive.Agent1.conf"), true)
    }

    /// Start a bus with another policy file.
    pub(crate) fn start_with(policy: &Path, users: bool) -> PrivateBus {
        let dir = open_tempdir();
        let socket = dir.path().join("system_bus_socket");
        let config = dir.path().join("bus.conf");
        std::fs::write(&config, system_like_config(&socket, policy)).unwrap();
        if users {
            user_files(dir.path());
        }
        let (child, address) = spawn(&config, users.then(|| dir.path()));
        PrivateBus {
            child,
            dir,
            socket,
            address,
            config,
            users,
        }
    }

    /// A wrapper that runs a command in the bus's mount namespace (where the test users
    /// exist), for agents that must see them; empty without test users.
    pub(crate) fn agent_wrapper(&self) -> Vec<String> {
        if !self.users {
            return vec![];
        }
        vec![
            "nsenter".into(),
            "-t".into(),
            self.child.id().to_string(),
            "-m".into(),
            "--".into(),
        ]
    }

    /// Kill the daemon and start a new one on the same socket (bus restart under the agent).
    pub(crate) fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        let (child, address) = spawn(&self.config, self.users.then(|| self.dir.path()));
        self.child = child;
        self.address = address;
    }

    /// Stop the daemon.
    pub(crate) fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `busctl --address=… <args>` as the current user.
    pub(crate) fn busctl(&self, args: &[&str]) -> (i32, String, String) {
        run(Command::new("busctl")
            .arg(format!("--address={}", self.address))
            .args(args))
    }

    /// `busctl --address=… <args>` as uid/gid nobody.
    pub(crate) fn busctl_as_nobody(&self, args: &[&str]) -> (i32, String, String) {
        run(super::as_nobody("busctl")
            .arg(format!("--address={}", self.address))
            .args(args))
    }

    /// `busctl --address=… <args>` as `(uid, gid)` (with its login groups, see [`as_user`]).
    pub(crate) fn busctl_as(&self, who: (u32, u32), args: &[&str]) -> (i32, String, String) {
        run(as_user("busctl", who)
            .arg(format!("--address={}", self.address))
            .args(args))
    }

    /// `outlivectl <args>` against this bus as `(uid, gid)`, with the supplementary groups a
    /// login session of that user would have (dbus-daemon takes a peer's groups from the
    /// process, SO_PEERGROUPS; the agent from the user database).
    pub(crate) fn outlivectl_as(&self, who: (u32, u32), args: &[&str]) -> (i32, String, String) {
        let mut c = as_user(&super::exe_for_others(super::outlivectl()), who);
        c.env("DBUS_SYSTEM_BUS_ADDRESS", &self.address)
            .current_dir("/")
            .args(args);
        run(&mut c)
    }
}

/// A command run as `who` with the supplementary groups its login would have in the test
/// namespace's user database.
pub(crate) fn as_user(program: &str, who: (u32, u32)) -> Command {
    use std::os::unix::process::CommandExt;
    let groups: Vec<libc::gid_t> = if who == MEMBER {
        vec![OUTLIVE_GID, MEMBER.1]
    } else {
        vec![who.1]
    };
    let mut c = Command::new(program);
    let (uid, gid) = who;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

fn spawn(config: &Path, users: Option<&Path>) -> (Child, String) {
    let mut cmd = match users {
        // The daemon resolves `<policy group=…>` through NSS: give it the test users.
        Some(dir) => {
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(format!(
                    "mount --bind {0}/passwd /etc/passwd && mount --bind {0}/group /etc/group && exec \"$@\"",
                    dir.display()
                ))
                .args(["sh", "dbus-daemon"]);
            c
        }
        None => Command::new("dbus-daemon"),
    };
    let mut child = cmd
        .arg(format!("--config-file={}", config.display()))
        .args(["--nofork", "--nopidfile", "--print-address"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn dbus-daemon");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("dbus-daemon address");
    // Without the server guid, like the real system bus address: a client that reconnects
    // after a restart must accept the new daemon's guid.
    let address: String = line
        .trim()
        .split(',')
        .filter(|p| !p.starts_with("guid="))
        .collect::<Vec<_>>()
        .join(",");
    assert!(address.starts_with("unix:"), "dbus-daemon printed {line:?}");
    (child, address)
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A client proxy for `org.outlive.Agent1` (tests).
#[zbus::proxy(
    interface = "org.outlive.Agent1",
    default_service = "org.outlive.Agent1",
    default_path = "/org/outlive/Agent1"
)]
pub(crate) trait Agent1 {
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn host_id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn hostname(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn boot_id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn status_text(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn degraded(&self) -> zbus::Result<bool>;
    fn get_host_facts(
        &self,
    ) -> zbus::Result<std::collections::HashMap<String, zbus::wire::OwnedVariant>>;
    fn classify_path(
        &self,
        path: &str,
    ) -> zbus::Result<std::collections::HashMap<String, zbus::wire::OwnedVariant>>;
}

/// A zbus connection to `address` as the current user.
pub(crate) async fn connect(address: &str) -> zbus::Connection {
    zbus::connection::Builder::address(address)
        .build()
        .await
        .expect("connect to the private bus")
}

/// Whether `name` has an owner on the bus.
pub(crate) async fn has_owner(conn: &zbus::Connection, name: &str) -> bool {
    let proxy = zbus::fdo::DBusProxy::new(conn).await.unwrap();
    proxy
        .name_has_owner(name.try_into().unwrap())
        .await
        .unwrap_or(false)
}

/// A variant as a string (or its debug text).
pub(crate) fn text(v: &zbus::wire::OwnedVariant) -> String {
    String::try_from(v.try_clone().unwrap()).unwrap_or_else(|_| format!("{v:?}"))
}
