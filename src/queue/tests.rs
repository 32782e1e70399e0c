//! Tests of the queue service: the rules applied to the state, persisted, audited, and
//! refused while the lock is not held. Time is an injected clock; the lock and the state file
//! are real, in a temporary directory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::audit::{AuditLog, MemorySink};
use crate::clock::fake::FakeClock;
use crate::facts::process::KernelProber;
use crate::facts::users::{Account, Lookup};

const H: u64 = 3600 * 1000;

pub(crate) struct Fixture {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) clock: Arc<FakeClock>,
    pub(crate) sink: Arc<MemorySink>,
    pub(crate) facts: Facts,
    pub(crate) settings: Settings,
}

pub(crate) fn settings() -> Settings {
    Settings {
        enabled: true,
        dry_run: false,
        max_size: 50,
        max_attempts: 3,
        max_resurrections: 2,
        ttl_ms: 24 * H,
        include_operator_kills: false,
        allowed_units: vec!["allowed-*.service".into()],
        auto_heal: AutoHeal::Off,
        max_watched: 200,
        evidence_policy: crate::queue::runs::EvidencePolicy::Autonomous,
    }
}

pub(crate) fn ours() -> Ours {
    let id = crate::facts::identity::identity().unwrap();
    Ours {
        host_id: id.host_id,
        hostname: id.hostname,
        boot_id: id.boot_id,
        pid: std::process::id() as i64,
        pid_start: crate::facts::process::own_start_time().unwrap_or(0),
        pid_ns: id.pid_ns,
    }
}

impl Fixture {
    pub(crate) fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("run")).unwrap();
        Fixture {
            dir,
            clock: FakeClock::new(),
            sink: Arc::new(MemorySink::default()),
            facts: Facts::new(Duration::from_secs(3)),
            settings: settings(),
        }
    }

    pub(crate) fn state_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("state")
    }

    pub(crate) fn queue(&self) -> Queue {
        let auditor = Arc::new(Auditor::new(
            AuditLog::new(&self.dir.path().join("run")),
            vec![self.sink.clone()],
        ));
        let mut q = Queue::new(
            &self.state_dir(),
            &self.dir.path().join("run"),
            self.settings.clone(),
            auditor,
            self.clock.clone(),
        );
        q.evaluate_lock(
            &LockEnv {
                ours: ours(),
                facts: self.facts.clone(),
                prober: std::sync::Arc::new(KernelProber),
            },
            true,
        );
        q
    }

    pub(crate) fn events(&self, kind: &str) -> Vec<Event> {
        self.sink.of_kind(kind)
    }
}

pub(crate) fn root() -> Caller {
    Caller {
        uid: 0,
        gid: 0,
        root: true,
        may_mutate: true,
    }
}

pub(crate) fn member() -> Caller {
    Caller {
        uid: 1000,
        gid: 1000,
        root: false,
        may_mutate: true,
    }
}

pub(crate) fn stranger() -> Caller {
    Caller {
        uid: 1001,
        gid: 1001,
        root: false,
        may_mutate: false,
    }
}

pub(crate) fn req(run_id: &str) -> Request {
    Request {
        run_id: Some(run_id.into()),
        session: format!("session-{run_id}"),
        target: Some(Target::Exec {
            exec: vec!["/bin/true".into()],
            env: BTreeMap::new(),
        }),
        cwd: Some("/tmp".into()),
        reason: "age-limit".into(),
        disposition: "terminal".into(),
        origin: "autonomous".into(),
        evidence: vec!["active-subagent".into()],
        ..Request::default()
    }
}

pub(crate) fn admit(q: &mut Queue, r: Request) -> String {
    let reply = q.enqueue(&root(), Ok(r), None).unwrap();
    assert!(reply.admitted && reply.why.is_empty(), "{reply:?}");
    reply.id
}

pub(crate) fn status(q: &Queue, id: &str) -> Status {
    q.entries()
        .unwrap()
        .iter()
        .find(|e| e.id == id)
        .unwrap()
        .status
        .clone()
}

#[test]
fn q14_enqueue_is_on_disk_before_it_is_acknowledged() {
    let f = Fixture::new();
    let mut q = f.queue();
    let id = admit(&mut q, req("a"));
    let on_disk =
        store::parse(&std::fs::read(f.state_dir().join(store::STATE_FILE)).unwrap()).unwrap();
    let e = on_disk
        .entries
        .iter()
        .find(|e| e.id == id)
        .expect("the acknowledged entry is on disk");
    assert_eq!(
        (e.status.clone(), e.uid, e.class),
        (Status::Queued, 0, entry::Class::Interactive)
    );
    assert_eq!(e.history.len(), 1);
    assert_eq!(f.events("enqueued").len(), 1);
    // The audit log went to the state directory while the lock is held.
    assert!(f.state_dir().join(crate::audit::AUDIT_FILE).exists());
}

