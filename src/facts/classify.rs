//! Filesystem classification (SPEC H-3, H-4): which of six classes a path's filesystem is, the
//! rule that decided it, and the evidence.
//!
//! The decision is a pure function of the mount table and what a [`FsProbe`] reports; the
//! probe that touches the kernel lives in `probe.rs` (statfs on the facts worker thread, under
//! a timeout). Order (Linux), first decisive step wins:
//!
//! 1. the mount containing the path (longest mount-point prefix, last mount wins);
//! 2. fstype/subtype table; `network`, `host-shared`, `pseudo` and `autofs` stop here, without
//!    statfs (a hung NFS server must not hang the agent);
//! 3. statfs(2) `f_type` magic, compared as u32; where table and magic disagree the more
//!    specific mount-table entry wins and both are recorded;
//! 4. source syntax (`host:/path`, `//host/share`) ⇒ `network`;
//! 5. overlay: `volatile` ⇒ `local-volatile`; else the class of `upperdir` (or, without one, the
//!    first `lowerdir`) resolved against our own mount table;
//! 6. otherwise `unknown`.
//!
//! Unknown is never host-local (H-4: fail-closed).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::mountinfo::{MountEntry, MountTable, display_path, normalize_lexically};

/// The six classes of H-3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsClass {
    LocalPersistent,
    LocalVolatile,
    Network,
    HostShared,
    Pseudo,
    Unknown,
}

impl FsClass {
    /// The class as written in reports and audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            FsClass::LocalPersistent => "local-persistent",
            FsClass::LocalVolatile => "local-volatile",
            FsClass::Network => "network",
            FsClass::HostShared => "host-shared",
            FsClass::Pseudo => "pseudo",
            FsClass::Unknown => "unknown",
        }
    }

    /// H-4: host-local iff local-persistent or local-volatile.
    pub fn is_host_local(self) -> bool {
        matches!(self, FsClass::LocalPersistent | FsClass::LocalVolatile)
    }
}

impl fmt::Display for FsClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The rule that decided a classification (a closed vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// The fstype table decided without statfs (network, host-shared, pseudo).
    Fstype,
    /// An automount point: never statfs'd (it would trigger the mount).
    Autofs,
    /// The fstype table's local class, confirmed by the statfs magic.
    FstypeMagic,
    /// Table and magic disagree; the mount-table entry is more specific and wins.
    FstypeOverMagic,
    /// The fstype is in no table; the magic decided.
    Magic,
    /// The mount source names a remote host.
    SourceSyntax,
    /// An overlay mounted with `volatile`.
    OverlayVolatile,
    /// An overlay, classified by its upper directory.
    OverlayUpper,
    /// An overlay without upper directory, classified by its first lower directory.
    OverlayLower,
    /// An overlay whose upper (or lower) directory is not visible from here (containers).
    OverlayUpperUnresolvable,
    /// The path was classified from the mount table only, without touching it (unprivileged
    /// callers of `ClassifyPath`).
    MountTableOnly,
    /// statfs (or resolving the path) did not answer in time, or recently timed out.
    Timeout,
    /// statfs failed.
    StatfsError,
    /// Nothing recognised the filesystem.
    Unrecognised,
    /// No mount in the table contains the path.
    NoMount,
    /// macOS: statfs `MNT_LOCAL` decided (the kernel's verdict).
    MntLocal,
}

impl Rule {
    /// The rule as written in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Fstype => "fstype",
            Rule::Autofs => "autofs",
            Rule::FstypeMagic => "fstype+magic",
            Rule::FstypeOverMagic => "fstype-over-magic",
            Rule::Magic => "magic",
            Rule::SourceSyntax => "source-syntax",
            Rule::OverlayVolatile => "overlay-volatile",
            Rule::OverlayUpper => "overlay-upper",
            Rule::OverlayLower => "overlay-lower",
            Rule::OverlayUpperUnresolvable => "overlay-upper-unresolvable",
            Rule::MountTableOnly => "mount-table-only",
            Rule::Timeout => "timeout",
            Rule::StatfsError => "statfs-error",
            Rule::Unrecognised => "unrecognised",
            Rule::NoMount => "no-mount",
            Rule::MntLocal => "mnt-local",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the mount table and statfs said about the mount.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Evidence {
    pub fstype: String,
    pub subtype: Option<String>,
    pub source: String,
    pub mount_point: PathBuf,
    pub mount_id: Option<u32>,
    /// statfs `f_type`, when statfs ran and answered.
    pub magic: Option<u32>,
    pub read_only: bool,
    /// The class the fstype table gave, if any.
    pub table_class: Option<FsClass>,
    /// The class the magic gave, if any.
    pub magic_class: Option<FsClass>,
    /// A failure detail (statfs error text).
    pub detail: Option<String>,
}

/// A classification: class, deciding rule, evidence; for overlays, the classification of the
/// directory it was resolved through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    pub path: PathBuf,
    pub class: FsClass,
    pub rule: Rule,
    pub evidence: Evidence,
    pub via: Option<Box<Classification>>,
}

impl Classification {
    /// H-4.
    pub fn host_local(&self) -> bool {
        self.class.is_host_local()
    }

