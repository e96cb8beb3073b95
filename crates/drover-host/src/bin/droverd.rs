//! droverd: the Drover host daemon.

use anyhow::{bail, Context};
use clap::{CommandFactory, FromArgMatches, Parser};
use drover_host::auth::{Role, TokenStore};
use drover_host::manager::{DaemonConfig, Manager};
use drover_host::tls;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

/// Drover's host daemon: runs QEMU virtual machines and serves the API the `drover` CLI uses.
///
/// VMs keep running when droverd stops or crashes; on its next start droverd re-adopts them.
/// Several droverd's can run side by side with different --state-dir and --socket.
///
/// Settings can also come from a TOML file whose keys are these flags' long names
/// (/etc/drover/droverd.toml when it exists, or --config FILE); flags given here win over it:
///
///   state-dir = "/var/lib/drover"
///   listen = "10.77.0.11:7443"
///   socket-mode = "660"
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    long_about,
    args_override_self = true,
    verbatim_doc_comment
)]
struct Args {
    /// Configuration file: TOML whose keys are the long flags below [default:
    /// /etc/drover/droverd.toml when it exists; `none` reads no file].
    #[arg(long, env = "DROVER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where VM records, disks, logs and the guest image live.
    #[arg(long, env = "DROVER_STATE_DIR", default_value = "/var/lib/drover")]
    state_dir: PathBuf,
    /// Unix socket to serve the API on (mode 0600: host administrators only).
    #[arg(long, env = "DROVER_SOCKET", default_value = "/run/drover/drover.sock")]
    socket: PathBuf,
    /// Guest image cache (default: STATE_DIR/images). Several daemons may share one.
    #[arg(long, env = "DROVER_IMAGE_DIR")]
    image_dir: Option<PathBuf>,
    /// Static drover-agent binary to put into the guest image (default: looked up beside droverd).
    #[arg(long, env = "DROVER_AGENT_BIN")]
    agent_binary: Option<PathBuf>,
    /// QEMU binary.
    #[arg(long, env = "DROVER_QEMU", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Force the accelerator for every VM (default: KVM only where hardware KVM works, else TCG).
    #[arg(long, value_parser = ["kvm", "tcg"])]
    accel: Option<String>,
    /// Whether new VMs keep live changes across shutdown (each VM can change it later).
    #[arg(long, value_parser = ["on", "off"], default_value = "on")]
    persist_default: String,
    /// How new VMs store kept configurations: `diff` (against the initial config) or `snapshot`.
    #[arg(long, value_parser = ["diff", "snapshot"], default_value = "diff")]
    persist_mode_default: String,
    /// Permissions of the API socket, octal. 0600 lets only root in; 0660 or 0666 let other
    /// users connect, who then need a role (`drover auth grant`).
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,
    /// This host's id, what guests read with `drover-guest host-id` (1-64 characters of
    /// A-Z a-z 0-9 . _ -). Default: derived from /etc/machine-id. Give each droverd sharing a
    /// machine its own.
    #[arg(long, env = "DROVER_HOST_ID", value_parser = parse_host_id)]
    host_id: Option<String>,
    /// Also serve the API on TCP, with TLS, at this address (e.g. 10.77.0.11:7443). TCP callers
    /// need a bearer token (see --tokens); the unix socket keeps working as before.
    #[arg(long, env = "DROVER_LISTEN", value_name = "ADDR:PORT")]
    listen: Option<std::net::SocketAddr>,
    /// Join the cluster whose etcd is at these endpoints (comma-separated); needs --listen, so
    /// the controller can reach this host. A cut-off host stops its cluster VMs itself.
    #[arg(
        long,
        env = "DROVER_CLUSTER",
        value_delimiter = ',',
        value_name = "ETCD_URLS",
        requires = "listen"
    )]
    cluster: Vec<String>,
    /// The host's cluster settings (TOML: name, site, labels, security_level, cost, ttl_s).
    #[arg(long, value_name = "FILE", requires = "cluster")]
    cluster_config: Option<PathBuf>,
    /// TLS certificate chain (PEM) for --listen [default: a self-signed one, made once and kept
    /// in STATE_DIR/tls/cert.pem; give that file to clients as their CA file].
    #[arg(long, requires = "tls_key", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Bearer tokens for TCP callers, one `SHA256-HEX ROLE NAME` line each (manage them with
    /// `drover auth token`) [default: STATE_DIR/tokens]. When it holds none, the first start
    /// with --listen creates an admin token in STATE_DIR/tls/admin.token.
    #[arg(long, env = "DROVER_TOKENS", value_name = "FILE")]
    tokens: Option<PathBuf>,
    /// Log filter (RUST_LOG syntax), e.g. `info`, `drover_host=debug`.
    #[arg(long, env = "DROVER_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let argv =
        drover_host::config_file::merged_argv(&Args::command(), std::env::args_os().collect())?;
    let args = match Args::from_arg_matches(&Args::command().get_matches_from(argv)) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log).context("bad --log filter")?,
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let state_dir = std::path::absolute(&args.state_dir).context("resolving --state-dir")?;
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let store = drover_store::RedbStore::open(&state_dir.join("drover.redb"))?;
    let qemu = which(&args.qemu).unwrap_or(args.qemu.clone());
    let cfg = DaemonConfig {
        image_dir: args
            .image_dir
            .clone()
            .unwrap_or_else(|| state_dir.join("images")),
        state_dir,
        agent_binary: args.agent_binary.clone(),
        qemu_binary: qemu,
        accel: args
            .accel
            .as_deref()
            .map(|a| a.parse())
            .transpose()
            .map_err(anyhow::Error::msg)?,
        persist_default: args.persist_default == "on",
        persist_mode_default: args
            .persist_mode_default
            .parse()
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        identity: drover_host::hostfacts::host_identity(
            args.host_id.as_deref(),
            std::path::Path::new(drover_host::hostfacts::DMI_DIR),
        ),
        migration_addr: args.listen.map(|a| a.ip()),
    };
    let tokens = Arc::new(TokenStore::new(
        &args
            .tokens
            .clone()
            .unwrap_or_else(|| cfg.state_dir.join("tokens")),
    ));
    // Bind everything before the manager re-adopts VMs, so a taken address fails fast.
    let listener = bind(&args.socket, args.socket_mode).await?;
    let tcp = match args.listen {
        Some(addr) => Some(listen_tls(&args, addr, &cfg.state_dir, &tokens).await?),
        None => None,
    };
    let mgr = Manager::open(cfg, Box::new(store)).await?;
    if let (false, Some(addr)) = (args.cluster.is_empty(), args.listen) {
        let cluster = drover_host::cluster::ClusterConfig::load(args.cluster_config.as_deref())?;
        drover_host::cluster::spawn(
            mgr.clone(),
            args.cluster.clone(),
            cluster,
            format!("https://{addr}"),
        )?;
    }
    tracing::info!(socket = %args.socket.display(), listen = ?args.listen, vms = mgr.list().len(), "droverd serving");
    let app = drover_host::api::router_with(mgr, Some(tokens));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
        tracing::info!(
            "droverd stopping; running VMs keep running and are re-adopted at the next start"
        );
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let tcp_task = tcp.map(|l| {
        let serve = axum::serve(
            l,
            app.clone()
                .into_make_service_with_connect_info::<drover_host::api::Peer>(),
        )
        .with_graceful_shutdown(stopped(stop_rx.clone()));
        tokio::spawn(async move { serve.await })
    });
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<drover_host::api::Peer>(),
    )
    .with_graceful_shutdown(stopped(stop_rx))
    .await?;
    let _ = std::fs::remove_file(&args.socket);
    if let Some(t) = tcp_task {
        t.await.context("the TCP listener task failed")??;
    }
    Ok(())
}

