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
//! the agent's user), it is not a regular file or is larger than 64 KiB, it does not parse, it
//! declares a built-in key, or it loses a key to another file: a key several files declare
//! stays with the root-owned one, else with the file that held it; with neither, every
//! claimant is ignored (§12 G-2: a non-root file never displaces a root-owned declaration).
//! Only root and the uid owning the declaring file may report its keys. The directory is read
//! again only when it or a file in it changed ([`Reader`]).

use crate::sync::MutexExt;
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
pub(crate) fn parse(text: &str, file: &str, owner: u32) -> Result<Vec<Declared>, Refusal> {
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

/// Largest drop-in read (§12 G-2): a bigger file is refused without being read.
pub(crate) const MAX_DROPIN_BYTES: u64 = 64 * 1024;

/// Why a file (or its declarations) is refused: the keys it declared, if any were read, and
/// the reason.
pub(crate) type Refusal = (Vec<String>, String);

/// The files as last read, with the stamps they were read at.
type Cached = (Vec<Stamp>, std::sync::Arc<Vec<FileRead>>);

/// One `*.toml` file of `guards.d/` as read: its owner and its declarations, or why it is
/// refused on its own (before the files are weighed against each other).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileRead {
    pub file: String,
    pub owner: u32,
    pub outcome: Result<Vec<Declared>, Refusal>,
}

/// What identifies the directory's and each file's current version: when none of it changed,
/// nothing is read again (§12 G-2).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    name: String,
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    mode: u32,
    uid: u32,
}

