//! `drover-controller`: campaigns for the cluster's leadership in etcd and, while it leads,
//! places and supervises the services' members on the hosts (see `drover_cluster::controller`).
//! Run two or more; one leads, the others wait and take over within the lease TTL.

mod droverd;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use drover_cluster::controller::Controller;
use drover_cluster::etcd::{Etcd, EtcdError};

/// The Drover cluster controller.
///
/// Examples:
///   drover-controller --etcd http://10.77.0.2:2379 --name ctl-1
///   drover-controller --etcd http://a:2379,http://b:2379,http://c:2379 --ttl 3 --hosts-file remotes.toml
///
/// Hosts are reached through the remotes file (`drover remote add NAME URL --token-file F
/// --ca-file F`, NAME being the host's cluster name).
#[derive(Parser, Debug)]
#[command(
    name = "drover-controller",
    version,
    verbatim_doc_comment,
    max_term_width = 100
)]
struct Args {
    /// etcd endpoints, comma-separated.
    #[arg(long, env = "DROVER_ETCD", value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    /// This controller's name in the election (default: hostname and pid).
    #[arg(long)]
    name: Option<String>,
    /// Lease TTL in seconds: how soon another controller takes over when this one is gone.
    #[arg(long, default_value_t = 3)]
    ttl: u64,
    /// Milliseconds between two rounds.
    #[arg(long, default_value_t = 500)]
    interval_ms: u64,
    /// How to reach each host (default: the remotes file `drover remote` keeps).
    #[arg(long, value_name = "FILE")]
    hosts_file: Option<PathBuf>,
}

fn remotes_file(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(f) = &args.hosts_file {
        return Ok(f.clone());
    }
    let dir = match (
        std::env::var_os("DROVER_CONFIG_DIR"),
        std::env::var_os("HOME"),
    ) {
        (Some(d), _) => PathBuf::from(d),
        (None, Some(h)) => PathBuf::from(h).join(".config/drover"),
        (None, None) => anyhow::bail!("pass --hosts-file FILE (no DROVER_CONFIG_DIR or HOME)"),
    };
    Ok(dir.join("remotes.toml"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        // Colours only on a terminal: logs are mostly files (scripts/cluster.sh).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let args = Args::parse();
    let name = args.name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let path = remotes_file(&args)?;
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the hosts file {}", path.display()))?;
    let remotes: droverd::Remotes =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let ttl = Duration::from_secs(args.ttl.max(1));
    let interval = Duration::from_millis(args.interval_ms.max(50));
    let connect = || Etcd::connect(&args.etcd, "/drover", Duration::from_secs(2));
    let etcd = connect().await?;
    let mut controller = Controller::new(&name, etcd, droverd::Droverd::new(remotes));
    let mut reconnect = false;
    loop {
        // After a failure: the etcd member this controller talked to may be the one that is
        // gone; connect again (to whichever member answers).
        if std::mem::take(&mut reconnect) {
            match connect().await {
                Ok(etcd) => controller.etcd = etcd,
                Err(e) => tracing::warn!(error = %e, "etcd unreachable; retrying"),
            }
        }
        tracing::info!(%name, "campaigning");
        let mut lead = match controller.etcd.campaign(&name, ttl).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "campaign failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                reconnect = true;
                continue;
            }
        };
        tracing::info!(%name, epoch = lead.epoch(), "leading");
        tokio::select! {
            r = controller.lead(&mut lead, interval) => match r {
                Err(EtcdError::NotLeader) | Err(EtcdError::LeaseLost(_)) => tracing::warn!("leadership lost"),
                Err(e) => tracing::warn!(error = %e, "round failed; campaigning again"),
                Ok(()) => {}
            },
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("stopping: resigning so another controller takes over at once");
                let _ = lead.resign().await;
                return Ok(());
            }
        }
        // Whatever happened, this lease is finished with.
        lead.stop_renewing();
        drop(lead);
        reconnect = true;
    }
}
