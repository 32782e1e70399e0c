//! Housekeeping: waiting and calm time, the TTL sweep, retention of terminal
//! entries and stops, the periodic checkpoint and the persist retry.

use super::ops::stop_dropped;
use super::*;

impl Queue {
    /// Bring `waited_ms` (and `calm_ms` when `calm`) of queued entries up to now.
    pub fn advance_waiting(&mut self, calm: bool) {
        let now = self.clock.boot_ms();
        advance(&mut self.state.entries, now, calm);
    }

    /// Q-11 TTL sweep (skipped while paused). Returns the number expired.
    pub fn sweep_ttl(&mut self) -> usize {
        if self.require_enabled().is_err() || self.state.pause.is_some() {
            return 0;
        }
        self.advance_waiting(false);
        let ttl = self.settings.ttl_ms;
        if !self
            .state
            .entries
            .iter()
            .any(|e| rules::ttl_expired(e, ttl))
        {
            return 0;
        }
        let live = !self.settings.dry_run;
        let hours = ttl / 3_600_000;
        self.commit(|s, ctx| {
            let mut events = vec![];
            let (mut n, mut starved) = (0, 0);
            for e in s.entries.iter_mut().filter(|e| rules::ttl_expired(e, ttl)) {
                e.pressure_starved = rules::pressure_starved(e);
                let status = Status::GaveUp("ttl".into());
                e.record(Some(Status::Queued), status.clone(), "ttl", ctx.wall);
                e.status = status;
                e.terminal_at = Some(ctx.wall);
                n += 1;
                starved += usize::from(e.pressure_starved);
                events.push(
                    Event::new(
                        EventKind::EntryExpired,
                        format!("{} ({}) waited more than {hours} h and gave up", e.label(), e.id),
                    )
                    .priority(priority::NOTICE)
                    .field("entry_id", &e.id)
                    .field("waited_ms", e.waited_ms)
                    .field("pressure_starved", e.pressure_starved),
                );
            }
            if live {
                events.push(
                    Event::new(
                        EventKind::TtlExpired,
                        format!("{n} runs waited more than {hours} h and were dropped ({starved} starved by pressure)"),
                    )
                    .alert(Alert::QueueNotice)
                    .field("count", n)
                    .field("starved", starved),
                );
            }
            Ok((n, events))
        })
        .unwrap_or(0)
    }

    /// Retention and ledger expiry, applied to the current state without a write of its
    /// own (the next save carries it).
    pub(super) fn prune(&mut self, now: u64) {
        self.state.ledger.expire(now);
        self.state
            .stops
            .retain(|s| now.saturating_sub(s.at) < STOP_RETENTION_MS);
        for d in rules::tidy_stops(&mut self.state.stops) {
            self.audit(stop_dropped(&d));
        }
        let mut terminal: Vec<(u64, String)> = self
            .state
            .entries
            .iter()
            .filter(|e| !e.status.is_open())
            .map(|e| (e.terminal_at.unwrap_or(e.queued_at), e.id.clone()))
            .collect();
        terminal.sort();
        let excess = terminal.len().saturating_sub(rules::RETENTION_MAX);
        let mut drop: std::collections::HashSet<String> = terminal
            .iter()
            .take(excess)
            .map(|(_, id)| id.clone())
            .collect();
        drop.extend(
            terminal
                .iter()
                .filter(|(t, _)| now.saturating_sub(*t) > rules::RETENTION_MS)
                .map(|(_, id)| id.clone()),
        );
        if !drop.is_empty() {
            self.state.entries.retain(|e| !drop.contains(&e.id));
        }
    }

    /// The housekeeping part of a tick: retention, the persist retry, and a checkpoint of the
    /// waiting time every 10 minutes while entries wait.
    pub fn housekeeping(&mut self) {
        self.observe();
        if self.loaded {
            let now = self.clock.wall_ms();
            self.prune(now);
        }
        if self.persist_failed.is_some() {
            self.retry_persist();
        } else if self.loaded
            && self.clock.boot_ms().saturating_sub(self.saved_boot) >= CHECKPOINT_MS
            && self
                .state
                .entries
                .iter()
                .any(|e| e.status == Status::Queued)
        {
            let _ = self.commit(|_, _| Ok(((), vec![])));
        }
    }

    /// L-6 as amended: while the lock is not held, the state file is read, never written, at
    /// most once a tick and only for the counts in the metrics: opened
    /// `O_RDONLY|O_NOFOLLOW|O_NONBLOCK`, a regular file of at most 16 MiB, salvaged per entry,
    /// on the I/O worker under a timeout (a hung state directory cannot hang the tick).
    /// Nothing read this way is acted on.
    pub(super) fn observe(&mut self) {
        if self.loaded {
            self.observed = None;
            return;
        }
        let Some(env) = self.env.clone() else {
            return;
        };
        let (dir, now) = (self.state_dir.clone(), self.clock.wall_ms());
        let job = move || -> Option<Vec<Entry>> {
            let d = crate::files::Dir::open(&dir).ok()?;
            let bytes = d.read(store::STATE_FILE, store::MAX_STATE_BYTES).ok()??;
            store::salvage(&bytes, now).ok().map(|s| s.state.entries)
        };
        self.observed = match self.io.run(Self::io_timeout(&env), job) {
            crate::facts::probe::Run::Done(entries) => entries,
            crate::facts::probe::Run::Timeout => None,
        };
    }

    /// The entries to count: the state's while the lock is held, else what the last
    /// read-only look at the state file found (L-6).
    pub fn counted_entries(&self) -> Vec<Entry> {
        if self.loaded {
            self.state.entries.clone()
        } else {
            self.observed.clone().unwrap_or_default()
        }
    }
}
