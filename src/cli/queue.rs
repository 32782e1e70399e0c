//! `outlivectl queue`, `enqueue`, `cancel`, `requeue`, `pause`, `resume`, `stop`, `stop-all`
//! (SPEC §8): the revival queue from a terminal.

use std::collections::HashMap;
use std::path::PathBuf;

use zbus::wire::Variant;

use super::client::{self, Failure, failure};
use super::render::{clean, emit, print_json, say, table, ts};
use crate::clock::parse_rfc3339_ms;
use crate::publish::dbus::QUEUE_PATH;

/// Plain words for Q-4's refusal words and the other replies of `Enqueue`.
pub(crate) fn explain(word: &str) -> &'static str {
    match word {
        "not-terminal" => {
            "the run was bounced for recovery, not ended (disposition recovery-bounce)"
        }
        "operator-kill" => {
            "an operator ended it on purpose (set queue.include_operator_kills = true to queue those)"
        }
        "watchdog-kill" => {
            "a watchdog killed it for being stuck; reviving it would recreate the wedge"
        }
        "moved" => "the run continues on another machine",
        "no-resume-path" => "there is nothing to resume: give --run-id or --job",
        "job-not-opted-in" => "the job did not opt in to revival (--resume-on-reap)",
        "insufficient-evidence" => {
            "no strong evidence that the run was working (give --evidence; two weak items suffice with --run-id)"
        }
        "duplicate-open-entry" => "this run or job already has an open entry (`outlivectl queue`)",
        "overflow" => "the queue is full of runs with a higher priority",
        "resurrection-cap" => {
            "it was revived too often in 24 h: recorded as gave-up:resurrection-cap; `outlivectl requeue ID` revives it once"
        }
        _ => "",
    }
}

/// The arguments of `outlivectl enqueue`.
#[derive(Debug, Clone, Default)]
pub(crate) struct EnqueueArgs {
    pub run_id: Option<String>,
    pub job: Option<String>,
    pub resume_on_reap: bool,
    pub session: Option<String>,
    pub unit: Option<String>,
    pub env: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub worktree: Option<PathBuf>,
    pub reason: Option<String>,
    pub disposition: String,
    pub origin: String,
    pub evidence: Vec<String>,
    pub active_run: bool,
    pub run_state_file: Option<PathBuf>,
    pub reaped_at: Option<String>,
    pub as_uid: Option<u32>,
    pub as_gid: Option<u32>,
    pub argv: Vec<String>,
}

fn utf8(flag: &str, p: &std::path::Path) -> Result<String, Failure> {
    p.to_str().map(str::to_string).ok_or_else(|| {
        Failure::usage(format!(
            "{flag}: {} is not valid UTF-8, which D-Bus cannot carry",
            p.display()
        ))
    })
}