#[test]
fn q4_order_of_checks_and_refusal_words() {
    let f = Fixture::new();
    let mut q = f.queue();
    // Not allowed to mutate ⇒ AccessDenied, before input limits.
    let mut bad = req("x");
    bad.cwd = Some("relative".into());
    assert!(matches!(
        q.enqueue(&stranger(), Ok(bad.clone()), None),
        Err(QueueError::AccessDenied(_))
    ));
    // Input limits ⇒ InvalidArgument naming the field.
    assert_eq!(
        q.enqueue(&root(), Ok(bad), None).unwrap_err(),
        QueueError::Invalid {
            field: "cwd".into(),
            why: "\"relative\" is not absolute".into()
        }
    );
    assert!(
        matches!(q.enqueue(&root(), Err(("reaped_at".into(), "expected t".into())), None), Err(QueueError::Invalid { field, .. }) if field == "reaped_at")
    );
    // Eligibility refusals are answers, audited.
    let mut r = req("b");
    r.disposition = "recovery-bounce".into();
    assert_eq!(
        q.enqueue(&root(), Ok(r), None).unwrap(),
        Reply {
            admitted: false,
            why: "not-terminal".into(),
            id: String::new()
        }
    );
    assert_eq!(
        f.events("enqueue-refused")[0].get("why"),
        Some("not-terminal")
    );
    // Duplicate key.
    admit(&mut q, req("c"));
    assert_eq!(
        q.enqueue(&root(), Ok(req("c")), None).unwrap().why,
        "duplicate-open-entry"
    );
    // Nothing refused was written.
    assert_eq!(q.entries().unwrap().len(), 1);
}

#[test]
fn q4_queue_off_and_disabled_come_first() {
    let mut f = Fixture::new();
    f.settings.enabled = false;
    let mut q = f.queue();
    let e = q.enqueue(&stranger(), Ok(req("a")), None).unwrap_err();
    assert_eq!(
        e,
        QueueError::Disabled {
            code: "queue-off".into(),
            detail: "queue.enabled is false in the configuration".into()
        }
    );
    assert_eq!(q.snapshot().disabled_reason, "queue-off");
}

#[test]
fn d9_unit_targets_by_non_root_only_from_allowed_units_and_users_only_by_root() {
    let f = Fixture::new();
    let mut q = f.queue();
    let mut r = req("u");
    r.target = Some(Target::Unit {
        unit: "other.service".into(),
    });
    assert!(
        matches!(q.enqueue(&member(), Ok(r.clone()), None), Err(QueueError::AccessDenied(m)) if m.contains("queue.allowed_units"))
    );
    r.target = Some(Target::Unit {
        unit: "allowed-7.service".into(),
    });
    assert!(q.enqueue(&member(), Ok(r.clone()), None).unwrap().admitted);
    let mut r = req("v");
    r.target = Some(Target::Unit {
        unit: "other.service".into(),
    });
    assert!(
        q.enqueue(&root(), Ok(r), None).unwrap().admitted,
        "root may enqueue any unit"
    );
    // The enqueuer's uid/gid; only root may set others.
    let mut r = req("w");
    r.user = Some(0);
    assert!(matches!(
        q.enqueue(&member(), Ok(r.clone()), None),
        Err(QueueError::AccessDenied(_))
    ));
    let id = q.enqueue(&member(), Ok(req("w2")), None).unwrap().id;
    let e = q
        .entries()
        .unwrap()
        .iter()
        .find(|e| e.id == id)
        .unwrap()
        .clone();
    assert_eq!((e.uid, e.gid), (1000, 1000));
    r.user = Some(1234);
    r.group = Some(1235);
    let id = q
        .enqueue(&root(), Ok(r), Some(found(1234, 1234)))
        .unwrap()
        .id;
    let e = q
        .entries()
        .unwrap()
        .iter()
        .find(|e| e.id == id)
        .unwrap()
        .clone();
    assert_eq!((e.uid, e.gid), (1234, 1235));
    assert_eq!(e.enqueued_by, Some(0), "who queued it is recorded");
}

fn found(uid: u32, gid: u32) -> Lookup {
    Lookup::Found(Account {
        uid,
        name: format!("user{uid}"),
        gid,
    })
}

