//! Every lifecycle verb of a VM, with the states it is valid in, as data checked in one place.

use drover_api::VmState;

/// A lifecycle action on one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmAction {
    /// Launch QEMU. Only when stopped.
    Start,
    /// Stop gracefully (agent, ACPI) then kill. Only when running.
    Stop,
    /// Stop then start. Only when running.
    Restart,
    /// Remove the VM and its owned disks. Only when stopped (`--force` stops it first).
    Delete,
    /// Run a command in the guest through the agent. Only when running.
    Exec,
    /// Save to disk and stop. Only when running.
    Hibernate,
    /// Bring a hibernated VM back. Only when hibernated.
    Resume,
}

impl VmAction {
    /// States in which the action may begin.
    pub fn allowed_states(self) -> &'static [VmState] {
        match self {
            VmAction::Start => &[VmState::Stopped],
            // A hibernated VM's state goes with it.
            VmAction::Delete => &[VmState::Stopped, VmState::Hibernated],
            // A guest QEMU paused (full disk) can still be stopped.
            VmAction::Stop | VmAction::Restart => &[VmState::Running, VmState::Paused],
            VmAction::Exec | VmAction::Hibernate => &[VmState::Running],
            VmAction::Resume => &[VmState::Hibernated],
        }
    }

    /// The verb as a person types it.
    pub fn verb(self) -> &'static str {
        match self {
            VmAction::Start => "start",
            VmAction::Stop => "stop",
            VmAction::Restart => "restart",
            VmAction::Delete => "delete",
            VmAction::Exec => "exec",
            VmAction::Hibernate => "hibernate",
            VmAction::Resume => "resume",
        }
    }

    /// `Ok` if allowed in `state`, else a message that says what to do.
    pub fn check(self, name: &str, state: VmState) -> Result<(), String> {
        if self.allowed_states().contains(&state) {
            return Ok(());
        }
        Err(match (self, state) {
            (VmAction::Start, VmState::Running) => format!("VM {name} is already running"),
            (_, VmState::Hibernated) => format!(
                "VM {name} is hibernated; `drover vm resume {name}` brings it back (or delete it)"
            ),
            (VmAction::Resume, _) => format!("VM {name} is {state}, not hibernated"),
            (VmAction::Delete, VmState::Running) => {
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

    #[test]
    fn state_table() {
        use VmAction::*;
        use VmState::*;
        let all = [Stopped, Starting, Running, Stopping, Paused, Hibernated];
        for a in [Start, Stop, Restart, Delete, Exec, Hibernate, Resume] {
            for s in all {
                let ok = a.check("x", s).is_ok();
                let expected = match a {
                    Start => s == Stopped,
                    Delete => s == Stopped || s == Hibernated,
                    Stop | Restart => s == Running || s == Paused,
                    Exec | Hibernate => s == Running,
                    Resume => s == Hibernated,
                };
                assert_eq!(ok, expected, "{a:?} in {s:?}");
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
    }
}
