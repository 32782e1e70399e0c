//! The durable state file (SPEC Q-14, Q-15, as amended in §12): `resume-queue.json` in the
//! state directory, written only through the state directory's descriptor the lock holder has
//! (`crate::files`).
//!
//! Every save is a *replace*: a temporary file with a random name, fsynced, renamed over the
//! state file, and the directory fsynced, so a crash at any moment leaves either the old state
//! or the new one, never a mixture. Files are 0600 in a 0700 directory.
//!
//! Loading salvages (Q-15 as amended): every entry, stop and ledger row that parses is kept;
//! those that do not are set aside, with why, in a sidecar `resume-queue.corrupt-<ms>.json`
//! beside the state file, and the caller raises a notice that stays until acknowledged. A
//! pause or a global stop that cannot be read is not dropped: the queue loads paused
//! (`maintenance`) until an operator has looked (fail closed). Only a file that is not a JSON
//! object of version 1 as a whole is copied aside byte for byte, the queue starting empty; if
//! a copy cannot be written, the file is left in place and the caller disables the queue.
//! Either way new ids stay above every id found in the file (Q-1: ids are never reused).

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::entry::Entry;
use super::rules::{Ledger, Pause, PauseKind};
use crate::files::{Dir, Replace, ReplaceError};

/// The largest state file read (50 open and 500 terminal entries with their history are a
/// small fraction of it).
pub const MAX_STATE_BYTES: u64 = 16 * 1024 * 1024;

/// The state file's name.
pub const STATE_FILE: &str = "resume-queue.json";
/// The state format version.
pub const STATE_VERSION: u32 = 1;

/// A durable per-run operator stop (Q-9).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStop {
    pub run_id: String,
    pub at: u64,
}

/// Everything the queue persists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// Wall ms of the save (a restart advances waiting time by the wall delta since, clamped ≥ 0).
    #[serde(default)]
    pub saved_at: u64,
    #[serde(default)]
    pub last_id_ms: u64,
    #[serde(default)]
    pub id_seq: u64,
    #[serde(default)]
    pub entries: Vec<Entry>,
    #[serde(default)]
    pub ledger: Ledger,
    #[serde(default)]
    pub stops: Vec<RunStop>,
    /// Watch records (C-2). Shared with the published view until a commit changes them (an
    /// idle agent with hundreds of watched runs keeps one copy, and republishing copies none).
    #[serde(default, skip_serializing_if = "no_runs")]
    pub runs: Arc<Vec<super::runs::RunRecord>>,
    /// Wall ms of the last global stop (`StopAll`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_stop: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<Pause>,
    /// Wall ms since the queue first ran in dry run (G-7 soak); None when not in dry run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run_since: Option<u64>,
}

fn no_runs(runs: &Arc<Vec<super::runs::RunRecord>>) -> bool {
    runs.is_empty()
}

impl State {
    /// The watch records, to change (copied first while the published view shares them).
    pub fn runs_mut(&mut self) -> &mut Vec<super::runs::RunRecord> {
        Arc::make_mut(&mut self.runs)
    }

    /// An empty state.
    pub fn empty() -> State {
        State {
            version: STATE_VERSION,
            ..State::default()
        }
    }
}

/// One item set aside while loading (Q-15 as amended).
#[derive(Debug, Clone, PartialEq)]
pub struct SetAside {
    /// The state field it came from (`entries`, `stops`, `ledger`, `pause`, …).
    pub field: String,
    /// Its index (arrays) or key (maps), when it is one item of a field.
    pub at: Option<String>,
    pub why: String,
    /// The item as found.
    pub raw: serde_json::Value,
}

/// A state file read item by item.
#[derive(Debug, Clone, PartialEq)]
pub struct Salvaged {
    pub state: State,
    pub set_aside: Vec<SetAside>,
    /// Why the queue loads paused: a pause or a global stop could not be read.
    pub paused_because: Option<String>,
}

/// What loading found.
#[derive(Debug)]
pub enum Loaded {
    /// No state file yet.
    Fresh,
    /// The state; items that did not parse were set aside in `sidecar`.
    State {
        state: Box<State>,
        set_aside: Vec<SetAside>,
        sidecar: Option<PathBuf>,
        paused_because: Option<String>,
    },
    /// Not a usable state file as a whole: copied byte for byte to `sidecar`; start empty, with
    /// new ids above `id_floor_ms`.
    Corrupt {
        why: String,
        sidecar: PathBuf,
        id_floor_ms: u64,
    },
    /// Corrupt (or items set aside) and the copy could not be written: the file is left in place.
    CorruptUncopied { why: String, error: String },
    /// The file exists but cannot be read (permissions, I/O, not a regular file, too large).
    Unreadable(String),
}

