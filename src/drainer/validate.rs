//! Validation before an attempt (SPEC D-6), in this order; the first failure wins and becomes
//! `invalidated:<why>`:
//!
//! 1. `corrupt-entry`; 2. `not-authorized`; 3. `already-running`; 4. `operator-stop`;
//! 5. `ran-since`; 6. `target-missing`; 7. `cwd-missing`, `worktree-missing`; 8. `run-finished`.
//!
//! A check that cannot decide (EACCES, a timeout, a service manager that does not answer, a
//! user database that does not answer) neither invalidates nor attempts: [`Check::Undecided`].
//! Paths are checked through the facts worker under its timeout, off the runtime's thread, so
//! a hung mount cannot stall the agent, and with the credentials of the user the run would run
//! as ([`Owner`], SPEC §12 "paths of members' runs"), never with root's: what a run's owner
//! cannot reach is undecided, so nobody learns through the agent what exists where they cannot
//! look.

use std::future::Future;
use std::sync::Arc;

use super::manager::{ServiceManager, Undecided};
use crate::facts::Facts;
use crate::facts::probe::Run;
use crate::facts::users::{self, Creds, Lookup};
use crate::queue::entry::{Entry, Target, corrupt_reason, unit_allowed};
use crate::queue::store::RunStop;

/// The result of validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Pass,
    /// `invalidated:<why>`, with a detail for the audit.
    Invalid(&'static str, String),
    /// Decide later.
    Undecided(String),
}

/// What a path check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathState {
    Exists,
    Missing,
    Undecided(String),
}

/// Who a run would run as, from the user database at the attempt: D-6 check 2, and the
/// credentials its paths are checked with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// The agent's own credentials: root's runs, or every run of a user-mode agent.
    Agent,
    /// Another user: a login's credentials with the entry's gid, and whether the user is a
    /// member of group `outlive`.
    User { creds: Creds, member: bool },
    /// The uid is no longer in the user database.
    Gone,
    /// The user database did not answer.
    Undecided(String),
}

/// Host checks (the real ones go through the facts worker; tests substitute).
pub trait Paths: Send + Sync {
    /// Whether `path` exists (`dir`: as a directory), as seen with `creds` (None: the agent's
    /// own).
    fn check(
        &self,
        path: &str,
        dir: bool,
        creds: Option<&Creds>,
    ) -> impl Future<Output = PathState> + Send;
    /// Who `uid` is, running with group `gid`.
    fn owner(&self, uid: u32, gid: u32) -> impl Future<Output = Owner> + Send;
    /// The uid and gid a unit's `User=` and `Group=` stand for (`facts::users::resolve`); None when
    /// unknown or when the user database does not answer in time.
    fn resolve(&self, user: &str, group: &str) -> impl Future<Output = Option<(u32, u32)>> + Send;
}

/// Path checks on the facts worker, under `facts.statfs_timeout_ms`. Each check ends within
/// that timeout and beats the drainer loop's heartbeat, like the service manager's calls.
#[derive(Clone)]
pub struct WorkerPaths {
    pub facts: Facts,
    pub beat: Option<Arc<dyn super::Heartbeat>>,
}

impl Paths for WorkerPaths {
    async fn check(&self, path: &str, dir: bool, creds: Option<&Creds>) -> PathState {
        let r = self.check_inner(path, dir, creds.cloned()).await;
        if let Some(b) = &self.beat {
            b.beat();
        }
        r
    }

    async fn owner(&self, uid: u32, gid: u32) -> Owner {
        let timed_out = Owner::Undecided(format!(
            "the user database did not answer for uid {uid} within the statfs timeout"
        ));
        self.on_worker(timed_out, move || match users::account(uid) {
            Lookup::Found(a) => Owner::User {
                member: users::is_member(&a.name, a.gid, users::GROUP),
                creds: Creds::of(&a, gid),
            },
            Lookup::Unknown => Owner::Gone,
            Lookup::Failed(why) => Owner::Undecided(why),
        })
        .await
    }

    async fn resolve(&self, user: &str, group: &str) -> Option<(u32, u32)> {
        let (user, group) = (user.to_string(), group.to_string());
        self.on_worker(None, move || users::resolve(&user, &group))
            .await
    }
}