    /// The report of `outlivectl host --path … --json` and `ClassifyPath`.
    pub fn to_json(&self) -> serde_json::Value {
        let e = &self.evidence;
        let mut v = serde_json::json!({
            "path": display_path(&self.path),
            "class": self.class.as_str(),
            "host_local": self.host_local(),
            "rule": self.rule.as_str(),
            "fstype": e.fstype,
            "subtype": e.subtype,
            "source": e.source,
            "mount_point": display_path(&e.mount_point),
            "mount_id": e.mount_id,
            "magic": e.magic.map(|m| format!("{m:#x}")),
            "read_only": e.read_only,
        });
        if let Some(d) = &e.detail {
            v["detail"] = d.clone().into();
        }
        if let Some(via) = &self.via {
            v["via"] = via.to_json();
        }
        v
    }

    fn unknown(path: &Path, rule: Rule, evidence: Evidence) -> Classification {
        Classification {
            path: path.to_path_buf(),
            class: FsClass::Unknown,
            rule,
            evidence,
            via: None,
        }
    }
}

/// What statfs said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatfsOutcome {
    /// `f_type` and whether `ST_RDONLY` is set.
    Magic { f_type: u32, read_only: bool },
    /// No answer within the timeout, or the mount timed out recently.
    Timeout,
    /// statfs failed.
    Failed(String),
    /// The caller may not touch the path (unprivileged classification).
    Skipped,
}

/// The effects classification needs.
pub trait FsProbe {
    /// statfs(2) of `path`, which lies on `mount`.
    fn statfs(&self, path: &Path, mount: &MountEntry) -> StatfsOutcome;
    /// Whether `path` exists as seen from this process; None when it was not checked.
    fn exists(&self, path: &Path) -> Option<bool>;
}

/// A probe that touches nothing (unprivileged `ClassifyPath`, golden tests of step 2).
pub struct NoTouch;

impl FsProbe for NoTouch {
    fn statfs(&self, _: &Path, _: &MountEntry) -> StatfsOutcome {
        StatfsOutcome::Skipped
    }
    fn exists(&self, _: &Path) -> Option<bool> {
        None
    }
}

// ---- tables ------------------------------------------------------------------------------

/// Step 2: the class an fstype (and FUSE subtype) names, when the table knows it.
pub fn table_class(m: &MountEntry) -> Option<FsClass> {
    use FsClass::*;
    if m.fstype == "fuse" || m.fstype == "fuseblk" {
        return match m.subtype.as_deref() {
            Some(
                "sshfs" | "glusterfs" | "s3fs" | "rclone" | "ceph" | "ceph-fuse" | "gcsfuse"
                | "goofys" | "juicefs" | "mfs" | "lizardfs" | "moosefs" | "davfs" | "davfs2"
                | "curlftpfs" | "afpfs" | "smbnetfs" | "blobfuse" | "blobfuse2" | "cvmfs2",
            ) => Some(Network),
            Some("vmhgfs-fuse" | "vmhgfs") => Some(HostShared),
            // Any other subtype (bindfs, ntfs-3g, encfs, gocryptfs, …): not positively
            // recognised. It may be a view of anything, including a network share.
            _ => None,
        };
    }
    Some(match m.fstype.as_str() {
        "ext2" | "ext3" | "ext4" | "xfs" | "btrfs" | "zfs" | "f2fs" | "bcachefs" | "exfat"
        | "vfat" | "msdos" | "ntfs3" | "ntfs" | "iso9660" | "squashfs" | "erofs" | "apfs"
        | "hfs" | "hfsplus" | "jfs" | "reiserfs" | "nilfs2" | "udf" | "ufs" | "cramfs" => {
            LocalPersistent
        }
        "tmpfs" | "ramfs" => LocalVolatile,
        "nfs" | "nfs4" | "cifs" | "smb3" | "smbfs" | "ceph" | "afs" | "coda" | "ncp" | "ncpfs"
        | "lustre" | "gpfs" | "beegfs" | "gfs2" | "ocfs2" | "glusterfs" | "orangefs" | "pvfs2"
        | "davfs" | "panfs" | "cvmfs" => Network,
        "9p" => {
            if is_host_9p(m) {
                HostShared
            } else {
                Network
            }
        }
        "virtiofs" | "drvfs" | "vboxsf" | "vmhgfs" | "prl_fs" | "prl_fsd" | "vmblock" => HostShared,
        "proc" | "sysfs" | "cgroup" | "cgroup2" | "devpts" | "debugfs" | "tracefs" | "bpf"
        | "nsfs" | "securityfs" | "pstore" | "efivarfs" | "configfs" | "fusectl" | "mqueue"
        | "hugetlbfs" | "binfmt_misc" | "rpc_pipefs" | "selinuxfs" | "devtmpfs" | "sockfs"
        | "pipefs" | "anon_inodefs" | "nfsd" | "rootfs" | "devfs" => Pseudo,
        _ => return None,
    })
}

