//! Anomalies and the attention item (SPEC G-7 to G-9): the host's one rolling item, updated in
//! place, that holds what an operator should look at: anomalies that outlasted their grace and
//! queue notices (the "raise"s of §2–§5).
//!
//! Journal, one cause ⇒ one entry. A queue notice's audit entry is its own alert, written by
//! the auditor after [`Attention::notice`] lets it through (identical notices within 10 minutes
//! are counted, not re-logged). An anomaly whose cause is already in the item as a notice
//! (same reason code) joins silently; an opening or growth caused only by anomalies writes one
//! `posture-degraded` entry; the item closing writes one `posture-restored` entry; anything
//! else updates the item and writes nothing.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::audit::{Alert, Event, EventKind};
use crate::clock::Clock;

/// Identical notices within this window are counted, not re-logged.
pub(crate) const COALESCE_MS: u64 = 10 * 60 * 1000;
/// How many recent notices the item shows.
pub(crate) const RECENT: usize = 8;

/// The entry a notice is about: its `entry_id` field when that is an entry id in shape.
fn entry_id_of(e: &Event) -> Option<String> {
    e.get("entry_id")
        .filter(|id| crate::queue::entry::valid_id(id))
        .map(str::to_string)
}

/// G-7's anomalies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AnomalyKind {
    /// `off` with `diverged-from-default`.
    DivergedFromDefault,
    OffRuntimeDivergent,
    OnStale,
    Missing,
    Errored,
    /// More than 3 state changes within the last 10 evaluations.
    Flapping,
    /// A load-bearing row off, or in dry run past the soak.
    LoadBearingGap,
}

impl AnomalyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyKind::DivergedFromDefault => "diverged-from-default",
            AnomalyKind::OffRuntimeDivergent => "off-runtime-divergent",
            AnomalyKind::OnStale => "on-stale",
            AnomalyKind::Missing => "missing",
            AnomalyKind::Errored => "errored",
            AnomalyKind::Flapping => "flapping",
            AnomalyKind::LoadBearingGap => "load-bearing-gap",
        }
    }
}

/// One anomaly of one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anomaly {
    pub key: String,
    pub kind: AnomalyKind,
    pub reason_code: Option<String>,
}

impl Anomaly {
    /// `queue.resume: off-runtime-divergent (foreign-host)`.
    pub fn describe(&self) -> String {
        match &self.reason_code {
            Some(r) => format!("{}: {} ({r})", self.key, self.kind.as_str()),
            None => format!("{}: {}", self.key, self.kind.as_str()),
        }
    }
}

/// How long a notice stays in the item (G-9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stay {
    /// Leaves after `posture.notice_hold_min`, or when acknowledged.
    OneOff,
    /// Leaves only when acknowledged: what it reports needs an operator (Q-15 as amended:
    /// queue state set aside).
    UntilAcked,
    /// Leaves when its cause clears.
    While(Cause),
}

/// Causes that persist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    QueueDisabled,
    PersistFailed,
    PausedWaiting,
    /// The service manager unreachable past its grace (§12 D-6).
    ManagerUnreachable,
}

/// Which persistent causes hold now (from the queue).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Causes {
    pub queue_disabled: bool,
    pub persist_failed: bool,
    pub paused_waiting: bool,
    pub manager_unreachable: bool,
}

impl Causes {
    fn holds(&self, c: Cause) -> bool {
        match c {
            Cause::QueueDisabled => self.queue_disabled,
            Cause::PersistFailed => self.persist_failed,
            Cause::PausedWaiting => self.paused_waiting,
            Cause::ManagerUnreachable => self.manager_unreachable,
        }
    }
}

/// Whether an event is a queue notice (goes into the item), by its alert.
pub(crate) fn is_queue_notice(e: &Event) -> bool {
    matches!(
        e.alert,
        Some(
            Alert::QueueDisabled
                | Alert::RevivalGaveUp
                | Alert::StalePauseAutoResumed
                | Alert::PausedWithRunsWaiting
                | Alert::QueueNotice
                | Alert::RunUnknown
        )
    )
}

/// How long a notice of `kind` stays.
pub(crate) fn stay_of(kind: &str) -> Stay {
    match kind {
        "queue-disabled" => Stay::While(Cause::QueueDisabled),
        "persist-failed" => Stay::While(Cause::PersistFailed),
        "paused-waiting" => Stay::While(Cause::PausedWaiting),
        "manager-unreachable" => Stay::While(Cause::ManagerUnreachable),
        "state-salvaged" | "state-corrupt" | "run-unknown" => Stay::UntilAcked,
        _ => Stay::OneOff,
    }
}

