//! Row derivation (SPEC G-3 to G-6) and the projection that leaves the process (G-10): from
//! what the configuration on disk says, what was applied, and what the runtime reports, the
//! one effective state of a guard, first match wins. Pure: the caller gathers the inputs.

use serde::Serialize;

/// A guard's effective state (G-6), in precedence order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Effective {
    Errored,
    Missing,
    OffRuntimeDivergent,
    DivergedPendingRestart,
    Off,
    OnDryRun,
    OnStale,
    OnBlind,
    OnConfirmed,
    OnUnverified,
}

impl Effective {
    pub const ALL: [Effective; 10] = [
        Effective::Errored,
        Effective::Missing,
        Effective::OffRuntimeDivergent,
        Effective::DivergedPendingRestart,
        Effective::Off,
        Effective::OnDryRun,
        Effective::OnStale,
        Effective::OnBlind,
        Effective::OnConfirmed,
        Effective::OnUnverified,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Effective::Errored => "errored",
            Effective::Missing => "missing",
            Effective::OffRuntimeDivergent => "off-runtime-divergent",
            Effective::DivergedPendingRestart => "diverged-pending-restart",
            Effective::Off => "off",
            Effective::OnDryRun => "on-dry-run",
            Effective::OnStale => "on-stale",
            Effective::OnBlind => "on-blind",
            Effective::OnConfirmed => "on-confirmed",
            Effective::OnUnverified => "on-unverified",
        }
    }

    /// Counted as "on" in the status line: on, dry run included, not stale.
    pub fn counts_on(self) -> bool {
        matches!(
            self,
            Effective::OnDryRun
                | Effective::OnBlind
                | Effective::OnConfirmed
                | Effective::OnUnverified
        )
    }
}

/// Why a row is `off` (G-6 row 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffClass {
    /// Off by default, and still off.
    DarkDefault,
    /// On by default, switched off.
    DivergedFromDefault,
}

impl OffClass {
    pub fn as_str(self) -> &'static str {
        match self {
            OffClass::DarkDefault => "dark-default",
            OffClass::DivergedFromDefault => "diverged-from-default",
        }
    }
}

/// G-6's closed vocabulary of reason codes for the agent's own rows: never free text.
pub const REASON_CODES: &[&str] = &[
    "foreign-host",
    "would-auto-heal",
    "live-holder",
    "lost-race",
    "acquisition-error",
    "lock-lost",
    "state-dir-unsafe",
    "persist-failed",
    "queue-off",
    "no-linger",
    "state-volatile",
    "state-not-host-local",
    "config-unreadable",
    "manager-unreachable",
    "metrics-dir-unsafe",
    "metrics-write-failed",
];

/// What each reason code means and what an operator does about it (one line each): the hint
/// `outlivectl guards` prints, and the list in outlived(8).
pub fn reason_help(code: &str) -> Option<&'static str> {
    Some(match code {
        "foreign-host" => {
            "the lock was left by another host, or this host's identity changed: `outlivectl lock` explains the \
             decision; after verifying nothing else uses the state directory, `outlivectl lock clear`"
        }
        "would-auto-heal" => {
            "auto_heal = \"observe\" would take a stale foreign lock over: set it to \"on\", or `outlivectl lock \
             clear` after checking"
        }
        "live-holder" => {
            "another outlived holds the lock on this state directory: stop it or give each agent its own \
             (retried every tick)"
        }
        "lost-race" => "another agent won a takeover of the lock (retried every tick)",
        "acquisition-error" => {
            "the state directory cannot be used (unusable, not a regular lock file, or hung): `outlivectl lock` \
             says which (retried every tick)"
        }
        "lock-lost" => {
            "the lock file was replaced or removed while held (another agent?): `outlivectl lock` shows who holds \
             it now; nothing was written since (retried every tick)"
        }
        "state-dir-unsafe" => {
            "the state directory is not outlived's or others may write in it: chown it to outlived's user and \
             chmod 700 it (retried every tick)"
        }
        "persist-failed" => {
            "the queue state cannot be written: free space on the state directory or fix its permissions \
             (retried every tick)"
        }
        "queue-off" => "queue.enabled is false in the configuration: nothing is queued or revived",
        "no-linger" => {
            "runs revived by a user manager stop at logout: `loginctl enable-linger` for this user"
        }
        "state-volatile" => {
            "the state directory is on a volatile filesystem (lost at reboot): set state_dir to persistent \
             local storage"
        }
        "state-not-host-local" => {
            "the state directory is not host-local (shared or network): set state_dir to a local filesystem"
        }
        "config-unreadable" => {
            "the configuration file no longer parses: `outlived --check-config` names the error"
        }
        "manager-unreachable" => {
            "systemd does not answer over D-Bus: check dbus.service (`systemctl status dbus`); outlived \
             reconnects by itself and drops nothing meanwhile"
        }
        "metrics-dir-unsafe" => {
            "the metrics directory must be root's and writable by root alone: fix it, or use metrics.textfile = \
             \"/run/outlive/metrics/outlive.prom\""
        }
        "metrics-write-failed" => {
            "the metrics file cannot be written: grant its directory (a ReadWritePaths= drop-in) and check it is \
             not full; `outlivectl audit` has the error"
        }
        _ => return None,
    })
}

