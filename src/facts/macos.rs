//! macOS shims for host facts (SPEC H-1, H-3): gethostuuid(2), `kern.bootsessionuuid`,
//! proc_pidinfo(PROC_PIDTBSDINFO) and statfs(2) `MNT_LOCAL`.
//!
//! Deliberately thin: each function is one system call and a conversion; every decision made on
//! what they return lives in platform-neutral code (`identity.rs`, `process.rs`,
//! `classify::classify_mnt_local`) that is tested on Linux. These machines cannot build for
//! macOS, so this file is checked by review against libc's apple bindings (libc 0.2.191:
//! `gethostuuid`, `sysctlbyname`, `proc_pidinfo`, `proc_bsdinfo`, `PROC_PIDTBSDINFO`, `SZOMB`,
//! `statfs` with `f_fstypename`/`f_mntonname`/`f_mntfromname`, `MNT_LOCAL`, `MNT_RDONLY`).

use std::ffi::{CStr, CString, c_char};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// gethostuuid(2) with a 5-second wait: the hardware UUID, used only to derive `host_id`.
pub fn host_uuid() -> io::Result<[u8; 16]> {
    let mut id = [0u8; 16];
    let wait = libc::timespec {
        tv_sec: 5,
        tv_nsec: 0,
    };
    // SAFETY: `id` is 16 writable bytes (uuid_t) and `wait` outlives the call.
    let rc = unsafe { libc::gethostuuid(id.as_mut_ptr(), &wait) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(id)
}

/// A string sysctl by name (e.g. `kern.bootsessionuuid`).
pub fn sysctl_string(name: &str) -> io::Result<String> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = [0u8; 256];
    let mut len: libc::size_t = buf.len();
    // SAFETY: `buf` has `len` writable bytes; no new value is set.
    let rc = unsafe {
        libc::sysctlbyname(
            cname.as_ptr(),
            buf.as_mut_ptr().cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let bytes = &buf[..len.min(buf.len())];
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    Ok(String::from_utf8_lossy(&bytes[..end]).into_owned())
}

/// A 64-bit integer sysctl by name (e.g. `hw.memsize`).
pub fn sysctl_u64(name: &str) -> io::Result<u64> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut v: u64 = 0;
    let mut len: libc::size_t = std::mem::size_of::<u64>();
    // SAFETY: `v` has `len` writable bytes; no new value is set.
    let rc = unsafe {
        libc::sysctlbyname(
            cname.as_ptr(),
            (&mut v as *mut u64).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len != std::mem::size_of::<u64>() {
        return Err(io::Error::other(format!("{name}: {len} bytes, not 8")));
    }
    Ok(v)
}

/// State letter and start time (microseconds since the epoch) of a pid, via
/// proc_pidinfo(PROC_PIDTBSDINFO). `Z` for a zombie. None when the call fails (EPERM for
/// another user's process: the caller counts it alive with an unknown start time).
pub fn proc_stat(pid: i64) -> Option<(char, u64)> {
    let pid = i32::try_from(pid).ok()?;
    // SAFETY: proc_bsdinfo is plain old data; zeroed is a valid value.
    let mut info: libc::proc_bsdinfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::proc_bsdinfo>() as libc::c_int;
    // SAFETY: `info` is `size` writable bytes of the struct the flavour fills.
    let n = unsafe {
        libc::proc_pidinfo(
            pid,
            libc::PROC_PIDTBSDINFO,
            0,
            (&mut info as *mut libc::proc_bsdinfo).cast(),
            size,
        )
    };
    if n != size {
        return None;
    }
    let state = if info.pbi_status == libc::SZOMB {
        'Z'
    } else {
        'R'
    };
    Some((
        state,
        info.pbi_start_tvsec * 1_000_000 + info.pbi_start_tvusec,
    ))
}

/// What statfs(2) says of a path on macOS.
pub struct MacStatfs {
    pub fstypename: String,
    pub mnt_local: bool,
    pub read_only: bool,
    pub mount_point: PathBuf,
    pub source: String,
}

fn c_field(field: &[c_char]) -> String {
    // SAFETY: the kernel NUL-terminates these fixed-size fields; fall back to the whole field.
    let bytes: Vec<u8> = field.iter().map(|&c| c as u8).collect();
    match CStr::from_bytes_until_nul(&bytes) {
        Ok(c) => c.to_string_lossy().into_owned(),
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// statfs(2) of a path.
pub fn statfs(path: &Path) -> io::Result<MacStatfs> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: struct statfs is plain old data; zeroed is a valid value.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `s` a writable struct statfs.
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(MacStatfs {
        fstypename: c_field(&s.f_fstypename),
        mnt_local: s.f_flags & (libc::MNT_LOCAL as u32) != 0,
        read_only: s.f_flags & (libc::MNT_RDONLY as u32) != 0,
        mount_point: PathBuf::from(c_field(&s.f_mntonname)),
        source: c_field(&s.f_mntfromname),
    })
}
