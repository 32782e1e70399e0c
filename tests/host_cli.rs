//! `outlivectl host` (SPEC §8, H-1, H-3, H-4) against the real kernel: the host id oracle,
//! errors, and real filesystems mounted in a private mount namespace (so nothing leaks onto
//! the machine): tmpfs, loop-mounted ext4, xfs and btrfs images, a FUSE mount made with
//! bindfs, an overlay whose upper directory is on ext4, and a mount point with a space.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use common::{host_json, outlivectl, require, require_root, require_tools, run};

#[test]
fn h1_host_id_equals_systemd_app_specific_id() {
    if !require_tools(&["systemd-id128"]) {
        return;
    }
    let (code, out, err) = run(Command::new("systemd-id128").args([
        "machine-id",
        "--app-specific=a28de924e9684180bddccc53f20f165a",
    ]));
    assert_eq!(code, 0, "{err}");
    let v = host_json(None);
    assert_eq!(v["host_id"].as_str(), Some(out.trim()));
}

#[test]
fn h1_raw_machine_id_never_leaves_the_process() {
    let Ok(raw) = std::fs::read_to_string("/etc/machine-id") else {
        return;
    };
    let (_, out, _) = run(Command::new(outlivectl()).args(["host", "--json", "--path", "/"]));
    let (_, text, _) = run(Command::new(outlivectl()).args(["host", "--path", "/"]));
    assert!(
        !out.contains(raw.trim()),
        "the JSON report contains the raw machine id"
    );
    assert!(
        !text.contains(raw.trim()),
        "the text report contains the raw machine id"
    );
}

#[test]
fn s8_host_json_has_the_documented_fields() {
    let v = host_json(Some(Path::new("/")));
    for k in [
        "hostname",
        "host_id",
        "boot_id",
        "observing_namespace_differs",
    ] {
        assert!(v.get(k).is_some(), "missing {k}: {v}");
    }
    assert_eq!(v["boot_id"].as_str().map(str::len), Some(32));
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .replace('-', "");
    assert_eq!(v["boot_id"].as_str(), Some(boot.as_str()));
    let p = &v["path"];
    for k in [
        "path",
        "class",
        "host_local",
        "rule",
        "fstype",
        "subtype",
        "source",
        "mount_point",
        "magic",
        "read_only",
    ] {
        assert!(p.get(k).is_some(), "path.{k} missing: {p}");
    }
    assert!(p["magic"].as_str().unwrap().starts_with("0x"), "{p}");
}

