//! The metrics textfile (SPEC X-5): when `metrics.textfile` is set, every tick writes the
//! posture and the queue in Prometheus text format for node_exporter's textfile collector,
//! atomically (a *replace* of `crate::files`: a temporary file with a random name created
//! O_EXCL|O_NOFOLLOW|O_NONBLOCK in the directory, checked to be a regular file, renamed over
//! the target relative to the directory's descriptor), so the collector never reads half a
//! file and nothing planted in the directory is followed or blocks the agent. The directory
//! must be root's (or, for a user's agent, its user's) and not writable by group or others
//! (§12: `metrics-dir-unsafe`); the checks and the write go through one descriptor of it.
//! Whether the last write worked is the `metrics.textfile` guard's runtime.

use std::path::Path;
use std::sync::Mutex;

use crate::audit::{Event, EventKind, priority};
use crate::files::{Dir, Replace};
use crate::sync::MutexExt;

use crate::posture::getters::status;
use crate::posture::rows::{Effective, REASON_CODES, Row, Runtime, RuntimeRead};
use crate::queue::entry::{Entry, Status};

/// What the file says.
pub(crate) struct Snapshot<'a> {
    pub rows: &'a [Row],
    /// The entries, as held or, while the lock is not, as last read from disk (L-6).
    pub entries: &'a [Entry],
    pub paused: bool,
    /// Whether the queue is enabled, and why not (a G-6 reason code).
    pub queue_enabled: bool,
    pub disabled_reason: &'a str,
    /// The attention item is open (`systemctl status` says DEGRADED).
    pub degraded: bool,
    pub breaker_open: bool,
    pub revivals_total: u64,
    /// Wall ms now, and of the last tick.
    pub now_wall: u64,
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

/// One metric: its help, type and samples (`labels` is `{…}` or empty).
fn metric(o: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, String)]) {
    o.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    for (labels, value) in samples {
        o.push_str(&format!("{name}{labels} {value}\n"));
    }
}

fn one(v: impl ToString) -> Vec<(String, String)> {
    vec![(String::new(), v.to_string())]
}

/// The file's text.
pub(crate) fn render(s: &Snapshot<'_>) -> String {
    let mut o = String::new();
    let guards: Vec<(String, String)> = s
        .rows
        .iter()
        .flat_map(|r| {
            Effective::ALL.iter().map(|e| {
                let labels = format!("{{guard=\"{}\",state=\"{}\"}}", label(&r.key), e.as_str());
                (labels, u8::from(r.effective == e.as_str()).to_string())
            })
        })
        .collect();
    let help = "The effective state of each guard (1 for its current state).";
    metric(&mut o, "outlive_guard_state", "gauge", help, &guards);
    let words = [
        "queued",
        "starting",
        "revived",
        "cancelled",
        "invalidated",
        "gave-up",
    ];
    let entries: Vec<(String, String)> = words
        .iter()
        .map(|w| {
            let n = s
                .entries
                .iter()
                .filter(|e| status_word(&e.status) == *w)
                .count();
            (format!("{{status=\"{w}\"}}"), n.to_string())
        })
        .collect();
    let help = "Revival queue entries by status (read from disk while the queue is disabled).";
    metric(&mut o, "outlive_queue_entries", "gauge", help, &entries);
    queue(&mut o, s);
    agent(&mut o, s);
    o
}