/// Q-1 as amended (security review finding 2): root naming only the user gets that user's
/// primary group, never root's own; an unknown uid is refused; gid 0 for a non-zero uid only
/// when the group is named.
#[test]
fn q1_a_root_caller_naming_only_the_user_gets_that_users_primary_group() {
    let f = Fixture::new();
    let mut q = f.queue();
    let entry = |q: &Queue, id: &str| {
        let e = q
            .entries()
            .unwrap()
            .iter()
            .find(|e| e.id == id)
            .unwrap()
            .clone();
        (e.uid, e.gid)
    };
    let as_user = |run: &str, user: u32, group: Option<u32>| {
        let mut r = req(run);
        r.user = Some(user);
        r.group = group;
        r
    };
    let id = q
        .enqueue(
            &root(),
            Ok(as_user("a", 1001, None)),
            Some(found(1001, 1001)),
        )
        .unwrap()
        .id;
    assert_eq!(entry(&q, &id), (1001, 1001), "the reviewer's gid 0");
    for lookup in [Lookup::Unknown, Lookup::Failed("sssd is down".into())] {
        let e = q
            .enqueue(&root(), Ok(as_user("b", 4242, None)), Some(lookup.clone()))
            .unwrap_err();
        assert!(
            matches!(&e, QueueError::Invalid { field, why } if field == "user" && (why.contains("4242") || why.contains("sssd"))),
            "{lookup:?}: {e:?}"
        );
    }
    let e = q
        .enqueue(
            &root(),
            Ok(as_user("b", 4242, Some(5))),
            Some(Lookup::Unknown),
        )
        .unwrap_err();
    assert!(
        matches!(&e, QueueError::Invalid { field, .. } if field == "user"),
        "{e:?}"
    );
    // Not looked up at all: refused, never guessed.
    let e = q
        .enqueue(&root(), Ok(as_user("b", 1001, None)), None)
        .unwrap_err();
    assert!(
        matches!(&e, QueueError::Invalid { field, .. } if field == "user"),
        "{e:?}"
    );
    // A user whose primary group is root's.
    let e = q
        .enqueue(&root(), Ok(as_user("c", 1002, None)), Some(found(1002, 0)))
        .unwrap_err();
    assert!(
        matches!(&e, QueueError::Invalid { field, why } if field == "group" && why.contains("--as-gid 0")),
        "{e:?}"
    );
    let id = q
        .enqueue(
            &root(),
            Ok(as_user("c", 1002, Some(0))),
            Some(found(1002, 0)),
        )
        .unwrap()
        .id;
    assert_eq!(entry(&q, &id), (1002, 0), "gid 0 when named");
    // Root as root: gid 0 is root's own.
    let id = q
        .enqueue(&root(), Ok(as_user("d", 0, None)), Some(found(0, 0)))
        .unwrap()
        .id;
    assert_eq!(entry(&q, &id), (0, 0));
    // Nothing was written for the refusals.
    assert_eq!(q.entries().unwrap().len(), 3);
}

#[test]
fn q6_resurrection_cap_records_a_gave_up_entry_requeueable_once() {
    let f = Fixture::new();
    let mut q = f.queue();
    let now = f.clock.wall_ms();
    q.state.ledger.record("run:loop", now - 2 * H);
    q.state.ledger.record("run:loop", now - H);
    let reply = q.enqueue(&root(), Ok(req("loop")), None).unwrap();
    assert_eq!(
        (reply.admitted, reply.why.as_str()),
        (true, "resurrection-cap")
    );
    assert_eq!(
        status(&q, &reply.id),
        Status::GaveUp("resurrection-cap".into())
    );
    let ev = &f.events("resurrection-cap")[0];
    assert_eq!(ev.alert, Some(Alert::QueueNotice));
    assert!(
        ev.message
            .contains("was reaped again after 2 revivals in 24 h"),
        "{}",
        ev.message
    );
    // The operator's one audited override.
    q.requeue(&root(), &reply.id).unwrap();
    assert_eq!(status(&q, &reply.id), Status::Queued);
    assert_eq!(f.events("resurrection-override").len(), 1);
    // The window slides: 23 h later only one revival is recent (and the cap is 2).
    q.cancel(&root(), &reply.id).unwrap();
    f.clock.pass(23 * H);
    assert_eq!(q.enqueue(&root(), Ok(req("loop")), None).unwrap().why, "");
}

