//! The queue's lock and state lifecycle (L-3, L-6, L-7, Q-13 at load, Q-15): deciding and
//! holding the lock, disabling the queue (read-only) when it is not held or is lost, the
//! heartbeat, loading and salvaging the state file, and the files written beside it.

use super::*;

/// Q-15 as amended: the notice for items set aside while loading. It stays in the attention
/// item until acknowledged (G-9), and says how many, where, and what to do.
pub(super) fn salvage_notice(
    state_dir: &Path,
    set_aside: &[store::SetAside],
    sidecar: &Path,
    paused_because: Option<String>,
) -> Event {
    let entries = set_aside.iter().filter(|a| a.field == "entries").count();
    let whys: Vec<String> = set_aside
        .iter()
        .take(3)
        .map(|a| match &a.at {
            Some(at) => format!("{}[{at}]: {}", a.field, a.why),
            None => format!("{}: {}", a.field, a.why),
        })
        .collect();
    let mut message = format!(
        "{} item(s) of the queue state {} could not be read ({} entries) and were set aside in {} ({}{});          everything else loaded. Recover what they held by hand (enqueue a run again), then `outlivectl ack`.",
        set_aside.len(),
        state_dir.join(store::STATE_FILE).display(),
        entries,
        sidecar.display(),
        whys.join("; "),
        if set_aside.len() > whys.len() {
            "; …"
        } else {
            ""
        },
    );
    if let Some(why) = paused_because {
        message.push_str(&format!(
            " Revival is paused (maintenance) because {why}: run `outlivectl resume` once you have checked."
        ));
    }
    Event::new(EventKind::StateSalvaged, message)
        .alert(Alert::QueueNotice)
        .field("set_aside", set_aside.len())
        .field("entries", entries)
        .field("sidecar", sidecar.display())
}

impl Queue {
    /// How long lock and state I/O may take before the state directory counts as hung.
    pub(super) fn io_timeout(env: &LockEnv) -> std::time::Duration {
        (env.facts.timeout() * 2 + std::time::Duration::from_secs(2))
            .max(std::time::Duration::from_secs(5))
    }

    /// L-3: evaluate the lock. At start and reload (`force`), and on each tick while the lock is
    /// refused for a cause that is retried (every tick, or L-4 row 10 once its heartbeat is
    /// stale). Nothing happens while the lock is held. The lock decision and the load of the
    /// state run on a worker under a timeout: a hung state directory leaves the queue disabled
    /// `acquisition-error`, never the agent hung.
    pub fn evaluate_lock(&mut self, env: &LockEnv, force: bool) {
        self.env = Some(env.clone());
        if self.held.is_some() {
            return;
        }
        let due = match self.lock_disabled.as_ref().map(|r| r.retry) {
            Some(Retry::Tick) => true,
            Some(Retry::At(t)) => self.clock.boot_ms() >= t,
            Some(Retry::Reload) | None => false,
        };
        if !force && !due {
            return;
        }
        let timeout = Self::io_timeout(env);
        let (dir, e2) = (self.state_dir.clone(), env.clone());
        let (auto_heal, now_wall) = (self.settings.auto_heal, self.clock.wall_ms());
        let job = move || {
            let acq = lock::acquire(&dir, &e2.ours, auto_heal, &e2.facts, &*e2.prober);
            let loaded = acq.held.as_ref().map(|h| store::load(h.dir(), now_wall));
            (acq, loaded)
        };
        let (acq, loaded) = match self.io.run(timeout, job) {
            crate::facts::probe::Run::Done(x) => x,
            crate::facts::probe::Run::Timeout => {
                let msg = format!(
                    "the state directory {} did not answer within {} s (a hung or unreachable filesystem?); \
                     retried every tick",
                    self.state_dir.display(),
                    timeout.as_secs()
                );
                self.disable("acquisition-error", &msg, Retry::Tick, None);
                return;
            }
        };
        let disabled = acq.disabled().map(|(r, m)| (r, m.to_string()));
        self.verdict = Some(acq.verdict.clone());
        match (acq.held, loaded) {
            (Some(h), Some(loaded)) => {
                self.held = Some(h);
                self.auditor.log.set_dir(&self.state_dir);
                for e in acq.events {
                    self.audit(e);
                }
                let was_disabled = self.last_disabled_audited.take().is_some();
                let lost = self.lost.take();
                self.lock_disabled = None;
                self.load_state(loaded);
                if (was_disabled || lost.is_some()) && self.loaded {
                    let message = match lost {
                        Some(what) => format!(
                            "{what}; outlived took the lock again, reloaded the queue from disk and is enabled"
                        ),
                        None => "the revival queue holds its lock again and is enabled".to_string(),
                    };
                    self.audit(
                        Event::new(EventKind::QueueEnabled, message).priority(priority::NOTICE),
                    );
                }
            }
            _ => {
                let (reason, message) =
                    disabled.unwrap_or((LockReason::AcquisitionError, "lock not held".into()));
                let retry = if reason.retryable() {
                    Retry::Tick
                } else if let Some(d) = acq.verdict.retry_in {
                    Retry::At(self.clock.boot_ms() + d.as_millis() as u64)
                } else {
                    Retry::Reload
                };
                self.disable(reason.as_str(), &message, retry, Some(&acq.verdict));
            }
        }
    }

