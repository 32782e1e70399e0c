//! `outlivectl guards`, `outlivectl status` and `outlivectl ack` (SPEC §8, §6): the posture
//! for people (anomalies first, each with a one-line hint of what to do) and for scripts
//! (`--json`).

use super::client::{self, Failure, failure};
use super::render::{clean, emit, say, table, ts};
use crate::publish::dbus::{AGENT_PATH, GUARDS_PATH, QUEUE_PATH};

/// States that are anomalies by themselves (G-7; `off` only when diverged from default).
fn is_anomalous(row: &serde_json::Value) -> bool {
    match row["effective"].as_str().unwrap_or("") {
        "errored" | "missing" | "off-runtime-divergent" | "on-stale" => true,
        "off" => row["off_class"] == "diverged-from-default",
        _ => false,
    }
}

/// What to do about a row, in one line (empty when nothing).
pub(crate) fn hint(row: &serde_json::Value) -> String {
    let key = row["key"].as_str().unwrap_or("");
    let source = row["source"].as_str().unwrap_or("builtin");
    let reason = row["reason_code"].as_str().unwrap_or("");
    match (row["effective"].as_str().unwrap_or(""), reason) {
        ("errored", "config-unreadable") => {
            "the configuration file no longer parses: `outlived --check-config` names the error".to_string()
        }
        ("errored", _) if source != "builtin" => format!(
            "fix guards.d/{source} (`journalctl -t outlived OUTLIVE_EVENT=guard-dropin-rejected` says why), then `systemctl reload outlived`"
        ),
        ("errored", _) => "its status could not be read: `outlivectl audit` and `journalctl -u outlived` tell why".into(),
        ("missing", _) => format!("{key} is configured on but nothing reports it: is its reporter running?"),
        ("off-runtime-divergent", r) if crate::posture::rows::reason_help(r).is_some() => {
            crate::posture::rows::reason_help(r)
                .unwrap_or_default()
                .to_string()
        }
        ("off-runtime-divergent", _) => match key {
            "watchdog" => "nothing restarts a wedged agent: set WatchdogSec= in the unit (the shipped unit has 30s)".into(),
            "publish.dbus" => "outlived does not own its bus name: `journalctl -u outlived` says why".into(),
            "publish.journal" => "the journal refuses entries: check systemd-journald".into(),
            "metrics.textfile" => "the metrics file cannot be written: check its directory (`outlivectl audit`)".into(),
            _ => "configured on but not running: `journalctl -u outlived` says why".into(),
        },
        ("diverged-pending-restart", _) => {
            "the file on disk differs from what runs: `systemctl reload outlived` applies it".into()
        }
        ("off", _) if row["off_class"] == "diverged-from-default" => {
            "switched off in the configuration (on by default): if that is not deliberate, remove the override and reload".into()
        }
        ("on-stale", _) => "no progress for more than 5 of its cadences: is its loop or reporter stuck?".into(),
        ("on-dry-run", _) if key == "queue.resume" => {
            "observe-only: nothing is revived until dry_run = false under [queue]".into()
        }
        ("on-dry-run", _) => "dry run: it reports but does not act".into(),
        _ => String::new(),
    }
}

async fn rows(conn: &zbus::Connection) -> Result<Vec<serde_json::Value>, Failure> {
    let g = client::guards(conn).await?;
    Ok(g.get_guards()
        .await
        .map_err(failure)?
        .iter()
        .map(crate::publish::dbus::variant::dict_to_json)
        .collect())
}

/// Anomalies first, then by key.
fn sorted(mut rows: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    rows.sort_by(|a, b| {
        (!is_anomalous(a), a["key"].as_str().unwrap_or(""))
            .cmp(&(!is_anomalous(b), b["key"].as_str().unwrap_or("")))
    });
    rows
}

