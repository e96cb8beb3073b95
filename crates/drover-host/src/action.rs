//! Every verb on one VM — from operators, guests and peer hosts — with the permission it needs,
//! the states it is valid in and how it takes the VM's operation lock, as data checked in one
//! place (`Manager::door`). Firecracker's `VmmAction` is the model.
//!
//! Verbs that make a VM have none to look up yet and are checked by their features: create,
//! the new VMs of a clone (the template's side is [`VmAction::Clone`]) and a migration's
//! prepare on the destination (its commit and abort are here).

use crate::auth::Permission;
use drover_api::VmState;

/// Every state a VM can be in (for verbs that any state allows).
const ANY: &[VmState] = &VmState::ALL;

/// A verb on one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmAction {
    /// Launch QEMU (takes a `StartRequest`). Lifecycle; only when stopped.
    Start,
    /// Stop gracefully (agent, ACPI) then kill (timeout, force). Lifecycle; running or paused.
    Stop,
    /// Stop then start (timeout, force). Lifecycle; running or paused.
    Restart,
    /// Remove the VM and its owned disks (force, discard changes). Lifecycle; stopped or
    /// hibernated (`--force` stops it first).
    Delete,
    /// Run a command in the guest (argv, stdin, timeout). Exec; only when running; no lock
    /// (reads and guest commands never wait on an operation).
    Exec,
    /// Save to disk and stop. Lifecycle; only when running.
    Hibernate,
    /// Bring a hibernated VM back (optional new size, NICs, identity: those also need Change).
    /// Lifecycle; only when hibernated.
    Resume,
    /// Save the VM's state (optional name). Lifecycle; only when running.
    Save,
    /// Restore a saved state (its id or name), replacing a running VM. Lifecycle; running,
    /// stopped or hibernated; refused rather than queued while another operation runs.
    Restore,
    /// Delete a saved state. Lifecycle; any state (the feature refuses a hibernation's state).
    DropState,
    /// Attach, detach or resize (a list of changes). Change; any state (a stopped VM's change
    /// applies at its next start; the feature refuses the transient states).
    Change,
    /// Promote a config generation to the initial config. ConfigPersist (checked by the
    /// feature, which says what was refused); any state.
    Promote,
    /// Move the VM to another host (target, offline). Lifecycle; any state (the feature says
    /// which of live/offline fits the VM's state); refused while another operation runs.
    Migrate,
    /// Clone VMs from one of this (template) VM's states (names, count). Lifecycle; any state;
    /// the template's states stay put while its clones are made.
    Clone,
    /// Copy files into or out of the guest (path, offset, data). Exec; only when running; no
    /// lock (the agent serves it).
    Files,
    /// Type into the serial console (bytes). Exec, checked once per console session by the
    /// API; running or paused; no lock.
    ConsoleInput,
    /// A peer host hands over a VM that arrived here (migration commit). Admin; any state.
    MigrateCommit,
    /// A peer host gives up a migration to here: the arriving copy is thrown away. Admin; any
    /// state; no lock at the door (throwing the copy away takes it, so it never races a
    /// commit). A VM that is not here (never arrived, or gone already) is not an error.
    MigrateAbort,
    /// The guest asks for a save of itself (through the broker). Guest access, checked by the
    /// broker per app; only when running.
    GuestSave,
    /// The guest asks for one of its states to be restored. Guest access (broker); running,
    /// stopped or hibernated; refused while another operation runs.
    GuestRestore,
    /// The guest asks for a change of its own hardware. Guest access (broker); only when running.
    GuestChange,
}

/// How an action takes the VM's operation lock (`VmSlot::op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpLock {
    /// Wait for the running operation to finish.
    Wait,
    /// Refuse at once if another operation runs (restores and migrations are not queued
    /// behind an unknown operation; the caller decides again).
    Refuse,
    /// Take no lock: the action only reads, or talks to the guest.
    None,
}

