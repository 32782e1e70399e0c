//! The user database and acting as a user on the filesystem (SPEC §12 Q-1, D-6 check 2, paths
//! of members' runs).
//!
//! Lookups go through NSS (`getpwuid_r`, `getgrouplist`), which may block on a directory
//! service: they never run on the bus's dispatch thread, and the drainer runs them on the facts
//! worker under its timeout.
//!
//! [`as_user`] runs a filesystem check with a user's credentials instead of root's, so that what
//! the agent reports about a member's paths is what that member could see for themselves. It
//! runs the check on a thread of its own whose filesystem uid, gid and supplementary groups are
//! the user's, set with raw system calls: credentials are per thread in Linux, but glibc's
//! `setgroups` would apply to every thread of the process. The thread ends with the check, so
//! its credentials are never restored and never serve anything else. Switching the filesystem
//! uid away from 0 also drops the filesystem capabilities (CAP_DAC_READ_SEARCH among them) from
//! that thread: the kernel decides exactly as it would for the user (modes, ACLs, LSMs, FUSE's
//! `allow_other`). It needs CAP_SETUID and CAP_SETGID; without them the answer is an error,
//! which callers report as undecided.

use std::ffi::CString;

/// The group whose members may act on the queue.
pub(crate) const GROUP: &str = "outlive";

/// A user from the user database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub name: String,
    /// The primary group.
    pub gid: u32,
}

/// What the user database says of a uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Account),
    /// No such user.
    Unknown,
    /// The database did not answer (a directory service down): decide later.
    Failed(String),
}

/// Look up `uid`.
pub(crate) fn account(uid: u32) -> Lookup {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => Lookup::Found(Account {
            uid,
            name: u.name,
            gid: u.gid.as_raw(),
        }),
        Ok(None) => Lookup::Unknown,
        Err(e) => Lookup::Failed(format!(
            "the user database did not answer for uid {uid}: {e}"
        )),
    }
}

/// The uid and gid a unit's `User=` and `Group=` stand for (names or numbers; an empty `User=`
/// is root): `Group=` when set, else the user's primary group. None when either is not in the
/// user database.
pub(crate) fn resolve(user: &str, group: &str) -> Option<(u32, u32)> {
    let (uid, primary) = if user.is_empty() {
        (0, Some(0))
    } else if let Ok(n) = user.parse::<u32>() {
        match account(n) {
            Lookup::Found(a) => (n, Some(a.gid)),
            _ => (n, None),
        }
    } else {
        let u = nix::unistd::User::from_name(user).ok().flatten()?;
        (u.uid.as_raw(), Some(u.gid.as_raw()))
    };
    let gid = if group.is_empty() {
        primary?
    } else if let Ok(n) = group.parse::<u32>() {
        n
    } else {
        nix::unistd::Group::from_name(group)
            .ok()
            .flatten()?
            .gid
            .as_raw()
    };
    Some((uid, gid))
}

/// The groups a login of `a` would have, its primary group first (as `initgroups` sets them),
/// or with `gid` as the primary group when given.
pub(crate) fn login_groups(a: &Account, gid: u32) -> Vec<u32> {
    let mut out = vec![gid];
    if let Ok(name) = CString::new(a.name.as_str())
        && let Ok(gs) = nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid))
    {
        for g in gs {
            if !out.contains(&g.as_raw()) {
                out.push(g.as_raw());
            }
        }
    }
    out
}

/// Whether `user` (with primary group `gid`) is in `group` by the user database.
pub(crate) fn is_member(user: &str, gid: u32, group: &str) -> bool {
    let Ok(Some(g)) = nix::unistd::Group::from_name(group) else {
        return false;
    };
    if g.gid.as_raw() == gid {
        return true;
    }
    let Ok(name) = CString::new(user) else {
        return false;
    };
    match nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid)) {
        Ok(groups) => groups.contains(&g.gid),
        Err(_) => g.mem.iter().any(|m| m == user),
    }
}

/// The credentials a filesystem check runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary group among them, as a login has it).
    pub groups: Vec<u32>,
}

impl Creds {
    /// The credentials of a login of `a` with primary group `gid`.
    pub fn of(a: &Account, gid: u32) -> Creds {
        Creds {
            uid: a.uid,
            gid,
            groups: login_groups(a, gid),
        }
    }

    /// Whether these are the process's own (no switch needed).
    pub fn are_mine(&self) -> bool {
        nix::unistd::geteuid().as_raw() == self.uid && nix::unistd::getegid().as_raw() == self.gid
    }
}

