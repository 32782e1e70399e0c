//! Every file outlived writes goes through this module (SPEC Q-14 as amended in §12): the
//! queue state, the lock, the posture boot snapshot, the continuations, the metrics textfile
//! and the audit log. There are four operations:
//!
//! - *replace* ([`Dir::replace`]): a temporary file with a fresh random name, created
//!   O_CREAT|O_EXCL in the target's directory, written, fsynced, renamed over the target
//!   (renameat), and the directory fsynced where durability is promised;
//! - *install* ([`Dir::install_locked`], [`Dir::replace_locked`]): the lock's born-locked
//!   temporary file, flocked before anything can see it, linked in without replacing
//!   (linkat, or renameat2 RENAME_NOREPLACE), then checked: the name must point at the
//!   descriptor we hold (device and inode);
//! - *update in place* ([`update_in_place`]): pwrite, ftruncate and fsync on a descriptor
//!   already held (the lock record);
//! - *append* ([`Dir::append`]): O_APPEND to a log, rotated by renameat.
//!
//! Every descriptor is opened O_NOFOLLOW|O_CLOEXEC|O_NONBLOCK relative to a directory
//! descriptor, never through a path a second time, and checked with fstat: a symbolic link is
//! never followed, and a FIFO, socket or device where a file belongs is refused at once
//! (O_NONBLOCK: opening a FIFO never waits for a writer). A temporary name that already
//! exists belongs to someone else: another name is drawn, and nothing is ever removed but the
//! temporary files this process created.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;

/// What kind of object a name points at (without following it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Regular,
    Directory,
    Symlink,
    Fifo,
    Socket,
    Device,
}

impl Kind {
    fn of_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::Regular,
            libc::S_IFDIR => Kind::Directory,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            _ => Kind::Device,
        }
    }

    fn article(self) -> &'static str {
        match self {
            Kind::Regular => "a regular file",
            Kind::Directory => "a directory",
            Kind::Symlink => "a symbolic link",
            Kind::Fifo => "a FIFO",
            Kind::Socket => "a socket",
            Kind::Device => "a device",
        }
    }
}

/// What fstat says, reduced to what the checks need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub dev: u64,
    pub ino: u64,
    /// Permission bits (`mode & 0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub kind: Kind,
    pub size: u64,
    /// Wall ms of the last modification.
    pub mtime_ms: i64,
}

impl Meta {
    fn of(m: &std::fs::Metadata) -> Meta {
        Meta {
            dev: m.dev(),
            ino: m.ino(),
            perm: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            kind: Kind::of_mode(m.mode()),
            size: m.size(),
            mtime_ms: m.mtime() * 1000 + m.mtime_nsec() / 1_000_000,
        }
    }

    // The field types differ between platforms (macOS: i32 dev, u16 mode).
    #[cfg_attr(
        target_os = "linux",
        expect(clippy::unnecessary_cast, reason = "the casts are needed on macOS")
    )]
    fn of_stat(s: &libc::stat) -> Meta {
        Meta {
            dev: s.st_dev as u64,
            ino: s.st_ino as u64,
            perm: s.st_mode as u32 & 0o7777,
            uid: s.st_uid,
            gid: s.st_gid,
            kind: Kind::of_mode(s.st_mode as u32),
            size: s.st_size as u64,
            mtime_ms: s.st_mtime as i64 * 1000 + s.st_mtime_nsec as i64 / 1_000_000,
        }
    }

    /// The same object (device and inode).
    pub fn same(&self, other: &Meta) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }

    /// Writable by group or others.
    pub fn shared_writable(&self) -> bool {
        self.perm & 0o022 != 0
    }
}

fn errno(e: Errno) -> io::Error {
    io::Error::from(e)
}

/// The error for something that is not a regular file where one belongs.
fn not_regular(dir: &Path, name: &str, kind: Kind) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{} is {}, not a regular file: outlived neither follows nor writes through it; remove it",
            dir.join(name).display(),
            kind.article()
        ),
    )
}

/// Flags every file descriptor here is opened with.
fn base_flags() -> OFlag {
    OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK
}

