//! Golden tests of filesystem classification (SPEC H-3, H-4) over mount tables of other
//! systems: `tests/data/mountinfo/<name>.txt` is the mount table, `<name>.expect` says what
//! statfs would answer on that system and what each path must classify as:
//!
//! ```text
//! magic <mount point> <f_type hex>     statfs of paths on that mount returns this magic
//! missing <path prefix>                paths under it do not exist in that mount namespace
//! expect <path> <class> <rule>         the classification of <path>
//! ```
//!
//! Paths may contain spaces: the keyword is the first word, the values the last ones. Mounts
//! without a `magic` line answer statfs with an error, so a rule that should not statfs is
//! checked by its result (a statfs would read `statfs-error`), and every statfs is recorded.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use outlive::facts::classify::{FsProbe, StatfsOutcome, classify};
use outlive::facts::mountinfo::{MountEntry, MountTable};

struct Scripted {
    magic: HashMap<PathBuf, u32>,
    missing: Vec<PathBuf>,
    statfs_calls: RefCell<Vec<PathBuf>>,
}

impl FsProbe for Scripted {
    fn statfs(&self, path: &Path, mount: &MountEntry) -> StatfsOutcome {
        self.statfs_calls
            .borrow_mut()
            .push(mount.mount_point.clone());
        match self.magic.get(&mount.mount_point) {
            Some(&f_type) => StatfsOutcome::Magic {
                f_type,
                read_only: false,
            },
            None => StatfsOutcome::Failed(format!("no statfs scripted for {}", path.display())),
        }
    }
    fn exists(&self, path: &Path) -> Option<bool> {
        Some(!self.missing.iter().any(|m| path.starts_with(m)))
    }
}

struct Expect {
    path: PathBuf,
    class: String,
    rule: String,
}

fn load(name: &str) -> (MountTable, Scripted, Vec<Expect>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/mountinfo");
    let table =
        MountTable::parse(&std::fs::read_to_string(dir.join(format!("{name}.txt"))).unwrap());
    assert_eq!(table.malformed, 0, "{name}: malformed lines");
    let mut probe = Scripted {
        magic: HashMap::new(),
        missing: vec![],
        statfs_calls: RefCell::new(vec![]),
    };
    let mut expects = vec![];
    for line in std::fs::read_to_string(dir.join(format!("{name}.expect")))
        .unwrap()
        .lines()
    {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (kw, rest) = line.split_once(' ').unwrap();
        match kw {
            "magic" => {
                let (p, hex) = rest.rsplit_once(' ').unwrap();
                probe.magic.insert(
                    p.into(),
                    u32::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap(),
                );
            }
            "missing" => probe.missing.push(rest.into()),
            "expect" => {
                let (rest, rule) = rest.rsplit_once(' ').unwrap();
                let (p, class) = rest.rsplit_once(' ').unwrap();
                expects.push(Expect {
                    path: p.into(),
                    class: class.into(),
                    rule: rule.into(),
                });
            }
            other => panic!("{name}: unknown keyword {other}"),
        }
    }
    (table, probe, expects)
}

fn check(name: &str) {
    let (table, probe, expects) = load(name);
    assert!(
        expects.len() >= 3,
        "{name}: at least three paths per sample"
    );
    for e in &expects {
        probe.statfs_calls.borrow_mut().clear();
        let c = classify(&table, &e.path, &probe);
        assert_eq!(
            (c.class.as_str(), c.rule.as_str()),
            (e.class.as_str(), e.rule.as_str()),
            "{name}: {} (evidence {:?})",
            e.path.display(),
            c.evidence
        );
        assert_eq!(
            c.host_local(),
            matches!(e.class.as_str(), "local-persistent" | "local-volatile")
        );
        // Network, host-shared, pseudo and autofs are decided without statfs (H-3 step 2).
        if matches!(e.rule.as_str(), "fstype" | "autofs") {
            assert!(
                probe.statfs_calls.borrow().is_empty(),
                "{name}: {} was statfs'd",
                e.path.display()
            );
        }
    }
}

#[test]
fn h3_golden_docker_container_overlay_root() {
    check("docker-container");
}

#[test]
fn h3_golden_nfs_client_with_automounter() {
    check("nfs-client");
}

#[test]
fn h3_golden_cifs_client() {
    check("cifs-client");
}

#[test]
fn h3_golden_sshfs_desktop() {
    check("sshfs-desktop");
}

#[test]
fn h3_golden_wsl2() {
    check("wsl2");
}

#[test]
fn h3_golden_kubernetes_node() {
    check("k8s-node");
}

#[test]
fn h3_golden_btrfs_laptop() {
    check("btrfs-laptop");
}

#[test]
fn h3_golden_zfs_host() {
    check("zfs-host");
}

#[test]
fn h3_golden_vm_guest() {
    check("vm-guest");
}

#[test]
fn h3_golden_podman_rootless() {
    check("podman-rootless");
}

#[test]
fn h3_golden_every_sample_is_tested() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/mountinfo");
    let src = std::fs::read_to_string(file!()).unwrap_or_else(|_| {
        std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/mountinfo_golden.rs"),
        )
        .unwrap()
    });
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".txt") {
            n += 1;
            assert!(
                src.contains(&format!("check(\"{stem}\")")),
                "{stem} has no test"
            );
        }
    }
    assert!(n >= 8, "at least 8 real-world samples (have {n})");
}

#[test]
fn h3_golden_escapes_in_mount_points() {
    let (table, _, _) = load("btrfs-laptop");
    let m = table
        .find(Path::new("/home/me/My Projects/mnt point/f"))
        .unwrap();
    assert_eq!(m.fstype, "exfat");
    assert_eq!(m.mount_point, Path::new("/home/me/My Projects/mnt point"));
    // The containing btrfs subvolume records its root inside the filesystem.
    let home = table.find(Path::new("/home/me")).unwrap();
    assert_eq!(home.root, Path::new("/home"));
}
