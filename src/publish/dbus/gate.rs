//! How the bus dispatches calls (SPEC X-1 bounds, as amended in §12): a hostile local caller can
//! neither wedge the agent nor exhaust its memory, and an operator's call is answered meanwhile.
//!
//! The mechanism is one rule: **the thread that dispatches D-Bus calls never blocks.** The
//! bus connection lives on a thread and a current-thread runtime of its own (`outlive-bus`,
//! started by the agent), which only dispatches. A call handler either answers from what is
//! published in memory (the queue's [`crate::queue::View`], the posture, the host's identity),
//! or hands what may block (a queue mutation and its fsync, an NSS lookup, a file read, a path
//! check) to that runtime's blocking pool ([`BLOCKING_THREADS`] threads) and awaits the
//! answer. Every handler of the agent's own interfaces first passes the [`Gate`]:
//!
//! 1. at most [`MAX_IN_FLIGHT`] calls are in flight; beyond that the answer is `Busy` at once,
//!    so pressure pushes back into the bus daemon's own limits instead of growing the agent;
//! 2. the caller's identity (its uid from the bus daemon, then its primary group and whether it
//!    belongs to `outlive` from the user database, on the blocking pool) is resolved once per
//!    unique bus name and cached until the name leaves the bus (NameOwnerChanged);
//! 3. callers who are neither root nor members (in user mode: not the agent's uid) are
//!    rate-limited per uid on every method ([`READS_PER_SEC`], burst [`READ_BURST`]), and
//!    members' mutations too ([`MUTATIONS_PER_SEC`], burst [`MUTATION_BURST`]); over the rate
//!    the answer is `Busy`;
//! 4. arguments are capped before anything is done with them (the handlers: strings, paths,
//!    argv and env, `ReportGuard` options at [`MAX_REPORT_OPTIONS_BYTES`]).
//!
//! The bus loop's heartbeat measures dispatch progress: it beats while calls complete,
//! and, when none is in flight, on an answered ping of its own; a dispatcher that stops
//! completing calls goes stale, a busy one does not.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore};
use zbus::Connection;
use zbus::message::Header;

use super::auth::{self, AuthPolicy, Caller};
use super::errors::OutliveError;
use crate::clock::boottime_ms;
use crate::sync::MutexExt;

/// Most calls in flight at once.
pub(crate) const MAX_IN_FLIGHT: usize = 64;
/// Threads of the bus runtime's blocking pool.
pub(crate) const BLOCKING_THREADS: usize = 4;
/// Unprivileged callers: calls per second per uid, and the burst allowed.
pub(crate) const READS_PER_SEC: u32 = 20;
pub(crate) const READ_BURST: u32 = 40;
/// Members' mutations: per second per uid, and the burst allowed.
pub(crate) const MUTATIONS_PER_SEC: u32 = 10;
pub(crate) const MUTATION_BURST: u32 = 20;
/// The largest `ReportGuard` options dictionary accepted (its keys and string values).
pub(crate) const MAX_REPORT_OPTIONS_BYTES: usize = 4096;
/// Identities cached at most (the cache is cleared when it would grow past this).
const MAX_CACHED_CALLERS: usize = 4096;

/// What a call does, for the rate limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Reads and reports (every caller may call these under the shipped policy).
    Read,
    /// Changes the queue or the attention item.
    Mutate,
}

/// A token bucket: `rate` tokens a second, at most `burst`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens_milli: u64,
    at_ms: u64,
}

impl Bucket {
    fn take(&mut self, now: u64, rate: u32, burst: u32) -> bool {
        let cap = u64::from(burst) * 1000;
        let refill = now.saturating_sub(self.at_ms) * u64::from(rate);
        self.tokens_milli = (self.tokens_milli + refill).min(cap);
        self.at_ms = now;
        if self.tokens_milli >= 1000 {
            self.tokens_milli -= 1000;
            true
        } else {
            false
        }
    }
}

/// The gate every call of the agent's interfaces passes first (see the module doc).
pub struct Gate {
    policy: AuthPolicy,
    slots: Arc<Semaphore>,
    callers: Mutex<HashMap<String, Arc<OnceCell<Caller>>>>,
    buckets: Mutex<HashMap<(u32, bool), Bucket>>,
    completed: AtomicU64,
}

/// A call admitted by the gate: who calls, and one of the in-flight slots until dropped.
pub struct Pass {
    pub caller: Caller,
    _slot: OwnedSemaphorePermit,
    gate: Arc<Gate>,
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.gate.completed.fetch_add(1, Ordering::Relaxed);
    }
}

impl Gate {
    /// A gate for `policy`.
    pub fn new(policy: AuthPolicy) -> Arc<Gate> {
        Arc::new(Gate {
            policy,
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            callers: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            completed: AtomicU64::new(0),
        })
    }

    /// Who may do what.
    pub fn policy(&self) -> AuthPolicy {
        self.policy
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        MAX_IN_FLIGHT - self.slots.available_permits()
    }

