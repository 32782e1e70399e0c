//! SPEC L-4 (and §12 H-1/L-4): the whole lock decision, from arbitrary record bytes and fake
//! facts, never panics, and keeps the rules that must hold whatever the record says: row 7
//! (auto_heal off) asks for nothing; a holder on a filesystem that is not host-local is never
//! probed; a foreign record is never reclaimed; the record's own process reads without panic.
//!
//! Input: four control bytes (what was observed, the filesystem class, the holder's liveness
//! and heartbeat age, auto_heal), then the lock file's bytes.
#![no_main]

use std::path::Path;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use outlive::config::AutoHeal;
use outlive::facts::classify::Evidence;
use outlive::facts::process::{Liveness, ProcessProber, SameProcess, same_process};
use outlive::facts::{Classification, FsClass, Id128, Rule};
use outlive::queue::lock::{Decision, LockFacts, LockReason, LockRecord, Observed, Ours, decide};

struct Fake {
    class: FsClass,
    alive: bool,
    age_ms: Option<i64>,
    asked: Vec<&'static str>,
}

impl LockFacts for Fake {
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
    fn holder_alive(&mut self, r: &LockRecord) -> SameProcess {
        self.asked.push("liveness");
        // The record's own process must read without panic, whatever its ids say.
        let _ = r.process();
        if self.alive {
            SameProcess::Alive("fuzz")
        } else {
            SameProcess::Dead("fuzz")
        }
    }
    fn heartbeat_age_ms(&mut self) -> Option<i64> {
        self.asked.push("mtime");
        self.age_ms
    }
}

struct Prober(u8);

impl ProcessProber for Prober {
    fn probe(&self, _pid: i64) -> Liveness {
        match self.0 % 3 {
            0 => Liveness::Dead,
            1 => Liveness::Alive { start_time: None },
            _ => Liveness::Alive {
                start_time: Some(u64::from(self.0)),
            },
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (ctl, bytes) = data.split_at(4);
    let ours = Ours {
        host_id: Id128([1; 16]),
        hostname: "alpha".into(),
        boot_id: Id128([9; 16]),
        pid: 100,
        pid_start: 5,
        pid_ns: Some(7),
    };
    let parsed = LockRecord::parse(bytes);
    if let Ok(r) = &parsed {
        let _ = same_process(&r.process(), &ours.boot_id, ours.pid_ns, &Prober(ctl[2]));
        let _ = LockRecord::parse(&r.to_bytes()).expect("a parsed record round-trips");
    }
    let observed = match ctl[0] % 5 {
        0 => Observed::Locked(parsed.clone()),
        1 => Observed::Busy(Some(parsed.clone())),
        2 => Observed::Busy(None),
        3 => Observed::Absent,
        _ => Observed::DirUnsafe(String::from_utf8_lossy(bytes).into_owned()),
    };
    let class = [
        FsClass::LocalPersistent,
        FsClass::LocalVolatile,
        FsClass::Network,
        FsClass::HostShared,
        FsClass::Pseudo,
        FsClass::Unknown,
    ][ctl[1] as usize % 6];
    let age_ms = match ctl[2] % 4 {
        0 => None,
        1 => Some(-(i64::from(ctl[2]) * 60_000)),
        2 => Some(i64::from(ctl[2]) * 1000),
        _ => Some(i64::from(ctl[2]) * 60_000),
    };
    let heal = [AutoHeal::Off, AutoHeal::Observe, AutoHeal::On][ctl[3] as usize % 3];
    let mut facts = Fake {
        class,
        alive: ctl[2] & 0x80 != 0,
        age_ms,
        asked: vec![],
    };
    let v = decide(
        &observed,
        &ours,
        heal,
        Path::new("/var/lib/outlive/resume-queue.lock"),
        &mut facts,
    );
    match &v.decision {
        Decision::Disabled { message, reason } => {
            assert!(!message.is_empty());
            // What the message quotes of the input (the record's hostname, why it does not
            // parse, an unsafe directory's description) may say anything; outlived's own words
            // never tell anyone to delete the lock.
            let mut own = message.clone();
            match (&parsed, &observed) {
                (_, Observed::DirUnsafe(d)) => own = own.replace(d.as_str(), ""),
                (Ok(r), _) if !r.hostname.is_empty() => own = own.replace(&r.hostname, ""),
                (Err(why), _) => own = own.replace(why.as_str(), ""),
                _ => {}
            }
            assert!(
                !own.contains("delete"),
                "no message says to delete the lock: {message}"
            );
            if *reason == LockReason::ForeignHost && v.row == 10 {
                assert!(
                    v.retry_in
                        .is_some_and(|d| d <= Duration::from_secs(300 + 255 * 60))
                );
            }
        }
        Decision::Reclaim { corrupt: None, .. } => assert_eq!(v.row, 5),
        Decision::Reclaim {
            corrupt: Some(_), ..
        } => {
            assert_eq!(v.row, 4);
            assert!(
                class.is_host_local(),
                "a corrupt record is reclaimed on a host-local fs only"
            );
        }
        Decision::Takeover { .. } => {
            assert_eq!((v.row, heal), (11, AutoHeal::On));
            assert!(class.is_host_local());
        }
        Decision::Create => assert_eq!(v.row, 2),
    }
    if v.row == 7 {
        assert!(facts.asked.is_empty(), "row 7 asks for nothing");
    }
    if !class.is_host_local() {
        assert!(
            !facts.asked.contains(&"liveness"),
            "never probed off a host-local fs"
        );
    }
});
