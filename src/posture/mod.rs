//! Guard posture (SPEC §6): the host's one place to ask which safety systems are genuinely on.
//!
//! The manifest (G-1) lists the agent's own guards; drop-ins declare external ones (G-2).
//! Runtime status comes from getters the agent registers for every built-in guard,
//! unconditionally (G-3), and from `ReportGuard` for external ones. Each evaluation (every
//! tick, every runtime change, every reload; G-8) reads the configuration on disk once (G-4),
//! derives each row (G-5, G-6), finds the anomalies (G-7) and updates the one attention item
//! (G-9). What leaves the process is the closed projection of G-10.

pub(crate) mod attention;
pub(crate) mod dropins;
pub(crate) mod getters;
pub(crate) mod manifest;
pub mod rows;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use attention::{Anomaly, AnomalyKind, Attention, Causes};
use dropins::Dropins;
use manifest::{BUILTIN, Cadence, GuardKind, GuardSpec};
use rows::{Effective, Input, OffClass, Row, Runtime, RuntimeRead};

use crate::audit::{AuditSink, Event, EventKind, priority};
use crate::clock::Clock;
use crate::config::{Config, Paths};
use crate::sync::{MutexExt, RwLockExt};

/// How many evaluations the flapping rule looks back on, and how many changes are too many.
const FLAP_WINDOW: usize = 10;
const FLAP_CHANGES: usize = 3;

/// A built-in guard's runtime getter (G-3): read synchronously at each evaluation.
pub type Getter = Box<dyn Fn() -> RuntimeRead + Send + Sync>;

/// The posture's own settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub grace_ms: u64,
    pub soak_ms: u64,
    pub hold_ms: u64,
    pub accepted_gaps: Vec<String>,
    /// `--no-bus`: `publish.dbus` is off by configuration and default for this run.
    pub no_bus: bool,
    /// The systemd watchdog period, if armed (the `watchdog` cadence).
    pub watchdog: Option<Duration>,
}

impl Settings {
    pub fn from_config(c: &Config, no_bus: bool, watchdog: Option<Duration>) -> Settings {
        Settings {
            grace_ms: c.posture.anomaly_grace_sec as u64 * 1000,
            soak_ms: c.posture.dry_run_soak_days as u64 * 24 * 3600 * 1000,
            hold_ms: c.posture.notice_hold_min as u64 * 60_000,
            accepted_gaps: c.posture.accepted_gaps.clone(),
            no_bus,
            watchdog,
        }
    }
}

/// What an external guard's owner reports (`ReportGuard`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuardReport {
    pub enabled: bool,
    pub dry_run: bool,
    /// The reporter's time (informational, clamped to now); 0: now.
    pub tick_at_ms: u64,
    pub verdict_unknown: Option<bool>,
    pub reason_code: Option<String>,
}

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportError {
    NotFound(String),
    AccessDenied(String),
    Invalid(String),
}

/// What the last evaluation published.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Published {
    pub rows: Vec<Row>,
    /// Count per effective state (all ten, zeros included).
    pub summary: BTreeMap<String, u32>,
    /// The current anomalies, described.
    pub anomalies: Vec<String>,
    /// The attention item for root and members.
    pub attention: serde_json::Value,
    /// The same for everyone else: kinds, entry ids and counts (§12 G-10).
    pub attention_public: serde_json::Value,
    pub degraded: bool,
    /// What `DEGRADED:` names first.
    pub headline: Option<String>,
    /// Rows counted on, and all rows.
    pub on: (u32, u32),
}

/// What an evaluation produced besides the published state.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Entries to record (through the auditor).
    pub events: Vec<Event>,
    /// Rows whose projection changed (PostureChanged).
    pub changed_rows: Vec<Row>,
    /// AttentionRaised(kind, detail).
    pub raised: Vec<(String, String)>,
}

/// What the queue says for causes and the soak (gathered by the caller, outside the
/// posture's locks).
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueFacts {
    pub causes: Causes,
    /// Wall ms since the queue first ran in dry run (the state file's `dry_run_since`).
    pub dry_run_since: Option<u64>,
}

struct Track {
    effective: Effective,
    since: u64,
    history: VecDeque<Effective>,
}

