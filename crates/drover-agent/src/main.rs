//! `drover-agent`, also `drover-guest` when invoked under that name. Parsing and wiring only; the
//! work is in the library.

use std::process::ExitCode;

use clap::Parser as _;
use drover_agent::cli::{invoked_as_guest, AgentCli, AgentCommand, GuestCli};
use drover_agent::guest::exit;

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next();
    if invoked_as_guest(argv0.as_deref()) {
        return match GuestCli::try_parse() {
            Ok(cli) => ExitCode::from(drover_agent::guest::run(&cli.command)),
            Err(e) => usage_error(&e),
        };
    }
    let cli = match AgentCli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    match cli.command {
        Some(AgentCommand::Guest(guest)) => {
            ExitCode::from(drover_agent::guest::run(&guest.command))
        }
        None => match drover_agent::agent::run(drover_agent::agent::Config {
            port_a: cli.port_a,
            port_b: cli.port_b,
            input_dir: cli.input_dir,
            app_socket: cli.app_socket,
            sysfs: cli.sysfs,
        }) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                drover_agent::log!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Print clap's message; `--help` and `--version` succeed, anything else is a usage error (1,
/// not clap's 2, which `drover-guest` uses for "refused by the host").
fn usage_error(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    if e.use_stderr() {
        ExitCode::from(exit::USAGE)
    } else {
        ExitCode::SUCCESS
    }
}
