//! `outlivectl audit [--since …] [--json]` (SPEC X-2): the audit trail from `audit.jsonl` in the
//! state directory and in the runtime directory (where lines go while the lock is not held),
//! merged in time order. Works without a journal and without the agent.

use super::render::{clean, say};
use std::path::Path;

use super::client::Failure;
use crate::audit::{Event, read_logs};
use crate::clock::{parse_rfc3339_ms, rfc3339_ms, wall_ms};

/// Parse `--since`: RFC 3339, or a duration ago (`90s`, `10m`, `2h`, `3d`, `1w`).
pub(crate) fn parse_since(s: &str, now_ms: u64) -> Option<u64> {
    if let Some(t) = parse_rfc3339_ms(s) {
        return Some(t);
    }
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let ms = match unit.trim() {
        "s" | "sec" => 1000,
        "m" | "min" => 60_000,
        "h" | "hour" | "hours" => 3_600_000,
        "d" | "day" | "days" => 86_400_000,
        "w" | "week" | "weeks" => 7 * 86_400_000,
        _ => return None,
    };
    Some(now_ms.saturating_sub(n.saturating_mul(ms)))
}

fn priority_word(p: u8) -> &'static str {
    match p {
        0..=2 => "crit",
        3 => "err",
        4 => "warning",
        5 => "notice",
        6 => "info",
        _ => "debug",
    }
}

/// `outlivectl audit`.
pub(crate) fn show(
    since: Option<&str>,
    config: Option<&Path>,
    user: bool,
    json: bool,
) -> Result<(), Failure> {
    let (_, cfg) = super::lock::resolve(None, config, user)?;
    let from = match since {
        None => 0,
        Some(s) => parse_since(s, wall_ms()).ok_or_else(|| {
            Failure::usage(format!(
                "--since {s:?}: expected RFC 3339 or a duration like 10m, 2h, 3d"
            ))
        })?,
    };
    let events: Vec<Event> = read_logs(&[&cfg.state_dir, &cfg.runtime_dir])
        .into_iter()
        .filter(|e| e.at_ms >= from)
        .collect();
    if json {
        for e in &events {
            println!("{}", e.to_json());
        }
        return Ok(());
    }
    if events.is_empty() {
        say(&format!(
            "no audit events{} in {} or {}",
            since.map(|s| format!(" since {s}")).unwrap_or_default(),
            cfg.state_dir.display(),
            cfg.runtime_dir.display()
        ));
        return Ok(());
    }
    for e in &events {
        say(&format!(
            "{}  {:<7}  {:<22}  {}",
            &rfc3339_ms(e.at_ms)[..19].replace('T', " "),
            priority_word(e.priority),
            clean(&e.kind),
            clean(&e.message)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x2_since_accepts_times_and_durations() {
        let now = 10 * 86_400_000;
        assert_eq!(parse_since("90s", now), Some(now - 90_000));
        assert_eq!(parse_since("2h", now), Some(now - 7_200_000));
        assert_eq!(parse_since("1w", now), Some(now - 7 * 86_400_000));
        assert_eq!(parse_since("1970-01-02", now), Some(86_400_000));
        assert_eq!(parse_since("soon", now), None);
        assert_eq!(parse_since("5y", now), None);
    }
}
