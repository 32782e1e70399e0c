//! Classifying a path in-process (mount table + statfs on the facts worker, SPEC H-3) against
//! spawning `df -P <path>` and parsing its output, side by side in one run. The ratio of the
//! medians is printed at the end and recorded in BENCHMARKS.md (target: at least 50×).
//!
//!     cargo bench --bench classify
//!
//! Not a timed test: CI may run it briefly (`-- --measurement-time 1`) to keep it working.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use criterion::{Criterion, criterion_group};
use outlive::facts::Facts;

fn target() -> PathBuf {
    std::env::var_os("OUTLIVE_BENCH_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib"))
}

/// What a script gets from `df -P`: the filesystem source and the mount point.
fn df(path: &Path) -> (String, String) {
    let out = Command::new("df")
        .arg("-P")
        .arg(path)
        .output()
        .expect("run df");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().nth(1).expect("df output");
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[0].to_string(), f[f.len() - 1].to_string())
}

fn bench(c: &mut Criterion) {
    let path = target();
    let facts = Facts::new(Duration::from_secs(3));
    // Both sides must answer about the same mount.
    let ours = facts.classify_path(&path).expect("classify");
    let (_, mount) = df(&path);
    assert_eq!(
        ours.evidence.mount_point,
        Path::new(&mount),
        "df and the mount table disagree"
    );

    let mut g = c.benchmark_group("classify-path");
    g.bench_function("in-process", |b| {
        b.iter(|| facts.classify_path(std::hint::black_box(&path)).unwrap())
    });
    g.bench_function("spawn-df", |b| b.iter(|| df(std::hint::black_box(&path))));
    g.finish();
}

fn median_ns(id: &str) -> Option<f64> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!(
        "target/criterion/classify-path/{id}/new/estimates.json"
    ));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
    v["median"]["point_estimate"].as_f64()
}

criterion_group!(benches, bench);

/// Median of `n` calls, each after 5 ms of idleness (threads parked, CPUs possibly halted):
/// what one classification costs an agent that is mostly idle.
fn cold_median_us(n: usize, mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(5));
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[n / 2]
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    let path = target();
    if let (Some(a), Some(b)) = (median_ns("in-process"), median_ns("spawn-df")) {
        println!(
            "\nclassify {}: in-process median {:.1} µs, spawn df -P median {:.1} µs: {:.0}× faster (target ≥ 50×)",
            path.display(),
            a / 1000.0,
            b / 1000.0,
            b / a
        );
    }
    let facts = Facts::new(Duration::from_secs(3));
    let a = cold_median_us(101, || drop(facts.classify_path(&path).unwrap()));
    let b = cold_median_us(101, || drop(df(&path)));
    println!(
        "cold (after 5 ms idle): in-process median {a:.1} µs, spawn df -P median {b:.1} µs: {:.1}× faster",
        b / a
    );
}
