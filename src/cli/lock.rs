//! `outlivectl lock [--state-dir D] [--json]` and `outlivectl lock clear` (SPEC L-4, L-8):
//! "why is my queue disabled?", answered from the lock record, the kernel's facts and the
//! decision the agent would reach, gathered without taking anything; and the operator's way
//! out once they have verified that nothing else uses the state directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::client::{self, Failure};
use super::render::{clean, emit, pairs, say};
use crate::clock::{rfc3339_ms, wall_ms};
use crate::config::{Config, Mode, Paths};
use crate::facts::Facts;
use crate::facts::process::KernelProber;
use crate::publish::dbus::QUEUE_PATH;
use crate::queue::lock::{self, Decision, Inspection, LockRecord, Ours};

/// Where the state directory is and how auto-heal is set, from `--state-dir` or the
/// configuration the agent would read.
pub(crate) fn resolve(
    state_dir: Option<&Path>,
    config: Option<&Path>,
    user: bool,
) -> Result<(PathBuf, Config), Failure> {
    let mode = if user { Mode::User } else { Mode::System };
    let paths = Paths::from_env(mode);
    let file = config
        .map(Path::to_path_buf)
        .unwrap_or_else(|| paths.config_file.clone());
    let cfg = Config::load(&file, config.is_some(), &paths)
        .map_err(|e| Failure::refused(format!("configuration error: {e}")))?;
    Ok((
        state_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| cfg.state_dir.clone()),
        cfg,
    ))
}

fn ours() -> Result<Ours, Failure> {
    let id = crate::facts::identity::identity().map_err(|e| Failure::refused(e.to_string()))?;
    Ok(Ours {
        host_id: id.host_id,
        hostname: id.hostname,
        boot_id: id.boot_id,
        pid: std::process::id() as i64,
        pid_start: crate::facts::process::own_start_time().unwrap_or(0),
        pid_ns: id.pid_ns,
    })
}

fn record_json(r: &LockRecord) -> serde_json::Value {
    serde_json::to_value(r).unwrap_or_default()
}

fn comm(pid: i64) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn inspection_json(i: &Inspection) -> serde_json::Value {
    let (result, reason, message) = match &i.verdict.decision {
        Decision::Create => (
            "create",
            None,
            "no lock file: the agent creates it, born locked".to_string(),
        ),
        Decision::Reclaim {
            corrupt: Some(w), ..
        } => (
            "reclaim",
            None,
            format!(
                "the record is unreadable ({w}) on a host-local filesystem: the agent reclaims it"
            ),
        ),
        Decision::Reclaim {
            renamed_from: Some(f),
            ..
        } => (
            "reclaim",
            None,
            format!("the record is this host's (renamed from {f}): the agent reclaims it"),
        ),
        Decision::Reclaim { .. } => (
            "reclaim",
            None,
            "the record is this host's and nobody holds it: the agent reclaims it".into(),
        ),
        Decision::Takeover { from } => (
            "takeover",
            None,
            format!(
                "the stale lock of {} would be taken over (auto_heal = \"on\")",
                from.hostname
            ),
        ),
        Decision::Disabled { reason, message } => {
            ("disabled", Some(reason.as_str()), message.clone())
        }
    };
    let f = &i.verdict.facts;
    serde_json::json!({
        "lock": i.lock.display().to_string(),
        "exists": i.exists,
        "record": i.record.as_ref().and_then(|r| r.as_ref().ok()).map(record_json),
        "record_error": i.record.as_ref().and_then(|r| r.as_ref().err()).cloned(),
        "holders": i.holders.iter().map(|p| serde_json::json!({"pid": p, "comm": comm(*p)})).collect::<Vec<_>>(),
        "facts": {
            "class": f.class.map(|c| c.as_str()),
            "rule": f.rule,
            "holder": f.holder,
            "holder_alive": f.holder_alive,
            "heartbeat_age_ms": f.heartbeat_age_ms.flatten(),
            "heartbeat_unreadable": f.heartbeat_age_ms == Some(None),
        },
        "decision": {"row": i.verdict.row, "result": result, "reason": reason, "message": message},
    })
}

