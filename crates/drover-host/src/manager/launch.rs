//! Starting a VM's QEMU: the fence check, the process, its command line, the kernel to boot,
//! QMP and the agent link.

use super::*;

impl Manager {
    /// Use `check` for the fencing tokens of cluster starts (droverd `--cluster`).
    pub fn set_fence_check(&self, check: FenceCheck) {
        *lock(&self.s.fence_check) = Some(check);
    }

    /// A controller's start of member `f` as VM `name`: only if the cluster says, right now,
    /// that the member is assigned here at exactly this token. Fails closed: without a cluster
    /// to ask, or when it does not answer, nothing starts.
    pub(super) async fn check_fence(&self, name: &str, f: &drover_api::Fence) -> Result<()> {
        if f.vm_name() != name {
            return Err(HostError::Invalid(format!(
                "a fenced start of member {}/{}-{} names VM {name}; its VM is {}",
                f.service,
                f.app,
                f.index,
                f.vm_name()
            )));
        }
        let check = lock(&self.s.fence_check).clone().ok_or_else(|| {
            HostError::Conflict(format!(
                "VM {name}: a controller's start (fencing token {}) needs droverd --cluster to check it; not starting",
                f.token
            ))
        })?;
        match check(f.clone()).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(HostError::Conflict(format!(
                "VM {name}: member {}/{}-{} is not assigned to this host at revision {} (re-placed or restarted since); not starting a second copy",
                f.service, f.app, f.index, f.token
            ))),
            Err(e) => Err(HostError::Conflict(format!(
                "VM {name}: cannot check member {}/{}-{}'s assignment in the cluster ({e}); not starting",
                f.service, f.app, f.index
            ))),
        }
    }

    /// Start a QEMU process for `config`, confined: as its own user ([`crate::qemu_user`]), with
    /// the descriptors `inherit` (its fd sets), seccomp (`-sandbox`: obsolete system calls,
    /// privilege changes and resource control denied) and no capabilities but those it needs —
    /// `CAP_NET_BIND_SERVICE` only for a forward an admin set below port 1024, `CAP_SYS_PTRACE`
    /// only for QEMU before 8.1 running as root (background snapshots call `userfaultfd`). `spawn` is
    /// denied too: QEMU is handed state files open, never runs a command. Refused once droverd
    /// is stopping.
    pub(super) fn spawn_qemu(
        &self,
        config: &VmConfig,
        mut args: Vec<String>,
        log: &Path,
        inherit: Vec<i32>,
    ) -> Result<tokio::process::Child> {
        if self.s.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(HostError::Conflict(
                "droverd is stopping and starts no QEMU; run the command again once it is back"
                    .into(),
            ));
        }
        args.extend([
            "-sandbox".to_string(),
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".to_string(),
        ]);
        let mut keep = 0;
        let low_port = config.nics.iter().any(|n| match &n.backend {
            NicBackend::User { forwards } => forwards.iter().any(|f| f.host_port < 1024),
            NicBackend::Tap { .. } => false,
        });
        if low_port {
            keep |= process::CAP_NET_BIND_SERVICE;
        }
        // QEMU before 8.1 calls userfaultfd(2) for background snapshots. As root it needs
        // CAP_SYS_PTRACE for that; as its own user it never gets it (it would let an escaped
        // QEMU trace root's processes): vm.unprivileged_userfaultfd = 1 lets it instead.
        if qemu_before(&self.s.qemu_version, (8, 1)) && !self.s.qemu_user.is_dedicated() {
            keep |= process::CAP_SYS_PTRACE;
        }
        let q = &self.s.cfg.qemu;
        let confine = process::Confine {
            keep,
            run_as: self.s.qemu_user.run_as.clone(),
            inherit,
        };
        Ok(process::spawn_confined(
            &q.emulator,
            &q.env(),
            &args,
            log,
            Some(&confine),
        )?)
    }

    /// Launch QEMU with `config`: boot it, restore a saved state, or wait for a migration.
    pub(super) async fn launch(
        &self,
        name: &str,
        slot: &Arc<VmSlot>,
        config: VmConfig,
        started_from: String,
        kind: LaunchKind<'_>,
    ) -> Result<VmInfo> {
        let begun = Instant::now();
        let restore = match kind {
            LaunchKind::Restore(r) => Some(r),
            _ => None,
        };
        let incoming = matches!(kind, LaunchKind::Incoming(_));
        let none = drover_model::Plugged::default();
        let plugged = match kind {
            LaunchKind::Boot => &none,
            LaunchKind::Restore(r) => &r.plugged,
            LaunchKind::Incoming(p) => p,
        };
        for d in config.disks.iter().filter(|d| !d.owned) {
            self.s.pools.recheck(&d.path)?;
        }
        if let Boot::Kernel { kernel, initrd, .. } = &config.boot {
            for p in std::iter::once(kernel).chain(initrd.iter()) {
                self.s.pools.recheck(p)?;
            }
        }
        let kernel = self.kernel_boot(&config).await?;
        let accel = config.accel.unwrap_or(self.s.accel.accel);
        let paths = self.run_paths(name);
        let _ = std::fs::remove_dir_all(&paths.dir);
        let _ = std::fs::remove_file(&paths.ram);
        std::fs::create_dir_all(&paths.dir).map_err(|e| io_ctx("creating", &paths.dir, e))?;
        let ram_dir = self.ram_dir();
        std::fs::create_dir_all(&ram_dir).map_err(|e| io_ctx("creating", &ram_dir, e))?;
        std::fs::create_dir_all(self.vm_dir(name))
            .map_err(|e| io_ctx("creating", &self.vm_dir(name), e))?;
        let console = self.console_path(name);
        let kernel = self.qemu_boot_files(kernel, &paths.dir)?;
        if let Some(r) = restore {
            // QEMU reads the state's files (7.2 opens a private RAM mapping read-write).
            self.grant_qemu(&r.devices, false)?;
            if let Some(m) = &r.memory {
                self.grant_qemu(m, true)?;
            }
        }
        // Configs name disks by origin; QEMU opens each disk's current layer (never a pinned one).
        let on_layers = self
            .open_layers(
                name,
                slot,
                &config,
                restore.and_then(|r| {
                    r.layers.as_ref().map(|layers| layers::RestoreLayers {
                        state: &r.state,
                        layers,
                    })
                }),
            )
            .await?;
        let disks = self.prepare_qemu_launch(name, &paths, &console, &on_layers)?;
        let args = self.qemu_args(
            name,
            &on_layers,
            kernel,
            accel,
            &paths,
            &console,
            &disks,
            QemuMode {
                incoming: restore.is_some() || incoming,
                stopped: incoming,
                // A fast state's memory is mapped privately: the guest runs on the saved pages
                // at once, and its writes never reach the state.
                ram_private: restore.and_then(|r| r.memory.as_deref()),
                detached: false,
                plugged,
            },
        )?;
        // Everything re-adoption needs is durable before QEMU exists: a droverd killed from here
        // on finds the config the QEMU runs (or no QEMU at all).
        self.persist(slot, |i| {
            i.state = VmState::Starting;
            i.pid = None;
            i.accel = Some(accel);
            i.running_config = Some(config.clone());
            i.started_from = Some(started_from.clone());
        })?;
        let started = Instant::now();
        let spawned = self.spawn_qemu(&config, args, &paths.qemu_log, disks.inherit());
        // QEMU has its own copies of the descriptors now.
        drop(disks);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                self.persist(slot, |i| {
                    not_started(i);
                    i.last_exit = Some(exit("start-failed", Some(e.to_string())));
                })?;
                return Err(e);
            }
        };
        let pid = child.id().unwrap_or(0);
        crate::crashpoint::hit("start-spawned");
        let connected = self
            .connect_qmp(&paths.qmp, Some(&mut child), pid, Duration::from_secs(15))
            .await;
        let qmp_at = started.elapsed();
        let (qmp, events) = match connected {
            Ok(c) => c,
            Err(why) => {
                process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                let detail = format!("{why}; {}", log_tail(&paths.qemu_log));
                self.persist(slot, |i| {
                    not_started(i);
                    i.last_exit = Some(exit("start-failed", Some(detail.clone())));
                })?;
                return Err(HostError::Internal(format!(
                    "QEMU could not start VM {name}: {detail}"
                )));
            }
        };
        let (mut loaded_at, mut resumed_at) = (qmp_at, qmp_at);
        if let Some(r) = restore {
            crate::crashpoint::hit("restore-loading");
            // The state's checksum is checked while QEMU reads it: the file is read at the
            // pace of the slower of the two, not twice in a row, and the guest runs only once
            // both are done.
            let check = r.verify.clone().map(|state| {
                let (devices, hashes) = (r.devices.clone(), self.s.hashes.clone());
                tokio::task::spawn_blocking(move || hashes.check_devices(&state, &devices))
            });
            let loaded = async {
                if r.mapped_ram {
                    drover_qemu::migrate::load_state_mapped(&qmp, &r.devices).await
                } else {
                    drover_qemu::migrate::load_state(&qmp, &r.devices, r.memory.is_some()).await
                }
            }
            .await;
            let checked = match check {
                None => Ok(()),
                Some(c) => c.await.unwrap_or_else(|e| {
                    Err(HostError::Internal(format!(
                        "checking the state failed: {e}"
                    )))
                }),
            };
            loaded_at = started.elapsed();
            let failed: Option<HostError> = match (loaded, checked) {
                (Ok(()), Ok(())) => {
                    let r = qmp.execute("cont", None).await.err().map(HostError::from);
                    resumed_at = started.elapsed();
                    r
                }
                (Err(e), _) => Some(e.into()),
                (Ok(()), Err(e)) => Some(e),
            };
            if let Some(e) = failed {
                let _ = qmp.execute("quit", None).await;
                process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                let detail = format!(
                    "loading the saved state failed: {e}; {}",
                    log_tail(&paths.qemu_log)
                );
                self.persist(slot, |i| {
                    not_started(i);
                    i.last_exit = Some(exit("start-failed", Some(detail.clone())));
                })?;
                return Err(match e {
                    // A damaged state says so, as it did before anything started.
                    HostError::Invalid(m) => HostError::Invalid(m),
                    _ => HostError::Internal(format!("VM {name}: {detail}")),
                });
            }
        }
        let info = self.persist(slot, |i| {
            i.state = if incoming {
                VmState::Starting
            } else {
                VmState::Running
            };
            i.pid = Some(pid);
            i.accel = Some(accel);
            i.started_at_ms = Some(hostfacts::now_ms());
            i.running_config = Some(config.clone());
            // Running again (a resume, or a restore of any state): no longer hibernated.
            i.hibernation = None;
            // An arriving VM keeps the next-boot changes it was given on its old host.
            if !incoming {
                i.next_config = None;
            }
            i.started_from = Some(started_from.clone());
        })?;
        self.attach(
            name,
            slot,
            qmp,
            events,
            Some(child),
            pid,
            started,
            config.clone(),
        );
        tracing::info!(vm = name, pid, %accel, "started");
        // Where a start's time went, for bench/restore_latency and anyone reading a slow start.
        let ms = |d: Duration| d.as_millis() as u64;
        tracing::debug!(
            vm = name,
            restore = restore.is_some(),
            prepare_ms = ms(started - begun),
            qmp_ms = ms(qmp_at),
            load_ms = ms(loaded_at - qmp_at),
            cont_ms = ms(resumed_at - loaded_at),
            record_ms = ms(started.elapsed() - resumed_at),
            "launch_phases"
        );
        let _ = info;
        Ok(self.view(slot))
    }

    /// QEMU's command line for VM `name` running `config`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn qemu_args(
        &self,
        name: &str,
        config: &VmConfig,
        kernel: Option<KernelBoot>,
        accel: Accel,
        paths: &RunPaths,
        console: &Path,
        disks: &qemu_files::QemuDisks,
        mode: QemuMode<'_>,
    ) -> Result<Vec<String>> {
        let generation_id = self.generation_id(name)?;
        let platform = self
            .slot(name)
            .map(|s| lock(&s.info).platform.clone())
            .unwrap_or_default();
        let qboot = self.s.cfg.qemu.qboot();
        Ok(cmdline::build(&LaunchSpec {
            config,
            platform: &platform,
            install_args: self.s.cfg.qemu.emulator_args(),
            accel,
            paths,
            console_log: console,
            kernel,
            hotplug_ports: HOTPLUG_PORTS,
            max_cpus: hostfacts::cpus().clamp(config.cpus, drover_model::MAX_VCPUS),
            qboot: Some(qboot).filter(|p| p.exists()),
            ram_file: true,
            ram_private: mode.ram_private,
            stopped: mode.stopped,
            detached: mode.detached,
            incoming: mode.incoming,
            generation_id: Some(&generation_id),
            disk_chains: &disks.chains,
            fds: &disks.args(),
            plugged: mode.plugged,
        }))
    }

    /// Start this host's QEMU with `args`, its output going to `log`.
    /// Wait for QEMU's QMP socket; fail early if QEMU exits first.
    pub(super) async fn connect_qmp(
        &self,
        path: &Path,
        mut child: Option<&mut tokio::process::Child>,
        pid: u32,
        timeout: Duration,
    ) -> std::result::Result<(Qmp, mpsc::UnboundedReceiver<QmpEvent>), String> {
        let begun = Instant::now();
        let deadline = begun + timeout;
        let mut last_err = String::from("QMP socket never appeared");
        while Instant::now() < deadline {
            if let Some(c) = child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(format!("QEMU exited at once ({status})"));
                }
            } else if !process::is_alive(pid, "") {
                return Err("QEMU is not running".into());
            }
            match Qmp::connect(path).await {
                Ok(c) => return Ok(c),
                Err(e) => last_err = e.to_string(),
            }
            // QEMU makes its socket 30-50 ms after exec here: poll finely at first, since a
            // restore's guest waits on this, then back off for a slow start.
            let step = if begun.elapsed() < Duration::from_millis(500) {
                2
            } else {
                20
            };
            tokio::time::sleep(Duration::from_millis(step)).await;
        }
        Err(format!("timed out waiting for QMP: {last_err}"))
    }

    /// Resolve the kernel to boot: the default image (built on first use), a given kernel, or none.
    pub(super) async fn kernel_boot(&self, config: &VmConfig) -> Result<Option<KernelBoot>> {
        match &config.boot {
            Boot::Disk { .. } => Ok(None),
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => Ok(Some(KernelBoot {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: cmdline.clone().unwrap_or_else(|| "console=ttyS0".into()),
            })),
            Boot::Default { cmdline } => {
                let image = match self.current_image()? {
                    Some(i) => i,
                    None => {
                        tracing::info!("no guest image built yet; building it now (first use)");
                        self.build_image(false, |p| tracing::info!("image: {p}"))
                            .await?
                    }
                };
                let mut line = drover_image::default_cmdline().to_string();
                line.push_str(&format!(" drover.hostname={}", config.name));
                if let Some(extra) = cmdline {
                    line.push(' ');
                    line.push_str(extra);
                }
                Ok(Some(KernelBoot {
                    kernel: PathBuf::from(&image.kernel),
                    initrd: Some(PathBuf::from(&image.initrd)),
                    cmdline: line,
                }))
            }
        }
    }

    /// Install the runtime and its supervisor for a QEMU that is up.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attach(
        &self,
        name: &str,
        slot: &Arc<VmSlot>,
        qmp: Qmp,
        events: mpsc::UnboundedReceiver<QmpEvent>,
        child: Option<tokio::process::Child>,
        pid: u32,
        started: Instant,
        launched: VmConfig,
    ) {
        let paths = self.run_paths(name);
        let (exited_tx, exited_rx) = watch::channel(false);
        let (recorded_tx, recorded_rx) = watch::channel(false);
        let (link_stop_tx, link_stop_rx) = watch::channel(false);
        let agent = AgentLink::spawn(
            name.to_string(),
            paths.port_a.clone(),
            paths.port_b.clone(),
            started,
            link_stop_rx,
            Some(self.request_handler(name)),
        );
        let (events_tx, _) = broadcast::channel(64);
        let rt = Runtime {
            qmp,
            agent,
            launched,
            nodes: Arc::default(),
            events: events_tx.clone(),
            pid,
            exited: exited_rx.clone(),
            recorded: recorded_rx,
            stop_reason: Arc::default(),
        };
        *lock(&slot.rt) = Some(rt.clone());
        tokio::spawn(watch_agent_presence(
            rt.qmp.clone(),
            rt.agent.clone(),
            exited_rx.clone(),
            self.s.cfg.no_agent_after,
        ));
        let mgr = self.clone();
        let slot = slot.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            mgr.supervise(
                &name,
                &slot,
                events,
                events_tx,
                child,
                pid,
                rt.stop_reason.clone(),
                paths,
                super::supervise::Gone {
                    link_stop: link_stop_tx,
                    recorded: recorded_tx,
                },
            )
            .await;
            let _ = exited_tx.send(true);
        });
    }
}

