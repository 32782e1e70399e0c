//! The drainer's transitions of an entry (D-6 to D-9, Q-2, Q-13, P-5): an attempt begun and
//! finished, an invalidation, a deferral, a stale pause lifted.

use super::*;

/// How an attempt ended (D-9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptResult {
    /// Verified alive or completed; `at_boot` when found by boot reconciliation.
    Revived { at_boot: bool },
    /// A failed attempt; `backoff` false for Q-13 (requeued without backoff).
    Failed { why: String, backoff: bool },
}
impl AttemptResult {
    pub(super) fn word(&self) -> &'static str {
        match self {
            AttemptResult::Revived { .. } => "revived",
            AttemptResult::Failed { .. } => "failed",
        }
    }
}
/// What `finish_attempt` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    Revived,
    Failed,
    GaveUp,
    /// The entry left `starting` meanwhile (a cancel); its status.
    Superseded(Status),
}

impl Queue {
    /// `queued → starting`: an attempt begins (its unit name recorded first, so a crash during
    /// the start leaves something to reconcile, Q-13). Returns the entry as it now is.
    pub fn begin_attempt(&mut self, id: &str, unit: Option<String>) -> Result<Entry, QueueError> {
        self.commit(|s, ctx| {
            let e = s
                .entries
                .iter_mut()
                .find(|e| e.id == id)
                .ok_or_else(|| QueueError::NotFound(id.to_string()))?;
            expect(e, &Status::Queued, "begin an attempt")?;
            e.record(
                Some(Status::Queued),
                Status::Starting,
                &format!("attempt {}", e.attempts + 1),
                ctx.wall,
            );
            e.status = Status::Starting;
            e.attempt_unit = unit.clone();
            e.attempt_pid = None;
            e.last_attempt_at = Some(ctx.wall);
            e.next_attempt_boot = None;
            Ok((e.clone(), vec![]))
        })
    }

    /// Record the pid and start time of a spawned attempt (no service manager).
    pub fn set_attempt_pid(&mut self, id: &str, pid: (i64, u64)) -> Result<(), QueueError> {
        self.commit(|s, _| {
            if let Some(e) = s.entries.iter_mut().find(|e| e.id == id) {
                e.attempt_pid = Some(pid);
            }
            Ok(((), vec![]))
        })
    }

