//! The host lock (SPEC L-1 to L-8, as amended in §12): only the holder of an exclusive
//! `flock(2)` on `resume-queue.lock` may write under the state directory; the lock also
//! detects a state directory shared between machines, which is refused.
//!
//! - [`decide`] is L-4, a pure function from what was observed (an unusable or unsafe
//!   directory, no file, a busy flock, a record we could lock) and facts asked for on demand
//!   through [`LockFacts`] (filesystem class, holder liveness, heartbeat age). Row 7 (a foreign
//!   record with `auto_heal = "off"`) asks for none of them. Malformed input (ids of the wrong
//!   shape, a record that is not JSON) is a decision, never a panic.
//! - [`acquire`] carries a decision out, through the one file module (`crate::files`): the
//!   state directory must be the agent's and not writable by group or others; a lock file is
//!   born locked (a temporary file with a random name, flocked, written, fsynced, linked in
//!   without replacing anything, then checked to be the file the path names); an existing one
//!   is opened without following links or blocking on a FIFO, flocked and re-checked; a held
//!   record is updated in place; a takeover (L-5) renames a born-locked file over the old one
//!   while holding the old flock, so a loser never overwrites a lock it does not hold.
//! - [`HeldLock::still_installed`] is asked before every persisted write (L-6 as amended): a
//!   lock path that no longer names the locked inode means the lock was lost.
//! - [`inspect`] gathers the same facts without taking anything (`outlivectl lock`), and
//!   [`clear`] removes a lock file while holding its flock (L-8 as amended).

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::audit::{Alert, Event, EventKind, priority};
use crate::config::AutoHeal;
use crate::facts::classify::{Classification, FsClass};
use crate::facts::identity::Id128;
use crate::facts::process::{ProcessProber, RecordedProcess, SameProcess, same_process};
use crate::files::{self, Dir, Meta};

/// The lock file's name in the state directory.
pub const LOCK_FILE: &str = "resume-queue.lock";
/// Heartbeat freshness window (L-1).
pub const HEARTBEAT_WINDOW: Duration = Duration::from_secs(300);
/// Record version (L-1).
pub const VERSION: u32 = 1;

/// The lock record (L-1), one JSON object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    #[serde(default)]
    pub hostname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    #[serde(default)]
    pub pid: i64,
    #[serde(default)]
    pub pid_start: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_ns: Option<u64>,
    #[serde(default)]
    pub acquired_at: u64,
    #[serde(default)]
    pub agent_version: String,
}

impl LockRecord {
    /// Parse a record; an empty, unreadable or non-version-1 record is an error (row 4).
    pub fn parse(bytes: &[u8]) -> Result<LockRecord, String> {
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Err("the lock record is empty".into());
        }
        let v: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| format!("the lock record is not JSON ({e})"))?;
        match v.get("version").and_then(|x| x.as_u64()) {
            Some(1) => {}
            Some(n) => return Err(format!("the lock record has version {n}, not 1")),
            None => return Err("the lock record has no version".into()),
        }
        serde_json::from_value(v).map_err(|e| format!("the lock record is malformed ({e})"))
    }

    /// As stored (one line of JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec(self).expect("a record serialises");
        b.push(b'\n');
        b
    }

    /// The recorded process, for H-2.
    pub fn process(&self) -> RecordedProcess {
        RecordedProcess {
            pid: self.pid,
            start_time: self.pid_start,
            boot_id: self.boot_id.as_deref().and_then(Id128::parse),
            pid_ns: self.pid_ns,
        }
    }

    fn host_label(&self) -> String {
        if self.hostname.is_empty() {
            "(unnamed host)".into()
        } else {
            self.hostname.clone()
        }
    }
}

/// Who we are, for the decision and our own record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ours {
    pub host_id: Id128,
    pub hostname: String,
    pub boot_id: Id128,
    pub pid: i64,
    pub pid_start: u64,
    pub pid_ns: Option<u64>,
}

impl Ours {
    /// Our record, acquired now.
    pub fn record(&self, now_ms: u64) -> LockRecord {
        LockRecord {
            version: VERSION,
            host_id: Some(self.host_id.to_hex()),
            hostname: self.hostname.clone(),
            boot_id: Some(self.boot_id.to_hex()),
            pid: self.pid,
            pid_start: self.pid_start,
            pid_ns: self.pid_ns,
            acquired_at: now_ms,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// Why the queue is disabled by the lock (the lock part of G-6's closed vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LockReason {
    AcquisitionError,
    LiveHolder,
    LostRace,
    ForeignHost,
    WouldAutoHeal,
    /// The lock path stopped naming the inode we held (§12 L-6).
    LockLost,
    /// The state directory is not the agent's, or others may write in it (§12 Q-14).
    StateDirUnsafe,
}

impl LockReason {
    /// Every reason, for the vocabulary tests.
    pub const ALL: [LockReason; 7] = [
        LockReason::AcquisitionError,
        LockReason::LiveHolder,
        LockReason::LostRace,
        LockReason::ForeignHost,
        LockReason::WouldAutoHeal,
        LockReason::LockLost,
        LockReason::StateDirUnsafe,
    ];

    /// The reason code.
    pub fn as_str(self) -> &'static str {
        match self {
            LockReason::AcquisitionError => "acquisition-error",
            LockReason::LiveHolder => "live-holder",
            LockReason::LostRace => "lost-race",
            LockReason::ForeignHost => "foreign-host",
            LockReason::WouldAutoHeal => "would-auto-heal",
            LockReason::LockLost => "lock-lost",
            LockReason::StateDirUnsafe => "state-dir-unsafe",
        }
    }

    /// L-3: retried by ticks (else on reload and `lock clear`, or, for L-4 row 10, once the
    /// heartbeat turns stale: [`Verdict::retry_in`]).
    pub fn retryable(self) -> bool {
        matches!(
            self,
            LockReason::AcquisitionError
                | LockReason::LiveHolder
                | LockReason::LostRace
                | LockReason::LockLost
                | LockReason::StateDirUnsafe
        )
    }
}

impl fmt::Display for LockReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What was observed before deciding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// Row 1: the directory cannot be created or opened, or the lock path holds something
    /// that is not a regular file (with why).
    DirUnusable(String),
    /// Row 1 (§12 Q-14): the directory is not owned by the agent's uid or is writable by group
    /// or others (with why).
    DirUnsafe(String),
    /// Row 2: no lock file.
    Absent,
    /// Row 3: another process holds the flock; its record if readable.
    Busy(Option<Result<LockRecord, String>>),
    /// Rows 4–11: we hold the flock on the existing file; its record.
    Locked(Result<LockRecord, String>),
}