#[test]
fn s8_nonexistent_path_is_a_clear_error_exit_1() {
    let (code, out, err) = run(Command::new(outlivectl()).args([
        "host",
        "--path",
        "/nonexistent/outlive/x",
        "--json",
    ]));
    assert_eq!(code, 1);
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("/nonexistent/outlive/x: no such file or directory"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn s8_relative_path_is_taken_from_the_current_directory() {
    let d = tempfile::tempdir().unwrap();
    let canonical = std::fs::canonicalize(d.path()).unwrap();
    let (code, out, err) = run(Command::new(outlivectl())
        .current_dir(d.path())
        .args(["host", "--json", "--path", "."]));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["path"]["path"].as_str(), canonical.to_str());
}

#[test]
fn h3_pseudo_filesystems_are_never_statfsd() {
    // /proc is decided by the mount table (step 2): no magic is recorded.
    let v = host_json(Some(Path::new("/proc/self")));
    assert_eq!(v["path"]["class"], "pseudo");
    assert_eq!(v["path"]["rule"], "fstype");
    assert!(v["path"]["magic"].is_null(), "{v}");
    assert_eq!(v["path"]["host_local"], false);
}

#[test]
fn h3_no_program_is_spawned() {
    // With an empty PATH and environment, any attempt to run df, findmnt, mount, hostname or
    // stat would fail; the facts come from the kernel alone.
    let (code, out, err) = run(Command::new(outlivectl())
        .env_clear()
        .args(["host", "--json", "--path", "/proc"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"class\": \"pseudo\""), "{out}");
}

const MOUNT_SCRIPT: &str = r#"
set -eu
D=$1; CTL=$2
cleanup() {
  [ -n "${BPID:-}" ] && { fusermount3 -u "$D/fuse" 2>/dev/null || umount -l "$D/fuse" 2>/dev/null || true; kill "$BPID" 2>/dev/null || true; }
  umount -R "$D/ovl/merged" "$D/tmpfs" "$D/with space" "$D/xfs" "$D/btrfs" 2>/dev/null || true
  umount "$D/ext4" 2>/dev/null || true
}
trap cleanup EXIT
mkdir -p "$D/tmpfs" "$D/ext4" "$D/xfs" "$D/btrfs" "$D/fuse-src" "$D/fuse" "$D/ovl/lower" "$D/ovl/merged" "$D/with space"
mount -t tmpfs tmpfs "$D/tmpfs"
mount -t tmpfs tmpfs "$D/with space"
mkdir -p "$D/with space/inner"
mount -o loop "$D/ext4.img" "$D/ext4"
mount -o loop "$D/xfs.img" "$D/xfs"
mount -o loop "$D/btrfs.img" "$D/btrfs"
mkdir -p "$D/ext4/upper" "$D/ext4/work"
mount -t overlay overlay -o "lowerdir=$D/ovl/lower,upperdir=$D/ext4/upper,workdir=$D/ext4/work" "$D/ovl/merged"
bindfs -f "$D/fuse-src" "$D/fuse" & BPID=$!
for i in $(seq 100); do grep -q " $D/fuse " /proc/self/mountinfo && break; sleep 0.05; done
for p in tmpfs ext4 xfs btrfs fuse ovl/merged "with space/inner"; do
  echo "=== $p"
  "$CTL" host --json --path "$D/$p"
done
"#;

fn image(dir: &Path, name: &str, mib: u64, mkfs: &[&str]) {
    let img = dir.join(name);
    std::fs::File::create(&img)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    let (code, _, err) = run(Command::new(mkfs[0]).args(&mkfs[1..]).arg(&img));
    assert_eq!(code, 0, "{mkfs:?}: {err}");
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn h3_real_mounts_are_classified_through_outlivectl() {
    if !require_root("mounting filesystems")
        || !require_tools(&[
            "unshare",
            "mkfs.ext4",
            "mkfs.xfs",
            "mkfs.btrfs",
            "bindfs",
            "fusermount3",
        ])
        || !require(Path::new("/dev/fuse").exists(), "/dev/fuse (FUSE)")
    {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    image(d.path(), "ext4.img", 64, &["mkfs.ext4", "-q", "-F"]);
    image(d.path(), "xfs.img", 320, &["mkfs.xfs", "-q", "-f"]);
    image(d.path(), "btrfs.img", 128, &["mkfs.btrfs", "-q", "-f"]);
    let (code, out, err) = run(Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            MOUNT_SCRIPT,
            "sh",
        ])
        .arg(d.path())
        .arg(outlivectl()));
    assert_eq!(code, 0, "mount script failed:\n{out}\n{err}");
    let mut got: HashMap<String, serde_json::Value> = HashMap::new();
    for chunk in out.split("=== ").filter(|c| !c.trim().is_empty()) {
        let (name, json) = chunk.split_once('\n').unwrap();
        got.insert(
            name.to_string(),
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{name}: {e}: {json}")),
        );
    }
    let expect = [
        (
            "tmpfs",
            "local-volatile",
            true,
            "tmpfs",
            "fstype+magic",
            Some("0x1021994"),
        ),
        (
            "ext4",
            "local-persistent",
            true,
            "ext4",
            "fstype+magic",
            Some("0xef53"),
        ),
        (
            "xfs",
            "local-persistent",
            true,
            "xfs",
            "fstype+magic",
            Some("0x58465342"),
        ),
        (
            "btrfs",
            "local-persistent",
            true,
            "btrfs",
            "fstype+magic",
            Some("0x9123683e"),
        ),
        (
            "fuse",
            "unknown",
            false,
            "fuse",
            "unrecognised",
            Some("0x65735546"),
        ),
        (
            "ovl/merged",
            "local-persistent",
            true,
            "overlay",
            "overlay-upper",
            Some("0x794c7630"),
        ),
        (
            "with space/inner",
            "local-volatile",
            true,
            "tmpfs",
            "fstype+magic",
            Some("0x1021994"),
        ),
    ];
    for (name, class, local, fstype, rule, magic) in expect {
        let p = &got
            .get(name)
            .unwrap_or_else(|| panic!("no report for {name}:\n{out}"))["path"];
        assert_eq!(p["class"], class, "{name}: {p}");
        assert_eq!(p["host_local"], local, "{name}: {p}");
        assert_eq!(p["fstype"], fstype, "{name}: {p}");
        assert_eq!(p["rule"], rule, "{name}: {p}");
        assert_eq!(p["magic"].as_str(), magic, "{name}: {p}");
        assert_eq!(p["read_only"], false, "{name}: {p}");
    }
    // bindfs mounts as plain `fuse` (no subtype) with the source directory as its source:
    // nothing positively recognises it, so it is not host-local.
    let fuse = &got["fuse"]["path"];
    assert!(
        fuse["source"].as_str().unwrap().ends_with("/fuse-src"),
        "{fuse}"
    );
    let ovl = &got["ovl/merged"]["path"];
    assert_eq!(
        ovl["via"]["fstype"], "ext4",
        "the overlay was resolved through its upper dir: {ovl}"
    );
    let spaced = &got["with space/inner"]["path"];
    assert!(
        spaced["mount_point"]
            .as_str()
            .unwrap()
            .ends_with("/with space"),
        "{spaced}"
    );
}