impl WorkerPaths {
    /// `f` (a lookup that may block) on the facts worker under its timeout, off the runtime's
    /// threads; `unanswered` when it does not answer in time (or fails). Beats the drainer's
    /// heartbeat.
    async fn on_worker<T: Clone + Send + 'static>(
        &self,
        unanswered: T,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let facts = self.facts.clone();
        let fallback = unanswered.clone();
        let r = tokio::task::spawn_blocking(move || match facts.worker().run(facts.timeout(), f) {
            Run::Done(r) => r,
            Run::Timeout => unanswered,
        })
        .await
        .unwrap_or(fallback);
        if let Some(b) = &self.beat {
            b.beat();
        }
        r
    }

    async fn check_inner(&self, path: &str, dir: bool, creds: Option<Creds>) -> PathState {
        let facts = self.facts.clone();
        let p = std::path::PathBuf::from(path);
        let r = tokio::task::spawn_blocking(move || {
            let timeout = facts.timeout();
            let q = p.clone();
            let stat = move || match &creds {
                // A user's view: on a thread with their credentials. Cannot take them: the
                // error (PermissionDenied) reads undecided below.
                Some(c) => users::as_user(c, || std::fs::metadata(&q)).and_then(|r| r),
                None => std::fs::metadata(&q),
            };
            match facts.worker().run(timeout, stat) {
                // Missing here, but perhaps only hidden from the agent (H-5): undecided then.
                Run::Done(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                    match facts.hidden_from_agent(&p) {
                        Some(why) => Err(why),
                        None => Ok(Run::Done(Err(e))),
                    }
                }
                other => Ok(other),
            }
        })
        .await;
        let r = match r {
            Ok(Err(hidden)) => return PathState::Undecided(hidden),
            Ok(Ok(run)) => Ok(run),
            Err(e) => Err(e),
        };
        match r {
            Ok(Run::Done(Ok(m))) if !dir || m.is_dir() => PathState::Exists,
            Ok(Run::Done(Ok(_))) => PathState::Missing,
            Ok(Run::Done(Err(e)))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                PathState::Missing
            }
            Ok(Run::Done(Err(e))) => PathState::Undecided(format!("{path}: {e}")),
            Ok(Run::Timeout) => {
                PathState::Undecided(format!("{path}: no answer within the statfs timeout"))
            }
            Err(e) => PathState::Undecided(format!("{path}: {e}")),
        }
    }
}

/// What validation needs besides the entry.
pub struct Context<'a, M> {
    /// Who the run would run as (check 2, and the paths' credentials).
    pub owner: &'a Owner,
    /// `queue.allowed_units` now.
    pub allowed_units: &'a [String],
    pub stops: &'a [RunStop],
    pub global_stop: Option<u64>,
    /// None where there is no service manager (units cannot be started).
    pub manager: Option<&'a M>,
    /// Whether a spawned process of the entry's key is alive (no service manager).
    pub tracked_alive: bool,
    /// The unit the run's watch record is on now, for a captured entry (C-11: a revival of an
    /// earlier capture, say): reviving while it is active would run the run twice.
    pub run_unit: Option<&'a str>,
}

fn undecided(u: Undecided) -> Check {
    Check::Undecided(u.0)
}

