//! Moving a VM to another host.
//!
//! Live: the destination droverd creates the VM's disks and a QEMU that waits, paused, for the
//! memory stream; it exports the new disks over NBD. The source mirrors each disk into them
//! (`blockdev-mirror`, as libvirt's `--copy-storage-all`) while the guest runs, then migrates
//! memory over TCP. QEMU stops before the switch-over (`pause-before-switchover`), the mirrors
//! are completed (the destination's disks now equal the source's), the switch-over finishes,
//! and the source asks the destination to commit: it records the VM as its own and runs it.
//!
//! Exactly one host owns the VM at every moment. Each side records its phase durably before it
//! acts: the source owns the VM until the destination has committed; while the source waits for
//! that answer (`handing-over`) the VM runs nowhere, and an unclear answer is resolved by asking
//! the destination, never by guessing. A destination that has not committed throws the VM away
//! when its QEMU ends or the source aborts.
//!
//! Offline (stopped VM): the destination serves each new disk with `qemu-nbd`, the source
//! copies into it with `qemu-img convert`, then commits the same way.

use super::{lock, LaunchKind, Manager, OpGuard, VmSlot};
use crate::action::VmAction;
use crate::auth::{Caller, Permission};
use crate::error::{io_ctx, HostError, Result};
use crate::hostfacts;
use crate::vm_events::{Reaction, Subscriber, VmEvent};
use drover_api::{
    ApiError, Client, ClientError, HostInfo, IncomingReady, IncomingRequest, MigrateProgress,
    MigrateRequest, MigrateResult, MigrationMark, MigrationPhase, MigrationRole, MigrationStep,
    MovedFile, PackedRow, RemoteSpec, VmInfo, VmState,
};
use drover_model::VmConfig;
use drover_qemu::live_migration;
use drover_qemu::{hotplug, nbd};
use drover_store::{StoreExt, Write};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where a source keeps the destination's address for recovery after a restart (key: VM).
pub(super) const MIGRATIONS: &str = "migrations";

/// Migration's part in the VM events: a VM arriving here whose QEMU exits is not ours and is
/// dropped; a VM with a migration on record when droverd opens has it finished or undone.
/// Both run in the background (they may talk to the peer host).
pub(super) const SUBSCRIBER: Subscriber<Manager> = Subscriber::new("migration", on_vm_event);

fn on_vm_event<'a>(m: &'a Manager, ev: &'a VmEvent) -> Reaction<'a> {
    match ev {
        VmEvent::Exited { vm, .. } => {
            let Ok(slot) = m.slot(vm) else {
                return crate::vm_events::done();
            };
            let arriving = matches!(
                lock(&slot.info).migration,
                Some(MigrationMark {
                    role: MigrationRole::Incoming,
                    phase: MigrationPhase::Copying,
                    ..
                })
            );
            if arriving {
                let (m, vm) = (m.clone(), vm.clone());
                tokio::spawn(async move { m.discard_incoming(&vm).await });
            }
        }
        VmEvent::Readopted { vm, .. } => {
            let Ok(slot) = m.slot(vm) else {
                return crate::vm_events::done();
            };
            if lock(&slot.info).migration.is_some() {
                let (m, vm) = (m.clone(), vm.clone());
                tokio::spawn(async move { m.recover_migration(&vm, &slot).await });
            }
        }
        _ => {}
    }
    crate::vm_events::done()
}

mod copy;

/// Default longest planned switch-over pause. PLATFORM.md: a 50 ms limit gives ~10 ms here, with
/// spikes; 20 keeps the pause short with no measurable cost in total time on a LAN.
const DEFAULT_DOWNTIME_MS: u64 = 20;
/// Default bandwidth cap: none to speak of (QEMU's own default, 128 MiB/s, is far too low).
const DEFAULT_BANDWIDTH: u64 = 16 << 30;
/// A copy that moves no byte for this long is given up (a cut network, a hung peer); droverd's
/// environment can shorten it (`DROVER_MIGRATION_STALL_SECS`, for tests).
fn stall() -> Duration {
    let secs = std::env::var("DROVER_MIGRATION_STALL_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| (1..=3600).contains(s))
        .unwrap_or(20);
    Duration::from_secs(secs)
}
/// How long a source keeps asking an unclear destination before it reports and waits longer.
const RESOLVE_WINDOW: Duration = Duration::from_secs(30);

/// What this daemon's migrations keep while they run (not on disk: a restart finds each
/// migration from its record instead).
#[derive(Default)]
pub(super) struct Migrations {
    /// Cancel requests of the migrations this host sends, by VM.
    cancels: Mutex<BTreeMap<String, bool>>,
    /// qemu-nbd servers of the offline migrations this host receives, by VM.
    nbd_servers: Mutex<BTreeMap<String, Vec<u32>>>,
}

fn peer_error(to: &str, e: ClientError) -> HostError {
    match e {
        ClientError::Api(error) => HostError::Remote {
            host: to.to_string(),
            error,
        },
        e if e.is_unreachable() => HostError::Peer(format!("cannot reach {to}: {e}")),
        e => HostError::Peer(format!("{to}: {e}")),
    }
}

/// Point every disk of every config in `v` (objects under a `disks` array with an `id`) at the
/// new path for its id: a VM's disk moves as a whole, whichever layer a config named.
fn repath_disks(v: &mut Value, paths: &HashMap<String, PathBuf>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if k == "disks" {
                    if let Value::Array(items) = child {
                        for d in items.iter_mut() {
                            let id = d.get("id").and_then(Value::as_str).map(str::to_string);
                            if let (Some(id), Some(obj)) = (id, d.as_object_mut()) {
                                if let Some(p) = paths.get(&id) {
                                    obj.insert("path".into(), json!(p));
                                    obj.insert("owned".into(), json!(true));
                                }
                            }
                        }
                    }
                }
                repath_disks(child, paths);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|c| repath_disks(c, paths)),
        _ => {}
    }
}