/// The facts a decision may ask for (rows 4 and 8–10). Each is asked for only where its row
/// needs it.
pub trait LockFacts {
    /// H-3 classification of the state directory.
    fn classify_state_dir(&mut self) -> Classification;
    /// H-2 liveness of the recorded holder.
    fn holder_alive(&mut self, record: &LockRecord) -> SameProcess;
    /// Age of the lock file's mtime (the heartbeat) in ms, negative when the mtime is in the
    /// future (clock skew); None when unreadable.
    fn heartbeat_age_ms(&mut self) -> Option<i64>;
}

/// Facts gathered for a decision (audit event fields and `outlivectl lock`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gathered {
    pub class: Option<FsClass>,
    pub rule: Option<String>,
    pub holder: Option<String>,
    pub holder_alive: Option<bool>,
    /// Heartbeat age in ms (negative: in the future); `Some(None)` when asked but unreadable.
    pub heartbeat_age_ms: Option<Option<i64>>,
}

/// What to do, with the L-4 row that decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Row 2: create the lock born locked.
    Create,
    /// Rows 4 and 5: we hold the flock on a file whose record is ours to rewrite.
    Reclaim {
        /// Row 4: the record was unreadable (`corrupt-record`).
        corrupt: Option<String>,
        /// Row 5 with a different hostname: a rename of this host, proven by host_id.
        renamed_from: Option<String>,
    },
    /// Row 11 with `on`: take over the stale foreign lock (L-5).
    Takeover { from: LockRecord },
    /// The queue is disabled.
    Disabled { reason: LockReason, message: String },
}

/// A decision with its row and the facts it asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub row: u8,
    pub decision: Decision,
    pub facts: Gathered,
    /// A refusal that is not retried every tick, but whose cause expires by itself (L-4 row
    /// 10 as amended: the heartbeat turns stale): evaluate again after this long.
    pub retry_in: Option<Duration>,
}

fn recovery() -> &'static str {
    "After verifying that nothing else uses this state directory (the host was renamed, restored from a \
     backup, or its machine id was regenerated), run `outlivectl lock clear` and reload outlived \
     (`systemctl reload outlived`)."
}

/// L-4: decide. `lock` is the lock file's path (for messages).
#[expect(
    clippy::too_many_lines,
    reason = "L-4's table: one arm per row, in the rule's order"
)]
pub fn decide(
    observed: &Observed,
    ours: &Ours,
    auto_heal: AutoHeal,
    lock: &Path,
    facts: &mut dyn LockFacts,
) -> Verdict {
    let mut g = Gathered::default();
    let disabled = |row, reason, message: String, g: Gathered| Verdict {
        row,
        decision: Decision::Disabled { reason, message },
        facts: g,
        retry_in: None,
    };
    let rec = match observed {
        Observed::DirUnusable(why) => {
            return disabled(
                1,
                LockReason::AcquisitionError,
                format!("the lock directory cannot be used: {why}"),
                g,
            );
        }
        Observed::DirUnsafe(why) => {
            return disabled(
                1,
                LockReason::StateDirUnsafe,
                format!(
                    "{why}. The state directory must belong to outlived's user and be writable by it alone \
                     (mode 0700): fix its owner and mode (or set state_dir to a private directory); the queue is \
                     retried every tick."
                ),
                g,
            );
        }
        Observed::Absent => {
            return Verdict {
                row: 2,
                decision: Decision::Create,
                facts: g,
                retry_in: None,
            };
        }
        Observed::Busy(record) => {
            let who = match record {
                Some(Ok(r)) => {
                    g.holder = Some(format!("pid {} on {}", r.pid, r.host_label()));
                    format!("pid {} on host {}", r.pid, r.host_label())
                }
                _ => "a process whose record cannot be read".to_string(),
            };
            return disabled(
                3,
                LockReason::LiveHolder,
                format!(
                    "{} is locked by a live holder: {who}. Another outlived uses this state directory; the queue \
                     stays disabled until it stops (retried every tick).",
                    lock.display()
                ),
                g,
            );
        }
        Observed::Locked(r) => r,
    };
    let rec = match rec {
        Err(why) => {
            // Row 4: the record cannot tell us whose it is; the filesystem decides.
            let c = facts.classify_state_dir();
            g.class = Some(c.class);
            g.rule = Some(c.rule.to_string());
            if c.host_local() {
                return Verdict {
                    row: 4,
                    decision: Decision::Reclaim {
                        corrupt: Some(why.clone()),
                        renamed_from: None,
                    },
                    facts: g,
                    retry_in: None,
                };
            }
            return disabled(
                4,
                LockReason::ForeignHost,
                format!(
                    "lock record unreadable on a {} filesystem ({}): {why}. A lock on a filesystem that is not \
                     host-local is never reclaimed. {}",
                    c.class,
                    c.rule,
                    recovery()
                ),
                g,
            );
        }
        Ok(r) => r,
    };
    g.holder = Some(format!("pid {} on {}", rec.pid, rec.host_label()));

    // Row 5: the same host, proven by host_id.
    if rec.host_id.as_deref().and_then(Id128::parse) == Some(ours.host_id) {
        let renamed_from = (rec.hostname != ours.hostname).then(|| rec.hostname.clone());
        return Verdict {
            row: 5,
            decision: Decision::Reclaim {
                corrupt: None,
                renamed_from,
            },
            facts: g,
            retry_in: None,
        };
    }

    // Rows 6–11: a foreign host (or an older or foreign tool: no host_id).
    let their_id = rec.host_id.clone().unwrap_or_else(|| "(none)".into());
    if auto_heal == AutoHeal::Off {
        // Row 7: no classification, no liveness probe, no mtime.
        return disabled(
            7,
            LockReason::ForeignHost,
            format!(
                "{} belongs to another host: {} (host id {their_id}), while this is {} (host id {}). The state \
                 directory must be host-local: shared volumes are unsupported. {}",
                lock.display(),
                rec.host_label(),
                ours.hostname,
                ours.host_id,
                recovery()
            ),
            g,
        );
    }
    // Row 8: the filesystem first, and dispositive.
    let c = facts.classify_state_dir();
    g.class = Some(c.class);
    g.rule = Some(c.rule.to_string());
    if !c.host_local() {
        return disabled(
            8,
            LockReason::ForeignHost,
            format!(
                "{} belongs to another host ({}, host id {their_id}); auto-heal declined: state directory is {} \
                 ({}). Shared volumes are unsupported. {}",
                lock.display(),
                rec.host_label(),
                c.class,
                c.rule,
                recovery()
            ),
            g,
        );
    }
    // Row 9.
    let alive = facts.holder_alive(rec);
    g.holder_alive = Some(alive.counts_as_alive());
    if alive.counts_as_alive() {
        return disabled(
            9,
            LockReason::ForeignHost,
            format!(
                "{} belongs to another host ({}, host id {their_id}); auto-heal declined: holder alive \
                 (pid {}: {alive}). {}",
                lock.display(),
                rec.host_label(),
                rec.pid,
                recovery()
            ),
            g,
        );
    }
    // Row 10, as amended: a fresh heartbeat is retried once it turns stale; an mtime in the
    // future is clock skew (still declined, retried once it is stale by our clock).
    let age = facts.heartbeat_age_ms();
    g.heartbeat_age_ms = Some(age);
    let window = HEARTBEAT_WINDOW.as_millis() as i64;
    if let Some(a) = age
        && a < window
    {
        let touched = if a < 0 {
            format!(
                "clock-skew: the lock file was touched {} s in the future by this host's clock",
                (-a) / 1000
            )
        } else {
            format!("heartbeat fresh (touched {} s ago", a / 1000)
        };
        let mut v = disabled(
            10,
            LockReason::ForeignHost,
            format!(
                "{} belongs to another host ({}, host id {their_id}); auto-heal declined: {touched}{}; stale after \
                 {} s, when outlived looks again by itself. {}",
                lock.display(),
                rec.host_label(),
                if a < 0 { "" } else { ")" },
                HEARTBEAT_WINDOW.as_secs(),
                recovery()
            ),
            g,
        );
        v.retry_in = Some(Duration::from_millis((window - a) as u64));
        return v;
    }
    // Row 11.
    let age_text = age
        .map(|a| format!("{} s ago", a / 1000))
        .unwrap_or_else(|| "unreadable".into());
    match auto_heal {
        AutoHeal::Observe => disabled(
            11,
            LockReason::WouldAutoHeal,
            format!(
                "{} belongs to another host ({}, host id {their_id}) whose holder is dead and whose heartbeat \
                 is stale ({age_text}); with queue.lock.auto_heal = \"on\" it would be taken over. The lock is \
                 left untouched (auto_heal = \"observe\").",
                lock.display(),
                rec.host_label()
            ),
            g,
        ),
        _ => Verdict {
            row: 11,
            decision: Decision::Takeover { from: rec.clone() },
            facts: g,
            retry_in: None,
        },
    }
}