/// Build `Enqueue`'s dictionary from the arguments.
pub(crate) fn request(a: &EnqueueArgs) -> Result<HashMap<&'static str, Variant<'static>>, Failure> {
    let mut d: HashMap<&'static str, Variant<'static>> = HashMap::new();
    let mut put_s = |k: &'static str, v: &Option<String>| {
        if let Some(v) = v {
            d.insert(k, Variant::from(v.clone()));
        }
    };
    put_s("run_id", &a.run_id);
    put_s("job", &a.job);
    put_s("session", &a.session);
    put_s("reason", &a.reason);
    d.insert("disposition", Variant::from(a.disposition.clone()));
    d.insert("origin", Variant::from(a.origin.clone()));
    if a.resume_on_reap {
        d.insert("resume_on_reap", Variant::from(true));
    }
    if a.active_run {
        d.insert("active_run", Variant::from(true));
    }
    if !a.evidence.is_empty() {
        d.insert("evidence", Variant::from(a.evidence.clone()));
    }
    let cwd = match &a.cwd {
        Some(c) => utf8("--cwd", c)?,
        None => {
            let c = std::env::current_dir()
                .map_err(|e| Failure::usage(format!("cannot read the current directory: {e}")))?;
            utf8("--cwd (the current directory)", &c)?
        }
    };
    d.insert("cwd", Variant::from(cwd));
    if let Some(w) = &a.worktree {
        d.insert("worktree", Variant::from(utf8("--worktree", w)?));
    }
    if let Some(f) = &a.run_state_file {
        d.insert(
            "run_state_file",
            Variant::from(utf8("--run-state-file", f)?),
        );
    }
    if let Some(t) = &a.reaped_at {
        let ms = t
            .parse::<u64>()
            .ok()
            .or_else(|| parse_rfc3339_ms(t))
            .ok_or_else(|| {
                Failure::usage(format!(
                    "--reaped-at: {t:?} is neither milliseconds since the epoch nor RFC 3339"
                ))
            })?;
        d.insert("reaped_at", Variant::from(ms));
    }
    if let Some(u) = a.as_uid {
        d.insert("user", Variant::from(u));
    }
    if let Some(g) = a.as_gid {
        d.insert("group", Variant::from(g));
    }
    match (&a.unit, a.argv.is_empty()) {
        (Some(_), false) => {
            return Err(Failure::usage(
                "give either --unit or a command after --, not both",
            ));
        }
        (None, true) => {
            return Err(Failure::usage(
                "give --unit NAME or a command after -- (e.g. -- /usr/bin/make build)",
            ));
        }
        (Some(u), true) => {
            if !a.env.is_empty() {
                return Err(Failure::usage("--env goes only with a command after --"));
            }
            d.insert("unit", Variant::from(u.clone()));
        }
        (None, false) => {
            d.insert("exec", Variant::from(a.argv.clone()));
            if !a.env.is_empty() {
                let mut env = HashMap::new();
                for kv in &a.env {
                    let (k, v) = kv.split_once('=').ok_or_else(|| {
                        Failure::usage(format!("--env {kv:?}: expected NAME=VALUE"))
                    })?;
                    env.insert(k.to_string(), v.to_string());
                }
                d.insert("env", Variant::from(env));
            }
        }
    }
    Ok(d)
}

/// `outlivectl enqueue`.
pub(crate) async fn enqueue(user: bool, json: bool, a: &EnqueueArgs) -> Result<(), Failure> {
    let d = request(a)?;
    let conn = client::connect(user).await?;
    let q = client::queue(&conn).await?;
    let (admitted, why, id) = q.enqueue(d).await.map_err(failure)?;
    if json {
        print_json(&serde_json::json!({"admitted": admitted, "why": why, "id": id}));
    } else if admitted && why.is_empty() {
        say(&format!("queued as {id}"));
    } else if admitted {
        say(&format!(
            "recorded as {id}, not queued: {why}: {}",
            explain(&why)
        ));
    } else {
        eprintln!("not queued: {}: {}", clean(&why), explain(&why));
    }
    if admitted {
        Ok(())
    } else {
        Err(Failure {
            status: super::exit::REFUSED,
            message: String::new(),
        })
    }
}