fn check_version(
    v: &serde_json::Value,
) -> Result<&serde_json::Map<String, serde_json::Value>, String> {
    let obj = v.as_object().ok_or("not a JSON object")?;
    match obj.get("version").and_then(|x| x.as_u64()) {
        Some(n) if n == STATE_VERSION as u64 => Ok(obj),
        Some(n) => Err(format!("unknown version {n}")),
        None => Err("no version".into()),
    }
}

/// Parse a state file's bytes strictly (Q-15: unknown versions are corrupt; any malformed item
/// fails the whole). Loading uses [`salvage`].
pub fn parse(bytes: &[u8]) -> Result<State, String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    check_version(&v)?;
    serde_json::from_value(v).map_err(|e| format!("malformed: {e}"))
}

/// The largest millisecond part of any queue id (`rq-<ms base36>-…`) anywhere in `bytes`, so
/// that new ids never repeat one that was set aside (Q-1).
pub fn id_floor_ms(bytes: &[u8]) -> u64 {
    let mut best = 0u64;
    let mut i = 0;
    while let Some(p) = bytes[i..].windows(3).position(|w| w == b"rq-") {
        let start = i + p + 3;
        let end = bytes[start..]
            .iter()
            .position(|c| !(c.is_ascii_digit() || c.is_ascii_lowercase()))
            .map_or(bytes.len(), |n| start + n);
        if end > start && end - start <= 12 && bytes.get(end) == Some(&b'-') {
            let digits = std::str::from_utf8(&bytes[start..end]).unwrap_or("");
            if let Ok(ms) = u64::from_str_radix(digits, 36) {
                best = best.max(ms);
            }
        }
        i = start;
    }
    best
}

/// Q-15 as amended: read the state item by item. `Err` only when the file is not a JSON object
/// of a known version as a whole.
#[expect(clippy::too_many_lines, reason = "Q-15's salvage, field by field")]
pub fn salvage(bytes: &[u8], now_ms: u64) -> Result<Salvaged, String> {
    use serde_json::Value;
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let obj = check_version(&v)?;
    let mut st = State::empty();
    let mut aside = Vec::new();
    let mut fail_closed = Vec::new();
    let mut put_aside = |field: &str, at: Option<String>, why: String, raw: &Value| {
        aside.push(SetAside {
            field: field.to_string(),
            at,
            why,
            raw: raw.clone(),
        })
    };
    for (field, slot) in [
        ("saved_at", &mut st.saved_at),
        ("last_id_ms", &mut st.last_id_ms),
        ("id_seq", &mut st.id_seq),
    ] {
        match obj.get(field) {
            None => {}
            Some(x) => match x.as_u64() {
                Some(n) => *slot = n,
                None => put_aside(field, None, "not a non-negative integer".into(), x),
            },
        }
    }
    match obj.get("entries") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, x) in items.iter().enumerate() {
                match serde_json::from_value::<Entry>(x.clone()) {
                    Ok(e) if st.entries.iter().any(|o| o.id == e.id) => put_aside(
                        "entries",
                        Some(i.to_string()),
                        format!("a second entry with id {}", e.id),
                        x,
                    ),
                    Ok(e) => st.entries.push(e),
                    Err(e) => put_aside("entries", Some(i.to_string()), e.to_string(), x),
                }
            }
        }
        Some(x) => put_aside("entries", None, "not an array".into(), x),
    }
    match obj.get("ledger") {
        None | Some(Value::Null) => {}
        Some(Value::Object(rows)) => {
            for (key, x) in rows {
                match serde_json::from_value::<Vec<u64>>(x.clone()) {
                    Ok(at) => {
                        st.ledger.0.insert(key.clone(), at);
                    }
                    Err(e) => put_aside("ledger", Some(key.clone()), e.to_string(), x),
                }
            }
        }
        Some(x) => put_aside("ledger", None, "not an object".into(), x),
    }
    match obj.get("stops") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, x) in items.iter().enumerate() {
                match serde_json::from_value::<RunStop>(x.clone()) {
                    Ok(stop) => st.stops.push(stop),
                    Err(e) => put_aside("stops", Some(i.to_string()), e.to_string(), x),
                }
            }
        }
        Some(x) => put_aside("stops", None, "not an array".into(), x),
    }
    match obj.get("runs") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, x) in items.iter().enumerate() {
                match serde_json::from_value::<super::runs::RunRecord>(x.clone()) {
                    Ok(r) if st.runs.iter().any(|o| o.run_id == r.run_id) => put_aside(
                        "runs",
                        Some(i.to_string()),
                        format!("a second record of run {}", r.run_id),
                        x,
                    ),
                    Ok(r) => st.runs_mut().push(r),
                    Err(e) => put_aside("runs", Some(i.to_string()), e.to_string(), x),
                }
            }
        }
        Some(x) => put_aside("runs", None, "not an array".into(), x),
    }
    match obj.get("global_stop") {
        None | Some(Value::Null) => {}
        Some(x) => match x.as_u64() {
            Some(n) => st.global_stop = Some(n),
            None => {
                put_aside("global_stop", None, "not a time in ms".into(), x);
                fail_closed.push("the global stop");
            }
        },
    }
    match obj.get("pause") {
        None | Some(Value::Null) => {}
        Some(x) => match serde_json::from_value::<Pause>(x.clone()) {
            Ok(p) => st.pause = Some(p),
            Err(e) => {
                put_aside("pause", None, e.to_string(), x);
                fail_closed.push("the pause");
            }
        },
    }
    match obj.get("dry_run_since") {
        None | Some(Value::Null) => {}
        Some(x) => match x.as_u64() {
            Some(n) => st.dry_run_since = Some(n),
            None => put_aside("dry_run_since", None, "not a time in ms".into(), x),
        },
    }
    st.last_id_ms = st.last_id_ms.max(id_floor_ms(bytes));
    let paused_because = (!fail_closed.is_empty()).then(|| {
        format!(
            "{} recorded in the state file could not be read",
            fail_closed.join(" and ")
        )
    });
    if let Some(why) = &paused_because {
        // Fail closed: nothing is revived until an operator has looked. A pause read fine is
        // kept as it is (it may be a deliberate halt).
        if st.pause.is_none() {
            st.pause = Some(Pause {
                kind: PauseKind::Maintenance,
                reason: format!("{why}; check the set-aside items, then `outlivectl resume`"),
                paused_at: now_ms,
            });
        }
    }
    Ok(Salvaged {
        state: st,
        set_aside: aside,
        paused_because,
    })
}

