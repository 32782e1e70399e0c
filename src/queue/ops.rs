//! Operator and reporter mutations (Q-4 to, P-1, P-2): enqueue, cancel, requeue,
//! pause and resume, stop and stop-all. Each checks its caller and goes through `commit`.

use super::*;

/// How a request is admitted: as whom it runs, who queued it, and whether Q-4's
/// eligibility rows apply (`Revive` skips them: the caller decided).
pub(super) struct Admission {
    pub run_as: (u32, u32),
    pub by: u32,
    pub eligibility: bool,
}

/// A new queued entry for `req`, run as `(uid, gid)`, queued by the caller `by`.
pub(super) fn new_entry(
    id: &str,
    req: &Request,
    (uid, gid): (u32, u32),
    by: u32,
    ctx: &Ctx,
) -> Entry {
    Entry {
        id: id.to_string(),
        run_id: req.run_id.clone(),
        job: req.job.clone(),
        session: req.session.clone(),
        target: req.target.clone().expect("validated"),
        uid,
        gid,
        enqueued_by: Some(by),
        cwd: req.cwd.clone().expect("validated"),
        worktree: req.worktree.clone(),
        class: req.class(),
        reason: entry::clamp_reason(&req.reason),
        active_run: req.is_active_run(),
        run_state_file: req.run_state_file.clone(),
        evidence: req.evidence.clone(),
        status: Status::Queued,
        attempts: 0,
        attempt_unit: None,
        attempt_pid: None,
        reaped_at: req.reaped_at.unwrap_or(ctx.wall),
        queued_at: ctx.wall,
        requeued_at: None,
        last_attempt_at: None,
        next_attempt_at: None,
        waited_ms: 0,
        calm_ms: 0,
        frozen_ms: 0,
        pressure_starved: false,
        terminal_at: None,
        history: vec![],
        watched: false,
        next_attempt_boot: None,
        wait_anchor_boot: ctx.boot,
    }
}
/// The audit line of a stop dropped to keep at most [`rules::MAX_STOPS`].
pub(super) fn stop_dropped(s: &RunStop) -> Event {
    Event::new(
        EventKind::StopDropped,
        format!(
            "the operator stop of run {} recorded at {} was forgotten: at most {} stops are kept \
             (entries queued before it were cancelled when it was recorded)",
            s.run_id,
            crate::clock::rfc3339_ms(s.at),
            rules::MAX_STOPS
        ),
    )
    .priority(priority::NOTICE)
    .field("run_id", &s.run_id)
}

impl Queue {
    /// Q-4 Enqueue. `req` is the decoded dictionary or the decoding error (`field`, why); the
    /// checks run in the SPEC's order, so a disabled queue answers `QueueDisabled` first.
    /// `named` is what the user database says of the request's `user`, looked up before the
    /// queue was locked (None when it names none).
    pub fn enqueue(
        &mut self,
        caller: &Caller,
        req: Result<Request, (String, String)>,
        named: Option<crate::facts::users::Lookup>,
    ) -> Result<Reply, QueueError> {
        self.require_enabled()?;
        if !self.settings.enabled {
            return Err(QueueError::Disabled {
                code: "queue-off".into(),
                detail: "queue.enabled is false in the configuration".into(),
            });
        }
        if !caller.may_mutate {
            return Err(QueueError::AccessDenied(format!(
                "uid {} may not enqueue: root or a member of group `outlive` only",
                caller.uid
            )));
        }
        let req = req.map_err(|(field, why)| QueueError::Invalid { field, why })?;
        req.validate().map_err(|(field, why)| QueueError::Invalid {
            field: field.into(),
            why,
        })?;
        if (req.user.is_some() || req.group.is_some()) && !caller.root {
            return Err(QueueError::AccessDenied(
                "only root may enqueue a run as another user (user, group)".into(),
            ));
        }
        let (uid, gid) = rules::run_as(
            (caller.uid, caller.gid),
            req.user,
            req.group,
            named.as_ref(),
        )
        .map_err(|(field, why)| QueueError::Invalid {
            field: field.into(),
            why,
        })?;
        if let Some(Target::Unit { unit }) = &req.target
            && !caller.root
            && !self
                .settings
                .allowed_units
                .iter()
                .any(|g| entry::unit_allowed(g, unit))
        {
            return Err(QueueError::AccessDenied(format!(
                "{unit} is not in queue.allowed_units: non-root callers may enqueue only units matching {:?}",
                self.settings.allowed_units
            )));
        }
        self.admit(
            req,
            Admission {
                run_as: (uid, gid),
                by: caller.uid,
                eligibility: true,
            },
            |_, _| {},
        )
    }