/// D-6, in order.
#[expect(
    clippy::too_many_lines,
    reason = "D-6's checks in the rule's order, one block each"
)]
pub async fn validate<M: ServiceManager, P: Paths>(
    e: &Entry,
    cx: &Context<'_, M>,
    paths: &P,
) -> Check {
    // 1.
    if let Some(why) = corrupt_reason(e) {
        return Check::Invalid("corrupt-entry", why);
    }
    // 2.
    let creds = match cx.owner {
        Owner::Agent => None,
        Owner::Undecided(why) => return Check::Undecided(why.clone()),
        Owner::Gone => {
            return Check::Invalid(
                "not-authorized",
                format!("uid {} is no longer in the user database", e.uid),
            );
        }
        Owner::User { creds, member } => {
            // A member's authority is checked again; root's choice of user is its own.
            if e.enqueued_by.unwrap_or(e.uid) != 0 {
                if !member {
                    return Check::Invalid(
                        "not-authorized",
                        format!(
                            "uid {} is no longer a member of group `{}`",
                            e.uid,
                            users::GROUP
                        ),
                    );
                }
                if let Target::Unit { unit } = &e.target
                    && !cx.allowed_units.iter().any(|g| unit_allowed(g, unit))
                {
                    return Check::Invalid(
                        "not-authorized",
                        format!(
                            "{unit} no longer matches queue.allowed_units {:?}",
                            cx.allowed_units
                        ),
                    );
                }
            }
            Some(creds)
        }
    };
    let anchor = e.ttl_anchor();
    // 3.
    if cx.tracked_alive {
        return Check::Invalid(
            "already-running",
            "a revived process of this run is alive".into(),
        );
    }
    let mut unit_state = None;
    if let Some(m) = cx.manager {
        if let Target::Unit { unit } = &e.target {
            match m.unit_state(unit).await {
                Err(u) => return undecided(u),
                Ok(Some(st)) => {
                    if matches!(
                        st.active_state.as_str(),
                        "active" | "activating" | "reloading"
                    ) {
                        return Check::Invalid(
                            "already-running",
                            format!("{unit} is {}", st.active_state),
                        );
                    }
                    unit_state = Some(st);
                }
                Ok(None) => {}
            }
        }
        match m.alive_units(&[format!("outlive-revive-{}-*", e.id)]).await {
            Err(u) => return undecided(u),
            Ok(alive) if !alive.is_empty() => {
                return Check::Invalid("already-running", format!("{} is alive", alive.join(", ")));
            }
            Ok(_) => {}
        }
        if let Some(unit) = cx.run_unit
            && !matches!(&e.target, Target::Unit { unit: t } if t == unit)
        {
            match m.unit_state(unit).await {
                Err(u) => return undecided(u),
                Ok(Some(st))
                    if matches!(
                        st.active_state.as_str(),
                        "active" | "activating" | "reloading"
                    ) =>
                {
                    return Check::Invalid(
                        "already-running",
                        format!(
                            "{unit}, where run {} is watched, is {}",
                            e.run_id.as_deref().unwrap_or(""),
                            st.active_state
                        ),
                    );
                }
                Ok(_) => {}
            }
        }
    }
    // 4. A stop in the same millisecond as the enqueue counts: the stop was recorded after it
    // (mutations are serialised), and a safety stop errs on the side of stopping.
    if let Some(run) = &e.run_id
        && let Some(s) = cx
            .stops
            .iter()
            .filter(|s| &s.run_id == run && s.at >= anchor)
            .max_by_key(|s| s.at)
    {
        return Check::Invalid(
            "operator-stop",
            format!(
                "an operator stopped run {run} at {}",
                crate::clock::rfc3339_ms(s.at)
            ),
        );
    }
    if let Some(g) = cx.global_stop
        && g >= anchor
    {
        return Check::Invalid(
            "operator-stop",
            format!(
                "an operator stopped all revival at {}",
                crate::clock::rfc3339_ms(g)
            ),
        );
    }
    // 5. and 6.
    match &e.target {
        Target::Unit { unit } => {
            let Some(m) = cx.manager else {
                return Check::Invalid(
                    "target-missing",
                    format!("{unit}: there is no service manager to start units"),
                );
            };
            if let Some(st) = &unit_state
                && st.exec_main_start_us / 1000 > anchor
            {
                return Check::Invalid(
                    "ran-since",
                    format!(
                        "{unit} started at {} after the run was queued",
                        crate::clock::rfc3339_ms(st.exec_main_start_us / 1000)
                    ),
                );
            }
            match m.load_state(unit).await {
                Err(u) => return undecided(u),
                Ok(ls) if ls == "loaded" => {}
                Ok(ls) => {
                    return Check::Invalid(
                        "target-missing",
                        format!("{unit} cannot be loaded ({ls})"),
                    );
                }
            }
        }
        Target::Exec { exec, .. } => match paths.check(&exec[0], false, creds).await {
            PathState::Exists => {}
            PathState::Missing => {
                return Check::Invalid("target-missing", format!("{} does not exist", exec[0]));
            }
            PathState::Undecided(w) => return Check::Undecided(w),
        },
    }
    // 7.
    match paths.check(&e.cwd, true, creds).await {
        PathState::Exists => {}
        PathState::Missing => {
            return Check::Invalid("cwd-missing", format!("{} is not a directory", e.cwd));
        }
        PathState::Undecided(w) => return Check::Undecided(w),
    }
    if let Some(w) = &e.worktree {
        match paths.check(w, true, creds).await {
            PathState::Exists => {}
            PathState::Missing => {
                return Check::Invalid("worktree-missing", format!("{w} is not a directory"));
            }
            PathState::Undecided(why) => return Check::Undecided(why),
        }
    }
    // 8.
    if e.active_run
        && let Some(f) = &e.run_state_file
    {
        match paths.check(f, false, creds).await {
            PathState::Exists => {}
            PathState::Missing => {
                return Check::Invalid("run-finished", format!("{f} is gone: the run finished"));
            }
            PathState::Undecided(why) => return Check::Undecided(why),
        }
    }
    Check::Pass
}
