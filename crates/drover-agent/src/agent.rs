//! The agent process: one thread per port plus the power-button watcher.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

use anyhow::Context as _;

use crate::port_a::PortA;
use crate::port_b::PortB;
use crate::power::{Power, SystemPower};

/// Where the agent finds its devices.
#[derive(Debug, Clone)]
pub struct Config {
    /// Port A device path.
    pub port_a: PathBuf,
    /// Port B device path.
    pub port_b: PathBuf,
    /// Directory of evdev nodes.
    pub input_dir: PathBuf,
}

/// Run the agent. Its threads run forever; this returns (with an error) only if one of them
/// dies, so that `/init` respawns a whole agent rather than keeping a half-working one.
pub fn run(config: Config) -> anyhow::Result<()> {
    crate::log!(
        "starting, version {} (protocol {})",
        env!("CARGO_PKG_VERSION"),
        drover_proto::PROTOCOL_VERSION
    );
    let power: Arc<dyn Power> = Arc::new(SystemPower);
    let (died_tx, died_rx) = mpsc::channel::<&'static str>();

    let port_a = PortA::new();
    let path_a = config.port_a.clone();
    spawn_service("port-a", &died_tx, move || {
        crate::device::run_port(&path_a, "port A", |file, writer| port_a.serve(file, writer))
    })?;

    let port_b = PortB::new(Arc::clone(&power));
    let path_b = config.port_b.clone();
    spawn_service("port-b", &died_tx, move || {
        crate::device::run_port(&path_b, "port B", |file, writer| port_b.serve(file, writer))
    })?;

    let input_dir = config.input_dir.clone();
    spawn_service("power-button", &died_tx, move || {
        crate::power::watch_power_button(&input_dir, power)
    })?;

    drop(died_tx);
    let name = died_rx.recv().context("all service threads vanished")?;
    anyhow::bail!("{name} thread stopped unexpectedly")
}

/// Reports a service thread's end (including by panic) when dropped.
struct DeathNotice {
    name: &'static str,
    tx: mpsc::Sender<&'static str>,
}

impl Drop for DeathNotice {
    fn drop(&mut self) {
        let _ = self.tx.send(self.name);
    }
}

fn spawn_service<F>(
    name: &'static str,
    died: &mpsc::Sender<&'static str>,
    f: F,
) -> anyhow::Result<()>
where
    F: FnOnce() + Send + 'static,
{
    let notice = DeathNotice {
        name,
        tx: died.clone(),
    };
    thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _notice = notice;
            f();
        })
        .with_context(|| format!("starting {name} thread"))?;
    Ok(())
}