/// Clear O_NONBLOCK once a descriptor is known to be a regular file (it has no effect on
/// regular files on Linux, but a later read must never see EAGAIN elsewhere).
fn regular_file(fd: OwnedFd, dir: &Path, name: &str) -> io::Result<(File, Meta)> {
    let f = File::from(fd);
    let meta = Meta::of(&f.metadata()?);
    if meta.kind != Kind::Regular {
        return Err(not_regular(dir, name, meta.kind));
    }
    Ok((f, meta))
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    #[cfg(target_os = "linux")]
    {
        // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n == b.len() as isize {
            return u64::from_ne_bytes(b);
        }
    }
    if let Ok(mut f) = File::open("/dev/urandom")
        && f.read_exact(&mut b).is_ok()
    {
        return u64::from_ne_bytes(b);
    }
    // Uniqueness, not secrecy, is what the name needs: O_EXCL still refuses a taken one.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

#[cfg(test)]
thread_local! {
    /// Names the next temporary files take (tests plant something there first).
    static FORCED_TEMP: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Tests: the next temporary names drawn, in order.
#[cfg(test)]
pub fn force_temp_names(names: &[&str]) {
    FORCED_TEMP.with(|f| *f.borrow_mut() = names.iter().rev().map(|s| s.to_string()).collect());
}

fn temp_name(stem: &str) -> String {
    #[cfg(test)]
    if let Some(n) = FORCED_TEMP.with(|f| f.borrow_mut().pop()) {
        return n;
    }
    format!(".{stem}.{:016x}.tmp", random_u64())
}

/// How many taken temporary names are tolerated before giving up.
const TEMP_TRIES: usize = 16;

/// How a [`Dir::replace`] must go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replace {
    /// Permission bits of the new file (set with fchmod: the umask does not apply).
    pub mode: u32,
    /// Hand the file to this uid and gid (fchown through the descriptor, before the rename).
    pub owner: Option<(u32, u32)>,
    /// fsync the file and then the directory: the caller promises durability.
    pub durable: bool,
    /// Fail if the target exists (renameat2 RENAME_NOREPLACE) instead of replacing it.
    pub exclusive: bool,
}

impl Replace {
    /// A durable private file (0600): the state, the continuation record.
    pub const DURABLE: Replace = Replace {
        mode: 0o600,
        owner: None,
        durable: true,
        exclusive: false,
    };
}

/// Why a replace failed.
#[derive(Debug)]
pub enum ReplaceError {
    /// Nothing changed: the target is as it was.
    Failed(io::Error),
    /// The target was replaced, but the directory could not be fsynced: the new content is
    /// visible, and not known to survive a power loss.
    NotDurable(io::Error),
}

impl std::fmt::Display for ReplaceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplaceError::Failed(e) => write!(f, "{e}"),
            ReplaceError::NotDurable(e) => {
                write!(f, "written, but the directory could not be synced: {e}")
            }
        }
    }
}

impl From<ReplaceError> for io::Error {
    fn from(e: ReplaceError) -> io::Error {
        match e {
            ReplaceError::Failed(e) => e,
            ReplaceError::NotDurable(e) => {
                io::Error::new(e.kind(), format!("{}", ReplaceError::NotDurable(e)))
            }
        }
    }
}

