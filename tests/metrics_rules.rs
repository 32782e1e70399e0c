//! The metrics as a Prometheus user meets them (issue 15, 2): the agent's textfile passes
//! `promtool check metrics`, and the example alert rules (`packaging/prometheus/`) pass
//! `promtool check rules` and their own `promtool test rules` file (a run queued while the queue
//! has been disabled for 10 minutes fires the alert; an enabled queue fires nothing).
//!
//! promtool comes from `$PROMTOOL`, the `PATH`, or Debian's package unpacked by `.ci/run`
//! into `target/tools/prometheus`.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Agent, AgentSpec, TestSocket, repo, require, run};

fn promtool() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PROMTOOL") {
        return Some(PathBuf::from(p));
    }
    let unpacked = repo().join("target/tools/prometheus/usr/bin/promtool");
    if unpacked.is_file() {
        return Some(unpacked);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    })
}

#[test]
fn x5_the_alert_rules_pass_promtool_and_their_tests() {
    let tool = promtool();
    if !require(
        tool.is_some(),
        "promtool (.ci/run unpacks Debian's prometheus package)",
    ) {
        return;
    }
    let tool = tool.unwrap();
    let dir = repo().join("packaging/prometheus");
    let (code, out, err) =
        run(Command::new(&tool)
            .current_dir(&dir)
            .args(["check", "rules", "outlive.rules.yml"]));
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = run(Command::new(&tool).current_dir(&dir).args([
        "test",
        "rules",
        "outlive.rules.test.yml",
    ]));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn x5_the_textfile_passes_promtool_check_metrics() {
    let tool = promtool();
    if !require(
        tool.is_some(),
        "promtool (.ci/run unpacks Debian's prometheus package)",
    ) {
        return;
    }
    let d = common::open_tempdir();
    let run_dir = d.path().join("run");
    let prom = run_dir.join("metrics/outlive.prom");
    let n = TestSocket::notify();
    let a = Agent::start(AgentSpec {
        notify: Some(n.path.clone()),
        runtime_dir: Some(run_dir),
        toml: format!(
            "[drainer]\ninterval_sec = 1\n[metrics]\ntextfile = {:?}\n",
            prom.display().to_string()
        ),
        ..AgentSpec::default()
    });
    let end = Instant::now() + Duration::from_secs(15);
    while !prom.exists() {
        assert!(Instant::now() < end, "no textfile: {}", a.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read(&prom).unwrap();
    let mut child = Command::new(tool.unwrap())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&text).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics:\n{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&text)
    );
}