    /// Close the lock, stop writing under the state directory, and audit the outcome when it
    /// differs from the previous one (L-4, L-6). While a lost lock is evaluated again, the
    /// outcome says so (L-3 as amended: one report, with its real reason).
    pub(super) fn disable(
        &mut self,
        code: &str,
        detail: &str,
        retry: Retry,
        verdict: Option<&Verdict>,
    ) {
        self.held = None;
        self.loaded = false;
        self.state = State::empty();
        self.pause_boot = None;
        self.auditor.log.set_dir(&self.runtime_dir);
        let detail = match self.lost.take() {
            Some(what) => format!("{what}: {detail}"),
            None => detail.to_string(),
        };
        self.lock_disabled = Some(Refusal {
            code: code.to_string(),
            detail: detail.clone(),
            retry,
        });
        let key = (code.to_string(), detail.clone());
        if self.last_disabled_audited.as_ref() != Some(&key) {
            let mut e = Event::new(
                EventKind::QueueDisabled,
                format!("the revival queue is disabled ({code}): {detail}"),
            )
            .alert(Alert::QueueDisabled)
            .field("reason", code)
            .field("state_dir", self.state_dir.display());
            if let Some(v) = verdict {
                e = e.field("row", v.row);
                // Row 7 carries no filesystem, liveness or heartbeat facts: none were gathered.
                if let Some(c) = v.facts.class {
                    e = e.field("class", c.as_str());
                }
                if let Some(r) = &v.facts.rule {
                    e = e.field("rule", r);
                }
                if let Some(h) = &v.facts.holder {
                    e = e.field("holder", h);
                }
                if let Some(a) = v.facts.holder_alive {
                    e = e.field("holder_alive", a);
                }
                if let Some(age) = v.facts.heartbeat_age_ms {
                    e = e.field(
                        "heartbeat_age_ms",
                        age.map(|a| a.to_string())
                            .unwrap_or_else(|| "unreadable".into()),
                    );
                }
            }
            self.audit(e);
            self.last_disabled_audited = Some(key);
        }
    }

    /// L-6 as amended: the lock path no longer names the locked inode. The queue stops writing
    /// at once, and L-4 is evaluated again in the same step; only its outcome is audited and
    /// raised, saying that the lock file was replaced while held.
    pub(super) fn lock_lost(&mut self) {
        let Some(h) = self.held.take() else {
            return;
        };
        let what = format!(
            "the lock file {} was replaced or removed while held (lock-lost)",
            h.path().display()
        );
        drop(h);
        self.loaded = false;
        self.lock_disabled = Some(Refusal {
            code: "lock-lost".into(),
            detail: what.clone(),
            retry: Retry::Tick,
        });
        self.lost = Some(what);
        if let Some(env) = self.env.clone() {
            self.evaluate_lock(&env, true);
        } else {
            self.disable("lock-lost", "", Retry::Tick, None);
        }
    }

