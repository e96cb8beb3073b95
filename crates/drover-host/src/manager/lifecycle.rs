//! Creating, starting, stopping and deleting VMs: the lifecycle verbs and what they decide
//! (which config boots, whether it fits this host).

use super::*;

impl Manager {
    /// What a VM created now is pinned to: the versioned machine type `q35` means here, the
    /// named TCG CPU model, and RAM padding only where this QEMU has the bug it avoids. Without
    /// a probe, what VMs always had.
    pub(super) fn new_vm_platform(&self) -> drover_model::Platform {
        match &self.s.probe {
            Some(p) => drover_model::Platform {
                machine: p.resolve_machine("q35").map(str::to_string),
                cpu: p.tcg_cpu_model().map(str::to_string),
                ram_pad: p.tcg_dirty_tracking_bug(),
            },
            None => drover_model::Platform::default(),
        }
    }

    /// The record of a VM just defined with `config`, stopped, with this host's defaults.
    pub(super) fn new_record(&self, config: VmConfig, platform: drover_model::Platform) -> VmInfo {
        VmInfo {
            name: config.name.to_string(),
            state: VmState::Stopped,
            config,
            created_at_ms: hostfacts::now_ms(),
            pid: None,
            accel: None,
            started_at_ms: None,
            last_exit: None,
            agent: None,
            persist: self.s.cfg.persist_default,
            persist_mode: self.s.cfg.persist_mode_default,
            running_config: None,
            next_config: None,
            started_from: None,
            migration: None,
            paused_reason: None,
            platform,
            fence: None,
            hibernation: None,
            identity: None,
            unwritten: Default::default(),
            clone_of: None,
        }
    }