// ---- effects -------------------------------------------------------------------------------

/// The held lock: the open, flocked descriptor of the file the lock path names, and the state
/// directory it guards (every write under it goes through this descriptor of it).
#[derive(Debug)]
pub struct HeldLock {
    file: File,
    dir: Dir,
    /// The state directory as opened (device and inode), to see it replaced.
    dir_meta: Meta,
    path: PathBuf,
    record: LockRecord,
}

impl HeldLock {
    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state directory, for writes under it. Ask [`HeldLock::still_installed`] first.
    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    /// Our record as written.
    pub fn record(&self) -> &LockRecord {
        &self.record
    }

    /// L-1 heartbeat: set the file's mtime to now (on the locked descriptor).
    pub fn touch(&self) -> io::Result<()> {
        let now = nix::sys::time::TimeSpec::UTIME_NOW;
        nix::sys::stat::futimens(self.file.as_fd(), &now, &now).map_err(io::Error::from)
    }

    /// L-6 as amended: whether the lock path still names the locked file (false if it was
    /// deleted or replaced, or the state directory itself was). Two lstat and two fstat calls,
    /// asked before every persisted write.
    pub fn still_installed(&self) -> bool {
        let Ok(held) = files::meta(&self.file) else {
            return false;
        };
        let at_path = |p: &Path| {
            std::fs::symlink_metadata(p)
                .ok()
                .map(|m| (m.dev(), m.ino()))
        };
        at_path(&self.path) == Some((held.dev, held.ino))
            && at_path(self.dir.path()) == Some((self.dir_meta.dev, self.dir_meta.ino))
    }

    /// Rewrite the held record in place (pwrite, ftruncate, fsync; never by rename).
    pub fn update(&mut self, record: LockRecord) -> io::Result<()> {
        files::update_in_place(&self.file, &record.to_bytes())?;
        self.record = record;
        Ok(())
    }
}

/// Outcome of [`acquire`].
pub struct Acquired {
    pub verdict: Verdict,
    /// The held lock when enabled.
    pub held: Option<HeldLock>,
    /// Audit events to record (renames, reclaims, heals, races).
    pub events: Vec<Event>,
}

impl Acquired {
    /// The disabled reason, if any.
    pub fn disabled(&self) -> Option<(LockReason, &str)> {
        match &self.verdict.decision {
            Decision::Disabled { reason, message } => Some((*reason, message.as_str())),
            _ => None,
        }
    }
}

fn read_record(f: &mut File) -> Result<LockRecord, String> {
    let mut b = Vec::new();
    f.seek(SeekFrom::Start(0))
        .map_err(|e| format!("cannot read the lock record: {e}"))?;
    (&*f)
        .take(64 * 1024)
        .read_to_end(&mut b)
        .map_err(|e| format!("cannot read the lock record: {e}"))?;
    LockRecord::parse(&b)
}

/// Why the state directory is unsafe to hold the lock in (§12 Q-14), if it is: not owned by
/// this process's uid, or writable by group or others.
pub fn unsafe_dir(path: &Path, m: &Meta) -> Option<String> {
    let me = nix::unistd::geteuid().as_raw();
    if m.uid != me {
        return Some(format!(
            "the state directory {} is owned by uid {}, not by outlived (uid {me})",
            path.display(),
            m.uid
        ));
    }
    if m.shared_writable() {
        return Some(format!(
            "the state directory {} is writable by group or others (mode {:04o})",
            path.display(),
            m.perm
        ));
    }
    None
}

/// What opening the lock file found.
enum Opened {
    Absent,
    /// The path changed between open and flock: look again.
    Changed,
    /// Someone holds the flock; its record if readable.
    Busy(Option<Result<LockRecord, String>>),
    /// We hold the flock on the file the path names.
    Locked(File, Result<LockRecord, String>),
}

/// Open the existing lock file (never following a link, never blocking on a FIFO) and try its
/// flock, re-checking that the path still names the locked inode.
fn open_existing(dir: &Dir) -> io::Result<Opened> {
    let Some((mut f, meta)) = dir.open_file(LOCK_FILE, true)? else {
        return Ok(Opened::Absent);
    };
    if !files::try_flock(&f)? {
        return Ok(Opened::Busy(Some(read_record(&mut f))));
    }
    match dir.entry(LOCK_FILE)? {
        Some(now) if now.same(&meta) => {}
        _ => return Ok(Opened::Changed),
    }
    let rec = read_record(&mut f);
    Ok(Opened::Locked(f, rec))
}

/// How many times to start over when the lock file changes under us.
const ATTEMPTS: usize = 5;

