//! `outlivectl host [--path P] [--json]` (SPEC §8, H-1, H-3): host facts read directly from
//! the kernel, without the agent.

use std::path::Path;
use std::time::Duration;

use super::exit;
use super::render::{emit, pairs};
use crate::facts::{self, Classification, ClassifyError, Facts};

/// The statfs timeout the CLI uses (the agent's default, SPEC §9).
const TIMEOUT: Duration = Duration::from_millis(3000);

/// Run the command; returns the exit status.
pub(crate) fn run(path: Option<&Path>, json: bool) -> i32 {
    let id = match facts::identity::identity() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("outlivectl: {e}");
            return exit::REFUSED;
        }
    };
    let mut report = facts::host_report(&id);
    let classification = match path {
        None => None,
        Some(p) => match classify(p) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("outlivectl: {}", super::render::clean_lines(&e.to_string()));
                return exit::REFUSED;
            }
        },
    };
    if json {
        if let Some(c) = &classification {
            report["path"] = c.to_json();
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        return exit::OK;
    }
    emit(&render_host(&report));
    if let Some(c) = &classification {
        emit(&render_classification(c));
    }
    exit::OK
}

fn classify(p: &Path) -> Result<Classification, ClassifyError> {
    // Relative paths are taken from the current directory, as a shell user expects.
    let abs = std::path::absolute(p).map_err(|e| ClassifyError::Io(p.to_path_buf(), e))?;
    Facts::new(TIMEOUT).classify_path(&abs)
}

fn s(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn render_host(r: &serde_json::Value) -> String {
    let ns = match (
        &r["observing_namespace_differs"],
        r.get("observing_namespace_detail"),
    ) {
        (serde_json::Value::Bool(true), _) => {
            "differs from PID 1's (a sandboxed view of the host)".to_string()
        }
        (serde_json::Value::Bool(false), _) => "same as PID 1's".to_string(),
        (_, Some(d)) => format!("cannot tell ({})", s(d)),
        _ => "cannot tell".to_string(),
    };
    pairs(
        &[
            ("hostname".into(), s(&r["hostname"])),
            ("host id".into(), s(&r["host_id"])),
            ("boot id".into(), s(&r["boot_id"])),
            ("pid namespace".into(), s(&r["pid_ns"])),
            ("mount namespace".into(), ns),
        ],
        0,
    )
}

/// Text rendering of a classification.
pub(crate) fn render_classification(c: &Classification) -> String {
    let j = c.to_json();
    let class = format!(
        "{} ({})",
        c.class,
        if c.host_local() {
            "host-local"
        } else {
            "NOT host-local: a lock or state here is refused"
        }
    );
    let fstype = match &c.evidence.subtype {
        Some(st) => format!("{}.{st}", c.evidence.fstype),
        None => c.evidence.fstype.clone(),
    };
    let mut rows = vec![
        ("path".into(), s(&j["path"])),
        ("class".into(), class),
        ("rule".into(), c.rule.to_string()),
        (
            "fstype".into(),
            if fstype.is_empty() {
                "-".into()
            } else {
                fstype
            },
        ),
        ("source".into(), s(&j["source"])),
        ("mount point".into(), s(&j["mount_point"])),
        ("magic".into(), s(&j["magic"])),
        (
            "read-only".into(),
            if c.evidence.read_only {
                "yes".into()
            } else {
                "no".into()
            },
        ),
    ];
    if let Some(d) = &c.evidence.detail {
        rows.push(("detail".into(), d.clone()));
    }
    let mut out = format!("\n{}", pairs(&rows, 0));
    if let Some(via) = &c.via {
        out.push_str(&format!(
            "\nresolved through {}:\n",
            facts::mountinfo::display_path(&via.path)
        ));
        out.push_str(&pairs(
            &[
                ("class".into(), via.class.to_string()),
                ("rule".into(), via.rule.to_string()),
                ("fstype".into(), via.evidence.fstype.clone()),
                ("source".into(), via.evidence.source.clone()),
            ],
            2,
        ));
    }
    out
}