/// The posture service.
pub struct Posture {
    config_file: PathBuf,
    must_exist: bool,
    paths: Paths,
    applied: Config,
    settings: Settings,
    /// `guards.d/`, read again only when it changes.
    reader: dropins::Reader,
    book: Arc<ReportBook>,
    getters: HashMap<&'static str, Getter>,
    track: BTreeMap<String, Track>,
    attention: Arc<Mutex<Attention>>,
    clock: Arc<dyn Clock>,
    started_boot: u64,
    published: Published,
    config_error: Option<String>,
    /// What was applied at start or the last reload: key → (enabled, dry_run).
    boot: BTreeMap<String, (bool, bool)>,
}

/// The audit gate for queue notices (G-9): installed in the auditor, it puts each notice into
/// the attention item and decides whether its entry is written (coalescing).
pub struct NoticeGate {
    attention: Arc<Mutex<Attention>>,
    poke: Box<dyn Fn() + Send + Sync>,
}

impl NoticeGate {
    pub fn new(attention: Arc<Mutex<Attention>>, poke: Box<dyn Fn() + Send + Sync>) -> NoticeGate {
        NoticeGate { attention, poke }
    }
}

impl crate::audit::NoticeGate for NoticeGate {
    fn admit(&self, e: &Event) -> Option<Event> {
        if !attention::is_queue_notice(e) {
            return Some(e.clone());
        }
        let out = self.attention.locked().notice(e);
        (self.poke)();
        out
    }
}

/// External guards' declarations and their latest reports (G-2, G-3): what `ReportGuard`
/// writes, without waiting for an evaluation in progress.
pub struct ReportBook {
    dropins: RwLock<Dropins>,
    reports: Mutex<HashMap<String, RuntimeRead>>,
    clock: Arc<dyn Clock>,
    guards_dir: PathBuf,
}

impl ReportBook {
    /// The applied drop-ins.
    pub fn dropins(&self) -> Dropins {
        self.dropins.reading().clone()
    }

    fn reports(&self) -> HashMap<String, RuntimeRead> {
        self.reports.locked().clone()
    }

    fn replace(&self, d: Dropins) {
        self.reports.locked().retain(|k, _| d.find(k).is_some());
        *self.dropins.writing() = d;
    }

    /// `ReportGuard` (G-2, G-3) from `caller_uid`: only root and the uid owning the declaring
    /// drop-in; unknown keys (built-in ones included) are `NotFound`; a malformed report is
    /// refused and leaves the row `errored`.
    pub fn report(&self, caller_uid: u32, key: &str, r: GuardReport) -> Result<(), ReportError> {
        let GuardReport {
            enabled,
            dry_run,
            tick_at_ms,
            verdict_unknown,
            reason_code,
        } = r;
        let dropins = self.dropins.reading();
        let Some(d) = dropins.find(key) else {
            return Err(ReportError::NotFound(if manifest::builtin(key).is_some() {
                format!("{key} is a built-in guard; only outlived reports it")
            } else {
                format!(
                    "no guard {key} is declared in {}",
                    self.guards_dir.display()
                )
            }));
        };
        if caller_uid != 0 && caller_uid != d.owner {
            return Err(ReportError::AccessDenied(format!(
                "only root and uid {} (the owner of guards.d/{}) may report {key}",
                d.owner, d.file
            )));
        }
        if let Some(r) = &reason_code
            && !rows::reason_code_ok(r, true)
        {
            self.reports.locked().insert(
                key.to_string(),
                RuntimeRead::Errored("a malformed report".into()),
            );
            return Err(ReportError::Invalid(
                "reason_code: 1–40 of [a-z0-9-] (a code, not a message)".into(),
            ));
        }
        let (now_boot, now_wall) = (self.clock.boot_ms(), self.clock.wall_ms());
        self.reports.locked().insert(
            key.to_string(),
            RuntimeRead::Status(Runtime {
                enabled,
                dry_run: Some(dry_run),
                // Staleness uses the receipt time; the reporter's time is shown, clamped.
                last_tick_boot: Some(now_boot),
                last_tick_wall: Some(if tick_at_ms == 0 {
                    now_wall
                } else {
                    tick_at_ms.min(now_wall)
                }),
                verdict_unknown: verdict_unknown.unwrap_or(false),
                reason_code,
            }),
        );
        Ok(())
    }