/// 9p is shared with a hypervisor (virtio) or with Windows (WSL2 serves drives as
/// `aname=drvfs` and its driver store as `aname=drivers` over 9p), else a network filesystem.
fn is_host_9p(m: &MountEntry) -> bool {
    m.super_option("trans") == Some("virtio")
        || m.source == "drvfs"
        || m.super_options
            .split([',', ';'])
            .any(|o| o == "aname=drvfs" || o == "aname=drivers")
}

// Magic numbers from linux/magic.h and the filesystems' own headers.
pub const EXT_MAGIC: u32 = 0xEF53;
pub const XFS_MAGIC: u32 = 0x5846_5342;
pub const BTRFS_MAGIC: u32 = 0x9123_683E;
pub const ZFS_MAGIC: u32 = 0x2FC1_2FC1;
pub const F2FS_MAGIC: u32 = 0xF2F5_2010;
pub const BCACHEFS_MAGIC: u32 = 0xCA45_1A4E;
pub const EXFAT_MAGIC: u32 = 0x2011_BAB0;
pub const MSDOS_MAGIC: u32 = 0x4D44;
pub const NTFS3_MAGIC: u32 = 0x7366_746E;
pub const NTFS_MAGIC: u32 = 0x5346_544E;
pub const ISOFS_MAGIC: u32 = 0x9660;
pub const SQUASHFS_MAGIC: u32 = 0x7371_7368;
pub const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
pub const HFSPLUS_MAGIC: u32 = 0x482B;
pub const HFS_MAGIC: u32 = 0x4244;
pub const JFS_MAGIC: u32 = 0x3153_464A;
pub const REISERFS_MAGIC: u32 = 0x5265_4973;
pub const NILFS_MAGIC: u32 = 0x3434;
pub const UDF_MAGIC: u32 = 0x1501_3346;
pub const CRAMFS_MAGIC: u32 = 0x28CD_3D45;
pub const TMPFS_MAGIC: u32 = 0x0102_1994;
pub const RAMFS_MAGIC: u32 = 0x8584_58F6;
pub const NFS_MAGIC: u32 = 0x6969;
pub const SMB_MAGIC: u32 = 0x517B;
pub const CIFS_MAGIC: u32 = 0xFF53_4D42;
pub const SMB2_MAGIC: u32 = 0xFE53_4D42;
pub const CEPH_MAGIC: u32 = 0x00C3_6400;
pub const AFS_MAGIC: u32 = 0x5346_414F;
pub const AFS_FS_MAGIC: u32 = 0x6B41_4653;
pub const CODA_MAGIC: u32 = 0x7375_7245;
pub const NCP_MAGIC: u32 = 0x564C;
pub const V9FS_MAGIC: u32 = 0x0102_1997;
pub const GFS2_MAGIC: u32 = 0x0116_1970;
pub const LUSTRE_MAGIC: u32 = 0x0BD0_0BD0;
pub const GPFS_MAGIC: u32 = 0x4750_4653;
pub const OCFS2_MAGIC: u32 = 0x7461_636F;
pub const BEEGFS_MAGIC: u32 = 0x1983_0326;
pub const VBOXSF_MAGIC: u32 = 0x786F_4256;
pub const VMHGFS_MAGIC: u32 = 0xBACB_ACBC;
pub const PROC_MAGIC: u32 = 0x9FA0;
pub const SYSFS_MAGIC: u32 = 0x6265_6572;
pub const CGROUP_MAGIC: u32 = 0x0027_E0EB;
pub const CGROUP2_MAGIC: u32 = 0x6367_7270;
pub const DEVPTS_MAGIC: u32 = 0x1CD1;
pub const DEBUGFS_MAGIC: u32 = 0x6462_6720;
pub const TRACEFS_MAGIC: u32 = 0x7472_6163;
pub const BPF_MAGIC: u32 = 0xCAFE_4A11;
pub const NSFS_MAGIC: u32 = 0x6E73_6673;
pub const SECURITYFS_MAGIC: u32 = 0x7363_6673;
pub const PSTORE_MAGIC: u32 = 0x6165_676C;
pub const EFIVARFS_MAGIC: u32 = 0xDE5E_81E4;
pub const CONFIGFS_MAGIC: u32 = 0x6265_6570;
pub const FUSECTL_MAGIC: u32 = 0x6573_5543;
pub const MQUEUE_MAGIC: u32 = 0x1980_0202;
pub const HUGETLBFS_MAGIC: u32 = 0x9584_58F6;
pub const BINFMTFS_MAGIC: u32 = 0x4249_4E4D;
pub const SELINUX_MAGIC: u32 = 0xF97C_FF8C;
/// Not decisive: FUSE carries anything from a local bind view to a remote share.
pub const FUSE_MAGIC: u32 = 0x6573_5546;
/// Not decisive: an overlay is classified by its upper directory (step 5).
pub const OVERLAYFS_MAGIC: u32 = 0x794C_7630;
/// Never probed: statfs would trigger the automount.
pub const AUTOFS_MAGIC: u32 = 0x0187;