/// Write `bytes` as a new sidecar `resume-queue.corrupt-<ms>[.<n>].json`, never over an
/// existing one; returns its path.
fn write_sidecar(dir: &Dir, now_ms: u64, bytes: &[u8]) -> Result<PathBuf, String> {
    let how = Replace {
        exclusive: true,
        ..Replace::DURABLE
    };
    let mut last = String::new();
    for n in 0..16 {
        let name = if n == 0 {
            format!("resume-queue.corrupt-{now_ms}.json")
        } else {
            format!("resume-queue.corrupt-{now_ms}.{n}.json")
        };
        match dir.replace(&name, bytes, how) {
            Ok(()) | Err(ReplaceError::NotDurable(_)) => return Ok(dir.path().join(name)),
            Err(ReplaceError::Failed(e)) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                last = e.to_string();
            }
            Err(ReplaceError::Failed(e)) => {
                return Err(format!("{}: {e}", dir.path().join(name).display()));
            }
        }
    }
    Err(last)
}

/// Load the state from the state directory (Q-15 as amended).
pub fn load(dir: &Dir, now_ms: u64) -> Loaded {
    let path = dir.path().join(STATE_FILE);
    let bytes = match dir.read(STATE_FILE, MAX_STATE_BYTES) {
        Ok(Some(b)) => b,
        Ok(None) => return Loaded::Fresh,
        Err(e) => return Loaded::Unreadable(format!("{}: {e}", path.display())),
    };
    match salvage(&bytes, now_ms) {
        Ok(s) if s.set_aside.is_empty() => Loaded::State {
            state: Box::new(s.state),
            set_aside: vec![],
            sidecar: None,
            paused_because: None,
        },
        Ok(s) => {
            let doc = serde_json::json!({
                "version": STATE_VERSION,
                "source": path.display().to_string(),
                "set_aside_at": now_ms,
                "items": s.set_aside.iter().map(|a| serde_json::json!({
                    "field": a.field, "at": a.at, "why": a.why, "item": a.raw,
                })).collect::<Vec<_>>(),
            });
            let text = serde_json::to_vec_pretty(&doc).unwrap_or_default();
            match write_sidecar(dir, now_ms, &text) {
                Ok(sidecar) => Loaded::State {
                    state: Box::new(s.state),
                    set_aside: s.set_aside,
                    sidecar: Some(sidecar),
                    paused_because: s.paused_because,
                },
                Err(error) => Loaded::CorruptUncopied {
                    why: format!("{} items could not be read", s.set_aside.len()),
                    error,
                },
            }
        }
        Err(why) => match write_sidecar(dir, now_ms, &bytes) {
            Ok(sidecar) => Loaded::Corrupt {
                why,
                sidecar,
                id_floor_ms: id_floor_ms(&bytes),
            },
            Err(error) => Loaded::CorruptUncopied { why, error },
        },
    }
}

