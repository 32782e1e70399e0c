//! Authorization of D-Bus callers (SPEC X-1).
//!
//! The caller's uid comes from the bus (`GetConnectionCredentials` of the sender), never from
//! the message. Membership of group `outlive` means the groups of that uid in the user database
//! (getgrouplist), the same rule dbus-daemon's policy applies; supplementary groups of the
//! calling process are not trusted. The shipped bus policy filters first; the agent checks
//! everything again.

use zbus::Connection;
use zbus::message::Header;

use super::errors::OutliveError;

pub(crate) use crate::facts::users::{GROUP, is_member};

/// Who may do what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthPolicy {
    /// `--user` mode: the agent's own uid is the only privileged caller (besides root).
    pub user_mode: bool,
    pub agent_uid: u32,
}

/// An identified caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    /// The primary gid of the uid in the user database (when known).
    pub gid: Option<u32>,
    /// Member of group `outlive` by the user database.
    pub member: bool,
}

impl Caller {
    /// Whether the caller is root.
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// May call mutating methods: root, a member of `outlive`, or (user mode) the agent's uid.
    pub fn may_mutate(&self, p: &AuthPolicy) -> bool {
        if p.user_mode {
            self.uid == p.agent_uid || self.is_root()
        } else {
            self.is_root() || self.member
        }
    }

    /// May call root-only methods (`Reevaluate`, lock clear): root, or (user mode) the agent's uid.
    pub fn may_administer(&self, p: &AuthPolicy) -> bool {
        self.is_root() || (p.user_mode && self.uid == p.agent_uid)
    }

    /// `AccessDenied` unless `may_mutate`.
    pub fn require_mutate(&self, p: &AuthPolicy, what: &str) -> Result<(), OutliveError> {
        if self.may_mutate(p) {
            Ok(())
        } else if p.user_mode {
            Err(OutliveError::AccessDenied(format!(
                "{what}: only uid {} may do this on this user agent",
                p.agent_uid
            )))
        } else {
            Err(OutliveError::AccessDenied(format!(
                "{what}: uid {} is neither root nor a member of group `{GROUP}` (ask an administrator: \
                 `usermod -aG {GROUP} <user>`, then log in again)",
                self.uid
            )))
        }
    }

    /// `AccessDenied` unless `may_administer`.
    pub fn require_admin(&self, p: &AuthPolicy, what: &str) -> Result<(), OutliveError> {
        if self.may_administer(p) {
            Ok(())
        } else {
            Err(OutliveError::AccessDenied(format!(
                "{what}: only root may do this (uid {} asked)",
                self.uid
            )))
        }
    }
}

/// The uid of the sender of `hdr`: from the bus daemon on a bus connection, from the socket's
/// peer credentials on a peer-to-peer one.
pub(crate) async fn caller_uid(conn: &Connection, hdr: &Header<'_>) -> Result<u32, OutliveError> {
    if conn.is_bus() {
        let sender = hdr
            .sender()
            .ok_or_else(|| OutliveError::AccessDenied("the call has no sender".into()))?
            .to_owned();
        // No property cache: a caching proxy subscribes to PropertiesChanged (an AddMatch and
        // a RemoveMatch round trip to the bus daemon) every time it is built.
        let proxy = zbus::fdo::DBusProxy::builder(conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let creds = proxy.get_connection_credentials(sender.into()).await?;
        creds.unix_user_id().ok_or_else(|| {
            OutliveError::AccessDenied("the bus does not know the caller's uid".into())
        })
    } else {
        let creds = conn
            .peer_creds()
            .await
            .map_err(|e| OutliveError::ZBus(e.into()))?;
        creds
            .unix_user_id()
            .ok_or_else(|| OutliveError::AccessDenied("the peer's uid is unknown".into()))
    }
}

/// A caller by uid, with membership from the user database.
pub(crate) fn identify(uid: u32) -> Caller {
    match crate::facts::users::account(uid) {
        crate::facts::users::Lookup::Found(a) => Caller {
            uid,
            gid: Some(a.gid),
            member: is_member(&a.name, a.gid, GROUP),
        },
        _ => Caller {
            uid,
            gid: None,
            member: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(uid: u32, member: bool) -> Caller {
        Caller {
            uid,
            gid: None,
            member,
        }
    }

    #[test]
    fn x1_mutation_needs_root_or_membership() {
        let sys = AuthPolicy {
            user_mode: false,
            agent_uid: 0,
        };
        assert!(c(0, false).may_mutate(&sys));
        assert!(c(1000, true).may_mutate(&sys));
        assert!(!c(1000, false).may_mutate(&sys));
        assert!(c(0, false).may_administer(&sys));
        assert!(
            !c(1000, true).may_administer(&sys),
            "membership does not grant root-only methods"
        );
        let user = AuthPolicy {
            user_mode: true,
            agent_uid: 1000,
        };
        assert!(c(1000, false).may_mutate(&user));
        assert!(c(1000, false).may_administer(&user));
        assert!(
            !c(1001, true).may_mutate(&user),
            "in user mode, group membership grants nothing"
        );
    }

    #[test]
    fn x1_denials_say_what_to_do() {
        let sys = AuthPolicy {
            user_mode: false,
            agent_uid: 0,
        };
        let e = c(1000, false).require_mutate(&sys, "Cancel").unwrap_err();
        assert!(
            matches!(&e, OutliveError::AccessDenied(m) if m.contains("usermod -aG outlive")),
            "{e:?}"
        );
    }

    #[test]
    fn membership_of_root_in_root_group() {
        // root's primary group is root: membership by primary gid counts.
        assert!(is_member("root", 0, "root"));
        assert!(!is_member("root", 0, "no-such-group-outlive-test"));
    }
}