impl VmAction {
    /// Every action, for tables and tests.
    pub const ALL: &'static [VmAction] = &[
        VmAction::Start,
        VmAction::Stop,
        VmAction::Restart,
        VmAction::Delete,
        VmAction::Exec,
        VmAction::Hibernate,
        VmAction::Resume,
        VmAction::Save,
        VmAction::Restore,
        VmAction::DropState,
        VmAction::Change,
        VmAction::Promote,
        VmAction::Clone,
        VmAction::Files,
        VmAction::ConsoleInput,
        VmAction::Migrate,
        VmAction::MigrateCommit,
        VmAction::MigrateAbort,
        VmAction::GuestSave,
        VmAction::GuestRestore,
        VmAction::GuestChange,
    ];

    /// The permission the door checks, or `None` where the feature checks a finer one itself
    /// (the guest broker's per-app grants; a promote's message that names what was refused).
    pub fn permission(self) -> Option<Permission> {
        use VmAction::*;
        match self {
            Start | Stop | Restart | Delete | Hibernate | Resume | Save | Restore | DropState
            | Migrate | Clone => Some(Permission::Lifecycle),
            Exec | Files => Some(Permission::Exec),
            Change => Some(Permission::Change),
            MigrateCommit | MigrateAbort => Some(Permission::Admin),
            Promote | ConsoleInput | GuestSave | GuestRestore | GuestChange => None,
        }
    }

    /// States in which the action may begin.
    pub fn allowed_states(self) -> &'static [VmState] {
        use VmAction::*;
        match self {
            Start => &[VmState::Stopped],
            // A hibernated VM's state goes with it.
            Delete => &[VmState::Stopped, VmState::Hibernated],
            // A guest QEMU paused (full disk) can still be stopped.
            Stop | Restart | ConsoleInput => &[VmState::Running, VmState::Paused],
            Exec | Files | Hibernate | Save | GuestSave | GuestChange => &[VmState::Running],
            Resume => &[VmState::Hibernated],
            // Checked once the state to restore is known (which may be the VM's hibernation).
            Restore | GuestRestore | DropState | Change | Promote | Clone | Migrate
            | MigrateCommit | MigrateAbort => ANY,
        }
    }

    /// How the action takes the operation lock.
    pub fn op_lock(self) -> OpLock {
        use VmAction::*;
        match self {
            Exec | Files | ConsoleInput | MigrateAbort => OpLock::None,
            Restore | GuestRestore | Migrate => OpLock::Refuse,
            _ => OpLock::Wait,
        }
    }

    /// The verb as a person types it.
    pub fn verb(self) -> &'static str {
        use VmAction::*;
        match self {
            Start => "start",
            Stop => "stop",
            Restart => "restart",
            Delete => "delete",
            // The word the file copy's messages always used.
            Exec | Files => "exec",
            ConsoleInput => "type into",
            Hibernate => "hibernate",
            Resume => "resume",
            Save | GuestSave => "save",
            Restore | GuestRestore => "restore",
            DropState => "delete the state of",
            Change | GuestChange => "change",
            Promote => "promote a generation of",
            Clone => "clone",
            Migrate => "migrate",
            MigrateCommit => "commit the migration of",
            MigrateAbort => "abort the migration of",
        }
    }

    /// What a refused lock says (`OpLock::Refuse`).
    pub fn busy(self, name: &str) -> String {
        match self {
            VmAction::Migrate => format!(
                "another operation (perhaps a migration) is running on VM {name}; wait for it \
                 or cancel it with `drover vm migrate {name} --cancel`"
            ),
            VmAction::GuestRestore => {
                format!("another operation is running on VM {name}; ask again when it has finished")
            }
            _ => format!(
                "another operation is running on VM {name}; {} when it has finished",
                self.verb()
            ),
        }
    }

    /// `Ok` if allowed in `state`, else a message that says what to do.
    pub fn check(self, name: &str, state: VmState) -> Result<(), String> {
        use VmAction::*;
        if self.allowed_states().contains(&state) {
            return Ok(());
        }
        Err(match (self, state) {
            (Save, s) => format!("VM {name} is {s}; only a running VM's state can be saved"),
            (GuestChange, _) => format!("VM {name} is not running"),
            (ConsoleInput, s) => {
                format!("VM {name} is {s}: its console takes input only while it runs")
            }
            (Start, VmState::Running) => format!("VM {name} is already running"),
            (_, VmState::Hibernated) => format!(
                "VM {name} is hibernated; `drover vm resume {name}` brings it back (or delete it)"
            ),
            (Resume, _) => format!("VM {name} is {state}, not hibernated"),
            (Delete, VmState::Running) => {
                format!("VM {name} is running; stop it first or pass --force")
            }
            (_, VmState::Stopped) => {
                format!("VM {name} is not running; start it first (`drover vm start {name}`)")
            }
            (_, s) => format!(
                "VM {name} is {s}; wait for that to finish, then {} it",
                self.verb()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole table: for each verb, who may do it, in which states, and how it waits.
    #[test]
    fn action_table() {
        use Permission as P;
        use VmAction::*;
        use VmState::*;
        for &a in VmAction::ALL {
            let (perm, lock, ok_in): (Option<P>, OpLock, &dyn Fn(VmState) -> bool) = match a {
                Start => (Some(P::Lifecycle), OpLock::Wait, &|s| s == Stopped),
                Delete => (Some(P::Lifecycle), OpLock::Wait, &|s| {
                    s == Stopped || s == Hibernated
                }),
                Stop | Restart => (Some(P::Lifecycle), OpLock::Wait, &|s| {
                    s == Running || s == Paused
                }),
                Exec | Files => (Some(P::Exec), OpLock::None, &|s| s == Running),
                ConsoleInput => (None, OpLock::None, &|s| s == Running || s == Paused),
                Clone => (Some(P::Lifecycle), OpLock::Wait, &|_| true),
                Hibernate | Save => (Some(P::Lifecycle), OpLock::Wait, &|s| s == Running),
                GuestSave | GuestChange => (None, OpLock::Wait, &|s| s == Running),
                Resume => (Some(P::Lifecycle), OpLock::Wait, &|s| s == Hibernated),
                Restore => (Some(P::Lifecycle), OpLock::Refuse, &|_| true),
                GuestRestore => (None, OpLock::Refuse, &|_| true),
                DropState => (Some(P::Lifecycle), OpLock::Wait, &|_| true),
                Change => (Some(P::Change), OpLock::Wait, &|_| true),
                Promote => (None, OpLock::Wait, &|_| true),
                Migrate => (Some(P::Lifecycle), OpLock::Refuse, &|_| true),
                MigrateCommit => (Some(P::Admin), OpLock::Wait, &|_| true),
                MigrateAbort => (Some(P::Admin), OpLock::None, &|_| true),
            };
            assert_eq!(a.permission(), perm, "{a:?}'s permission");
            assert_eq!(a.op_lock(), lock, "{a:?}'s lock");
            for s in VmState::ALL {
                assert_eq!(a.check("x", s).is_ok(), ok_in(s), "{a:?} in {s:?}");
            }
        }
        assert_eq!(
            Delete.check("web1", Running).unwrap_err(),
            "VM web1 is running; stop it first or pass --force"
        );
        assert!(Exec
            .check("w", Stopped)
            .unwrap_err()
            .contains("drover vm start w"));
        assert!(Start
            .check("h", Hibernated)
            .unwrap_err()
            .contains("drover vm resume h"));
        assert_eq!(
            Resume.check("h", Running).unwrap_err(),
            "VM h is running, not hibernated"
        );
        assert_eq!(
            Save.check("v", Stopped).unwrap_err(),
            "VM v is stopped; only a running VM's state can be saved"
        );
        assert_eq!(
            Restore.busy("v"),
            "another operation is running on VM v; restore when it has finished"
        );
        assert!(Migrate.busy("v").contains("drover vm migrate v --cancel"));
    }
}
