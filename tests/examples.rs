//! The client examples (`examples/`) run against the agent on a private bus with the shipped
//! policy, so that they cannot rot: each reads the posture, queues a run, reports a guard
//! declared in a drop-in and sees the agent announce the changed row (PostureChanged).

mod common;

use std::process::Command;
use std::time::Duration;

use common::bus::PrivateBus;
use common::{Agent, AgentSpec, TestSocket, repo, require, require_root, require_tools, run};

const DROPIN: &str = "[[guard]]\nkey = \"example.backup\"\ndescription = \"the example's backups\"\n\
                      default_enabled = true\nenabled = true\n";

fn agent(bus: &PrivateBus) -> (Agent, TestSocket, TestSocket) {
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let a = Agent::start(AgentSpec {
        dropins: vec![("50-example.toml".into(), DROPIN.into(), 0)],
        ..common::bus_spec(bus, &n, &j)
    });
    n.wait_for("READY=1", Duration::from_secs(15), |d| d.has("READY", "1"));
    (a, n, j)
}

fn entries(bus: &PrivateBus) -> String {
    let (code, out, err) = bus.outlivectl_as((0, 0), &["--json", "queue"]);
    assert_eq!(code, 0, "{err}");
    out
}

#[test]
fn the_python_client_example_runs() {
    let have = Command::new("python3")
        .args(["-c", "import dbus_next"])
        .status()
        .is_ok_and(|s| s.success());
    if !(require_root("owning org.outlive.Agent1 under the shipped policy")
        && require_tools(&["dbus-daemon", "python3"])
        && require(have, "the python module dbus_next (pip install dbus-next)"))
    {
        return;
    }
    let bus = PrivateBus::start();
    let (_a, _n, _j) = agent(&bus);
    let (code, out, err) = run(Command::new("python3")
        .arg(repo().join("examples/outlive_client.py"))
        .args(["--run-id", "py-example", "--report-guard", "example.backup"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("posture:"), "{out}");
    assert!(
        out.contains("enqueue: admitted=True why='' id='rq-"),
        "{out}"
    );
    assert!(
        out.contains("PostureChanged: example.backup is on-confirmed"),
        "{out}"
    );
    assert!(
        entries(&bus).contains("py-example"),
        "the run is not queued"
    );
}

#[test]
fn the_shell_client_example_runs() {
    if !(require_root("owning org.outlive.Agent1 and monitoring the bus")
        && require_tools(&["dbus-daemon", "busctl", "timeout"]))
    {
        return;
    }
    let bus = PrivateBus::start();
    let (_a, _n, _j) = agent(&bus);
    let (code, out, err) = run(Command::new("sh")
        .arg(repo().join("examples/outlive-client.sh"))
        .args(["sh-example", "example.backup"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("a{su}"), "the Summary property: {out}");
    assert!(
        out.contains("bss true \"\" \"rq-"),
        "the Enqueue reply: {out}"
    );
    assert!(
        out.contains("PostureChanged after reporting example.backup"),
        "{out}"
    );
    assert!(
        entries(&bus).contains("sh-example"),
        "the run is not queued"
    );
}