#[test]
fn q7_full_queue_evicts_the_oldest_of_the_lowest_class_or_refuses() {
    let mut f = Fixture::new();
    f.settings.max_size = 2;
    let mut q = f.queue();
    let a = admit(&mut q, req("a"));
    f.clock.pass(1);
    admit(&mut q, req("b"));
    // A job is lower than every open (interactive) entry: refused.
    let mut job = req("j");
    job.run_id = None;
    job.job = Some("nightly".into());
    job.resume_on_reap = true;
    assert_eq!(
        q.enqueue(&root(), Ok(job), None).unwrap(),
        Reply {
            admitted: false,
            why: "overflow".into(),
            id: String::new()
        }
    );
    assert_eq!(f.events("overflow").len(), 1);
    // An interactive newcomer displaces the oldest queued entry.
    let c = admit(&mut q, req("c"));
    assert_eq!(status(&q, &a), Status::GaveUp("overflow".into()));
    assert_eq!(status(&q, &c), Status::Queued);
    assert_eq!(f.events("overflow").len(), 2);
}

#[test]
fn q9_cancel_stop_and_stop_all() {
    let f = Fixture::new();
    let mut q = f.queue();
    let a = admit(&mut q, req("a"));
    q.cancel(&member(), &a).unwrap();
    assert_eq!(status(&q, &a), Status::Cancelled);
    assert!(
        matches!(q.cancel(&member(), &a), Err(QueueError::NotFound(_))),
        "terminal ⇒ NotFound"
    );
    assert!(matches!(
        q.cancel(&member(), "rq-zz-1"),
        Err(QueueError::NotFound(_))
    ));
    assert!(
        matches!(q.cancel(&member(), "not-an-id"), Err(QueueError::Invalid { field, .. }) if field == "id")
    );
    assert!(matches!(
        q.cancel(&stranger(), "rq-zz-1"),
        Err(QueueError::AccessDenied(_))
    ));
    let b = admit(&mut q, req("b"));
    assert_eq!(q.stop(&member(), "b").unwrap(), 1);
    assert_eq!(status(&q, &b), Status::Cancelled);
    assert_eq!(
        q.state()
            .stops
            .iter()
            .map(|s| s.run_id.as_str())
            .collect::<Vec<_>>(),
        vec!["b"]
    );
    assert_eq!(
        q.stop(&member(), "nothing-open").unwrap(),
        0,
        "a stop is recorded even with nothing open"
    );
    q.stop_all(&member()).unwrap();
    assert!(q.state().global_stop.is_some());
    assert_eq!(
        q.state().pause.as_ref().unwrap().kind,
        PauseKind::DeliberateHalt
    );
    // Durable: a fresh queue on the same directory sees it all.
    drop(q);
    let q = f.queue();
    assert_eq!(q.state().stops.len(), 2);
    assert_eq!(
        q.state().pause.as_ref().unwrap().kind,
        PauseKind::DeliberateHalt
    );
}

#[test]
fn p1_pause_kinds_and_upgrades() {
    let f = Fixture::new();
    let mut q = f.queue();
    assert!(
        matches!(q.pause(&member(), "deliberate-halt", "x"), Err(QueueError::Invalid { field, .. }) if field == "kind")
    );
    assert!(
        matches!(q.pause(&member(), "nap", "x"), Err(QueueError::Invalid { field, .. }) if field == "kind")
    );
    assert_eq!(
        q.pause(&member(), "emergency", "sentinel").unwrap(),
        PauseChange::New
    );
    let at = q.state().pause.as_ref().unwrap().paused_at;
    f.clock.pass(1000);
    assert_eq!(
        q.pause(&member(), "emergency", "again").unwrap(),
        PauseChange::NoOp
    );
    assert_eq!(
        q.pause(&member(), "maintenance", "upgrade").unwrap(),
        PauseChange::Upgraded
    );
    let p = q.state().pause.clone().unwrap();
    assert_eq!(
        (p.kind, p.reason.as_str(), p.paused_at),
        (PauseKind::Maintenance, "upgrade", at)
    );
    assert_eq!(f.events("pause-upgraded").len(), 1);
    assert!(q.resume(&member()).unwrap());
    assert!(!q.resume(&member()).unwrap(), "nothing to resume");
}

#[test]
fn q10_requeue_resets_the_wait_and_keeps_the_place() {
    let f = Fixture::new();
    let mut q = f.queue();
    let a = admit(&mut q, req("a"));
    f.clock.pass(25 * H);
    assert_eq!(q.sweep_ttl(), 1);
    assert_eq!(status(&q, &a), Status::GaveUp("ttl".into()));
    q.pause(&member(), "maintenance", "m").unwrap();
    assert!(matches!(
        q.requeue(&member(), &a),
        Err(QueueError::Paused(_))
    ));
    q.resume(&member()).unwrap();
    q.requeue(&member(), &a).unwrap();
    let e = q.entries().unwrap()[0].clone();
    assert_eq!(
        (e.status, e.waited_ms, e.frozen_ms, e.attempts),
        (Status::Queued, 0, 0, 0)
    );
    assert!(e.requeued_at.is_some());
    assert_eq!(
        e.queued_at,
        q.entries().unwrap()[0].queued_at,
        "keeps its original place"
    );
}

