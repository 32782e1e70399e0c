//! The journal writer (SPEC X-2): audit events and alerts as structured journal entries over
//! the journal's native protocol, with a configurable socket path (`journal.socket`).
//!
//! Each entry carries `MESSAGE`, `PRIORITY`, `SYSLOG_IDENTIFIER=outlived`,
//! `OUTLIVE_EVENT=<kind>`, the event's fields as `OUTLIVE_<FIELD>` and, for alerts, the fixed
//! `MESSAGE_ID`. The writer knows whether the journal accepted an entry (the datagram was
//! delivered to its socket); when no journal is reachable the entry goes to stderr as one JSON
//! object per line, so nothing is lost silently. On macOS every entry goes to the unified log
//! instead (subsystem `org.outlive.outlived`, category = the event's name; [`oslog_entry`]).
//!
//! Protocol (systemd's "Native Journal Protocol"): `KEY=value\n` per field; a value holding a
//! newline is sent as `KEY\n`, a little-endian u64 length, the bytes, `\n`. An entry too large
//! for one datagram is written to a sealed memfd whose descriptor is passed with SCM_RIGHTS.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use crate::audit::{Event, SYSLOG_IDENTIFIER};
use crate::posture::getters::status;
use crate::posture::rows::{Runtime, RuntimeRead};
use crate::sync::MutexExt;

/// How the last entry was delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Nothing written yet.
    None,
    /// The journal's socket accepted the entry.
    Journal,
    /// No journal was reachable; the entry went to stderr as JSON.
    Stderr,
    /// macOS: the entry went to the unified log (subsystem `org.outlive.outlived`).
    UnifiedLog,
}

/// The unified log's subsystem (macOS): `log show --predicate 'subsystem == "org.outlive.outlived"'`.
pub const OSLOG_SUBSYSTEM: &str = "org.outlive.outlived";

/// The levels of Apple's unified log (`os_log_type_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OsLogLevel {
    Debug,
    Info,
    Default,
    Error,
    Fault,
}

/// An event as a unified-log entry (macOS): the category is the event's name, the same word
/// as `OUTLIVE_EVENT` in the journal; the level follows the syslog priority; the message
/// carries the `MESSAGE_ID` and the fields, so `log show` shows what `journalctl -o verbose`
/// would.
pub fn oslog_entry(ev: &Event) -> (String, OsLogLevel, String) {
    let level = match ev.priority {
        0..=2 => OsLogLevel::Fault,
        3 => OsLogLevel::Error,
        4 | 5 => OsLogLevel::Default,
        6 => OsLogLevel::Info,
        _ => OsLogLevel::Debug,
    };
    let mut msg = crate::audit::escape_controls(&ev.message, true);
    if let Some(a) = ev.alert {
        msg.push_str(&format!(" MESSAGE_ID={}", a.message_id()));
    }
    for (k, v) in &ev.fields {
        msg.push_str(&format!(" OUTLIVE_{k}={v}"));
    }
    (ev.kind.clone(), level, msg)
}

#[cfg(target_os = "macos")]
mod unified {
    //! Thin: one `os_log_t` per category, created on first use and kept.
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::OsLogLevel;

    static LOGS: Mutex<Option<HashMap<String, oslog::OsLog>>> = Mutex::new(None);

    pub fn write(category: &str, level: OsLogLevel, message: &str) {
        let level = match level {
            OsLogLevel::Debug => oslog::Level::Debug,
            OsLogLevel::Info => oslog::Level::Info,
            OsLogLevel::Default => oslog::Level::Default,
            OsLogLevel::Error => oslog::Level::Error,
            OsLogLevel::Fault => oslog::Level::Fault,
        };
        let mut logs = LOGS.locked();
        let logs = logs.get_or_insert_with(HashMap::new);
        logs.entry(category.to_string())
            .or_insert_with(|| oslog::OsLog::new(super::OSLOG_SUBSYSTEM, category))
            .with_level(level, message);
    }
}

/// Serialise an event in the native protocol.
pub fn serialize(ev: &Event) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let mut put = |k: &str, v: &str| {
        if v.contains('\n') {
            out.extend_from_slice(k.as_bytes());
            out.push(b'\n');
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            out.extend_from_slice(v.as_bytes());
            out.push(b'\n');
        } else {
            out.extend_from_slice(k.as_bytes());
            out.push(b'=');
            out.extend_from_slice(v.as_bytes());
            out.push(b'\n');
        }
    };
    // journalctl shows MESSAGE to people: control characters in it are shown, not sent (§12);
    // the fields keep their bytes (the binary form carries them whole).
    put("MESSAGE", &crate::audit::escape_controls(&ev.message, true));
    put("PRIORITY", &ev.priority.to_string());
    put("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER);
    if let Some(a) = ev.alert {
        put("MESSAGE_ID", a.message_id());
    }
    put("OUTLIVE_EVENT", &ev.kind);
    for (k, v) in &ev.fields {
        put(&format!("OUTLIVE_{k}"), v);
    }
    out
}

