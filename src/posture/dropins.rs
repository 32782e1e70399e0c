//! External guards (SPEC G-2): other programs declare guards in drop-in files
//! `guards.d/*.toml` beside the configuration file, and report their runtime status over D-Bus.
//!
//! A file holds one or more `[[guard]]` tables:
//!
//! ```toml
//! [[guard]]
//! key = "backup.snapshots"          # [a-z0-9._-], not a built-in key
//! description = "hourly snapshots of /srv are taken"
//! default_enabled = true
//! enabled = true
//! dry_run = false                   # optional
//! cadence_ms = 3600000              # optional: stale after 5 × without a report
//! load_bearing = false              # optional
//! ```
//!
//! A file is ignored and audited (its rows read `errored`, `source` = the file) when it or
//! `guards.d/` is group- or world-writable, `guards.d/` is not owned by root (in user mode: by
//! the agent's user), it does not parse, it declares a built-in key, or a key another file
//! declared. Only root and the uid owning the declaring file may report its keys.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Longest description kept.
const DESCRIPTION_MAX: usize = 200;

/// One declared external guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    pub key: String,
    pub description: String,
    pub default_enabled: bool,
    pub enabled: bool,
    pub dry_run: bool,
    pub cadence_ms: Option<u64>,
    pub load_bearing: bool,
    /// The file's name (the row's `source`).
    pub file: String,
    /// Who may report it (besides root).
    pub owner: u32,
}

/// A rejected file or declaration: its rows read `errored`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The keys it declared, or `guards.d/<file>` when none could be read.
    pub keys: Vec<String>,
    pub file: String,
    pub why: String,
}

/// What `guards.d/` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dropins {
    pub guards: Vec<Declared>,
    pub rejected: Vec<Rejected>,
}

impl Dropins {
    pub fn find(&self, key: &str) -> Option<&Declared> {
        self.guards.iter().find(|g| g.key == key)
    }
}

fn key_ok(k: &str) -> bool {
    (1..=64).contains(&k.len())
        && k.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// Parse one file's text into declarations (without the ownership checks).
pub fn parse(text: &str, file: &str, owner: u32) -> Result<Vec<Declared>, (Vec<String>, String)> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| (vec![], format!("not valid TOML: {}", e.message())))?;
    let mut keys_seen = vec![];
    for k in table.keys() {
        if k != "guard" {
            return Err((
                vec![],
                format!("unknown table or key `{k}` (expected [[guard]] tables)"),
            ));
        }
    }
    let Some(list) = table.get("guard").and_then(|g| g.as_array()) else {
        return Err((vec![], "no [[guard]] table".into()));
    };
    let mut out = vec![];
    for (i, g) in list.iter().enumerate() {
        let Some(t) = g.as_table() else {
            return Err((keys_seen, format!("guard {} is not a table", i + 1)));
        };
        let key = t
            .get("key")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        if !key_ok(&key) {
            return Err((
                keys_seen,
                format!("guard {}: `key` must be 1–64 of [a-z0-9._-]", i + 1),
            ));
        }
        keys_seen.push(key.clone());
        let fail = |keys: &Vec<String>, why: String| Err((keys.clone(), format!("{key}: {why}")));
        for k in t.keys() {
            if ![
                "key",
                "description",
                "default_enabled",
                "enabled",
                "dry_run",
                "cadence_ms",
                "load_bearing",
            ]
            .contains(&k.as_str())
            {
                return fail(&keys_seen, format!("unknown field `{k}`"));
            }
        }
        let boolean = |name: &str, required: bool| -> Result<bool, String> {
            match t.get(name) {
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| format!("`{name}` must be true or false")),
                None if required => Err(format!("`{name}` is required")),
                None => Ok(false),
            }
        };
        let (default_enabled, enabled, dry_run, load_bearing) = match (
            boolean("default_enabled", true),
            boolean("enabled", true),
            boolean("dry_run", false),
            boolean("load_bearing", false),
        ) {
            (Ok(a), Ok(b), Ok(c), Ok(d)) => (a, b, c, d),
            (a, b, c, d) => {
                let why = [a.err(), b.err(), c.err(), d.err()]
                    .into_iter()
                    .flatten()
                    .next()
                    .unwrap_or_default();
                return fail(&keys_seen, why);
            }
        };
        let description = match t.get("description") {
            Some(v) => match v.as_str() {
                Some(s) => s.chars().take(DESCRIPTION_MAX).collect(),
                None => return fail(&keys_seen, "`description` must be a string".into()),
            },
            None => return fail(&keys_seen, "`description` is required".into()),
        };
        let cadence_ms = match t.get("cadence_ms") {
            None => None,
            Some(v) => match v.as_integer() {
                Some(n) if (100..=7 * 24 * 3600 * 1000).contains(&n) => Some(n as u64),
                _ => return fail(&keys_seen, "`cadence_ms` must be 100–604800000".into()),
            },
        };
        out.push(Declared {
            key,
            description,
            default_enabled,
            enabled,
            dry_run,
            cadence_ms,
            load_bearing,
            file: file.to_string(),
            owner,
        });
    }
    Ok(out)
}