    /// The state directory, for a write under it: only while the lock is held and its path
    /// still names the locked inode (L-6 as amended); otherwise the lock is lost and the write
    /// refused with `QueueDisabled` (`lock-lost`).
    pub(super) fn state_dir_for_write(&mut self) -> Result<(), QueueError> {
        self.require_enabled()?;
        if self.held.as_ref().is_some_and(|h| h.still_installed()) {
            return Ok(());
        }
        self.lock_lost();
        Err(QueueError::Disabled {
            code: "lock-lost".into(),
            detail: "the lock file was replaced or removed while held; nothing was written (see `outlivectl \
                     status` for what the queue found when it looked again)"
                .into(),
        })
    }

    /// Write a file under the state directory through the held lock's descriptor of it (the
    /// continuation records, the posture boot snapshot), or, while the lock is not held, into
    /// the runtime directory (L-6). `subdir` is created 0700 when missing.
    pub fn write_file(
        &mut self,
        subdir: Option<&str>,
        name: &str,
        bytes: &[u8],
    ) -> std::io::Result<PathBuf> {
        let how = crate::files::Replace::DURABLE;
        if self.held.is_some() && self.state_dir_for_write().is_ok() {
            let h = self.held.as_ref().expect("held");
            let (d, path) = match subdir {
                Some(s) => (
                    Some(h.dir().subdir(s, 0o700)?),
                    self.state_dir.join(s).join(name),
                ),
                None => (None, self.state_dir.join(name)),
            };
            d.as_ref().unwrap_or(h.dir()).replace(name, bytes, how)?;
            return Ok(path);
        }
        let run = crate::files::Dir::create(&self.runtime_dir, 0o755)?;
        let (d, path) = match subdir {
            Some(s) => (
                Some(run.subdir(s, 0o700)?),
                self.runtime_dir.join(s).join(name),
            ),
            None => (None, self.runtime_dir.join(name)),
        };
        d.as_ref().unwrap_or(&run).replace(name, bytes, how)?;
        Ok(path)
    }

    /// L-7: release the lock (orderly stop). The file stays.
    pub fn release(&mut self) {
        self.held = None;
    }

    /// Tick step 1 (D-2): touch the lock's heartbeat, or retry acquisition. A lock file that
    /// no longer names our descriptor (removed or replaced) is lost (L-6 as amended). Also keeps
    /// the held record's hostname current.
    pub fn heartbeat(&mut self, env: &LockEnv) {
        self.env = Some(env.clone());
        if self.held.as_ref().is_some_and(|h| !h.still_installed()) {
            self.lock_lost();
            return;
        }
        match &mut self.held {
            Some(h) => {
                if let Err(e) = h.touch() {
                    tracing::warn!("cannot touch the lock heartbeat: {e}");
                }
                if h.record().hostname != env.ours.hostname {
                    let from = h.record().hostname.clone();
                    let mut r = h.record().clone();
                    r.hostname = env.ours.hostname.clone();
                    if h.update(r).is_ok() {
                        self.audit(
                            Event::new(
                                EventKind::LockHostRenamed,
                                format!(
                                    "this host was renamed from {from} to {} while holding the queue lock (same host \
                                     id {}); the lock record was updated",
                                    env.ours.hostname, env.ours.host_id
                                ),
                            )
                            .alert(Alert::LockHostRenamed)
                            .field("from", from)
                            .field("to", &env.ours.hostname)
                            .field("host_id", env.ours.host_id),
                        );
                    }
                }
            }
            None => self.evaluate_lock(env, false),
        }
    }

    // ---- state ------------------------------------------------------------------------------