/// Bind `addr`, set up TLS (the given or the self-signed certificate) and make sure some token
/// can get in: with none yet, create an admin token in STATE_DIR/tls/admin.token.
async fn listen_tls(
    args: &Args,
    addr: std::net::SocketAddr,
    state_dir: &std::path::Path,
    tokens: &TokenStore,
) -> anyhow::Result<tls::TlsListener> {
    let tls_dir = state_dir.join("tls");
    let files = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => tls::CertFiles {
            cert: cert.clone(),
            key: key.clone(),
        },
        _ => {
            let (files, created) = tls::ensure_self_signed(&tls_dir, &tls::wanted_sans(addr.ip()))?;
            if created {
                tracing::info!(cert = %files.cert.display(), "created a self-signed TLS certificate; clients use it as their CA file");
            }
            files
        }
    };
    let cfg = tls::server_config(&files)?;
    if tokens.entries()?.is_empty() {
        let (token, entry) = tokens.create(Role::Admin, Some("admin"))?;
        std::fs::create_dir_all(&tls_dir)
            .with_context(|| format!("creating {}", tls_dir.display()))?;
        let path = tls_dir.join("admin.token");
        tls::write_private(&path, format!("{token}\n").as_bytes())?;
        tracing::info!(token_file = %path.display(), name = %entry.name, "no API token existed: created an admin token (keep it secret; make narrower ones with `drover auth token create`)");
    }
    let tcp = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} (--listen)"))?;
    let fingerprint = tls::cert_fingerprint(&files)?;
    tracing::info!(listen = %addr, cert = %files.cert.display(), sha256 = %fingerprint, tokens = %tokens.path().display(), "serving the API on TCP with TLS");
    Ok(tls::TlsListener::new(tcp, cfg)?)
}

/// Bind the API socket, refusing to steal one another daemon is serving.
async fn bind(path: &std::path::Path, mode: u32) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!(
                "another droverd is already serving on {}; stop it or pass a different --socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

fn parse_host_id(s: &str) -> Result<String, String> {
    drover_host::hostfacts::check_host_id(s).map(|()| s.to_string())
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal file mode like 600 or 660"))
}

fn which(bin: &std::path::Path) -> Option<PathBuf> {
    if bin.components().count() > 1 {
        return Some(bin.to_path_buf());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(bin))
        .find(|p| p.is_file())
}