/// An open directory: every name below is resolved relative to its descriptor.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Open an existing directory (O_DIRECTORY|O_NOFOLLOW: a symbolic link at `path` is refused).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ELOOP => io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is a symbolic link, not a directory", path.display()),
            ),
            Errno::ENOTDIR => io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} exists and is not a directory", path.display()),
            ),
            e => errno(e),
        })?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Open `path`, creating it (and its parents) with `mode` if it is missing. An existing
    /// directory keeps its mode: the caller checks it.
    pub fn create(path: &Path, mode: u32) -> io::Result<Dir> {
        match Dir::open(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                match nix::unistd::mkdir(path, Mode::from_bits_truncate(mode as _)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(errno(e)),
                }
                let d = Dir::open(path)?;
                // The umask narrows mkdir's mode; a directory we just made gets exactly `mode`.
                nix::sys::stat::fchmod(d.fd.as_fd(), Mode::from_bits_truncate(mode as _))
                    .map_err(errno)?;
                Ok(d)
            }
            other => other,
        }
    }

    /// The directory's path (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// fstat of the directory itself.
    pub fn meta(&self) -> io::Result<Meta> {
        let s = nix::sys::stat::fstat(self.fd.as_fd()).map_err(errno)?;
        Ok(Meta::of_stat(&s))
    }

    /// A subdirectory, created with `mode` if missing, opened without following a link. It
    /// must be owned by this process's uid; its mode is then set to `mode`.
    pub fn subdir(&self, name: &str, mode: u32) -> io::Result<Dir> {
        match nix::sys::stat::mkdirat(self.fd.as_fd(), name, Mode::from_bits_truncate(mode as _)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(errno(e)),
        }
        let path = self.path.join(name);
        let fd = nix::fcntl::openat(
            self.fd.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not a directory (a link or a file stands there)",
                    path.display()
                ),
            ),
            e => errno(e),
        })?;
        let d = Dir { fd, path };
        let m = d.meta()?;
        let me = nix::unistd::geteuid().as_raw();
        if m.uid != me {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is owned by uid {}, not by outlived (uid {me}); remove it",
                    d.path.display(),
                    m.uid
                ),
            ));
        }
        if m.perm != mode {
            nix::sys::stat::fchmod(d.fd.as_fd(), Mode::from_bits_truncate(mode as _))
                .map_err(errno)?;
        }
        Ok(d)
    }

    /// fsync the directory (its entries: a rename in it survives a power loss).
    pub fn sync(&self) -> io::Result<()> {
        nix::unistd::fsync(self.fd.as_fd()).map_err(errno)
    }

    /// What `name` is, without following it; None when it does not exist.
    pub fn entry(&self, name: &str) -> io::Result<Option<Meta>> {
        match nix::sys::stat::fstatat(self.fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(s) => Ok(Some(Meta::of_stat(&s))),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(errno(e)),
        }
    }

    /// The error for an open of `name` that failed with `e`: what stands there, when it is not
    /// a regular file (ELOOP: a link under O_NOFOLLOW; ENXIO: a FIFO without a reader under
    /// O_NONBLOCK, or a socket).
    fn open_error(&self, name: &str, e: Errno) -> io::Error {
        if matches!(e, Errno::ELOOP | Errno::ENXIO)
            && let Ok(Some(m)) = self.entry(name)
            && m.kind != Kind::Regular
        {
            return not_regular(&self.path, name, m.kind);
        }
        errno(e)
    }

    /// Open an existing regular file (`write`: read and write); None when it does not exist.
    /// Anything else standing there is refused without blocking.
    pub fn open_file(&self, name: &str, write: bool) -> io::Result<Option<(File, Meta)>> {
        let access = if write {
            OFlag::O_RDWR
        } else {
            OFlag::O_RDONLY
        };
        match nix::fcntl::openat(self.fd.as_fd(), name, access | base_flags(), Mode::empty()) {
            Ok(fd) => regular_file(fd, &self.path, name).map(Some),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(self.open_error(name, e)),
        }
    }

    /// Read a regular file of at most `max` bytes; None when it does not exist.
    pub fn read(&self, name: &str, max: u64) -> io::Result<Option<Vec<u8>>> {
        let Some((f, meta)) = self.open_file(name, false)? else {
            return Ok(None);
        };
        if meta.size > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is {} bytes, more than the {max} outlived reads",
                    self.path.join(name).display(),
                    meta.size
                ),
            ));
        }
        let mut out = Vec::with_capacity(meta.size as usize);
        f.take(max + 1).read_to_end(&mut out)?;
        if out.len() as u64 > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} grew past {max} bytes while read",
                    self.path.join(name).display()
                ),
            ));
        }
        Ok(Some(out))
    }

    /// Remove `name` (a file, not a directory).
    pub fn unlink(&self, name: &str) -> io::Result<()> {
        nix::unistd::unlinkat(
            self.fd.as_fd(),
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )
        .map_err(errno)
    }

    /// Create a new temporary file for writing under a fresh random name (O_CREAT|O_EXCL, so
    /// a name someone else placed is never used). Returns it and its name.
    pub fn temp(&self, stem: &str, mode: u32) -> io::Result<(File, String)> {
        let mut last = None;
        for _ in 0..TEMP_TRIES {
            let name = temp_name(stem);
            match nix::fcntl::openat(
                self.fd.as_fd(),
                name.as_str(),
                OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | base_flags(),
                Mode::from_bits_truncate(mode as _),
            ) {
                Ok(fd) => {
                    let (f, _) = regular_file(fd, &self.path, &name)?;
                    return Ok((f, name));
                }
                // Someone else's name (or a link planted there): draw another.
                Err(Errno::EEXIST) => last = Some(Errno::EEXIST),
                Err(e) => return Err(errno(e)),
            }
        }
        Err(io::Error::other(format!(
            "no free temporary name in {} after {TEMP_TRIES} tries ({:?})",
            self.path.display(),
            last
        )))
    }

    fn rename(&self, from: &str, to: &str, exclusive: bool) -> io::Result<bool> {
        if !exclusive {
            return nix::fcntl::renameat(self.fd.as_fd(), from, self.fd.as_fd(), to)
                .map(|()| true)
                .map_err(errno);
        }
        self.link_noreplace(from, to)
    }

    /// Put `from` at `to` without replacing anything: link(2), or where hard links are not
    /// supported renameat2(RENAME_NOREPLACE). Ok(false) when `to` exists. After a link both
    /// names exist; the caller removes `from`.
    fn link_noreplace(&self, from: &str, to: &str) -> io::Result<bool> {
        match nix::unistd::linkat(self.fd.as_fd(), from, self.fd.as_fd(), to, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::EEXIST) => Ok(false),
            Err(Errno::EPERM | Errno::EOPNOTSUPP | Errno::EMLINK) => {
                self.rename_noreplace(from, to)
            }
            Err(e) => Err(errno(e)),
        }
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn rename_noreplace(&self, from: &str, to: &str) -> io::Result<bool> {
        use nix::fcntl::{RenameFlags, renameat2};
        match renameat2(
            self.fd.as_fd(),
            from,
            self.fd.as_fd(),
            to,
            RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => Ok(true),
            Err(Errno::EEXIST) => Ok(false),
            Err(e) => Err(errno(e)),
        }
    }

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    fn rename_noreplace(&self, _from: &str, _to: &str) -> io::Result<bool> {
        // macOS: renamex_np(RENAME_EXCL) would do; link(2) works on APFS and HFS+, so this is
        // reached only where exclusivity cannot be had.
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// *replace*: write `bytes` as `name` atomically (see the module doc).
    pub fn replace(&self, name: &str, bytes: &[u8], how: Replace) -> Result<(), ReplaceError> {
        if faults::take(name, faults::Fault::Rename) {
            return Err(ReplaceError::Failed(io::Error::other(
                "injected fault: the rename fails",
            )));
        }
        let (mut f, tmp) = self.temp(name, 0o600).map_err(ReplaceError::Failed)?;
        let written = (|| -> io::Result<bool> {
            f.write_all(bytes)?;
            nix::sys::stat::fchmod(f.as_fd(), Mode::from_bits_truncate(how.mode as _))
                .map_err(errno)?;
            if let Some((uid, gid)) = how.owner
                && nix::unistd::geteuid().as_raw() != uid
            {
                nix::unistd::fchown(
                    f.as_fd(),
                    Some(nix::unistd::Uid::from_raw(uid)),
                    Some(nix::unistd::Gid::from_raw(gid)),
                )
                .map_err(errno)?;
            }
            if how.durable {
                f.sync_all()?;
            }
            let placed = self.rename(&tmp, name, how.exclusive)?;
            if placed && how.exclusive {
                // A link leaves the temporary name behind.
                let _ = self.unlink(&tmp);
            }
            Ok(placed)
        })();
        match written {
            Ok(true) => {}
            Ok(false) => {
                let _ = self.unlink(&tmp);
                return Err(ReplaceError::Failed(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} already exists", self.path.join(name).display()),
                )));
            }
            Err(e) => {
                let _ = self.unlink(&tmp);
                return Err(ReplaceError::Failed(e));
            }
        }
        if how.durable {
            if faults::take(name, faults::Fault::DirSync) {
                return Err(ReplaceError::NotDurable(io::Error::other(
                    "injected fault: the directory fsync fails",
                )));
            }
            self.sync().map_err(ReplaceError::NotDurable)?;
        }
        Ok(())
    }

    /// A born-locked file (L-2): a temporary file flocked before anything can see it, `bytes`
    /// written and fsynced, then linked in as `name` without replacing anything. Returns the
    /// flocked file once `name` is proven to be it (device and inode); None when `name`
    /// exists or was replaced meanwhile (the caller looks again).
    pub fn install_locked(&self, name: &str, bytes: &[u8]) -> io::Result<Option<File>> {
        self.place_locked(name, bytes, true)
    }

    /// L-5: the same, but renamed over an existing `name` (a takeover, done while holding the
    /// old file's flock). None when `name` turned out not to be ours after the rename.
    pub fn replace_locked(&self, name: &str, bytes: &[u8]) -> io::Result<Option<File>> {
        self.place_locked(name, bytes, false)
    }

    fn place_locked(&self, name: &str, bytes: &[u8], exclusive: bool) -> io::Result<Option<File>> {
        let (mut f, tmp) = self.temp(name, 0o600)?;
        let placed = (|| -> io::Result<bool> {
            if !try_flock(&f)? {
                return Err(io::Error::other(
                    "a file created a moment ago is locked by someone else",
                ));
            }
            f.write_all(bytes)?;
            f.sync_all()?;
            self.rename(&tmp, name, exclusive)
        })();
        // The temporary name is ours: gone whatever happened (after a link it is a second name).
        let _ = self.unlink(&tmp);
        if !placed? {
            return Ok(None);
        }
        let held = Meta::of(&f.metadata()?);
        match self.entry(name)? {
            Some(m) if m.same(&held) => {}
            _ => return Ok(None),
        }
        self.sync()?;
        Ok(Some(f))
    }

    /// Open `name` for appending (created 0600 when missing), a regular file only.
    pub fn open_append(&self, name: &str) -> io::Result<(File, Meta)> {
        let fd = nix::fcntl::openat(
            self.fd.as_fd(),
            name,
            OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT | base_flags(),
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| self.open_error(name, e))?;
        regular_file(fd, &self.path, name)
    }

    /// *append* a line to `name`; when the file would grow past `rotate_at` bytes it is first
    /// renamed to `rotated` (which it replaces).
    pub fn append(&self, name: &str, line: &[u8], rotate_at: u64, rotated: &str) -> io::Result<()> {
        let (mut f, meta) = self.open_append(name)?;
        if meta.size > 0 && meta.size + line.len() as u64 > rotate_at {
            drop(f);
            nix::fcntl::renameat(self.fd.as_fd(), name, self.fd.as_fd(), rotated).map_err(errno)?;
            f = self.open_append(name)?.0;
        }
        f.write_all(line)
    }
}