impl Stamp {
    fn of(name: &str, m: &std::fs::Metadata) -> Stamp {
        Stamp {
            name: name.to_string(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            mode: m.mode(),
            uid: m.uid(),
        }
    }
}

/// Reads `guards.d/` again only when it or one of its files changed (a new, removed, renamed,
/// rewritten, chmodded or chowned file), so an evaluation costs a directory listing and one
/// lstat per file, however large a file someone left there.
pub(crate) struct Reader {
    dir: PathBuf,
    owner: u32,
    cache: std::sync::Mutex<Option<Cached>>,
    /// How many times the files were read (tests).
    reads: std::sync::atomic::AtomicU64,
}

impl Reader {
    /// `owner` is who must own the directory (root, or the agent's uid in user mode).
    pub(crate) fn new(dir: &Path, owner: u32) -> Reader {
        Reader {
            dir: dir.to_path_buf(),
            owner,
            cache: std::sync::Mutex::new(None),
            reads: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many times the directory's files were read (not served from the cache).
    #[cfg(test)]
    pub(crate) fn reads(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The drop-ins now: `builtin` tells built-in keys apart; `incumbent` is what was applied,
    /// whose declarations keep a contested key (below root-owned ones, G-2).
    pub(crate) fn load(
        &self,
        builtin: &dyn Fn(&str) -> bool,
        incumbent: Option<&Dropins>,
    ) -> Dropins {
        let files = match self.stamps() {
            Err(rejected) => {
                return Dropins {
                    guards: vec![],
                    rejected,
                };
            }
            Ok(None) => return Dropins::default(),
            Ok(Some(stamps)) => {
                let mut cache = self.cache.locked();
                match cache.as_ref() {
                    Some((s, files)) if *s == stamps => std::sync::Arc::clone(files),
                    _ => {
                        self.reads
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let files = std::sync::Arc::new(read_files(&self.dir, self.owner, &stamps));
                        *cache = Some((stamps, std::sync::Arc::clone(&files)));
                        files
                    }
                }
            }
        };
        resolve(&files, builtin, incumbent)
    }

    /// The directory's stamp first, then each `*.toml` file's (sorted by name); None when the
    /// directory does not exist.
    fn stamps(&self) -> Result<Option<Vec<Stamp>>, Vec<Rejected>> {
        let Ok(meta) = std::fs::metadata(&self.dir) else {
            return Ok(None);
        };
        let rd = std::fs::read_dir(&self.dir).map_err(|e| {
            vec![Rejected {
                keys: vec!["guards.d".into()],
                file: "guards.d".into(),
                why: format!("cannot read {}: {e}", self.dir.display()),
            }]
        })?;
        let mut names: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".toml") && n.len() > ".toml".len())
            .collect();
        names.sort();
        let mut out = vec![Stamp::of("", &meta)];
        for n in names {
            match std::fs::symlink_metadata(self.dir.join(&n)) {
                Ok(m) => out.push(Stamp::of(&n, &m)),
                // Gone since the listing: not there.
                Err(_) => continue,
            }
        }
        Ok(Some(out))
    }
}

/// Read `dir` (`guards.d`) once, without a cache: see [`Reader`].
#[cfg(test)]
pub(crate) fn load(dir: &Path, owner: u32, builtin: &dyn Fn(&str) -> bool) -> Dropins {
    Reader::new(dir, owner).load(builtin, None)
}

/// Read each file the stamps name (the directory's own stamp first): its own checks only.
fn read_files(dir: &Path, owner: u32, stamps: &[Stamp]) -> Vec<FileRead> {
    let d = &stamps[0];
    let dir_problem = if d.uid != owner {
        Some(format!(
            "{} is owned by uid {}, not {owner}",
            dir.display(),
            d.uid
        ))
    } else if loose(d.mode) {
        Some(format!("{} is group- or world-writable", dir.display()))
    } else {
        None
    };
    stamps[1..]
        .iter()
        .map(|st| {
            let file = st.name.clone();
            // The owner is the descriptor's when the file was read, else the listing's.
            let (owner, outcome) = match &dir_problem {
                Some(why) => (st.uid, Err((vec![], why.clone()))),
                None => match read_one(&dir.join(&file)) {
                    Ok((uid, text)) => (uid, parse(&text, &file, uid)),
                    Err(e) => (st.uid, Err(e)),
                },
            };
            FileRead {
                file,
                owner,
                outcome,
            }
        })
        .collect()
}

/// One file through its descriptor: never a link, a FIFO or anything but a regular file, not
/// group- or world-writable, at most [`MAX_DROPIN_BYTES`], UTF-8. Its owner and text.
fn read_one(path: &Path) -> Result<(u32, String), Refusal> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let no = |why: String| Err((vec![], why));
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return no("not a regular file (a symbolic link)".into());
        }
        Err(e) => return no(format!("cannot read: {e}")),
    };
    let m = match f.metadata() {
        Ok(m) => m,
        Err(e) => return no(format!("cannot read: {e}")),
    };
    if !m.is_file() {
        return no("not a regular file".into());
    }
    if loose(m.mode()) {
        return no("group- or world-writable".into());
    }
    if m.size() > MAX_DROPIN_BYTES {
        return no(format!(
            "{} bytes, more than the {} KiB a drop-in may have",
            m.size(),
            MAX_DROPIN_BYTES / 1024
        ));
    }
    let mut bytes = Vec::new();
    if let Err(e) = f.take(MAX_DROPIN_BYTES + 1).read_to_end(&mut bytes) {
        return no(format!("cannot read: {e}"));
    }
    if bytes.len() as u64 > MAX_DROPIN_BYTES {
        return no(format!(
            "grew past the {} KiB a drop-in may have while it was read",
            MAX_DROPIN_BYTES / 1024
        ));
    }
    match String::from_utf8(bytes) {
        Ok(t) => Ok((m.uid(), t)),
        Err(_) => no("not valid UTF-8".into()),
    }
}