/// `outlivectl queue`.
pub(crate) async fn show(user: bool, json: bool) -> Result<(), Failure> {
    let conn = client::connect(user).await?;
    let props = client::properties(&conn, QUEUE_PATH, "org.outlive.ResumeQueue1").await?;
    let q = client::queue(&conn).await?;
    let entries: Vec<serde_json::Value> = match q.list().await {
        Ok(l) => l
            .iter()
            .map(crate::publish::dbus::variant::dict_to_json)
            .collect(),
        Err(e) => {
            let f = failure(e);
            if f.message.starts_with("org.outlive.Error.QueueDisabled") {
                vec![]
            } else {
                return Err(f);
            }
        }
    };
    if json {
        print_json(&serde_json::json!({"queue": props, "entries": entries}));
        return Ok(());
    }
    let b = |k: &str| props[k].as_bool().unwrap_or(false);
    let s = |k: &str| props[k].as_str().unwrap_or_default().to_string();
    if b("Enabled") {
        say(&format!(
            "queue: enabled, {} waiting{}",
            props["Waiting"],
            if b("DryRun") {
                " (observe-only: dry run, nothing is revived)"
            } else {
                ""
            }
        ));
    } else {
        say(&format!("queue: DISABLED ({})", s("DisabledReason")));
        say(&format!("  {}", clean(&s("DisabledDetail"))));
        say("  `outlivectl lock` explains the lock decision.");
    }
    if b("Paused") {
        say(&format!(
            "paused: {} since {} ({}); `outlivectl resume` lets revival continue",
            s("PauseKind"),
            ts(&props["PausedAt"]),
            clean(&s("PauseReason"))
        ));
    }
    let breaker = props["BreakerOpenUntil"].as_u64().unwrap_or(0);
    if breaker > 0 {
        say(&format!(
            "breaker: open until {} (attempts kept failing; it closes by itself)",
            ts(&props["BreakerOpenUntil"])
        ));
    }
    match s("QuotaSignal").as_str() {
        "fresh" => say("quota: a fresh report from the quota tracker applies"),
        "stale" => say("quota: the last report expired; the gate passes"),
        _ => {}
    }
    if entries.is_empty() {
        if b("Enabled") {
            say("no entries");
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let target = e["unit"]
                .as_str()
                .map(str::to_string)
                .or_else(|| {
                    e["exec"].as_array().map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                })
                .unwrap_or_else(|| e["target_kind"].as_str().unwrap_or("-").to_string());
            vec![
                e["id"].as_str().unwrap_or("-").to_string(),
                e["status"].as_str().unwrap_or("-").to_string(),
                e["class"].as_str().unwrap_or("-").to_string(),
                e["attempts"].to_string(),
                ts(&e["queued_at"]),
                e["session"].as_str().unwrap_or("").to_string(),
                target,
            ]
        })
        .collect();
    say("");
    emit(&table(
        &[
            "ID", "STATUS", "CLASS", "TRIES", "QUEUED", "SESSION", "TARGET",
        ],
        &rows,
    ));
    Ok(())
}

/// The simple mutations.
pub(crate) enum Op {
    Cancel(String),
    Requeue(String),
    Pause { kind: String, reason: String },
    Resume,
    Stop(String),
    StopAll,
    Drain,
    Quota { can_spawn: bool, valid_for_sec: u32 },
}

/// Plain words for `Drain()`'s outcome words (D-3).
pub(crate) fn explain_outcome(word: &str) -> &'static str {
    match word {
        "revived" => {
            "an attempt started; it is verified after drainer.grace_sec (`outlivectl queue`)"
        }
        "breaker-open" => "recent attempts kept failing: revival waits for the breaker's cooldown",
        "calm" => "the host is under pressure (skipped only by a manual drain)",
        "quota" => "the quota tracker reported no headroom",
        "session-cap" => "drainer.max_revived_alive revived runs are still alive",
        "empty" => "no entry is ready (none queued, or all backing off)",
        "invalidated" => "the head entry can no longer be revived and was marked invalidated",
        "dry-run" => "observe-only (queue.dry_run): nothing is started",
        "attempt-failed" => "the attempt could not be started; it is retried after its backoff",
        _ => "",
    }
}