    /// Q-4's admission once the caller is authorized and the request valid: eligibility
    /// (unless the caller decided, as `Revive` does), the duplicate rule, the resurrection cap
    /// and the bound. A refusal writes nothing and is audited; an admission is one
    /// commit, in which `also` may change the rest of the state (capture records the entry on
    /// its watch record in the same write).
    #[expect(clippy::too_many_lines, reason = "Q-4 to Q-7 in the rule's order")]
    pub(super) fn admit(
        &mut self,
        req: Request,
        how: Admission,
        also: impl FnOnce(&mut State, &Reply) + Send,
    ) -> Result<Reply, QueueError> {
        let (uid, gid) = how.run_as;
        let caller_uid = how.by;
        let key = req.key();
        let eligible = if how.eligibility {
            rules::eligibility(&req, self.settings.include_operator_kills)
        } else {
            Ok(())
        };
        if let Err(word) = eligible {
            self.audit(
                Event::new(
                    EventKind::EnqueueRefused,
                    format!("did not queue {key}: {word}"),
                )
                .field("key", &key)
                .field("why", word)
                .field("uid", caller_uid),
            );
            return Ok(Reply {
                admitted: false,
                why: word.into(),
                id: String::new(),
            });
        }
        if self
            .state
            .entries
            .iter()
            .any(|e| e.status.is_open() && e.key() == key)
        {
            self.audit(
                Event::new(
                    EventKind::EnqueueRefused,
                    format!("did not queue {key}: it already has an open entry"),
                )
                .field("key", &key)
                .field("why", "duplicate-open-entry")
                .field("uid", caller_uid),
            );
            return Ok(Reply {
                admitted: false,
                why: "duplicate-open-entry".into(),
                id: String::new(),
            });
        }
        // are decided on the current state; the commit only carries them out.
        let now = self.clock.wall_ms();
        let recent = self.state.ledger.recent(&key, now);
        let capped = recent >= self.settings.max_resurrections;
        let max = self.settings.max_size;
        let bound = if capped {
            Bound::Admit
        } else {
            rules::bound(&self.state.entries, req.class(), max)
        };
        if bound == Bound::Overflow {
            self.audit(
                Event::new(
                    EventKind::Overflow,
                    format!(
                        "the queue is full ({max} open entries) and {key} has a lower priority than all of them: not queued"
                    ),
                )
                .alert(Alert::QueueNotice)
                .field("key", &key),
            );
            return Ok(Reply {
                admitted: false,
                why: "overflow".into(),
                id: String::new(),
            });
        }
        let by = format!("enqueue by uid {}", caller_uid);
        let enqueued_by = caller_uid;
        self.commit(move |s, ctx| {
            let id = rules::next_id(&mut s.last_id_ms, &mut s.id_seq, ctx.wall);
            let mut e = new_entry(&id, &req, (uid, gid), enqueued_by, ctx);
            let mut events = vec![];
            if capped {
                let status = Status::GaveUp("resurrection-cap".into());
                e.record(None, status.clone(), &by, ctx.wall);
                e.status = status;
                e.terminal_at = Some(ctx.wall);
                events.push(
                    Event::new(
                        EventKind::ResurrectionCap,
                        format!(
                            "{key} was reaped again after {recent} revivals in 24 h; not reviving it automatically \
                             (something keeps killing it). `outlivectl requeue {id}` revives it once."
                        ),
                    )
                    .alert(Alert::QueueNotice)
                    .field("key", &key)
                    .field("entry_id", &id)
                    .field("revivals", recent),
                );
                s.entries.push(e);
                let reply = Reply { admitted: true, why: "resurrection-cap".into(), id };
                also(s, &reply);
                return Ok((reply, events));
            }
            if let Bound::Evict(i) = bound {
                let v = &mut s.entries[i];
                let status = Status::GaveUp("overflow".into());
                v.record(Some(v.status.clone()), status.clone(), "overflow", ctx.wall);
                v.status = status;
                v.terminal_at = Some(ctx.wall);
                events.push(
                    Event::new(
                        EventKind::Overflow,
                        format!(
                            "the queue is full ({max} open entries): {} ({}) gave up to make room for {key}",
                            v.label(),
                            v.id
                        ),
                    )
                    .alert(Alert::QueueNotice)
                    .field("evicted", &v.id)
                    .field("key", &key),
                );
            }
            e.record(None, Status::Queued, &by, ctx.wall);
            events.push(
                Event::new(EventKind::Enqueued, format!("queued {} ({key}) for revival as {id}", e.label()))
                    .priority(priority::INFO)
                    .field("entry_id", &id)
                    .field("key", &key)
                    .field("uid", uid)
                    .field("target", e.target.kind()),
            );
            s.entries.push(e);
            let reply = Reply { admitted: true, why: String::new(), id };
            also(s, &reply);
            Ok((reply, events))
        })
    }

