//! `drover-guest`: the in-guest CLI.
//!
//! Today it only reads local state. Commands that talk to the host (save, restore, listen) will go
//! through the agent's app socket (`/run/drover/agent.sock`), never to the ports directly: the
//! agent holds them.

use std::io::Write as _;

use anyhow::Context as _;

use crate::cli::GuestCommand;

/// Run one `drover-guest` command, writing its output to stdout.
pub fn run(command: &GuestCommand) -> anyhow::Result<()> {
    match command {
        GuestCommand::Status => {
            let json =
                serde_json::to_string(&crate::info::agent_info()).context("encoding agent info")?;
            writeln!(std::io::stdout().lock(), "{json}").context("writing to stdout")
        }
    }
}
