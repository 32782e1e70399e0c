//! `outlivectl run`, `runs`, `watch`, `unwatch`, `evidence`, `revive` (SPEC §8, C-1, C-5, C-7,
//! C-8): watched runs from a terminal.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use zbus::wire::Variant;

use super::client::{self, Failure, failure};
use super::render::{clean, print_json, say, table, ts};

/// The arguments of `outlivectl run`.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunArgs {
    pub run_id: Option<String>,
    pub session: Option<String>,
    pub evidence: Vec<String>,
    pub policy: Option<String>,
    pub resume: Option<String>,
    pub env: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub worktree: Option<PathBuf>,
    pub as_uid: Option<u32>,
    pub as_gid: Option<u32>,
    pub argv: Vec<String>,
}

/// POSIX shell word splitting without expansion (`--resume 'my-agent --continue'`): blanks
/// separate words; single quotes keep everything; double quotes keep everything but `\` before
/// `$`, `` ` ``, `"`, `\` and a newline; a `\` outside quotes keeps the next character.
pub(crate) fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = vec![];
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(x) => cur.push(x),
                        None => return Err("an unterminated single quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(x @ ('$' | '`' | '"' | '\\')) => cur.push(x),
                            Some('\n') => {}
                            Some(x) => {
                                cur.push('\\');
                                cur.push(x);
                            }
                            None => return Err("an unterminated double quote".into()),
                        },
                        Some(x) => cur.push(x),
                        None => return Err("an unterminated double quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some('\n') => {}
                    Some(x) => cur.push(x),
                    None => return Err("a trailing backslash".into()),
                }
            }
            x => {
                in_word = true;
                cur.push(x);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// The first word made absolute against `path` (the caller's `PATH`), as `systemd-run` does.
pub(crate) fn resolve(argv0: &str, path: Option<&str>, cwd: &Path) -> Result<String, String> {
    if argv0.contains('/') {
        let p = if argv0.starts_with('/') {
            PathBuf::from(argv0)
        } else {
            cwd.join(argv0)
        };
        return if p.is_file() {
            Ok(p.to_string_lossy().into_owned())
        } else {
            Err(format!("{} does not exist", p.display()))
        };
    }
    for dir in path.unwrap_or("").split(':').filter(|d| !d.is_empty()) {
        let p = Path::new(dir).join(argv0);
        if is_executable(&p) {
            return Ok(p.to_string_lossy().into_owned());
        }
    }
    Err(format!("{argv0} was not found in PATH"))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn utf8(flag: &str, p: &Path) -> Result<String, Failure> {
    p.to_str().map(str::to_string).ok_or_else(|| {
        Failure::usage(format!(
            "{flag}: {} is not valid UTF-8, which D-Bus cannot carry",
            p.display()
        ))
    })
}

/// Build `Run`'s dictionary: the first word of the command and of the resume command resolved
/// against the caller's `PATH`; only `--env` variables are sent (`--env K` copies the caller's
/// value).
pub(crate) fn request(
    a: &RunArgs,
    path: Option<&str>,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<HashMap<&'static str, Variant<'static>>, Failure> {
    let mut d: HashMap<&'static str, Variant<'static>> = HashMap::new();
    if a.argv.is_empty() {
        return Err(Failure::usage("give the command to run after `--`"));
    }
    let cwd = match &a.cwd {
        Some(c) => c.clone(),
        None => std::env::current_dir()
            .map_err(|e| Failure::usage(format!("cannot read the current directory: {e}")))?,
    };
    let mut argv = a.argv.clone();
    argv[0] = resolve(&argv[0], path, &cwd).map_err(Failure::usage)?;
    d.insert("exec", Variant::from(argv));
    if let Some(r) = &a.resume {
        let mut words = split_words(r).map_err(|e| Failure::usage(format!("--resume: {e}")))?;
        if words.is_empty() {
            return Err(Failure::usage("--resume: an empty command"));
        }
        words[0] =
            resolve(&words[0], path, &cwd).map_err(|e| Failure::usage(format!("--resume: {e}")))?;
        d.insert("resume", Variant::from(words));
    }
    d.insert("cwd", Variant::from(utf8("--cwd", &cwd)?));
    if let Some(w) = &a.worktree {
        d.insert("worktree", Variant::from(utf8("--worktree", w)?));
    }
    if let Some(r) = &a.run_id {
        d.insert("run_id", Variant::from(r.clone()));
    }
    if let Some(s) = &a.session {
        d.insert("session", Variant::from(s.clone()));
    }
    if let Some(p) = &a.policy {
        d.insert("evidence_policy", Variant::from(p.clone()));
    }
    if !a.evidence.is_empty() {
        d.insert("evidence", Variant::from(a.evidence.clone()));
    }
    let mut env = HashMap::new();
    for kv in &a.env {
        let (k, v) = match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (
                kv.clone(),
                lookup(kv)
                    .ok_or_else(|| Failure::usage(format!("--env {kv}: {kv} is not set here")))?,
            ),
        };
        env.insert(k, v);
    }
    if !env.is_empty() {
        d.insert("env", Variant::from(env));
    }
    if let Some(u) = a.as_uid {
        d.insert("user", Variant::from(u));
    }
    if let Some(g) = a.as_gid {
        d.insert("group", Variant::from(g));
    }
    Ok(d)
}

/// `outlivectl run`.
pub(crate) async fn run(user: bool, json: bool, a: &RunArgs) -> Result<(), Failure> {
    let path = std::env::var("PATH").ok();
    let d = request(a, path.as_deref(), &|k| std::env::var(k).ok())?;
    let conn = client::connect(user).await?;
    let r = client::runs(&conn).await?;
    let (run_id, unit) = r.run(d).await.map_err(failure)?;
    let dry = client::properties(
        &conn,
        crate::publish::dbus::QUEUE_PATH,
        "org.outlive.ResumeQueue1",
    )
    .await
    .ok()
    .and_then(|p| p["DryRun"].as_bool())
    .unwrap_or(false);
    if json {
        print_json(&serde_json::json!({"run_id": run_id, "unit": unit}));
    } else {
        say(&format!("run {run_id} started as {unit}"));
        if dry {
            say("observe-only: this run is watched but will not be revived");
        }
    }
    Ok(())
}

/// `outlivectl runs`: one row per record.
pub(crate) async fn list(user: bool, json: bool) -> Result<(), Failure> {
    let conn = client::connect(user).await?;
    let r = client::runs(&conn).await?;
    let rows: Vec<serde_json::Value> = r
        .list_runs()
        .await
        .map_err(failure)?
        .iter()
        .map(crate::publish::dbus::variant::dict_to_json)
        .collect();
    if json {
        let keep = [
            "run_id",
            "unit",
            "state",
            "ended_at",
            "uid",
            "evidence",
            "entry_id",
            "entry_status",
            "enqueue",
        ];
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|row| {
                let m: serde_json::Map<String, serde_json::Value> = keep
                    .iter()
                    .map(|k| (k.to_string(), row[*k].clone()))
                    .collect();
                serde_json::Value::Object(m)
            })
            .collect();
        print_json(&serde_json::Value::Array(out));
        return Ok(());
    }
    if rows.is_empty() {
        say("no watched runs");
        return Ok(());
    }
    let s = |v: &serde_json::Value| {
        v.as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or("-")
            .to_string()
    };
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            vec![
                s(&row["run_id"]),
                s(&row["unit"]),
                s(&row["state"]),
                ts(&row["ended_at"]),
                row["uid"].to_string(),
                row["evidence"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .filter(|x| !x.is_empty())
                    .unwrap_or_else(|| "-".into()),
                s(&row["entry_id"]),
                s(&row["entry_status"]),
                s(&row["enqueue"]),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "RUN",
                "UNIT",
                "STATE",
                "ENDED",
                "UID",
                "EVIDENCE",
                "ENTRY",
                "ENTRY STATUS",
                "ENQUEUE"
            ],
            &body
        )
    );
    Ok(())
}