    /// Q-9 Cancel: open entries only; unknown or terminal is `NotFound`.
    pub fn cancel(&mut self, caller: &Caller, id: &str) -> Result<(), QueueError> {
        self.require_enabled()?;
        require_mutate(caller, "Cancel")?;
        check_id(id)?;
        let by = format!("cancel by uid {}", caller.uid);
        self.commit(|s, ctx| {
            let e = s
                .entries
                .iter_mut()
                .find(|e| e.id == id && e.status.is_open())
                .ok_or_else(|| {
                    QueueError::NotFound(format!(
                        "no open entry {id} (`outlivectl queue` lists them)"
                    ))
                })?;
            let from = e.status.clone();
            e.record(Some(from.clone()), Status::Cancelled, &by, ctx.wall);
            e.status = Status::Cancelled;
            e.terminal_at = Some(ctx.wall);
            let ev = Event::new(
                EventKind::Cancelled,
                format!("cancelled {} ({id}), which was {from}", e.label()),
            )
            .priority(priority::NOTICE)
            .field("entry_id", id)
            .field("was", &from);
            Ok(((), vec![ev]))
        })
    }

    /// Q-10 Requeue a `gave-up:*` entry.
    pub fn requeue(&mut self, caller: &Caller, id: &str) -> Result<(), QueueError> {
        self.require_enabled()?;
        require_mutate(caller, "Requeue")?;
        check_id(id)?;
        let max = self.settings.max_size;
        let paused = self.state.pause.is_some();
        let by = format!("requeue by uid {}", caller.uid);
        self.commit(|s, ctx| {
            let i = rules::requeue_check(&s.entries, id, paused, max).map_err(|r| match r {
                RequeueRefusal::Paused => QueueError::Paused("revival is paused: `outlivectl resume` first".into()),
                RequeueRefusal::NotFound => QueueError::NotFound(format!("no entry {id}")),
                RequeueRefusal::NotGaveUp => QueueError::NotGaveUp(format!(
                    "{id} did not give up; only gave-up entries can be requeued (cancelled, invalidated and revived \
                     entries are final)"
                )),
                RequeueRefusal::DuplicateOpenEntry => {
                    QueueError::Duplicate(format!("{id}'s run or job already has an open entry"))
                }
                RequeueRefusal::QueueFull => QueueError::Full(format!("the queue already holds {max} open entries")),
            })?;
            let e = &mut s.entries[i];
            let from = e.status.clone();
            let override_cap = from == Status::GaveUp("resurrection-cap".into());
            e.record(Some(from.clone()), Status::Queued, &by, ctx.wall);
            e.status = Status::Queued;
            e.attempts = 0;
            e.requeued_at = Some(ctx.wall);
            e.waited_ms = 0;
            e.calm_ms = 0;
            e.frozen_ms = 0;
            e.next_attempt_boot = None;
            e.next_attempt_at = None;
            e.pressure_starved = false;
            e.terminal_at = None;
            e.wait_anchor_boot = ctx.boot;
            let ev = if override_cap {
                Event::new(
                    EventKind::ResurrectionOverride,
                    format!(
                        "{} ({id}) was requeued past the resurrection cap by an operator; a further reap is capped \
                         again",
                        e.label()
                    ),
                )
                .priority(priority::WARNING)
            } else {
                Event::new(EventKind::Requeued, format!("requeued {} ({id}), which was {from}", e.label())).priority(priority::NOTICE)
            };
            Ok(((), vec![ev.field("entry_id", id).field("was", &from)]))
        })
    }

