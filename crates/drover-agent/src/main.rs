//! `drover-agent`, also `drover-guest` when invoked under that name. Parsing and wiring only; the
//! work is in the library.

use std::process::ExitCode;

use clap::Parser as _;
use drover_agent::cli::{invoked_as_guest, AgentCli, AgentCommand, GuestCli};

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next();
    let result = if invoked_as_guest(argv0.as_deref()) {
        let cli = GuestCli::parse();
        drover_agent::guest::run(&cli.command)
    } else {
        let cli = AgentCli::parse();
        match cli.command {
            Some(AgentCommand::Guest(guest)) => drover_agent::guest::run(&guest.command),
            None => drover_agent::agent::run(drover_agent::agent::Config {
                port_a: cli.port_a,
                port_b: cli.port_b,
                input_dir: cli.input_dir,
            }),
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            drover_agent::log!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