/// Run `f` with `who`'s filesystem credentials, on a thread of its own (see the module doc).
/// An error when the credentials cannot be taken (no CAP_SETUID/CAP_SETGID, or not Linux).
pub(crate) fn as_user<T: Send>(who: &Creds, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    if who.are_mine() {
        return Ok(f());
    }
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("outlive-as-user".into())
            .spawn_scoped(s, move || {
                become_user(who)?;
                Ok(f())
            })?
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the check panicked")))
    })
}

#[cfg(target_os = "linux")]
fn become_user(who: &Creds) -> std::io::Result<()> {
    let denied = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "cannot check as uid {} ({what}): the agent needs CAP_SETUID and CAP_SETGID to check a user's paths with that user's credentials",
                who.uid
            ),
        )
    };
    let groups: Vec<libc::gid_t> = who.groups.clone();
    // SAFETY: raw system calls on this thread only; the pointer and length describe `groups`.
    unsafe {
        if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
            return Err(denied("setgroups"));
        }
        // setfsgid and setfsuid return the previous value and cannot fail visibly: set, then
        // read back (an invalid id changes nothing and returns the current one).
        libc::syscall(libc::SYS_setfsgid, who.gid);
        if libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32 != who.gid {
            return Err(denied("setfsgid"));
        }
        libc::syscall(libc::SYS_setfsuid, who.uid);
        if libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32 != who.uid {
            return Err(denied("setfsuid"));
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn become_user(who: &Creds) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        format!(
            "cannot check paths as uid {} on this system: only the agent's own are checked",
            who.uid
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn root_is_found_and_in_its_own_group() {
        match account(0) {
            Lookup::Found(a) => {
                assert_eq!((a.uid, a.name.as_str(), a.gid), (0, "root", 0));
                assert_eq!(login_groups(&a, 0)[0], 0);
            }
            other => panic!("{other:?}"),
        }
        assert!(is_member("root", 0, "root"));
        assert_eq!(account(4_242_424), Lookup::Unknown);
        assert_eq!(resolve("", ""), Some((0, 0)));
        assert_eq!(resolve("root", ""), Some((0, 0)));
        assert_eq!(resolve("0", "7"), Some((0, 7)));
        assert_eq!(resolve("root", "root"), Some((0, 0)));
        assert_eq!(resolve("no-such-user-here", ""), None);
        assert_eq!(resolve("4242424", ""), None, "no primary group to take");
        assert_eq!(resolve("4242424", "5"), Some((4_242_424, 5)));
        assert_eq!(resolve("root", "no-such-group-here"), None);
    }

    /// What a user cannot reach, a check as that user does not see: the answer is the
    /// kernel's for that user, even though the agent (root, CAP_DAC_READ_SEARCH) could.
    #[test]
    fn a_check_as_a_user_sees_what_that_user_sees() {
        if !crate::testing::root("taking another user's credentials") {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let closed = d.path().join("closed");
        std::fs::create_dir(&closed).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(closed.join("inside"), "x").unwrap();
        let nobody = Creds {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        };
        let inside = closed.join("inside");
        let seen = as_user(&nobody, || std::fs::metadata(&inside).map(|_| ())).unwrap();
        assert_eq!(
            seen.unwrap_err().kind(),
            std::io::ErrorKind::PermissionDenied
        );
        // The directory itself is visible (its parent is open), and root still sees inside.
        assert!(as_user(&nobody, || closed.is_dir()).unwrap());
        assert!(
            inside.exists(),
            "the calling thread kept root's credentials"
        );
        // The identity was the user's, the thread's own.
        // SAFETY: setfsuid/setfsgid with an invalid id change nothing and return the current
        // filesystem ids; they touch no memory.
        let ids = as_user(&nobody, || unsafe {
            (
                libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32,
                libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32,
            )
        })
        .unwrap();
        assert_eq!(ids, (65534, 65534));
        // SAFETY: as above.
        let mine = unsafe { libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32 };
        assert_eq!(mine, 0);
        // A group grants what the group may.
        nix::unistd::chown(&closed, None, Some(nix::unistd::Gid::from_raw(4_242_424))).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o750)).unwrap();
        let member = Creds {
            groups: vec![65534, 4_242_424],
            ..nobody.clone()
        };
        assert!(as_user(&member, || inside.exists()).unwrap());
        assert!(!as_user(&nobody, || inside.exists()).unwrap());
    }
}