/// The table of `outlivectl guards`.
pub(crate) fn guards_table(rows: &[serde_json::Value]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut state = r["effective"].as_str().unwrap_or("-").to_string();
            if let Some(c) = r["off_class"].as_str() {
                state = format!("{state} ({c})");
            }
            if let Some(c) = r["reason_code"].as_str() {
                state = format!("{state} ({c})");
            }
            if r["diverged"] == true && r["effective"] != "diverged-pending-restart" {
                state = format!("{state}, file edited: reload pending");
            }
            vec![
                if is_anomalous(r) {
                    "!".into()
                } else {
                    String::new()
                },
                r["key"].as_str().unwrap_or("-").to_string(),
                state,
                ts(&r["since"]),
                if r["load_bearing"] == true {
                    "yes".into()
                } else {
                    String::new()
                },
                r["source"].as_str().unwrap_or("-").to_string(),
            ]
        })
        .collect();
    let mut out = table(
        &["", "GUARD", "STATE", "SINCE", "LOAD-BEARING", "SOURCE"],
        &cells,
    );
    let hints: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let h = hint(r);
            (!h.is_empty()).then(|| {
                format!(
                    "  {}: {}",
                    clean(r["key"].as_str().unwrap_or("-")),
                    clean(&h)
                )
            })
        })
        .collect();
    if !hints.is_empty() {
        out.push_str("\nwhat to do:\n");
        out.push_str(&hints.join("\n"));
        out.push('\n');
    }
    out
}

