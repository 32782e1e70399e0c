//! `/org/outlive/Agent1/Runs`, interface `org.outlive.Runs1` (SPEC C-8): watched runs over
//! D-Bus. `Run` starts a run as a transient unit the agent watches; `Watch` watches a unit
//! that runs already; `Unwatch`, `SetEvidence`, `Revive` and `ListRuns` act on the records;
//! `RunEnded(run_id, how)` says how a watched run ended (root and members only, by policy).
//!
//! As everywhere on the bus: the gate admits the call, record changes run on the blocking pool
//! (they are persisted before the reply), and capture's task talks to the service manager.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::wire::{OwnedVariant, Variant};
use zbus::{Connection, interface};

use super::Publisher;
use super::errors::OutliveError;
use super::gate::{Gate, Kind, blocking};
use super::variant::to_dict;
use crate::capture::watcher::{Capture, StartRunError};
use crate::queue::entry::{self, Target, clamp_evidence};
use crate::queue::rules::Request;
use crate::queue::runs::{EvidencePolicy, RunRecord};
use crate::queue::{Caller, QueueError, SharedQueue};

/// The object path.
pub const RUNS_PATH: &str = "/org/outlive/Agent1/Runs";

/// The interface object.
#[derive(Clone)]
pub struct Runs1 {
    pub queue: SharedQueue,
    pub gate: Arc<Gate>,
    pub publisher: Arc<Publisher>,
    pub capture: Capture,
    /// The boot id (a record is observed in this boot).
    pub boot_id: String,
    /// For run ids the agent assigns.
    pub counter: Arc<AtomicU64>,
    /// `--user`: the run runs as the agent's user; no `user`/`group`.
    pub user_mode: bool,
}

/// `Run`'s keys and their D-Bus types (C-8).
pub const RUN_KEYS: &[(&str, &str)] = &[
    ("run_id", "s"),
    ("exec", "as"),
    ("env", "a{ss}"),
    ("cwd", "s"),
    ("worktree", "s"),
    ("resume", "as"),
    ("evidence", "as"),
    ("evidence_policy", "s"),
    ("session", "s"),
    ("user", "u"),
    ("group", "u"),
];

/// `Watch`'s option keys.
pub const WATCH_KEYS: &[(&str, &str)] = &[
    ("evidence", "as"),
    ("evidence_policy", "s"),
    ("session", "s"),
];

/// A decoded `Run` request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunRequest {
    pub run_id: Option<String>,
    pub exec: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub worktree: Option<String>,
    pub resume: Option<Vec<String>>,
    pub evidence: Vec<String>,
    pub evidence_policy: Option<EvidencePolicy>,
    pub session: String,
    pub user: Option<u32>,
    pub group: Option<u32>,
}

type Field = (String, String);

fn unknown_keys(dict: &HashMap<String, OwnedVariant>, known: &[(&str, &str)]) -> Result<(), Field> {
    let mut keys: Vec<&String> = dict.keys().collect();
    keys.sort();
    for k in keys {
        if !known.iter().any(|(n, _)| n == k) {
            return Err((k.chars().take(64).collect(), "unknown key".into()));
        }
    }
    Ok(())
}

fn string(key: &str, v: &OwnedVariant) -> Result<String, Field> {
    match &**v {
        Variant::Str(s) if s.len() <= entry::MAX_STRING => Ok(s.to_string()),
        Variant::Str(_) => Err((key.into(), "longer than 4096 bytes".into())),
        _ => Err((
            key.into(),
            format!("expected type s, got {}", v.value_signature()),
        )),
    }
}

fn strings(key: &str, v: &OwnedVariant, limit: usize) -> Result<Vec<String>, Field> {
    let Variant::Array(a) = &**v else {
        return Err((
            key.into(),
            format!("expected type as, got {}", v.value_signature()),
        ));
    };
    if a.len() > limit {
        return Err((key.into(), format!("more than {limit} items")));
    }
    a.iter()
        .map(|x| match x {
            Variant::Str(s) if s.len() <= entry::MAX_STRING => Ok(s.to_string()),
            _ => Err((
                key.into(),
                "every item must be a string of at most 4096 bytes".into(),
            )),
        })
        .collect()
}

