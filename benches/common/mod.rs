//! Shared by the D-Bus benchmarks: a private dbus-daemon with the shipped policy and an
//! `outlived` on it, a connection once the agent owns its name, and criterion's estimates.
#![allow(dead_code, reason = "each bench uses a part of these helpers")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Processes killed when dropped.
pub(crate) struct Procs(pub(crate) Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where benchmarks keep files (on the disk, not a tmpfs).
pub(crate) fn bench_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A system-like dbus-daemon with the shipped policy, listening in `dir`; returns it and its
/// address.
pub(crate) fn start_bus(dir: &Path) -> (Child, String) {
    let socket = dir.join("bus");
    let conf = dir.join("bus.conf");
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/org.outlive.Agent1.conf");
    std::fs::write(
        &conf,
        format!(
            r#"<busconfig><type>system</type><auth>EXTERNAL</auth><listen>unix:path={}</listen>
<policy context="default"><allow user="*"/><deny own="*"/><deny send_type="method_call"/>
<allow send_type="signal"/><allow send_requested_reply="true" send_type="method_return"/>
<allow send_requested_reply="true" send_type="error"/><allow receive_type="method_call"/>
<allow receive_type="method_return"/><allow receive_type="error"/><allow receive_type="signal"/>
<allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/></policy>
<include>{}</include></busconfig>"#,
            socket.display(),
            policy.display()
        ),
    )
    .unwrap();
    let mut bus = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", conf.display()))
        .args(["--nofork", "--nopidfile", "--print-address"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("dbus-daemon");
    let mut line = String::new();
    BufReader::new(bus.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (bus, format!("unix:path={}", socket.display()))
}

/// An agent on the bus at `address`, its state and configuration in `dir` (`extra` appended
/// to its configuration), with `env` added to its environment.
pub(crate) fn spawn_agent(dir: &Path, address: &str, extra: &str, env: &[(&str, &str)]) -> Child {
    let cfg = dir.join("outlive.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{0}/state\"\nruntime_dir = \"{0}/run\"\n[journal]\nsocket = \"{0}/none\"\n{extra}",
            dir.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outlived"));
    cmd.arg("--config")
        .arg(&cfg)
        .env("DBUS_SYSTEM_BUS_ADDRESS", address)
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("outlived")
}

/// A system-like dbus-daemon with the shipped policy, and an agent with `extra` appended to its
/// configuration (`outlive.toml` in `dir`; drop-ins may already be in `dir/guards.d`).
pub(crate) fn start(dir: &Path, extra: &str) -> (Procs, String) {
    let (bus, address) = start_bus(dir);
    let agent = spawn_agent(dir, &address, extra, &[]);
    (Procs(vec![agent, bus]), address)
}

/// A connection to `address` once `org.outlive.Agent1` is owned.
pub(crate) async fn connect_when_owned(address: &str) -> zbus::Connection {
    loop {
        if let Ok(c) = zbus::connection::Builder::address(address).build().await {
            let d = zbus::fdo::DBusProxy::new(&c).await.unwrap();
            if d.name_has_owner("org.outlive.Agent1".try_into().unwrap())
                .await
                .unwrap_or(false)
            {
                return c;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A benchmark's median from criterion's estimates, in µs.
pub(crate) fn median_us(group: &str, id: &str) -> Option<f64> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("target/criterion/{group}/{id}/new/estimates.json"));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
    v["median"]["point_estimate"].as_f64().map(|ns| ns / 1000.0)
}