/// Parse a native-protocol payload back into `(field, value)` pairs (tests, and the test
/// harness that plays the journal).
pub fn parse_native(mut b: &[u8]) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let nl = b.iter().position(|&c| c == b'\n')?;
        let line = &b[..nl];
        if let Some(eq) = line.iter().position(|&c| c == b'=') {
            out.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            ));
            b = &b[nl + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &b[nl + 1..];
            if rest.len() < 8 {
                return None;
            }
            let len = u64::from_le_bytes(rest[..8].try_into().ok()?) as usize;
            let val = rest.get(8..8 + len)?;
            if rest.get(8 + len) != Some(&b'\n') {
                return None;
            }
            out.push((key, String::from_utf8_lossy(val).into_owned()));
            b = &rest[8 + len + 1..];
        }
    }
    Some(out)
}

/// The longest a journal send may block before the entry falls back to stderr.
pub const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(250);

/// Writes events to the journal, or to stderr when it is unreachable.
pub struct JournalWriter {
    socket_path: PathBuf,
    sock: Option<UnixDatagram>,
    last: AtomicU8,
    accepted: AtomicU64,
    fallbacks: AtomicU64,
    stderr: Mutex<()>,
}

impl JournalWriter {
    /// A writer for the socket at `path`.
    pub fn new(path: &Path) -> JournalWriter {
        // A journal that stops reading (stuck, or its queue full: net.unix.max_dgram_qlen is
        // 10 on some hosts) must not block the agent, nor its watchdog thread, which journals
        // the wedged-loop alert: a send waits at most SEND_TIMEOUT, then the entry goes to
        // stderr.
        let sock = UnixDatagram::unbound().ok().inspect(|s| {
            let _ = s.set_write_timeout(Some(SEND_TIMEOUT));
        });
        JournalWriter {
            socket_path: path.to_path_buf(),
            sock,
            last: AtomicU8::new(0),
            accepted: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            stderr: Mutex::new(()),
        }
    }

    /// The configured socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// How the last entry went.
    pub fn last_delivery(&self) -> Delivery {
        match self.last.load(Ordering::Relaxed) {
            1 => Delivery::Journal,
            2 => Delivery::Stderr,
            3 => Delivery::UnifiedLog,
            _ => Delivery::None,
        }
    }

    /// Entries the journal accepted, and entries that fell back to stderr.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.accepted.load(Ordering::Relaxed),
            self.fallbacks.load(Ordering::Relaxed),
        )
    }

    /// Whether the journal socket exists (a cheap reachability hint before any entry).
    pub fn socket_present(&self) -> bool {
        std::fs::symlink_metadata(&self.socket_path).is_ok()
    }

    /// Write one event; returns where it went.
    pub fn write(&self, ev: &Event) -> Delivery {
        #[cfg(target_os = "macos")]
        {
            // No journal on macOS: the unified log, which takes every entry it is given.
            let (category, level, message) = oslog_entry(ev);
            unified::write(&category, level, &message);
            self.last.store(3, Ordering::Relaxed);
            self.accepted.fetch_add(1, Ordering::Relaxed);
            return Delivery::UnifiedLog;
        }
        #[cfg_attr(
            target_os = "macos",
            expect(unreachable_code, reason = "macOS returns above")
        )]
        let payload = serialize(ev);
        match self.send(&payload) {
            Ok(()) => {
                self.last.store(1, Ordering::Relaxed);
                self.accepted.fetch_add(1, Ordering::Relaxed);
                Delivery::Journal
            }
            Err(_) => {
                self.to_stderr(ev);
                self.last.store(2, Ordering::Relaxed);
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                Delivery::Stderr
            }
        }
    }

    fn send(&self, payload: &[u8]) -> io::Result<()> {
        let sock = self
            .sock
            .as_ref()
            .ok_or_else(|| io::Error::other("no socket"))?;
        match sock.send_to(payload, &self.socket_path) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMSGSIZE) | Some(libc::ENOBUFS)) => {
                self.send_memfd(sock, payload)
            }
            Err(e) => Err(e),
        }
    }

    #[cfg(target_os = "linux")]
    fn send_memfd(&self, sock: &UnixDatagram, payload: &[u8]) -> io::Result<()> {
        use nix::fcntl::{FcntlArg, SealFlag, fcntl};
        use nix::sys::memfd::{MFdFlags, memfd_create};
        use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};

        let fd = memfd_create(
            c"journal-entry",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let mut f = std::fs::File::from(fd);
        f.write_all(payload)?;
        fcntl(
            &f,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK
                    | SealFlag::F_SEAL_GROW
                    | SealFlag::F_SEAL_WRITE
                    | SealFlag::F_SEAL_SEAL,
            ),
        )?;
        let addr = UnixAddr::new(self.socket_path.as_path())?;
        let fds = [f.as_raw_fd()];
        sendmsg(
            sock.as_raw_fd(),
            &[],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            Some(&addr),
        )?;
        Ok(())
    }

    #[cfg(not(target_os = "linux"))]
    fn send_memfd(&self, _sock: &UnixDatagram, _payload: &[u8]) -> io::Result<()> {
        Err(io::Error::other("no journal on this platform"))
    }

    fn to_stderr(&self, ev: &Event) {
        let mut line = ev.to_json().to_string();
        line.push('\n');
        let _guard = self.stderr.locked();
        let _ = io::stderr().lock().write_all(line.as_bytes());
    }
}