/// Whether `code` may leave the process as a reason code: the closed vocabulary, or (for
/// external guards) a short lowercase slug of the reporter's.
pub fn reason_code_ok(code: &str, external: bool) -> bool {
    if REASON_CODES.contains(&code) {
        return true;
    }
    external
        && (1..=40).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A runtime status (G-3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Runtime {
    pub enabled: bool,
    pub dry_run: Option<bool>,
    /// CLOCK_BOOTTIME of the last tick (or report receipt), for staleness.
    pub last_tick_boot: Option<u64>,
    /// The same instant in wall ms, for display.
    pub last_tick_wall: Option<u64>,
    pub verdict_unknown: bool,
    pub reason_code: Option<String>,
}

/// What the runtime side said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeRead {
    /// Nothing registered or reported.
    Absent,
    /// The getter failed, or the report was malformed.
    Errored(String),
    Status(Runtime),
}

/// Everything G-4..G-6 look at for one row.
#[derive(Debug, Clone)]
pub struct Input {
    /// From the configuration on disk now; `Err` when it no longer parses.
    pub config_enabled: Result<bool, ()>,
    pub config_dry_run: bool,
    pub default_enabled: bool,
    /// The file on disk differs from what was applied (never for live or code-default rows).
    pub diverged: bool,
    /// On as applied (at start or the last reload), whatever the file on disk says now (when
    /// not `diverged`, the file and what is applied agree).
    pub applied_enabled: bool,
    pub expect_runtime: bool,
    /// The boot snapshot had this guard off.
    pub boot_had_it_off: bool,
    pub runtime: RuntimeRead,
    pub cadence_ms: Option<u64>,
    pub now_boot: u64,
    pub started_boot: u64,
}

/// The derived state of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derived {
    pub effective: Effective,
    pub off_class: Option<OffClass>,
    pub stale: bool,
    pub reason_code: Option<String>,
    pub runtime_enabled: Option<bool>,
    pub dry_run: bool,
    pub last_tick_wall: Option<u64>,
}

/// G-5: with a cadence, runtime enabled and (no tick yet and more than 5 × cadence since the
/// agent started, or more than 5 × cadence since the last tick). Exactly 5 × is not stale.
pub fn is_stale(rt: &Runtime, cadence_ms: Option<u64>, now_boot: u64, started_boot: u64) -> bool {
    let Some(c) = cadence_ms else { return false };
    if !rt.enabled {
        return false;
    }
    let limit = c.saturating_mul(5);
    match rt.last_tick_boot {
        None => now_boot.saturating_sub(started_boot) > limit,
        Some(t) => now_boot.saturating_sub(t) > limit,
    }
}