fn uint(key: &str, v: &OwnedVariant) -> Result<u32, Field> {
    match &**v {
        Variant::U32(n) => Ok(*n),
        Variant::I32(n) if *n >= 0 => Ok(*n as u32),
        Variant::U64(n) if *n <= u32::MAX as u64 => Ok(*n as u32),
        Variant::I64(n) if *n >= 0 && *n <= u32::MAX as i64 => Ok(*n as u32),
        _ => Err((key.into(), "expected a uid or gid (u)".into())),
    }
}

fn policy(key: &str, v: &OwnedVariant) -> Result<EvidencePolicy, Field> {
    let s = string(key, v)?;
    EvidencePolicy::parse(&s).ok_or((key.into(), format!("{s:?} is not autonomous or declared")))
}

fn evidence(v: &OwnedVariant) -> Result<Vec<String>, Field> {
    let items = strings("evidence", v, 4096)?;
    Ok(clamp_evidence(items.iter().map(|s| Some(s.as_str()))))
}

/// Decode `Run`'s dictionary (C-8). Unknown keys and wrong types are `(key, why)`.
pub fn decode_run(dict: &HashMap<String, OwnedVariant>) -> Result<RunRequest, Field> {
    unknown_keys(dict, RUN_KEYS)?;
    let mut r = RunRequest::default();
    for (k, v) in dict {
        match k.as_str() {
            "run_id" => r.run_id = Some(string(k, v)?),
            "exec" => r.exec = strings(k, v, entry::MAX_ARGV)?,
            "resume" => r.resume = Some(strings(k, v, entry::MAX_ARGV)?),
            "cwd" => r.cwd = Some(string(k, v)?),
            "worktree" => r.worktree = Some(string(k, v)?),
            "session" => r.session = string(k, v)?,
            "evidence" => r.evidence = evidence(v)?,
            "evidence_policy" => r.evidence_policy = Some(policy(k, v)?),
            "user" => r.user = Some(uint(k, v)?),
            "group" => r.group = Some(uint(k, v)?),
            "env" => {
                let Variant::Dict(d) = &**v else {
                    return Err((
                        k.clone(),
                        format!("expected type a{{ss}}, got {}", v.value_signature()),
                    ));
                };
                for (name, val) in d.iter() {
                    match (name, val) {
                        (Variant::Str(n), Variant::Str(x)) => {
                            r.env.insert(n.to_string(), x.to_string());
                        }
                        _ => return Err((k.clone(), "expected type a{ss}".into())),
                    }
                }
            }
            _ => unreachable!("checked above"),
        }
    }
    Ok(r)
}

impl RunRequest {
    /// X-1's limits and formats, as `Enqueue` checks them (the run's argv, env, paths), and
    /// the resume argv's.
    pub fn validate(&self) -> Result<(), Field> {
        let req = Request {
            run_id: self.run_id.clone(),
            target: Some(Target::Exec {
                exec: self.exec.clone(),
                env: self.env.clone(),
            }),
            cwd: self.cwd.clone(),
            worktree: self.worktree.clone(),
            session: self.session.clone(),
            disposition: "terminal".into(),
            origin: "autonomous".into(),
            ..Request::default()
        };
        req.validate().map_err(|(f, w)| (f.to_string(), w))?;
        if let Some(r) = &self.resume {
            match r.first() {
                None => return Err(("resume".into(), "argv is empty".into())),
                Some(a) if !a.starts_with('/') => {
                    return Err((
                        "resume".into(),
                        format!("argv[0] {a:?} must be an absolute path"),
                    ));
                }
                _ => {}
            }
            if r.iter().any(|a| a.contains('\0')) {
                return Err(("resume".into(), "an item contains NUL".into()));
            }
        }
        Ok(())
    }
}