/// `outlivectl guards`.
pub(crate) async fn guards(user: bool, json: bool) -> Result<(), Failure> {
    let conn = client::connect(user).await?;
    let rows = sorted(rows(&conn).await?);
    if json {
        let props = client::properties(&conn, GUARDS_PATH, "org.outlive.Guards1").await?;
        let v = serde_json::json!({
            "guards": rows,
            "summary": props["Summary"],
            "anomalies": props["Anomalies"],
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    emit(&guards_table(&rows));
    Ok(())
}

/// `outlivectl status`: one screen.
#[expect(
    clippy::too_many_lines,
    reason = "one screen of `outlivectl status`, section after section"
)]
pub(crate) async fn status(user: bool, json: bool) -> Result<(), Failure> {
    let conn = client::connect(user).await?;
    let agent = client::properties(&conn, AGENT_PATH, "org.outlive.Agent1").await?;
    let g = client::properties(&conn, GUARDS_PATH, "org.outlive.Guards1").await?;
    let q = client::properties(&conn, QUEUE_PATH, "org.outlive.ResumeQueue1").await?;
    let rows = sorted(rows(&conn).await?);
    if json {
        let v = serde_json::json!({
            "status_text": agent["StatusText"],
            "degraded": agent["Degraded"],
            "observe_only": q["DryRun"],
            "summary": g["Summary"],
            "anomalies": g["Anomalies"],
            "attention": g["Attention"],
            "queue": q,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let mut out = String::new();
    if q["DryRun"] == true {
        out.push_str(
            "observe-only: nothing will be revived (queue.dry_run is on; set dry_run = false under [queue] and reload)\n",
        );
    }
    let on = rows
        .iter()
        .filter(|r| {
            matches!(
                r["effective"].as_str(),
                Some("on-confirmed" | "on-unverified" | "on-blind" | "on-dry-run")
            )
        })
        .count();
    out.push_str(&format!(
        "{}posture: {on}/{} guards on\n",
        if agent["Degraded"] == true {
            "DEGRADED "
        } else {
            ""
        },
        rows.len()
    ));
    let anomalous: Vec<&serde_json::Value> = rows.iter().filter(|r| is_anomalous(r)).collect();
    let listed = g["Anomalies"].as_array().cloned().unwrap_or_default();
    if !listed.is_empty() {
        out.push_str("anomalies:\n");
        for a in &listed {
            let text = clean(a.as_str().unwrap_or("-"));
            let key = text.split(':').next().unwrap_or("");
            let h = anomalous
                .iter()
                .find(|r| r["key"] == key)
                .map(|r| hint(r))
                .unwrap_or_default();
            out.push_str(&format!(
                "  {text}{}\n",
                if h.is_empty() {
                    String::new()
                } else {
                    format!(" — {h}")
                }
            ));
        }
    }
    let att = &g["Attention"];
    if att["open"] == true {
        out.push_str(&format!(
            "attention: open since {}\n",
            ts(&att["opened_at"])
        ));
        for n in att["notices"].as_array().into_iter().flatten() {
            let count = n["count"].as_u64().unwrap_or(1);
            // Only root and members get the message (§12 G-10); others the entry it is about.
            let message = match (n["message"].as_str(), n["entry_id"].as_str()) {
                (Some(m), _) => clean(m),
                (None, Some(id)) => format!("entry {id} (details for root and members of outlive)"),
                (None, None) => "(details for root and members of outlive)".to_string(),
            };
            out.push_str(&format!(
                "  {} {}: {}{}\n",
                ts(&n["at"]),
                n["kind"].as_str().unwrap_or("-"),
                message,
                if count > 1 {
                    format!(" (×{count})")
                } else {
                    String::new()
                }
            ));
        }
        if att["notices"]
            .as_array()
            .is_some_and(|a| a.iter().any(|n| n["one_off"] == true))
        {
            out.push_str("  `outlivectl ack` clears the one-off notices\n");
        }
    } else {
        out.push_str("attention: nothing needs attention\n");
    }
    if q["Enabled"] == true {
        out.push_str(&format!("queue: {} waiting", q["Waiting"]));
        if q["Paused"] == true {
            out.push_str(&format!(
                ", paused ({}: {}) — `outlivectl resume`",
                q["PauseKind"].as_str().unwrap_or("-"),
                clean(q["PauseReason"].as_str().unwrap_or(""))
            ));
        }
        if q["BreakerOpenUntil"].as_u64().unwrap_or(0) > 0 {
            out.push_str(&format!(
                ", breaker open until {}",
                ts(&q["BreakerOpenUntil"])
            ));
        }
        out.push_str("\nlock: held\n");
    } else {
        out.push_str(&format!(
            "queue: DISABLED ({})\nlock: not held — `outlivectl lock` explains\n",
            q["DisabledReason"].as_str().unwrap_or("-")
        ));
    }
    emit(&out);
    Ok(())
}

/// `outlivectl ack`.
pub(crate) async fn ack(user: bool, json: bool) -> Result<(), Failure> {
    let conn = client::connect(user).await?;
    client::guards(&conn)
        .await?
        .ack_attention()
        .await
        .map_err(failure)?;
    if json {
        println!("{}", serde_json::json!({"acknowledged": true}));
    } else {
        say("acknowledged: one-off notices left the attention item");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, eff: &str, reason: Option<&str>) -> serde_json::Value {
        let mut v = serde_json::json!({"key": key, "effective": eff, "source": "builtin", "since": 1_795_000_000_000u64});
        if let Some(r) = reason {
            v["reason_code"] = r.into();
        }
        v
    }

    #[test]
    fn s8_guards_lists_anomalies_first_with_a_hint_each() {
        let rows = sorted(vec![
            row("drainer.calm_gate", "on-confirmed", None),
            row(
                "queue.resume",
                "off-runtime-divergent",
                Some("foreign-host"),
            ),
            row("watchdog", "on-stale", None),
        ]);
        assert_eq!(rows[0]["key"], "queue.resume");
        assert_eq!(rows[1]["key"], "watchdog");
        let t = guards_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].starts_with("!  queue.resume"), "{t}");
        assert!(t.contains("off-runtime-divergent (foreign-host)"));
        assert!(
            t.contains("queue.resume: the lock was left by another host")
                && t.contains("`outlivectl lock`"),
            "{t}"
        );
        assert!(t.contains("watchdog: no progress"), "{t}");
        assert!(
            !t.contains("drainer.calm_gate:"),
            "no hint for a healthy row"
        );
    }

    #[test]
    fn s8_every_anomalous_state_and_reason_code_has_a_hint() {
        for eff in [
            "errored",
            "missing",
            "off-runtime-divergent",
            "on-stale",
            "diverged-pending-restart",
        ] {
            assert!(!hint(&row("x", eff, None)).is_empty(), "{eff}");
        }
        for r in crate::posture::rows::REASON_CODES {
            assert!(
                !hint(&row("queue.resume", "off-runtime-divergent", Some(r))).is_empty(),
                "{r}"
            );
        }
        let mut off = row("drainer.calm_gate", "off", None);
        off["off_class"] = "diverged-from-default".into();
        assert!(hint(&off).contains("on by default"));
        off["off_class"] = "dark-default".into();
        assert!(hint(&off).is_empty(), "a dark default is quiet");
    }
}
