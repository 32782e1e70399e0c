//! The mount table (SPEC H-3 step 1): parsing `/proc/self/mountinfo` and finding the mount
//! that contains a path.
//!
//! Format (proc(5)): `id parent major:minor root mount_point mount_options [optional…] - fstype
//! source super_options`. Paths are escaped with octal `\040` (space), `\011` (tab), `\012`
//! (newline) and `\134` (backslash). The parser is pure and never panics: a malformed line is
//! skipped and counted.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

/// One mount as the kernel describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    pub major: u32,
    pub minor: u32,
    /// The root of the mount within its filesystem (bind mounts show a subdirectory).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `nosuid`, …).
    pub mount_options: String,
    /// The fstype before any `.subtype` (`fuse` for `fuse.sshfs`).
    pub fstype: String,
    /// FUSE subtype (`sshfs` for `fuse.sshfs`).
    pub subtype: Option<String>,
    pub source: String,
    /// Superblock options (`upperdir=…`, `trans=virtio`, …).
    pub super_options: String,
}

impl MountEntry {
    /// `fstype.subtype` as the kernel wrote it.
    pub fn full_fstype(&self) -> String {
        match &self.subtype {
            Some(s) => format!("{}.{}", self.fstype, s),
            None => self.fstype.clone(),
        }
    }

    /// Whether the mount is read-only (per-mount or superblock `ro`).
    pub fn read_only(&self) -> bool {
        has_flag(&self.mount_options, "ro") || has_flag(&self.super_options, "ro")
    }

    /// The value of a superblock option `key=value` (first occurrence).
    pub fn super_option(&self, key: &str) -> Option<&str> {
        option_value(&self.super_options, key)
    }

    /// Whether a superblock option is present as a bare flag or `key=…`.
    pub fn has_super_option(&self, key: &str) -> bool {
        has_flag(&self.super_options, key) || option_value(&self.super_options, key).is_some()
    }
}

fn has_flag(opts: &str, flag: &str) -> bool {
    opts.split(',').any(|o| o == flag)
}

fn option_value<'a>(opts: &'a str, key: &str) -> Option<&'a str> {
    // Option values may themselves contain commas only for overlay lower dirs, which use ':'.
    opts.split(',')
        .find_map(|o| o.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Decode the octal escapes of mountinfo into raw bytes. An escape that is not three octal
/// digits is kept literally.
pub fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if v <= 0xff {
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn unescape_path(s: &str) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape(s)))
}

fn unescape_string(s: &str) -> String {
    String::from_utf8_lossy(&unescape(s)).into_owned()
}

/// Parse one line; None when malformed.
pub fn parse_line(line: &str) -> Option<MountEntry> {
    let mut it = line.split(' ');
    let mount_id = it.next()?.parse().ok()?;
    let parent_id = it.next()?.parse().ok()?;
    let (maj, min) = it.next()?.split_once(':')?;
    let root = unescape_path(it.next()?);
    let mount_point = unescape_path(it.next()?);
    let mount_options = it.next()?.to_string();
    // Optional fields until the lone "-" separator.
    loop {
        match it.next()? {
            "-" => break,
            _ => continue,
        }
    }
    let full_type = unescape_string(it.next()?);
    let source = unescape_string(it.next()?);
    let super_options = it.next().map(unescape_string).unwrap_or_default();
    if full_type.is_empty() || !mount_point.is_absolute() {
        return None;
    }
    let (fstype, subtype) = match full_type.split_once('.') {
        Some((t, s)) if t == "fuse" || t == "fuseblk" => (t.to_string(), Some(s.to_string())),
        _ => (full_type, None),
    };
    Some(MountEntry {
        mount_id,
        parent_id,
        major: maj.parse().ok()?,
        minor: min.parse().ok()?,
        root,
        mount_point,
        mount_options,
        fstype,
        subtype,
        source,
        super_options,
    })
}

/// A parsed mount table, in kernel order (later entries are mounted over earlier ones).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountTable {
    pub entries: Vec<MountEntry>,
    /// Lines that could not be parsed.
    pub malformed: usize,
}

impl MountTable {
    /// Parse the text of a mountinfo file.
    pub fn parse(text: &str) -> MountTable {
        let mut t = MountTable::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match parse_line(line) {
                Some(e) => t.entries.push(e),
                None => t.malformed += 1,
            }
        }
        t
    }

    /// Read this process's mount table.
    #[cfg(target_os = "linux")]
    pub fn read_own() -> std::io::Result<MountTable> {
        // Not read_to_string: a mount point with invalid UTF-8 is escaped by the kernel only for
        // the four special bytes, so the file may hold arbitrary bytes.
        let bytes = std::fs::read("/proc/self/mountinfo")?;
        Ok(MountTable::parse(&String::from_utf8_lossy(&bytes)))
    }

    /// The mount containing `path` (which should be absolute and normalised): the longest
    /// mount-point prefix by whole components; the last entry at a mount point wins.
    pub fn find(&self, path: &Path) -> Option<&MountEntry> {
        let mut best: Option<(&MountEntry, usize)> = None;
        for e in &self.entries {
            if let Some(depth) = prefix_depth(&e.mount_point, path)
                && best.is_none_or(|(_, d)| depth >= d)
            {
                best = Some((e, depth));
            }
        }
        best.map(|(e, _)| e)
    }

    /// Entry by mount id.
    pub fn by_id(&self, id: u32) -> Option<&MountEntry> {
        self.entries.iter().rev().find(|e| e.mount_id == id)
    }
}

