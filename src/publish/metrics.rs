//! The metrics textfile (SPEC X-5): when `metrics.textfile` is set, every tick writes the
//! posture and the queue in Prometheus text format for node_exporter's textfile collector,
//! atomically (a temporary file in the same directory, then rename), so the collector never
//! reads half a file. Whether the last write worked is the `metrics.textfile` guard's runtime.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use crate::posture::rows::{Effective, Row};
use crate::queue::entry::{Entry, Status};

/// What the file says.
pub struct Snapshot<'a> {
    pub rows: &'a [Row],
    pub entries: &'a [Entry],
    pub paused: bool,
    pub revivals_total: u64,
    /// Wall ms of the last tick.
    pub last_tick_wall: Option<u64>,
    pub version: &'a str,
    pub host_id: &'a str,
}

fn status_word(s: &Status) -> &'static str {
    match s {
        Status::Queued => "queued",
        Status::Starting => "starting",
        Status::Revived => "revived",
        Status::Cancelled => "cancelled",
        Status::Invalidated(_) => "invalidated",
        Status::GaveUp(_) => "gave-up",
    }
}

/// Label values here are guard keys, status words, a version and a hex id; escape anyway.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The file's text.
pub fn render(s: &Snapshot<'_>) -> String {
    let mut o = String::new();
    o.push_str(
        "# HELP outlive_guard_state The effective state of each guard (1 for its current state).\n",
    );
    o.push_str("# TYPE outlive_guard_state gauge\n");
    for r in s.rows {
        for e in Effective::ALL {
            o.push_str(&format!(
                "outlive_guard_state{{guard=\"{}\",state=\"{}\"}} {}\n",
                label(&r.key),
                e.as_str(),
                u8::from(r.effective == e.as_str())
            ));
        }
    }
    o.push_str("# HELP outlive_queue_entries Revival queue entries by status.\n");
    o.push_str("# TYPE outlive_queue_entries gauge\n");
    for w in [
        "queued",
        "starting",
        "revived",
        "cancelled",
        "invalidated",
        "gave-up",
    ] {
        let n = s
            .entries
            .iter()
            .filter(|e| status_word(&e.status) == w)
            .count();
        o.push_str(&format!("outlive_queue_entries{{status=\"{w}\"}} {n}\n"));
    }
    o.push_str("# HELP outlive_queue_paused Whether revival is paused.\n");
    o.push_str("# TYPE outlive_queue_paused gauge\n");
    o.push_str(&format!("outlive_queue_paused {}\n", u8::from(s.paused)));
    o.push_str("# HELP outlive_revivals_total Runs revived since outlived started.\n");
    o.push_str("# TYPE outlive_revivals_total counter\n");
    o.push_str(&format!("outlive_revivals_total {}\n", s.revivals_total));
    o.push_str("# HELP outlive_last_tick_timestamp_seconds When the drainer last ticked.\n");
    o.push_str("# TYPE outlive_last_tick_timestamp_seconds gauge\n");
    let t = s.last_tick_wall.map(|ms| ms as f64 / 1000.0).unwrap_or(0.0);
    o.push_str(&format!("outlive_last_tick_timestamp_seconds {t:.3}\n"));
    o.push_str("# HELP outlive_info The agent's version and host id.\n");
    o.push_str("# TYPE outlive_info gauge\n");
    o.push_str(&format!(
        "outlive_info{{version=\"{}\",host_id=\"{}\"}} 1\n",
        label(s.version),
        label(s.host_id)
    ));
    o
}

/// Write `text` to `path` atomically: a temporary file beside it, then rename.
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "metrics".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        // Readable by node_exporter (which does not run as root).
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// How the writes go: the `metrics.textfile` guard's runtime.
#[derive(Debug, Default)]
pub struct Writes {
    inner: Mutex<WritesInner>,
}

#[derive(Debug, Default, Clone)]
pub struct WritesInner {
    /// (boottime, wall) of the last successful write.
    pub last_ok: Option<(u64, u64)>,
    pub last_error: Option<String>,
}

impl Writes {
    pub fn get(&self) -> WritesInner {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Write and record the outcome; the error is returned when it is new (to audit once).
    pub fn write(&self, path: &Path, text: &str) -> Option<String> {
        let r = write_atomic(path, text);
        let mut i = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match r {
            Ok(()) => {
                i.last_ok = Some((crate::clock::boottime_ms(), crate::clock::wall_ms()));
                i.last_error = None;
                None
            }
            Err(e) => {
                let msg = format!("cannot write {}: {e}", path.display());
                let new = i.last_error.as_deref() != Some(msg.as_str());
                i.last_error = Some(msg.clone());
                new.then_some(msg)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, eff: &'static str) -> Row {
        Row {
            key: key.into(),
            description: String::new(),
            effective: eff,
            off_class: None,
            config_enabled: true,
            default_enabled: true,
            runtime_enabled: Some(true),
            dry_run: false,
            stale: false,
            last_tick_at: None,
            reason_code: None,
            load_bearing: false,
            since: 0,
            source: "builtin".into(),
        }
    }

    #[test]
    fn x5_text_format_and_atomic_write() {
        let rows = [
            row("queue.resume", "on-dry-run"),
            row("watchdog", "on-confirmed"),
        ];
        let entries: Vec<Entry> = vec![serde_json::from_value(serde_json::json!({
            "id": "rq-a-1", "run_id": "r", "target": {"exec": ["/bin/true"]}, "uid": 0, "gid": 0,
            "cwd": "/", "class": "interactive", "status": "gave-up:ttl", "reaped_at": 0, "queued_at": 0
        }))
        .unwrap()];
        let t = render(&Snapshot {
            rows: &rows,
            entries: &entries,
            paused: true,
            revivals_total: 3,
            last_tick_wall: Some(1_795_000_000_123),
            version: "0.1.0",
            host_id: "abc",
        });
        assert!(t.contains("outlive_guard_state{guard=\"queue.resume\",state=\"on-dry-run\"} 1\n"));
        assert!(
            t.contains("outlive_guard_state{guard=\"queue.resume\",state=\"on-confirmed\"} 0\n")
        );
        assert!(t.contains("outlive_queue_entries{status=\"gave-up\"} 1\n"));
        assert!(t.contains("outlive_queue_entries{status=\"queued\"} 0\n"));
        assert!(t.contains("outlive_queue_paused 1\n"));
        assert!(t.contains("outlive_revivals_total 3\n"));
        assert!(t.contains("outlive_last_tick_timestamp_seconds 1795000000.123\n"));
        assert!(t.contains("outlive_info{version=\"0.1.0\",host_id=\"abc\"} 1\n"));
        // Every sample line is `name{labels} value` or `name value`.
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = l.rsplit_once(' ').unwrap();
            assert!(v.parse::<f64>().is_ok(), "{l}");
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("outlive.prom");
        let w = Writes::default();
        assert!(w.write(&p, &t).is_none());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), t);
        assert!(w.get().last_ok.is_some());
        let leftovers: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left");
        // A failing write is reported once.
        let bad = d.path().join("missing/outlive.prom");
        assert!(w.write(&bad, &t).is_some());
        assert!(w.write(&bad, &t).is_none());
        assert!(w.get().last_error.is_some());
    }
}
