//! A private dbus-daemon configured like Debian's system bus (deny by default, holes punched by
//! policy files) that includes the project's own `systemd/org.outlive.Agent1.conf`, so that
//! AccessDenied is asserted against the shipped policy, not assumed (DESIGN §4.2).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{open_tempdir, repo, run};

/// A running private bus. Killed on drop.
pub struct PrivateBus {
    child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub address: String,
    config: PathBuf,
}

/// The system bus configuration, listening on `socket`, including `policy`.
pub fn system_like_config(socket: &Path, policy: &Path) -> String {
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

impl PrivateBus {
    /// Start a bus with the shipped policy.
    pub fn start() -> PrivateBus {
        let dir = open_tempdir();
        let socket = dir.path().join("system_bus_socket");
        let config = dir.path().join("bus.conf");
        std::fs::write(
            &config,
            system_like_config(&socket, &repo().join("systemd/org.outlive.Agent1.conf")),
        )
        .unwrap();
        let (child, address) = spawn(&config);
        PrivateBus {
            child,
            dir,
            socket,
            address,
            config,
        }
    }

    /// Kill the daemon and start a new one on the same socket (bus restart under the agent).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        let (child, address) = spawn(&self.config);
        self.child = child;
        self.address = address;
    }

    /// Stop the daemon.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `busctl --address=… <args>` as the current user.
    pub fn busctl(&self, args: &[&str]) -> (i32, String, String) {
        run(Command::new("busctl")
            .arg(format!("--address={}", self.address))
            .args(args))
    }

    /// `busctl --address=… <args>` as uid/gid nobody.
    pub fn busctl_as_nobody(&self, args: &[&str]) -> (i32, String, String) {
        run(super::as_nobody("busctl")
            .arg(format!("--address={}", self.address))
            .args(args))
    }
}

fn spawn(config: &Path) -> (Child, String) {
    let mut child = Command::new("dbus-daemon")
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
pub trait Agent1 {
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
pub async fn connect(address: &str) -> zbus::Connection {
    zbus::connection::Builder::address(address)
        .build()
        .await
        .expect("connect to the private bus")
}

/// Whether `name` has an owner on the bus.
pub async fn has_owner(conn: &zbus::Connection, name: &str) -> bool {
    let proxy = zbus::fdo::DBusProxy::new(conn).await.unwrap();
    proxy
        .name_has_owner(name.try_into().unwrap())
        .await
        .unwrap_or(false)
}

/// A variant as a string (or its debug text).
pub fn text(v: &zbus::wire::OwnedVariant) -> String {
    String::try_from(v.try_clone().unwrap()).unwrap_or_else(|_| format!("{v:?}"))
}