/// The queue's state: enabled and why not, paused, how long the oldest entry has waited.
fn queue(o: &mut String, s: &Snapshot<'_>) {
    // The reason is a label from the closed vocabulary (G-6), empty while enabled.
    let reason = match (s.queue_enabled, REASON_CODES.contains(&s.disabled_reason)) {
        (true, _) => "",
        (false, true) => s.disabled_reason,
        (false, false) => "acquisition-error",
    };
    let enabled = vec![(
        format!("{{reason=\"{reason}\"}}"),
        u8::from(s.queue_enabled).to_string(),
    )];
    let help = "Whether the revival queue accepts and revives runs (reason: why not).";
    metric(o, "outlive_queue_enabled", "gauge", help, &enabled);
    let paused = one(u8::from(s.paused));
    metric(
        o,
        "outlive_queue_paused",
        "gauge",
        "Whether revival is paused.",
        &paused,
    );
    let oldest = s
        .entries
        .iter()
        .filter(|e| e.status.is_open())
        .map(|e| s.now_wall.saturating_sub(e.queued_at))
        .max()
        .unwrap_or(0);
    let help = "How long the oldest open entry has waited since it was queued (0: none).";
    let age = one(format!("{:.3}", oldest as f64 / 1000.0));
    metric(
        o,
        "outlive_queue_oldest_waiting_seconds",
        "gauge",
        help,
        &age,
    );
}

/// The agent's: degraded, the breaker, revivals, the last tick, its version.
fn agent(o: &mut String, s: &Snapshot<'_>) {
    let help = "Whether a safety system needs attention (systemctl status says DEGRADED).";
    metric(
        o,
        "outlive_degraded",
        "gauge",
        help,
        &one(u8::from(s.degraded)),
    );
    let help = "Whether the breaker is open (revival attempts wait out its cooldown).";
    metric(
        o,
        "outlive_breaker_open",
        "gauge",
        help,
        &one(u8::from(s.breaker_open)),
    );
    let help = "Runs revived since outlived started.";
    metric(
        o,
        "outlive_revivals_total",
        "counter",
        help,
        &one(s.revivals_total),
    );
    let t = s.last_tick_wall.map(|ms| ms as f64 / 1000.0).unwrap_or(0.0);
    let help = "When the drainer last ticked.";
    let last = one(format!("{t:.3}"));
    metric(
        o,
        "outlive_last_tick_timestamp_seconds",
        "gauge",
        help,
        &last,
    );
    let info = vec![(
        format!(
            "{{version=\"{}\",host_id=\"{}\"}}",
            label(s.version),
            label(s.host_id)
        ),
        "1".to_string(),
    )];
    metric(
        o,
        "outlive_info",
        "gauge",
        "The agent's version and host id.",
        &info,
    );
}

/// Why the metrics file was not written: a G-6 reason code and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WriteError {
    /// `metrics-dir-unsafe` or `metrics-write-failed`.
    pub code: &'static str,
    pub message: String,
}