    /// Define a VM: validate, check the host can ever run it, create its disks, record it.
    ///
    /// Paths a non-admin names (disk images, kernel, initrd) must be files in an image pool,
    /// and its port forwards unprivileged ports on loopback (see [`crate::pools`]).
    pub async fn create(&self, spec: VmSpec, caller: &Caller) -> Result<VmInfo> {
        caller.require(Permission::Lifecycle)?;
        let (spec, image_boot) = self.expand_from_image(spec)?;
        let mut valid = spec.validate()?;
        for (_, source, readonly) in valid.disks.iter_mut() {
            if let DiskSource::Image { path } = source {
                let usage = if *readonly {
                    crate::pools::PathUse::DiskReadOnly
                } else {
                    crate::pools::PathUse::DiskReadWrite
                };
                *path = self.s.pools.resolve(caller, path, usage)?;
            }
        }
        for (_, _, backend) in &valid.nics {
            match backend {
                NicBackend::User { forwards } => {
                    for f in forwards {
                        crate::pools::check_forward(caller, f)?;
                    }
                }
                // A host interface is the host's network: an admin's choice.
                NicBackend::Tap { ifname } => {
                    caller.require(Permission::Admin).map_err(|_| {
                        HostError::Forbidden(format!(
                            "tap device {ifname}: only an admin may connect a VM to a host interface; use user networking"
                        ))
                    })?;
                }
            }
        }
        let name = valid.name.to_string();
        let _guard = self.s.create_lock.lock().await;
        if lock(&self.s.vms).contains_key(&name) {
            return Err(HostError::AlreadyExists(name));
        }
        let host_cpus = hostfacts::cpus();
        if valid.cpus > host_cpus {
            return Err(HostError::Resources(format!(
                "VM {name} asks for {} vCPUs; this host has {host_cpus} CPUs",
                valid.cpus
            )));
        }
        let mem = hostfacts::memory();
        if valid.memory > mem.total.saturating_sub(HOST_RESERVE) {
            return Err(HostError::Resources(format!(
                "VM {name} asks for {} of memory; this host has {} in all",
                format_size(valid.memory),
                format_size(mem.total)
            )));
        }
        let paths = self.run_paths(&name);
        if paths.longest_socket().as_os_str().len() > cmdline::MAX_SOCKET_PATH {
            return Err(HostError::Invalid(format!(
                "the socket path {} is longer than the {}-byte limit; use a shorter state dir or VM name",
                paths.longest_socket().display(),
                cmdline::MAX_SOCKET_PATH
            )));
        }
        let mut boot = spec.boot.resolve()?;
        if let Boot::Kernel { kernel, initrd, .. } = &mut boot {
            for p in std::iter::once(&mut *kernel).chain(initrd.iter_mut()) {
                let from_image = image_boot
                    .as_ref()
                    .is_some_and(|b| *p == b.kernel || *p == b.initrd);
                // Before any look at the file: a non-admin learns nothing of paths outside pools.
                *p = if from_image {
                    p.clone()
                } else {
                    self.s
                        .pools
                        .resolve(caller, p, crate::pools::PathUse::Boot)?
                };
                if !p.is_file() {
                    return Err(HostError::Invalid(format!(
                        "boot file {} does not exist",
                        p.display()
                    )));
                }
            }
        }
        let vm_dir = self.vm_dir(&name);
        // A leftover directory from a crash between mkdir and the record write is ours to reuse.
        std::fs::create_dir_all(vm_dir.join("disks"))
            .map_err(|e| io_ctx("creating", &vm_dir, e))?;
        let mut disks = Vec::new();
        let result = async {
            for (id, source, readonly) in &valid.disks {
                disks.push(match source {
                    DiskSource::Create { size } => {
                        let path = vm_dir.join("disks").join(format!("{id}.qcow2"));
                        // A stale file from an earlier failed create of the same name: replace it.
                        let _ = std::fs::remove_file(&path);
                        let p = path.clone();
                        let size = *size;
                        tokio::task::spawn_blocking(move || img::create_qcow2(&p, size))
                            .await
                            .map_err(|e| HostError::Internal(e.to_string()))??;
                        let mut d = DiskConfig::unplaced(
                            id.clone(),
                            path,
                            drover_model::DiskFormat::Qcow2,
                            size,
                            *readonly,
                            true,
                        );
                        d.index = disks.len() as u32;
                        d
                    }
                    DiskSource::FromImage { name, size } => {
                        let mut d = self
                            .disk_from_image(&vm_dir, id, name, *size, *readonly)
                            .await?;
                        d.index = disks.len() as u32;
                        d
                    }
                    DiskSource::Image { path } => {
                        let p = path.clone();
                        let info = tokio::task::spawn_blocking(move || img::inspect(&p))
                            .await
                            .map_err(|e| HostError::Internal(e.to_string()))??;
                        let mut d = DiskConfig::unplaced(
                            id.clone(),
                            path.clone(),
                            info.format,
                            info.virtual_size,
                            *readonly,
                            false,
                        );
                        d.index = disks.len() as u32;
                        d
                    }
                });
            }
            let nics: Vec<NicConfig> = valid
                .nics
                .iter()
                .map(|(id, mac, backend)| NicConfig {
                    id: id.clone(),
                    mac: mac.unwrap_or_else(|| MacAddr::qemu_local(rand::random())),
                    backend: backend.clone(),
                    slot: None,
                    addr: None,
                })
                .collect();
            if let Some(s) = &spec.seed {
                disks.push(seed::make_disk(&name, s, &vm_dir, &nics, &disks)?);
            }
            let mut config = VmConfig {
                name: valid.name.clone(),
                cpus: valid.cpus,
                memory: valid.memory,
                disks: disks.clone(),
                nics,
                boot,
                accel: spec.accel,
                max_memory: valid.max_memory,
            };
            // Every device's PCI slot is recorded from the start.
            config.pin_pci();
            config.validate_config()?;
            let info = self.new_record(config, self.new_vm_platform());
            self.s.store.apply(vec![
                drover_store::put(VMS, &name, &VmRecord::from(&info))?,
                drover_store::put(HISTORY, &name, &ConfigHistory::new(info.config.clone()))?,
                identity::generation_write(&name, "created")?,
            ])?;
            Ok::<_, HostError>(info)
        }
        .await;
        match result {
            Ok(info) => {
                let slot = VmSlot::new(info.clone());
                lock(&self.s.vms).insert(name.clone(), slot);
                tracing::info!(vm = name, "created");
                self.publish(VmEvent::Created { info: info.clone() }).await;
                Ok(info)
            }
            Err(e) => {
                // Nothing half-made stays behind.
                let _ = std::fs::remove_dir_all(&vm_dir);
                Err(e)
            }
        }
    }