    /// A report whose options had the wrong types: the row reads errored.
    pub fn malformed(&self, key: &str) {
        if self.dropins.reading().find(key).is_some() {
            self.reports.locked().insert(
                key.to_string(),
                RuntimeRead::Errored("a malformed report".into()),
            );
        }
    }
}

/// The `guards.d` directory beside a configuration file.
pub fn guards_dir(config_file: &Path) -> PathBuf {
    config_file
        .parent()
        .unwrap_or(Path::new("/etc/outlive"))
        .join("guards.d")
}

impl Posture {
    #[expect(
        clippy::too_many_arguments,
        reason = "each is a seam the tests replace (paths, configuration, clock, attention)"
    )]
    pub fn new(
        config_file: &Path,
        must_exist: bool,
        paths: Paths,
        applied: Config,
        settings: Settings,
        dir_owner: u32,
        attention: Arc<Mutex<Attention>>,
        clock: Arc<dyn Clock>,
    ) -> Posture {
        let guards_dir = guards_dir(config_file);
        let reader = dropins::Reader::new(&guards_dir, dir_owner);
        let dropins = reader.load(&|k| manifest::builtin(k).is_some(), None);
        let book = Arc::new(ReportBook {
            dropins: RwLock::new(dropins),
            reports: Mutex::new(HashMap::new()),
            clock: Arc::clone(&clock),
            guards_dir: guards_dir.clone(),
        });
        let started_boot = clock.boot_ms();
        let mut p = Posture {
            config_file: config_file.to_path_buf(),
            must_exist,
            paths,
            applied,
            settings,
            reader,
            book,
            getters: HashMap::new(),
            track: BTreeMap::new(),
            attention,
            clock,
            started_boot,
            published: Published::default(),
            config_error: None,
            boot: BTreeMap::new(),
        };
        p.snapshot_boot();
        p
    }

    /// A fresh attention item for these settings.
    pub fn attention_for(settings: &Settings, clock: Arc<dyn Clock>) -> Arc<Mutex<Attention>> {
        Arc::new(Mutex::new(Attention::new(
            clock,
            settings.grace_ms,
            settings.hold_ms,
        )))
    }

    /// Register a built-in guard's getter (G-3: unconditionally, even for a component that
    /// failed to start, so it reads `off-runtime-divergent`, never `missing`).
    pub fn register(&mut self, key: &'static str, getter: Getter) {
        debug_assert!(
            manifest::builtin(key).is_some(),
            "{key} is not a built-in guard"
        );
        self.getters.insert(key, getter);
    }

    /// The rejected drop-ins (for auditing at start and reload).
    pub fn rejected_dropins(&self) -> Vec<Event> {
        self.book
            .dropins()
            .rejected
            .iter()
            .map(|r| {
                Event::new(
                    EventKind::GuardDropinRejected,
                    format!(
                        "guards.d/{} is ignored: {} (its guards read errored until it is fixed and outlived reloaded)",
                        r.file, r.why
                    ),
                )
                .priority(priority::WARNING)
                .field("file", &r.file)
            })
            .collect()
    }

    /// Accepted gaps, audited at start (G-7).
    pub fn accepted_gaps_event(&self) -> Option<Event> {
        let g = &self.settings.accepted_gaps;
        (!g.is_empty()).then(|| {
            Event::new(
                EventKind::AcceptedGaps,
                format!(
                    "posture.accepted_gaps: {} — these load-bearing guards may be off or in dry run without raising attention",
                    g.join(", ")
                ),
            )
            .priority(priority::NOTICE)
            .field("keys", g.join(","))
        })
    }

    fn applied_value(c: &Config, g: &GuardSpec, no_bus: bool) -> (bool, bool) {
        match g.kind {
            GuardKind::CodeDefault => (
                !(g.key == "publish.dbus" && no_bus) && g.default_enabled,
                false,
            ),
            GuardKind::Config => {
                let v = &c.values[g.config_path.expect("a config guard has a key")];
                let dry = g
                    .dry_run_path
                    .map(|p| manifest::value_enabled(&c.values[p]))
                    .unwrap_or(false)
                    || manifest::value_dry_run(v);
                (manifest::value_enabled(v), dry)
            }
        }
    }

    fn snapshot_boot(&mut self) {
        self.boot.clear();
        for g in &BUILTIN {
            self.boot.insert(
                g.key.to_string(),
                Self::applied_value(&self.applied, g, self.settings.no_bus),
            );
        }
        for d in &self.book.dropins().guards {
            self.boot.insert(d.key.clone(), (d.enabled, d.dry_run));
        }
    }

    /// The boot snapshot as a file (`posture-boot.json`): what was applied, per guard.
    pub fn boot_snapshot_json(&self) -> serde_json::Value {
        serde_json::json!({
            "version": 1,
            "applied_at": self.clock.wall_ms(),
            "guards": self.boot.iter().map(|(k, (e, d))| (k.clone(), serde_json::json!({"enabled": e, "dry_run": d}))).collect::<serde_json::Map<_, _>>(),
        })
    }

    /// A reload applied `config` (G-4): new settings, drop-ins re-read, a new boot snapshot.
    pub fn reload(&mut self, config: Config, settings: Settings) {
        self.applied = config;
        self.attention
            .locked()
            .set_timing(settings.grace_ms, settings.hold_ms);
        self.settings = settings;
        let applied = self.book.dropins();
        let d = self
            .reader
            .load(&|k| manifest::builtin(k).is_some(), Some(&applied));
        self.book.replace(d);
        self.snapshot_boot();
    }

    /// The report book `ReportGuard` writes to (shared with the bus object).
    pub fn book(&self) -> Arc<ReportBook> {
        Arc::clone(&self.book)
    }

    /// `ReportGuard` (see [`ReportBook::report`]).
    pub fn report(&self, caller_uid: u32, key: &str, r: GuardReport) -> Result<(), ReportError> {
        self.book.report(caller_uid, key, r)
    }

    /// `AckAttention`: one-off notices leave (G-9).
    pub fn ack(&mut self) -> (usize, Vec<Event>) {
        let r = self.attention.locked().ack();
        self.published.degraded = self.attention.locked().is_open();
        self.published.attention = self.attention.locked().to_json(true);
        self.published.attention_public = self.attention.locked().to_json(false);
        r
    }

    /// What the last evaluation published.
    pub fn published(&self) -> &Published {
        &self.published
    }

    fn cadence_ms(&self, c: Cadence) -> Option<u64> {
        match c {
            Cadence::None => None,
            Cadence::DrainerInterval => Some(self.applied.drainer.interval_sec as u64 * 1000),
            Cadence::HalfWatchdog => Some(
                self.settings
                    .watchdog
                    .map(|w| (w.as_millis() as u64 / 2).max(1))
                    .unwrap_or(1000),
            ),
        }
    }

    /// G-8: evaluate now: read the inputs (the file on disk, the drop-ins, every runtime
    /// read), derive the rows and anomalies from them, and publish.
    pub fn evaluate(&mut self, q: &QueueFacts) -> Outcome {
        let mut out = Outcome::default();
        let reading = self.read();
        out.events.extend(self.note_config(&reading.disk));
        let now_wall = reading.now_wall;
        let rows: Vec<(Row, Derived)> = self
            .row_inputs(&reading)
            .into_iter()
            .map(|r| {
                let d = rows::derive(&r.input);
                self.row(&r, d, now_wall)
            })
            .collect();
        // Rows that no longer exist stop being tracked.
        let keys: HashSet<&str> = rows.iter().map(|(r, _)| r.key.as_str()).collect();
        self.track.retain(|k, _| keys.contains(k.as_str()));
        let flapping: HashSet<String> = rows
            .iter()
            .filter(|(r, _)| self.track[&r.key].flaps())
            .map(|(r, _)| r.key.clone())
            .collect();
        let anomalies = anomalies(&rows, &flapping, &self.settings, q, now_wall);
        let attention = self.attend(&anomalies, &flapping, q, &mut out);
        let rows: Vec<Row> = rows.into_iter().map(|(r, _)| r).collect();
        out.changed_rows = changed(&self.published.rows, &rows);
        self.published = published(rows, &anomalies, attention);
        out
    }

    /// Everything an evaluation reads (the only I/O of an evaluation): the configuration on
    /// disk, read once (G-4); the drop-ins (read again only if they changed), weighed with
    /// what was applied holding its keys; every built-in guard's runtime read and every
    /// external report (G-3).
    fn read(&self) -> Reading {
        let disk = Config::load(&self.config_file, self.must_exist, &self.paths)
            .map_err(|e| e.to_string());
        let applied_dropins = self.book.dropins();
        let disk_dropins = self
            .reader
            .load(&|k| manifest::builtin(k).is_some(), Some(&applied_dropins));
        let reads = BUILTIN
            .iter()
            .map(|g| {
                let r = self
                    .getters
                    .get(g.key)
                    .map(|f| f())
                    .unwrap_or(RuntimeRead::Absent);
                (g.key, r)
            })
            .collect();
        Reading {
            disk,
            disk_dropins,
            applied_dropins,
            reads,
            reports: self.book.reports(),
            now_boot: self.clock.boot_ms(),
            now_wall: self.clock.wall_ms(),
        }
    }

    /// G-4: one notice when the file on disk stops parsing; cleared when it parses again.
    fn note_config(&mut self, disk: &Result<Config, String>) -> Option<Event> {
        match (disk, &self.config_error) {
            (Err(e), None) => {
                self.config_error = Some(e.clone());
                Some(
                    Event::new(
                        EventKind::ConfigUnreadable,
                        format!(
                            "{e}; outlived keeps running with what it applied, and every configured guard reads errored until the file is fixed"
                        ),
                    )
                    .alert(crate::audit::Alert::QueueNotice)
                    .field("reason", "config-unreadable"),
                )
            }
            (Ok(_), Some(_)) => {
                self.config_error = None;
                None
            }
            _ => None,
        }
    }

    /// Every row's inputs (G-3 to G-6): the built-in guards, the drop-ins' guards, and the
    /// keys of rejected drop-ins (errored).
    fn row_inputs(&self, r: &Reading) -> Vec<RowInput> {
        let input = |runtime: RuntimeRead, cadence_ms: Option<u64>| Input {
            config_enabled: Ok(true),
            config_dry_run: false,
            default_enabled: true,
            diverged: false,
            applied_enabled: true,
            expect_runtime: true,
            boot_had_it_off: false,
            runtime,
            cadence_ms,
            now_boot: r.now_boot,
            started_boot: self.started_boot,
        };
        let boot_off = |key: &str| self.boot.get(key).is_some_and(|b| !b.0);
        let no_bus = self.settings.no_bus;
        let mut out = Vec::new();
        for g in &BUILTIN {
            let (applied_on, applied_dry) = Self::applied_value(&self.applied, g, no_bus);
            let (config_enabled, config_dry_run, diverged) = match (g.kind, &r.disk) {
                (GuardKind::CodeDefault, _) => (Ok(applied_on), applied_dry, false),
                (GuardKind::Config, Err(_)) => (Err(()), applied_dry, false),
                (GuardKind::Config, Ok(c)) => {
                    let (on, dry) = Self::applied_value(c, g, no_bus);
                    let diverged = !g.live_config && (on, dry) != (applied_on, applied_dry);
                    (Ok(on), dry, diverged)
                }
            };
            out.push(RowInput {
                key: g.key.to_string(),
                description: g.description.to_string(),
                source: "builtin".to_string(),
                load_bearing: g.load_bearing,
                input: Input {
                    config_enabled,
                    config_dry_run,
                    default_enabled: g.default_enabled && !(g.key == "publish.dbus" && no_bus),
                    diverged,
                    applied_enabled: applied_on,
                    expect_runtime: g.expect_runtime,
                    boot_had_it_off: boot_off(g.key),
                    ..input(r.reads[g.key].clone(), self.cadence_ms(g.cadence))
                },
            });
        }
        for dg in &r.applied_dropins.guards {
            let on_disk = r.disk_dropins.find(&dg.key);
            let (config_enabled, config_dry_run) = on_disk
                .map(|x| (x.enabled, x.dry_run))
                .unwrap_or((dg.enabled, dg.dry_run));
            let runtime = r
                .reports
                .get(&dg.key)
                .cloned()
                .unwrap_or(RuntimeRead::Absent);
            out.push(RowInput {
                key: dg.key.clone(),
                description: dg.description.clone(),
                source: dg.file.clone(),
                load_bearing: dg.load_bearing,
                input: Input {
                    config_enabled: Ok(config_enabled),
                    config_dry_run,
                    default_enabled: dg.default_enabled,
                    diverged: on_disk
                        .is_none_or(|x| (x.enabled, x.dry_run) != (dg.enabled, dg.dry_run)),
                    applied_enabled: dg.enabled,
                    boot_had_it_off: boot_off(&dg.key),
                    ..input(runtime, dg.cadence_ms)
                },
            });
        }
        for rej in &r.applied_dropins.rejected {
            for key in &rej.keys {
                out.push(RowInput {
                    key: key.clone(),
                    description: format!("ignored drop-in: {}", rej.why),
                    source: rej.file.clone(),
                    load_bearing: false,
                    input: input(RuntimeRead::Errored(rej.why.clone()), None),
                });
            }
        }
        out
    }

    /// G-9: the attention item takes the anomalies and the persistent causes; returns what
    /// is published of it and what `DEGRADED:` names first.
    fn attend(
        &self,
        anomalies: &[Anomaly],
        flapping: &HashSet<String>,
        q: &QueueFacts,
        out: &mut Outcome,
    ) -> AttentionView {
        let mut a = self.attention.locked();
        out.events
            .extend(a.evaluate(anomalies, flapping, &q.causes));
        out.raised = a.take_raised();
        // What DEGRADED: names: an alertable anomaly; else the row a notice is about (same
        // reason code), as the operator will see it in `outlivectl guards`; else the latest
        // notice.
        let describe = |x: &Anomaly| match &x.reason_code {
            Some(r) => format!("{} {} ({r})", x.key, x.kind.as_str()),
            None => format!("{} {}", x.key, x.kind.as_str()),
        };
        let reasons = a.notice_reasons();
        let headline = a
            .anomalies()
            .first()
            .map(describe)
            .or_else(|| {
                anomalies
                    .iter()
                    .find(|x| x.reason_code.as_ref().is_some_and(|r| reasons.contains(r)))
                    .map(describe)
            })
            .or_else(|| a.latest_notice().map(|(k, m)| format!("{k}: {}", short(m))));
        AttentionView {
            full: a.to_json(true),
            public: a.to_json(false),
            degraded: a.is_open(),
            headline,
        }
    }

    /// Track a row's state (since when, its recent history) and project it (G-10).
    fn row(&mut self, r: &RowInput, d: rows::Derived, now_wall: u64) -> (Row, Derived) {
        let t = self.track.entry(r.key.clone()).or_insert(Track {
            effective: d.effective,
            since: now_wall,
            history: VecDeque::new(),
        });
        if t.effective != d.effective {
            t.effective = d.effective;
            t.since = now_wall;
        }
        t.history.push_back(d.effective);
        while t.history.len() > FLAP_WINDOW {
            t.history.pop_front();
        }
        let row = Row {
            key: r.key.clone(),
            description: r.description.clone(),
            effective: d.effective.as_str(),
            off_class: d.off_class.map(OffClass::as_str),
            config_enabled: r.input.config_enabled.unwrap_or(false),
            default_enabled: r.input.default_enabled,
            runtime_enabled: d.runtime_enabled,
            dry_run: d.dry_run,
            stale: d.stale,
            last_tick_at: d.last_tick_wall,
            reason_code: d.reason_code.clone(),
            diverged: r.input.diverged,
            load_bearing: r.load_bearing,
            since: t.since,
            source: r.source.clone(),
        };
        (
            row,
            Derived {
                effective: d.effective,
                off_class: d.off_class,
            },
        )
    }
}