/// Step 3: the class a statfs magic names (None: not decisive or not known).
pub fn magic_class(magic: u32) -> Option<FsClass> {
    use FsClass::*;
    Some(match magic {
        EXT_MAGIC | XFS_MAGIC | BTRFS_MAGIC | ZFS_MAGIC | F2FS_MAGIC | BCACHEFS_MAGIC
        | EXFAT_MAGIC | MSDOS_MAGIC | NTFS3_MAGIC | NTFS_MAGIC | ISOFS_MAGIC | SQUASHFS_MAGIC
        | EROFS_MAGIC | HFSPLUS_MAGIC | HFS_MAGIC | JFS_MAGIC | REISERFS_MAGIC | NILFS_MAGIC
        | UDF_MAGIC | CRAMFS_MAGIC => LocalPersistent,
        TMPFS_MAGIC | RAMFS_MAGIC => LocalVolatile,
        NFS_MAGIC | SMB_MAGIC | CIFS_MAGIC | SMB2_MAGIC | CEPH_MAGIC | AFS_MAGIC | AFS_FS_MAGIC
        | CODA_MAGIC | NCP_MAGIC | V9FS_MAGIC | GFS2_MAGIC | LUSTRE_MAGIC | GPFS_MAGIC
        | OCFS2_MAGIC | BEEGFS_MAGIC => Network,
        VBOXSF_MAGIC | VMHGFS_MAGIC => HostShared,
        PROC_MAGIC | SYSFS_MAGIC | CGROUP_MAGIC | CGROUP2_MAGIC | DEVPTS_MAGIC | DEBUGFS_MAGIC
        | TRACEFS_MAGIC | BPF_MAGIC | NSFS_MAGIC | SECURITYFS_MAGIC | PSTORE_MAGIC
        | EFIVARFS_MAGIC | CONFIGFS_MAGIC | FUSECTL_MAGIC | MQUEUE_MAGIC | HUGETLBFS_MAGIC
        | BINFMTFS_MAGIC | SELINUX_MAGIC => Pseudo,
        _ => return None,
    })
}

/// Step 4: `host:/path` (NFS style, including `[v6addr]:/path`) or `//host/share` (SMB).
pub fn source_names_remote_host(source: &str) -> bool {
    if let Some(rest) = source.strip_prefix("//") {
        return rest.split('/').next().is_some_and(|h| !h.is_empty());
    }
    let split = if source.starts_with('[') {
        source.find("]:").map(|i| (&source[..=i], &source[i + 2..]))
    } else {
        source.split_once(':')
    };
    match split {
        Some((host, path)) => !host.is_empty() && !host.contains('/') && path.starts_with('/'),
        None => false,
    }
}

fn evidence_of(m: &MountEntry) -> Evidence {
    Evidence {
        fstype: m.fstype.clone(),
        subtype: m.subtype.clone(),
        source: m.source.clone(),
        mount_point: m.mount_point.clone(),
        mount_id: Some(m.mount_id),
        magic: None,
        read_only: m.read_only(),
        table_class: None,
        magic_class: None,
        detail: None,
    }
}

/// Classify `path` (absolute, already resolved by the caller where it may be touched) against
/// `table`, using `probe` for statfs and existence checks.
pub fn classify(table: &MountTable, path: &Path, probe: &dyn FsProbe) -> Classification {
    match table.find(path) {
        Some(m) => classify_on(table, path, m, probe, 0),
        None => Classification::unknown(path, Rule::NoMount, Evidence::default()),
    }
}

/// Overlays may stack; a longer chain than this is treated as unresolvable.
const MAX_OVERLAY_DEPTH: usize = 4;

fn classify_on(
    table: &MountTable,
    path: &Path,
    m: &MountEntry,
    probe: &dyn FsProbe,
    depth: usize,
) -> Classification {
    let mut ev = evidence_of(m);
    let decided = |class, rule, ev| Classification {
        path: path.to_path_buf(),
        class,
        rule,
        evidence: ev,
        via: None,
    };

    // Step 2.
    if m.fstype == "autofs" {
        return decided(FsClass::Unknown, Rule::Autofs, ev);
    }
    let tc = table_class(m);
    ev.table_class = tc;
    if let Some(c @ (FsClass::Network | FsClass::HostShared | FsClass::Pseudo)) = tc {
        return decided(c, Rule::Fstype, ev);
    }

    // Step 3.
    match probe.statfs(path, m) {
        StatfsOutcome::Timeout => return decided(FsClass::Unknown, Rule::Timeout, ev),
        StatfsOutcome::Failed(e) => {
            ev.detail = Some(e);
            return decided(FsClass::Unknown, Rule::StatfsError, ev);
        }
        StatfsOutcome::Skipped => {
            if let Some(c) = tc {
                return decided(c, Rule::MountTableOnly, ev);
            }
        }
        StatfsOutcome::Magic { f_type, read_only } => {
            ev.magic = Some(f_type);
            ev.read_only |= read_only;
            let mc = magic_class(f_type);
            ev.magic_class = mc;
            match (tc, mc) {
                (Some(t), Some(mg)) if t == mg => return decided(t, Rule::FstypeMagic, ev),
                // The table knows this fstype (always a local class here) and the magic
                // either says something else or nothing decisive: the more specific
                // mount-table entry wins, the evidence records both.
                (Some(t), _) => return decided(t, Rule::FstypeOverMagic, ev),
                (None, Some(mg)) => return decided(mg, Rule::Magic, ev),
                (None, None) => {}
            }
        }
    }

    // Step 4.
    if source_names_remote_host(&m.source) {
        return decided(FsClass::Network, Rule::SourceSyntax, ev);
    }

    // Step 5.
    if m.fstype == "overlay" {
        if m.has_super_option("volatile") {
            return decided(FsClass::LocalVolatile, Rule::OverlayVolatile, ev);
        }
        let (dir, rule) = match overlay_upper(m) {
            Some(u) => (Some(u), Rule::OverlayUpper),
            None => (overlay_first_lower(m), Rule::OverlayLower),
        };
        let unresolvable = |ev| decided(FsClass::Unknown, Rule::OverlayUpperUnresolvable, ev);
        let Some(dir) = dir else {
            return unresolvable(ev);
        };
        if depth >= MAX_OVERLAY_DEPTH || !dir.is_absolute() {
            return unresolvable(ev);
        }
        let dir = normalize_lexically(&dir);
        let Some(dm) = table.find(&dir) else {
            return unresolvable(ev);
        };
        // The directory resolves to the overlay itself (a container sees only its own root),
        // or does not exist in our view: the upper layer is not visible to us.
        if dm.mount_id == m.mount_id && dm.mount_point == m.mount_point {
            return unresolvable(ev);
        }
        if probe.exists(&dir) == Some(false) {
            ev.detail = Some(format!(
                "{} is not visible from this mount namespace",
                display_path(&dir)
            ));
            return unresolvable(ev);
        }
        let inner = classify_on(table, &dir, dm, probe, depth + 1);
        let mut c = decided(inner.class, rule, ev);
        c.via = Some(Box::new(inner));
        return c;
    }

    // Step 6.
    decided(FsClass::Unknown, Rule::Unrecognised, ev)
}