/// Which block node each Drover disk device writes to (after saves, no longer `disk-<id>`).
/// What a running QEMU's disks (by Drover disk id) are now: their top block node, and the
/// file of that node's image (only plain absolute paths; QEMU's `json:` names are left out).
pub(super) async fn block_nodes(
    qmp: &Qmp,
) -> (
    std::collections::HashMap<String, String>,
    std::collections::HashMap<String, PathBuf>,
) {
    let mut nodes = std::collections::HashMap::new();
    let mut files = std::collections::HashMap::new();
    if let Ok(serde_json::Value::Array(list)) = qmp.execute("query-block", None).await {
        for b in list {
            let qdev = b.get("qdev").and_then(|q| q.as_str()).unwrap_or_default();
            let Some(id) = qdev.split('/').find_map(|part| part.strip_prefix("disk-")) else {
                continue;
            };
            let inserted = b.get("inserted");
            if let Some(node) = inserted
                .and_then(|i| i.get("node-name"))
                .and_then(|n| n.as_str())
            {
                nodes.insert(id.to_string(), node.to_string());
            }
            let file = inserted
                .and_then(|i| i.get("image"))
                .and_then(|i| i.get("filename"))
                .or_else(|| inserted.and_then(|i| i.get("file")))
                .and_then(|f| f.as_str())
                .map(PathBuf::from)
                .filter(|p| p.is_absolute());
            if let Some(f) = file {
                files.insert(id.to_string(), f);
            }
        }
    }
    (nodes, files)
}
