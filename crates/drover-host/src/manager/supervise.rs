//! Supervision of a running QEMU: waiting for it to end, recording why, and watching whether
//! its guest has an agent.

use super::*;

impl Manager {
    /// Follow QEMU until it exits, then record how it ended.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn supervise(
        &self,
        name: &str,
        slot: &Arc<VmSlot>,
        mut events: mpsc::UnboundedReceiver<QmpEvent>,
        events_tx: broadcast::Sender<QmpEvent>,
        child: Option<tokio::process::Child>,
        pid: u32,
        stop_reason: Arc<Mutex<Option<String>>>,
        paths: RunPaths,
        gone: Gone,
    ) {
        let mut shutdown: Option<serde_json::Value> = None;
        while let Some(ev) = events.recv().await {
            // Nobody listening is the normal case.
            let _ = events_tx.send(ev.clone());
            match ev.name.as_str() {
                "SHUTDOWN" => shutdown = Some(ev.data),
                // QEMU stops the guest itself when a disk write fails with werror=stop or
                // enospc (the default): show that, not `running`.
                "BLOCK_IO_ERROR"
                    if ev.data.get("action").and_then(|a| a.as_str()) == Some("stop") =>
                {
                    let why = io_error_pause(name, Some(&ev.data));
                    tracing::warn!(vm = name, "{why}");
                    let _ = self.commit_or_defer(slot, |i| {
                        if i.state == VmState::Running {
                            i.state = VmState::Paused;
                            i.paused_reason = Some(why);
                        }
                        Ok(Vec::new())
                    });
                }
                "RESUME" if lock(&slot.info).state == VmState::Paused => {
                    tracing::info!(vm = name, "QEMU resumed the guest");
                    let _ = self.commit_or_defer(slot, |i| {
                        if i.state == VmState::Paused {
                            i.state = VmState::Running;
                            i.paused_reason = None;
                        }
                        Ok(Vec::new())
                    });
                }
                "VSERPORT_CHANGE"
                    if ev.data.get("id").and_then(|i| i.as_str())
                        == Some(cmdline::PORT_A_DEVICE)
                        && ev.data.get("open").and_then(|o| o.as_bool()) == Some(true) =>
                {
                    let agent = lock(&slot.rt).as_ref().map(|rt| rt.agent.clone());
                    if let Some(agent) = agent {
                        agent.note_guest_opened();
                    }
                }
                "RESET" => tracing::info!(vm = name, "guest reset"),
                "GUEST_PANICKED" => tracing::warn!(vm = name, "guest panicked: {}", ev.data),
                other => tracing::debug!(vm = name, "QMP event {other}"),
            }
        }
        // QMP closed: QEMU is exiting. After a shutdown it is only waited for until it has begun
        // to exit (its own clean-up done, sockets unlinked): the kernel may take 50-200 ms more
        // to tear its memory down, which a restore replacing it need not wait for. Its files
        // (and disk locks) are free only once it is reaped, which `exited` tells. A QEMU that
        // ended without a shutdown is reaped first, for its exit status.
        let closed = Instant::now();
        let marker = paths.dir.display().to_string();
        let (mut child, status) = match child {
            Some(c) if shutdown.is_some() => {
                if wait_exiting(pid).await {
                    (Some(c), None)
                } else {
                    (None, reap(Some(c), pid, &marker).await)
                }
            }
            c => (None, reap(c, pid, &marker).await),
        };
        let leaving = closed.elapsed();
        // The guest's memory is gone with it; free the RAM file (it lives in /dev/shm).
        qemu_files::free_ram_file(&paths.ram);
        self.publish(VmEvent::QemuGone { vm: name.into() }).await;
        let operator = lock(&stop_reason).clone();
        let guest = shutdown
            .as_ref()
            .and_then(|d| d.get("guest"))
            .and_then(|g| g.as_bool())
            .unwrap_or(false);
        let qemu_reason = shutdown
            .as_ref()
            .and_then(|d| d.get("reason"))
            .and_then(|r| r.as_str())
            .map(str::to_string);
        let exit_info = match (operator, guest, &qemu_reason) {
            (Some(how), _, _) => exit("operator-stop", Some(how)),
            (None, true, r) => exit("guest-poweroff", r.clone()),
            (None, false, Some(r)) if r == "host-signal" => {
                exit("killed", Some("QEMU received a signal".into()))
            }
            (None, false, Some(r)) => exit("host-shutdown", Some(r.clone())),
            (None, false, None) => exit(
                "crashed",
                Some(format!(
                    "QEMU exited without a shutdown{}; {}",
                    status.map(|s| format!(" ({s})")).unwrap_or_default(),
                    log_tail(&paths.qemu_log)
                )),
            ),
        };
        tracing::info!(vm = name, reason = exit_info.reason, "stopped");
        let freed = closed.elapsed();
        let recorded = self.record_stopped(slot, exit_info.clone());
        tracing::debug!(
            vm = name,
            leaving_ms = leaving.as_millis() as u64,
            freed_ms = freed.as_millis() as u64,
            recorded_ms = closed.elapsed().as_millis() as u64,
            "exit_phases"
        );
        if let Err(e) = &recorded {
            tracing::error!(vm = name, "could not record the stop: {e}");
        }
        self.publish(VmEvent::Exited {
            vm: name.into(),
            exit: exit_info,
            recorded: recorded.is_ok(),
        })
        .await;
        let _ = gone.link_stop.send(true);
        *lock(&slot.rt) = None;
        let _ = gone.recorded.send(true);
        if let Some(c) = child.take() {
            reap(Some(c), pid, &marker).await;
        }
    }

    /// Record a stop and, with persistence on, seal the config the VM ran with (live changes and
    /// next-boot changes included) as a new generation, in one transaction.
    pub(super) fn record_stopped(&self, slot: &Arc<VmSlot>, exit_info: ExitInfo) -> Result<VmInfo> {
        let mut sealed = None;
        let info = self.commit_or_defer(slot, |i| {
            let mut writes = Vec::new();
            let ran = i.next_config.take().or_else(|| i.running_config.take());
            if let (true, Some(cfg)) = (i.persist, ran) {
                let mut history = self.history(i)?;
                let why = format!("sealed at shutdown ({})", exit_info.reason);
                if let Some(gen) = history.seal(
                    &cfg.pinned(),
                    i.persist_mode,
                    "droverd",
                    &why,
                    hostfacts::now_ms(),
                )? {
                    writes.push(drover_store::put(HISTORY, &i.name, &history)?);
                    writes.push(self.journal(
                        &i.name,
                        "droverd",
                        &format!("sealed generation {gen}"),
                        Vec::new(),
                    )?);
                    sealed = Some(gen);
                }
            }
            i.state = VmState::Stopped;
            i.pid = None;
            i.accel = None;
            i.started_at_ms = None;
            i.running_config = None;
            i.next_config = None;
            i.started_from = None;
            i.paused_reason = None;
            i.last_exit = Some(exit_info);
            Ok(writes)
        })?;
        if let Some(gen) = sealed {
            tracing::info!(
                vm = info.name,
                generation = gen,
                "sealed the running config"
            );
        }
        Ok(info)
    }
}