/// The other commands.
pub(crate) enum Op {
    Watch {
        unit: String,
        evidence: Vec<String>,
        policy: Option<String>,
        session: Option<String>,
    },
    Unwatch(String),
    Evidence(String, Vec<String>),
    Revive(String),
}

/// Run one of them.
pub(crate) async fn op(user: bool, json: bool, op: Op) -> Result<(), Failure> {
    let conn = client::connect(user).await?;
    let r = client::runs(&conn).await?;
    let (text, value) = match op {
        Op::Watch {
            unit,
            evidence,
            policy,
            session,
        } => {
            let mut o: HashMap<&str, Variant<'_>> = HashMap::new();
            if !evidence.is_empty() {
                o.insert("evidence", Variant::from(evidence));
            }
            if let Some(p) = policy {
                o.insert("evidence_policy", Variant::from(p));
            }
            if let Some(s) = session {
                o.insert("session", Variant::from(s));
            }
            let id = r.watch(&unit, o).await.map_err(failure)?;
            (
                format!("watching {unit} as run {id}"),
                serde_json::json!({"run_id": id}),
            )
        }
        Op::Unwatch(id) => {
            r.unwatch(&id).await.map_err(failure)?;
            (
                format!("run {id} is no longer watched; it keeps running"),
                serde_json::json!({"unwatched": id}),
            )
        }
        Op::Evidence(id, names) => {
            r.set_evidence(&id, &names).await.map_err(failure)?;
            (
                format!(
                    "run {id} declares: {}",
                    if names.is_empty() {
                        "no evidence".to_string()
                    } else {
                        names.join(", ")
                    }
                ),
                serde_json::json!({"run_id": id, "evidence": names}),
            )
        }
        Op::Revive(id) => {
            let entry = r.revive(&id).await.map_err(failure)?;
            (
                format!("run {id} queued for revival as {entry}"),
                serde_json::json!({"run_id": id, "entry_id": entry}),
            )
        }
    };
    if json {
        print_json(&value);
    } else {
        say(&clean(&text));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s8_resume_is_split_by_shell_word_rules_without_expansion() {
        let ok = |s: &str| split_words(s).unwrap();
        assert_eq!(ok("claude --continue"), ["claude", "--continue"]);
        assert_eq!(
            ok("a 'b c' \"d $HOME\" e\\ f"),
            ["a", "b c", "d $HOME", "e f"]
        );
        assert_eq!(ok("x \"q\\\"q\" ''"), ["x", "q\"q", ""]);
        assert_eq!(ok("  "), Vec::<String>::new());
        assert!(split_words("a 'b").is_err());
        assert!(split_words("a \"b").is_err());
    }

    #[test]
    fn s8_run_resolves_argv0_and_copies_only_named_env() {
        let a = RunArgs {
            argv: vec!["sh".into(), "-c".into(), "true".into()],
            resume: Some("sh --continue".into()),
            env: vec!["A=1".into(), "B".into()],
            cwd: Some("/tmp".into()),
            ..RunArgs::default()
        };
        let d = request(&a, Some("/nonexistent:/bin:/usr/bin"), &|k| {
            (k == "B").then(|| "2".into())
        })
        .unwrap();
        let exec: Vec<String> = d["exec"].clone().try_into().unwrap();
        assert!(
            exec[0].ends_with("/sh") && exec[0].starts_with('/'),
            "{exec:?}"
        );
        let resume: Vec<String> = d["resume"].clone().try_into().unwrap();
        assert_eq!(resume[1], "--continue");
        let env: HashMap<String, String> = d["env"].clone().try_into().unwrap();
        assert_eq!(
            env,
            HashMap::from([("A".into(), "1".into()), ("B".into(), "2".into())])
        );
        let missing = RunArgs {
            argv: vec!["no-such-program-here".into()],
            cwd: Some("/tmp".into()),
            ..RunArgs::default()
        };
        assert_eq!(
            request(&missing, Some("/bin"), &|_| None)
                .unwrap_err()
                .status,
            2
        );
        let unset = RunArgs {
            env: vec!["C".into()],
            ..a
        };
        assert_eq!(
            request(&unset, Some("/bin:/usr/bin"), &|_| None)
                .unwrap_err()
                .status,
            2
        );
    }
}