/// Run one mutation.
pub(crate) async fn op(user: bool, json: bool, op: Op) -> Result<(), Failure> {
    let conn = client::connect(user).await?;
    let q = client::queue(&conn).await?;
    let (text, value) = match &op {
        Op::Cancel(id) => {
            q.cancel(id).await.map_err(failure)?;
            (
                format!("cancelled {id}"),
                serde_json::json!({"cancelled": id}),
            )
        }
        Op::Requeue(id) => {
            q.requeue(id).await.map_err(failure)?;
            (
                format!("requeued {id}"),
                serde_json::json!({"requeued": id}),
            )
        }
        Op::Pause { kind, reason } => {
            q.pause(kind, reason).await.map_err(failure)?;
            (
                format!("revival paused ({kind}); `outlivectl resume` lets it continue"),
                serde_json::json!({"paused": kind}),
            )
        }
        Op::Resume => {
            let was = q.resume().await.map_err(failure)?;
            (
                if was {
                    "revival resumed".into()
                } else {
                    "revival was not paused".into()
                },
                serde_json::json!({"was_paused": was}),
            )
        }
        Op::Stop(run) => {
            let n = q.stop(run).await.map_err(failure)?;
            (
                format!("stopped run {run}: {n} open entries cancelled; it will not be revived"),
                serde_json::json!({"cancelled": n}),
            )
        }
        Op::StopAll => {
            q.stop_all().await.map_err(failure)?;
            ("all revival stopped (deliberate halt); `outlivectl resume` lets new runs come back".into(), serde_json::json!({"stopped_all": true}))
        }
        Op::Drain => {
            let reply = q.drain().await.map_err(failure)?;
            let v = crate::publish::dbus::variant::dict_to_json(&reply);
            let word = v["outcome"].as_str().unwrap_or("-").to_string();
            let mut text = format!("tick: {word}");
            if let Some(id) = v["entry_id"].as_str() {
                text.push_str(&format!(" ({id})"));
            }
            if let Some(d) = v["detail"].as_str() {
                text.push_str(&format!(": {}", clean(d)));
            }
            let why = explain_outcome(&word);
            if !why.is_empty() {
                text.push_str(&format!("\n  {why}"));
            }
            (text, v)
        }
        Op::Quota {
            can_spawn,
            valid_for_sec,
        } => {
            q.report_quota(*can_spawn, *valid_for_sec)
                .await
                .map_err(failure)?;
            (
                format!(
                    "quota reported: {} for {valid_for_sec} s",
                    if *can_spawn {
                        "may spawn"
                    } else {
                        "may not spawn"
                    }
                ),
                serde_json::json!({"can_spawn": can_spawn, "valid_for_sec": valid_for_sec}),
            )
        }
    };
    if json {
        print_json(&value);
    } else {
        say(&text);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> EnqueueArgs {
        EnqueueArgs {
            run_id: Some("r".into()),
            disposition: "terminal".into(),
            origin: "autonomous".into(),
            cwd: Some("/tmp".into()),
            argv: vec!["/bin/true".into()],
            ..EnqueueArgs::default()
        }
    }

    #[test]
    fn s8_enqueue_flags_mirror_the_dictionary() {
        let mut a = args();
        a.env = vec!["A=1".into(), "B=x=y".into()];
        a.evidence = vec!["active-subagent".into()];
        a.reaped_at = Some("1970-01-01T00:00:01Z".into());
        a.as_uid = Some(7);
        let d = request(&a).unwrap();
        assert!(d.contains_key("exec") && d.contains_key("env") && d.contains_key("evidence"));
        assert_eq!(d["reaped_at"], Variant::from(1000u64));
        assert_eq!(d["user"], Variant::from(7u32));
        assert_eq!(d["disposition"], Variant::from("terminal".to_string()));
    }

    #[test]
    fn s8_enqueue_usage_errors() {
        let mut a = args();
        a.unit = Some("x.service".into());
        assert_eq!(request(&a).unwrap_err().status, 2, "unit and argv");
        a.argv.clear();
        a.env = vec!["A=1".into()];
        assert_eq!(request(&a).unwrap_err().status, 2, "env with unit");
        let mut a = args();
        a.env = vec!["NOEQUALS".into()];
        assert_eq!(request(&a).unwrap_err().status, 2);
        let mut a = args();
        a.argv.clear();
        assert_eq!(request(&a).unwrap_err().status, 2, "no target");
        let mut a = args();
        a.reaped_at = Some("last tuesday".into());
        assert_eq!(request(&a).unwrap_err().status, 2);
        let mut a = args();
        use std::os::unix::ffi::OsStringExt;
        a.cwd = Some(PathBuf::from(std::ffi::OsString::from_vec(
            b"/tmp/\xff".to_vec(),
        )));
        let e = request(&a).unwrap_err();
        assert_eq!(e.status, 2);
        assert!(e.message.contains("not valid UTF-8"), "{}", e.message);
    }

    #[test]
    fn every_refusal_word_is_explained() {
        for w in [
            "not-terminal",
            "operator-kill",
            "watchdog-kill",
            "moved",
            "no-resume-path",
            "job-not-opted-in",
            "insufficient-evidence",
            "duplicate-open-entry",
            "overflow",
            "resurrection-cap",
        ] {
            assert!(!explain(w).is_empty(), "{w}");
        }
    }
}
