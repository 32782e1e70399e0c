//! Host identity (SPEC H-1, H-5): hostname, `host_id`, boot id, pid namespace, and whether the
//! agent observes the host from a mount namespace other than PID 1's.
//!
//! The raw machine id is confidential. It is read here, turned into `host_id` (systemd's
//! application-specific machine id for outlive's application id) and dropped: nothing else in
//! the program ever sees it. A missing, empty or `uninitialized` machine id is an error the
//! agent treats as fatal; it never invents a random identity.

use std::fmt;
use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// outlive's application id for `host_id` (DESIGN §2; keep forever).
pub const APP_ID: Id128 = Id128([
    0xa2, 0x8d, 0xe9, 0x24, 0xe9, 0x68, 0x41, 0x80, 0xbd, 0xdc, 0xcc, 0x53, 0xf2, 0x0f, 0x16, 0x5a,
]);

/// A 128-bit id printed as 32 lowercase hex digits (systemd's `sd_id128` form).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id128(pub [u8; 16]);

impl Id128 {
    /// Parse 32 hex digits, or the 36-character UUID form with dashes at exactly 8, 13, 18
    /// and 23 (8-4-4-4-12). Case-insensitive; surrounding whitespace is ignored. The all-zero
    /// id is rejected (systemd's null id). Anything else is `None`, never a panic: ids come
    /// from files and the bus (SPEC §12 H-1).
    pub fn parse(s: &str) -> Option<Id128> {
        let b = s.trim().as_bytes();
        let hex: Vec<u8> = match b.len() {
            32 => b.to_vec(),
            36 => {
                let dashes = [8, 13, 18, 23];
                if (0..36).any(|i| (b[i] == b'-') != dashes.contains(&i)) {
                    return None;
                }
                b.iter().copied().filter(|&c| c != b'-').collect()
            }
            _ => return None,
        };
        if hex.len() != 32 || !hex.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        if out == [0; 16] {
            return None;
        }
        Some(Id128(out))
    }

    /// 32 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Id128 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Id128 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id128({self})")
    }
}

/// The machine id, kept private to this module's callers for as long as it takes to derive
/// `host_id`. It deliberately implements neither Display nor Serialize, and its Debug is
/// redacted.
pub struct MachineId(Id128);

impl fmt::Debug for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MachineId(<redacted>)")
    }
}

/// Why identity could not be established. Each is a fatal start error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityError {
    /// No machine id file could be read.
    MachineIdMissing(String),
    /// The file exists but holds no id (empty, `uninitialized`, or malformed).
    MachineIdInvalid(String),
    /// The boot id could not be read.
    BootIdUnreadable(String),
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityError::MachineIdMissing(d) => write!(
                f,
                "no machine id: {d}; run `systemd-machine-id-setup` (or `dbus-uuidgen --ensure=/etc/machine-id`) \
                 to create /etc/machine-id, then start outlived again"
            ),
            IdentityError::MachineIdInvalid(d) => write!(
                f,
                "the machine id is not usable: {d}; outlived will not invent an identity. Initialize it with \
                 `systemd-machine-id-setup`, then start outlived again"
            ),
            IdentityError::BootIdUnreadable(d) => write!(f, "cannot read the boot id: {d}"),
        }
    }
}

impl std::error::Error for IdentityError {}

impl IdentityError {
    /// The errno sent with `ERRNO=` when this error ends the start.
    pub fn errno(&self) -> i32 {
        match self {
            IdentityError::MachineIdMissing(_) => libc::ENOENT,
            IdentityError::MachineIdInvalid(_) => libc::EINVAL,
            IdentityError::BootIdUnreadable(_) => libc::EIO,
        }
    }
}

/// Parse the contents of a machine id file. `uninitialized` (systemd's first-boot marker),
/// an empty file and anything that is not one 128-bit id are refused.
pub fn parse_machine_id(contents: &str, source: &Path) -> Result<MachineId, IdentityError> {
    let t = contents.trim();
    if t.is_empty() {
        return Err(IdentityError::MachineIdInvalid(format!(
            "{} is empty",
            source.display()
        )));
    }
    if t == "uninitialized" {
        return Err(IdentityError::MachineIdInvalid(format!(
            "{} says `uninitialized` (first boot not completed)",
            source.display()
        )));
    }
    match Id128::parse(t) {
        Some(id) if t.len() == 32 => Ok(MachineId(id)),
        _ => Err(IdentityError::MachineIdInvalid(format!(
            "{} does not hold 32 hexadecimal digits",
            source.display()
        ))),
    }
}