/// One record as `ListRuns` shows it (C-8); strangers see only their own (§12 G-10), and the
/// record's env values never leave the agent.
pub fn run_row(r: &RunRecord) -> serde_json::Value {
    let mut v = serde_json::json!({
        "run_id": r.run_id,
        "unit": r.unit,
        "state": r.state.text(),
        "ended_at": r.ended_at.unwrap_or(0),
        "uid": r.uid,
        "gid": r.gid,
        "evidence": r.evidence,
        "evidence_policy": r.evidence_policy.as_str(),
        "entry_id": r.entry_id.clone().unwrap_or_default(),
        "entry_status": r.entry_status.clone().unwrap_or_default(),
        "enqueue": r.enqueue,
        "session": r.session,
        "cwd": r.cwd,
        "invocation_id": r.invocation_id,
        "seen_active_at": r.seen_active_at,
        "configured": r.configured,
        "target_kind": r.target.kind(),
    });
    let m = v.as_object_mut().expect("an object");
    if let Target::Exec { exec, env } = &r.target {
        m.insert("exec".into(), exec.clone().into());
        m.insert(
            "env_names".into(),
            env.keys().cloned().collect::<Vec<_>>().into(),
        );
    }
    if let Some(res) = &r.resume {
        m.insert("resume".into(), res.clone().into());
    }
    v
}

fn start_error(e: StartRunError) -> OutliveError {
    match e {
        StartRunError::Failed(m) => OutliveError::StartFailed(m),
        StartRunError::Unreachable(m) => {
            OutliveError::QueueDisabled(format!("manager-unreachable: {m}"))
        }
    }
}

impl Runs1 {
    async fn enter(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
        kind: Kind,
    ) -> Result<(super::gate::Pass, Caller), OutliveError> {
        super::queue1::queue_caller(&self.gate, conn, hdr, kind).await
    }

    async fn mutate<T: Send + 'static>(
        &self,
        conn: &Connection,
        f: impl FnOnce(&mut crate::queue::Queue) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, OutliveError> {
        super::queue1::apply(&self.queue, &self.publisher, conn, f).await
    }

    /// C-10: without systemd there are no units to watch (runs started with `Run` are spawned
    /// and tracked by pid).
    fn require_manager(&self) -> Result<(), OutliveError> {
        if self.capture.booted {
            Ok(())
        } else {
            Err(OutliveError::invalid(
                "unit",
                "systemd is not the service manager here: there are no units to watch (`outlivectl run` \
                 starts runs that outlived tracks by their process)",
            ))
        }
    }
}

