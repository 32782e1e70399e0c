//! What a box does to the machine's filesystems, watched with fanotify and attributed by pid
//! namespace (DESIGN §4.3; used by `boxed.rs`).
//!
//! A fanotify group reporting directory file handles and names (`FAN_REPORT_DFID_NAME`) marks
//! every filesystem the box could reach. Its events are read by `cat` running in a pid
//! namespace of the watch's own, in which the box is booted as a nested namespace. The kernel
//! gives an event's pid as seen from the reader's namespace: a box process has one, and every
//! other process on the machine reads as pid 0. So the findings are exactly what the box did,
//! however busy the machine is meanwhile. The reader outlives the box (its namespace is the
//! box's parent), so the box's shutdown is watched too; a sentinel file written by the test
//! after the box is gone marks the end of its events.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The trees whose filesystems are watched.
pub(crate) const WATCHED: [&str; 9] = [
    "/tmp",
    "/run/lock",
    "/run",
    "/etc",
    "/var",
    "/usr",
    "/home",
    "/dev",
    "/dev/shm",
];

const EVENTS: u64 = libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_MOVED_FROM
    | libc::FAN_MOVED_TO
    | libc::FAN_MODIFY
    | libc::FAN_ATTRIB
    | libc::FAN_ONDIR;

/// One watched filesystem.
struct Fs {
    dev: u64,
    fsid: [i32; 2],
    /// A descriptor on it, for `open_by_handle_at`.
    mount: File,
}

/// The watch: the fanotify group and what its reader found so far.
pub(crate) struct MachineWatch {
    fan: OwnedFd,
    filesystems: Vec<Fs>,
    /// Trees whose filesystem could not be marked (the snapshot covers them instead).
    pub(crate) unwatched: Vec<PathBuf>,
    findings: Mutex<Vec<String>>,
}

fn fsid_of(path: &Path) -> std::io::Result<[i32; 2]> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a statfs is plain integers, for which all zeroes is a valid value.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `s` a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fsid_t is two ints.
    Ok(unsafe { std::mem::transmute::<libc::fsid_t, [i32; 2]>(s.f_fsid) })
}

impl MachineWatch {
    /// Start watching (root only).
    pub(crate) fn start() -> std::io::Result<Arc<MachineWatch>> {
        // SAFETY: plain system call.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_NOTIF
                    | libc::FAN_REPORT_DFID_NAME
                    | libc::FAN_UNLIMITED_QUEUE
                    | libc::FAN_CLOEXEC,
                libc::O_RDONLY as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fan = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut filesystems: Vec<Fs> = Vec::new();
        let mut unwatched = Vec::new();
        for root in WATCHED {
            let Ok(meta) = std::fs::metadata(root) else {
                continue;
            };
            if filesystems.iter().any(|f| f.dev == meta.dev()) {
                continue;
            }
            let c = std::ffi::CString::new(root).unwrap();
            // SAFETY: valid descriptor and C string.
            let r = unsafe {
                libc::fanotify_mark(
                    fan.as_raw_fd(),
                    libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
                    EVENTS,
                    libc::AT_FDCWD,
                    c.as_ptr(),
                )
            };
            if r != 0 {
                unwatched.push(PathBuf::from(root));
                continue;
            }
            filesystems.push(Fs {
                dev: meta.dev(),
                fsid: fsid_of(Path::new(root))?,
                mount: File::open(root)?,
            });
        }
        // A tree on a filesystem another tree could not mark is not watched either.
        let watched_devs: Vec<u64> = filesystems.iter().map(|f| f.dev).collect();
        for root in WATCHED {
            if let Ok(m) = std::fs::metadata(root)
                && !watched_devs.contains(&m.dev())
                && !unwatched.iter().any(|u| u == Path::new(root))
            {
                unwatched.push(PathBuf::from(root));
            }
        }
        Ok(Arc::new(MachineWatch {
            fan,
            filesystems,
            unwatched,
            findings: Mutex::new(Vec::new()),
        }))
    }