pub(super) fn exit(reason: &str, detail: Option<String>) -> ExitInfo {
    ExitInfo {
        at_ms: hostfacts::now_ms(),
        reason: reason.to_string(),
        detail,
    }
}

/// Why a VM shows `paused` when QEMU stopped it after a failed disk write (`detail`: what
/// QEMU's `BLOCK_IO_ERROR` said).
pub(super) fn io_error_pause(vm: &str, detail: Option<&serde_json::Value>) -> String {
    let what = detail
        .map(|d| {
            let dev = d
                .get("device")
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .or_else(|| d.get("node-name").and_then(|v| v.as_str()))
                .unwrap_or("a disk");
            let why = if d.get("nospace").and_then(|v| v.as_bool()) == Some(true) {
                "no space left on device".to_string()
            } else {
                d.get("reason")
                    .and_then(|v| v.as_str())
                    .unwrap_or("I/O error")
                    .to_string()
            };
            format!("writing {dev} failed: {why}")
        })
        .unwrap_or_else(|| "a disk write failed".into());
    format!(
        "QEMU paused the guest: {what}; free space on the disks' filesystem, then `drover vm restart {vm}`"
    )
}

/// The last lines of QEMU's own log, for error messages.
pub(super) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    if tail.is_empty() {
        "QEMU logged nothing".into()
    } else {
        format!("QEMU log: {tail}")
    }
}

/// Who waits on a supervised QEMU's end, told by [`Manager::supervise`].
pub(super) struct Gone {
    /// Stops the VM's agent link.
    pub link_stop: watch::Sender<bool>,
    /// The stop is recorded and the slot free for a new QEMU (the old one's files may still be
    /// open: see [`Runtime::exited`]).
    pub recorded: watch::Sender<bool>,
}

/// Wait (polling every 2 ms, at most 10 s) until QEMU `pid` has begun to exit; false if it has
/// not by then.
async fn wait_exiting(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if process::is_exiting(pid) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Wait until QEMU has exited (our child: reaped, SIGKILLed after 10 s; adopted: gone from
/// /proc); its exit status when it was our child.
async fn reap(child: Option<tokio::process::Child>, pid: u32, marker: &str) -> Option<String> {
    match child {
        Some(mut c) => match tokio::time::timeout(Duration::from_secs(10), c.wait()).await {
            Ok(Ok(s)) => Some(s.to_string()),
            _ => {
                process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = c.wait().await;
                Some("killed after QMP closed".into())
            }
        },
        None => {
            let deadline = Instant::now() + Duration::from_secs(10);
            while process::is_alive(pid, marker) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if process::is_alive(pid, marker) {
                process::signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
            None
        }
    }
}

/// Follow, once a second until the agent answers or QEMU exits, whether the guest shows an
/// agent: when the guest's virtio-serial driver came up (QEMU's `x-query-virtio-status`; a
/// QEMU without it leaves only the time since start) and, through
/// [`AgentLink::judge_presence`], whether anything opened the request port within
/// `after_driver` of it.
pub(super) async fn watch_agent_presence(
    qmp: Qmp,
    agent: AgentLink,
    mut exited: watch::Receiver<bool>,
    after_driver: Duration,
) {
    let mut driver_since: Option<Instant> = None;
    let mut can_query = true;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = exited.wait_for(|e| *e) => return,
        }
        if agent.status().ready {
            return;
        }
        if driver_since.is_none() && can_query {
            let args = serde_json::json!({"path": cmdline::VSER_VIRTIO_PATH});
            match qmp.execute("x-query-virtio-status", Some(args)).await {
                // Decoded status bits name `DRIVER_OK` once the guest driver is set up.
                Ok(v) if v.to_string().contains("DRIVER_OK") => driver_since = Some(Instant::now()),
                Ok(_) => {}
                Err(_) => can_query = false,
            }
        }
        agent.judge_presence(driver_since.map(|t| t.elapsed()), after_driver);
    }
}