#[interface(name = "org.outlive.Runs1")]
impl Runs1 {
    /// Start a run that outlived watches (C-1): ARGV as the transient unit
    /// `outlive-run-<escaped run_id>.service`, as the caller, in `cwd`. Keys: `run_id` s,
    /// `exec` as (argv, the first an absolute path), `env` a{ss}, `cwd` s, `worktree` s, `resume` as (the
    /// argv used instead of `exec` when the run is revived), `evidence` as, `evidence_policy` s
    /// (`autonomous` or `declared`), `session` s, and for root only `user` u and `group` u.
    /// Replies when the start job has finished.
    #[zbus(out_args("run_id", "unit"))]
    async fn run(
        &self,
        request: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(String, String), OutliveError> {
        let (_pass, caller) = self.enter(conn, &hdr, Kind::Mutate).await?;
        if !caller.may_mutate {
            return Err(OutliveError::AccessDenied(format!(
                "uid {} may not start runs: root or a member of group `outlive` only",
                caller.uid
            )));
        }
        let req = decode_run(&request).map_err(|(f, w)| OutliveError::invalid(&f, w))?;
        drop(request);
        req.validate()
            .map_err(|(f, w)| OutliveError::invalid(&f, w))?;
        if (req.user.is_some() || req.group.is_some()) && !caller.root {
            return Err(OutliveError::AccessDenied(
                "only root may start a run as another user (user, group)".into(),
            ));
        }
        if self.user_mode && (req.user.is_some() || req.group.is_some()) {
            return Err(OutliveError::invalid(
                "user",
                "a user agent runs everything as its own user",
            ));
        }
        let named = match req.user {
            Some(uid) => Some(blocking(move || crate::facts::users::account(uid)).await?),
            None => None,
        };
        let (uid, gid) = crate::queue::rules::run_as(
            (caller.uid, caller.gid),
            req.user,
            req.group,
            named.as_ref(),
        )
        .map_err(|(f, w)| OutliveError::invalid(f, w))?;
        let run_id = match req.run_id.clone() {
            Some(r) => r,
            None => crate::capture::assign_run_id(
                crate::clock::wall_ms(),
                self.counter.fetch_add(1, Ordering::Relaxed),
            ),
        };
        let unit =
            crate::capture::run_unit(&run_id).map_err(|w| OutliveError::invalid("run_id", w))?;
        let policy = match req.evidence_policy {
            Some(p) => p,
            None => {
                blocking({
                    let q = Arc::clone(&self.queue);
                    move || q.lock().settings().evidence_policy
                })
                .await?
            }
        };
        let rec = RunRecord {
            resume: req.resume,
            cwd: req.cwd.unwrap_or_else(|| "/".into()),
            worktree: req.worktree,
            session: req.session,
            evidence: req.evidence,
            ..RunRecord::active(
                &run_id,
                &unit,
                Target::Exec {
                    exec: req.exec,
                    env: req.env,
                },
                (uid, gid),
                policy,
                &self.boot_id,
                crate::clock::wall_ms(),
            )
        };
        let durable = rec.clone();
        self.mutate(conn, move |q| q.run_add(durable)).await?;
        let unit = self.capture.start(rec).await.map_err(start_error)?;
        self.publisher.sync(conn).await;
        Ok((run_id, unit))
    }

    /// Watch a unit that runs already (C-1 b): root, or a member for units matching
    /// `queue.allowed_units`. The unit must be loaded and active. Options: `evidence` as,
    /// `evidence_policy` s, `session` s. Replies the run id, `unit:<unit>`.
    #[zbus(out_args("run_id"))]
    async fn watch(
        &self,
        unit: String,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, OutliveError> {
        let (_pass, caller) = self.enter(conn, &hdr, Kind::Mutate).await?;
        if !caller.may_mutate {
            return Err(OutliveError::AccessDenied(format!(
                "uid {} may not watch units: root or a member of group `outlive` only",
                caller.uid
            )));
        }
        unknown_keys(&options, WATCH_KEYS).map_err(|(f, w)| OutliveError::invalid(&f, w))?;
        let mut evidence_in = vec![];
        let mut pol = None;
        let mut session = String::new();
        for (k, v) in &options {
            match k.as_str() {
                "evidence" => {
                    evidence_in = evidence(v).map_err(|(f, w)| OutliveError::invalid(&f, w))?
                }
                "evidence_policy" => {
                    pol = Some(policy(k, v).map_err(|(f, w)| OutliveError::invalid(&f, w))?)
                }
                "session" => {
                    session = string(k, v).map_err(|(f, w)| OutliveError::invalid(&f, w))?
                }
                _ => {}
            }
        }
        let run_id = crate::capture::unit_run_id(&unit);
        if !entry::valid_unit_name(&unit) || !entry::valid_run_id(&run_id) {
            return Err(OutliveError::invalid(
                "unit",
                format!(
                    "{unit:?} is not a unit name outlived can watch ([A-Za-z0-9._:@-], at most 123 bytes)"
                ),
            ));
        }
        self.require_manager()?;
        let now = self
            .capture
            .read(&unit)
            .await
            .map_err(|e| OutliveError::QueueDisabled(format!("manager-unreachable: {e}")))?;
        let Some(now) = now.filter(|u| u.active_state == "active" && !u.invocation_id.is_empty())
        else {
            return Err(OutliveError::invalid(
                "unit",
                format!("{unit} is not loaded and active"),
            ));
        };
        let boot = self.boot_id.clone();
        self.mutate(conn, move |q| {
            if !caller.root && !q.settings().allowed_units.iter().any(|g| entry::unit_allowed(g, &unit)) {
                return Err(QueueError::AccessDenied(format!(
                    "{unit} is not in queue.allowed_units: members may watch only units matching {:?}",
                    q.settings().allowed_units
                )));
            }
            let policy = pol.unwrap_or(q.settings().evidence_policy);
            q.run_add(RunRecord {
                session,
                evidence: evidence_in,
                ..RunRecord::unit_watch(
                    &unit,
                    (caller.uid, caller.gid),
                    policy,
                    &now.invocation_id,
                    &boot,
                    crate::clock::wall_ms(),
                )
            })
        })
        .await?;
        Ok(run_id)
    }

    /// Stop watching a run (C-7): the run's own user or root; it keeps running. A unit that
    /// `capture.units` matches cannot be unwatched (change the configuration).
    async fn unwatch(
        &self,
        run_id: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), OutliveError> {
        let (_pass, caller) = self.enter(conn, &hdr, Kind::Mutate).await?;
        self.mutate(conn, move |q| q.run_unwatch(&caller, &run_id).map(|_| ()))
            .await?;
        Ok(())
    }

    /// Replace the evidence a run declares (C-5): the run's own user, a member or root.
    async fn set_evidence(
        &self,
        run_id: String,
        evidence: Vec<String>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), OutliveError> {
        let (_pass, caller) = self.enter(conn, &hdr, Kind::Mutate).await?;
        if evidence.len() > 4096 {
            return Err(OutliveError::invalid("evidence", "more than 4096 items"));
        }
        let ev = clamp_evidence(evidence.iter().map(|s| Some(s.as_str())));
        self.mutate(conn, move |q| q.run_set_evidence(&caller, &run_id, ev))
            .await
    }

    /// Queue an ended run for revival by hand (C-8): the record's user, members, root. Q-4's
    /// eligibility is skipped (the caller decided); the duplicate rule, the cap and the bound
    /// apply. Replies the entry id.
    #[zbus(out_args("entry_id"))]
    async fn revive(
        &self,
        run_id: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, OutliveError> {
        let (_pass, caller) = self.enter(conn, &hdr, Kind::Mutate).await?;
        let reply = self
            .mutate(conn, move |q| q.run_revive(&caller, &run_id))
            .await?;
        if !reply.admitted {
            return Err(match reply.why.as_str() {
                "duplicate-open-entry" => {
                    OutliveError::DuplicateOpenEntry("the run already has an open entry".into())
                }
                "overflow" => OutliveError::QueueFull(
                    "the queue is full of entries of higher priority".into(),
                ),
                w => OutliveError::InvalidArgument(format!("run_id: not queued ({w})")),
            });
        }
        Ok(reply.id)
    }

    /// The watch records (C-8): root and members see all, others only their own runs.
    #[zbus(out_args("runs"))]
    async fn list_runs(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<HashMap<String, OwnedVariant>>, OutliveError> {
        let (_pass, caller) = self.enter(conn, &hdr, Kind::Read).await?;
        let view = self.queue.view();
        let runs = view.runs.clone()?;
        Ok(runs
            .iter()
            .filter(|r| caller.may_mutate || r.uid == caller.uid)
            .map(|r| to_dict(&run_row(r)))
            .collect())
    }

    /// A watched run ended (C-3): its run id and how (C-3's word).
    #[zbus(signal)]
    pub async fn run_ended(
        emitter: &SignalEmitter<'_>,
        run_id: &str,
        how: &str,
    ) -> zbus::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v<T: Into<Variant<'static>>>(x: T) -> OwnedVariant {
        OwnedVariant::try_from(x.into()).unwrap()
    }

    #[test]
    fn c8_run_dictionary_decodes_and_names_bad_keys() {
        let d = HashMap::from([
            ("run_id".to_string(), v("a:b@c".to_string())),
            (
                "exec".to_string(),
                v(vec!["/bin/sleep".to_string(), "9".to_string()]),
            ),
            (
                "resume".to_string(),
                v(vec!["/usr/bin/agent".to_string(), "--continue".to_string()]),
            ),
            (
                "evidence".to_string(),
                v(vec![
                    "uncommitted-worktree-work".to_string(),
                    "bogus".to_string(),
                ]),
            ),
            ("evidence_policy".to_string(), v("declared".to_string())),
            ("cwd".to_string(), v("/tmp".to_string())),
        ]);
        let r = decode_run(&d).unwrap();
        assert_eq!(r.evidence, vec!["uncommitted-worktree-work"]);
        assert_eq!(r.evidence_policy, Some(EvidencePolicy::Declared));
        assert_eq!(r.validate(), Ok(()));
        let mut bad = d.clone();
        bad.insert("bogus".into(), v(1u32));
        assert_eq!(decode_run(&bad).unwrap_err().0, "bogus");
        let mut bad = d.clone();
        bad.insert("resume".into(), v(vec!["agent".to_string()]));
        assert_eq!(
            decode_run(&bad).unwrap().validate().unwrap_err().0,
            "resume"
        );
        let mut bad = d;
        bad.insert("exec".into(), v(vec!["sleep".to_string()]));
        assert_eq!(decode_run(&bad).unwrap().validate().unwrap_err().0, "exec");
    }
}