    /// The group's descriptor, for the reader.
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fan.as_raw_fd()
    }

    /// Whether `path` lies on a watched filesystem.
    pub(crate) fn covers(&self, path: &Path) -> bool {
        std::fs::symlink_metadata(path)
            .is_ok_and(|m| self.filesystems.iter().any(|f| f.dev == m.dev()))
    }

    /// What the box did, so far.
    pub(crate) fn findings(&self) -> Vec<String> {
        self.findings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The reader lost track (its sentinel never came): that is a finding too.
    pub(crate) fn lost(&self) {
        self.findings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(
                "the watch lost track of the box (no sentinel): what it did last is unknown".into(),
            );
    }

    /// The directory a file handle names, when it still exists.
    fn dir_of(&self, fsid: [i32; 2], handle: &[u8]) -> Option<PathBuf> {
        let fs = self.filesystems.iter().find(|f| f.fsid == fsid)?;
        // struct file_handle: handle_bytes (u32), handle_type (i32), f_handle[].
        let mut buf = handle.to_vec();
        // SAFETY: `buf` holds a complete struct file_handle as the kernel wrote it.
        let fd = unsafe {
            libc::open_by_handle_at(
                fs.mount.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                libc::O_PATH | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()
    }

    /// Parse what the reader copied; returns whether `sentinel` was seen. Events of pid 0
    /// (not the box) are dropped.
    fn absorb(&self, data: &[u8], sentinel: &str) -> bool {
        let mut seen = false;
        let mut off = 0usize;
        let mut out = Vec::new();
        while off + 24 <= data.len() {
            let u32_at = |o: usize| u32::from_ne_bytes(data[o..o + 4].try_into().unwrap());
            let event_len = u32_at(off) as usize;
            let meta_len = u16::from_ne_bytes(data[off + 6..off + 8].try_into().unwrap()) as usize;
            if event_len < 24 || off + event_len > data.len() {
                break;
            }
            let mask = u64::from_ne_bytes(data[off + 8..off + 16].try_into().unwrap());
            let pid = i32::from_ne_bytes(data[off + 20..off + 24].try_into().unwrap());
            let mut info = off + meta_len;
            let (mut fsid, mut handle, mut name) = ([0i32; 2], &data[0..0], String::new());
            while info + 4 <= off + event_len {
                let kind = data[info];
                let len = u16::from_ne_bytes(data[info + 2..info + 4].try_into().unwrap()) as usize;
                if len < 4 || info + len > off + event_len {
                    break;
                }
                if (kind == libc::FAN_EVENT_INFO_TYPE_DFID_NAME
                    || kind == libc::FAN_EVENT_INFO_TYPE_DFID)
                    && len >= 20
                {
                    fsid = [
                        i32::from_ne_bytes(data[info + 4..info + 8].try_into().unwrap()),
                        i32::from_ne_bytes(data[info + 8..info + 12].try_into().unwrap()),
                    ];
                    let hb = u32_at(info + 12) as usize;
                    let h_end = (info + 20 + hb).min(info + len);
                    handle = &data[info + 12..h_end];
                    if kind == libc::FAN_EVENT_INFO_TYPE_DFID_NAME {
                        let raw = &data[h_end..info + len];
                        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                        name = String::from_utf8_lossy(&raw[..end]).into_owned();
                    }
                }
                info += len;
            }
            if name == sentinel {
                seen = true;
            }
            if mask & libc::FAN_Q_OVERFLOW != 0 {
                out.push("the watch's event queue overflowed: what the box did is unknown".into());
            } else if pid != 0 {
                let what = [
                    (libc::FAN_CREATE, "created"),
                    (libc::FAN_DELETE, "removed"),
                    (libc::FAN_MOVED_FROM, "renamed away"),
                    (libc::FAN_MOVED_TO, "renamed in"),
                    (libc::FAN_MODIFY, "wrote"),
                    (libc::FAN_ATTRIB, "changed the attributes of"),
                ]
                .iter()
                .filter(|(bit, _)| mask & bit != 0)
                .map(|(_, w)| *w)
                .collect::<Vec<_>>()
                .join(", ");
                let dir = self.dir_of(fsid, handle);
                // Writing to a device node (the box's /dev binds /dev/null, /dev/loop*) is
                // using it, not changing the machine.
                let device = dir.as_ref().is_some_and(|d| {
                    use std::os::unix::fs::FileTypeExt;
                    std::fs::symlink_metadata(d.join(&name)).is_ok_and(|m| {
                        m.file_type().is_char_device() || m.file_type().is_block_device()
                    })
                });
                if device && mask & !(libc::FAN_MODIFY | libc::FAN_ONDIR) == 0 {
                    off += event_len;
                    continue;
                }
                let dir = dir
                    .map(|d| d.display().to_string())
                    .unwrap_or_else(|| "<a directory since removed>".into());
                out.push(format!("box pid {pid} {what} {dir}/{name}"));
            }
            off += event_len;
        }
        let mut f = self.findings.lock().unwrap_or_else(|e| e.into_inner());
        for line in out {
            if !f.contains(&line) {
                f.push(line);
            }
        }
        seen
    }
}

/// The reader's end: what `cat` copies from the fanotify group, collected by a thread.
pub(crate) struct Reader {
    watch: Arc<MachineWatch>,
    buf: Arc<Mutex<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reader {
    /// Collect from `pipe` (the read end of the pipe `cat` writes to).
    pub(crate) fn new(watch: Arc<MachineWatch>, pipe: File) -> Reader {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = Arc::clone(&buf);
        let thread = std::thread::spawn(move || {
            let mut pipe = pipe;
            let mut chunk = vec![0u8; 1 << 16];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => b
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&chunk[..n]),
                }
            }
        });
        Reader {
            watch,
            buf,
            thread: Some(thread),
        }
    }

    /// The box is gone: write a sentinel file (as the machine, pid 0) and absorb everything
    /// the reader copied up to it. False when the sentinel never came through.
    pub(crate) fn finish(&mut self) -> bool {
        let name = format!(".outlive-box-watch-{}", std::process::id());
        let path = Path::new("/tmp").join(&name);
        let _ = std::fs::write(&path, b"");
        let _ = std::fs::remove_file(&path);
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let data = std::mem::take(&mut *self.buf.lock().unwrap_or_else(|e| e.into_inner()));
            // Keep a partial event for the next round.
            let whole = complete_prefix(&data);
            let seen = self.watch.absorb(&data[..whole], &name);
            self.buf
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .splice(0..0, data[whole..].iter().copied());
            if seen {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // The pipe closes when the reader's namespace is killed; the thread then ends.
        if let Some(t) = self.thread.take()
            && t.is_finished()
        {
            let _ = t.join();
        }
    }
}

/// The length of the longest prefix of `data` made of whole events.
fn complete_prefix(data: &[u8]) -> usize {
    let mut off = 0;
    while off + 4 <= data.len() {
        let len = u32::from_ne_bytes(data[off..off + 4].try_into().unwrap()) as usize;
        if len == 0 || off + len > data.len() {
            break;
        }
        off += len;
    }
    off
}