/// G-6, first match wins.
pub fn derive(i: &Input) -> Derived {
    let rt = match &i.runtime {
        RuntimeRead::Status(r) => Some(r),
        _ => None,
    };
    let mut d = Derived {
        effective: Effective::OnUnverified,
        off_class: None,
        stale: rt.is_some_and(|r| is_stale(r, i.cadence_ms, i.now_boot, i.started_boot)),
        reason_code: rt.and_then(|r| r.reason_code.clone()),
        runtime_enabled: rt.map(|r| r.enabled),
        dry_run: rt.and_then(|r| r.dry_run).unwrap_or(i.config_dry_run),
        last_tick_wall: rt.and_then(|r| r.last_tick_wall),
    };
    // 1. errored: the runtime read failed, or the configuration no longer parses.
    if matches!(i.runtime, RuntimeRead::Errored(_)) {
        d.effective = Effective::Errored;
        return d;
    }
    let Ok(config_on) = i.config_enabled else {
        d.effective = Effective::Errored;
        d.reason_code = Some("config-unreadable".into());
        return d;
    };
    // 2. missing
    if i.expect_runtime && config_on && rt.is_none() && !i.boot_had_it_off {
        d.effective = Effective::Missing;
        return d;
    }
    // 3. off-runtime-divergent: on as applied and not on at runtime, whatever the file on
    // disk says now (§12 G-6: an edit waiting for a reload never hides a disabled queue; the
    // divergence is shown beside it).
    let applied_on = if i.diverged {
        i.applied_enabled
    } else {
        config_on
    };
    if applied_on && rt.is_some_and(|r| !r.enabled) {
        d.effective = Effective::OffRuntimeDivergent;
        return d;
    }
    // 4. diverged-pending-restart
    if i.diverged {
        d.effective = Effective::DivergedPendingRestart;
        return d;
    }
    // 5. off
    if !config_on {
        d.effective = Effective::Off;
        d.off_class = Some(if i.default_enabled {
            OffClass::DivergedFromDefault
        } else {
            OffClass::DarkDefault
        });
        return d;
    }
    // 6. on-dry-run (the runtime's value, else the configuration's)
    if d.dry_run {
        d.effective = Effective::OnDryRun;
        return d;
    }
    // 7. on-stale
    if d.stale {
        d.effective = Effective::OnStale;
        return d;
    }
    d.effective = match rt {
        // 8. on-blind
        Some(r) if r.enabled && r.verdict_unknown => Effective::OnBlind,
        // 9. on-confirmed
        Some(r) if r.enabled => Effective::OnConfirmed,
        // 10. on-unverified
        _ => Effective::OnUnverified,
    };
    d
}

/// One row as it leaves the process (G-10): this closed set of fields, nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub key: String,
    pub description: String,
    pub effective: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub off_class: Option<&'static str>,
    pub config_enabled: bool,
    pub default_enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_enabled: Option<bool>,
    pub dry_run: bool,
    pub stale: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_tick_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<String>,
    /// The configuration on disk differs from what is applied (a reload or restart is pending),
    /// shown beside any state (§12 G-6).
    pub diverged: bool,
    pub load_bearing: bool,
    /// Wall ms when the row entered its state.
    pub since: u64,
    /// `builtin`, or the drop-in's file name.
    pub source: String,
}

/// The fields of [`Row`], for clients and the projection test.
pub const ROW_FIELDS: &[&str] = &[
    "key",
    "description",
    "effective",
    "off_class",
    "config_enabled",
    "default_enabled",
    "runtime_enabled",
    "dry_run",
    "stale",
    "last_tick_at",
    "reason_code",
    "diverged",
    "load_bearing",
    "since",
    "source",
];