    /// Every stored row that belongs to VM `name` (table, key, value), in every table of
    /// [`registry::VM_TABLES`]. What a delete removes and a migration carries.
    pub(super) fn vm_rows(&self, name: &str) -> Result<Vec<(String, String, Vec<u8>)>> {
        let mut rows = Vec::new();
        for table in registry::vm_tables() {
            match table.keyed {
                registry::Keyed::ByName => {
                    if let Some(v) = self.s.store.get_raw(table.name, name)? {
                        rows.push((table.name.to_string(), name.to_string(), v));
                    }
                }
                registry::Keyed::ByPrefix => {
                    for (key, v) in self.s.store.list_raw(table.name)? {
                        if table.owns(&key, name) {
                            rows.push((table.name.to_string(), key, v));
                        }
                    }
                }
            }
        }
        Ok(rows)
    }

    /// Remove a VM, its owned disks and its logs. Operator-provided images are left alone.
    ///
    /// A durable intent: one transaction removes the VM's records and records what is left to
    /// remove (`deleting/<name>`); the files go next, then that record. A droverd killed in
    /// between finishes the removal at its next start.
    ///
    /// A disk given as `image=PATH` gets the VM's latest data written back into the image first
    /// (after a save it lives in droverd's layers), unless `discard_changes`: the image then stays
    /// as it was when the first save pinned it.
    pub async fn delete(
        &self,
        name: &str,
        force: bool,
        discard_changes: bool,
        caller: &Caller,
    ) -> Result<VmInfo> {
        caller.require(Permission::Lifecycle)?;
        let slot = self.slot(name)?;
        if force && VmAction::Stop.check(name, lock(&slot.info).state).is_ok() {
            self.stop(name, 0, true, caller).await?;
        }
        let op = self.door(name, VmAction::Delete, caller).await?;
        let slot = op.slot();
        self.refuse_if_cloned(name, None, &format!("delete VM {name}"))?;
        let mut info = self.view(slot);
        if discard_changes {
            if !info.unwritten.is_empty() {
                tracing::warn!(vm = name, disks = ?info.unwritten.keys().collect::<Vec<_>>(), "deleting without writing the latest data back into the user's images (--discard-changes)");
            }
        } else {
            self.write_back_user_images(name).await?;
            info.unwritten.clear();
        }
        let _create = self.s.create_lock.lock().await;
        let intent = DeleteIntent {
            owned_disks: info
                .config
                .disks
                .iter()
                .filter(|d| d.owned)
                .map(|d| d.path.clone())
                .collect(),
        };
        let mut writes: Vec<Write> = self
            .vm_rows(name)?
            .into_iter()
            .map(|(table, key, _)| Write::Delete { table, key })
            .collect();
        writes.push(drover_store::put(DELETING, name, &intent)?);
        self.s.store.apply(writes)?;
        lock(&self.s.vms).remove(name);
        crate::crashpoint::hit("delete-files");
        self.finish_delete(name, &intent);
        tracing::info!(vm = name, "deleted");
        self.publish(VmEvent::Deleted { vm: name.into() }).await;
        Ok(info)
    }