/// What an evaluation read.
struct Reading {
    disk: Result<Config, String>,
    disk_dropins: Dropins,
    applied_dropins: Dropins,
    reads: HashMap<&'static str, RuntimeRead>,
    reports: HashMap<String, RuntimeRead>,
    now_boot: u64,
    now_wall: u64,
}

/// One row's inputs and what the row is.
struct RowInput {
    key: String,
    description: String,
    source: String,
    load_bearing: bool,
    input: Input,
}

/// The attention item as published.
struct AttentionView {
    full: serde_json::Value,
    public: serde_json::Value,
    degraded: bool,
    headline: Option<String>,
}

impl Track {
    /// G-7: more state changes than allowed within the window.
    fn flaps(&self) -> bool {
        let h = &self.history;
        h.iter()
            .zip(h.iter().skip(1))
            .filter(|(a, b)| a != b)
            .count()
            > FLAP_CHANGES
    }
}

/// G-7: the anomalies of the rows (pure).
fn anomalies(
    rows: &[(Row, Derived)],
    flapping: &HashSet<String>,
    settings: &Settings,
    q: &QueueFacts,
    now_wall: u64,
) -> Vec<Anomaly> {
    let mut out = Vec::new();
    for (row, d) in rows {
        let mut kinds = Vec::new();
        match d.effective {
            Effective::Off if d.off_class == Some(OffClass::DivergedFromDefault) => {
                kinds.push(AnomalyKind::DivergedFromDefault)
            }
            Effective::OffRuntimeDivergent => kinds.push(AnomalyKind::OffRuntimeDivergent),
            Effective::OnStale => kinds.push(AnomalyKind::OnStale),
            Effective::Missing => kinds.push(AnomalyKind::Missing),
            Effective::Errored => kinds.push(AnomalyKind::Errored),
            _ => {}
        }
        if flapping.contains(&row.key) {
            kinds.push(AnomalyKind::Flapping);
        }
        if row.load_bearing && !settings.accepted_gaps.contains(&row.key) {
            let dry_since = if row.key == "queue.resume" {
                q.dry_run_since.unwrap_or(row.since)
            } else {
                row.since
            };
            let gap = match d.effective {
                Effective::Off => true,
                Effective::OnDryRun => now_wall.saturating_sub(dry_since) > settings.soak_ms,
                _ => false,
            };
            if gap {
                kinds.push(AnomalyKind::LoadBearingGap);
            }
        }
        out.extend(kinds.into_iter().map(|kind| Anomaly {
            key: row.key.clone(),
            kind,
            reason_code: row.reason_code.clone(),
        }));
    }
    out
}