/// Evaluate L-4 and carry the decision out. `facts` is asked only for what the rows need; on
/// every disabled outcome nothing is held (the descriptor is closed).
#[expect(
    clippy::too_many_lines,
    reason = "L-2's born-locked creation and L-4's effects, step by step"
)]
pub fn acquire(
    state_dir: &Path,
    ours: &Ours,
    auto_heal: AutoHeal,
    facts: &crate::facts::Facts,
    prober: &dyn ProcessProber,
) -> Acquired {
    let now_ms = crate::clock::wall_ms();
    let lock = state_dir.join(LOCK_FILE);
    let verdict_on = |observed: &Observed, file: Option<&File>| {
        let mut k = KernelLockFacts {
            facts,
            state_dir,
            file,
            ours,
            prober,
            now_wall_ms: now_ms,
        };
        decide(observed, ours, auto_heal, &lock, &mut k)
    };
    let refused = |observed: Observed| Acquired {
        verdict: verdict_on(&observed, None),
        held: None,
        events: vec![],
    };
    let dir = match Dir::create(state_dir, 0o700) {
        Ok(d) => d,
        Err(e) => {
            return refused(Observed::DirUnusable(format!(
                "{}: {e}",
                state_dir.display()
            )));
        }
    };
    let dir_meta = match dir.meta() {
        Ok(m) => m,
        Err(e) => {
            return refused(Observed::DirUnusable(format!(
                "{}: {e}",
                state_dir.display()
            )));
        }
    };
    if let Some(why) = unsafe_dir(state_dir, &dir_meta) {
        return refused(Observed::DirUnsafe(why));
    }
    for _ in 0..ATTEMPTS {
        let (observed, file) = match open_existing(&dir) {
            Ok(Opened::Changed) => continue,
            Ok(Opened::Absent) => (Observed::Absent, None),
            Ok(Opened::Busy(r)) => (Observed::Busy(r), None),
            Ok(Opened::Locked(f, r)) => (Observed::Locked(r), Some(f)),
            Err(e) => return refused(Observed::DirUnusable(format!("{}: {e}", lock.display()))),
        };
        let verdict = verdict_on(&observed, file.as_ref());
        match &verdict.decision {
            Decision::Create => {
                let record = ours.record(now_ms);
                match dir.install_locked(LOCK_FILE, &record.to_bytes()) {
                    Ok(Some(f)) => {
                        return Acquired {
                            held: Some(HeldLock {
                                file: f,
                                dir,
                                dir_meta,
                                path: lock,
                                record,
                            }),
                            verdict,
                            events: vec![],
                        };
                    }
                    // The name exists now, or is not ours after the link: look again (row 3).
                    Ok(None) => continue,
                    Err(e) => {
                        return refused(Observed::DirUnusable(format!(
                            "cannot create {}: {e}",
                            lock.display()
                        )));
                    }
                }
            }
            Decision::Reclaim {
                corrupt,
                renamed_from,
            } => {
                let Some(f) = file else {
                    continue;
                };
                let record = ours.record(now_ms);
                if let Err(e) = files::update_in_place(&f, &record.to_bytes()) {
                    return refused(Observed::DirUnusable(format!(
                        "cannot rewrite {}: {e}",
                        lock.display()
                    )));
                }
                let events = reclaim_events(&lock, ours, &verdict, corrupt, renamed_from);
                return Acquired {
                    held: Some(HeldLock {
                        file: f,
                        dir,
                        dir_meta,
                        path: lock,
                        record,
                    }),
                    verdict,
                    events,
                };
            }
            Decision::Takeover { from } => {
                let Some(old) = file else {
                    continue;
                };
                let from = from.clone();
                return takeover(dir, dir_meta, &lock, ours, now_ms, old, from, verdict);
            }
            Decision::Disabled { .. } => {
                drop(file);
                return Acquired {
                    verdict,
                    held: None,
                    events: vec![],
                };
            }
        }
    }
    refused(Observed::DirUnusable(format!(
        "{} kept changing while it was being locked",
        lock.display()
    )))
}

fn reclaim_events(
    lock: &Path,
    ours: &Ours,
    verdict: &Verdict,
    corrupt: &Option<String>,
    renamed_from: &Option<String>,
) -> Vec<Event> {
    let mut events = vec![];
    if let Some(why) = corrupt {
        events.push(
            Event::new(
                EventKind::LockReclaimed,
                format!(
                    "reclaimed {}: its record was unreadable ({why}) and the state directory is host-local",
                    lock.display()
                ),
            )
            .priority(priority::NOTICE)
            .field("cause", "corrupt-record")
            .field("lock", lock.display())
            .field("class", verdict.facts.class.map(|c| c.as_str()).unwrap_or("-")),
        );
    }
    if let Some(from) = renamed_from {
        events.push(
            Event::new(
                EventKind::LockHostRenamed,
                format!(
                    "this host was renamed from {from} to {} (same host id {}); the queue lock was \
                     reclaimed",
                    ours.hostname, ours.host_id
                ),
            )
            .alert(Alert::LockHostRenamed)
            .field("from", from)
            .field("to", &ours.hostname)
            .field("host_id", ours.host_id),
        );
    }
    events
}

/// L-5: while holding the old flock, rename a born-locked file over the lock path.
#[expect(
    clippy::too_many_arguments,
    reason = "L-5's inputs: the directory, both records and the facts the audit event carries"
)]
fn takeover(
    dir: Dir,
    dir_meta: Meta,
    lock: &Path,
    ours: &Ours,
    now_ms: u64,
    old: File,
    from: LockRecord,
    verdict: Verdict,
) -> Acquired {
    let record = ours.record(now_ms);
    let result = dir.replace_locked(LOCK_FILE, &record.to_bytes());
    drop(old);
    let lost = |why: String| Acquired {
        verdict: Verdict {
            row: verdict.row,
            decision: Decision::Disabled {
                reason: LockReason::LostRace,
                message: format!(
                    "the takeover of {} (held by {}) failed and was abandoned: {why}; nothing was overwritten. \
                     Retried every tick.",
                    lock.display(),
                    from.host_label()
                ),
            },
            facts: verdict.facts.clone(),
            retry_in: None,
        },
        held: None,
        events: vec![],
    };
    match result {
        Ok(Some(f)) => Acquired {
            events: vec![
                Event::new(
                    EventKind::LockAutoHealed,
                    format!(
                        "took over the queue lock of {} (host id {}, holder pid {} dead, heartbeat stale) on a \
                         host-local state directory",
                        from.host_label(),
                        from.host_id.clone().unwrap_or_else(|| "(none)".into()),
                        from.pid
                    ),
                )
                .alert(Alert::LockAutoHealed)
                .field("from_host", from.host_label())
                .field("from_host_id", from.host_id.clone().unwrap_or_default())
                .field("to_host", &ours.hostname),
            ],
            held: Some(HeldLock {
                file: f,
                dir,
                dir_meta,
                path: lock.to_path_buf(),
                record,
            }),
            verdict,
        },
        Ok(None) => lost("the lock path named another file right after the rename".into()),
        Err(e) => lost(e.to_string()),
    }
}