/// G-2 as amended, pure: the files weighed against each other. A file that declares a
/// built-in key or a key twice is refused. A key several files declare goes to the one
/// root-owned file among them, else to the file that held it in `incumbent`; every other
/// claimant is refused whole (a non-root file never displaces a root-owned declaration, and a
/// newcomer never displaces the holder); with no such file, every claimant is refused. A
/// refused file's rows are its keys nobody holds (each shown once), else the file itself.
pub(crate) fn resolve(
    files: &[FileRead],
    builtin: &dyn Fn(&str) -> bool,
    incumbent: Option<&Dropins>,
) -> Dropins {
    // Each file's own verdict.
    let mut verdict: Vec<Result<&Vec<Declared>, Refusal>> = files
        .iter()
        .map(|f| {
            let guards = f.outcome.as_ref().map_err(|e| e.clone())?;
            let keys: Vec<String> = guards.iter().map(|g| g.key.clone()).collect();
            if let Some(k) = keys.iter().find(|k| builtin(k)) {
                return Err((keys.clone(), format!("declares the built-in key {k}")));
            }
            let mut unique = keys.clone();
            unique.sort();
            unique.dedup();
            if unique.len() != keys.len() {
                return Err((keys, "declares a key twice".into()));
            }
            Ok(guards)
        })
        .collect();
    // Contested keys, settled one at a time until none is left.
    loop {
        let mut claims: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, v) in verdict.iter().enumerate() {
            if let Ok(guards) = v {
                for g in guards.iter() {
                    claims.entry(g.key.as_str()).or_default().push(i);
                }
            }
        }
        let Some((key, claimants)) = claims.into_iter().find(|(_, c)| c.len() > 1) else {
            break;
        };
        let roots: Vec<usize> = claimants
            .iter()
            .copied()
            .filter(|&i| files[i].owner == 0)
            .collect();
        let holder = incumbent
            .and_then(|d| d.find(key))
            .and_then(|g| claimants.iter().copied().find(|&i| files[i].file == g.file));
        let winner = match roots.as_slice() {
            [one] => Some(*one),
            [] => holder,
            _ => None,
        };
        let key = key.to_string();
        for i in claimants {
            if Some(i) == winner {
                continue;
            }
            let keys = verdict[i]
                .as_ref()
                .map(|g| g.iter().map(|d| d.key.clone()).collect())
                .unwrap_or_default();
            let why = match winner {
                Some(w) => format!("{key} is already declared by {}", files[w].file),
                None => {
                    let others: Vec<&str> = files
                        .iter()
                        .enumerate()
                        .filter(|(j, f)| {
                            *j != i
                                && f.outcome
                                    .as_ref()
                                    .is_ok_and(|g| g.iter().any(|d| d.key == key))
                        })
                        .map(|(_, f)| f.file.as_str())
                        .collect();
                    format!("{key} is also declared by {}", others.join(", "))
                }
            };
            verdict[i] = Err((keys, why));
        }
    }
    let mut out = Dropins::default();
    for guards in verdict.iter().flatten() {
        out.guards.extend(guards.iter().cloned());
    }
    let mut shown: std::collections::HashSet<String> =
        out.guards.iter().map(|g| g.key.clone()).collect();
    for (f, v) in files.iter().zip(verdict) {
        if let Err((keys, why)) = v {
            let mut keys: Vec<String> = keys
                .into_iter()
                .filter(|k| shown.insert(k.clone()))
                .collect();
            if keys.is_empty() {
                keys.push(format!("guards.d/{}", f.file));
            }
            out.rejected.push(Rejected {
                keys,
                file: f.file.clone(),
                why,
            });
        }
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
        // Two root-owned files claim one key, neither held it: it is nobody's, and its row
        // is shown once.
        let (keys, w) = why("d-first.toml").unwrap();
        assert_eq!(keys, ["shared.key"]);
        assert!(w.contains("also declared by e-second.toml"), "{w}");
        let (keys, w) = why("e-second.toml").unwrap();
        assert_eq!(keys, ["guards.d/e-second.toml"]);
        assert!(w.contains("also declared by d-first.toml"), "{w}");
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

    fn chown(p: &Path, uid: u32) {
        std::os::unix::fs::chown(p, Some(uid), None).unwrap();
    }

    fn keyed(key: &str) -> String {
        GOOD.replace("backup.snapshots", key)
    }

    /// §12 G-2 (security review finding 5, the reviewer's key contest): alice, owning her own
    /// drop-in, declared root's key too, and the contest made root's guard errored and
    /// unreportable. A non-root file never displaces a root-owned declaration, whichever sorts
    /// first; her file is refused, and her own key reads errored.
    #[test]
    fn g2_a_non_root_file_never_displaces_a_root_owned_declaration() {
        if !crate::testing::root("files owned by another user") {
            return;
        }
        for alice_file in ["05-alice.toml", "20-alice.toml"] {
            let d = dir();
            write(d.path(), "10-backup.toml", GOOD, 0o644);
            let both = format!("{GOOD}{}", keyed("alice.key"));
            write(d.path(), alice_file, &both, 0o644);
            chown(&d.path().join(alice_file), 1000);
            let got = load(d.path(), 0, &builtin);
            let g = got.find("backup.snapshots").expect("root's guard stands");
            assert_eq!((g.file.as_str(), g.owner), ("10-backup.toml", 0));
            assert!(got.find("alice.key").is_none());
            assert_eq!(got.rejected.len(), 1, "{:?}", got.rejected);
            let r = &got.rejected[0];
            assert_eq!(r.file, alice_file);
            assert_eq!(r.keys, ["alice.key"], "root's key is not shown twice");
            assert!(
                r.why.contains("already declared by 10-backup.toml"),
                "{}",
                r.why
            );
        }
    }

    /// Between files of two users, the holder keeps its key: a newcomer is refused.
    #[test]
    fn g2_the_holder_of_a_key_keeps_it_against_a_newcomer() {
        if !crate::testing::root("files owned by other users") {
            return;
        }
        let d = dir();
        write(d.path(), "20-bob.toml", &keyed("team.key"), 0o644);
        chown(&d.path().join("20-bob.toml"), 1001);
        let reader = Reader::new(d.path(), 0);
        let applied = reader.load(&builtin, None);
        assert_eq!(applied.find("team.key").unwrap().owner, 1001);
        write(d.path(), "10-alice.toml", &keyed("team.key"), 0o644);
        chown(&d.path().join("10-alice.toml"), 1000);
        let got = reader.load(&builtin, Some(&applied));
        assert_eq!(got.find("team.key").unwrap().file, "20-bob.toml");
        assert_eq!(got.rejected.len(), 1);
        assert_eq!(got.rejected[0].file, "10-alice.toml");
        assert!(
            got.rejected[0]
                .why
                .contains("already declared by 20-bob.toml")
        );
        // With no holder (a first start), the key is nobody's.
        let fresh = Reader::new(d.path(), 0).load(&builtin, None);
        assert!(fresh.find("team.key").is_none());
        assert_eq!(fresh.rejected.len(), 2);
    }

    /// §12 G-2 (security review finding 5): a 64 MiB drop-in was read whole on every
    /// evaluation. Anything over 64 KiB is refused from its size, without being read; a FIFO
    /// or a link is refused without blocking or following.
    #[test]
    fn g2_a_drop_in_over_64_kib_or_not_a_file_is_refused_unread() {
        let d = dir();
        write(d.path(), "10-backup.toml", GOOD, 0o644);
        let big = std::fs::File::create(d.path().join("20-huge.toml")).unwrap();
        big.set_len(64 << 20).unwrap();
        drop(big);
        std::fs::set_permissions(
            d.path().join("20-huge.toml"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let mut edge = keyed("edge.key");
        edge.push_str(&"#".repeat(MAX_DROPIN_BYTES as usize - edge.len()));
        write(d.path(), "30-edge.toml", &edge, 0o644);
        nix::unistd::mkfifo(
            &d.path().join("40-fifo.toml"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            d.path().join("10-backup.toml"),
            d.path().join("50-link.toml"),
        )
        .unwrap();
        let got = load(d.path(), me(), &builtin);
        let why = |f: &str| {
            got.rejected
                .iter()
                .find(|r| r.file == f)
                .map(|r| r.why.clone())
                .unwrap_or_else(|| panic!("{f} not refused: {got:?}"))
        };
        assert!(
            why("20-huge.toml").contains("more than the 64 KiB"),
            "{}",
            why("20-huge.toml")
        );
        assert!(why("40-fifo.toml").contains("not a regular file"));
        assert!(why("50-link.toml").contains("not a regular file"));
        assert!(got.find("backup.snapshots").is_some());
        assert!(got.find("edge.key").is_some(), "exactly 64 KiB is allowed");
    }

    /// §12 G-2: drop-ins are read again only when they change, not on every evaluation.
    #[test]
    fn g2_drop_ins_are_read_again_only_when_they_change() {
        let d = dir();
        write(d.path(), "10-backup.toml", GOOD, 0o644);
        let reader = Reader::new(d.path(), me());
        for _ in 0..5 {
            assert!(
                reader
                    .load(&builtin, None)
                    .find("backup.snapshots")
                    .is_some()
            );
        }
        assert_eq!(reader.reads(), 1);
        // Rewritten in place (same inode): read again.
        std::thread::sleep(std::time::Duration::from_millis(10));
        write(d.path(), "10-backup.toml", &keyed("renamed.key"), 0o644);
        assert!(reader.load(&builtin, None).find("renamed.key").is_some());
        assert_eq!(reader.reads(), 2);
        // A new file, then a chmod: each read again once.
        write(d.path(), "20-more.toml", &keyed("more.key"), 0o644);
        assert!(reader.load(&builtin, None).find("more.key").is_some());
        std::fs::set_permissions(
            d.path().join("20-more.toml"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        assert!(reader.load(&builtin, None).find("more.key").is_none());
        reader.load(&builtin, None);
        assert_eq!(reader.reads(), 4);
    }
}
