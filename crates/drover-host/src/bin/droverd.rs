//! droverd: the Drover host daemon.

use anyhow::{bail, Context};
use clap::{CommandFactory, FromArgMatches, Parser};
use drover_host::auth::{Role, TokenStore};
use drover_host::manager::{DaemonConfig, Manager};
use drover_host::serve::{self, ServeLimits};
use drover_host::tls;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
    /// The QEMU installation to run: DIR/usr/bin/{qemu-system-x86_64,qemu-img,qemu-nbd}, its
    /// firmware in DIR/usr/share/qemu (passed as -L) and modules in
    /// DIR/usr/lib/x86_64-linux-gnu/qemu (QEMU_MODULE_DIR), so emulator, disk tools and
    /// firmware always match. Make one with `scripts/install-deps.sh --qemu-prefix DIR`, e.g.
    /// `droverd --qemu-dir /opt/drover-qemu10` for QEMU 10.0 beside the system's 7.2.
    /// [default: the system's QEMU, from PATH and /usr/share/qemu]
    #[arg(long, env = "DROVER_QEMU_DIR", value_name = "DIR")]
    qemu_dir: Option<PathBuf>,
    /// Only the emulator binary, with the rest of the installation from --qemu-dir or the
    /// system (kept for older set-ups; prefer --qemu-dir).
    #[arg(long, env = "DROVER_QEMU", value_name = "BINARY")]
    qemu: Option<PathBuf>,
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
    /// Also serve the API on TCP, with TLS, at this address (e.g. 10.77.0.11:7443), and the web
    /// console at https://ADDR:PORT/ (log in with a token). TCP callers need a bearer token (see
    /// --tokens); the unix socket keeps working as before.
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
    /// Put the store's last checkpoint (STATE_DIR/drover.redb.checkpoint, written after every
    /// successful start and every 10 minutes) back in place before starting, keeping the
    /// current file as drover.redb.damaged-<ms>. For a store droverd refuses as damaged or
    /// missing; changes made after the checkpoint are lost.
    ///
    /// Example: droverd --state-dir /var/lib/drover --recover-store
    #[arg(long, verbatim_doc_comment)]
    recover_store: bool,
    /// A directory non-admin callers may take disk images, kernels and initrds from, as
    /// NAME=DIR (read-only for them) or NAME=DIR:rw; repeat for more. Admins name any path.
    /// Example: --image-pool base=/srv/drover/images. droverd's own guest-image directory is
    /// the pool `drover`.
    #[arg(long = "image-pool", value_name = "NAME=DIR[:rw]", value_parser = drover_host::pools::Pool::parse)]
    image_pools: Vec<drover_host::pools::Pool>,
    /// The user QEMU runs as, so that a guest escaping into QEMU is that user and not root: it
    /// gets the VM's own files (group-granted) and descriptors for images outside the state
    /// dir. `root` keeps QEMU as droverd's user, all capabilities dropped. The package and
    /// scripts/install-deps.sh create drover-qemu.
    #[arg(long, default_value = drover_host::qemu_user::DEFAULT_USER, value_name = "USER")]
    qemu_user: String,
    /// Rotate a VM's console.log (to console.log.1) past this size, e.g. 8M or 1G.
    #[arg(long, default_value = "8M", value_parser = parse_size, value_name = "SIZE")]
    console_log_max: u64,
    /// Disks a VM's guest may add for itself (`drover-guest reconfigure --add-disk`).
    #[arg(long, default_value_t = 4, value_name = "N")]
    guest_disk_max_count: u32,
    /// Total size of the disks a VM's guest may add for itself.
    #[arg(long, default_value = "16G", value_parser = parse_size, value_name = "SIZE")]
    guest_disk_max_size: u64,
    /// Saved states a VM may hold before its guest's `save` is refused.
    #[arg(long, default_value_t = 4, value_name = "N")]
    guest_state_max_count: u32,
    /// Disk space a VM's saved states may take before its guest's `save` is refused.
    #[arg(long, default_value = "8G", value_parser = parse_size, value_name = "SIZE")]
    guest_state_max_size: u64,
    /// Drop audit records older than this many days.
    #[arg(long, default_value_t = 30, value_name = "DAYS")]
    audit_max_days: u64,
    /// Keep at most this many audit records per VM (the oldest go first).
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    audit_max_entries: usize,
    /// API connections one local user (other than root) or one TCP address may hold at once;
    /// more are closed at once.
    #[arg(long, default_value_t = 32, value_name = "N")]
    max_connections_per_peer: usize,
    /// Close an API connection that has no request running and moves no bytes this long.
    #[arg(long = "idle-timeout", default_value_t = 60, value_name = "SECONDS")]
    idle_timeout_s: u64,
    /// A request's headers (and on TCP the TLS handshake) must arrive within this.
    #[arg(long = "header-timeout", default_value_t = 10, value_name = "SECONDS")]
    header_timeout_s: u64,
    /// On SIGTERM, requests already running get this long to finish before droverd exits
    /// (running VMs keep running either way).
    #[arg(long = "shutdown-grace", default_value_t = 10, value_name = "SECONDS")]
    shutdown_grace_s: u64,
    /// A VM whose guest has not opened the agent's port this long after its virtio-serial
    /// driver came up (or this plus 60 s after QEMU started, when QEMU cannot tell) is shown as
    /// having no agent, and `vm start --wait` and `vm exec` say so instead of waiting on. A Debian
    /// guest under TCG opens it about 30-70 s after the driver; raise this for slower guests.
    #[arg(long = "no-agent-after", default_value_t = 120, value_name = "SECONDS")]
    no_agent_after_s: u64,
    /// Log filter (RUST_LOG syntax), e.g. `info`, `drover_host=debug`.
    #[arg(long, env = "DROVER_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    // `droverd --fence-watchdog STATE_DIR`: the small process a cluster droverd starts to kill
    // its members' QEMU if it stops renewing its lease (not for people: no tokio, no config).
    let mut argv = std::env::args_os().skip(1);
    if argv.next().as_deref() == Some(std::ffi::OsStr::new(drover_host::fence_watchdog::ARG)) {
        let dir = argv
            .next()
            .context("--fence-watchdog needs the state dir")?;
        return drover_host::fence_watchdog::run(PathBuf::from(dir));
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(daemon())
}