    /// `starting → revived`, or a failed attempt (`queued` with backoff, or
    /// `gave-up:max-attempts`). Refused (and audited) when the entry is no longer `starting`:
    /// a cancel during the attempt stands; the caller then stops what it started.
    pub fn finish_attempt(
        &mut self,
        id: &str,
        result: AttemptResult,
        backoff_base_ms: u64,
    ) -> Result<Finished, QueueError> {
        let max_attempts = self.settings.max_attempts;
        let current = self
            .state
            .entries
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.status.clone());
        match current {
            None => return Err(QueueError::NotFound(id.to_string())),
            Some(Status::Starting) => {}
            Some(other) => {
                self.audit(
                    Event::new(
                        EventKind::TransitionRefused,
                        format!("the attempt on {id} ended ({}), but the entry is {other} now: that stands", result.word()),
                    )
                    .priority(priority::NOTICE)
                    .field("entry_id", id)
                    .field("status", &other)
                    .field("outcome", result.word()),
                );
                return Ok(Finished::Superseded(other));
            }
        }
        self.commit(|s, ctx| {
            let e = s.entries.iter_mut().find(|e| e.id == id).expect("present");
            let label = e.label();
            let key = e.key();
            match result {
                AttemptResult::Revived { at_boot } => {
                    e.record(Some(Status::Starting), Status::Revived, if at_boot { "verified at boot" } else { "verified" }, ctx.wall);
                    e.status = Status::Revived;
                    e.terminal_at = Some(ctx.wall);
                    s.ledger.record(&key, ctx.wall);
                    let mut ev = Event::new(
                        EventKind::Revived,
                        format!(
                            "revived {label} ({id}): the run was restarted{}{} (restarted, not resumed: only the restart is known)",
                            e.attempt_unit.as_deref().map(|u| format!(" as {u}")).unwrap_or_default(),
                            if at_boot { ", verified when outlived started again" } else { "" }
                        ),
                    )
                    .alert(Alert::RunRevived)
                    .field("entry_id", id)
                    .field("key", &key)
                    .field("attempt", e.attempts + 1)
                    .field("unit", e.attempt_unit.clone().unwrap_or_default());
                    if at_boot {
                        ev = ev.field("verified_at_boot", true);
                    }
                    Ok((Finished::Revived, vec![ev]))
                }
                AttemptResult::Failed { why, backoff } => {
                    e.attempts += 1;
                    if e.attempts >= max_attempts {
                        let status = Status::GaveUp("max-attempts".into());
                        e.record(Some(Status::Starting), status.clone(), &why, ctx.wall);
                        e.status = status;
                        e.terminal_at = Some(ctx.wall);
                        let ev = Event::new(
                            EventKind::GaveUp,
                            format!(
                                "could not bring {label} back: {} attempts failed (last: {why}); `outlivectl requeue {id}` tries again",
                                e.attempts
                            ),
                        )
                        .alert(Alert::RevivalGaveUp)
                        .field("entry_id", id)
                        .field("attempts", e.attempts)
                        .field("why", &why);
                        Ok((Finished::GaveUp, vec![ev]))
                    } else {
                        e.record(Some(Status::Starting), Status::Queued, &why, ctx.wall);
                        e.status = Status::Queued;
                        e.wait_anchor_boot = ctx.boot;
                        let delay = if backoff { backoff_base_ms.saturating_mul(1 << (e.attempts - 1).min(30)) } else { 0 };
                        e.next_attempt_boot = (delay > 0).then_some(ctx.boot + delay);
                        let ev = Event::new(
                            EventKind::AttemptFailed,
                            format!("attempt {} to revive {label} ({id}) failed: {why}; next try in {} s", e.attempts, delay / 1000),
                        )
                        .priority(priority::WARNING)
                        .field("entry_id", id)
                        .field("attempt", e.attempts)
                        .field("why", &why)
                        .field("backoff_ms", delay);
                        Ok((Finished::Failed, vec![ev]))
                    }
                }
            }
        })
    }

    /// D-6: `queued → invalidated:<why>`; audited, and raised when `live` (not in dry run).
    pub fn invalidate(
        &mut self,
        id: &str,
        why: &str,
        detail: &str,
        live: bool,
    ) -> Result<(), QueueError> {
        self.commit(|s, ctx| {
            let e = s
                .entries
                .iter_mut()
                .find(|e| e.id == id)
                .ok_or_else(|| QueueError::NotFound(id.to_string()))?;
            expect(e, &Status::Queued, "invalidate")?;
            let status = Status::Invalidated(why.to_string());
            e.record(Some(Status::Queued), status.clone(), detail, ctx.wall);
            e.status = status;
            e.terminal_at = Some(ctx.wall);
            let mut ev = Event::new(
                EventKind::Invalidated,
                format!("{} ({id}) will not be revived: {why} ({detail})", e.label()),
            )
            .field("entry_id", id)
            .field("why", why);
            ev = if live {
                ev.alert(Alert::QueueNotice)
            } else {
                ev.priority(priority::NOTICE)
            };
            Ok(((), vec![ev]))
        })
    }

    /// D-6: a check that could not decide: keep the entry queued, retry after `delay_ms`.
    pub fn defer(&mut self, id: &str, delay_ms: u64, why: &str) -> Result<(), QueueError> {
        self.commit(|s, ctx| {
            let e = s.entries.iter_mut().find(|e| e.id == id).ok_or_else(|| QueueError::NotFound(id.to_string()))?;
            e.next_attempt_boot = Some(ctx.boot + delay_ms);
            let ev = Event::new(
                EventKind::CheckUndecided,
                format!("could not check {} ({id}) before reviving it: {why}; it stays queued and is checked again in {} s", e.label(), delay_ms / 1000),
            )
            .priority(priority::NOTICE)
            .field("entry_id", id)
            .field("why", why);
            Ok(((), vec![ev]))
        })
    }

    /// P-5: the stale emergency pause heals itself (Q-12's credit applies).
    pub fn auto_resume_stale(&mut self, why: &str) -> Result<bool, QueueError> {
        let why = why.to_string();
        self.unpause_with(move |p, ms| {
            let msg = format!(
                "revival resumed by itself after {} s: the emergency pause ({}) was stale ({why}). Runs that were \
                 explicitly stopped stay stopped.",
                ms / 1000,
                p.reason
            );
            Event::new(EventKind::AutoResumedStalePause, msg).alert(Alert::StalePauseAutoResumed)
        })
    }

    /// The CLOCK_BOOTTIME of the pause's start (in memory).
    pub fn pause_boot(&self) -> Option<u64> {
        self.pause_boot
    }
}