    /// Calls completed so far (the dispatch heartbeat).
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Admit a call (see the module doc): a slot, the caller's identity, its rate.
    pub async fn enter(
        self: &Arc<Self>,
        conn: &Connection,
        hdr: &Header<'_>,
        kind: Kind,
    ) -> Result<Pass, OutliveError> {
        let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            return Err(OutliveError::Busy(format!(
                "outlived is answering {MAX_IN_FLIGHT} calls already; try again in a moment"
            )));
        };
        let caller = self.identify(conn, hdr).await?;
        self.check_rate(&caller, kind, boottime_ms())?;
        Ok(Pass {
            caller,
            _slot: slot,
            gate: Arc::clone(self),
        })
    }

    /// The identity of the sender of `hdr`, from the cache or (once per unique name) the bus
    /// daemon and the user database.
    pub async fn identify(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
    ) -> Result<Caller, OutliveError> {
        let Some(sender) = hdr.sender().map(|s| s.to_string()) else {
            // Peer to peer: the socket's credentials.
            let uid = auth::caller_uid(conn, hdr).await?;
            return blocking(move || auth::identify(uid)).await;
        };
        let cell = {
            let mut c = self.callers.locked();
            if c.len() >= MAX_CACHED_CALLERS && !c.contains_key(&sender) {
                c.clear();
            }
            Arc::clone(c.entry(sender).or_default())
        };
        cell.get_or_try_init(|| async {
            let uid = auth::caller_uid(conn, hdr).await?;
            blocking(move || auth::identify(uid)).await
        })
        .await
        .copied()
    }

    /// A new connection to a (perhaps restarted) bus: unique names mean nothing any more.
    pub fn forget_all(&self) {
        self.callers.locked().clear();
    }

    /// A unique name left the bus: forget what it was.
    pub fn forget(&self, name: &str) {
        self.callers.locked().remove(name);
    }

    /// The rate limits (see the module doc); `now` in boottime ms.
    fn check_rate(&self, c: &Caller, kind: Kind, now: u64) -> Result<(), OutliveError> {
        let privileged = c.may_mutate(&self.policy);
        let (rate, burst, mutation) = match (privileged, kind) {
            _ if c.is_root() => return Ok(()),
            (false, _) => (READS_PER_SEC, READ_BURST, false),
            (true, Kind::Mutate) => (MUTATIONS_PER_SEC, MUTATION_BURST, true),
            (true, Kind::Read) => return Ok(()),
        };
        let mut b = self.buckets.locked();
        if b.len() >= MAX_CACHED_CALLERS && !b.contains_key(&(c.uid, mutation)) {
            b.clear();
        }
        let bucket = b.entry((c.uid, mutation)).or_insert(Bucket {
            tokens_milli: u64::from(burst) * 1000,
            at_ms: now,
        });
        if bucket.take(now, rate, burst) {
            return Ok(());
        }
        Err(OutliveError::Busy(format!(
            "uid {} may make {rate} {} per second ({burst} at once); try again in a moment",
            c.uid,
            if mutation { "changes" } else { "calls" }
        )))
    }
}

/// Run `f`, which may block (a file, an fsync, an NSS lookup), on the bus runtime's blocking
/// pool, off the dispatch thread; the handler awaits it.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, OutliveError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OutliveError::Busy(format!("the call could not be completed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32, member: bool) -> Caller {
        Caller {
            uid,
            gid: Some(uid),
            member,
        }
    }

    fn gate() -> Arc<Gate> {
        Gate::new(AuthPolicy {
            user_mode: false,
            agent_uid: 0,
        })
    }

    #[test]
    fn x1_unprivileged_callers_get_20_a_second_with_a_burst_of_40() {
        let g = gate();
        let stranger = caller(1000, false);
        let ok = (0..100)
            .filter(|_| g.check_rate(&stranger, Kind::Read, 5_000).is_ok())
            .count();
        assert_eq!(ok, 40, "the burst");
        // One second later: 20 more.
        let ok = (0..100)
            .filter(|_| g.check_rate(&stranger, Kind::Read, 6_000).is_ok())
            .count();
        assert_eq!(ok, 20);
        let e = g.check_rate(&stranger, Kind::Read, 6_000).unwrap_err();
        assert!(matches!(&e, OutliveError::Busy(m) if m.contains("uid 1000 may make 20 calls")));
        // Per uid.
        assert!(
            g.check_rate(&caller(1001, false), Kind::Read, 6_000)
                .is_ok()
        );
    }

    #[test]
    fn x1_members_mutations_get_10_a_second_with_a_burst_of_20_and_root_no_limit() {
        let g = gate();
        let member = caller(1000, true);
        assert!(
            (0..1000).all(|_| g.check_rate(&member, Kind::Read, 1).is_ok()),
            "members' reads are not limited"
        );
        let ok = (0..100)
            .filter(|_| g.check_rate(&member, Kind::Mutate, 1_000).is_ok())
            .count();
        assert_eq!(ok, 20);
        let ok = (0..100)
            .filter(|_| g.check_rate(&member, Kind::Mutate, 2_000).is_ok())
            .count();
        assert_eq!(ok, 10);
        let root = caller(0, false);
        assert!((0..10_000).all(|_| g.check_rate(&root, Kind::Mutate, 1).is_ok()));
    }

    #[tokio::test]
    async fn x1_at_most_64_calls_in_flight() {
        let g = gate();
        let held: Vec<_> = (0..MAX_IN_FLIGHT)
            .map(|_| Arc::clone(&g.slots).try_acquire_owned().unwrap())
            .collect();
        assert_eq!(g.in_flight(), MAX_IN_FLIGHT);
        assert!(Arc::clone(&g.slots).try_acquire_owned().is_err());
        drop(held);
        assert_eq!(g.in_flight(), 0);
    }
}