/// The rows whose projection changed since `before` (PostureChanged).
fn changed(before: &[Row], now: &[Row]) -> Vec<Row> {
    now.iter()
        .filter(|r| {
            before
                .iter()
                .find(|o| o.key == r.key)
                .is_none_or(|o| r.changed_from(o))
        })
        .cloned()
        .collect()
}

/// What is published: the rows, their count per state, the anomalies and the
/// attention item.
fn published(rows: Vec<Row>, anomalies: &[Anomaly], a: AttentionView) -> Published {
    let mut summary: BTreeMap<String, u32> = Effective::ALL
        .iter()
        .map(|e| (e.as_str().to_string(), 0))
        .collect();
    for r in &rows {
        *summary.entry(r.effective.to_string()).or_default() += 1;
    }
    let on = rows
        .iter()
        .filter(|r| {
            Effective::ALL
                .iter()
                .any(|e| e.as_str() == r.effective && e.counts_on())
        })
        .count() as u32;
    Published {
        on: (on, rows.len() as u32),
        rows,
        summary,
        anomalies: anomalies.iter().map(Anomaly::describe).collect(),
        attention: a.full,
        attention_public: a.public,
        degraded: a.degraded,
        headline: a.headline,
    }
}

/// The parts of a derivation the anomaly rules look at.
#[derive(Debug, Clone, Copy)]
struct Derived {
    effective: Effective,
    off_class: Option<OffClass>,
}

fn short(s: &str) -> String {
    let first: String = s.chars().take(80).collect();
    if s.chars().count() > 80 {
        format!("{first}…")
    } else {
        first
    }
}

/// Record an evaluation's events through `audit`.
pub fn record(audit: &dyn AuditSink, events: &[Event]) {
    for e in events {
        audit.record(e);
    }
}

#[cfg(test)]
mod tests;
