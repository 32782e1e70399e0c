//! The revival queue's durable write (SPEC Q-14) and `Enqueue` over D-Bus, against their
//! floors, side by side in one run:
//!
//! - persist: saving the state with 10, 50 and 500 open entries (temp file, fsync, rename,
//!   directory fsync) against the same dance for an empty file in the same directory. Target:
//!   at most 2× the floor at 50 open entries.
//! - enqueue (root only): an `Enqueue` round trip through a private dbus-daemon, including the
//!   durable write, against a `Peer.Ping` round trip to the same agent.
//!
//!     cargo bench --bench queue
//!
//! Not a timed test: the figures are printed and recorded in BENCHMARKS.md.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group};
use outlive::queue::entry::Entry;
use outlive::queue::store::{self, State};
use zbus::wire::Variant;

/// An open entry with the fields a real reporter fills in.
fn entry(i: usize) -> Entry {
    serde_json::from_value(serde_json::json!({
        "id": format!("rq-mwuh{i:04}-{i}"),
        "run_id": format!("agent-run-{i}:7f3a9c@build-host-01"),
        "session": format!("tmux:agent-{i}"),
        "target": {"exec": ["/usr/local/bin/agent", "--resume", format!("--session=agent-{i}"), "--model", "large"],
                   "env": {"AGENT_HOME": "/home/dev/.agent", "PATH": "/usr/local/bin:/usr/bin:/bin"}},
        "uid": 1000, "gid": 1000,
        "cwd": format!("/home/dev/src/project-{i}"),
        "worktree": format!("/home/dev/src/project-{i}/.worktrees/feature-{i}"),
        "class": "interactive",
        "reason": "age-limit (active autonomous run)",
        "active_run": true,
        "run_state_file": format!("/home/dev/.agent/runs/{i}.json"),
        "evidence": ["active-subagent", "uncommitted-worktree-work", "relay-lease"],
        "status": "queued",
        "reaped_at": 1_795_000_000_000u64 + i as u64,
        "queued_at": 1_795_000_000_100u64 + i as u64,
        "waited_ms": 12_345, "calm_ms": 10_000,
        "history": [{"at": 1_795_000_000_100u64 + i as u64, "to": "queued", "by": "enqueue by uid 1000"}]
    }))
    .expect("a valid entry")
}

fn state(n: usize) -> State {
    let mut s = State::empty();
    s.entries = (0..n).map(entry).collect();
    s
}

/// The floor: an empty file written, fsynced, renamed over, and the directory fsynced.
fn floor(dir: &Path) {
    let tmp = dir.join("floor.tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .unwrap();
    f.write_all(b"").unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, dir.join("floor")).unwrap();
    File::open(dir).unwrap().sync_all().unwrap();
}

fn bench_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-queue");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn persist(c: &mut Criterion) {
    let dir = bench_dir();
    let mut g = c.benchmark_group("persist");
    g.bench_function("floor-empty-file", |b| b.iter(|| floor(&dir)));
    for n in [10usize, 50, 500] {
        let s = state(n);
        let bytes = serde_json::to_vec(&s).unwrap().len();
        eprintln!("state with {n} open entries: {bytes} bytes");
        g.bench_with_input(BenchmarkId::new("save", n), &s, |b, s| {
            b.iter(|| store::save(&dir, s).unwrap())
        });
    }
    g.finish();
}

// ---- Enqueue over D-Bus ----------------------------------------------------------------------

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start(dir: &Path) -> (Procs, String) {
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
    let address = format!("unix:path={}", socket.display());
    let cfg = dir.join("outlive.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{0}/state\"\nruntime_dir = \"{0}/run\"\n[journal]\nsocket = \"{0}/none\"\n[queue]\nmax_size = 10000\n",
            dir.display()
        ),
    )
    .unwrap();
    let agent = Command::new(env!("CARGO_BIN_EXE_outlived"))
        .arg("--config")
        .arg(&cfg)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &address)
        .stderr(Stdio::null())
        .spawn()
        .expect("outlived");
    (Procs(vec![agent, bus]), address)
}

fn enqueue(c: &mut Criterion) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "enqueue: skipped (owning org.outlive.Agent1 under the shipped policy needs root)"
        );
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("dbus");
    // A fresh agent every 40 enqueues, so the state stays small (0 to 40 open entries).
    let mut n = 0u64;
    g.bench_function("enqueue-durable", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let chunk = left.min(40);
                left -= chunk;
                let dir = tempfile::tempdir_in(bench_dir()).unwrap();
                let (_procs, address) = start(dir.path());
                total += rt.block_on(async {
                    let conn = loop {
                        if let Ok(c) = zbus::connection::Builder::address(address.as_str())
                            .build()
                            .await
                        {
                            let d = zbus::fdo::DBusProxy::new(&c).await.unwrap();
                            if d.name_has_owner("org.outlive.Agent1".try_into().unwrap())
                                .await
                                .unwrap_or(false)
                            {
                                break c;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    };
                    let t = Instant::now();
                    for _ in 0..chunk {
                        n += 1;
                        let d: HashMap<&str, Variant<'_>> = HashMap::from([
                            ("run_id", Variant::from(format!("bench-{n}"))),
                            ("cwd", Variant::from("/")),
                            ("exec", Variant::from(vec!["/bin/true".to_string()])),
                            (
                                "evidence",
                                Variant::from(vec!["active-subagent".to_string()]),
                            ),
                        ]);
                        conn.call_method(
                            Some("org.outlive.Agent1"),
                            "/org/outlive/Agent1/ResumeQueue",
                            Some("org.outlive.ResumeQueue1"),
                            "Enqueue",
                            &(d,),
                        )
                        .await
                        .unwrap();
                    }
                    t.elapsed()
                });
            }
            total
        })
    });
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let (_procs, address) = start(dir.path());
    let conn = rt.block_on(async {
        loop {
            if let Ok(c) = zbus::connection::Builder::address(address.as_str())
                .build()
                .await
            {
                let d = zbus::fdo::DBusProxy::new(&c).await.unwrap();
                if d.name_has_owner("org.outlive.Agent1".try_into().unwrap())
                    .await
                    .unwrap_or(false)
                {
                    break c;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    g.bench_function("peer-ping", |b| {
        b.iter(|| {
            rt.block_on(conn.call_method(
                Some("org.outlive.Agent1"),
                "/org/outlive/Agent1",
                Some("org.freedesktop.DBus.Peer"),
                "Ping",
                &(),
            ))
            .unwrap()
        })
    });
    g.finish();
}

fn median_us(group: &str, id: &str) -> Option<f64> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("target/criterion/{group}/{id}/new/estimates.json"));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
    v["median"]["point_estimate"].as_f64().map(|ns| ns / 1000.0)
}

criterion_group!(benches, persist, enqueue);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    if let Some(f) = median_us("persist", "floor-empty-file") {
        println!("\npersist floor (empty file: write, fsync, rename, dir fsync): median {f:.1} µs");
        for n in [10, 50, 500] {
            if let Some(s) = median_us("persist", &format!("save/{n}")) {
                let target = if n == 50 { " (target ≤ 2×)" } else { "" };
                println!(
                    "persist with {n} open entries: median {s:.1} µs = {:.2}× the floor{target}",
                    s / f
                );
            }
        }
    }
    if let (Some(e), Some(p)) = (
        median_us("dbus", "enqueue-durable"),
        median_us("dbus", "peer-ping"),
    ) {
        println!(
            "Enqueue round trip with the durable write: median {e:.1} µs; Peer.Ping to the same agent: {p:.1} µs ({:.1}×)",
            e / p
        );
    }
}
