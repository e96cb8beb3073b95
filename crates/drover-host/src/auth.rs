//! Who may do what: callers, roles and permissions.
//!
//! The smallest model later features can grow: a caller is identified by its unix uid (from the
//! API socket's peer credentials; tokens for TCP callers plug in here later), holds one role, and
//! each API action needs one permission. uid 0 is always `admin`; other uids have the role an
//! admin granted them (`drover auth grant`), or none.

use crate::error::HostError;
use serde::{Deserialize, Serialize};
use std::fmt;

/// What an action needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// See VMs, configs, host facts.
    Read,
    /// Create, start, stop, delete VMs.
    Lifecycle,
    /// Change a VM's configuration (live or for the next boot).
    Change,
    /// Run commands in guests.
    Exec,
    /// Flip a VM's persistence flag or mode, promote generations.
    ConfigPersist,
    /// Grant and revoke guest principals, read audit logs.
    GuestAccess,
    /// Manage roles, build images.
    Admin,
}

impl Permission {
    /// The permission's name as errors and docs spell it.
    pub fn name(self) -> &'static str {
        match self {
            Permission::Read => "vm.read",
            Permission::Lifecycle => "vm.lifecycle",
            Permission::Change => "config.change",
            Permission::Exec => "vm.exec",
            Permission::ConfigPersist => "config.persist",
            Permission::GuestAccess => "guest.access",
            Permission::Admin => "admin",
        }
    }
}

/// A role: a named set of permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Admin,
    /// Runs and changes VMs; may not change persistence, guest access or roles.
    Operator,
    /// Reads only.
    Viewer,
}

impl Role {
    /// Whether the role holds `p`.
    pub fn allows(self, p: Permission) -> bool {
        match self {
            Role::Admin => true,
            Role::Operator => matches!(
                p,
                Permission::Read | Permission::Lifecycle | Permission::Change | Permission::Exec
            ),
            Role::Viewer => p == Permission::Read,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Role::Admin),
            "operator" => Ok(Role::Operator),
            "viewer" => Ok(Role::Viewer),
            _ => Err(format!("unknown role {s:?}: use admin, operator or viewer")),
        }
    }
}

/// The caller of an API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// How it is named in journals and errors (`uid 1000`).
    pub name: String,
    /// Its role, if any.
    pub role: Option<Role>,
}

impl Caller {
    /// droverd itself (seals at shutdown, re-adoption).
    pub fn daemon() -> Caller {
        Caller {
            name: "droverd".into(),
            role: Some(Role::Admin),
        }
    }

    /// Fail with a message that names what is missing, unless the caller holds `p`.
    pub fn require(&self, p: Permission) -> Result<(), HostError> {
        match self.role {
            Some(r) if r.allows(p) => Ok(()),
            Some(r) => Err(HostError::Forbidden(format!(
                "{} (role {r}) lacks the {} permission for this; an admin can grant a role that has it (`drover auth grant`)",
                self.name,
                p.name()
            ))),
            None => Err(HostError::Forbidden(format!(
                "{} has no role on this host; an admin can grant one (`drover auth grant --uid N --role operator`)",
                self.name
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_hold_what_they_say() {
        use Permission::*;
        let all = [
            Read,
            Lifecycle,
            Change,
            Exec,
            ConfigPersist,
            GuestAccess,
            Admin,
        ];
        assert!(all.iter().all(|&p| Role::Admin.allows(p)));
        assert!(!Role::Operator.allows(ConfigPersist) && Role::Operator.allows(Change));
        assert_eq!(all.iter().filter(|&&p| Role::Viewer.allows(p)).count(), 1);
        let op = Caller {
            name: "uid 1000".into(),
            role: Some(Role::Operator),
        };
        let err = op.require(ConfigPersist).unwrap_err().to_string();
        assert!(
            err.contains("config.persist") && err.contains("uid 1000"),
            "{err}"
        );
        assert!(Caller {
            name: "uid 5".into(),
            role: None
        }
        .require(Read)
        .is_err());
    }
}