/// The flock of a file, without waiting: Ok(false) when someone else holds it.
pub fn try_flock(f: &File) -> io::Result<bool> {
    match f.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// *update in place*: the whole content of a held file becomes `bytes` (pwrite, ftruncate,
/// fsync on the descriptor; never a rename, which would lose the lock).
pub fn update_in_place(f: &File, bytes: &[u8]) -> io::Result<()> {
    f.write_all_at(bytes, 0)?;
    f.set_len(bytes.len() as u64)?;
    f.sync_all()
}

/// fstat of an open file.
pub fn meta(f: &File) -> io::Result<Meta> {
    Ok(Meta::of(&f.metadata()?))
}

/// Injected failures of a replace (tests, and the `fault-hooks` feature for the binary that
/// end-to-end tests start: a file `fault-<fault>-<name>` in the runtime directory).
pub mod faults {
    /// Which step fails.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Fault {
        /// The rename of the temporary file over the target fails (nothing changes).
        Rename,
        /// The directory fsync after a successful rename fails.
        DirSync,
    }

    #[cfg(test)]
    thread_local! {
        static PLAN: std::cell::RefCell<Vec<(String, Fault)>> = const { std::cell::RefCell::new(Vec::new()) };
        static STICKY: std::cell::RefCell<Option<(String, Fault)>> = const { std::cell::RefCell::new(None) };
    }

    /// Tests: the next replaces of these names fail at these steps, in order (each once).
    #[cfg(test)]
    pub fn plan(faults: &[(&str, Fault)]) {
        PLAN.with(|p| *p.borrow_mut() = faults.iter().map(|(n, f)| (n.to_string(), *f)).collect());
    }

    /// Tests: every replace of `name` fails at this step until [`clear`] (a full disk).
    #[cfg(test)]
    pub fn fail_until_cleared(name: &str, fault: Fault) {
        STICKY.with(|s| *s.borrow_mut() = Some((name.to_string(), fault)));
    }

    /// Tests: no more injected faults.
    #[cfg(test)]
    pub fn clear() {
        PLAN.with(|p| p.borrow_mut().clear());
        STICKY.with(|s| *s.borrow_mut() = None);
    }

    /// Whether this step of a replace of `name` must fail now.
    pub(super) fn take(name: &str, fault: Fault) -> bool {
        #[cfg(test)]
        {
            let hit = PLAN.with(|p| {
                let mut p = p.borrow_mut();
                match p.first() {
                    Some((n, f)) if n == name && *f == fault => {
                        p.remove(0);
                        true
                    }
                    _ => false,
                }
            });
            let sticky = STICKY.with(|s| {
                s.borrow()
                    .as_ref()
                    .is_some_and(|(n, f)| n == name && *f == fault)
            });
            if hit || sticky {
                return true;
            }
        }
        #[cfg(feature = "fault-hooks")]
        {
            let word = match fault {
                Fault::Rename => "rename",
                Fault::DirSync => "dir-sync",
            };
            if crate::faults::requested(&format!("fault-{word}-fails-{name}")) {
                return true;
            }
        }
        let _ = (name, fault);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    fn dir() -> (tempfile::TempDir, Dir) {
        let t = tempfile::tempdir().unwrap();
        let d = Dir::open(t.path()).unwrap();
        (t, d)
    }

    /// Run `f` on another thread and fail if it blocks (a FIFO opened without O_NONBLOCK).
    fn never_blocks<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the call blocked on a FIFO")
    }

    fn victim(t: &tempfile::TempDir) -> PathBuf {
        let v = t.path().join("victim");
        std::fs::write(&v, b"precious").unwrap();
        v
    }

    #[test]
    fn q14_replace_writes_atomically_with_the_mode_asked_and_leaves_no_temp() {
        let (t, d) = dir();
        d.replace("state.json", b"one", Replace::DURABLE).unwrap();
        d.replace(
            "state.json",
            b"two",
            Replace {
                mode: 0o644,
                ..Replace::DURABLE
            },
        )
        .unwrap();
        assert_eq!(std::fs::read(t.path().join("state.json")).unwrap(), b"two");
        let m = std::fs::metadata(t.path().join("state.json")).unwrap();
        assert_eq!(
            m.permissions().mode() & 0o777,
            0o644,
            "fchmod, not the umask"
        );
        let names: Vec<String> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["state.json".to_string()]);
    }

    /// SPEC §12 Q-14 (core review finding 5): a symbolic link planted at the temporary name
    /// the agent draws is never written through; another name is drawn. A link planted at the
    /// target is replaced, not followed.
    #[test]
    fn q14_links_at_the_temp_name_or_the_target_are_never_followed() {
        let (t, d) = dir();
        let v = victim(&t);
        std::os::unix::fs::symlink(&v, t.path().join(".state.json.planted.tmp")).unwrap();
        force_temp_names(&[".state.json.planted.tmp"]);
        d.replace("state.json", b"new state", Replace::DURABLE)
            .unwrap();
        assert_eq!(std::fs::read(&v).unwrap(), b"precious");
        assert!(
            std::fs::symlink_metadata(t.path().join(".state.json.planted.tmp"))
                .unwrap()
                .file_type()
                .is_symlink(),
            "someone else's temp name is left alone"
        );
        std::os::unix::fs::symlink(&v, t.path().join("metrics.prom")).unwrap();
        d.replace("metrics.prom", b"m 1\n", Replace::DURABLE)
            .unwrap();
        assert_eq!(std::fs::read(&v).unwrap(), b"precious");
        assert!(
            std::fs::symlink_metadata(t.path().join("metrics.prom"))
                .unwrap()
                .is_file()
        );
    }

    #[test]
    fn q14_exclusive_replace_never_overwrites() {
        let (t, d) = dir();
        let how = Replace {
            exclusive: true,
            ..Replace::DURABLE
        };
        d.replace("sidecar.json", b"first", how).unwrap();
        assert!(matches!(
            d.replace("sidecar.json", b"second", how),
            Err(ReplaceError::Failed(e)) if e.kind() == io::ErrorKind::AlreadyExists
        ));
        assert_eq!(
            std::fs::read(t.path().join("sidecar.json")).unwrap(),
            b"first"
        );
        assert_eq!(
            std::fs::read_dir(t.path()).unwrap().count(),
            1,
            "no temp left"
        );
    }

    #[test]
    fn q14_fifos_links_and_directories_are_refused_without_blocking() {
        let (t, d) = dir();
        nix::unistd::mkfifo(&t.path().join("fifo"), Mode::from_bits_truncate(0o666)).unwrap();
        let v = victim(&t);
        std::os::unix::fs::symlink(&v, t.path().join("link")).unwrap();
        std::fs::create_dir(t.path().join("sub")).unwrap();
        let d = std::sync::Arc::new(d);
        for name in ["fifo", "link", "sub"] {
            let d2 = std::sync::Arc::clone(&d);
            let r = never_blocks(move || d2.read(name, 1 << 20).map(|_| ()));
            assert!(r.is_err(), "{name}: read must refuse");
            let d2 = std::sync::Arc::clone(&d);
            let r = never_blocks(move || d2.open_file(name, true).map(|_| ()));
            assert!(r.is_err(), "{name}: open must refuse");
            let d2 = std::sync::Arc::clone(&d);
            let r = never_blocks(move || d2.append(name, b"line\n", 1 << 20, "old"));
            assert!(r.is_err(), "{name}: append must refuse");
        }
        assert_eq!(std::fs::read(&v).unwrap(), b"precious");
    }

    #[test]
    fn q14_read_is_bounded() {
        let (t, d) = dir();
        std::fs::write(t.path().join("big"), vec![b'x'; 100]).unwrap();
        assert!(d.read("big", 99).is_err());
        assert_eq!(d.read("big", 100).unwrap().unwrap().len(), 100);
        assert!(d.read("absent", 100).unwrap().is_none());
    }

    /// L-2 as amended: a born-locked file is installed without replacing anything, and only
    /// once the name is proven to be the descriptor held. A link at the name is never followed.
    #[test]
    fn l2_install_locked_is_exclusive_flocked_and_checked() {
        let (t, d) = dir();
        let f = d
            .install_locked("lock", b"record\n")
            .unwrap()
            .expect("installed");
        assert_eq!(std::fs::read(t.path().join("lock")).unwrap(), b"record\n");
        let other = File::open(t.path().join("lock")).unwrap();
        assert!(!try_flock(&other).unwrap(), "born locked");
        assert!(d.install_locked("lock", b"second\n").unwrap().is_none());
        drop(f);
        let v = victim(&t);
        std::os::unix::fs::symlink(&v, t.path().join("lock2")).unwrap();
        assert!(d.install_locked("lock2", b"record\n").unwrap().is_none());
        assert_eq!(std::fs::read(&v).unwrap(), b"precious");
        let names: Vec<String> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.ends_with(".tmp")),
            "no temp left: {names:?}"
        );
    }

    #[test]
    fn x2_append_rotates_by_rename() {
        let (t, d) = dir();
        for i in 0..10 {
            d.append("log", format!("line {i}\n").as_bytes(), 20, "log.1")
                .unwrap();
        }
        assert!(std::fs::metadata(t.path().join("log")).unwrap().len() <= 20);
        assert!(t.path().join("log.1").exists());
    }

    #[test]
    fn subdirs_are_ours_or_refused() {
        let (t, d) = dir();
        let s = d.subdir("continuations", 0o711).unwrap();
        assert_eq!(s.meta().unwrap().perm, 0o711);
        std::os::unix::fs::symlink(t.path(), t.path().join("linked")).unwrap();
        assert!(d.subdir("linked", 0o700).is_err(), "a link is not followed");
        if nix::unistd::geteuid().is_root() {
            std::fs::create_dir(t.path().join("theirs")).unwrap();
            std::os::unix::fs::chown(t.path().join("theirs"), Some(65534), Some(65534)).unwrap();
            let e = d.subdir("theirs", 0o711).unwrap_err();
            assert!(e.to_string().contains("owned by uid 65534"), "{e}");
            let m = std::fs::metadata(t.path().join("theirs")).unwrap();
            assert_eq!(m.permissions().mode() & 0o777, 0o755, "not chmod'ed");
        }
    }

    #[test]
    fn faults_rename_changes_nothing_dir_sync_is_visible_but_not_durable() {
        let (t, d) = dir();
        d.replace("s", b"old", Replace::DURABLE).unwrap();
        faults::plan(&[("s", faults::Fault::Rename)]);
        assert!(matches!(
            d.replace("s", b"new", Replace::DURABLE),
            Err(ReplaceError::Failed(_))
        ));
        assert_eq!(std::fs::read(t.path().join("s")).unwrap(), b"old");
        faults::plan(&[("s", faults::Fault::DirSync)]);
        assert!(matches!(
            d.replace("s", b"new", Replace::DURABLE),
            Err(ReplaceError::NotDurable(_))
        ));
        assert_eq!(std::fs::read(t.path().join("s")).unwrap(), b"new");
    }
}