async fn daemon() -> anyhow::Result<()> {
    let argv =
        drover_host::config_file::merged_argv(&Args::command(), std::env::args_os().collect())?;
    let args = match Args::from_arg_matches(&Args::command().get_matches_from(argv)) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    raise_fd_limit();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log).context("bad --log filter")?,
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // drover_uptime_seconds counts from here.
    drover_host::metrics::global();
    let state_dir = std::path::absolute(&args.state_dir).context("resolving --state-dir")?;
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let store = Arc::new(open_store(&state_dir, args.recover_store));
    let mut qemu = match &args.qemu_dir {
        Some(dir) => {
            let dir = std::path::absolute(dir).context("resolving --qemu-dir")?;
            drover_qemu::install::QemuInstall::in_dir(&dir)?
        }
        None => drover_qemu::install::QemuInstall::system(),
    };
    if let Some(bin) = &args.qemu {
        qemu = qemu.with_emulator(which(bin).unwrap_or(bin.clone()));
    }
    let cfg = DaemonConfig {
        image_dir: args
            .image_dir
            .clone()
            .unwrap_or_else(|| state_dir.join("images")),
        state_dir,
        agent_binary: args.agent_binary.clone(),
        qemu,
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
        pools: args.image_pools.clone(),
        qemu_user: drover_host::qemu_user::QemuUser::resolve(&args.qemu_user)?,
        no_agent_after: std::time::Duration::from_secs(args.no_agent_after_s),
        limits: drover_host::limits::Limits {
            console_log_max: args.console_log_max,
            guest_disk_count: args.guest_disk_max_count,
            guest_disk_bytes: args.guest_disk_max_size,
            guest_state_count: args.guest_state_max_count,
            guest_state_bytes: args.guest_state_max_size,
            audit_max_age: std::time::Duration::from_secs(args.audit_max_days * 24 * 3600),
            audit_max_entries: args.audit_max_entries,
        },
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
    // Counted for /metrics (drover_store_write_errors_total).
    let counted = drover_host::metrics::CountingStore(store.clone());
    let mgr = Manager::open(cfg, Box::new(counted)).await?;
    spawn_checkpoints(store, state_dir_of(&mgr));
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
    let app = drover_host::api::router_with(mgr.clone(), Some(tokens));
    let limits = ServeLimits {
        per_peer: args.max_connections_per_peer,
        idle: Duration::from_secs(args.idle_timeout_s),
        header_read: Duration::from_secs(args.header_timeout_s),
        handshake: Duration::from_secs(args.header_timeout_s),
        grace: Duration::from_secs(args.shutdown_grace_s),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopper = mgr.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
        tracing::info!(
            "droverd stopping: no new requests or QEMU starts; running VMs keep running and are re-adopted at the next start"
        );
        stopper.begin_shutdown();
        let _ = stop_tx.send(true);
    });
    let tcp_task = tcp.map(|(l, cfg)| {
        tokio::spawn(serve::serve_tls(
            l,
            cfg,
            app.clone(),
            limits,
            stop_rx.clone(),
        ))
    });
    serve::serve_unix(listener, app, limits, stop_rx).await;
    let _ = std::fs::remove_file(&args.socket);
    if let Some(t) = tcp_task {
        t.await.context("the TCP listener task failed")?;
    }
    tracing::info!("droverd stopped");
    // Work still running past the grace time (a detached operation, a blocking copy) is cut
    // off here, as a kill -9 would: every state change it made is already in the store.
    std::process::exit(0)
}