/// Write `text` to `path` atomically (see the module doc).
pub(crate) fn write_atomic(path: &Path, text: &str) -> Result<(), WriteError> {
    let failed = |e: String| WriteError {
        code: "metrics-write-failed",
        message: format!("cannot write {}: {e}", path.display()),
    };
    let (Some(parent), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
    else {
        return Err(failed("not a file path".into()));
    };
    let dir = Dir::open(parent).map_err(|e| failed(e.to_string()))?;
    let m = dir.meta().map_err(|e| failed(e.to_string()))?;
    let me = nix::unistd::geteuid().as_raw();
    if (m.uid != 0 && m.uid != me) || m.shared_writable() {
        return Err(WriteError {
            code: "metrics-dir-unsafe",
            message: format!(
                "refusing to write {}: its directory is owned by uid {} with mode {:04o}; it must be root's and \
                 writable by root alone (e.g. metrics.textfile = \"/run/outlive/metrics/outlive.prom\", or a \
                 root-owned 0755 directory granted with a ReadWritePaths= drop-in)",
                path.display(),
                m.uid,
                m.perm
            ),
        });
    }
    // Readable by node_exporter (which does not run as root).
    let how = Replace {
        mode: 0o644,
        owner: None,
        durable: false,
        exclusive: false,
    };
    dir.replace(name, text.as_bytes(), how)
        .map_err(|e| failed(e.to_string()))
}

/// How the writes go: the `metrics.textfile` guard's runtime.
#[derive(Debug, Default)]
pub(crate) struct Writes {
    inner: Mutex<WritesInner>,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct WritesInner {
    /// (boottime, wall) of the last successful write.
    pub last_ok: Option<(u64, u64)>,
    pub last_error: Option<WriteError>,
}

impl Writes {
    pub(crate) fn get(&self) -> WritesInner {
        self.inner.locked().clone()
    }

    /// Write and record the outcome; the error is returned when it is new (to audit once).
    pub(crate) fn write(&self, path: &Path, text: &str) -> Option<WriteError> {
        let r = write_atomic(path, text);
        let mut i = self.inner.locked();
        match r {
            Ok(()) => {
                i.last_ok = Some((crate::clock::boottime_ms(), crate::clock::wall_ms()));
                i.last_error = None;
                None
            }
            Err(e) => {
                let new = i.last_error.as_ref() != Some(&e);
                i.last_error = Some(e.clone());
                new.then_some(e)
            }
        }
    }

    /// One tick's textfile (X-5): the agent's own metrics directory is created first when the
    /// path is in it (`<runtime_dir>/metrics`, root 0755, for node_exporter's
    /// `--collector.textfile.directory`); returns the event to audit when a write fails anew.
    pub(crate) fn publish(&self, path: &Path, runtime_dir: &Path, text: &str) -> Option<Event> {
        if path.parent() == Some(runtime_dir.join("metrics").as_path()) {
            let made = Dir::create(runtime_dir, 0o755).and_then(|d| d.subdir("metrics", 0o755));
            if let Err(e) = made {
                tracing::warn!("cannot create {}/metrics: {e}", runtime_dir.display());
            }
        }
        let err = self.write(path, text)?;
        Some(
            Event::new(
                EventKind::MetricsWriteFailed,
                format!(
                    "{}; the metrics.textfile guard reads off-runtime-divergent ({}) until a write succeeds",
                    err.message, err.code
                ),
            )
            .priority(priority::WARNING)
            .field("reason", err.code),
        )
    }
}

impl Writes {
    /// The `metrics.textfile` guard (G-1): off unless configured; then on while the last write
    /// succeeded, off for the reason of the last failure otherwise.
    pub(crate) fn guard_read(&self, configured: bool) -> RuntimeRead {
        if !configured {
            return status(false);
        }
        let w = self.get();
        RuntimeRead::Status(Runtime {
            enabled: w.last_error.is_none(),
            reason_code: w.last_error.map(|e| e.code.to_string()),
            last_tick_boot: w.last_ok.map(|x| x.0),
            last_tick_wall: w.last_ok.map(|x| x.1),
            ..Runtime::default()
        })
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
            diverged: false,
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
            queue_enabled: true,
            disabled_reason: "",
            degraded: false,
            breaker_open: false,
            revivals_total: 3,
            now_wall: 1_795_000_000_123,
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
        assert!(t.contains("outlive_queue_enabled{reason=\"\"} 1\n"));
        assert!(t.contains("outlive_degraded 0\n"));
        assert!(t.contains("outlive_breaker_open 0\n"));
        assert!(t.contains("outlive_queue_oldest_waiting_seconds 0.000\n"));
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
        assert_eq!(
            w.write(&bad, &t).map(|e| e.code),
            Some("metrics-write-failed")
        );
        assert!(w.write(&bad, &t).is_none());
        assert!(w.get().last_error.is_some());
    }

    /// §12 (security review finding 3): a directory others may write in is refused
    /// (`metrics-dir-unsafe`); links and FIFOs planted there are never followed, never block.
    #[test]
    fn x5_metrics_dir_must_be_safe_and_nothing_planted_is_followed() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("outlive.prom");
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(
            write_atomic(&p, "x 1\n").unwrap_err().code,
            "metrics-dir-unsafe"
        );
        assert!(!p.exists());
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"state").unwrap();
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        for pid in [std::process::id(), 1] {
            let _ = nix::unistd::mkfifo(
                &d.path().join(format!(".outlive.prom.{pid}.tmp")),
                nix::sys::stat::Mode::from_bits_truncate(0o666),
            );
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let p2 = p.clone();
        std::thread::spawn(move || {
            let _ = tx.send(write_atomic(&p2, "x 1\n"));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the write blocked");
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"state");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "x 1\n");
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o644);
    }
}