/// The real facts: classification through the facts worker, liveness by H-2, the heartbeat
/// from the locked file's mtime.
pub struct KernelLockFacts<'a> {
    pub facts: &'a crate::facts::Facts,
    pub state_dir: &'a Path,
    pub file: Option<&'a File>,
    pub ours: &'a Ours,
    pub prober: &'a dyn ProcessProber,
    pub now_wall_ms: u64,
}

impl LockFacts for KernelLockFacts<'_> {
    fn classify_state_dir(&mut self) -> Classification {
        match self.facts.classify_path(self.state_dir) {
            Ok(c) => c,
            Err(e) => Classification {
                path: self.state_dir.to_path_buf(),
                class: FsClass::Unknown,
                rule: crate::facts::Rule::StatfsError,
                evidence: crate::facts::classify::Evidence {
                    detail: Some(e.to_string()),
                    ..Default::default()
                },
                via: None,
            },
        }
    }

    fn holder_alive(&mut self, record: &LockRecord) -> SameProcess {
        same_process(
            &record.process(),
            &self.ours.boot_id,
            self.ours.pid_ns,
            self.prober,
        )
    }

    fn heartbeat_age_ms(&mut self) -> Option<i64> {
        let m = files::meta(self.file?).ok()?;
        Some(self.now_wall_ms as i64 - m.mtime_ms)
    }
}

/// What `outlivectl lock` shows: the record, the holders the kernel knows of, the facts and
/// the decision the agent would reach, gathered without locking anything.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub lock: PathBuf,
    pub exists: bool,
    pub record: Option<Result<LockRecord, String>>,
    /// pids holding a flock on the file (from /proc/locks).
    pub holders: Vec<i64>,
    pub verdict: Verdict,
}

/// Inspect the lock under `state_dir` without taking it (L-8, `outlivectl lock`). Nothing is
/// created, no link is followed, and a FIFO is refused without blocking.
pub fn inspect(
    state_dir: &Path,
    ours: &Ours,
    auto_heal: AutoHeal,
    facts: &crate::facts::Facts,
    prober: &dyn ProcessProber,
    now_wall_ms: u64,
) -> Inspection {
    let lock = state_dir.join(LOCK_FILE);
    let decide_on = |observed: &Observed, file: Option<&File>| {
        decide(
            observed,
            ours,
            auto_heal,
            &lock,
            &mut KernelLockFacts {
                facts,
                state_dir,
                file,
                ours,
                prober,
                now_wall_ms,
            },
        )
    };
    let opened = Dir::open(state_dir).and_then(|d| {
        let m = d.meta()?;
        Ok((d.open_file(LOCK_FILE, false)?, m))
    });
    let (file, dir_meta) = match opened {
        Ok((f, m)) => (f.map(|(f, _)| f), m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let v = decide_on(&Observed::Absent, None);
            return Inspection {
                lock,
                exists: false,
                record: None,
                holders: vec![],
                verdict: v,
            };
        }
        Err(e) => {
            return Inspection {
                verdict: decide_on(
                    &Observed::DirUnusable(format!("{}: {e}", lock.display())),
                    None,
                ),
                lock,
                exists: true,
                record: None,
                holders: vec![],
            };
        }
    };
    let mut file = file;
    let record = file.as_mut().map(read_record);
    let holders = file
        .as_ref()
        .map(|f| flock_holders(f).unwrap_or_default())
        .unwrap_or_default();
    let observed = match (&file, &record) {
        _ if unsafe_dir(state_dir, &dir_meta).is_some() => {
            Observed::DirUnsafe(unsafe_dir(state_dir, &dir_meta).unwrap_or_default())
        }
        (None, _) => Observed::Absent,
        (Some(_), r) if !holders.is_empty() => Observed::Busy(r.clone()),
        (Some(_), Some(r)) => Observed::Locked(r.clone()),
        (Some(_), None) => Observed::Absent,
    };
    let verdict = decide_on(&observed, file.as_ref());
    Inspection {
        lock,
        exists: file.is_some(),
        record,
        holders,
        verdict,
    }
}

/// What [`clear`] removed.
#[derive(Debug)]
pub struct Cleared {
    pub lock: PathBuf,
    pub record: Result<LockRecord, String>,
}

/// Why [`clear`] removed nothing.
#[derive(Debug)]
pub enum ClearError {
    /// No lock file.
    Absent(PathBuf),
    /// A process holds the flock (pids from /proc/locks, possibly empty if unreadable).
    Held(PathBuf, Vec<i64>),
    /// The file could not be opened, locked or removed.
    Io(PathBuf, io::Error),
}

impl fmt::Display for ClearError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClearError::Absent(p) => write!(f, "{}: there is no lock file to clear", p.display()),
            ClearError::Held(p, pids) => {
                let who = if pids.is_empty() {
                    "a live process".to_string()
                } else {
                    pids.iter()
                        .map(|p| format!("pid {p}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                write!(
                    f,
                    "{} is held by {who}: a live holder. Stop it first (e.g. `systemctl stop outlived` on that host); \
                     nothing was removed.",
                    p.display()
                )
            }
            ClearError::Io(p, e) => write!(f, "{}: {e}", p.display()),
        }
    }
}

/// L-8 as amended: remove the lock file while holding its flock, so that no holder can exist
/// meanwhile: open it (no link followed, no blocking), take its flock without waiting (a
/// holder ⇒ refused), check that the path still names that inode, remove it, sync the
/// directory, and only then let go.
pub fn clear(state_dir: &Path) -> Result<Cleared, ClearError> {
    let lock = state_dir.join(LOCK_FILE);
    let io_err = |e: io::Error| ClearError::Io(lock.clone(), e);
    let dir = Dir::open(state_dir).map_err(io_err)?;
    for _ in 0..ATTEMPTS {
        let Some((mut f, meta)) = dir.open_file(LOCK_FILE, true).map_err(io_err)? else {
            return Err(ClearError::Absent(lock));
        };
        if !files::try_flock(&f).map_err(io_err)? {
            return Err(ClearError::Held(
                lock.clone(),
                flock_holders(&f).unwrap_or_default(),
            ));
        }
        match dir.entry(LOCK_FILE).map_err(io_err)? {
            Some(now) if now.same(&meta) => {}
            // Replaced between open and flock: look again.
            _ => continue,
        }
        let record = read_record(&mut f);
        dir.unlink(LOCK_FILE).map_err(io_err)?;
        dir.sync().map_err(io_err)?;
        drop(f);
        return Ok(Cleared { lock, record });
    }
    Err(ClearError::Io(
        lock.clone(),
        io::Error::other("the lock file kept changing while it was being cleared"),
    ))
}

