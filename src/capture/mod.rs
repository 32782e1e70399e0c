//! Capture (SPEC §11): runs reaped by someone else enter the queue with nobody's cooperation,
//! while a run that finished, failed by itself or was stopped by an operator is never revived.
//!
//! - `classify`: C-3's table, how an invocation ended, from the manager's facts (pure);
//! - `track`: one watched invocation followed through the manager's signals (pure);
//! - `reconcile`: what a record says after a gap, C-3 "agent absent" and C-4 (pure);
//! - `watcher`: the effects: the subscription to the service manager (rebuilt with backoff),
//!   starting runs (C-1), feeding the trackers, recording ends through the queue, unloading
//!   ended units, and the `capture.watch` guard's runtime state (C-9);
//! - this file: the names (C-1: unit names, run ids).
//!
//! The records themselves are kept by the queue (`crate::queue::runs`), in the state file.

pub mod classify;
pub mod reconcile;
pub mod track;
pub mod watcher;

/// The prefix of transient run units (DESIGN §2).
pub const RUN_UNIT_PREFIX: &str = "outlive-run-";

/// C-1: `run_id` escaped as `systemd-escape` does: `[A-Za-z0-9:_.]` kept (except a leading
/// `.`), every other byte `\xNN`.
pub fn escape(run_id: &str) -> String {
    let mut out = String::with_capacity(run_id.len());
    for (i, b) in run_id.bytes().enumerate() {
        let keep = b.is_ascii_alphanumeric() || b == b':' || b == b'_' || (b == b'.' && i > 0);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// C-1: the transient unit of a run, or why there is none (its name would exceed 255 bytes).
pub fn run_unit(run_id: &str) -> Result<String, String> {
    let name = format!("{RUN_UNIT_PREFIX}{}.service", escape(run_id));
    if name.len() > 255 {
        return Err(format!(
            "the unit name for this run_id would be {} bytes, longer than systemd's 255",
            name.len()
        ));
    }
    Ok(name)
}

pub use crate::queue::runs::unit_run_id;

/// C-1: a run id the agent assigns, `r-<ms base36>-<counter>`.
pub fn assign_run_id(now_ms: u64, counter: u64) -> String {
    format!("r-{}-{}", base36(now_ms), base36(counter))
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![];
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// C-1: names as `systemd-escape` makes them; a run_id with `:` and `@` works, one whose
    /// unit name would pass 255 bytes is refused.
    #[test]
    fn c1_run_unit_names_are_escaped_like_systemd_escape() {
        assert_eq!(
            run_unit("agent-7").unwrap(),
            "outlive-run-agent\\x2d7.service"
        );
        assert_eq!(
            run_unit("a:b@c.d_e").unwrap(),
            "outlive-run-a:b\\x40c.d_e.service"
        );
        assert_eq!(run_unit(".x").unwrap(), "outlive-run-\\x2ex.service");
        let fits = "a".repeat(255 - "outlive-run-.service".len());
        assert_eq!(run_unit(&fits).unwrap().len(), 255);
        assert!(run_unit(&format!("{fits}a")).is_err());
        assert!(
            run_unit(&"@".repeat(64)).is_err(),
            "64 × \\x40 is 256 bytes of name"
        );
        assert_eq!(assign_run_id(36, 1), "r-10-1");
        assert!(crate::queue::entry::valid_run_id(&assign_run_id(
            u64::MAX,
            u64::MAX
        )));
        assert_eq!(unit_run_id("agent@a.service"), "unit:agent@a.service");
    }
}