    /// P-1 Pause (`emergency` or `maintenance`; a deliberate halt comes only from StopAll).
    pub fn pause(
        &mut self,
        caller: &Caller,
        kind: &str,
        reason: &str,
    ) -> Result<PauseChange, QueueError> {
        self.require_enabled()?;
        require_mutate(caller, "Pause")?;
        let kind = match PauseKind::parse(kind) {
            Some(PauseKind::DeliberateHalt) => {
                return Err(QueueError::Invalid {
                    field: "kind".into(),
                    why: "deliberate-halt comes only from StopAll (`outlivectl stop-all`), which also records the stop"
                        .into(),
                });
            }
            Some(k) => k,
            None => {
                return Err(QueueError::Invalid {
                    field: "kind".into(),
                    why: format!("{kind:?} is not emergency or maintenance"),
                });
            }
        };
        if reason.len() > entry::MAX_STRING {
            return Err(QueueError::Invalid {
                field: "reason".into(),
                why: "longer than 4096 bytes".into(),
            });
        }
        self.apply_pause(kind, reason, &format!("uid {}", caller.uid))
    }

    pub(super) fn apply_pause(
        &mut self,
        kind: PauseKind,
        reason: &str,
        by: &str,
    ) -> Result<PauseChange, QueueError> {
        let (next, change) = rules::apply_pause(
            self.state.pause.as_ref(),
            kind,
            reason,
            self.clock.wall_ms(),
        );
        if change == PauseChange::NoOp {
            return Ok(change);
        }
        let by = by.to_string();
        let r = reason.to_string();
        self.commit(move |s, _| {
            let p = next.clone().expect("a pause");
            let ev = match change {
                PauseChange::Upgraded => Event::new(
                    EventKind::PauseUpgraded,
                    format!(
                        "the pause became {} ({r}) by {by}; it was {}",
                        p.kind.as_str(),
                        s.pause.as_ref().map(|x| x.kind.as_str()).unwrap_or("-")
                    ),
                ),
                _ => Event::new(
                    EventKind::Paused,
                    format!("revival paused ({}: {r}) by {by}", p.kind.as_str()),
                ),
            }
            .priority(priority::NOTICE)
            .field("kind", p.kind.as_str())
            .field("reason", &r);
            s.pause = next;
            Ok((change, vec![ev]))
        })
        .inspect(|c| {
            if *c == PauseChange::New {
                self.pause_boot = Some(self.clock.boot_ms());
            }
        })
    }

    /// P-2 Resume: clears any pause; returns whether there was one. Q-12: each open entry is
    /// credited min(pause duration, its waiting time since its TTL anchor) into `frozen_ms`.
    pub fn resume(&mut self, caller: &Caller) -> Result<bool, QueueError> {
        self.require_enabled()?;
        require_mutate(caller, "Resume")?;
        self.unpause(&format!("uid {}", caller.uid), EventKind::Resumed)
    }