/// systemd's application-specific id: the first 16 bytes of HMAC-SHA256(key = machine id,
/// message = application id), with the UUID version-4 and variant bits set
/// (`sd_id128_get_machine_app_specific`, `id128_make_v4_uuid`).
pub fn app_specific_id(machine: &MachineId, app: &Id128) -> Id128 {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&machine.0.0)
        .expect("HMAC accepts any key length");
    mac.update(&app.0);
    let digest = mac.finalize().into_bytes();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out[6] = (out[6] & 0x0f) | 0x40;
    out[8] = (out[8] & 0x3f) | 0x80;
    Id128(out)
}

/// Derive `host_id` from a machine id.
pub fn host_id(machine: &MachineId) -> Id128 {
    app_specific_id(machine, &APP_ID)
}

/// Who this host is, as far as anything outside the process may know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// gethostname(2); display only, never an identity.
    pub hostname: String,
    /// H-1 `host_id`.
    pub host_id: Id128,
    /// This boot's id.
    pub boot_id: Id128,
    /// Inode of our pid namespace (Linux).
    pub pid_ns: Option<u64>,
    /// Whether our mount namespace differs from PID 1's (None: cannot tell, with why).
    pub observing_namespace_differs: Result<bool, String>,
}

/// The current hostname (gethostname(2)); never fails: an unreadable name reads `(unknown)`.
pub fn hostname() -> String {
    match nix::unistd::gethostname() {
        Ok(h) => h.to_string_lossy().into_owned(),
        Err(e) => format!("(unknown: {e})"),
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    pub(super) const MACHINE_ID_PATHS: [&str; 2] = ["/etc/machine-id", "/var/lib/dbus/machine-id"];

    pub(super) fn machine_id() -> Result<MachineId, IdentityError> {
        let mut tried = Vec::new();
        for p in MACHINE_ID_PATHS {
            match std::fs::read_to_string(p) {
                Ok(s) => return parse_machine_id(&s, Path::new(p)),
                Err(e) => tried.push(format!("{p}: {e}")),
            }
        }
        Err(IdentityError::MachineIdMissing(tried.join("; ")))
    }

    pub(super) fn boot_id() -> Result<Id128, IdentityError> {
        let p = "/proc/sys/kernel/random/boot_id";
        let s = std::fs::read_to_string(p)
            .map_err(|e| IdentityError::BootIdUnreadable(format!("{p}: {e}")))?;
        Id128::parse(&s).ok_or_else(|| IdentityError::BootIdUnreadable(format!("{p}: not a UUID")))
    }

    pub(super) fn pid_ns() -> Option<u64> {
        std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
    }

    pub(super) fn observing_namespace_differs() -> Result<bool, String> {
        let ours = std::fs::metadata("/proc/self/ns/mnt")
            .map_err(|e| format!("/proc/self/ns/mnt: {e}"))?;
        let init =
            std::fs::metadata("/proc/1/ns/mnt").map_err(|e| format!("/proc/1/ns/mnt: {e}"))?;
        Ok((ours.dev(), ours.ino()) != (init.dev(), init.ino()))
    }
}

#[cfg(target_os = "macos")]
mod sys {
    use super::*;

    pub fn machine_id() -> Result<MachineId, IdentityError> {
        let raw = crate::facts::macos::host_uuid()
            .map_err(|e| IdentityError::MachineIdMissing(format!("gethostuuid(2): {e}")))?;
        if raw == [0u8; 16] {
            return Err(IdentityError::MachineIdInvalid(
                "gethostuuid(2) returned the null UUID".into(),
            ));
        }
        Ok(MachineId(Id128(raw)))
    }

    pub fn boot_id() -> Result<Id128, IdentityError> {
        let s = crate::facts::macos::sysctl_string("kern.bootsessionuuid").map_err(|e| {
            IdentityError::BootIdUnreadable(format!("sysctl kern.bootsessionuuid: {e}"))
        })?;
        Id128::parse(&s).ok_or_else(|| {
            IdentityError::BootIdUnreadable("kern.bootsessionuuid is not a UUID".into())
        })
    }

    pub fn pid_ns() -> Option<u64> {
        None
    }

    pub fn observing_namespace_differs() -> Result<bool, String> {
        Ok(false)
    }
}

/// Read the machine id (confidential; used only to derive `host_id`).
pub fn machine_id() -> Result<MachineId, IdentityError> {
    sys::machine_id()
}

/// This boot's id.
pub fn boot_id() -> Result<Id128, IdentityError> {
    #[cfg(feature = "fault-hooks")]
    if let Some(id) = crate::faults::boot_id() {
        return Ok(id);
    }
    sys::boot_id()
}

/// Inode of our pid namespace (Linux; None elsewhere or when unreadable).
pub fn pid_ns() -> Option<u64> {
    sys::pid_ns()
}

/// H-5: whether the agent's mount namespace differs from PID 1's.
pub fn observing_namespace_differs() -> Result<bool, String> {
    sys::observing_namespace_differs()
}

/// Gather the whole identity. Fails only for the fatal causes of H-1.
pub fn identity() -> Result<Identity, IdentityError> {
    let machine = machine_id()?;
    Ok(Identity {
        hostname: hostname(),
        host_id: host_id(&machine),
        boot_id: boot_id()?,
        pid_ns: pid_ns(),
        observing_namespace_differs: observing_namespace_differs(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mid(s: &str) -> MachineId {
        parse_machine_id(s, Path::new("test")).unwrap()
    }

    #[test]
    fn h1_host_id_matches_an_independent_hmac_vector() {
        // Computed independently with Python's hmac/hashlib for this fake machine id:
        //   d = hmac.new(bytes.fromhex(MID), bytes.fromhex(APP), 'sha256').digest()[:16]
        //   d[6] = d[6] & 0x0f | 0x40; d[8] = d[8] & 0x3f | 0x80
        let m = mid("0123456789abcdef0123456789abcdef\n");
        assert_eq!(host_id(&m).to_hex(), "ca2e1b928ada45ee95113c4ef501fe9a");
    }

    #[test]
    fn h1_host_id_has_uuid_v4_bits() {
        let id = host_id(&mid("ffffffffffffffffffffffffffffffff"));
        assert_eq!(id.0[6] >> 4, 4);
        assert_eq!(id.0[8] >> 6, 0b10);
    }

    #[test]
    fn h1_machine_id_refusals() {
        let p = Path::new("/etc/machine-id");
        for bad in [
            "",
            "\n",
            "uninitialized\n",
            "xyz",
            "00000000000000000000000000000000",
            "0123",
        ] {
            assert!(
                matches!(
                    parse_machine_id(bad, p),
                    Err(IdentityError::MachineIdInvalid(_))
                ),
                "{bad:?} must be refused"
            );
        }
        // systemd writes exactly 32 hex digits; the dashed UUID form is not a machine id file.
        assert!(parse_machine_id("01234567-89ab-cdef-0123-456789abcdef", p).is_err());
    }

    #[test]
    fn h1_machine_id_debug_is_redacted() {
        let m = mid("0123456789abcdef0123456789abcdef");
        assert!(!format!("{m:?}").contains("0123"));
    }

    #[test]
    fn id128_parses_both_forms() {
        let a = Id128::parse("08ec98a5-da1a-40b0-b9f0-f31e697132da\n").unwrap();
        let b = Id128::parse("08EC98A5DA1A40B0B9F0F31E697132DA").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_hex(), "08ec98a5da1a40b0b9f0f31e697132da");
        assert!(Id128::parse("08ec98a5-da1a-40b0-b9f0+f31e697132da").is_none());
        assert!(Id128::parse("zz").is_none());
    }

    /// SPEC §12 H-1/L-4 (core review finding 2): an id read from a file or the bus is checked
    /// for its exact shape, and a malformed one is refused, never a panic. The first input is
    /// the reviewer's: 36 characters with one dash too many, which left 31 hex digits.
    #[test]
    fn h1_id128_exact_shape_reviewer_inputs_never_panic() {
        for bad in [
            "01234567-89ab-cdef-0123-4567-9abcdef",
            "01234567-89ab-cdef-0123-456789abcde-",
            "-1234567-89ab-cdef-0123-456789abcdef",
            "01234567-89ab-cdef-0123-45678-abcdef",
            "0123456789abcdef0123456789abcde-",
            "0123456789abcdef0123456789abcdeg",
            "+123456789abcdef0123456789abcdef",
            "0123456789abcdef0123456789abcdéf",
            "01234567-89ab-cdef-0123-456789abcdé",
            "01234567\u{0}89ab-cdef-0123-456789abcdef",
            "é0123456789abcdef0123456789abcd",
        ] {
            assert!(Id128::parse(bad).is_none(), "{bad:?} must be refused");
        }
        // Every 36-byte string of dashes and hex digits: refused unless exactly 8-4-4-4-12.
        for extra in 0..36 {
            let mut s: Vec<u8> = b"01234567-89ab-cdef-0123-456789abcdef".to_vec();
            s[extra] = b'-';
            let ok = [8, 13, 18, 23].contains(&extra);
            let text = String::from_utf8(s).unwrap();
            assert_eq!(Id128::parse(&text).is_some(), ok, "{text}");
        }
    }
}
