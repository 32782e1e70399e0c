//! `GetGuards` with 50 guards (SPEC §6, X-1) through a private dbus-daemon, against a
//! `Peer.Ping` to the same agent (the same hops, no work) in the same run. Target: at most 2×.
//! The bus daemon's own `GetId` is printed for context (one hop fewer).
//!
//!     cargo bench --bench posture          # needs root (owning org.outlive.Agent1)
//!
//! Not a timed test: the figures are printed and recorded in BENCHMARKS.md.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;

use common::{bench_dir, connect_when_owned, median_us, start};
use criterion::{Criterion, criterion_group};
use outlive::publish::dbus::guards1::RowWire;
use zbus::wire::OwnedVariant;

/// 41 external guards, so that with the nine built-in ones the agent has 50 rows.
fn dropins(dir: &std::path::Path) {
    let g = dir.join("guards.d");
    std::fs::create_dir_all(&g).unwrap();
    std::fs::set_permissions(&g, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut text = String::new();
    for i in 0..41 {
        text.push_str(&format!(
            "[[guard]]\nkey = \"bench.guard-{i:02}\"\ndescription = \"benchmark guard {i}\"\n\
             default_enabled = true\nenabled = true\ncadence_ms = 60000\n\n"
        ));
    }
    let f = g.join("50-bench.toml");
    std::fs::write(&f, text).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
}

#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn get_guards(c: &mut Criterion) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "posture: skipped (owning org.outlive.Agent1 under the shipped policy needs root)"
        );
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir_in(bench_dir("bench-posture")).unwrap();
    dropins(dir.path());
    let (_procs, address) = start(dir.path(), "");
    let conn = rt.block_on(connect_when_owned(&address));
    // Wait for the first evaluation to publish every row.
    let rows = rt.block_on(async {
        loop {
            let r = conn
                .call_method(
                    Some("org.outlive.Agent1"),
                    "/org/outlive/Agent1/Guards",
                    Some("org.outlive.Guards1"),
                    "GetGuards",
                    &(),
                )
                .await
                .unwrap();
            let rows: Vec<HashMap<String, OwnedVariant>> = r.body().deserialize().unwrap();
            if rows.len() == 50 {
                break rows.len();
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    });
    eprintln!("GetGuards returns {rows} rows");
    let mut g = c.benchmark_group("posture");
    g.bench_function("get-guards-50", |b| {
        b.iter(|| {
            let r = rt
                .block_on(conn.call_method(
                    Some("org.outlive.Agent1"),
                    "/org/outlive/Agent1/Guards",
                    Some("org.outlive.Guards1"),
                    "GetGuards",
                    &(),
                ))
                .unwrap();
            // A typed client, as a zbus proxy decodes: straight into the row struct.
            let rows: Vec<RowWire> = r.body().deserialize().unwrap();
            assert_eq!(rows.len(), 50);
        })
    });
    g.bench_function("get-guards-50-generic-client", |b| {
        b.iter(|| {
            let r = rt
                .block_on(conn.call_method(
                    Some("org.outlive.Agent1"),
                    "/org/outlive/Agent1/Guards",
                    Some("org.outlive.Guards1"),
                    "GetGuards",
                    &(),
                ))
                .unwrap();
            // A generic client: every row into a map of variants.
            let rows: Vec<HashMap<String, OwnedVariant>> = r.body().deserialize().unwrap();
            assert_eq!(rows.len(), 50);
        })
    });
    g.bench_function("get-guards-50-no-decode", |b| {
        b.iter(|| {
            std::hint::black_box(
                rt.block_on(conn.call_method(
                    Some("org.outlive.Agent1"),
                    "/org/outlive/Agent1/Guards",
                    Some("org.outlive.Guards1"),
                    "GetGuards",
                    &(),
                ))
                .unwrap(),
            )
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
    g.bench_function("bus-get-id", |b| {
        b.iter(|| {
            rt.block_on(conn.call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "GetId",
                &(),
            ))
            .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, get_guards);

fn main() {
    benches();
    enc();
    tr();
    Criterion::default().configure_from_args().final_summary();
    if let (Some(gg), Some(p), Some(id)) = (
        median_us("posture", "get-guards-50"),
        median_us("posture", "peer-ping"),
        median_us("posture", "bus-get-id"),
    ) {
        println!(
            "\nGetGuards with 50 guards, typed client: median {gg:.1} µs; Peer.Ping to the same agent: {p:.1} µs ({:.2}×, target ≤ 2×); the bus daemon's GetId: {id:.1} µs",
            gg / p
        );
        if let (Some(generic), Some(raw)) = (
            median_us("posture", "get-guards-50-generic-client"),
            median_us("posture", "get-guards-50-no-decode"),
        ) {
            println!(
                "GetGuards with a generic client (a{{sv}} maps): {generic:.1} µs ({:.2}×); the reply received but not decoded: {raw:.1} µs ({:.2}×)",
                generic / p,
                raw / p
            );
        }
    }
    if let (Some(e), Some(dg), Some(dt)) = (
        median_us("encode-50", ""),
        median_us("decode-50-generic", ""),
        median_us("decode-50-typed", ""),
    ) {
        println!(
            "50 rows encoded by zbus: {e:.1} µs; decoded into maps: {dg:.1} µs; into the row struct: {dt:.1} µs"
        );
    }
    if let (Some(b0), Some(b15), Some(ri)) = (
        median_us("blob-0", ""),
        median_us("blob-15602", ""),
        median_us("rows-inproc", ""),
    ) {
        println!(
            "context, a bare zbus service on a permissive bus: empty reply {b0:.1} µs; 15,602 opaque bytes {b15:.1} µs; the same 50 rows as aa{{sv}} {ri:.1} µs"
        );
    }
}

fn encode(c: &mut Criterion) {
    let row = |i: usize| RowWire {
        key: format!("bench.guard-{i:02}"),
        description: format!("benchmark guard {i}"),
        effective: "missing".into(),
        off_class: None,
        config_enabled: true,
        default_enabled: true,
        runtime_enabled: None,
        dry_run: false,
        stale: false,
        last_tick_at: None,
        reason_code: None,
        diverged: false,
        load_bearing: false,
        since: 1_795_000_000_000,
        source: "50-bench.toml".into(),
    };
    let rows: Vec<RowWire> = (0..50).map(row).collect();
    let ctxt = zbus::wire::serialized::Context::new(zbus::wire::Endian::Little, 0);
    let bytes = zbus::wire::to_bytes(ctxt, &rows).unwrap();
    eprintln!("50 rows: {} bytes", bytes.len());
    c.bench_function("encode-50", |b| {
        b.iter(|| zbus::wire::to_bytes(ctxt, &rows).unwrap())
    });
    c.bench_function("decode-50-generic", |b| {
        b.iter(|| {
            let v: (Vec<HashMap<String, OwnedVariant>>, _) = bytes.deserialize().unwrap();
            v
        })
    });
    c.bench_function("decode-50-typed", |b| {
        b.iter(|| {
            let v: (Vec<RowWire>, _) = bytes.deserialize().unwrap();
            v
        })
    });
}

criterion_group!(enc, encode);

/// Context: what the reply's format costs by itself, without the agent. A bare zbus service
/// answers an empty reply, 15,602 opaque bytes (`ay`, the size of the 50 rows), and the same 50
/// rows as `aa{sv}`, through a permissive session bus.
struct Blob;

#[zbus::interface(name = "org.outlive.BenchBlob")]
impl Blob {
    fn blob(&self, n: u32) -> Vec<u8> {
        vec![7u8; n as usize]
    }
    fn rows(&self) -> Vec<RowWire> {
        (0..50)
            .map(|i| RowWire {
                key: format!("bench.guard-{i:02}"),
                description: format!("benchmark guard {i}"),
                effective: "missing".into(),
                off_class: None,
                config_enabled: true,
                default_enabled: true,
                runtime_enabled: None,
                dry_run: false,
                stale: false,
                last_tick_at: None,
                reason_code: None,
                diverged: false,
                load_bearing: false,
                since: 1_795_000_000_000,
                source: "50-bench.toml".into(),
            })
            .collect()
    }
}

fn transfer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir_in(bench_dir("bench-posture")).unwrap();
    let sock = dir.path().join("s");
    let mut d = std::process::Command::new("dbus-daemon")
        .args(["--session", "--nofork", "--print-address"])
        .arg(format!("--address=unix:path={}", sock.display()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(d.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let _procs = common::Procs(vec![d]);
    let address = line.trim().to_string();
    let conn = rt.block_on(async {
        zbus::connection::Builder::address(address.as_str())
            .build()
            .await
            .unwrap()
    });
    let server = rt.block_on(async {
        zbus::connection::Builder::address(address.as_str())
            .serve_at("/blob", Blob)
            .build()
            .await
            .unwrap()
    });
    let dest = server.unique_name().unwrap().to_string();
    c.bench_function("rows-inproc", |b| {
        b.iter(|| {
            rt.block_on(conn.call_method(
                Some(dest.as_str()),
                "/blob",
                Some("org.outlive.BenchBlob"),
                "Rows",
                &(),
            ))
            .unwrap()
        })
    });
    for n in [0u32, 15602] {
        c.bench_function(&format!("blob-{n}"), |b| {
            b.iter(|| {
                rt.block_on(conn.call_method(
                    Some(dest.as_str()),
                    "/blob",
                    Some("org.outlive.BenchBlob"),
                    "Blob",
                    &(n,),
                ))
                .unwrap()
            })
        });
    }
}
criterion_group!(tr, transfer);
