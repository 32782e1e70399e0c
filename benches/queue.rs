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
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;

use common::{connect_when_owned, median_us, start};
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
    common::bench_dir("bench-queue")
}

fn persist(c: &mut Criterion) {
    let dir = bench_dir();
    let d = outlive::files::Dir::open(&dir).unwrap();
    let mut g = c.benchmark_group("persist");
    g.bench_function("floor-empty-file", |b| b.iter(|| floor(&dir)));
    for n in [10usize, 50, 500] {
        let s = state(n);
        let bytes = serde_json::to_vec(&s).unwrap().len();
        eprintln!("state with {n} open entries: {bytes} bytes");
        g.bench_with_input(BenchmarkId::new("save", n), &s, |b, s| {
            b.iter(|| store::save(&d, s).unwrap())
        });
    }
    g.finish();
}

// ---- Enqueue over D-Bus ----------------------------------------------------------------------

#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
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
                let (_procs, address) = start(dir.path(), "[queue]\nmax_size = 10000\n");
                total += rt.block_on(async {
                    let conn = connect_when_owned(&address).await;
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
    let (_procs, address) = start(dir.path(), "[queue]\nmax_size = 10000\n");
    let conn = rt.block_on(connect_when_owned(&address));
    // `List` with 50 open entries (issue "Prove it": at most 2× a Peer.Ping), on the agent the
    // ping goes to.
    rt.block_on(async {
        for i in 0..50 {
            let d: HashMap<&str, Variant<'_>> = HashMap::from([
                ("run_id", Variant::from(format!("list-{i}"))),
                ("cwd", Variant::from("/")),
                (
                    "exec",
                    Variant::from(vec!["/usr/bin/agent".to_string(), "--resume".to_string()]),
                ),
                (
                    "evidence",
                    Variant::from(vec!["active-subagent".to_string()]),
                ),
                ("reason", Variant::from("age-limit")),
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
    });
    g.bench_function("list-50", |b| {
        b.iter(|| {
            let r = rt
                .block_on(conn.call_method(
                    Some("org.outlive.Agent1"),
                    "/org/outlive/Agent1/ResumeQueue",
                    Some("org.outlive.ResumeQueue1"),
                    "List",
                    &(),
                ))
                .unwrap();
            std::hint::black_box(r.body().len())
        })
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
        if let Some(l) = median_us("dbus", "list-50") {
            println!(
                "List with 50 open entries: median {l:.1} µs = {:.2}× the Peer.Ping (target ≤ 2×)",
                l / p
            );
        }
    }
}
