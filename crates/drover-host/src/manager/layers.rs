//! Disk layer chains in the store: for each VM and disk id, which qcow2 layer holds the disk's
//! current content and which layers saved states pin ([`drover_model::DiskLayers`]).
//!
//! Configs name disks by origin and never change for a save; every launch (start of any
//! generation or composed config, restore, incoming migration) resolves each disk here, through
//! [`Manager::open_layers`], so the guest gets the disk's current content (or the restored
//! state's) in a layer no state pins.

use super::{Manager, VmSlot};
use crate::error::{HostError, Result};
use crate::hostfacts;
use drover_model::{DiskConfig, DiskLayers, OpenPlan, VmConfig};
use drover_qemu::img;
use drover_store::{StoreExt, Write};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Table of layer chains, keyed `<vm>/<disk id>`.
pub(super) const LAYERS: &str = "layers";

/// The layer chains' per-VM table.
pub(super) const TABLES: &[super::VmTable] = &[super::VmTable::by_prefix(LAYERS)];

/// What a launch restores: a state's id and its pinned layer per disk id.
pub(super) struct RestoreLayers<'a> {
    pub state: &'a str,
    pub layers: &'a BTreeMap<String, PathBuf>,
}

fn key(vm: &str, disk: &str) -> String {
    format!("{vm}/{disk}")
}

impl From<drover_model::LayerError> for HostError {
    fn from(e: drover_model::LayerError) -> Self {
        match e {
            drover_model::LayerError::Format(_) => HostError::Invalid(e.to_string()),
            _ => HostError::Conflict(e.to_string()),
        }
    }
}

impl Manager {
    /// After re-adopting a running QEMU: make each disk's chain name the layer QEMU really
    /// writes (`files`: disk id -> the file on top of its block graph, from `query-block`).
    /// A droverd killed inside a save, after QEMU moved a disk onto its new overlay but before
    /// the chain recorded it, would otherwise open the old layer read-write at the next start
    /// and lose everything the guest wrote since. The overlay's backing file is the old top, so
    /// making it the top keeps both the data and every state's pinned layer intact.
    pub(super) fn reconcile_layers(
        &self,
        vm: &str,
        slot: &std::sync::Arc<VmSlot>,
        config: &VmConfig,
        files: &std::collections::HashMap<String, PathBuf>,
    ) -> Result<()> {
        let mut writes = Vec::new();
        for d in &config.disks {
            let Some(actual) = files.get(d.id.as_str()) else {
                continue;
            };
            let mut chain = self.disk_layers(vm, d.id.as_str())?;
            if chain.top(&d.path) == actual.as_path() || !actual.is_file() {
                continue;
            }
            tracing::warn!(
                vm,
                disk = %d.id,
                recorded = %chain.top(&d.path).display(),
                actual = %actual.display(),
                "the disk's recorded layer is not the one QEMU writes (a save was cut off); recording QEMU's"
            );
            chain.set_top(&d.path, actual)?;
            writes.push(self.layers_write(vm, d.id.as_str(), &chain)?);
        }
        if !writes.is_empty() {
            self.commit_or_defer(slot, |_| Ok(writes))?;
        }
        Ok(())
    }

    /// Disk `disk`'s chain (a fresh one when nothing was saved yet).
    pub(super) fn disk_layers(&self, vm: &str, disk: &str) -> Result<DiskLayers> {
        let l = self
            .s
            .store
            .get::<DiskLayers>(LAYERS, &key(vm, disk))?
            .unwrap_or_else(DiskLayers::new);
        l.check_format()?;
        Ok(l)
    }

    /// Every chain of VM `vm`, by disk id.
    pub(super) fn all_layers(&self, vm: &str) -> Result<BTreeMap<String, DiskLayers>> {
        let mut out = BTreeMap::new();
        for (k, l) in self
            .s
            .store
            .list_prefix::<DiskLayers>(LAYERS, &format!("{vm}/"))?
        {
            l.check_format()?;
            let disk = k.split_once('/').map(|(_, d)| d).unwrap_or(&k).to_string();
            out.insert(disk, l);
        }
        Ok(out)
    }