impl crate::audit::AuditSink for JournalWriter {
    fn record(&self, event: &Event) {
        self.write(event);
    }
}

/// Whether stderr is connected to the journal (`JOURNAL_STREAM` names its device and inode).
pub fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let fd = io::stderr().as_raw_fd();
    // SAFETY: fd 2 stays open for the life of the process; the File is not dropped (into_raw).
    let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let meta = f.metadata();
    let _ = std::os::fd::IntoRawFd::into_raw_fd(f);
    meta.map(|m| m.dev() == dev && m.ino() == ino)
        .unwrap_or(false)
}

impl JournalWriter {
    /// The `publish.journal` guard (G-1): on while the journal takes entries, off once they go
    /// to stderr; with no journal to confirm it, nothing is read (`on-unverified`).
    pub fn guard_read(&self) -> RuntimeRead {
        let last = self.last_delivery();
        if last != Delivery::UnifiedLog && !self.socket_present() && !stderr_is_journal() {
            return RuntimeRead::Absent;
        }
        match last {
            Delivery::Journal | Delivery::UnifiedLog => status(true),
            Delivery::Stderr => status(false),
            Delivery::None => RuntimeRead::Status(Runtime {
                enabled: true,
                verdict_unknown: true,
                ..Runtime::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Alert, EventKind};

    /// A journal that stops reading never blocks the writer: once its queue is full, each
    /// entry waits at most SEND_TIMEOUT and goes to stderr, counted as a fallback.
    #[cfg(target_os = "linux")]
    #[test]
    fn x2_a_journal_that_stops_reading_never_blocks_the_writer() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("journal.socket");
        let _stuck = UnixDatagram::bind(&path).unwrap(); // bound, never read
        let w = JournalWriter::new(&path);
        let t = std::time::Instant::now();
        let mut fell_back = 0;
        for i in 0..2000 {
            if w.write(&Event::new(EventKind::Test, format!("entry {i}"))) == Delivery::Stderr {
                fell_back += 1;
                if fell_back == 3 {
                    break;
                }
            }
        }
        assert_eq!(fell_back, 3, "the queue never filled");
        assert!(
            t.elapsed() < SEND_TIMEOUT * 3 + std::time::Duration::from_secs(2),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(w.counts().1, 3);
    }

    /// macOS: the unified-log entry names the same event as the journal's `OUTLIVE_EVENT`,
    /// keeps the MESSAGE_ID and fields, and maps the priority onto os_log's levels.
    #[test]
    fn x2_unified_log_entry_keeps_the_event_name_id_and_fields() {
        let ev = Event::new(EventKind::RevivalGaveUp, "run-7 gave up after 3 attempts")
            .alert(Alert::RevivalGaveUp)
            .field("run_id", "run-7");
        let (category, level, msg) = oslog_entry(&ev);
        assert_eq!(category, "revival-gave-up");
        assert_eq!(level, OsLogLevel::Error);
        assert!(msg.starts_with("run-7 gave up after 3 attempts"), "{msg}");
        assert!(
            msg.contains("MESSAGE_ID=2b024c8048ec43d5bd93e3e01858924d"),
            "{msg}"
        );
        assert!(msg.contains("OUTLIVE_RUN_ID=run-7"), "{msg}");
        for (p, want) in [
            (2, OsLogLevel::Fault),
            (3, OsLogLevel::Error),
            (4, OsLogLevel::Default),
            (5, OsLogLevel::Default),
            (6, OsLogLevel::Info),
            (7, OsLogLevel::Debug),
        ] {
            assert_eq!(
                oslog_entry(&Event::new(EventKind::Test, "y").priority(p)).1,
                want,
                "{p}"
            );
        }
    }

    #[test]
    fn x2_native_protocol_round_trip() {
        let ev = Event::new(EventKind::LockHostRenamed, "host renamed from a to b")
            .alert(Alert::LockHostRenamed)
            .field("from", "a")
            .field("detail", "two\nlines");
        let fields = parse_native(&serialize(&ev)).unwrap();
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("MESSAGE"), Some("host renamed from a to b"));
        assert_eq!(get("PRIORITY"), Some("6"));
        assert_eq!(get("SYSLOG_IDENTIFIER"), Some("outlived"));
        assert_eq!(get("MESSAGE_ID"), Some("d6ad853e949d4505bf5ac339eedba367"));
        assert_eq!(get("OUTLIVE_EVENT"), Some("lock-host-renamed"));
        assert_eq!(get("OUTLIVE_FROM"), Some("a"));
        assert_eq!(get("OUTLIVE_DETAIL"), Some("two\nlines"));
    }

    /// §12 human output (security review finding 8): a caller's escape sequence in a message
    /// reaches the journal shown, not sent.
    #[test]
    fn x2_control_characters_in_the_message_are_shown_not_sent() {
        let ev = Event::new(
            EventKind::EnqueueRefused,
            "did not queue ok\x1b]0;pwned-title\x07\x1b[2J\x1b[31mFAKE\x1b[0m: reason",
        );
        let fields = parse_native(&serialize(&ev)).unwrap();
        let message = &fields.iter().find(|(k, _)| k == "MESSAGE").unwrap().1;
        assert_eq!(
            message,
            "did not queue ok\\x1b]0;pwned-title\\x07\\x1b[2J\\x1b[31mFAKE\\x1b[0m: reason"
        );
    }

    #[test]
    fn x2_newline_values_use_the_binary_length_form() {
        let ev = Event::new(EventKind::Test, "a\nb");
        let bytes = serialize(&ev);
        assert!(bytes.starts_with(b"MESSAGE\n\x03\0\0\0\0\0\0\0a\nb\n"));
    }

    #[test]
    fn x2_writer_delivers_to_its_socket_and_knows_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let rx = UnixDatagram::bind(&path).unwrap();
        let w = JournalWriter::new(&path);
        assert_eq!(w.last_delivery(), Delivery::None);
        assert_eq!(
            w.write(&Event::new(EventKind::Test, "hello").alert(Alert::QueueNotice)),
            Delivery::Journal
        );
        let mut buf = vec![0u8; 65536];
        let n = rx.recv(&mut buf).unwrap();
        let fields = parse_native(&buf[..n]).unwrap();
        assert!(fields.contains(&(
            "MESSAGE_ID".into(),
            "e72663eda21f4861949d502c83bd09d2".into()
        )));
        assert_eq!(w.counts(), (1, 0));
    }

    #[test]
    fn x2_large_entries_go_through_a_sealed_memfd() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let rx = UnixDatagram::bind(&path).unwrap();
        let w = JournalWriter::new(&path);
        let big = "x".repeat(1 << 20);
        assert_eq!(
            w.write(&Event::new(EventKind::Test, big.clone())),
            Delivery::Journal
        );
        // The datagram is empty and carries one descriptor.
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        let mut data = [0u8; 16];
        let mut iov = [std::io::IoSliceMut::new(&mut data)];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg =
            recvmsg::<()>(rx.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty()).unwrap();
        assert_eq!(msg.bytes, 0);
        let fd = match msg.cmsgs().unwrap().next() {
            Some(ControlMessageOwned::ScmRights(fds)) => fds[0],
            other => panic!("{other:?}"),
        };
        // SAFETY: the descriptor was just received and is owned by nobody else.
        let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // The descriptor shares the writer's file offset (at the end); journald maps from 0.
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).unwrap();
        let mut content = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut content).unwrap();
        let fields = parse_native(&content).unwrap();
        assert_eq!(fields[0], ("MESSAGE".to_string(), big));
    }

    #[test]
    fn x2_unreachable_journal_falls_back_to_stderr() {
        let w = JournalWriter::new(Path::new("/nonexistent/journal/socket"));
        assert!(!w.socket_present());
        assert_eq!(
            w.write(&Event::new(EventKind::Test, "hello")),
            Delivery::Stderr
        );
        assert_eq!(w.last_delivery(), Delivery::Stderr);
        assert_eq!(w.counts(), (0, 1));
    }
}