/// The reason code a notice stands for, if any (for anomalies that join it).
fn reason_of(e: &Event) -> Option<String> {
    if let Some(r) = e.get("reason") {
        return Some(r.to_string());
    }
    super::rows::REASON_CODES
        .contains(&e.kind.as_str())
        .then(|| e.kind.clone())
}

#[derive(Debug, Clone)]
struct Notice {
    kind: String,
    message: String,
    /// The entry it is about, if any (an id, closed in shape: shown to everyone).
    entry_id: Option<String>,
    reason_code: Option<String>,
    stay: Stay,
    at_wall: u64,
    at_boot: u64,
    count: u64,
}

/// The attention item and what it needs to decide.
pub struct Attention {
    clock: Arc<dyn Clock>,
    grace_ms: u64,
    hold_ms: u64,
    opened_at: Option<u64>,
    updated_at: u64,
    /// Alertable anomalies in the item.
    anomalies: BTreeMap<(String, AnomalyKind), Option<String>>,
    notices: Vec<Notice>,
    recent: VecDeque<serde_json::Value>,
    counts: BTreeMap<String, u64>,
    /// (kind, message) → (boottime last written, notices counted since).
    coalesce: HashMap<(String, String), (u64, u64)>,
    /// When each current anomaly was first seen (boottime).
    first_seen: HashMap<(String, AnomalyKind), u64>,
    raised: Vec<(String, String)>,
}

impl Attention {
    pub fn new(clock: Arc<dyn Clock>, grace_ms: u64, hold_ms: u64) -> Attention {
        Attention {
            clock,
            grace_ms,
            hold_ms,
            opened_at: None,
            updated_at: 0,
            anomalies: BTreeMap::new(),
            notices: Vec::new(),
            recent: VecDeque::new(),
            counts: BTreeMap::new(),
            coalesce: HashMap::new(),
            first_seen: HashMap::new(),
            raised: Vec::new(),
        }
    }

    /// New grace and hold (reload).
    pub fn set_timing(&mut self, grace_ms: u64, hold_ms: u64) {
        self.grace_ms = grace_ms;
        self.hold_ms = hold_ms;
    }

    /// `Degraded`: the item is open.
    pub fn is_open(&self) -> bool {
        self.opened_at.is_some()
    }