    /// The store write of a chain.
    pub(super) fn layers_write(&self, vm: &str, disk: &str, l: &DiskLayers) -> Result<Write> {
        Ok(drover_store::put(LAYERS, &key(vm, disk), l)?)
    }

    /// The layer that holds disk `d`'s current content.
    pub(super) fn current_layer(&self, vm: &str, d: &DiskConfig) -> Result<PathBuf> {
        Ok(self
            .disk_layers(vm, d.id.as_str())?
            .top(&d.path)
            .to_path_buf())
    }

    /// Give every disk of `config` (which names origins) a layer QEMU may write to: its current
    /// top, a fresh overlay on it when a state pins it, or (restoring) a fresh overlay on the
    /// state's layer. The chains are durable before this returns; the result is `config` with
    /// each disk at its layer, for QEMU's command line only.
    pub(super) async fn open_layers(
        &self,
        vm: &str,
        slot: &VmSlot,
        config: &VmConfig,
        restore: Option<RestoreLayers<'_>>,
    ) -> Result<VmConfig> {
        let mut qemu = config.clone();
        let mut writes = Vec::new();
        let mut made = Vec::new();
        let stamp = hostfacts::now_ms();
        let result = async {
            for d in qemu.disks.iter_mut() {
                let mut chain = self.disk_layers(vm, d.id.as_str())?;
                let backing = match &restore {
                    Some(r) => {
                        let layer = r.layers.get(d.id.as_str()).ok_or_else(|| {
                            HostError::Invalid(format!(
                                "state {} has no layer of disk {}",
                                r.state, d.id
                            ))
                        })?;
                        Some(chain.plan_restore(r.state, layer)?)
                    }
                    // A read-only disk is never written: it reads the current top as it is.
                    None if d.readonly => {
                        d.path = chain.top(&d.path).to_path_buf();
                        continue;
                    }
                    None => match chain.plan_open(&d.path) {
                        OpenPlan::Use(top) => {
                            chain.check_writable(&top)?;
                            d.path = top;
                            continue;
                        }
                        OpenPlan::Overlay { backing } => Some(backing),
                    },
                };
                let Some(backing) = backing else { continue };
                if !backing.exists() {
                    return Err(HostError::Invalid(format!(
                        "disk {} of VM {vm}: its layer {} is missing",
                        d.id,
                        backing.display()
                    )));
                }
                let overlay = self
                    .vm_dir(vm)
                    .join("disks")
                    .join(format!("{}.o{stamp}.qcow2", d.id));
                let (o, b, size) = (overlay.clone(), backing.clone(), d.size);
                tokio::task::spawn_blocking(move || img::create_overlay(&o, &b, size))
                    .await
                    .map_err(|e| HostError::Internal(e.to_string()))??;
                made.push(overlay.clone());
                chain.set_top(&d.path, &overlay)?;
                writes.push(self.layers_write(vm, d.id.as_str(), &chain)?);
                d.path = overlay;
            }
            if !writes.is_empty() {
                // With the VM's record, so the chain changes only as a whole.
                self.commit(slot, |_| Ok(std::mem::take(&mut writes)))?;
            }
            Ok::<_, HostError>(())
        }
        .await;
        if let Err(e) = result {
            for o in made {
                let _ = std::fs::remove_file(o);
            }
            return Err(e);
        }
        Ok(qemu)
    }

    /// The store writes that drop state `state`'s pins from every chain of VM `vm`.
    pub(super) fn unpin_writes(&self, vm: &str, state: &str) -> Result<Vec<Write>> {
        let mut writes = Vec::new();
        for (disk, mut chain) in self.all_layers(vm)? {
            if !chain.unpin(state).is_empty() {
                writes.push(self.layers_write(vm, &disk, &chain)?);
            }
        }
        Ok(writes)
    }
}