#[test]
fn q11_ttl_on_accumulated_waiting_time_frozen_by_a_pause() {
    let f = Fixture::new();
    let mut q = f.queue();
    let a = admit(&mut q, req("a"));
    f.clock.pass(20 * H);
    q.pause(&member(), "maintenance", "window").unwrap();
    f.clock.pass(10 * H);
    assert_eq!(q.sweep_ttl(), 0, "skipped while paused");
    q.resume(&member()).unwrap();
    let e = q.entries().unwrap()[0].clone();
    assert_eq!(e.frozen_ms, 10 * H, "credited the pause");
    assert_eq!(e.waited_ms, 30 * H);
    f.clock.pass(4 * H);
    assert_eq!(
        q.sweep_ttl(),
        0,
        "20 + 4 h of unpaused waiting is exactly the TTL: not expired"
    );
    f.clock.pass(1);
    assert_eq!(q.sweep_ttl(), 1);
    assert_eq!(status(&q, &a), Status::GaveUp("ttl".into()));
    let notice = &f.events("ttl-expired")[0];
    assert_eq!(notice.alert, Some(Alert::QueueNotice));
    assert_eq!(
        notice.message,
        "1 runs waited more than 24 h and were dropped (1 starved by pressure)"
    );
    assert_eq!(f.events("entry-expired").len(), 1);
}

#[test]
fn q12_unpause_credit_is_bounded_by_the_entrys_own_wait() {
    let f = Fixture::new();
    let mut q = f.queue();
    q.pause(&member(), "maintenance", "m").unwrap();
    f.clock.pass(5 * H);
    admit(&mut q, req("late"));
    f.clock.pass(H);
    q.resume(&member()).unwrap();
    let e = q.entries().unwrap()[0].clone();
    assert_eq!(e.frozen_ms, H, "only the hour it waited");
}

#[test]
fn q11_dry_run_expiry_is_audited_but_not_raised() {
    let mut f = Fixture::new();
    f.settings.dry_run = true;
    let mut q = f.queue();
    admit(&mut q, req("a"));
    f.clock.pass(25 * H);
    assert_eq!(q.sweep_ttl(), 1);
    assert_eq!(f.events("entry-expired").len(), 1);
    assert!(f.events("ttl-expired").is_empty());
    assert!(
        q.state().dry_run_since.is_some(),
        "dry run is recorded for the soak"
    );
}

#[test]
fn time_a_wall_clock_step_neither_expires_nor_strands() {
    let f = Fixture::new();
    let mut q = f.queue();
    admit(&mut q, req("a"));
    f.clock.step_wall(25 * H as i64);
    f.clock.pass(H);
    assert_eq!(
        q.sweep_ttl(),
        0,
        "a +25 h wall step does not expire anything"
    );
    f.clock.step_wall(-50 * H as i64);
    f.clock.pass(23 * H + 1);
    assert_eq!(q.sweep_ttl(), 1, "a −50 h step does not strand it either");
}

#[test]
fn restart_advances_waiting_by_the_wall_delta_clamped() {
    let f = Fixture::new();
    let mut q = f.queue();
    admit(&mut q, req("a"));
    drop(q);
    f.clock.pass(2 * H);
    let q = f.queue();
    assert_eq!(q.entries().unwrap()[0].waited_ms, 2 * H);
    drop(q);
    f.clock.step_wall(-(10 * H as i64));
    let q = f.queue();
    assert_eq!(
        q.entries().unwrap()[0].waited_ms,
        2 * H,
        "a backward step never subtracts"
    );
}

#[test]
fn q14_waiting_is_checkpointed_while_running() {
    let f = Fixture::new();
    let mut q = f.queue();
    admit(&mut q, req("a"));
    f.clock.pass(11 * 60 * 1000);
    q.housekeeping();
    let on_disk =
        store::parse(&std::fs::read(f.state_dir().join(store::STATE_FILE)).unwrap()).unwrap();
    assert_eq!(on_disk.entries[0].waited_ms, 11 * 60 * 1000);
    // A crash now, then the wall clock steps back while the agent is down: nothing is lost
    // beyond the last checkpoint.
    drop(q);
    f.clock.step_wall(-(5 * H as i64));
    let q = f.queue();
    assert_eq!(q.entries().unwrap()[0].waited_ms, 11 * 60 * 1000);
}