/// The mount table of this process, re-read only when the kernel reports a change: after a
/// mount or unmount in our namespace, poll(2) on an open `/proc/self/mountinfo` reports
/// `POLLPRI` (proc(5)), and polling acknowledges the change.
#[cfg(target_os = "linux")]
#[derive(Default)]
pub struct MountTableCache {
    file: Option<std::fs::File>,
    table: std::sync::Arc<MountTable>,
}

#[cfg(target_os = "linux")]
impl MountTableCache {
    /// An empty cache; the first call reads the table.
    pub fn new() -> MountTableCache {
        MountTableCache::default()
    }

    /// The current table.
    pub fn current(&mut self) -> std::io::Result<std::sync::Arc<MountTable>> {
        use std::io::{Read, Seek, SeekFrom};
        use std::os::fd::AsFd;
        let changed = match &self.file {
            None => {
                self.file = Some(std::fs::File::open("/proc/self/mountinfo")?);
                true
            }
            Some(f) => {
                use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
                let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLPRI)];
                match poll(&mut fds, PollTimeout::ZERO) {
                    Ok(n) => n > 0,
                    // Cannot tell: read it again.
                    Err(_) => true,
                }
            }
        };
        if changed {
            let f = self.file.as_mut().expect("opened above");
            f.seek(SeekFrom::Start(0))?;
            let mut bytes = Vec::with_capacity(8192);
            f.read_to_end(&mut bytes)?;
            self.table = std::sync::Arc::new(MountTable::parse(&String::from_utf8_lossy(&bytes)));
        }
        Ok(std::sync::Arc::clone(&self.table))
    }
}

/// Number of components of `mount_point` if it is a whole-component prefix of `path`.
fn prefix_depth(mount_point: &Path, path: &Path) -> Option<usize> {
    let mut p = path.components();
    let mut depth = 0;
    for c in mount_point.components() {
        if p.next()? != c {
            return None;
        }
        depth += 1;
    }
    Some(depth)
}

/// Normalise an absolute path lexically (`.` and `..` resolved without touching the
/// filesystem, repeated slashes removed). Used where the path must not be touched (an
/// unprivileged `ClassifyPath`) and for overlay dirs from the mount table.
pub fn normalize_lexically(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    out
}

/// The path as display text (lossy for non-UTF-8 bytes).
pub fn display_path(p: &Path) -> String {
    String::from_utf8_lossy(p.as_os_str().as_bytes()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h3_parses_a_line_with_optional_fields() {
        let l = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:7 - ext3 /dev/root rw,errors=continue";
        let e = parse_line(l).unwrap();
        assert_eq!((e.mount_id, e.parent_id, e.major, e.minor), (36, 35, 98, 0));
        assert_eq!(e.root, Path::new("/mnt1"));
        assert_eq!(e.mount_point, Path::new("/mnt2"));
        assert_eq!(e.fstype, "ext3");
        assert_eq!(e.source, "/dev/root");
        assert!(!e.read_only());
    }

    #[test]
    fn h3_octal_escapes_are_decoded() {
        assert_eq!(unescape(r"/a\040b\011c\012d\134e"), b"/a b\tc\nd\\e");
        assert_eq!(unescape(r"\04"), b"\\04");
        assert_eq!(unescape(r"\999"), b"\\999");
        assert_eq!(unescape(r"end\"), b"end\\");
        let l = r"50 27 0:40 / /mnt/my\040disk rw - ext4 /dev/sdb1 rw";
        assert_eq!(
            parse_line(l).unwrap().mount_point,
            Path::new("/mnt/my disk")
        );
    }

    #[test]
    fn h3_fuse_subtype_is_split() {
        let e = parse_line("60 27 0:50 / /home/u/remote rw - fuse.sshfs u@host:/srv rw,user_id=0")
            .unwrap();
        assert_eq!(
            (e.fstype.as_str(), e.subtype.as_deref()),
            ("fuse", Some("sshfs"))
        );
        assert_eq!(e.full_fstype(), "fuse.sshfs");
        // Only fuse types have subtypes; other dotted names are kept whole.
        let e = parse_line("61 27 0:51 / /x rw - ceph.fs src rw").unwrap();
        assert_eq!((e.fstype.as_str(), e.subtype), ("ceph.fs", None));
    }

    #[test]
    fn h3_malformed_lines_are_skipped_never_panic() {
        let t = MountTable::parse(
            "garbage\n1 2 3\n27 1 254:0 / / rw - ext4 /dev/vda rw\n\n28 27 x:y / /a rw - ext4 s o\n29 27 0:1 / rel rw - ext4 s o\n30 27 0:1 / /b rw shared:1\n",
        );
        assert_eq!(t.entries.len(), 1);
        assert_eq!(t.malformed, 5);
    }

    #[test]
    fn h3_longest_prefix_by_component_and_last_mount_wins() {
        let t = MountTable::parse(
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
             2 1 0:2 / /mnt rw - tmpfs tmpfs rw\n\
             3 1 0:3 / /mnt/data rw - xfs /dev/sdb rw\n\
             4 1 0:4 / /mnt rw - btrfs /dev/sdc rw\n",
        );
        assert_eq!(t.find(Path::new("/mnt/data/x")).unwrap().fstype, "xfs");
        assert_eq!(t.find(Path::new("/mnt/database")).unwrap().fstype, "btrfs");
        assert_eq!(t.find(Path::new("/mnt")).unwrap().fstype, "btrfs");
        assert_eq!(t.find(Path::new("/etc")).unwrap().fstype, "ext4");
        assert_eq!(MountTable::default().find(Path::new("/")), None);
    }

    #[test]
    fn lexical_normalisation() {
        assert_eq!(
            normalize_lexically(Path::new("/a/./b/../c//d/")),
            Path::new("/a/c/d")
        );
        assert_eq!(normalize_lexically(Path::new("/../..")), Path::new("/"));
    }
}