/// A free TCP port on `ip` (for QEMU to listen on; the tiny race with other programs is
/// harmless: QEMU fails to bind and the migration reports it).
fn free_port(ip: std::net::IpAddr) -> Result<u16> {
    let l = std::net::TcpListener::bind((ip, 0))
        .map_err(|e| HostError::Internal(format!("finding a free port on {ip}: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| HostError::Internal(e.to_string()))
}

/// Close this host's connections to the destination's NBD and migration ports. On a cut
/// network nothing tells QEMU they are dead, and cancelling a disk mirror would wait (with the
/// guest frozen) for its in-flight writes until TCP gives up, many minutes later. Closing them
/// fails those writes at once.
async fn cut_connections(ready: &IncomingReady) {
    let mut ports: Vec<u16> = ready.nbd_ports.iter().map(|(_, p)| *p).collect();
    if let Some(p) = ready
        .migrate_uri
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
    {
        ports.push(p);
    }
    ports.sort_unstable();
    ports.dedup();
    for port in ports {
        let run = tokio::process::Command::new("ss")
            .args([
                "-K",
                "-t",
                "dst",
                &ready.nbd_host,
                "dport",
                "=",
                &format!(":{port}"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .status();
        if let Ok(Err(e)) | Err(e) = tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .map_err(std::io::Error::other)
        {
            tracing::warn!("could not close connections to port {port}: {e}");
        }
    }
}

/// The destination's NBD port for disk `id`.
fn disk_port(ready: &IncomingReady, id: &str) -> Result<u16> {
    ready
        .nbd_ports
        .iter()
        .find(|(d, _)| d == id)
        .map(|(_, p)| *p)
        .ok_or_else(|| HostError::Internal(format!("the destination exported no disk {id}")))
}

/// Where a destination lists the files it waits for (in the VM's directory).
const INCOMING_FILES: &str = "incoming-files.json";

/// Serve `path` (format `fmt`) over NBD on `ip` for a migration's copy; returns (pid, port).
async fn spawn_nbd(ip: std::net::IpAddr, path: &std::path::Path, fmt: &str) -> Result<(u32, u16)> {
    let port = free_port(ip)?;
    let pid = nbd::serve(drover_qemu::install::current(), ip, port, path, fmt)
        .await
        .map_err(|e| HostError::Internal(e.to_string()))?;
    Ok((pid, port))
}

/// Send the files that travel with the VM, byte for byte.
async fn send_files(
    ready: &IncomingReady,
    files: &[MovedFile],
    progress: &(impl Fn(MigrateProgress) + Send + Sync),
) -> Result<()> {
    let total: u64 = files.iter().map(|f| f.size).sum();
    let mut done = 0;
    for f in files {
        let port = ready
            .file_ports
            .iter()
            .find(|(rel, _)| *rel == f.rel)
            .map(|(_, p)| *p)
            .ok_or_else(|| {
                HostError::Internal(format!("the destination has no place for {}", f.rel))
            })?;
        progress(MigrateProgress {
            stage: "states".into(),
            disk_done: done,
            disk_total: total,
            ..Default::default()
        });
        nbd::copy_into(
            drover_qemu::install::current(),
            std::path::Path::new(&f.src),
            "raw",
            &ready.nbd_host,
            port,
            nbd::EXPORT,
        )
        .await
        .map_err(|e| HostError::Internal(format!("copying {}: {e}", f.src)))?;
        done += f.size;
    }
    Ok(())
}

/// Replace every string in `v` that is a key of `map` by its value (moved file paths).
fn remap_paths(v: &mut Value, map: &HashMap<String, String>) {
    match v {
        Value::String(s) => {
            if let Some(new) = map.get(s.as_str()) {
                *s = new.clone();
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|c| remap_paths(c, map)),
        Value::Object(o) => o.values_mut().for_each(|c| remap_paths(c, map)),
        _ => {}
    }
}

/// What the destination said about a migration when asked.
enum PeerSays {
    Committed,
    NotCommitted,
    Unknown(String),
}

impl Manager {
    fn cancelled(&self, vm: &str) -> bool {
        lock(&self.s.migrations.cancels)
            .get(vm)
            .copied()
            .unwrap_or(false)
    }

    /// Ask a running migration of `vm` to stop; the VM keeps running here.
    pub fn migrate_cancel(&self, vm: &str, caller: &Caller) -> Result<()> {
        caller.require(Permission::Lifecycle)?;
        let slot = self.slot(vm)?;
        let outgoing = matches!(
            lock(&slot.info).migration,
            Some(MigrationMark {
                role: MigrationRole::Outgoing,
                phase: MigrationPhase::Copying,
                ..
            })
        );
        let mut c = lock(&self.s.migrations.cancels);
        match c.get_mut(vm) {
            Some(flag) if outgoing => {
                *flag = true;
                Ok(())
            }
            _ => Err(HostError::Conflict(format!(
                "VM {vm} is not being migrated from this host (or its hand-over has begun)"
            ))),
        }
    }

    /// Move VM `name` to the host `req.to`. `progress` hears how far it is.
    pub async fn migrate(
        &self,
        name: &str,
        req: MigrateRequest,
        caller: &Caller,
        progress: impl Fn(MigrateProgress) + Send + Sync,
    ) -> Result<MigrateResult> {
        let t0 = Instant::now();
        let op = self.door(name, VmAction::Migrate, caller).await?;
        let slot = op.slot();
        let info = lock(&slot.info).clone();
        // A clone's disks are overlays on its template's layers, which stay on this host; and
        // a template's layers must stay for its clones.
        if let Some(c) = &info.clone_of {
            return Err(HostError::Conflict(format!(
                "VM {name} is a clone of state {} of {}: its disks read that state's layers on this host, so it cannot move yet",
                c.state, c.vm
            )));
        }
        self.refuse_if_cloned(name, None, &format!("migrate VM {name}"))?;
        match (info.state, req.offline) {
            (VmState::Running, false)
            | (VmState::Stopped, true)
            // Its saved state travels with it, as every state does; it stays hibernated there.
            | (VmState::Hibernated, true) => {}
            (VmState::Hibernated, false) => {
                return Err(HostError::Conflict(format!(
                    "VM {name} is hibernated, so nothing runs to migrate live; move it with \
                     `drover vm migrate {name} --to {0} --offline`, or resume it there with \
                     `drover vm resume {name} --on {0}`",
                    req.to_name
                )))
            }
            (VmState::Stopped, false) => {
                return Err(HostError::Conflict(format!(
                    "VM {name} is not running, so there is nothing to migrate live; move it \
                     stopped with `drover vm migrate {name} --to {} --offline`",
                    req.to_name
                )))
            }
            (VmState::Running, true) => {
                return Err(HostError::Conflict(format!(
                    "VM {name} is running; --offline moves stopped VMs (stop it first, or \
                     migrate it live without --offline)"
                )))
            }
            (s, _) => {
                return Err(HostError::Conflict(format!(
                    "VM {name} is {s}; wait for that to finish"
                )))
            }
        }
        // A state's layers of a thin copy build on an image only this host has: the copies
        // arriving there would miss their base. (The disk itself moves with its content.)
        let cfg = info.next_config.as_ref().unwrap_or(&info.config);
        if let Some(d) = cfg.disks.iter().find(|d| d.base.is_some()) {
            let states = self.states(name)?;
            if !states.is_empty() {
                return Err(HostError::Conflict(format!(
                    "VM {name}'s disk {} is a thin copy of image {}, and its {} saved state(s)                      build on that image, which {} does not have: delete the states (`drover                      snapshot list {name}`) and migrate again",
                    d.id,
                    d.base.as_deref().unwrap_or_default(),
                    states.len(),
                    req.to_name
                )));
            }
        }
        // Hot-plugged memory (whole-MiB DIMMs) takes the path of QEMU 7.2's TCG dirty-tracking
        // bug that RAM_PAD avoids for boot RAM (see drover_qemu::cmdline::RAM_PAD): refuse
        // rather than corrupt the guest, on a QEMU that has the bug (the sending side's
        // tracking loses the writes; without a probe, assume it does).
        let buggy = self
            .s
            .probe
            .as_ref()
            .is_none_or(|p| p.tcg_dirty_tracking_bug());
        // What the running VM has hot-plugged: its QEMU is asked (a droverd restarted since the
        // VM grew knows only the config), and the destination's QEMU is started with it.
        let plugged = match self.runtime(slot) {
            Some(rt) if !req.offline => hotplug::plugged(&rt.qmp).await.map_err(|e| {
                HostError::Conflict(format!("VM {name} cannot be migrated live now: {e}"))
            })?,
            _ => drover_model::Plugged::default(),
        };
        if !req.offline && buggy {
            let grown = !plugged.dimms.is_empty();
            if grown && info.accel != Some(drover_model::Accel::Kvm) {
                return Err(HostError::Conflict(format!(
                    "VM {name} has memory added while running; under TCG, QEMU 7.2 can lose \
                     writes to it during a live migration: restart the VM (it keeps the memory) \
                     and migrate it then, or stop it and use --offline"
                )));
            }
        }
        if let Some(ms) = req.downtime_ms {
            if !(1..=60_000).contains(&ms) {
                return Err(HostError::Invalid(format!(
                    "--downtime-ms {ms} is out of range (1-60000)"
                )));
            }
        }
        let peer = req
            .to
            .client()
            .map_err(|e| HostError::Invalid(format!("remote {}: {e}", req.to_name)))?;
        let host: HostInfo = peer
            .host_info()
            .await
            .map_err(|e| peer_error(&req.to_name, e))?;
        let to_id = host
            .identity
            .as_ref()
            .map(|i| i.id.clone())
            .unwrap_or_else(|| req.to_name.clone());
        let me = self.s.cfg.identity.id.clone();
        if to_id == me {
            return Err(HostError::Conflict(format!(
                "{} has the same host id as this host ({me}): it is this host, or two hosts \
                 share an id; give each droverd its own --host-id",
                req.to_name
            )));
        }
        // The destination's QEMU must load what this one sends: refused here, before anything
        // is recorded or sent, with the reason.
        let tcg = info
            .accel
            .or(info.config.accel)
            .unwrap_or(self.s.accel.accel)
            == drover_model::Accel::Tcg;
        crate::compat::check_migration(
            name,
            &info.platform,
            self.qemu_facts().as_ref(),
            host.qemu.as_ref(),
            &req.to_name,
            !req.offline,
            tcg,
        )
        .map_err(HostError::Conflict)?;
        // Wait for a state capture still streaming from this QEMU, and for states to be on disk.
        let _capture = slot.capture.lock().await;
        let _persist = slot.persist.lock().await;
        let files = self.moved_files(name).await?;
        let id = format!("m{}-{}", hostfacts::now_ms(), std::process::id());
        let mut rows = Vec::new();
        for (table, key, value) in self.vm_rows(name)? {
            if table == super::VMS {
                continue;
            }
            let value = serde_json::from_slice(&value)
                .map_err(|e| HostError::Internal(format!("record {table}/{key}: {e}")))?;
            rows.push(PackedRow { table, key, value });
        }
        // Recorded before the destination hears of it: a restart here finds and undoes it.
        let mark = MigrationMark {
            id: id.clone(),
            role: MigrationRole::Outgoing,
            peer: to_id.clone(),
            phase: MigrationPhase::Copying,
        };
        self.s.store.put(MIGRATIONS, name, &req.to)?;
        self.persist(slot, |i| i.migration = Some(mark.clone()))?;
        lock(&self.s.migrations.cancels).insert(name.to_string(), false);
        let result = self
            .migrate_run(
                name, slot, &req, &peer, &id, &to_id, info, rows, files, plugged, &progress,
            )
            .await;
        lock(&self.s.migrations.cancels).remove(name);
        let (downtime_ms, ram_bytes, disk_bytes) = result?;
        tracing::info!(
            vm = name,
            to = to_id,
            total_ms = t0.elapsed().as_millis() as u64,
            downtime_ms,
            "migrated"
        );
        self.event(
            name,
            drover_api::EventKind::Migrated,
            serde_json::json!({ "direction": "out", "peer": to_id, "id": id, "offline": req.offline, "downtime_ms": downtime_ms }),
        );
        Ok(MigrateResult {
            vm: name.to_string(),
            from: me,
            to: to_id,
            id,
            total_ms: t0.elapsed().as_millis() as u64,
            downtime_ms,
            ram_bytes,
            disk_bytes,
            offline: req.offline,
        })
    }

    /// The migration proper; on failure before the hand-over everything is undone here and on
    /// the destination, and the VM runs on here.
    #[allow(clippy::too_many_arguments)]
    async fn migrate_run(
        &self,
        name: &str,
        slot: &Arc<VmSlot>,
        req: &MigrateRequest,
        peer: &Client,
        id: &str,
        to_id: &str,
        info: VmInfo,
        rows: Vec<PackedRow>,
        files: Vec<MovedFile>,
        plugged: drover_model::Plugged,
        progress: &(impl Fn(MigrateProgress) + Send + Sync),
    ) -> Result<(u64, u64, u64)> {
        let incoming = IncomingRequest {
            id: id.to_string(),
            from: self.s.cfg.identity.id.clone(),
            vm: info.clone(),
            rows,
            shared_storage: req.shared_storage,
            offline: req.offline,
            files: files.clone(),
            plugged,
        };
        let ready: std::result::Result<IncomingReady, HostError> = peer
            .migration_prepare(&incoming)
            .await
            .map_err(|e| peer_error(&req.to_name, e));
        let ready = match ready {
            Ok(r) => r,
            Err(e) => {
                // The destination may have made its copy before the answer was lost (it died, the
                // network broke): tell it to drop it, now or once it is reachable again.
                self.undo_outgoing(name, slot, peer, id).await;
                return Err(match e {
                    HostError::Peer(m) => HostError::Peer(format!(
                        "{m} (while it prepared to receive VM {name}); the VM keeps running here"
                    )),
                    e => e,
                });
            }
        };
        let copied = match send_files(&ready, &files, progress).await {
            Err(e) => Err(e),
            Ok(()) if req.offline => self.copy_offline(name, &info, &ready, req, progress).await,
            Ok(()) => self.copy_live(name, slot, &ready, req, progress).await,
        };
        let (downtime_ms, ram, disk) = match copied {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(vm = name, "migration failed: {e}");
                cut_connections(&ready).await;
                self.undo_outgoing(name, slot, peer, id).await;
                return Err(e);
            }
        };
        progress(MigrateProgress {
            stage: "handing-over".into(),
            ..Default::default()
        });
        self.hand_over(name, slot, peer, id, to_id, downtime_ms, req.shared_storage)
            .await?;
        Ok((downtime_ms, ram, disk))
    }

    /// Live copy: disks by mirror, memory by QEMU migration, up to the paused switch-over.
    /// Returns (downtime ms, memory bytes, disk bytes).
    async fn copy_live(
        &self,
        name: &str,
        slot: &Arc<VmSlot>,
        ready: &IncomingReady,
        req: &MigrateRequest,
        progress: &(impl Fn(MigrateProgress) + Send + Sync),
    ) -> Result<(u64, u64, u64)> {
        let rt = self
            .runtime(slot)
            .ok_or_else(|| HostError::Conflict(format!("VM {name} is not running")))?;
        let running = lock(&slot.info)
            .running_config
            .clone()
            .ok_or_else(|| HostError::Internal("no running config".into()))?;
        let mirrors = if req.shared_storage {
            Vec::new()
        } else {
            running
                .disks
                .iter()
                .map(|d| {
                    Ok(copy::Mirror {
                        job: live_migration::mirror_node(d.id.as_str()),
                        node: rt.active_node(d),
                        target: live_migration::NbdTarget {
                            host: &ready.nbd_host,
                            port: disk_port(ready, d.id.as_str())?,
                            export: d.id.as_str(),
                        },
                    })
                })
                .collect::<Result<Vec<_>>>()?
        };
        let plan = copy::LiveCopy {
            mirrors,
            uri: &ready.migrate_uri,
            bandwidth: req.bandwidth.unwrap_or(DEFAULT_BANDWIDTH),
            downtime_ms: req.downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS),
            ram_total: running.memory,
            stall: stall(),
        };
        let vmm = rt.vmm();
        let c = copy::copy_live(&vmm, &plan, || self.cancelled(name), progress).await?;
        Ok((c.downtime_ms, c.ram_bytes, c.disk_bytes))
    }

    /// Offline copy: each disk's content into the destination's qemu-nbd.
    async fn copy_offline(
        &self,
        name: &str,
        info: &VmInfo,
        ready: &IncomingReady,
        req: &MigrateRequest,
        progress: &(impl Fn(MigrateProgress) + Send + Sync),
    ) -> Result<(u64, u64, u64)> {
        let cfg = info
            .next_config
            .clone()
            .unwrap_or_else(|| info.config.clone());
        let total: u64 = cfg.disks.iter().map(|d| d.size).sum();
        let mut done = 0;
        if req.shared_storage {
            return Ok((0, 0, 0));
        }
        for d in &cfg.disks {
            if self.cancelled(name) {
                return Err(HostError::Conflict("cancelled; the VM stays here".into()));
            }
            let port = disk_port(ready, d.id.as_str())?;
            progress(MigrateProgress {
                stage: "disks".into(),
                disk_done: done,
                disk_total: total,
                ..Default::default()
            });
            // The layer with the disk's current content (the config names its origin).
            let layer = self.current_layer(name, d)?;
            nbd::copy_into(
                drover_qemu::install::current(),
                &layer,
                &d.format.to_string(),
                &ready.nbd_host,
                port,
                nbd::EXPORT,
            )
            .await
            .map_err(|e| HostError::Internal(format!("copying disk {}: {e}", d.id)))?;
            done += d.size;
        }
        Ok((0, 0, done))
    }

    /// After a failure before the hand-over: stop QEMU's copies, run the guest on here, tell
    /// the destination to throw its copy away, and forget the migration.
    async fn undo_outgoing(&self, name: &str, slot: &Arc<VmSlot>, peer: &Client, id: &str) {
        if let Some(rt) = self.runtime(slot) {
            let nodes: Vec<String> = lock(&slot.info)
                .running_config
                .iter()
                .flat_map(|c| c.disks.iter())
                .map(|d| live_migration::mirror_node(d.id.as_str()))
                .collect();
            live_migration::abandon_outgoing(&rt.qmp, &nodes).await;
        }
        let step = MigrationStep {
            id: id.to_string(),
            downtime_ms: 0,
        };
        if let Err(e) = peer.migration_abort(name, &step).await {
            // A cut network: keep telling it (its copy must not linger once it is reachable).
            tracing::warn!(
                vm = name,
                "could not tell the destination to abort: {e}; retrying"
            );
            let (peer, name) = (peer.clone(), name.to_string());
            tokio::spawn(async move {
                for _ in 0..600 {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    match peer.migration_abort(&name, &step).await {
                        Ok(_) => return,
                        Err(ClientError::Api(e)) => {
                            tracing::info!("destination answered the abort: {e}");
                            return;
                        }
                        Err(_) => {}
                    }
                }
            });
        }
        if let Err(e) = self.clear_mark(slot, name) {
            tracing::error!(vm = name, "could not clear the migration record: {e}");
        }
    }

    fn clear_mark(&self, slot: &Arc<VmSlot>, name: &str) -> Result<()> {
        self.commit(slot, |i| {
            i.migration = None;
            Ok(vec![Write::Delete {
                table: MIGRATIONS.into(),
                key: name.into(),
            }])
        })?;
        Ok(())
    }

    /// The switch-over is done (the guest is paused here for good): make the destination the
    /// owner. Until it confirms, the VM runs nowhere; an unclear answer is settled by asking.
    #[allow(clippy::too_many_arguments)]
    async fn hand_over(
        &self,
        name: &str,
        slot: &Arc<VmSlot>,
        peer: &Client,
        id: &str,
        to_id: &str,
        downtime_ms: u64,
        shared_storage: bool,
    ) -> Result<()> {
        self.persist(slot, |i| {
            if let Some(m) = i.migration.as_mut() {
                m.phase = MigrationPhase::HandingOver;
            }
        })?;
        let step = MigrationStep {
            id: id.to_string(),
            downtime_ms,
        };
        let answer = peer.migration_commit(name, &step).await;
        let says = match answer {
            Ok(_) => PeerSays::Committed,
            Err(e) => {
                tracing::warn!(vm = name, "commit on {to_id} unclear: {e}; asking");
                self.ask_peer(peer, name, id, RESOLVE_WINDOW).await
            }
        };
        self.settle(name, slot, peer, id, says, shared_storage)
            .await
    }

    /// Act on what the destination said about a handed-over VM.
    async fn settle(
        &self,
        name: &str,
        slot: &Arc<VmSlot>,
        peer: &Client,
        id: &str,
        says: PeerSays,
        shared_storage: bool,
    ) -> Result<()> {
        match says {
            PeerSays::Committed => {
                self.release_source(name, slot, shared_storage).await;
                Ok(())
            }
            PeerSays::NotCommitted => {
                // Take it back: the destination drops its copy, the guest runs on here.
                self.undo_outgoing(name, slot, peer, id).await;
                Err(HostError::Internal(format!(
                    "the destination did not take VM {name} over; it runs on here"
                )))
            }
            PeerSays::Unknown(why) => {
                // Never guess: running it here while the destination might run it too would
                // split the VM in two. Keep it paused and keep asking in the background.
                tokio::spawn(self.clone().resolve_loop(
                    name.to_string(),
                    slot.clone(),
                    peer.clone(),
                    id.to_string(),
                    shared_storage,
                ));
                Err(HostError::Peer(format!(
                    "the destination did not confirm taking VM {name} over ({why}); the VM is \
                     paused here and droverd keeps asking the destination: it will run on \
                     whichever host owns it"
                )))
            }
        }
    }

    /// Keep asking the destination until it says who owns the VM, then act on it. (Boxed: it
    /// and `settle` call each other.)
    fn resolve_loop(
        self,
        name: String,
        slot: Arc<VmSlot>,
        peer: Client,
        id: String,
        shared_storage: bool,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move {
            // Nothing else may touch the VM (stop it, start it) until it is settled.
            let _op = OpGuard::lock(&slot).await;
            loop {
                match self.ask_peer(&peer, &name, &id, RESOLVE_WINDOW).await {
                    PeerSays::Unknown(_) => continue,
                    says => {
                        if let Err(e) = self
                            .settle(&name, &slot, &peer, &id, says, shared_storage)
                            .await
                        {
                            tracing::info!(vm = name, "migration settled: {e}");
                        }
                        return;
                    }
                }
            }
        })
    }

    /// Ask the destination whether it owns the VM now, for up to `window`.
    async fn ask_peer(&self, peer: &Client, name: &str, id: &str, window: Duration) -> PeerSays {
        let deadline = Instant::now() + window;
        let mut why = String::new();
        while Instant::now() < deadline {
            match peer.vm(name).await {
                Ok(v) => match v.migration {
                    Some(m) if m.id == id && m.phase == MigrationPhase::Committed => {
                        return PeerSays::Committed
                    }
                    // Not this migration's VM, or not committed: ours to keep.
                    _ => return PeerSays::NotCommitted,
                },
                Err(ClientError::Api(ApiError {
                    code: drover_api::ErrorCode::NotFound,
                    ..
                })) => return PeerSays::NotCommitted,
                Err(e) => why = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        PeerSays::Unknown(why)
    }

    /// The destination owns the VM: stop the paused source QEMU and forget the VM here.
    async fn release_source(&self, name: &str, slot: &Arc<VmSlot>, shared_storage: bool) {
        if let Some(rt) = self.runtime(slot) {
            *lock(&rt.stop_reason) = Some("migrated to another host".into());
            let _ = rt.qmp.execute("quit", None).await;
            let mut exited = rt.exited.clone();
            if tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| *e))
                .await
                .is_err()
            {
                drover_qemu::process::signal(rt.pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        let info = lock(&slot.info).clone();
        let mut writes: Vec<Write> = match self.vm_rows(name) {
            Ok(rows) => rows
                .into_iter()
                .map(|(table, key, _)| Write::Delete { table, key })
                .collect(),
            Err(e) => {
                tracing::error!(vm = name, "listing the VM's records failed: {e}");
                Vec::new()
            }
        };
        writes.push(Write::Delete {
            table: MIGRATIONS.into(),
            key: name.into(),
        });
        if let Err(e) = self.s.store.apply(writes) {
            tracing::error!(vm = name, "forgetting the migrated VM failed: {e}");
            return;
        }
        lock(&self.s.vms).remove(name);
        if !shared_storage {
            for d in info.config.disks.iter().filter(|d| d.owned) {
                let _ = std::fs::remove_file(&d.path);
            }
            let _ = std::fs::remove_dir_all(self.vm_dir(name));
        }
        let _ = std::fs::remove_dir_all(self.run_paths(name).dir);
        let _ = std::fs::remove_file(self.run_paths(name).ram);
        tracing::info!(
            vm = name,
            "VM now belongs to the destination; forgotten here"
        );
    }

    // ------------------------------------------------------------ destination side

    /// Get ready to receive a VM (called by the source droverd).
    pub async fn incoming_prepare(
        &self,
        req: IncomingRequest,
        caller: &Caller,
    ) -> Result<IncomingReady> {
        caller.require(Permission::Admin)?;
        let name = req.vm.name.clone();
        drover_model::VmName::new(&name)?;
        if req.from == self.s.cfg.identity.id {
            return Err(HostError::Conflict(format!(
                "the source's host id ({}) is this host's: two hosts share an id; give each \
                 droverd its own --host-id",
                req.from
            )));
        }
        // A pinned VM needs its machine type and CPU model here (the source checked too; this
        // covers a source that could not know).
        if let Some(facts) = self.qemu_facts() {
            let tcg = req.vm.config.accel.unwrap_or(self.s.accel.accel) == drover_model::Accel::Tcg;
            crate::compat::check_migration(
                &name,
                &req.vm.platform,
                Some(&facts),
                Some(&facts),
                "this host",
                false,
                tcg,
            )
            .map_err(HostError::Conflict)?;
        }
        let _create = self.s.create_lock.lock().await;
        if lock(&self.s.vms).contains_key(&name) {
            return Err(HostError::AlreadyExists(name));
        }
        let live = req
            .vm
            .running_config
            .clone()
            .filter(|_| !req.offline)
            .unwrap_or_else(|| req.vm.config.clone());
        self.check_room(&name, &live)?;
        req.plugged
            .check(&live)
            .map_err(|e| HostError::Invalid(format!("VM {name} cannot arrive as sent: {e}")))?;
        let vm_dir = self.vm_dir(&name);
        let made = self.receive_disks(&name, &req, &live).await;
        let paths = match made.and_then(|p| self.receive_files(&name, &req.files).map(|_| p)) {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&vm_dir);
                return Err(e);
            }
        };
        // Saved states name their files and layers by path: point them at the copies here.
        let moved: HashMap<String, String> = req
            .files
            .iter()
            .map(|f| (f.src.clone(), vm_dir.join(&f.rel).display().to_string()))
            .collect();
        // The records, with every disk pointing at its copy here.
        let mut vm =
            serde_json::to_value(&req.vm).map_err(|e| HostError::Internal(e.to_string()))?;
        repath_disks(&mut vm, &paths);
        let mut info: VmInfo =
            serde_json::from_value(vm).map_err(|e| HostError::Internal(e.to_string()))?;
        // Disks arrive with all their content: a thin copy's image stays behind.
        for c in std::iter::once(&mut info.config)
            .chain(info.running_config.iter_mut())
            .chain(info.next_config.iter_mut())
        {
            for d in &mut c.disks {
                d.base = None;
            }
        }
        // A hibernated VM stays hibernated, its state at this host's path (states travel in
        // the VM's directory); anything else arrives stopped (live: until it is committed).
        info.state = match (info.state, &mut info.hibernation) {
            (VmState::Hibernated, Some(h)) if req.offline => {
                h.dir = self.states_dir(&name).join(&h.state);
                VmState::Hibernated
            }
            _ => {
                info.hibernation = None;
                VmState::Stopped
            }
        };
        info.pid = None;
        info.accel = None;
        info.agent = None;
        info.started_at_ms = None;
        info.migration = Some(MigrationMark {
            id: req.id.clone(),
            role: MigrationRole::Incoming,
            peer: req.from.clone(),
            phase: MigrationPhase::Copying,
        });
        let mut writes = vec![drover_store::put(
            super::VMS,
            &name,
            &super::records::VmRecord::from(&info),
        )?];
        for mut row in req.rows.clone() {
            // Only a VM's own rows, in the tables that hold them (the same as a delete removes).
            let t = row.table.as_str();
            let own = t != super::VMS && super::registry::owns(t, &row.key, &name);
            if !own {
                return Err(HostError::Invalid(format!(
                    "record {}/{} does not belong to VM {name}",
                    row.table, row.key
                )));
            }
            if row.table == super::state::STATES {
                let format = row.value.get("format").and_then(Value::as_u64).unwrap_or(0);
                if format < u64::from(drover_api::STATE_FORMAT) {
                    return Err(HostError::Invalid(format!(
                        "saved state {} has format {format}: the source droverd is older than \
                         this one; upgrade it (it migrates its records at start) and migrate again",
                        row.key
                    )));
                }
                if format > u64::from(drover_api::STATE_FORMAT) {
                    return Err(HostError::Invalid(format!(
                        "saved state {} has format {format}: the source droverd is newer than \
                         this one (it reads up to {}); upgrade this one and migrate again",
                        row.key,
                        drover_api::STATE_FORMAT
                    )));
                }
                // Its layers and files are the copies here; its config names disks by origin,
                // which moves by id like every other config's.
                let config = row.value.get("config").cloned();
                remap_paths(&mut row.value, &moved);
                if let Some(mut c) = config {
                    repath_disks(&mut c, &paths);
                    row.value["config"] = c;
                }
                // Stored as this droverd's record: a peer's row is read strictly.
                let record: super::records::StateRecord = serde_json::from_value(row.value)
                    .map_err(|e| {
                        HostError::Invalid(format!(
                            "saved state {} from the source does not read as a state record \
                             ({e}); check that both droverds run the same version",
                            row.key
                        ))
                    })?;
                row.value = serde_json::to_value(&record)
                    .map_err(|e| HostError::Internal(e.to_string()))?;
            } else if row.table == super::layers::LAYERS {
                // Here the disk's current content is the copy just made (its own top), unless
                // the storage is shared; the states' layers are the moved files.
                let mut chain: drover_model::DiskLayers = serde_json::from_value(row.value.clone())
                    .map_err(|e| HostError::Invalid(format!("layer record {}: {e}", row.key)))?;
                chain.check_format()?;
                if !req.shared_storage {
                    chain.tops.clear();
                }
                chain.map_pinned(|p| {
                    moved
                        .get(&p.display().to_string())
                        .map(PathBuf::from)
                        .unwrap_or_else(|| p.to_path_buf())
                });
                row.value =
                    serde_json::to_value(&chain).map_err(|e| HostError::Internal(e.to_string()))?;
            } else {
                repath_disks(&mut row.value, &paths);
            }
            writes.push(Write::Put {
                table: row.table,
                key: row.key,
                value: serde_json::to_vec(&row.value)
                    .map_err(|e| HostError::Internal(e.to_string()))?,
            });
        }
        self.s.store.apply(writes)?;
        let slot = VmSlot::new(info);
        lock(&self.s.vms).insert(name.clone(), slot.clone());
        drop(_create);
        // What QEMU runs here: the running config, its disks now the copies here.
        let mut live =
            serde_json::to_value(&live).map_err(|e| HostError::Internal(e.to_string()))?;
        repath_disks(&mut live, &paths);
        let live: VmConfig =
            serde_json::from_value(live).map_err(|e| HostError::Internal(e.to_string()))?;
        let ready = self.receive_start(&name, &slot, &req, &live, &paths).await;
        if ready.is_err() {
            self.discard_incoming(&name).await;
        }
        ready
    }

    /// New disks for an incoming VM (or the shared ones, checked). Disk id → path here.
    async fn receive_disks(
        &self,
        name: &str,
        req: &IncomingRequest,
        live: &VmConfig,
    ) -> Result<HashMap<String, PathBuf>> {
        let mut paths = HashMap::new();
        let dir = self.vm_dir(name).join("disks");
        std::fs::create_dir_all(&dir).map_err(|e| io_ctx("creating", &dir, e))?;
        for d in &live.disks {
            if req.shared_storage {
                if !d.path.exists() {
                    return Err(HostError::Invalid(format!(
                        "--shared-storage: disk {} ({}) is not visible on this host",
                        d.id,
                        d.path.display()
                    )));
                }
                continue;
            }
            let path = dir.join(format!("{}.qcow2", d.id));
            let (p, size) = (path.clone(), d.size);
            tokio::task::spawn_blocking(move || drover_qemu::img::create_qcow2(&p, size))
                .await
                .map_err(|e| HostError::Internal(e.to_string()))??;
            paths.insert(d.id.to_string(), path);
        }
        Ok(paths)
    }

    /// Start what receives the VM: a paused QEMU waiting for memory with its disks exported over
    /// NBD, or (offline) a qemu-nbd per disk.
    async fn receive_start(
        &self,
        name: &str,
        slot: &Arc<VmSlot>,
        req: &IncomingRequest,
        live: &VmConfig,
        paths: &HashMap<String, PathBuf>,
    ) -> Result<IncomingReady> {
        let ip = self
            .s
            .cfg
            .migration_addr
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        let host = ip.to_string();
        // Saved states and their disk layers: one raw export per file.
        let mut file_ports = Vec::new();
        let mut pids = Vec::new();
        for f in &req.files {
            let path = self.vm_dir(name).join(&f.rel);
            let (pid, port) = spawn_nbd(ip, &path, "raw").await?;
            pids.push(pid);
            file_ports.push((f.rel.clone(), port));
        }
        self.track_nbd(name, std::mem::take(&mut pids));
        if req.offline {
            let mut ports = Vec::new();
            for (id, path) in paths {
                let (pid, port) = spawn_nbd(ip, path, "qcow2").await?;
                pids.push(pid);
                ports.push((id.clone(), port));
            }
            self.track_nbd(name, pids);
            return Ok(IncomingReady {
                migrate_uri: String::new(),
                nbd_host: host,
                nbd_ports: ports,
                file_ports,
            });
        }
        self.launch(
            name,
            slot,
            live.clone(),
            format!("live migration from {}", req.from),
            LaunchKind::Incoming(&req.plugged),
        )
        .await?;
        let rt = self
            .runtime(slot)
            .ok_or_else(|| HostError::Internal("the receiving QEMU exited".into()))?;
        let mut ports = Vec::new();
        if !req.shared_storage {
            let port = free_port(ip)?;
            let exports: Vec<live_migration::Export> = live
                .disks
                .iter()
                .map(|d| live_migration::Export {
                    name: d.id.as_str(),
                    node: drover_qemu::cmdline::disk_node(d),
                })
                .collect();
            live_migration::export_disks(&rt.qmp, &host, port, &exports).await?;
            ports = live
                .disks
                .iter()
                .map(|d| (d.id.to_string(), port))
                .collect();
        }
        let port = free_port(ip)?;
        let uri = format!("tcp:{host}:{port}");
        live_migration::start_incoming(&rt.qmp, &uri).await?;
        tracing::info!(
            vm = name,
            from = req.from,
            uri,
            "waiting for an incoming migration"
        );
        Ok(IncomingReady {
            migrate_uri: uri,
            nbd_host: host,
            nbd_ports: ports,
            file_ports,
        })
    }

    /// The source has switched over: take the VM (called by the source droverd). Idempotent.
    pub async fn incoming_commit(
        &self,
        name: &str,
        step: MigrationStep,
        caller: &Caller,
    ) -> Result<VmInfo> {
        let op = self.door(name, VmAction::MigrateCommit, caller).await?;
        let slot = op.slot();
        let mark = self.incoming_mark(slot, name, &step.id)?;
        if mark.phase == MigrationPhase::Committed {
            return Ok(self.view(slot));
        }
        let offline = self.runtime(slot).is_none();
        self.stop_nbd(name);
        self.settle_files(name).await?;
        if let Some(rt) = self.runtime(slot) {
            // The source sees `completed` once it has sent the last of the memory; this QEMU
            // may still be loading it (seconds, on a loaded host): wait for it, bounded.
            live_migration::wait_arrived(&rt.qmp, Duration::from_secs(30))
                .await
                .map_err(|e| match e {
                    live_migration::LiveMigrationError::Incomplete(_) => {
                        HostError::Conflict(format!("VM {name}: {e}"))
                    }
                    e => e.into(),
                })?;
            live_migration::stop_exports(&rt.qmp).await;
        }
        // Owned from here on: durable before the guest runs.
        self.persist(slot, |i| {
            if let Some(m) = i.migration.as_mut() {
                m.phase = MigrationPhase::Committed;
            }
            if !offline {
                i.state = VmState::Running;
                i.started_at_ms = Some(hostfacts::now_ms());
            }
        })?;
        if let Some(rt) = self.runtime(slot) {
            rt.qmp.execute("cont", None).await?;
            rt.agent.probe_until_ready(Duration::from_secs(60));
            let (mgr, vm, from, to) = (
                self.clone(),
                name.to_string(),
                mark.peer.clone(),
                self.s.cfg.identity.id.clone(),
            );
            tokio::spawn(async move {
                if let Err(e) = mgr.notify_migrated(&vm, &from, &to, step.downtime_ms).await {
                    tracing::info!(vm, "could not tell the guest it moved: {e}");
                }
            });
        }
        tracing::info!(
            vm = name,
            from = mark.peer,
            "migration committed; the VM is ours"
        );
        self.event(
            name,
            drover_api::EventKind::Migrated,
            serde_json::json!({ "direction": "in", "peer": mark.peer, "id": step.id, "offline": offline }),
        );
        Ok(self.view(slot))
    }

    /// The source gave up: throw the copy away (called by the source droverd). Idempotent.
    pub async fn incoming_abort(
        &self,
        name: &str,
        step: MigrationStep,
        caller: &Caller,
    ) -> Result<()> {
        let slot = match self.look(name, VmAction::MigrateAbort, caller) {
            Ok(s) => s,
            // Nothing arrived, or it is gone already: nothing to throw away.
            Err(HostError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let mark = self.incoming_mark(&slot, name, &step.id)?;
        if mark.phase == MigrationPhase::Committed {
            return Err(HostError::Conflict(format!(
                "VM {name} was already taken over by this host"
            )));
        }
        self.discard_incoming(name).await;
        Ok(())
    }

    /// The files of a VM's saved states and the disk layers they pin (whole backing chains),
    /// once every state is on disk.
    async fn moved_files(&self, name: &str) -> Result<Vec<MovedFile>> {
        let deadline = Instant::now() + Duration::from_secs(600);
        let states = loop {
            let states = self.states(name)?;
            if !states.iter().any(|s| {
                matches!(
                    s.phase,
                    drover_api::StatePhase::Capturing | drover_api::StatePhase::Ready
                )
            }) {
                break states;
            }
            if Instant::now() > deadline {
                return Err(HostError::Timeout(format!(
                    "the saved states of VM {name} are still being written to disk"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let mut files: Vec<MovedFile> = Vec::new();
        let mut add = |src: PathBuf, rel: String, layer: bool| {
            let src_s = src.display().to_string();
            if files.iter().any(|f| f.src == src_s) {
                return;
            }
            if let Ok(m) = std::fs::metadata(&src) {
                files.push(MovedFile {
                    src: src_s,
                    rel,
                    size: m.len(),
                    layer,
                });
            }
        };
        for st in &states {
            let dir = self.states_dir(name).join(&st.id);
            for f in ["manifest.json", "devices.bin", "memory.bin"] {
                add(dir.join(f), format!("states/{}/{f}", st.id), false);
            }
            for pinned in st.layers.values() {
                let mut layer = Some(pinned.clone());
                let mut depth = 0;
                while let Some(path) = layer.take().filter(|_| depth < 64) {
                    depth += 1;
                    let base = path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "layer".into());
                    let p2 = path.clone();
                    layer =
                        tokio::task::spawn_blocking(move || drover_qemu::img::backing_file(&p2))
                            .await
                            .map_err(|e| HostError::Internal(e.to_string()))??;
                    let rel = format!("layers/{}-{base}", hostfacts::now_ms() % 1_000_000 + depth);
                    add(path, rel, true);
                }
            }
        }
        Ok(files)
    }

    /// Make room for the files that travel with an arriving VM.
    fn receive_files(&self, name: &str, files: &[MovedFile]) -> Result<()> {
        for f in files {
            let rel = std::path::Path::new(&f.rel);
            let safe = rel
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
                && (f.rel.starts_with("states/") || f.rel.starts_with("layers/"));
            if !safe {
                return Err(HostError::Invalid(format!(
                    "refusing file path {:?}",
                    f.rel
                )));
            }
            let path = self.vm_dir(name).join(rel);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| io_ctx("creating", dir, e))?;
            }
            // NBD moves whole 512-byte sectors: room for the last one, cut to size on arrival.
            let file = std::fs::File::create(&path).map_err(|e| io_ctx("creating", &path, e))?;
            file.set_len(f.size.div_ceil(512) * 512)
                .map_err(|e| io_ctx("sizing", &path, e))?;
        }
        let list = self.vm_dir(name).join(INCOMING_FILES);
        let json = serde_json::to_vec(files).map_err(|e| HostError::Internal(e.to_string()))?;
        std::fs::write(&list, json).map_err(|e| io_ctx("writing", &list, e))?;
        Ok(())
    }

    /// Arrived files: layers re-pointed at their moved backing files, manifests rewritten from
    /// the (re-pathed) records.
    async fn settle_files(&self, name: &str) -> Result<()> {
        let dir = self.vm_dir(name);
        let list = dir.join(INCOMING_FILES);
        if let Ok(json) = std::fs::read(&list) {
            let files: Vec<MovedFile> =
                serde_json::from_slice(&json).map_err(|e| HostError::Internal(e.to_string()))?;
            for f in files {
                let path = dir.join(&f.rel);
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|file| {
                        file.set_len(f.size)?;
                        file.sync_all()
                    })
                    .map_err(|e| io_ctx("finishing", &path, e))?;
            }
            let _ = std::fs::remove_file(&list);
        }
        let layers = dir.join("layers");
        if layers.is_dir() {
            let entries: Vec<PathBuf> = std::fs::read_dir(&layers)
                .map_err(|e| io_ctx("reading", &layers, e))?
                .flatten()
                .map(|e| e.path())
                .collect();
            // Old backing path (by file name, as each layer recorded it) -> its copy here.
            let by_name: HashMap<String, PathBuf> = entries
                .iter()
                .filter_map(|p| {
                    let n = p.file_name()?.to_string_lossy().into_owned();
                    let orig = n.split_once('-').map(|(_, b)| b.to_string())?;
                    Some((orig, p.clone()))
                })
                .collect();
            for layer in entries {
                let l2 = layer.clone();
                let backing =
                    tokio::task::spawn_blocking(move || drover_qemu::img::backing_file(&l2))
                        .await
                        .map_err(|e| HostError::Internal(e.to_string()))??;
                let Some(old) = backing else { continue };
                let key = old
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if let Some(new) = by_name.get(&key) {
                    let (l, n) = (layer.clone(), new.clone());
                    tokio::task::spawn_blocking(move || drover_qemu::img::set_backing(&l, &n))
                        .await
                        .map_err(|e| HostError::Internal(e.to_string()))??;
                }
            }
        }
        for st in self.states(name)? {
            self.write_state(&st)?;
        }
        Ok(())
    }

    fn incoming_mark(&self, slot: &Arc<VmSlot>, name: &str, id: &str) -> Result<MigrationMark> {
        match lock(&slot.info).migration.clone() {
            Some(m) if m.role == MigrationRole::Incoming && m.id == id => Ok(m),
            _ => Err(HostError::Conflict(format!(
                "VM {name} on this host is not arriving by migration {id}"
            ))),
        }
    }

    fn track_nbd(&self, name: &str, pids: Vec<u32>) {
        lock(&self.s.migrations.nbd_servers)
            .entry(name.to_string())
            .or_default()
            .extend(pids);
    }

    fn stop_nbd(&self, name: &str) {
        for pid in lock(&self.s.migrations.nbd_servers)
            .remove(name)
            .unwrap_or_default()
        {
            drover_qemu::process::signal(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }

    /// Drop a VM that was arriving and will not: its QEMU or NBD servers, records and disks.
    pub(super) async fn discard_incoming(&self, name: &str) {
        let Ok(slot) = self.slot(name) else { return };
        // Serialised with a commit: a VM committed a moment ago is never thrown away.
        let _op = OpGuard::lock(&slot).await;
        if !matches!(
            lock(&slot.info).migration,
            Some(MigrationMark {
                role: MigrationRole::Incoming,
                phase: MigrationPhase::Copying,
                ..
            })
        ) {
            return;
        }
        self.stop_nbd(name);
        if let Some(rt) = self.runtime(&slot) {
            *lock(&rt.stop_reason) = Some("incoming migration abandoned".into());
            let _ = rt.qmp.execute("quit", None).await;
            let mut exited = rt.exited.clone();
            if tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| *e))
                .await
                .is_err()
            {
                drover_qemu::process::signal(rt.pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        let writes: Vec<Write> = self
            .vm_rows(name)
            .unwrap_or_default()
            .into_iter()
            .map(|(table, key, _)| Write::Delete { table, key })
            .collect();
        if let Err(e) = self.s.store.apply(writes) {
            tracing::error!(vm = name, "dropping the abandoned incoming VM failed: {e}");
            return;
        }
        lock(&self.s.vms).remove(name);
        let _ = std::fs::remove_dir_all(self.vm_dir(name));
        let _ = std::fs::remove_dir_all(self.run_paths(name).dir);
        let _ = std::fs::remove_file(self.run_paths(name).ram);
        tracing::info!(vm = name, "incoming migration abandoned; its copy is gone");
    }

    /// After a droverd restart, for a VM with a migration on record (its QEMU re-adopted, or
    /// gone): finish or undo what the previous droverd left.
    pub(super) async fn recover_migration(&self, name: &str, slot: &Arc<VmSlot>) {
        let Some(mark) = lock(&slot.info).migration.clone() else {
            return;
        };
        match (mark.role, mark.phase) {
            (_, MigrationPhase::Committed) => {}
            (MigrationRole::Incoming, MigrationPhase::Copying) => {
                if self.runtime(slot).is_none() {
                    self.discard_incoming(name).await;
                }
                // Else the source still commits or aborts it.
            }
            (MigrationRole::Incoming, MigrationPhase::HandingOver) => {}
            (MigrationRole::Outgoing, phase) => {
                let spec: Option<RemoteSpec> = self.s.store.get(MIGRATIONS, name).ok().flatten();
                let Some(peer) = spec.and_then(|s| s.client().ok()) else {
                    tracing::error!(vm = name, "migration on record but no destination address");
                    return;
                };
                if phase == MigrationPhase::Copying {
                    tracing::warn!(
                        vm = name,
                        "a migration was cut off by a droverd restart; undoing it"
                    );
                    self.undo_outgoing(name, slot, &peer, &mark.id).await;
                } else {
                    let says = self.ask_peer(&peer, name, &mark.id, RESOLVE_WINDOW).await;
                    if let Err(e) = self.settle(name, slot, &peer, &mark.id, says, false).await {
                        tracing::warn!(vm = name, "after restart: {e}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_move_by_id_in_every_config() {
        let mut v = json!({
            "config": {"disks": [{"id": "root", "path": "/a/root.qcow2", "owned": false}]},
            "running_config": {"disks": [
                {"id": "root", "path": "/a/root.s3.qcow2"},
                {"id": "data", "path": "/a/data.qcow2"},
            ]},
            "generations": [{"config": {"disks": [{"id": "root", "path": "/old"}]}}],
            "other": {"path": "/untouched"},
        });
        let paths = HashMap::from([("root".to_string(), PathBuf::from("/b/root.qcow2"))]);
        repath_disks(&mut v, &paths);
        assert_eq!(v["config"]["disks"][0]["path"], "/b/root.qcow2");
        assert_eq!(v["config"]["disks"][0]["owned"], true);
        assert_eq!(v["running_config"]["disks"][0]["path"], "/b/root.qcow2");
        assert_eq!(v["running_config"]["disks"][1]["path"], "/a/data.qcow2");
        assert_eq!(
            v["generations"][0]["config"]["disks"][0]["path"],
            "/b/root.qcow2"
        );
        assert_eq!(v["other"]["path"], "/untouched");
    }
}