/// `outlivectl lock`.
#[expect(
    clippy::too_many_lines,
    reason = "one screen of `outlivectl lock`, the L-4 facts explained in order"
)]
pub(crate) async fn show(
    state_dir: Option<&Path>,
    config: Option<&Path>,
    user: bool,
    json: bool,
) -> Result<(), Failure> {
    let (dir, cfg) = resolve(state_dir, config, user)?;
    let facts = Facts::new(Duration::from_millis(cfg.facts.statfs_timeout_ms as u64));
    let insp = lock::inspect(
        &dir,
        &ours()?,
        cfg.queue.auto_heal,
        &facts,
        &KernelProber,
        wall_ms(),
    );
    let mut v = inspection_json(&insp);
    // The running agent's own view, when it answers.
    let agent = match client::connect(user).await {
        Ok(conn) => client::properties(&conn, QUEUE_PATH, "org.outlive.ResumeQueue1")
            .await
            .ok(),
        Err(_) => None,
    };
    v["agent"] = agent.clone().unwrap_or(serde_json::Value::Null);
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let mut rows = vec![(
        "lock file".to_string(),
        format!(
            "{}{}",
            insp.lock.display(),
            if insp.exists { "" } else { " (absent)" }
        ),
    )];
    match &insp.record {
        Some(Ok(r)) => rows.push((
            "record".into(),
            format!(
                "host {} (host id {}), pid {}, acquired {}, outlive {}",
                r.hostname,
                r.host_id.as_deref().unwrap_or("(none)"),
                r.pid,
                if r.acquired_at > 0 {
                    rfc3339_ms(r.acquired_at)
                } else {
                    "-".into()
                },
                r.agent_version
            ),
        )),
        Some(Err(e)) => rows.push(("record".into(), format!("unreadable: {e}"))),
        None => {}
    }
    if insp.exists {
        let held = if insp.holders.is_empty() {
            "nobody holds its flock".to_string()
        } else {
            insp.holders
                .iter()
                .map(|p| format!("pid {p} ({})", comm(*p)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        rows.push(("flock".into(), held));
    }
    let f = &insp.verdict.facts;
    if let (Some(c), Some(r)) = (f.class, &f.rule) {
        rows.push((
            "state directory".into(),
            format!(
                "{} is {c} ({r}){}",
                dir.display(),
                if c.is_host_local() {
                    ""
                } else {
                    ": NOT host-local"
                }
            ),
        ));
    }
    if let Some(a) = f.holder_alive {
        rows.push((
            "holder".into(),
            format!(
                "{} ({})",
                f.holder.clone().unwrap_or_default(),
                if a { "alive" } else { "dead" }
            ),
        ));
    }
    if let Some(age) = f.heartbeat_age_ms {
        rows.push((
            "heartbeat".into(),
            age.map(|ms| format!("touched {} s ago (stale after 300 s)", ms / 1000))
                .unwrap_or_else(|| "unreadable (counts as stale)".into()),
        ));
    }
    let d = &v["decision"];
    // The usual case: this host's agent holds it. That is not a refusal, it is the lock working.
    let ours_holds = insp.verdict.row == 3
        && matches!(&insp.record, Some(Ok(r)) if r.host_id.as_deref() == Some(ours()?.host_id.to_hex().as_str()))
        && insp.holders.iter().any(|p| comm(*p) == "outlived");
    if ours_holds {
        rows.push((
            "decision".into(),
            "held by this host's running outlived: the queue may write its state".into(),
        ));
        emit(&pairs(&rows, 0));
        return Ok(());
    }
    rows.push((
        "decision".into(),
        format!(
            "L-4 row {}: {}{}",
            d["row"],
            d["result"].as_str().unwrap_or_default(),
            d["reason"]
                .as_str()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ),
    ));
    emit(&pairs(&rows, 0));
    say(&format!(
        "\n{}",
        super::super::config::wrap(&clean(d["message"].as_str().unwrap_or_default()), 96)
            .join("\n")
    ));
    match agent {
        Some(p) if p["Enabled"].as_bool() == Some(true) => {
            say("\nthe running agent: queue enabled, lock held")
        }
        Some(p) => say(&format!(
            "\nthe running agent: queue disabled ({}): {}",
            clean(p["DisabledReason"].as_str().unwrap_or_default()),
            clean(p["DisabledDetail"].as_str().unwrap_or_default())
        )),
        None => say("\nthe agent is not running (or not reachable on the bus)"),
    }
    Ok(())
}

/// `outlivectl lock clear` (L-8): root only (in user mode, the agent's own uid); refused while
/// any process holds the flock; then removes the file and asks the agent to re-evaluate.
pub(crate) async fn clear(
    state_dir: Option<&Path>,
    config: Option<&Path>,
    user: bool,
    json: bool,
) -> Result<(), Failure> {
    let (dir, _cfg) = resolve(state_dir, config, user)?;
    if !user && !nix::unistd::geteuid().is_root() {
        return Err(Failure::refused(
            "lock clear needs root (for a user's agent: outlivectl --user lock clear)",
        ));
    }
    // L-8 as amended: the file is removed while this process holds its flock, so no agent can
    // hold it meanwhile; a holder means refusal.
    let cleared = lock::clear(&dir).map_err(|e| match &e {
        lock::ClearError::Held(_, pids) => {
            let who: Vec<String> = pids
                .iter()
                .map(|p| format!("pid {p} ({})", comm(*p)))
                .collect();
            Failure::refused(format!(
                "{e}{}",
                if who.is_empty() {
                    String::new()
                } else {
                    format!(" Holder: {}.", who.join(", "))
                }
            ))
        }
        _ => Failure::refused(e.to_string()),
    })?;
    let (path, record) = (cleared.lock, cleared.record);
    let reevaluated = match client::connect(user).await {
        Ok(conn) => match client::agent(&conn).await?.reevaluate().await {
            Ok(()) => client::properties(&conn, QUEUE_PATH, "org.outlive.ResumeQueue1")
                .await
                .ok(),
            Err(e) => return Err(client::failure(e)),
        },
        Err(_) => None,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "removed": path.display().to_string(),
                "record": record.as_ref().ok().map(record_json),
                "agent": reevaluated,
            }))
            .unwrap_or_default()
        );
        return Ok(());
    }
    match &record {
        Ok(r) => say(&format!(
            "removed {} (held by host {}, host id {}, pid {}, acquired {})",
            path.display(),
            r.hostname,
            r.host_id.as_deref().unwrap_or("(none)"),
            r.pid,
            rfc3339_ms(r.acquired_at)
        )),
        Err(e) => say(&format!(
            "removed {} (its record was unreadable: {e})",
            path.display()
        )),
    }
    match reevaluated {
        Some(p) if p["Enabled"].as_bool() == Some(true) => {
            say("the agent re-evaluated the lock: queue enabled")
        }
        Some(p) => say(&format!(
            "the agent re-evaluated the lock: queue still disabled ({}): {}",
            clean(p["DisabledReason"].as_str().unwrap_or_default()),
            clean(p["DisabledDetail"].as_str().unwrap_or_default())
        )),
        None => say("the agent is not running: it takes the lock when it starts"),
    }
    Ok(())
}