/// Save atomically and durably (Q-14). The state is acknowledged only after this returns Ok;
/// `NotDurable` means the file now holds `state` but the directory was not synced.
pub fn save(dir: &Dir, state: &State) -> Result<(), ReplaceError> {
    #[cfg(feature = "fault-hooks")]
    if crate::faults::persist_fails() {
        return Err(ReplaceError::Failed(std::io::Error::other(
            "fault hook: persist fails",
        )));
    }
    let bytes =
        serde_json::to_vec(state).map_err(|e| ReplaceError::Failed(std::io::Error::other(e)))?;
    dir.replace(STATE_FILE, &bytes, Replace::DURABLE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir() -> (tempfile::TempDir, Dir) {
        let t = tempfile::tempdir().unwrap();
        let d = Dir::open(t.path()).unwrap();
        (t, d)
    }

    fn entry_json(id: &str, status: &str) -> serde_json::Value {
        serde_json::json!({
            "id": id, "run_id": format!("run-{id}"), "session": "s", "target": {"exec": ["/bin/true"]},
            "uid": 0, "gid": 0, "cwd": "/", "class": "interactive", "status": status,
            "reaped_at": 1, "queued_at": 2
        })
    }

    #[test]
    fn q14_save_then_load_round_trips_with_mode_0600() {
        let (t, d) = dir();
        let mut s = State::empty();
        s.last_id_ms = 42;
        s.stops.push(RunStop {
            run_id: "r".into(),
            at: 1,
        });
        save(&d, &s).unwrap();
        let meta = std::fs::metadata(t.path().join(STATE_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        match load(&d, 0) {
            Loaded::State {
                state, set_aside, ..
            } => {
                assert_eq!(*state, s);
                assert!(set_aside.is_empty());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            std::fs::read_dir(t.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn q15_a_file_unusable_as_a_whole_goes_to_a_sidecar_byte_for_byte() {
        for bad in [
            &b"{not json"[..],
            br#"{"version": 9}"#,
            br#"{"entries": []}"#,
            br#"[1, 2]"#,
        ] {
            let (t, d) = dir();
            std::fs::write(t.path().join(STATE_FILE), bad).unwrap();
            match load(&d, 1234) {
                Loaded::Corrupt { sidecar, .. } => {
                    assert_eq!(sidecar, t.path().join("resume-queue.corrupt-1234.json"));
                    assert_eq!(
                        std::fs::read(&sidecar).unwrap(),
                        bad,
                        "the sidecar is an exact copy"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
    }

    /// Q-15 as amended (core review finding 6): one entry with a status word from a newer
    /// version is set aside; the others load.
    #[test]
    fn q15_salvage_keeps_what_parses_and_sets_aside_the_rest() {
        let (t, d) = dir();
        let doc = serde_json::json!({
            "version": 1, "last_id_ms": 5,
            "entries": [entry_json("rq-a-1", "queued"), entry_json("rq-zzzz-1", "frobbed"), entry_json("rq-c-1", "queued"), 7],
            "stops": [{"run_id": "r", "at": 3}, {"run_id": 4}],
            "ledger": {"run:x": [1, 2], "run:y": "often"},
        });
        std::fs::write(t.path().join(STATE_FILE), doc.to_string()).unwrap();
        let Loaded::State {
            state,
            set_aside,
            sidecar,
            paused_because,
        } = load(&d, 99)
        else {
            panic!()
        };
        let ids: Vec<&str> = state.entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, vec!["rq-a-1", "rq-c-1"]);
        assert_eq!(state.stops.len(), 1);
        assert_eq!(state.ledger.0.len(), 1);
        assert_eq!(set_aside.len(), 4, "{set_aside:#?}");
        assert!(paused_because.is_none());
        assert!(
            state.last_id_ms >= u64::from_str_radix("zzzz", 36).unwrap(),
            "new ids stay above the set-aside ones (Q-1)"
        );
        let side: serde_json::Value =
            serde_json::from_slice(&std::fs::read(sidecar.unwrap()).unwrap()).unwrap();
        assert_eq!(side["items"].as_array().unwrap().len(), 4);
        assert_eq!(side["items"][0]["item"]["status"], "frobbed");
    }

    /// Q-15 as amended: a pause or global stop that cannot be read is never dropped: the queue
    /// loads paused (maintenance) until an operator has looked.
    #[test]
    fn q15_an_unreadable_pause_or_stop_fails_closed() {
        for doc in [
            serde_json::json!({"version": 1, "pause": {"kind": "nap"}}),
            serde_json::json!({"version": 1, "global_stop": "yesterday"}),
        ] {
            let s = salvage(doc.to_string().as_bytes(), 1000).unwrap();
            let p = s.state.pause.expect("paused");
            assert_eq!(p.kind, PauseKind::Maintenance);
            assert_eq!(p.paused_at, 1000);
            assert!(s.paused_because.is_some());
        }
        // A deliberate halt read fine stays what it is.
        let doc = serde_json::json!({"version": 1, "global_stop": "x",
            "pause": {"kind": "deliberate-halt", "reason": "r", "paused_at": 5}});
        let s = salvage(doc.to_string().as_bytes(), 1000).unwrap();
        assert_eq!(s.state.pause.unwrap().kind, PauseKind::DeliberateHalt);
    }

    #[test]
    fn q15_duplicate_ids_are_set_aside() {
        let doc = serde_json::json!({"version": 1,
            "entries": [entry_json("rq-a-1", "queued"), entry_json("rq-a-1", "cancelled")]});
        let s = salvage(doc.to_string().as_bytes(), 0).unwrap();
        assert_eq!(s.state.entries.len(), 1);
        assert_eq!(s.set_aside.len(), 1);
    }

    #[test]
    fn q15_a_failed_copy_leaves_the_file_in_place() {
        // An existing sidecar of every name tried: the copy cannot be made.
        let (t, d) = dir();
        std::fs::write(t.path().join(STATE_FILE), b"garbage").unwrap();
        std::fs::create_dir(t.path().join("resume-queue.corrupt-7.json")).unwrap();
        for n in 1..16 {
            std::fs::create_dir(t.path().join(format!("resume-queue.corrupt-7.{n}.json"))).unwrap();
        }
        assert!(matches!(load(&d, 7), Loaded::CorruptUncopied { .. }));
        assert_eq!(
            std::fs::read(t.path().join(STATE_FILE)).unwrap(),
            b"garbage"
        );
    }

    #[test]
    fn q14_a_failed_save_keeps_the_previous_file() {
        let (t, d) = dir();
        save(&d, &State::empty()).unwrap();
        let before = std::fs::read(t.path().join(STATE_FILE)).unwrap();
        crate::files::faults::plan(&[(STATE_FILE, crate::files::faults::Fault::Rename)]);
        let mut s2 = State::empty();
        s2.last_id_ms = 99;
        assert!(matches!(save(&d, &s2), Err(ReplaceError::Failed(_))));
        assert_eq!(std::fs::read(t.path().join(STATE_FILE)).unwrap(), before);
    }

    #[test]
    fn q15_a_state_file_that_is_a_link_or_a_fifo_is_unreadable_not_followed() {
        let (t, d) = dir();
        std::fs::write(t.path().join("victim"), b"{}").unwrap();
        std::os::unix::fs::symlink(t.path().join("victim"), t.path().join(STATE_FILE)).unwrap();
        assert!(matches!(load(&d, 1), Loaded::Unreadable(_)));
        std::fs::remove_file(t.path().join(STATE_FILE)).unwrap();
        nix::unistd::mkfifo(
            &t.path().join(STATE_FILE),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        assert!(matches!(load(&d, 1), Loaded::Unreadable(_)));
    }

    #[test]
    fn q1_id_floor_reads_every_id_in_the_bytes() {
        assert_eq!(id_floor_ms(b"no ids"), 0);
        assert_eq!(id_floor_ms(br#"{"id":"rq-10-1","x":"rq-z-3"}"#), 36);
        assert_eq!(id_floor_ms(b"rq-"), 0);
        assert_eq!(id_floor_ms(b"rq-abc"), 0, "no counter: not an id");
    }
}