    pub(super) fn load_state(&mut self, loaded: Loaded) {
        let now_wall = self.clock.wall_ms();
        let now_boot = self.clock.boot_ms();
        match loaded {
            Loaded::Fresh => {
                self.state = State::empty();
                self.loaded = true;
            }
            Loaded::State {
                state,
                set_aside,
                sidecar,
                paused_because,
            } => {
                self.state = *state;
                self.restore_clocks(now_wall, now_boot);
                self.loaded = true;
                if let Some(side) = sidecar {
                    // Rewrite now: the next start must not set the same items aside again.
                    let _ = self.commit(|_, _| Ok(((), vec![])));
                    self.audit(salvage_notice(
                        &self.state_dir,
                        &set_aside,
                        &side,
                        paused_because,
                    ));
                } else if self.state.entries.iter().any(|e| e.status.is_open()) {
                    // Write the restored waiting time now: the next restart must not depend on
                    // the wall clock behaving meanwhile.
                    let _ = self.commit(|_, _| Ok(((), vec![])));
                }
            }
            Loaded::Corrupt {
                why,
                sidecar,
                id_floor_ms,
            } => {
                self.state = State::empty();
                self.state.last_id_ms = id_floor_ms;
                self.loaded = true;
                // Replace the corrupt file now, so a restart does not set it aside again.
                let _ = self.commit(|_, _| Ok(((), vec![])));
                self.audit(
                    Event::new(
                        EventKind::StateCorrupt,
                        format!(
                            "the queue state {} was unreadable as a whole ({why}); it was copied to {} and the queue \
                             starts empty. Inspect the copy to recover runs that were waiting (enqueue them again), \
                             then `outlivectl ack`.",
                            self.state_dir.join(store::STATE_FILE).display(),
                            sidecar.display()
                        ),
                    )
                    .alert(Alert::QueueNotice)
                    .field("why", &why)
                    .field("sidecar", sidecar.display()),
                );
            }
            Loaded::CorruptUncopied { why, error } => {
                let msg = format!(
                    "the queue state is unreadable ({why}) and could not be copied aside ({error}); it is left in \
                     place and the queue is disabled until it can be"
                );
                self.disable("persist-failed", &msg, Retry::Tick, None);
                return;
            }
            Loaded::Unreadable(e) => {
                self.disable(
                    "persist-failed",
                    &format!("cannot read the queue state: {e}"),
                    Retry::Tick,
                    None,
                );
                return;
            }
        }
        self.prune(now_wall);
        self.maintain_dry_run_since();
    }

    /// After a restart: waiting time advances by the wall-clock delta since the save (clamped
    /// to ≥ 0); backoffs and the pause are mapped onto CLOCK_BOOTTIME.
    pub(super) fn restore_clocks(&mut self, now_wall: u64, now_boot: u64) {
        let down = now_wall.saturating_sub(self.state.saved_at);
        for e in &mut self.state.entries {
            if e.status == Status::Queued {
                e.waited_ms = e.waited_ms.saturating_add(down);
            }
            e.wait_anchor_boot = now_boot;
            e.next_attempt_boot = e
                .next_attempt_at
                .map(|w| now_boot + w.saturating_sub(now_wall));
        }
        self.pause_boot = self
            .state
            .pause
            .as_ref()
            .map(|p| now_boot.saturating_sub(now_wall.saturating_sub(p.paused_at)));
    }

    /// Keep `dry_run_since` (G-7 soak) in step with the setting. Best effort: it is written
    /// with the next save if this one fails.
    pub(super) fn maintain_dry_run_since(&mut self) {
        if !self.loaded {
            return;
        }
        let want = self.settings.dry_run;
        if want == self.state.dry_run_since.is_some() {
            return;
        }
        let now = self.clock.wall_ms();
        let _ = self.commit(|s, _| {
            s.dry_run_since = want.then_some(now);
            Ok(((), vec![]))
        });
    }
}