impl Row {
    /// As JSON (the D-Bus `a{sv}` and `--json` are built from this).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a row serialises")
    }

    /// Whether two projections differ in more than the tick time (PostureChanged).
    pub fn changed_from(&self, other: &Row) -> bool {
        let mut a = self.clone();
        a.last_tick_at = other.last_tick_at;
        a != *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: u64 = 60_000;

    fn on() -> Runtime {
        Runtime {
            enabled: true,
            last_tick_boot: Some(1_000_000),
            last_tick_wall: Some(1_795_000_000_000),
            ..Runtime::default()
        }
    }

    fn base() -> Input {
        Input {
            config_enabled: Ok(true),
            config_dry_run: false,
            default_enabled: true,
            diverged: false,
            applied_enabled: true,
            expect_runtime: true,
            boot_had_it_off: false,
            runtime: RuntimeRead::Status(on()),
            cadence_ms: Some(C),
            now_boot: 1_000_000,
            started_boot: 0,
        }
    }

    fn eff(i: &Input) -> Effective {
        derive(i).effective
    }

    #[test]
    fn g6_each_precedence_edge() {
        use Effective::*;
        let i = base();
        assert_eq!(eff(&i), OnConfirmed);
        // 1 over 2..: an errored runtime outranks everything, even config off.
        let mut x = base();
        x.runtime = RuntimeRead::Errored("getter failed".into());
        x.config_enabled = Ok(false);
        x.diverged = true;
        assert_eq!(eff(&x), Errored);
        // A configuration that no longer parses: errored with its reason code.
        let mut x = base();
        x.config_enabled = Err(());
        let d = derive(&x);
        assert_eq!(
            (d.effective, d.reason_code.as_deref()),
            (Errored, Some("config-unreadable"))
        );
        // 2: missing only when runtime is expected, config on and nothing registered.
        let mut x = base();
        x.runtime = RuntimeRead::Absent;
        assert_eq!(eff(&x), Missing);
        x.config_enabled = Ok(false);
        assert_eq!(eff(&x), Off, "missing only when config is on");
        let mut x = base();
        x.runtime = RuntimeRead::Absent;
        x.boot_had_it_off = true;
        assert_eq!(eff(&x), OnUnverified, "the boot snapshot had it off");
        let mut x = base();
        x.runtime = RuntimeRead::Absent;
        x.expect_runtime = false;
        assert_eq!(eff(&x), OnUnverified, "10: no runtime expected");
        // 2 over 3: missing before divergence.
        // 3: config on, runtime off, not diverged.
        let mut x = base();
        x.runtime = RuntimeRead::Status(Runtime {
            enabled: false,
            reason_code: Some("foreign-host".into()),
            ..Runtime::default()
        });
        let d = derive(&x);
        assert_eq!(
            (d.effective, d.reason_code.as_deref()),
            (OffRuntimeDivergent, Some("foreign-host"))
        );
        // §12 G-6 (core review finding 7): on as applied and off at runtime reads
        // off-runtime-divergent whatever the file on disk says now; the divergence is beside it.
        x.diverged = true;
        assert_eq!(eff(&x), OffRuntimeDivergent);
        x.config_enabled = Ok(false);
        assert_eq!(
            eff(&x),
            OffRuntimeDivergent,
            "even when the file turns it off"
        );
        // 4 over 3: off at runtime because it was applied off, and the file now turns it on.
        x.config_enabled = Ok(true);
        x.applied_enabled = false;
        assert_eq!(eff(&x), DivergedPendingRestart);
        // 4 over 5: config off on disk, applied on.
        let mut x = base();
        x.config_enabled = Ok(false);
        x.diverged = true;
        assert_eq!(eff(&x), DivergedPendingRestart);
        // 5: off, with its class.
        let mut x = base();
        x.config_enabled = Ok(false);
        x.runtime = RuntimeRead::Status(Runtime::default());
        let d = derive(&x);
        assert_eq!(
            (d.effective, d.off_class),
            (Off, Some(OffClass::DivergedFromDefault))
        );
        x.default_enabled = false;
        assert_eq!(derive(&x).off_class, Some(OffClass::DarkDefault));
        // 5 over 6: off even when dry run is set.
        x.config_dry_run = true;
        assert_eq!(eff(&x), Off);
        // 6 over 7: dry run outranks stale.
        let mut x = base();
        x.config_dry_run = true;
        x.now_boot = 1_000_000 + 10 * C;
        let d = derive(&x);
        assert!(d.stale);
        assert_eq!(d.effective, OnDryRun);
        // Runtime dry run over config: the runtime says not in dry run.
        let mut x = base();
        x.config_dry_run = true;
        x.runtime = RuntimeRead::Status(Runtime {
            dry_run: Some(false),
            ..on()
        });
        assert_eq!(eff(&x), OnConfirmed);
        x.config_dry_run = false;
        x.runtime = RuntimeRead::Status(Runtime {
            dry_run: Some(true),
            ..on()
        });
        assert_eq!(eff(&x), OnDryRun);
        // 7 over 8: stale outranks blind.
        let mut x = base();
        x.runtime = RuntimeRead::Status(Runtime {
            verdict_unknown: true,
            ..on()
        });
        assert_eq!(eff(&x), OnBlind);
        x.now_boot += 5 * C + 1;
        assert_eq!(eff(&x), OnStale);
    }

    #[test]
    fn g5_exactly_five_cadences_is_not_stale() {
        let rt = on();
        let t = rt.last_tick_boot.unwrap();
        assert!(!is_stale(&rt, Some(C), t + 5 * C, 0));
        assert!(is_stale(&rt, Some(C), t + 5 * C + 1, 0));
        assert!(
            !is_stale(&rt, None, t + 100 * C, 0),
            "no cadence, never stale"
        );
        // No tick yet: measured from the agent's start.
        let none = Runtime {
            last_tick_boot: None,
            ..on()
        };
        assert!(!is_stale(&none, Some(C), 5 * C, 0));
        assert!(is_stale(&none, Some(C), 5 * C + 1, 0));
        // A runtime that is off is not stale (it is off).
        let off = Runtime {
            enabled: false,
            ..on()
        };
        assert!(!is_stale(&off, Some(C), t + 100 * C, 0));
    }

    #[test]
    fn g10_the_projection_carries_only_the_allowlisted_fields() {
        let row = Row {
            key: "queue.resume".into(),
            description: "d".into(),
            effective: "off",
            off_class: Some("dark-default"),
            config_enabled: false,
            default_enabled: false,
            runtime_enabled: Some(false),
            dry_run: false,
            stale: false,
            last_tick_at: Some(1),
            reason_code: Some("foreign-host".into()),
            diverged: false,
            load_bearing: true,
            since: 2,
            source: "builtin".into(),
        };
        let v = row.to_json();
        for k in v.as_object().unwrap().keys() {
            assert!(ROW_FIELDS.contains(&k.as_str()), "{k} is not in G-10");
        }
        assert_eq!(v.as_object().unwrap().len(), ROW_FIELDS.len());
    }

    #[test]
    fn g6_reason_codes_are_a_closed_vocabulary() {
        assert!(reason_code_ok("foreign-host", false));
        assert!(!reason_code_ok("disk on fire at /home/alice", false));
        assert!(!reason_code_ok("custom-code", false));
        assert!(reason_code_ok("custom-code", true));
        assert!(!reason_code_ok("Custom Code", true));
        assert!(!reason_code_ok(&"x".repeat(41), true));
    }

    /// §12 G-6: the closed vocabulary is exactly the SPEC's, and every code the lock can
    /// disable the queue with is in it.
    #[test]
    fn g6_the_vocabulary_is_the_specs_and_holds_every_lock_reason() {
        let spec = [
            "foreign-host",
            "would-auto-heal",
            "live-holder",
            "lost-race",
            "acquisition-error",
            "lock-lost",
            "state-dir-unsafe",
            "persist-failed",
            "queue-off",
            "no-linger",
            "state-volatile",
            "state-not-host-local",
            "config-unreadable",
            "manager-unreachable",
            "metrics-dir-unsafe",
            "metrics-write-failed",
        ];
        assert_eq!(REASON_CODES, spec);
        for r in crate::queue::lock::LockReason::ALL {
            assert!(REASON_CODES.contains(&r.as_str()), "{r}");
        }
        for c in REASON_CODES {
            assert!(reason_help(c).is_some(), "{c} has no help");
        }
        assert!(reason_help("anything else").is_none());
    }
}