    /// Remove what a recorded delete left: helper processes, owned disks, the VM's directories
    /// and RAM files; then the record of the delete.
    pub(super) fn finish_delete(&self, name: &str, intent: &DeleteIntent) {
        self.reap_helpers(Some(name), &[]);
        for d in &intent.owned_disks {
            let _ = std::fs::remove_file(d);
        }
        let _ = std::fs::remove_dir_all(self.vm_dir(name));
        let _ = std::fs::remove_dir_all(self.run_paths(name).dir);
        let _ = std::fs::remove_file(self.run_paths(name).ram);
        // The RAM copies of its states (and their interrupted copies).
        let prefix = format!("{name}@");
        if let Ok(dir) = std::fs::read_dir(self.ram_dir()) {
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        if let Err(e) = self.s.store.delete(DELETING, name) {
            tracing::warn!(
                vm = name,
                "could not drop the record of a finished delete: {e}"
            );
        }
    }

    /// At start: finish the deletes a killed droverd left half done.
    pub(super) fn finish_deletes(&self) {
        let Ok(rows) = self.s.store.list::<DeleteIntent>(DELETING) else {
            return;
        };
        for (name, intent) in rows {
            if lock(&self.s.vms).contains_key(&name) {
                // Recreated since (cannot happen through the API, which holds the create lock).
                let _ = self.s.store.delete(DELETING, &name);
                continue;
            }
            tracing::info!(
                vm = name,
                "finishing a delete interrupted by a droverd stop"
            );
            self.finish_delete(&name, &intent);
        }
    }

    /// Launch QEMU for a stopped VM; returns once QEMU runs and QMP answers. `req` picks the
    /// configuration: by default the latest generation when persistence is on, else the initial.
    pub async fn start(&self, name: &str, req: &StartRequest, caller: &Caller) -> Result<VmInfo> {
        let op = self.door(name, VmAction::Start, caller).await?;
        self.start_locked(name, &op, req, caller).await
    }

    /// Start with the lock held; the state is checked again, for a restart's second half.
    pub(super) async fn start_locked(
        &self,
        name: &str,
        op: &OpGuard,
        req: &StartRequest,
        caller: &Caller,
    ) -> Result<VmInfo> {
        let slot = op.slot();
        let info = lock(&slot.info).clone();
        VmAction::Start
            .check(name, info.state)
            .map_err(HostError::Conflict)?;
        let (config, started_from) = self.choose_config(slot, &info, req, caller)?;
        self.check_fits(name, &config)?;
        // A cluster member starts only where and while the cluster assigns it: a controller's
        // start with its token, and any other start (an operator's, a restart) with the token
        // of its last one, so a member re-placed elsewhere never runs here again.
        if let Some(f) = req.fence.as_ref().or(info.fence.as_ref()) {
            self.check_fence(name, f).await?;
            if req.fence.is_some() {
                // Durable before QEMU exists: a restarted droverd knows which member this is.
                self.persist(slot, |i| i.fence = Some(f.clone()))?;
            }
            // Before QEMU exists too: the fence watchdog kills it if droverd goes silent.
            crate::fence_watchdog::mark_member(&self.s.cfg.state_dir, name)
                .map_err(|e| io_ctx("marking as a cluster member", &self.vm_dir(name), e))?;
        }
        let info = self
            .launch(name, slot, config.pinned(), started_from, LaunchKind::Boot)
            .await?;
        self.publish(VmEvent::Started { info: info.clone() }).await;
        Ok(info)
    }

    /// Pick the config a start boots, per the request and the persistence flag. Stores a
    /// composed config as a generation when asked.
    pub(super) fn choose_config(
        &self,
        slot: &VmSlot,
        info: &VmInfo,
        req: &StartRequest,
        caller: &Caller,
    ) -> Result<(VmConfig, String)> {
        let mut history = self.history(info)?;
        let (gen, mut from) = match req.config {
            Some(g) => (
                g,
                if g == 0 {
                    "initial".to_string()
                } else {
                    format!("generation {g}")
                },
            ),
            None => match history.latest().filter(|_| info.persist) {
                Some(g) => (g, format!("generation {g}")),
                None => (0, "initial".to_string()),
            },
        };
        let base = history.resolve(gen)?;
        let composing = !(req.without.is_empty()
            && req.with.is_empty()
            && req.cpus.is_none()
            && req.memory.is_none());
        if !composing {
            if req.save_as_generation {
                return Err(HostError::Invalid(
                    "storing a composed config as a generation needs something composed: elements left out or taken from other generations, or cpus or memory set".into(),
                ));
            }
            return Ok((base, from));
        }
        let without = req.without.clone();
        let mut with = Vec::new();
        for w in &req.with {
            let element = history.element(w.generation, &w.element)?;
            with.push((
                format!("generation {}", w.generation),
                w.element.clone(),
                element,
            ));
        }
        let (set_cpus, set_memory) = (req.cpus, req.memory);
        let composed = drover_model::compose(&drover_model::Compose {
            base,
            without,
            with,
            set_cpus,
            set_memory,
        })?;
        from = format!("composed from {from}");
        if req.save_as_generation {
            if let Some(g) = history.seal(
                &composed,
                info.persist_mode,
                &caller.name,
                "composed at start",
                hostfacts::now_ms(),
            )? {
                let name = info.name.clone();
                let hist = history.clone();
                self.commit(slot, |_| {
                    Ok(vec![
                        drover_store::put(HISTORY, &name, &hist)?,
                        self.journal(
                            &name,
                            &caller.name,
                            &format!("stored composed config as generation {g}"),
                            Vec::new(),
                        )?,
                    ])
                })?;
                from = format!("generation {g} (composed)");
            }
        }
        Ok((composed, from))
    }

    /// Whether the host can run `config` now: memory available, vCPUs, disks present.
    pub(super) fn check_fits(&self, name: &str, config: &VmConfig) -> Result<()> {
        self.check_room(name, config)?;
        for d in &config.disks {
            let layer = self.current_layer(name, d)?;
            if !layer.exists() {
                return Err(HostError::Invalid(format!(
                    "disk {} of VM {name} is missing: {} does not exist",
                    d.id,
                    layer.display()
                )));
            }
        }
        Ok(())
    }

    /// Whether this host has the memory and CPUs `config` needs now.
    pub(super) fn check_room(&self, name: &str, config: &VmConfig) -> Result<()> {
        let mem = hostfacts::memory();
        if config.memory > mem.available.saturating_sub(HOST_RESERVE) {
            return Err(HostError::Resources(format!(
                "VM {name} needs {} of memory; only {} is available on this host now",
                format_size(config.memory),
                format_size(mem.available)
            )));
        }
        let cpus = hostfacts::cpus();
        if config.cpus > cpus {
            return Err(HostError::Resources(format!(
                "VM {name} asks for {} vCPUs; this host has {cpus} CPUs",
                config.cpus
            )));
        }
        Ok(())
    }

    /// Stop a running VM: the agent's shutdown, then ACPI power-down, then kill.
    pub async fn stop(
        &self,
        name: &str,
        timeout_s: u64,
        force: bool,
        caller: &Caller,
    ) -> Result<VmInfo> {
        let op = self.door(name, VmAction::Stop, caller).await?;
        self.stop_locked(name, &op, timeout_s, force).await
    }

    /// Stop with the lock held; the state is checked again, as the VM may have exited since
    /// the caller's own check (a hibernate's save, a restore's replacement).
    pub(super) async fn stop_locked(
        &self,
        name: &str,
        op: &OpGuard,
        timeout_s: u64,
        force: bool,
    ) -> Result<VmInfo> {
        self.stop_until(name, op, timeout_s, force, false).await
    }

    /// Stop a VM whose QEMU a restore replaces at once: returns as soon as the stop is recorded,
    /// while the kernel may still be freeing the old QEMU's memory (50-200 ms). The new QEMU
    /// opens fresh overlays, never a file the old one wrote.
    pub(super) async fn stop_to_replace(&self, name: &str, op: &OpGuard) -> Result<VmInfo> {
        self.stop_until(name, op, 0, true, true).await
    }

    /// [`Self::stop_locked`]; with `recorded_only`, [`Self::stop_to_replace`].
    async fn stop_until(
        &self,
        name: &str,
        op: &OpGuard,
        timeout_s: u64,
        force: bool,
        recorded_only: bool,
    ) -> Result<VmInfo> {
        let slot = op.slot();
        VmAction::Stop
            .check(name, lock(&slot.info).state)
            .map_err(HostError::Conflict)?;
        let Some(rt) = self.runtime(slot) else {
            return Err(HostError::Conflict(format!("VM {name} is not running")));
        };
        // A state capture streams from this QEMU: let it end rather than cut it off (bounded, so
        // a stuck capture cannot keep a VM from stopping).
        let _capture =
            match tokio::time::timeout(Duration::from_secs(300), slot.capture.lock()).await {
                Ok(g) => Some(g),
                Err(_) => {
                    tracing::warn!(
                        vm = name,
                        "stopping although a state capture is still running"
                    );
                    None
                }
            };
        let before = lock(&slot.info).state;
        // Deferred rather than refused when the store cannot write (a full disk is when a paused
        // VM most needs stopping); the stop's outcome is recorded the same way.
        self.commit_or_defer(slot, |i| {
            i.state = VmState::Stopping;
            Ok(Vec::new())
        })?;
        let deadline = Instant::now() + Duration::from_secs(timeout_s);
        let mut exited = if recorded_only {
            rt.recorded.clone()
        } else {
            rt.exited.clone()
        };
        let wait_until = |mut rx: watch::Receiver<bool>, until: Instant| async move {
            let left = until.saturating_duration_since(Instant::now());
            matches!(
                tokio::time::timeout(left, rx.wait_for(|e| *e)).await,
                Ok(Ok(_))
            )
        };
        let set_reason = |how: &str| *lock(&rt.stop_reason) = Some(how.to_string());
        let mut done = false;
        if !force && timeout_s > 0 {
            // 1. The agent: the cleanest shutdown (syncs disks).
            let agent_ready = rt.agent.status().ready;
            if agent_ready {
                set_reason("shut down by the guest agent");
                let budget = Duration::from_secs(timeout_s.min(5));
                match rt
                    .agent
                    .call(drover_proto::Body::Shutdown { reboot: false }, budget)
                    .await
                {
                    Ok(_) => {
                        let until = Instant::now() + (deadline - Instant::now()) * 2 / 3;
                        done = wait_until(exited.clone(), until).await;
                    }
                    Err(e) => tracing::info!(vm = name, "agent shutdown failed: {e}; trying ACPI"),
                }
            }
            // 2. ACPI power button.
            if !done && Instant::now() < deadline {
                set_reason("ACPI power-down");
                if rt.qmp.execute("system_powerdown", None).await.is_ok() {
                    done = wait_until(exited.clone(), deadline).await;
                }
            }
        }
        if !done {
            // 3. Ask QEMU to quit (flushes its disks), then SIGKILL.
            set_reason(if force {
                "forced stop"
            } else {
                "killed after the graceful-stop timeout"
            });
            let asked = Instant::now();
            let _ = rt
                .qmp
                .execute_timeout("quit", None, Duration::from_secs(2))
                .await;
            let answered = asked.elapsed();
            done = wait_until(exited.clone(), Instant::now() + Duration::from_secs(3)).await;
            tracing::debug!(
                vm = name,
                quit_ms = answered.as_millis() as u64,
                exited_ms = asked.elapsed().as_millis() as u64,
                "stop_phases"
            );
            if !done {
                process::signal(rt.pid, nix::sys::signal::Signal::SIGKILL);
                done = matches!(
                    tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| *e)).await,
                    Ok(Ok(_))
                );
            }
        }
        if !done {
            // Back to what it was even if the store refuses the write: never `stopping` forever.
            self.commit_or_defer(slot, |i| {
                i.state = before;
                Ok(Vec::new())
            })?;
            return Err(HostError::Timeout(format!(
                "VM {name} did not stop even after SIGKILL"
            )));
        }
        Ok(self.view(slot))
    }

    /// Stop, then start again.
    pub async fn restart(
        &self,
        name: &str,
        timeout_s: u64,
        force: bool,
        caller: &Caller,
    ) -> Result<VmInfo> {
        let op = self.door(name, VmAction::Restart, caller).await?;
        self.stop_locked(name, &op, timeout_s, force).await?;
        self.start_locked(name, &op, &StartRequest::default(), &Caller::daemon())
            .await
    }
}

/// Back to stopped after a launch that never ran the guest (nothing to seal).
pub(super) fn not_started(i: &mut VmInfo) {
    // A resume that fails leaves the VM hibernated: its state is still there to resume from.
    i.state = if i.hibernation.is_some() {
        VmState::Hibernated
    } else {
        VmState::Stopped
    };
    i.pid = None;
    i.accel = None;
    i.running_config = None;
    i.started_from = None;
}