fn overlay_upper(m: &MountEntry) -> Option<PathBuf> {
    m.super_option("upperdir")
        .map(|s| PathBuf::from(unescape_overlay(s)))
}

/// The first lower directory: `lowerdir=/a:/b` (colons inside a path escaped as `\:`), or
/// the newer `lowerdir+=/a,lowerdir+=/b` form.
fn overlay_first_lower(m: &MountEntry) -> Option<PathBuf> {
    if let Some(l) = m.super_option("lowerdir") {
        let mut first = String::new();
        let mut chars = l.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => first.extend(chars.next()),
                ':' => break,
                c => first.push(c),
            }
        }
        return (!first.is_empty()).then(|| PathBuf::from(first));
    }
    m.super_options
        .split(',')
        .find_map(|o| o.strip_prefix("lowerdir+="))
        .map(|s| PathBuf::from(unescape_overlay(s)))
}

fn unescape_overlay(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.extend(chars.next());
        } else {
            out.push(c);
        }
    }
    out
}

/// macOS (H-3): the kernel's `MNT_LOCAL` verdict. Set ⇒ local-persistent unless the fstype is
/// a memory filesystem; clear ⇒ network. `f_fstypename` is the evidence. Platform-neutral so
/// that it is tested here.
pub fn classify_mnt_local(
    path: &Path,
    fstypename: &str,
    mnt_local: bool,
    read_only: bool,
    mount_point: &Path,
    source: &str,
) -> Classification {
    let memory = matches!(fstypename, "tmpfs" | "devfs" | "ramfs" | "fdesc" | "nullfs");
    let class = match (mnt_local, memory, fstypename) {
        (_, _, "devfs" | "fdesc") => FsClass::Pseudo,
        (_, _, "autofs") => FsClass::Unknown,
        (true, true, _) => FsClass::LocalVolatile,
        (true, false, _) => FsClass::LocalPersistent,
        (false, _, _) => FsClass::Network,
    };
    Classification {
        path: path.to_path_buf(),
        class,
        rule: Rule::MntLocal,
        evidence: Evidence {
            fstype: fstypename.to_string(),
            source: source.to_string(),
            mount_point: mount_point.to_path_buf(),
            read_only,
            ..Evidence::default()
        },
        via: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// A probe answering from a table; records every statfs call.
    #[derive(Default)]
    pub(crate) struct Scripted {
        pub magic: HashMap<PathBuf, StatfsOutcome>,
        pub default: Option<StatfsOutcome>,
        pub missing: Vec<PathBuf>,
        pub calls: RefCell<Vec<PathBuf>>,
    }

    impl FsProbe for Scripted {
        fn statfs(&self, path: &Path, mount: &MountEntry) -> StatfsOutcome {
            self.calls.borrow_mut().push(path.to_path_buf());
            self.magic
                .get(&mount.mount_point)
                .cloned()
                .or_else(|| self.default.clone())
                .unwrap_or(StatfsOutcome::Failed("not scripted".into()))
        }
        fn exists(&self, path: &Path) -> Option<bool> {
            Some(!self.missing.iter().any(|m| path.starts_with(m)))
        }
    }

    fn magic(f: u32) -> StatfsOutcome {
        StatfsOutcome::Magic {
            f_type: f,
            read_only: false,
        }
    }

    fn table(lines: &[&str]) -> MountTable {
        MountTable::parse(&lines.join("\n"))
    }

    #[test]
    fn h3_magic_truth_table() {
        use FsClass::*;
        let cases = [
            (EXT_MAGIC, Some(LocalPersistent)),
            (XFS_MAGIC, Some(LocalPersistent)),
            (BTRFS_MAGIC, Some(LocalPersistent)),
            (ZFS_MAGIC, Some(LocalPersistent)),
            (F2FS_MAGIC, Some(LocalPersistent)),
            (BCACHEFS_MAGIC, Some(LocalPersistent)),
            (EXFAT_MAGIC, Some(LocalPersistent)),
            (MSDOS_MAGIC, Some(LocalPersistent)),
            (NTFS3_MAGIC, Some(LocalPersistent)),
            (ISOFS_MAGIC, Some(LocalPersistent)),
            (SQUASHFS_MAGIC, Some(LocalPersistent)),
            (EROFS_MAGIC, Some(LocalPersistent)),
            (HFSPLUS_MAGIC, Some(LocalPersistent)),
            (TMPFS_MAGIC, Some(LocalVolatile)),
            (RAMFS_MAGIC, Some(LocalVolatile)),
            (NFS_MAGIC, Some(Network)),
            (SMB_MAGIC, Some(Network)),
            (CIFS_MAGIC, Some(Network)),
            (SMB2_MAGIC, Some(Network)),
            (CEPH_MAGIC, Some(Network)),
            (AFS_MAGIC, Some(Network)),
            (CODA_MAGIC, Some(Network)),
            (NCP_MAGIC, Some(Network)),
            (V9FS_MAGIC, Some(Network)),
            (GFS2_MAGIC, Some(Network)),
            (LUSTRE_MAGIC, Some(Network)),
            (GPFS_MAGIC, Some(Network)),
            (OCFS2_MAGIC, Some(Network)),
            (BEEGFS_MAGIC, Some(Network)),
            (VBOXSF_MAGIC, Some(HostShared)),
            (VMHGFS_MAGIC, Some(HostShared)),
            (PROC_MAGIC, Some(Pseudo)),
            (SYSFS_MAGIC, Some(Pseudo)),
            (CGROUP2_MAGIC, Some(Pseudo)),
            (DEVPTS_MAGIC, Some(Pseudo)),
            (DEBUGFS_MAGIC, Some(Pseudo)),
            (TRACEFS_MAGIC, Some(Pseudo)),
            (BPF_MAGIC, Some(Pseudo)),
            (NSFS_MAGIC, Some(Pseudo)),
            (FUSE_MAGIC, None),
            (OVERLAYFS_MAGIC, None),
            (AUTOFS_MAGIC, None),
            (0x1234_5678, None),
        ];
        for (m, want) in cases {
            assert_eq!(magic_class(m), want, "magic {m:#x}");
        }
        // The values the machine itself reports (measured: ext4 root, /proc, /dev/shm).
        assert_eq!(EXT_MAGIC, 0xef53);
        assert_eq!(PROC_MAGIC, 0x9fa0);
        assert_eq!(TMPFS_MAGIC, 0x1021994);
        // The constants that exist in libc agree with ours.
        assert_eq!(libc::NFS_SUPER_MAGIC as u32, NFS_MAGIC);
        assert_eq!(libc::XFS_SUPER_MAGIC as u32, XFS_MAGIC);
        assert_eq!(libc::BTRFS_SUPER_MAGIC as u32, BTRFS_MAGIC);
        assert_eq!(libc::TMPFS_MAGIC as u32, TMPFS_MAGIC);
        assert_eq!(libc::OVERLAYFS_SUPER_MAGIC as u32, OVERLAYFS_MAGIC);
        assert_eq!(libc::FUSE_SUPER_MAGIC as u32, FUSE_MAGIC);
        assert_eq!(libc::CGROUP2_SUPER_MAGIC as u32, CGROUP2_MAGIC);
        assert_eq!(libc::SMB_SUPER_MAGIC as u32, SMB_MAGIC);
    }

    #[test]
    fn h3_source_syntax() {
        for remote in [
            "server:/export",
            "10.0.0.5:/srv/nfs",
            "[fe80::1]:/x",
            "//fs01/share",
            "//fs01",
        ] {
            assert!(source_names_remote_host(remote), "{remote}");
        }
        for local in [
            "/dev/sda1",
            "C:\\",
            "tmpfs",
            "overlay",
            ":/x",
            "a/b:/c",
            "//",
            "none",
            "host:rel",
        ] {
            assert!(!source_names_remote_host(local), "{local}");
        }
    }

    #[test]
    fn h3_network_host_shared_pseudo_and_autofs_never_statfs() {
        let t = table(&[
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw",
            "2 1 0:50 / /nfs rw - nfs4 srv:/e rw",
            "3 1 0:51 / /vm rw - virtiofs share rw",
            "4 1 0:52 / /sys rw - sysfs sysfs rw",
            "5 1 0:53 / /auto rw - autofs systemd-1 rw",
            "6 1 0:54 / /ssh rw - fuse.sshfs u@h:/ rw",
            "7 1 0:55 / /p9 rw - 9p hostshare rw,trans=virtio",
            "8 1 0:56 / /p9net rw - 9p 10.0.0.1 rw,trans=tcp",
        ]);
        let probe = Scripted {
            default: Some(magic(EXT_MAGIC)),
            ..Default::default()
        };
        let cases = [
            ("/nfs/a", FsClass::Network, Rule::Fstype),
            ("/vm/a", FsClass::HostShared, Rule::Fstype),
            ("/sys/kernel", FsClass::Pseudo, Rule::Fstype),
            ("/auto/x", FsClass::Unknown, Rule::Autofs),
            ("/ssh/x", FsClass::Network, Rule::Fstype),
            ("/p9/x", FsClass::HostShared, Rule::Fstype),
            ("/p9net/x", FsClass::Network, Rule::Fstype),
        ];
        for (p, class, rule) in cases {
            let c = classify(&t, Path::new(p), &probe);
            assert_eq!((c.class, c.rule), (class, rule), "{p}");
        }
        assert!(
            probe.calls.borrow().is_empty(),
            "statfs was called: {:?}",
            probe.calls.borrow()
        );
    }

    #[test]
    fn h3_local_table_class_is_confirmed_by_magic() {
        let t = table(&[
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw",
            "2 1 0:2 / /run rw - tmpfs tmpfs rw",
        ]);
        let mut probe = Scripted::default();
        probe.magic.insert("/".into(), magic(EXT_MAGIC));
        probe.magic.insert("/run".into(), magic(TMPFS_MAGIC));
        let c = classify(&t, Path::new("/var/lib/outlive"), &probe);
        assert_eq!(
            (c.class, c.rule, c.evidence.magic),
            (FsClass::LocalPersistent, Rule::FstypeMagic, Some(0xef53))
        );
        assert!(c.host_local());
        let c = classify(&t, Path::new("/run/outlive"), &probe);
        assert_eq!(
            (c.class, c.rule),
            (FsClass::LocalVolatile, Rule::FstypeMagic)
        );
        assert!(c.host_local());
    }

    #[test]
    fn h3_table_and_magic_disagree_table_wins_and_both_recorded() {
        let t = table(&["1 0 8:1 / / rw - ext4 /dev/sda1 rw"]);
        let probe = Scripted {
            default: Some(magic(NFS_MAGIC)),
            ..Default::default()
        };
        let c = classify(&t, Path::new("/x"), &probe);
        assert_eq!(
            (c.class, c.rule),
            (FsClass::LocalPersistent, Rule::FstypeOverMagic)
        );
        assert_eq!(c.evidence.table_class, Some(FsClass::LocalPersistent));
        assert_eq!(c.evidence.magic_class, Some(FsClass::Network));
    }

    #[test]
    fn h3_unrecognised_fuse_subtype_is_unknown_with_fuse_magic_recorded() {
        let t = table(&[
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw",
            "2 1 0:60 / /b rw - fuse.bindfs /srv/b rw",
        ]);
        let probe = Scripted {
            default: Some(magic(FUSE_MAGIC)),
            ..Default::default()
        };
        let c = classify(&t, Path::new("/b/x"), &probe);
        assert_eq!(
            (c.class, c.rule, c.evidence.magic),
            (FsClass::Unknown, Rule::Unrecognised, Some(FUSE_MAGIC))
        );
        assert!(!c.host_local());
    }

    #[test]
    fn h3_magic_decides_unknown_fstype_then_source_syntax() {
        let t = table(&[
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw",
            "2 1 0:70 / /m rw - weirdfs /dev/sdx rw",
            "3 1 0:71 / /r rw - weirdfs host:/export rw",
        ]);
        let mut probe = Scripted::default();
        probe.magic.insert("/m".into(), magic(XFS_MAGIC));
        probe.magic.insert("/r".into(), magic(0xdead));
        let c = classify(&t, Path::new("/m"), &probe);
        assert_eq!((c.class, c.rule), (FsClass::LocalPersistent, Rule::Magic));
        let c = classify(&t, Path::new("/r"), &probe);
        assert_eq!((c.class, c.rule), (FsClass::Network, Rule::SourceSyntax));
    }

    #[test]
    fn h3_timeout_and_statfs_error_are_unknown() {
        let t = table(&["1 0 8:1 / / rw - ext4 /dev/sda1 rw"]);
        let c = classify(
            &t,
            Path::new("/x"),
            &Scripted {
                default: Some(StatfsOutcome::Timeout),
                ..Default::default()
            },
        );
        assert_eq!((c.class, c.rule), (FsClass::Unknown, Rule::Timeout));
        let c = classify(&t, Path::new("/x"), &Scripted::default());
        assert_eq!((c.class, c.rule), (FsClass::Unknown, Rule::StatfsError));
        assert!(c.evidence.detail.is_some());
    }

    #[test]
    fn h3_overlay_rules() {
        let t = table(&[
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw",
            "2 1 0:2 / /mnt/t rw - tmpfs tmpfs rw",
            "3 1 0:80 / /o1 rw - overlay overlay rw,lowerdir=/l,upperdir=/srv/up,workdir=/srv/w",
            "4 1 0:81 / /o2 rw - overlay overlay rw,lowerdir=/l,upperdir=/mnt/t/up,workdir=/mnt/t/w",
            "5 1 0:82 / /o3 rw - overlay overlay rw,lowerdir=/l,upperdir=/srv/up,workdir=/srv/w,volatile",
            "6 1 0:83 / /o4 rw - overlay overlay ro,lowerdir=/mnt/t/a\\:b:/x",
            "7 1 0:84 / /o5 rw - overlay overlay rw,lowerdir=/l,upperdir=/gone/up,workdir=/gone/w",
        ]);
        let mut probe = Scripted {
            missing: vec!["/gone".into()],
            ..Default::default()
        };
        probe.magic.insert("/".into(), magic(EXT_MAGIC));
        probe.magic.insert("/mnt/t".into(), magic(TMPFS_MAGIC));
        for m in ["/o1", "/o2", "/o3", "/o4", "/o5"] {
            probe.magic.insert(m.into(), magic(OVERLAYFS_MAGIC));
        }
        let cases = [
            ("/o1/a", FsClass::LocalPersistent, Rule::OverlayUpper),
            ("/o2/a", FsClass::LocalVolatile, Rule::OverlayUpper),
            ("/o3/a", FsClass::LocalVolatile, Rule::OverlayVolatile),
            ("/o4/a", FsClass::LocalVolatile, Rule::OverlayLower),
            ("/o5/a", FsClass::Unknown, Rule::OverlayUpperUnresolvable),
        ];
        for (p, class, rule) in cases {
            let c = classify(&t, Path::new(p), &probe);
            assert_eq!((c.class, c.rule), (class, rule), "{p}: {c:?}");
        }
        let c = classify(&t, Path::new("/o1/a"), &probe);
        let via = c.via.expect("overlay records what it resolved through");
        assert_eq!(via.path, Path::new("/srv/up"));
        assert_eq!(via.evidence.fstype, "ext4");
    }

    #[test]
    fn h3_container_overlay_root_is_unresolvable() {
        // Inside a container the upperdir is a host path; its longest prefix is the overlay
        // root itself.
        let t = table(&[
            "500 400 0:90 / / rw - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/A,upperdir=/var/lib/docker/overlay2/x/diff,workdir=/var/lib/docker/overlay2/x/work",
        ]);
        let probe = Scripted {
            default: Some(magic(OVERLAYFS_MAGIC)),
            ..Default::default()
        };
        let c = classify(&t, Path::new("/app"), &probe);
        assert_eq!(
            (c.class, c.rule),
            (FsClass::Unknown, Rule::OverlayUpperUnresolvable)
        );
    }

    #[test]
    fn h3_no_touch_uses_the_table_only() {
        let t = table(&[
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw",
            "2 1 0:5 / /n rw - nfs s:/e rw",
        ]);
        let c = classify(&t, Path::new("/home/u"), &NoTouch);
        assert_eq!(
            (c.class, c.rule, c.evidence.magic),
            (FsClass::LocalPersistent, Rule::MountTableOnly, None)
        );
        let c = classify(&t, Path::new("/n/x"), &NoTouch);
        assert_eq!((c.class, c.rule), (FsClass::Network, Rule::Fstype));
        let t = table(&["1 0 0:9 / / rw - fuse.bindfs /x rw"]);
        assert_eq!(
            classify(&t, Path::new("/a"), &NoTouch).class,
            FsClass::Unknown
        );
    }

    #[test]
    fn h3_no_mount_is_unknown() {
        let c = classify(&MountTable::default(), Path::new("/x"), &NoTouch);
        assert_eq!((c.class, c.rule), (FsClass::Unknown, Rule::NoMount));
    }

    #[test]
    fn h3_macos_mnt_local_verdict() {
        let p = Path::new("/Users/a");
        let c = classify_mnt_local(
            p,
            "apfs",
            true,
            false,
            Path::new("/System/Volumes/Data"),
            "/dev/disk3s1",
        );
        assert_eq!(
            (c.class, c.rule),
            (FsClass::LocalPersistent, Rule::MntLocal)
        );
        assert_eq!(
            classify_mnt_local(p, "smbfs", false, false, p, "//u@s/x").class,
            FsClass::Network
        );
        assert_eq!(
            classify_mnt_local(p, "nfs", false, false, p, "s:/x").class,
            FsClass::Network
        );
        assert_eq!(
            classify_mnt_local(p, "tmpfs", true, false, p, "tmpfs").class,
            FsClass::LocalVolatile
        );
        assert_eq!(
            classify_mnt_local(p, "devfs", true, false, p, "devfs").class,
            FsClass::Pseudo
        );
        assert_eq!(
            classify_mnt_local(p, "autofs", false, false, p, "map").class,
            FsClass::Unknown
        );
    }

    #[test]
    fn h4_only_local_classes_are_host_local() {
        use FsClass::*;
        for (c, want) in [
            (LocalPersistent, true),
            (LocalVolatile, true),
            (Network, false),
            (HostShared, false),
            (Pseudo, false),
            (Unknown, false),
        ] {
            assert_eq!(c.is_host_local(), want, "{c}");
        }
    }
}
