//! Command lines of `drover-agent` and `drover-guest` (the same binary).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Default path of port A, as `/init` links it.
pub const DEFAULT_PORT_A: &str = "/dev/virtio-ports/org.drover.req";
/// Default path of port B, as `/init` links it.
pub const DEFAULT_PORT_B: &str = "/dev/virtio-ports/org.drover.evt";
/// Where evdev nodes (the ACPI power button) appear.
pub const DEFAULT_INPUT_DIR: &str = "/dev/input";

/// The in-guest agent: serves the host over the guest channel.
#[derive(Debug, Parser)]
#[command(name = "drover-agent", version)]
pub struct AgentCli {
    /// Port A device (guest → host requests).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_PORT_A)]
    pub port_a: PathBuf,
    /// Port B device (host → guest commands).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_PORT_B)]
    pub port_b: PathBuf,
    /// Directory scanned for `event*` input devices (the ACPI power button).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_INPUT_DIR)]
    pub input_dir: PathBuf,
    /// Run a `drover-guest` command instead of the agent.
    #[command(subcommand)]
    pub command: Option<AgentCommand>,
}

/// Subcommands of `drover-agent`.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Act as `drover-guest` (the same as invoking the binary under that name).
    Guest(GuestCli),
}

/// The in-guest CLI for apps and operators inside the VM.
#[derive(Debug, Parser)]
#[command(name = "drover-guest", version)]
pub struct GuestCli {
    /// What to do.
    #[command(subcommand)]
    pub command: GuestCommand,
}

/// Subcommands of `drover-guest`.
#[derive(Debug, Subcommand)]
pub enum GuestCommand {
    /// Print this guest's agent information as JSON (read locally; the host is not asked).
    Status,
}

/// Whether the program was invoked as `drover-guest` (argv[0] basename).
pub fn invoked_as_guest(argv0: Option<&std::ffi::OsStr>) -> bool {
    argv0
        .map(std::path::Path::new)
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "drover-guest")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;
    use std::ffi::OsStr;

    #[test]
    fn clis_are_well_formed() {
        AgentCli::command().debug_assert();
        GuestCli::command().debug_assert();
    }

    #[test]
    fn defaults_and_guest_subcommand() {
        let cli = AgentCli::try_parse_from(["drover-agent"]).unwrap();
        assert_eq!(cli.port_a, PathBuf::from(DEFAULT_PORT_A));
        assert_eq!(cli.port_b, PathBuf::from(DEFAULT_PORT_B));
        assert!(cli.command.is_none());
        let cli = AgentCli::try_parse_from(["drover-agent", "--port-b", "/x", "guest", "status"])
            .unwrap();
        assert_eq!(cli.port_b, PathBuf::from("/x"));
        assert!(matches!(
            cli.command,
            Some(AgentCommand::Guest(GuestCli {
                command: GuestCommand::Status
            }))
        ));
    }

    #[test]
    fn argv0_dispatch() {
        assert!(invoked_as_guest(Some(OsStr::new("/usr/bin/drover-guest"))));
        assert!(invoked_as_guest(Some(OsStr::new("drover-guest"))));
        assert!(!invoked_as_guest(Some(OsStr::new("/sbin/drover-agent"))));
        assert!(!invoked_as_guest(None));
    }
}