/// Exit code when the store file is damaged.
const EXIT_STORE_DAMAGED: i32 = 3;
/// Exit code when the store is missing or empty while this state dir's VMs run.
const EXIT_STORE_MISSING: i32 = 4;

/// Open the store, or exit with a message that says what to do: never start with an empty
/// store while QEMUs of this state dir run (it would forget them and let their names be taken
/// again), never panic on a damaged file.
fn open_store(state_dir: &std::path::Path, recover: bool) -> drover_store::RedbStore {
    let path = state_dir.join("drover.redb");
    let checkpoint = checkpoint_path(&path);
    let fail = |code: i32, msg: String| -> ! {
        tracing::error!("{msg}");
        eprintln!("droverd: {msg}");
        std::process::exit(code);
    };
    if recover {
        match drover_store::RedbStore::recover(&path, &checkpoint) {
            Ok(aside) => tracing::warn!(
                checkpoint = %checkpoint.display(),
                kept = ?aside.map(|p| p.display().to_string()),
                "store recovered from its checkpoint; changes made after it are lost"
            ),
            Err(e) => fail(EXIT_STORE_DAMAGED, format!("--recover-store: {e}")),
        }
    }
    if drover_store::RedbStore::is_absent(&path) {
        let running = drover_host::manager::running_vm_qemus(state_dir);
        if !running.is_empty() {
            let list: Vec<String> = running
                .iter()
                .map(|(vm, pids)| format!("{vm} (pid {pids:?})"))
                .collect();
            fail(
                EXIT_STORE_MISSING,
                format!(
                    "the store {} is {} but QEMUs of this state dir are running: {}. Starting with an empty store would forget them. {}",
                    path.display(),
                    if path.exists() { "empty (0 bytes)" } else { "missing" },
                    list.join(", "),
                    if checkpoint.is_file() {
                        format!("Start droverd with --recover-store to go back to its checkpoint ({}), or stop those QEMUs first.", checkpoint.display())
                    } else {
                        "There is no checkpoint to recover from: stop those QEMUs (kill the pids) first, then start droverd again.".to_string()
                    }
                ),
            );
        }
    }
    match drover_store::RedbStore::open(&path) {
        Ok(s) => s,
        Err(e @ drover_store::StoreError::Damaged { .. }) => {
            fail(EXIT_STORE_DAMAGED, e.to_string())
        }
        Err(e) => fail(EXIT_STORE_DAMAGED, format!("{e}")),
    }
}

fn checkpoint_path(store: &std::path::Path) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push(".checkpoint");
    PathBuf::from(name)
}

fn state_dir_of(mgr: &Manager) -> PathBuf {
    PathBuf::from(mgr.host_info().state_dir)
}

/// Copy the store to its checkpoint now (droverd started: the records are good) and every 10
/// minutes. A failure (a full disk) is logged and retried at the next round.
fn spawn_checkpoints(store: Arc<drover_store::RedbStore>, state_dir: PathBuf) {
    let dest = checkpoint_path(&state_dir.join("drover.redb"));
    tokio::spawn(async move {
        loop {
            let (s, d) = (store.clone(), dest.clone());
            match tokio::task::spawn_blocking(move || s.checkpoint(&d)).await {
                Ok(Ok(rows)) => {
                    tracing::debug!(rows, checkpoint = %dest.display(), "store checkpoint written")
                }
                Ok(Err(e)) => {
                    tracing::warn!("store checkpoint failed (kept the previous one): {e}")
                }
                Err(e) => tracing::warn!("store checkpoint failed: {e}"),
            }
            tokio::time::sleep(std::time::Duration::from_secs(600)).await;
        }
    });
}

/// Bind `addr`, set up TLS (the given or the self-signed certificate) and make sure some token
/// can get in: with none yet, create an admin token in STATE_DIR/tls/admin.token.
async fn listen_tls(
    args: &Args,
    addr: std::net::SocketAddr,
    state_dir: &std::path::Path,
    tokens: &TokenStore,
) -> anyhow::Result<(tokio::net::TcpListener, Arc<rustls::ServerConfig>)> {
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
    tracing::info!(listen = %addr, cert = %files.cert.display(), sha256 = %fingerprint, tokens = %tokens.path().display(), web_console = %format!("https://{addr}/"), "serving the API and the web console on TCP with TLS");
    Ok((tcp, cfg))
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

/// Every connection, disk and QMP socket is a file descriptor: take the hard limit, not the
/// default soft 1024.
fn raise_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a stack value.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    drover_model::parse_size(s).map_err(|e| e.to_string())
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