#[test]
fn q1_ids_never_repeat_across_restarts_and_clock_steps() {
    let f = Fixture::new();
    let mut seen = std::collections::HashSet::new();
    for i in 0..3 {
        let mut q = f.queue();
        for j in 0..3 {
            let id = admit(&mut q, req(&format!("r{i}-{j}")));
            assert!(seen.insert(id));
        }
        drop(q);
        f.clock.step_wall(-(3600 * 1000));
    }
}

#[test]
fn q14_persist_failure_refuses_rolls_back_is_loud_and_recovers() {
    let f = Fixture::new();
    let mut q = f.queue();
    admit(&mut q, req("a"));
    let before = std::fs::read(f.state_dir().join(store::STATE_FILE)).unwrap();
    // Every save fails, as on a full disk.
    crate::files::faults::fail_until_cleared(
        store::STATE_FILE,
        crate::files::faults::Fault::Rename,
    );
    assert!(matches!(
        q.enqueue(&root(), Ok(req("b")), None),
        Err(QueueError::PersistFailed(_))
    ));
    assert_eq!(q.entries().unwrap().len(), 1, "rolled back");
    assert_eq!(
        std::fs::read(f.state_dir().join(store::STATE_FILE)).unwrap(),
        before,
        "the last good state is intact"
    );
    assert!(q.snapshot().persist_failed.is_some());
    assert!(q.snapshot().enabled, "reads keep working");
    assert_eq!(f.events("persist-failed").len(), 1);
    assert!(matches!(
        q.cancel(&root(), &q.entries().unwrap()[0].id.clone()),
        Err(QueueError::PersistFailed(_))
    ));
    assert_eq!(
        f.events("persist-failed").len(),
        1,
        "the same failure is audited once"
    );
    q.housekeeping();
    assert!(q.snapshot().persist_failed.is_some());
    crate::files::faults::clear();
    q.housekeeping();
    assert!(
        q.snapshot().persist_failed.is_none(),
        "the tick's retry clears it"
    );
    assert_eq!(f.events("persist-recovered").len(), 1);
    admit(&mut q, req("b"));
}

#[test]
fn q15_corrupt_state_is_set_aside_and_the_queue_starts_empty() {
    let f = Fixture::new();
    let q = f.queue();
    drop(q);
    std::fs::write(
        f.state_dir().join(store::STATE_FILE),
        b"{\"version\": 1, \"entries\": [",
    )
    .unwrap();
    let q = f.queue();
    assert!(q.entries().unwrap().is_empty());
    let ev = &f.events("state-corrupt")[0];
    assert_eq!(ev.alert, Some(Alert::QueueNotice));
    let sidecar = std::path::PathBuf::from(ev.get("sidecar").unwrap());
    assert_eq!(
        std::fs::read(&sidecar).unwrap(),
        b"{\"version\": 1, \"entries\": ["
    );
    // The corrupt file was replaced at once: a restart does not set it aside again.
    drop(q);
    let mut q = f.queue();
    assert_eq!(f.events("state-corrupt").len(), 1);
    admit(&mut q, req("a"));
}

/// Q-15 as amended (core review finding 6): three entries, one carrying a status word from a
/// newer version. After a restart the two others are still there; the third is in a sidecar,
/// and one notice says how many were set aside and where. The state file is rewritten, so
/// the next start sets nothing aside again.
#[test]
fn q15_one_entry_from_a_newer_version_is_set_aside_the_others_stay() {
    let f = Fixture::new();
    let mut q = f.queue();
    let ids: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|r| admit(&mut q, req(r)))
        .collect();
    drop(q);
    let path = f.state_dir().join(store::STATE_FILE);
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    doc["entries"][1]["status"] = "frobbed".into();
    std::fs::write(&path, doc.to_string()).unwrap();
    let q = f.queue();
    let left: Vec<String> = q.entries().unwrap().iter().map(|e| e.id.clone()).collect();
    assert_eq!(left, vec![ids[0].clone(), ids[2].clone()]);
    let ev = f.events("state-salvaged");
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].alert, Some(Alert::QueueNotice));
    assert_eq!(ev[0].get("set_aside"), Some("1"));
    let sidecar = std::path::PathBuf::from(ev[0].get("sidecar").unwrap());
    assert!(ev[0].message.contains(&sidecar.display().to_string()));
    let side = std::fs::read_to_string(&sidecar).unwrap();
    assert!(side.contains("frobbed") && side.contains(&ids[1]), "{side}");
    assert!(f.events("state-corrupt").is_empty(), "not the whole queue");
    drop(q);
    let q = f.queue();
    assert_eq!(q.entries().unwrap().len(), 2);
    assert_eq!(f.events("state-salvaged").len(), 1, "set aside once");
}