    /// The signals to emit (`AttentionRaised(kind, detail)`) since the last call.
    pub fn take_raised(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.raised)
    }

    /// The alertable anomalies in the item.
    pub fn anomalies(&self) -> Vec<Anomaly> {
        self.anomalies
            .iter()
            .map(|((key, kind), r)| Anomaly {
                key: key.clone(),
                kind: *kind,
                reason_code: r.clone(),
            })
            .collect()
    }

    /// The reason codes of the notices in the item.
    pub fn notice_reasons(&self) -> Vec<String> {
        self.notices
            .iter()
            .filter_map(|n| n.reason_code.clone())
            .collect()
    }

    /// The most recent notice still in the item: (kind, message).
    pub fn latest_notice(&self) -> Option<(&str, &str)> {
        self.notices
            .iter()
            .max_by_key(|n| n.at_boot)
            .map(|n| (n.kind.as_str(), n.message.as_str()))
    }

    fn open(&mut self, now_wall: u64) {
        if self.opened_at.is_none() {
            self.opened_at = Some(now_wall);
            self.counts.clear();
        }
        self.updated_at = now_wall;
    }

    /// A queue notice arrives (G-9). Returns the entry to write (its own alert, with the count
    /// of identical notices coalesced since the last one written), or None when it is coalesced.
    /// Either way the item holds it.
    pub fn notice(&mut self, e: &Event) -> Option<Event> {
        let (now_boot, now_wall) = (self.clock.boot_ms(), self.clock.wall_ms());
        self.coalesce
            .retain(|_, (at, n)| now_boot.saturating_sub(*at) < COALESCE_MS || *n > 0);
        let ck = (e.kind.clone(), e.message.clone());
        let write = match self.coalesce.get_mut(&ck) {
            Some((at, n)) if now_boot.saturating_sub(*at) < COALESCE_MS => {
                *n += 1;
                None
            }
            Some((at, n)) => {
                let since = *n;
                *at = now_boot;
                *n = 0;
                Some(if since > 0 {
                    let mut out = e.clone();
                    out.message = format!(
                        "{} ({since} more like it in the previous 10 min were not logged)",
                        out.message
                    );
                    out.field("coalesced", since)
                } else {
                    e.clone()
                })
            }
            None => {
                self.coalesce.insert(ck, (now_boot, 0));
                Some(e.clone())
            }
        };
        // Into the item: an identical active notice is refreshed, else a new one joins.
        let stay = stay_of(&e.kind);
        match self
            .notices
            .iter_mut()
            .find(|n| n.kind == e.kind && n.message == e.message)
        {
            Some(n) => {
                n.count += 1;
                n.at_boot = now_boot;
                n.at_wall = now_wall;
            }
            None => self.notices.push(Notice {
                kind: e.kind.clone(),
                message: e.message.clone(),
                entry_id: entry_id_of(e),
                reason_code: reason_of(e),
                stay,
                at_wall: now_wall,
                at_boot: now_boot,
                count: 1,
            }),
        }
        self.open(now_wall);
        *self.counts.entry(e.kind.clone()).or_default() += 1;
        let entry_id = entry_id_of(e);
        self.recent.push_front(serde_json::json!({
            "kind": e.kind, "message": e.message, "at": now_wall, "entry_id": entry_id,
        }));
        self.recent.truncate(RECENT);
        if write.is_some() {
            // For everyone (§12 G-10): the kind and an entry id, else how many times it came.
            let count = self
                .notices
                .iter()
                .find(|n| n.kind == e.kind && n.message == e.message)
                .map_or(1, |n| n.count);
            self.raised.push((
                e.kind.clone(),
                entry_id.unwrap_or_else(|| count.to_string()),
            ));
        }
        write
    }

    /// G-8: one evaluation. `current` are the rows' anomalies now; `flapping` the keys whose
    /// anomalies alert at once. Returns the journal entries to write (posture-degraded or
    /// posture-restored, at most one each).
    pub fn evaluate(
        &mut self,
        current: &[Anomaly],
        flapping: &HashSet<String>,
        causes: &Causes,
    ) -> Vec<Event> {
        let (now_boot, now_wall) = (self.clock.boot_ms(), self.clock.wall_ms());
        let was_open = self.is_open();
        let mut out = Vec::new();
        // Grace (G-8).
        let keys: HashSet<(String, AnomalyKind)> =
            current.iter().map(|a| (a.key.clone(), a.kind)).collect();
        self.first_seen.retain(|k, _| keys.contains(k));
        let mut alertable = BTreeMap::new();
        for a in current {
            let first = *self
                .first_seen
                .entry((a.key.clone(), a.kind))
                .or_insert(now_boot);
            if now_boot.saturating_sub(first) >= self.grace_ms || flapping.contains(&a.key) {
                alertable.insert((a.key.clone(), a.kind), a.reason_code.clone());
            }
        }
        // Notices leave: one-off after the hold, the others when their cause clears.
        let before = self.notices.len();
        let hold = self.hold_ms;
        self.notices.retain(|n| match n.stay {
            Stay::OneOff => now_boot.saturating_sub(n.at_boot) < hold,
            Stay::UntilAcked => true,
            Stay::While(c) => causes.holds(c),
        });
        let mut changed = self.notices.len() != before;
        // Anomalies join or leave.
        let notice_reasons: HashSet<String> = self
            .notices
            .iter()
            .filter_map(|n| n.reason_code.clone())
            .collect();
        if !was_open && (!alertable.is_empty() || !self.notices.is_empty()) {
            self.open(now_wall);
        }
        let mut by_anomaly = Vec::new();
        for (k, r) in &alertable {
            if self.anomalies.contains_key(k) {
                continue;
            }
            changed = true;
            *self
                .counts
                .entry(format!("anomaly:{}", k.1.as_str()))
                .or_default() += 1;
            let joins_notice = r.as_deref().is_some_and(|r| notice_reasons.contains(r));
            if !joins_notice {
                by_anomaly.push(
                    Anomaly {
                        key: k.0.clone(),
                        kind: k.1,
                        reason_code: r.clone(),
                    }
                    .describe(),
                );
            }
        }
        if alertable.len() != self.anomalies.len()
            || alertable.keys().any(|k| !self.anomalies.contains_key(k))
        {
            changed = true;
        }
        self.anomalies = alertable;
        let now_open = !self.anomalies.is_empty() || !self.notices.is_empty();
        if !by_anomaly.is_empty() {
            let what = by_anomaly.join("; ");
            let message = if was_open {
                format!("outlive needs attention: {what} (the attention item grew)")
            } else {
                format!(
                    "outlive needs attention: {what}. `outlivectl guards` explains each row and what to do"
                )
            };
            out.push(
                Event::new(EventKind::PostureDegraded, message)
                    .alert(Alert::PostureDegraded)
                    .field("anomalies", &what)
                    .field("opened", !was_open),
            );
            // For everyone (§12 G-10): how many anomalies joined, not which.
            self.raised
                .push(("anomaly".into(), by_anomaly.len().to_string()));
        }
        if now_open {
            if !was_open || changed {
                self.open(now_wall);
            }
        } else if was_open {
            self.opened_at = None;
            self.updated_at = now_wall;
            out.push(
                Event::new(
                    EventKind::PostureRestored,
                    "outlive's attention item is clear: every guard is as configured and no notice is pending",
                )
                .alert(Alert::PostureRestored),
            );
        }
        out
    }

    /// `AckAttention` (G-9): one-off notices leave now. Returns how many left, and the
    /// posture-restored entry if the item closed.
    pub fn ack(&mut self) -> (usize, Vec<Event>) {
        let before = self.notices.len();
        self.notices
            .retain(|n| !matches!(n.stay, Stay::OneOff | Stay::UntilAcked));
        let gone = before - self.notices.len();
        let mut out = Vec::new();
        if self.is_open() && self.notices.is_empty() && self.anomalies.is_empty() {
            self.opened_at = None;
            self.updated_at = self.clock.wall_ms();
            out.push(
                Event::new(
                    EventKind::PostureRestored,
                    "outlive's attention item is clear (notices acknowledged)",
                )
                .alert(Alert::PostureRestored),
            );
        } else if gone > 0 {
            self.updated_at = self.clock.wall_ms();
        }
        (gone, out)
    }

    /// The `Attention` property (a{sv}).
    /// The item as published: `full` for root and members; for everyone else kinds, entry
    /// ids and counts only (§12 G-10: a notice's message may name a member's paths).
    pub fn to_json(&self, full: bool) -> serde_json::Value {
        let notices = self.notices.iter().map(|n| {
            let mut v = serde_json::json!({
                "kind": n.kind, "at": n.at_wall, "count": n.count, "entry_id": n.entry_id,
                "one_off": n.stay == Stay::OneOff,
                "until_acknowledged": n.stay == Stay::UntilAcked,
            });
            if full {
                v["message"] = n.message.clone().into();
            }
            v
        });
        let recent = self.recent.iter().map(|r| {
            if full {
                r.clone()
            } else {
                serde_json::json!({"kind": r["kind"], "at": r["at"], "entry_id": r["entry_id"]})
            }
        });
        serde_json::json!({
            "open": self.is_open(),
            "opened_at": self.opened_at.unwrap_or(0),
            "updated_at": self.updated_at,
            "anomalies": self.anomalies().iter().map(Anomaly::describe).collect::<Vec<_>>(),
            "notices": notices.collect::<Vec<_>>(),
            "recent": recent.collect::<Vec<_>>(),
            "counts": self.counts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::fake::FakeClock;

    const S: u64 = 1000;

    fn att(clock: &Arc<FakeClock>) -> Attention {
        Attention::new(clock.clone(), 120 * S, 60 * 60 * S)
    }

    fn a(key: &str, kind: AnomalyKind, r: Option<&str>) -> Anomaly {
        Anomaly {
            key: key.into(),
            kind,
            reason_code: r.map(str::to_string),
        }
    }

    fn none() -> HashSet<String> {
        HashSet::new()
    }

    fn kinds(ev: &[Event]) -> Vec<&str> {
        ev.iter().map(|e| e.kind.as_str()).collect()
    }

    #[test]
    fn g8_a_persistent_anomaly_alerts_once_after_the_grace() {
        let c = FakeClock::new();
        let mut t = att(&c);
        let x = [a("metrics.textfile", AnomalyKind::OnStale, None)];
        assert!(t.evaluate(&x, &none(), &Causes::default()).is_empty());
        c.pass(119 * S);
        assert!(
            t.evaluate(&x, &none(), &Causes::default()).is_empty(),
            "within the grace"
        );
        assert!(!t.is_open());
        c.pass(S);
        let ev = t.evaluate(&x, &none(), &Causes::default());
        assert_eq!(kinds(&ev), ["posture-degraded"]);
        assert_eq!(
            ev[0].alert.unwrap().message_id(),
            "732c4bc9ef3f4dd98cb6b773fa36edb3"
        );
        assert!(t.is_open());
        for _ in 0..10 {
            c.pass(60 * S);
            assert!(
                t.evaluate(&x, &none(), &Causes::default()).is_empty(),
                "once"
            );
        }
        // A second anomaly joining re-notifies; the item is updated, not created again.
        let opened = t.to_json(true)["opened_at"].clone();
        let y = [
            x[0].clone(),
            a("watchdog", AnomalyKind::OffRuntimeDivergent, None),
        ];
        t.evaluate(&y, &none(), &Causes::default());
        c.pass(120 * S);
        let ev = t.evaluate(&y, &none(), &Causes::default());
        assert_eq!(kinds(&ev), ["posture-degraded"]);
        assert!(
            ev[0].message.contains("watchdog: off-runtime-divergent")
                && ev[0].message.contains("grew")
        );
        assert_eq!(t.to_json(true)["opened_at"], opened, "updated in place");
        // The anomalies clear: one restored entry.
        let ev = t.evaluate(&[], &none(), &Causes::default());
        assert_eq!(kinds(&ev), ["posture-restored"]);
        assert_eq!(
            ev[0].alert.unwrap().message_id(),
            "1151efdae37c4b6e9cddb87dadbf6b50"
        );
        assert!(!t.is_open());
        assert!(t.evaluate(&[], &none(), &Causes::default()).is_empty());
    }

    #[test]
    fn g8_a_flapping_guard_alerts_at_once() {
        let c = FakeClock::new();
        let mut t = att(&c);
        let x = [
            a("publish.dbus", AnomalyKind::Flapping, None),
            a("publish.dbus", AnomalyKind::OffRuntimeDivergent, None),
        ];
        let flapping: HashSet<String> = ["publish.dbus".to_string()].into();
        let ev = t.evaluate(&x, &flapping, &Causes::default());
        assert_eq!(kinds(&ev), ["posture-degraded"]);
        assert!(ev[0].message.contains("flapping"));
    }

    fn disabled_notice() -> Event {
        Event::new(
            EventKind::QueueDisabled,
            "the revival queue is disabled: lock of other-host",
        )
        .alert(Alert::QueueDisabled)
        .field("reason", "foreign-host")
    }

    #[test]
    fn g9_a_queue_notice_and_the_anomaly_it_causes_make_one_entry() {
        let c = FakeClock::new();
        let mut t = att(&c);
        let written = t.notice(&disabled_notice());
        assert!(written.is_some(), "the notice's own entry is written");
        assert!(t.is_open(), "a notice opens the item");
        let causes = Causes {
            queue_disabled: true,
            ..Causes::default()
        };
        let x = [a(
            "queue.resume",
            AnomalyKind::OffRuntimeDivergent,
            Some("foreign-host"),
        )];
        t.evaluate(&x, &none(), &causes);
        c.pass(200 * S);
        let ev = t.evaluate(&x, &none(), &causes);
        assert!(
            ev.is_empty(),
            "the anomaly joins its notice silently: {ev:?}"
        );
        assert_eq!(t.anomalies().len(), 1);
        // The cause clears: the notice leaves, the anomaly too: restored once.
        let ev = t.evaluate(&[], &none(), &Causes::default());
        assert_eq!(kinds(&ev), ["posture-restored"]);
    }

    #[test]
    fn g9_one_off_notices_leave_after_the_hold_or_an_ack() {
        let c = FakeClock::new();
        let mut t = att(&c);
        let gave =
            Event::new(EventKind::GaveUp, "could not bring s back").alert(Alert::RevivalGaveUp);
        t.notice(&gave);
        c.pass(59 * 60 * S);
        assert!(t.evaluate(&[], &none(), &Causes::default()).is_empty());
        assert!(t.is_open());
        c.pass(60 * S);
        let ev = t.evaluate(&[], &none(), &Causes::default());
        assert_eq!(kinds(&ev), ["posture-restored"], "after notice_hold_min");
        // An ack takes one-off notices out at once; persistent ones stay.
        t.notice(&Event::new(EventKind::BreakerOpened, "3 failed").alert(Alert::QueueNotice));
        t.notice(&disabled_notice());
        let (gone, ev) = t.ack();
        assert_eq!(gone, 1);
        assert!(
            ev.is_empty() && t.is_open(),
            "the disabled queue is still a cause"
        );
        let causes = Causes {
            queue_disabled: true,
            ..Causes::default()
        };
        assert!(t.evaluate(&[], &none(), &causes).is_empty());
        let ev = t.evaluate(&[], &none(), &Causes::default());
        assert_eq!(kinds(&ev), ["posture-restored"]);
        // An ack that empties the item closes it.
        t.notice(&gave);
        let (gone, ev) = t.ack();
        assert_eq!((gone, kinds(&ev)), (1, vec!["posture-restored"]));
    }

    /// Q-15 as amended: a notice that queue state was set aside stays until acknowledged,
    /// however long it waits.
    #[test]
    fn q15_a_salvage_notice_stays_until_acknowledged() {
        let c = FakeClock::new();
        let mut t = att(&c);
        for kind in [EventKind::StateSalvaged, EventKind::StateCorrupt] {
            t.notice(&Event::new(kind, "1 item set aside in /x").alert(Alert::QueueNotice));
            c.pass(7 * 24 * 60 * 60 * S);
            assert!(t.evaluate(&[], &none(), &Causes::default()).is_empty());
            assert!(t.is_open(), "{kind} is still there after a week");
            let (gone, ev) = t.ack();
            assert_eq!((gone, kinds(&ev)), (1, vec!["posture-restored"]), "{kind}");
        }
    }

    #[test]
    fn g9_identical_notices_write_at_most_one_entry_per_10_minutes_with_the_count() {
        let c = FakeClock::new();
        let mut t = att(&c);
        let n = Event::new(EventKind::PressureHeld, "run-7 is held under pressure")
            .alert(Alert::QueueNotice);
        let mut written = vec![];
        for i in 0..1000u64 {
            if let Some(e) = t.notice(&n) {
                written.push((i, e));
            }
            c.pass(S); // 1000 s in all: two 10-minute windows
        }
        assert_eq!(
            written.len(),
            2,
            "{:?}",
            written.iter().map(|w| w.0).collect::<Vec<_>>()
        );
        assert_eq!(written[0].1.get("coalesced"), None);
        assert_eq!(written[1].0, 600);
        assert_eq!(written[1].1.get("coalesced"), Some("599"));
        assert!(written[1].1.message.contains("599 more like it"));
        assert_eq!(t.to_json(true)["counts"]["pressure-held"], 1000);
        let notices = t.to_json(true)["notices"].as_array().unwrap().clone();
        assert_eq!(notices.len(), 1, "one notice, counted");
        assert_eq!(notices[0]["count"], 1000);
        // A different notice is not coalesced with it.
        assert!(
            t.notice(
                &Event::new(EventKind::PressureHeld, "run-8 is held").alert(Alert::QueueNotice)
            )
            .is_some()
        );
        assert_eq!(t.to_json(true)["recent"].as_array().unwrap().len(), RECENT);
    }

    #[test]
    fn g9_notice_classes() {
        assert_eq!(stay_of("queue-disabled"), Stay::While(Cause::QueueDisabled));
        assert_eq!(stay_of("persist-failed"), Stay::While(Cause::PersistFailed));
        assert_eq!(stay_of("paused-waiting"), Stay::While(Cause::PausedWaiting));
        for k in [
            "gave-up",
            "breaker-opened",
            "ttl-expired",
            "overflow",
            "invalidated",
            "resurrection-cap",
            "auto-resumed-stale-pause",
        ] {
            assert_eq!(stay_of(k), Stay::OneOff, "{k}");
        }
        assert!(is_queue_notice(&disabled_notice()));
        assert!(!is_queue_notice(
            &Event::new(EventKind::Revived, "x").alert(Alert::RunRevived)
        ));
        assert!(!is_queue_notice(
            &Event::new(EventKind::PostureDegraded, "x").alert(Alert::PostureDegraded)
        ));
    }
}