/// pids holding a flock on this file, from `/proc/locks` (matched by device and inode).
#[cfg(target_os = "linux")]
pub fn flock_holders(f: &File) -> io::Result<Vec<i64>> {
    let m = f.metadata()?;
    let (dev, ino) = (m.dev(), m.ino());
    let (maj, min) = (libc::major(dev) as u64, libc::minor(dev) as u64);
    Ok(parse_proc_locks(
        &std::fs::read_to_string("/proc/locks")?,
        maj,
        min,
        ino,
    ))
}

#[cfg(not(target_os = "linux"))]
pub fn flock_holders(_f: &File) -> io::Result<Vec<i64>> {
    Ok(vec![])
}

/// Parse `/proc/locks` for FLOCK entries on `major:minor:inode` (major and minor in hex).
pub fn parse_proc_locks(text: &str, major: u64, minor: u64, ino: u64) -> Vec<i64> {
    let mut out = vec![];
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 00:19:2158 0 EOF" (a "->" marks a blocked waiter).
        let f: Vec<&str> = f.into_iter().filter(|x| *x != "->").collect();
        if f.len() < 6 || f[1] != "FLOCK" {
            continue;
        }
        let parts: Vec<&str> = f[5].split(':').collect();
        if parts.len() != 3 {
            continue;
        }
        let (Ok(ma), Ok(mi), Ok(i)) = (
            u64::from_str_radix(parts[0], 16),
            u64::from_str_radix(parts[1], 16),
            parts[2].parse::<u64>(),
        ) else {
            continue;
        };
        if (ma, mi, i) == (major, minor, ino)
            && let Ok(pid) = f[4].parse::<i64>()
            && !out.contains(&pid)
        {
            out.push(pid);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::classify::{Evidence, Rule};

    fn id(n: u8) -> Id128 {
        Id128([n; 16])
    }

    fn ours() -> Ours {
        Ours {
            host_id: id(1),
            hostname: "alpha".into(),
            boot_id: id(9),
            pid: 100,
            pid_start: 5,
            pid_ns: Some(7),
        }
    }

    fn rec(host_id: Option<Id128>, hostname: &str) -> LockRecord {
        LockRecord {
            version: 1,
            host_id: host_id.map(|h| h.to_hex()),
            hostname: hostname.into(),
            boot_id: Some(id(8).to_hex()),
            pid: 4242,
            pid_start: 77,
            pid_ns: Some(7),
            acquired_at: 1,
            agent_version: "0.0.1".into(),
        }
    }

    /// Counts every question; answers from fixed values.
    struct Counting {
        class: FsClass,
        alive: bool,
        age: Option<Duration>,
        /// A heartbeat age in ms that may be negative (an mtime in the future).
        skew_ms: Option<i64>,
        asked: Vec<&'static str>,
    }

    impl Counting {
        fn new(class: FsClass, alive: bool, age: Option<Duration>) -> Counting {
            Counting {
                class,
                alive,
                age,
                skew_ms: None,
                asked: vec![],
            }
        }
    }

    impl LockFacts for Counting {
        fn classify_state_dir(&mut self) -> Classification {
            self.asked.push("classify");
            Classification {
                path: "/var/lib/outlive".into(),
                class: self.class,
                rule: Rule::FstypeMagic,
                evidence: Evidence::default(),
                via: None,
            }
        }
        fn holder_alive(&mut self, _r: &LockRecord) -> SameProcess {
            self.asked.push("liveness");
            if self.alive {
                SameProcess::Alive("test")
            } else {
                SameProcess::Dead("test")
            }
        }
        fn heartbeat_age_ms(&mut self) -> Option<i64> {
            self.asked.push("mtime");
            self.skew_ms
                .or_else(|| self.age.map(|a| a.as_millis() as i64))
        }
    }

    fn run(o: Observed, heal: AutoHeal, f: &mut Counting) -> Verdict {
        decide(
            &o,
            &ours(),
            heal,
            Path::new("/var/lib/outlive/resume-queue.lock"),
            f,
        )
    }

    fn reason(v: &Verdict) -> Option<LockReason> {
        match &v.decision {
            Decision::Disabled { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    const STALE: Option<Duration> = Some(Duration::from_secs(600));

    /// SPEC §12 H-1/L-4 (core review finding 2): ids in a record that are not of their exact
    /// shape are a decision (not ours: foreign), never a panic, whatever auto_heal says. The
    /// input is the reviewer's: 36 characters with one dash too many.
    #[test]
    fn l4_h1_malformed_ids_in_a_record_are_a_decision_never_a_panic() {
        let bad = "01234567-89ab-cdef-0123-4567-9abcdef";
        let mut r = rec(None, "beta");
        r.host_id = Some(bad.into());
        r.boot_id = Some(bad.into());
        assert_eq!(
            r.process().boot_id,
            None,
            "an unreadable boot id is no boot id"
        );
        let _ = same_process(
            &r.process(),
            &id(9),
            Some(7),
            &crate::facts::process::KernelProber,
        );
        for heal in [AutoHeal::Off, AutoHeal::Observe, AutoHeal::On] {
            let mut f = Counting::new(FsClass::LocalPersistent, false, STALE);
            let v = run(Observed::Locked(Ok(r.clone())), heal, &mut f);
            assert!(
                v.row >= 7,
                "{heal:?}: a malformed host id is not ours: {v:?}"
            );
        }
    }

    #[test]
    fn l4_row1_unusable_directory_is_acquisition_error_retryable() {
        let mut f = Counting::new(FsClass::LocalPersistent, false, STALE);
        let v = run(Observed::DirUnusable("EACCES".into()), AutoHeal::On, &mut f);
        assert_eq!((v.row, reason(&v)), (1, Some(LockReason::AcquisitionError)));
        assert!(LockReason::AcquisitionError.retryable());
        assert!(f.asked.is_empty());
    }

    #[test]
    fn l4_row2_no_file_creates_born_locked() {
        let mut f = Counting::new(FsClass::Network, true, None);
        let v = run(Observed::Absent, AutoHeal::Off, &mut f);
        assert_eq!((v.row, &v.decision), (2, &Decision::Create));
        assert!(f.asked.is_empty());
    }

    #[test]
    fn l4_row3_busy_flock_is_live_holder_naming_pid_and_host() {
        let mut f = Counting::new(FsClass::LocalPersistent, false, STALE);
        let v = run(
            Observed::Busy(Some(Ok(rec(Some(id(1)), "alpha")))),
            AutoHeal::On,
            &mut f,
        );
        assert_eq!((v.row, reason(&v)), (3, Some(LockReason::LiveHolder)));
        let Decision::Disabled { message, .. } = &v.decision else {
            unreachable!()
        };
        assert!(message.contains("pid 4242 on host alpha"), "{message}");
        assert!(
            f.asked.is_empty(),
            "a busy flock proves a live holder: nothing to ask"
        );
        assert!(LockReason::LiveHolder.retryable());
    }

    #[test]
    fn l4_row4_corrupt_record_reclaimed_only_on_host_local() {
        for (class, reclaimed) in [
            (FsClass::LocalPersistent, true),
            (FsClass::LocalVolatile, true),
            (FsClass::Network, false),
            (FsClass::Unknown, false),
            (FsClass::HostShared, false),
        ] {
            let mut f = Counting::new(class, true, None);
            let v = run(Observed::Locked(Err("empty".into())), AutoHeal::Off, &mut f);
            assert_eq!(v.row, 4);
            assert_eq!(
                matches!(
                    v.decision,
                    Decision::Reclaim {
                        corrupt: Some(_),
                        ..
                    }
                ),
                reclaimed,
                "{class}"
            );
            if !reclaimed {
                assert_eq!(reason(&v), Some(LockReason::ForeignHost));
                let Decision::Disabled { message, .. } = &v.decision else {
                    unreachable!()
                };
                assert!(
                    message.contains(&format!("lock record unreadable on a {class} filesystem")),
                    "{message}"
                );
            }
            assert_eq!(f.asked, vec!["classify"], "only the filesystem is asked");
        }
    }

    #[test]
    fn l4_row5_same_host_id_reclaims_and_proves_a_rename() {
        let mut f = Counting::new(FsClass::Network, true, Some(Duration::ZERO));
        let v = run(
            Observed::Locked(Ok(rec(Some(id(1)), "alpha"))),
            AutoHeal::Off,
            &mut f,
        );
        assert_eq!(
            (v.row, v.decision.clone()),
            (
                5,
                Decision::Reclaim {
                    corrupt: None,
                    renamed_from: None
                }
            )
        );
        let v = run(
            Observed::Locked(Ok(rec(Some(id(1)), "old-name"))),
            AutoHeal::Off,
            &mut f,
        );
        assert_eq!(
            v.decision,
            Decision::Reclaim {
                corrupt: None,
                renamed_from: Some("old-name".into())
            }
        );
        assert!(
            f.asked.is_empty(),
            "identity proves it: no filesystem, liveness or heartbeat needed"
        );
    }

    #[test]
    fn l4_row6_missing_host_id_is_foreign() {
        let mut f = Counting::new(FsClass::LocalPersistent, false, STALE);
        let v = run(
            Observed::Locked(Ok(rec(None, "alpha"))),
            AutoHeal::Off,
            &mut f,
        );
        assert_eq!(
            (v.row, reason(&v)),
            (7, Some(LockReason::ForeignHost)),
            "no host_id is foreign even with our hostname"
        );
    }

    #[test]
    fn l4_row7_foreign_host_with_auto_heal_off_never_probes_anything() {
        let mut f = Counting::new(FsClass::LocalPersistent, false, STALE);
        let v = run(
            Observed::Locked(Ok(rec(Some(id(2)), "beta"))),
            AutoHeal::Off,
            &mut f,
        );
        assert_eq!((v.row, reason(&v)), (7, Some(LockReason::ForeignHost)));
        assert!(f.asked.is_empty(), "row 7 asked: {:?}", f.asked);
        assert_eq!(
            v.facts,
            Gathered {
                holder: Some("pid 4242 on beta".into()),
                ..Gathered::default()
            }
        );
        let Decision::Disabled { message, .. } = &v.decision else {
            unreachable!()
        };
        for needle in [
            "/var/lib/outlive/resume-queue.lock",
            "beta",
            &id(2).to_hex(),
            "alpha",
            &id(1).to_hex(),
            "must be host-local",
            "shared volumes are unsupported",
            "outlivectl lock clear",
        ] {
            assert!(
                message.contains(needle),
                "row 7 message lacks {needle:?}: {message}"
            );
        }
    }

    #[test]
    fn l4_row8_not_host_local_declines_without_probing_the_holder() {
        for class in [
            FsClass::Network,
            FsClass::Unknown,
            FsClass::HostShared,
            FsClass::Pseudo,
        ] {
            for heal in [AutoHeal::Observe, AutoHeal::On] {
                let mut f = Counting::new(class, false, STALE);
                let v = run(Observed::Locked(Ok(rec(Some(id(2)), "beta"))), heal, &mut f);
                assert_eq!(
                    (v.row, reason(&v)),
                    (8, Some(LockReason::ForeignHost)),
                    "{class}"
                );
                assert_eq!(
                    f.asked,
                    vec!["classify"],
                    "the holder is never probed on {class}"
                );
                let Decision::Disabled { message, .. } = &v.decision else {
                    unreachable!()
                };
                assert!(
                    message.contains(&format!("auto-heal declined: state directory is {class}")),
                    "{message}"
                );
            }
        }
    }

    #[test]
    fn l4_row9_alive_holder_declines() {
        let mut f = Counting::new(FsClass::LocalPersistent, true, STALE);
        let v = run(
            Observed::Locked(Ok(rec(Some(id(2)), "beta"))),
            AutoHeal::On,
            &mut f,
        );
        assert_eq!((v.row, reason(&v)), (9, Some(LockReason::ForeignHost)));
        assert_eq!(f.asked, vec!["classify", "liveness"]);
    }

    #[test]
    fn l4_row10_fresh_heartbeat_declines_and_unreadable_counts_as_stale() {
        let mut f = Counting::new(
            FsClass::LocalPersistent,
            false,
            Some(Duration::from_secs(299)),
        );
        let v = run(
            Observed::Locked(Ok(rec(Some(id(2)), "beta"))),
            AutoHeal::On,
            &mut f,
        );
        assert_eq!((v.row, reason(&v)), (10, Some(LockReason::ForeignHost)));
        assert_eq!(f.asked, vec!["classify", "liveness", "mtime"]);
        // Exactly 5 minutes is not fresh (mtime < 5 min ago is fresh).
        let mut f = Counting::new(FsClass::LocalPersistent, false, Some(HEARTBEAT_WINDOW));
        let v = run(
            Observed::Locked(Ok(rec(Some(id(2)), "beta"))),
            AutoHeal::On,
            &mut f,
        );
        assert_eq!(v.row, 11);
        let mut f = Counting::new(FsClass::LocalPersistent, false, None);
        let v = run(
            Observed::Locked(Ok(rec(Some(id(2)), "beta"))),
            AutoHeal::On,
            &mut f,
        );
        assert_eq!(v.row, 11, "an unreadable mtime counts as stale");
    }

    /// L-4 row 10 as amended (core review finding 8): a dead holder with a fresh heartbeat is
    /// retried by itself once the heartbeat turns stale (mtime + 5 min); rows that expire by
    /// no clock are not.
    #[test]
    fn l4_row10_a_fresh_heartbeat_is_retried_at_mtime_plus_five_minutes() {
        for (age, left) in [(299, 1), (60, 240), (0, 300)] {
            let mut f = Counting::new(
                FsClass::LocalPersistent,
                false,
                Some(Duration::from_secs(age)),
            );
            let v = run(
                Observed::Locked(Ok(rec(Some(id(2)), "beta"))),
                AutoHeal::On,
                &mut f,
            );
            assert_eq!(v.row, 10);
            assert_eq!(v.retry_in, Some(Duration::from_secs(left)), "age {age} s");
            assert!(!LockReason::ForeignHost.retryable(), "not every tick");
        }
        let mut f = Counting::new(FsClass::LocalPersistent, true, STALE);
        let v = run(
            Observed::Locked(Ok(rec(Some(id(2)), "beta"))),
            AutoHeal::On,
            &mut f,
        );
        assert_eq!(
            (v.row, v.retry_in),
            (9, None),
            "an alive holder is not retried"
        );
    }

    /// L-4 row 10 as amended: an mtime in the future is clock skew, said so, still declined,
    /// and retried once it is stale by this host's clock.
    #[test]
    fn l4_row10_an_mtime_in_the_future_is_clock_skew() {
        let mut f = Counting::new(FsClass::LocalPersistent, false, None);
        f.skew_ms = Some(-3_600_000);
        let v = run(
            Observed::Locked(Ok(rec(Some(id(2)), "beta"))),
            AutoHeal::On,
            &mut f,
        );
        assert_eq!((v.row, reason(&v)), (10, Some(LockReason::ForeignHost)));
        let Decision::Disabled { message, .. } = &v.decision else {
            panic!()
        };
        assert!(message.contains("clock-skew"), "{message}");
        assert!(!message.contains("touched 0 s ago"), "{message}");
        assert_eq!(v.retry_in, Some(Duration::from_secs(3600 + 300)));
        assert_eq!(v.facts.heartbeat_age_ms, Some(Some(-3_600_000)));
    }

    /// §12 Q-14 (core review finding 5): an unsafe state directory disables the queue
    /// `state-dir-unsafe`, retried every tick.
    #[test]
    fn l4_row1_an_unsafe_state_directory_is_state_dir_unsafe() {
        let mut f = Counting::new(FsClass::LocalPersistent, false, STALE);
        let v = run(
            Observed::DirUnsafe("the state directory /x is writable by group or others".into()),
            AutoHeal::On,
            &mut f,
        );
        assert_eq!((v.row, reason(&v)), (1, Some(LockReason::StateDirUnsafe)));
        assert!(LockReason::StateDirUnsafe.retryable());
        assert!(LockReason::LockLost.retryable());
        assert!(f.asked.is_empty());
    }

    /// L-8 as amended (core review finding 4): no message tells an operator to delete the lock
    /// file by hand.
    #[test]
    fn l8_no_message_suggests_deleting_the_lock_by_hand() {
        for (o, heal, alive, age) in [
            (
                Observed::Locked(Ok(rec(Some(id(2)), "beta"))),
                AutoHeal::Off,
                false,
                STALE,
            ),
            (
                Observed::Locked(Ok(rec(Some(id(2)), "beta"))),
                AutoHeal::On,
                true,
                STALE,
            ),
            (
                Observed::Locked(Ok(rec(Some(id(2)), "beta"))),
                AutoHeal::On,
                false,
                Some(Duration::from_secs(1)),
            ),
            (
                Observed::Locked(Err("bad".into())),
                AutoHeal::On,
                false,
                STALE,
            ),
        ] {
            for class in [FsClass::Network, FsClass::LocalPersistent] {
                let mut f = Counting::new(class, alive, age);
                let v = run(o.clone(), heal, &mut f);
                if let Decision::Disabled { message, .. } = &v.decision {
                    assert!(
                        !message.contains("delete") && !message.contains("rm "),
                        "row {}: {message}",
                        v.row
                    );
                }
            }
        }
    }

    #[test]
    fn l4_row11_observe_reports_on_takes_over() {
        let mut f = Counting::new(FsClass::LocalVolatile, false, STALE);
        let v = run(
            Observed::Locked(Ok(rec(Some(id(2)), "beta"))),
            AutoHeal::Observe,
            &mut f,
        );
        assert_eq!((v.row, reason(&v)), (11, Some(LockReason::WouldAutoHeal)));
        assert!(!LockReason::WouldAutoHeal.retryable());
        let mut f = Counting::new(FsClass::LocalPersistent, false, STALE);
        let v = run(
            Observed::Locked(Ok(rec(Some(id(2)), "beta"))),
            AutoHeal::On,
            &mut f,
        );
        assert_eq!(v.row, 11);
        assert!(matches!(v.decision, Decision::Takeover { .. }));
        assert_eq!(v.facts.class, Some(FsClass::LocalPersistent));
        assert_eq!(v.facts.holder_alive, Some(false));
        assert_eq!(v.facts.heartbeat_age_ms, Some(Some(600_000)));
    }

    #[test]
    fn l3_which_refusals_ticks_retry() {
        use LockReason::*;
        for r in LockReason::ALL {
            let retry = matches!(
                r,
                AcquisitionError | LiveHolder | LostRace | LockLost | StateDirUnsafe
            );
            assert_eq!(r.retryable(), retry, "{r}");
        }
    }

    #[test]
    fn l1_record_round_trip_and_row4_parse_failures() {
        let r = rec(Some(id(3)), "gamma");
        assert_eq!(LockRecord::parse(&r.to_bytes()).unwrap(), r);
        for bad in [
            &b""[..],
            b"  \n",
            b"{",
            b"{\"version\":2}",
            b"{\"hostname\":\"x\"}",
            b"[1]",
            b"\xff\xfe",
        ] {
            assert!(
                LockRecord::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // An older or foreign tool's record without host_id still parses (row 6).
        let old = LockRecord::parse(br#"{"version":1,"hostname":"h","pid":3}"#).unwrap();
        assert_eq!(old.host_id, None);
    }

    #[test]
    fn l8_proc_locks_parsing() {
        let text = "1: FLOCK  ADVISORY  WRITE 2362 fd:01:2158 0 EOF\n\
                    2: POSIX  ADVISORY  WRITE 99 fd:01:2158 0 EOF\n\
                    3: FLOCK  ADVISORY  WRITE 77 08:02:2158 0 EOF\n\
                    4: -> FLOCK  ADVISORY  WRITE 2400 fd:01:2158 0 EOF\n";
        assert_eq!(parse_proc_locks(text, 0xfd, 1, 2158), vec![2362, 2400]);
        assert_eq!(parse_proc_locks(text, 8, 2, 2158), vec![77]);
        assert!(parse_proc_locks(text, 8, 2, 1).is_empty());
    }
}