#[test]
fn q14_retention_prunes_old_and_excess_terminal_entries() {
    let f = Fixture::new();
    let mut q = f.queue();
    let old = admit(&mut q, req("old"));
    q.cancel(&root(), &old).unwrap();
    f.clock.pass(8 * 24 * H);
    let kept = admit(&mut q, req("kept"));
    q.cancel(&root(), &kept).unwrap();
    q.housekeeping();
    let ids: Vec<String> = q.entries().unwrap().iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, vec![kept]);
}

#[test]
fn l6_disabled_queue_writes_nothing_under_the_state_directory() {
    let f = Fixture::new();
    std::fs::create_dir(f.state_dir()).unwrap();
    let foreign = lock::LockRecord {
        version: 1,
        host_id: Some("0123456789abcdef0123456789abcdef".into()),
        hostname: "other-host".into(),
        boot_id: None,
        pid: 1,
        pid_start: 1,
        pid_ns: None,
        acquired_at: 1,
        agent_version: "x".into(),
    };
    std::fs::write(f.state_dir().join(lock::LOCK_FILE), foreign.to_bytes()).unwrap();
    std::fs::write(f.state_dir().join(store::STATE_FILE), b"{\"version\":1}").unwrap();
    let listing = |d: &std::path::Path| {
        let mut v: Vec<(String, u64, i64, i64)> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| {
                use std::os::unix::fs::MetadataExt;
                let m = e.metadata().unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    m.len(),
                    m.mtime(),
                    m.mtime_nsec(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = listing(&f.state_dir());
    let mut q = f.queue();
    let snap = q.snapshot();
    assert!(!snap.enabled && !snap.lock_held);
    assert_eq!(snap.disabled_reason, "foreign-host");
    for r in [
        q.enqueue(&root(), Ok(req("a")), None).map(|_| ()),
        q.cancel(&root(), "rq-a-1"),
        q.requeue(&root(), "rq-a-1"),
        q.pause(&root(), "maintenance", "x").map(|_| ()),
        q.resume(&root()).map(|_| ()),
        q.stop(&root(), "a").map(|_| ()),
        q.stop_all(&root()),
        q.entries().map(|_| ()),
    ] {
        assert!(
            matches!(r, Err(QueueError::Disabled { ref code, .. }) if code == "foreign-host"),
            "{r:?}"
        );
    }
    q.housekeeping();
    assert_eq!(q.sweep_ttl(), 0);
    assert_eq!(
        listing(&f.state_dir()),
        before,
        "nothing under the state directory changed"
    );
    assert!(
        f.dir
            .path()
            .join("run")
            .join(crate::audit::AUDIT_FILE)
            .exists(),
        "audit lines went to the runtime dir"
    );
    let d = f.events("queue-disabled");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].alert, Some(Alert::QueueDisabled));
    // Row 7: the audit event carries no filesystem, liveness or heartbeat facts.
    for k in ["CLASS", "RULE", "HOLDER_ALIVE", "HEARTBEAT_AGE_MS"] {
        assert!(d[0].get(k).is_none(), "{k} in {:?}", d[0].fields);
    }
    // Not retried by ticks; a forced re-evaluation with the same outcome writes nothing more.
    let env = LockEnv {
        ours: ours(),
        facts: f.facts.clone(),
        prober: std::sync::Arc::new(KernelProber),
    };
    q.heartbeat(&env);
    q.evaluate_lock(&env, true);
    assert_eq!(f.events("queue-disabled").len(), 1);
    assert_eq!(listing(&f.state_dir()), before);
}

#[test]
fn l3_live_holder_is_retried_each_tick_and_acquired_when_released() {
    let f = Fixture::new();
    let first = f.queue();
    assert!(first.lock_held());
    let mut second = f.queue();
    assert_eq!(second.snapshot().disabled_reason, "live-holder");
    let env = LockEnv {
        ours: ours(),
        facts: f.facts.clone(),
        prober: std::sync::Arc::new(KernelProber),
    };
    second.heartbeat(&env);
    assert!(!second.lock_held());
    assert_eq!(
        f.events("queue-disabled").len(),
        1,
        "a retry that ends the same way writes nothing"
    );
    drop(first);
    second.heartbeat(&env);
    assert!(second.lock_held(), "acquired on the next retry");
    assert_eq!(f.events("queue-enabled").len(), 1);
}

/// Issue "Keep the promise under faults", 7 (core review finding 13): a change whose rename
/// succeeded but whose directory fsync failed is refused only after the previous state was
/// written back, so the refusal is not contradicted by a restart.
#[test]
fn q14_a_refusal_after_the_rename_is_never_contradicted_by_a_restart() {
    use crate::files::faults::{Fault, plan};
    let f = Fixture::new();
    let mut q = f.queue();
    admit(&mut q, req("kept"));
    plan(&[(store::STATE_FILE, Fault::DirSync)]);
    assert!(matches!(
        q.enqueue(&root(), Ok(req("refused")), None),
        Err(QueueError::PersistFailed(_))
    ));
    let on_disk = |f: &Fixture| -> Vec<String> {
        store::parse(&std::fs::read(f.state_dir().join(store::STATE_FILE)).unwrap())
            .unwrap()
            .entries
            .into_iter()
            .filter_map(|e| e.run_id)
            .collect()
    };
    assert_eq!(
        on_disk(&f),
        vec!["kept"],
        "the previous state is back on disk"
    );
    drop(q);
    let q = f.queue();
    let runs: Vec<String> = q
        .entries()
        .unwrap()
        .iter()
        .filter_map(|e| e.run_id.clone())
        .collect();
    assert_eq!(
        runs,
        vec!["kept"],
        "a restart does not find the refused change applied"
    );
}

/// The corner of the same mechanism: when even the write-back fails, the file holds the change
/// and a restart would load it, so the change stands and is acknowledged (not known durable:
/// `persist-failed` stays set and is audited).
#[test]
fn q14_when_the_previous_state_cannot_be_written_back_the_change_stands() {
    use crate::files::faults::{Fault, plan};
    let f = Fixture::new();
    let mut q = f.queue();
    plan(&[
        (store::STATE_FILE, Fault::DirSync),
        (store::STATE_FILE, Fault::Rename),
    ]);
    let id = admit(&mut q, req("stands"));
    assert!(q.snapshot().persist_failed.is_some());
    assert_eq!(f.events("persist-failed").len(), 1);
    drop(q);
    let q = f.queue();
    assert!(q.entries().unwrap().iter().any(|e| e.id == id));
}

#[test]
fn l1_heartbeat_touches_the_lock_and_a_removed_lock_is_lost_then_retaken() {
    let f = Fixture::new();
    let mut q = f.queue();
    let lockp = f.state_dir().join(lock::LOCK_FILE);
    let old = filetime(&lockp) - 3600;
    set_mtime(&lockp, old);
    let env = LockEnv {
        ours: ours(),
        facts: f.facts.clone(),
        prober: std::sync::Arc::new(KernelProber),
    };
    q.heartbeat(&env);
    assert!(filetime(&lockp) > old + 3000, "touched");
    // L-3 as amended: a lock found lost is evaluated again in the same step, and only the
    // outcome is reported, saying what happened. Nobody else holds it here: it is taken again.
    std::fs::remove_file(&lockp).unwrap();
    q.heartbeat(&env);
    assert!(q.lock_held(), "evaluated again at once");
    assert!(lockp.exists(), "a new lock file, born locked");
    assert!(f.events("queue-disabled").is_empty(), "one report, not two");
    let en = f.events("queue-enabled");
    assert_eq!(en.len(), 1);
    assert!(
        en[0].message.contains("replaced or removed while held"),
        "{}",
        en[0].message
    );
}

fn filetime(p: &std::path::Path) -> i64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().mtime()
}