/// Whether a mode is group- or world-writable.
fn loose(mode: u32) -> bool {
    mode & 0o022 != 0
}

/// Read `dir` (`guards.d`). `owner` is who must own the directory (root, or the agent's uid in
/// user mode); `builtin` tells built-in keys apart. A missing directory is no drop-ins.
pub fn load(dir: &Path, owner: u32, builtin: &dyn Fn(&str) -> bool) -> Dropins {
    let mut out = Dropins::default();
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(_) => return out,
    };
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
        Err(e) => {
            out.rejected.push(Rejected {
                keys: vec!["guards.d".into()],
                file: "guards.d".into(),
                why: format!("cannot read {}: {e}", dir.display()),
            });
            return out;
        }
    };
    files.sort();
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    };
    let dir_problem = if meta.uid() != owner {
        Some(format!(
            "{} is owned by uid {}, not {owner}",
            dir.display(),
            meta.uid()
        ))
    } else if loose(meta.mode()) {
        Some(format!("{} is group- or world-writable", dir.display()))
    } else {
        None
    };
    let mut declared: BTreeMap<String, String> = BTreeMap::new();
    for p in files {
        let file = name(&p);
        let whole = format!("guards.d/{file}");
        let reject = |keys: Vec<String>, why: String| Rejected {
            keys: if keys.is_empty() {
                vec![whole.clone()]
            } else {
                keys
            },
            file: file.clone(),
            why,
        };
        if let Some(why) = &dir_problem {
            out.rejected.push(reject(vec![], why.clone()));
            continue;
        }
        let m = match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_file() => m,
            Ok(_) => {
                out.rejected
                    .push(reject(vec![], "not a regular file".into()));
                continue;
            }
            Err(e) => {
                out.rejected
                    .push(reject(vec![], format!("cannot read: {e}")));
                continue;
            }
        };
        if loose(m.mode()) {
            out.rejected
                .push(reject(vec![], "group- or world-writable".into()));
            continue;
        }
        let text = match std::fs::read(&p).map(String::from_utf8) {
            Ok(Ok(t)) => t,
            Ok(Err(_)) => {
                out.rejected.push(reject(vec![], "not valid UTF-8".into()));
                continue;
            }
            Err(e) => {
                out.rejected
                    .push(reject(vec![], format!("cannot read: {e}")));
                continue;
            }
        };
        let guards = match parse(&text, &file, m.uid()) {
            Ok(g) => g,
            Err((keys, why)) => {
                out.rejected.push(reject(keys, why));
                continue;
            }
        };
        let keys: Vec<String> = guards.iter().map(|g| g.key.clone()).collect();
        if let Some(k) = keys.iter().find(|k| builtin(k)) {
            out.rejected.push(reject(
                keys.clone(),
                format!("declares the built-in key {k}"),
            ));
            continue;
        }
        if let Some((k, other)) = keys.iter().find_map(|k| declared.get(k).map(|o| (k, o))) {
            // Neither declaration is trusted: both files claim the key.
            let why = format!("{k} is also declared by {other}");
            out.guards.retain(|g| &g.key != k);
            out.rejected.push(reject(keys.clone(), why));
            continue;
        }
        let mut dup_in_file = keys.clone();
        dup_in_file.sort();
        dup_in_file.dedup();
        if dup_in_file.len() != keys.len() {
            out.rejected
                .push(reject(keys, "declares a key twice".into()));
            continue;
        }
        for k in &keys {
            declared.insert(k.clone(), file.clone());
        }
        out.guards.extend(guards);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const GOOD: &str = "[[guard]]\nkey = \"backup.snapshots\"\ndescription = \"snapshots\"\n\
                        default_enabled = true\nenabled = true\ncadence_ms = 60000\n";

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    fn dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    fn write(d: &Path, name: &str, text: &str, mode: u32) {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn builtin(k: &str) -> bool {
        super::super::manifest::builtin(k).is_some()
    }

    #[test]
    fn g2_a_good_drop_in_declares_its_guards_with_the_files_owner() {
        let d = dir();
        write(d.path(), "10-backup.toml", GOOD, 0o644);
        write(d.path(), "README", "not a drop-in", 0o644);
        let got = load(d.path(), me(), &builtin);
        assert!(got.rejected.is_empty(), "{:?}", got.rejected);
        assert_eq!(got.guards.len(), 1);
        let g = &got.guards[0];
        assert_eq!(
            (g.key.as_str(), g.cadence_ms, g.owner, g.file.as_str()),
            ("backup.snapshots", Some(60000), me(), "10-backup.toml")
        );
        assert!(!g.dry_run && !g.load_bearing);
    }

    #[test]
    fn g2_rejections_each_with_its_reason() {
        let d = dir();
        write(d.path(), "a-loose.toml", GOOD, 0o666);
        write(d.path(), "b-bad.toml", "[[guard]\nkey=", 0o644);
        write(
            d.path(),
            "c-builtin.toml",
            &GOOD.replace("backup.snapshots", "queue.resume"),
            0o644,
        );
        write(
            d.path(),
            "d-first.toml",
            &GOOD.replace("backup.snapshots", "shared.key"),
            0o644,
        );
        write(
            d.path(),
            "e-second.toml",
            &GOOD.replace("backup.snapshots", "shared.key"),
            0o644,
        );
        write(
            d.path(),
            "f-field.toml",
            &format!("{GOOD}color = \"red\"\n"),
            0o644,
        );
        write(
            d.path(),
            "g-ok.toml",
            &GOOD.replace("backup.snapshots", "ok.key"),
            0o644,
        );
        let got = load(d.path(), me(), &builtin);
        let why = |f: &str| {
            got.rejected
                .iter()
                .find(|r| r.file == f)
                .map(|r| (r.keys.clone(), r.why.clone()))
        };
        assert!(why("a-loose.toml").unwrap().1.contains("writable"));
        let (keys, w) = why("b-bad.toml").unwrap();
        assert_eq!(keys, ["guards.d/b-bad.toml"]);
        assert!(w.contains("not valid TOML"), "{w}");
        assert!(
            why("c-builtin.toml")
                .unwrap()
                .1
                .contains("built-in key queue.resume")
        );
        let (keys, w) = why("e-second.toml").unwrap();
        assert_eq!(keys, ["shared.key"]);
        assert!(w.contains("also declared by d-first.toml"));
        assert!(
            why("f-field.toml")
                .unwrap()
                .1
                .contains("unknown field `color`")
        );
        let declared: Vec<&str> = got.guards.iter().map(|g| g.key.as_str()).collect();
        assert_eq!(declared, ["ok.key"], "a contested key is nobody's");
    }

    #[test]
    fn g2_a_loose_or_foreign_directory_rejects_every_file() {
        let d = dir();
        write(d.path(), "10-backup.toml", GOOD, 0o644);
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let got = load(d.path(), me(), &builtin);
        assert!(got.guards.is_empty());
        assert!(got.rejected[0].why.contains("group- or world-writable"));
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let got = load(d.path(), me() + 1, &builtin);
        assert!(got.guards.is_empty());
        assert!(got.rejected[0].why.contains("is owned by uid"));
        assert!(load(&d.path().join("absent"), me(), &builtin) == Dropins::default());
    }

    #[test]
    fn g2_field_validation() {
        assert!(parse("[[guard]]\nkey = \"Bad Key\"\ndescription=\"x\"\ndefault_enabled=true\nenabled=true\n", "f", 0).is_err());
        assert!(
            parse(
                "[[guard]]\nkey = \"k\"\ndefault_enabled=true\nenabled=true\n",
                "f",
                0
            )
            .unwrap_err()
            .1
            .contains("description")
        );
        assert!(
            parse(
                "[[guard]]\nkey = \"k\"\ndescription=\"x\"\nenabled=true\n",
                "f",
                0
            )
            .unwrap_err()
            .1
            .contains("default_enabled")
        );
        assert!(parse("[[guard]]\nkey = \"k\"\ndescription=\"x\"\ndefault_enabled=true\nenabled=\"yes\"\n", "f", 0).is_err());
        assert!(parse("[[guard]]\nkey = \"k\"\ndescription=\"x\"\ndefault_enabled=true\nenabled=true\ncadence_ms=5\n", "f", 0).is_err());
        assert!(parse("other = 1\n", "f", 0).is_err());
        let two = format!("{GOOD}{}", GOOD.replace("backup.snapshots", "second"));
        assert_eq!(parse(&two, "f", 7).unwrap().len(), 2);
    }
}