    /// Clear the pause with Q-12's credit; `event` describes the cause (given the pause and how
    /// long it lasted). One cause, one audit entry.
    pub(super) fn unpause_with(
        &mut self,
        event: impl FnOnce(&rules::Pause, u64) -> Event,
    ) -> Result<bool, QueueError> {
        if self.state.pause.is_none() {
            return Ok(false);
        }
        let since = self.pause_boot;
        self.commit(move |s, ctx| {
            let p = s.pause.take().expect("paused");
            let paused_ms = since.map(|b| ctx.boot.saturating_sub(b)).unwrap_or(0);
            for e in s.entries.iter_mut().filter(|e| e.status.is_open()) {
                e.frozen_ms = e.frozen_ms.saturating_add(paused_ms.min(e.waited_ms));
            }
            let ev = event(&p, paused_ms)
                .field("kind", p.kind.as_str())
                .field("paused_ms", paused_ms);
            Ok((true, vec![ev]))
        })
        .inspect(|_| self.pause_boot = None)
    }

    pub(super) fn unpause(&mut self, by: &str, kind: EventKind) -> Result<bool, QueueError> {
        let by = by.to_string();
        self.unpause_with(move |p, ms| {
            Event::new(
                kind,
                format!(
                    "revival resumed by {by} after {} s paused ({}: {})",
                    ms / 1000,
                    p.kind.as_str(),
                    p.reason
                ),
            )
            .priority(priority::NOTICE)
        })
    }

    /// Q-9 Stop(run_id): cancel the run's open entries and record the stop durably.
    pub fn stop(&mut self, caller: &Caller, run_id: &str) -> Result<u32, QueueError> {
        self.require_enabled()?;
        require_mutate(caller, "Stop")?;
        if !entry::valid_run_id(run_id) {
            return Err(QueueError::Invalid {
                field: "run_id".into(),
                why: "must match [A-Za-z0-9._:@-]{1,128}".into(),
            });
        }
        let by = format!("stop by uid {}", caller.uid);
        self.commit(|s, ctx| {
            let mut n = 0;
            for e in s.entries.iter_mut().filter(|e| e.status.is_open() && e.run_id.as_deref() == Some(run_id)) {
                e.record(Some(e.status.clone()), Status::Cancelled, &by, ctx.wall);
                e.status = Status::Cancelled;
                e.terminal_at = Some(ctx.wall);
                n += 1;
            }
            let dropped = rules::record_stop(&mut s.stops, run_id, ctx.wall);
            let ev = Event::new(EventKind::OperatorStop, format!("run {run_id} was stopped by {by}: {n} open entries cancelled; it will not be revived"))
                .priority(priority::NOTICE)
                .field("run_id", run_id)
                .field("cancelled", n);
            let mut events = vec![ev];
            events.extend(dropped.iter().map(stop_dropped));
            Ok((n, events))
        })
    }

    /// Q-9 StopAll: a durable global stop and a `deliberate-halt` pause.
    pub fn stop_all(&mut self, caller: &Caller) -> Result<(), QueueError> {
        self.require_enabled()?;
        require_mutate(caller, "StopAll")?;
        let by = format!("uid {}", caller.uid);
        let (next, change) = rules::apply_pause(
            self.state.pause.as_ref(),
            PauseKind::DeliberateHalt,
            "stop-all",
            self.clock.wall_ms(),
        );
        self.commit(|s, ctx| {
            s.global_stop = Some(ctx.wall);
            let was = s.pause.as_ref().map(|p| p.kind.as_str().to_string());
            s.pause = next;
            let ev = Event::new(
                EventKind::StopAll,
                format!(
                    "all revival stopped by {by}: every run queued before now is stopped, and revival is halted \
                     until `outlivectl resume`{}",
                    was.map(|w| format!(" (the {w} pause was upgraded)")).unwrap_or_default()
                ),
            )
            .priority(priority::WARNING);
            Ok(((), vec![ev]))
        })
        .inspect(|_| {
            if change == PauseChange::New {
                self.pause_boot = Some(self.clock.boot_ms());
            }
        })
    }
}