fn set_mtime(p: &std::path::Path, secs: i64) {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs as u64);
    std::fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// An idle agent republishes the view after every heartbeat: what did not change is shared,
/// not copied (the watch records and the entries); a change publishes new ones.
#[test]
fn a_republish_without_a_change_copies_nothing() {
    let f = Fixture::new();
    let q = Shared::new(f.queue());
    admit(&mut q.lock(), req("a"));
    let before = q.view();
    {
        let mut g = q.lock();
        let _: &mut Queue = &mut g;
    }
    let after = q.view();
    assert!(!Arc::ptr_eq(&before, &after), "republished");
    let (Ok(e1), Ok(e2)) = (&before.entries, &after.entries) else {
        panic!("the queue is enabled");
    };
    assert!(Arc::ptr_eq(e1, e2), "the entries are shared");
    let (Ok(r1), Ok(r2)) = (&before.runs, &after.runs) else {
        panic!("the queue is enabled");
    };
    assert!(Arc::ptr_eq(r1, r2), "the watch records are shared");
    admit(&mut q.lock(), req("b"));
    let changed = q.view();
    assert_eq!(changed.entries.as_ref().unwrap().len(), 2);
    assert!(!Arc::ptr_eq(e2, changed.entries.as_ref().unwrap()));
}
