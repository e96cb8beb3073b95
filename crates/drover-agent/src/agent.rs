//! The agent process: one thread per port, the app socket, the power-button watcher and the
//! hot-plug onliner.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

use anyhow::Context as _;

use crate::app::AppServer;
use crate::hotplug::Onliner;
use crate::hub::EventHub;
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
    /// The app socket.
    pub app_socket: PathBuf,
    /// Sysfs root for onlining hot-plugged CPUs and memory.
    pub sysfs: PathBuf,
}

/// Run the agent. Its threads run forever; this returns (with an error) only if one of them
/// dies, so that `/init` respawns a whole agent rather than keeping a half-working one.
pub fn run(config: Config) -> anyhow::Result<()> {
    crate::log!(
        "starting, version {} (protocol {})",
        env!("CARGO_PKG_VERSION"),
        drover_proto::PROTOCOL_VERSION
    );
    let power: Arc<dyn Power> = Arc::new(SystemPower::detect());
    // The NoCloud seed (hostname, SSH keys), beside the services: a slow disk must not delay them.
    if let Err(e) = thread::Builder::new()
        .name("seed".into())
        .spawn(crate::seed::apply_at_boot)
    {
        crate::log!("cannot start the seed thread: {e}");
    }
    let (died_tx, died_rx) = mpsc::channel::<&'static str>();

    // Shared by port A (which sends apps' requests), port B (which delivers the events) and the
    // app socket (which connects the two to apps).
    let hub = EventHub::new();
    let port_a = Arc::new(PortA::new());
    let app_server = Arc::new(AppServer::new(Arc::clone(&port_a), Arc::clone(&hub)));

    // Notices moves (pushed notice, new host at a reconnect, new generation) and runs the
    // migrated.d hooks once per change.
    let triggers = crate::migration::spawn_watcher(crate::migration::Watcher {
        port_a: Arc::clone(&port_a),
        hub: Arc::clone(&hub),
        hooks: crate::migration::Hooks::default(),
    })
    .context("starting the migration watcher")?;
    let on_connect = triggers.clone();
    port_a.on_connect(move || {
        let _ = on_connect.try_send(crate::migration::Trigger::Connected);
    });

    let path_a = config.port_a.clone();
    spawn_service("port-a", &died_tx, move || {
        crate::device::run_port(&path_a, "port A", |file, writer| port_a.serve(file, writer))
    })?;

    let port_b = PortB::new(Arc::clone(&power), hub).with_migration_watcher(triggers);
    let path_b = config.port_b.clone();
    spawn_service("port-b", &died_tx, move || {
        crate::device::run_port(&path_b, "port B", |file, writer| port_b.serve(file, writer))
    })?;

    let input_dir = config.input_dir.clone();
    spawn_service("power-button", &died_tx, move || {
        crate::power::watch_power_button(&input_dir, power)
    })?;

    let socket = config.app_socket.clone();
    spawn_service("app-socket", &died_tx, move || app_server.run(&socket))?;

    let onliner = Onliner::new(config.sysfs.clone());
    spawn_service("hotplug", &died_tx, move || onliner.run())?;

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
