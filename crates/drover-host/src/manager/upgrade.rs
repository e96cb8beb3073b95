//! Record migrations, run once when droverd opens its store. The store's schema version is a row
//! of its own (`meta/schema`); a migration rewrites the old rows and records the new version in
//! one transaction, so it runs exactly once and a crash half-way leaves the old records intact.
//! A store written by a newer droverd is refused, never misread.
//!
//! Schema 2 (disk layer chains): before it, a save re-pointed the config's disk path at the new
//! overlay, and a state's config named the layers it pinned. Now configs name each disk's
//! origin and the layers are in [`super::layers::LAYERS`]. For each VM this migration:
//! - takes the layer its next default start would have opened (the running config's, else the
//!   latest generation's with persistence on, else the initial config's) as each disk's top;
//! - finds each disk's origin below a layer with `qemu-img info` (down the files Drover made);
//! - records each state's layers as pinned, in the state (format 2) and in the chains;
//! - rewrites every config (initial, generations, running, next-boot, states) to the origins.

use super::layers::LAYERS;
use super::records::{self, StateRecord, VmRecord};
use super::state::STATES;
use super::{HISTORY, VMS};
use crate::error::{io_ctx, HostError, Result};
use drover_api::{StateInfo, VmInfo, VmState, STATE_FORMAT};
use drover_model::{diff, origin_below, ConfigHistory, DiskLayers, StoredConfig, VmConfig};
use drover_store::{Store, StoreExt};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Table of store-wide facts.
const META: &str = "meta";
/// The schema this droverd writes.
pub(super) use super::records::SCHEMA;

/// Bring the store's records to [`SCHEMA`]; returns the VMs migrated.
pub(super) fn upgrade(store: &dyn Store, state_dir: &Path) -> Result<Vec<String>> {
    let schema = store.get::<u32>(META, "schema")?.unwrap_or(1);
    if schema > SCHEMA {
        return Err(HostError::Invalid(format!(
            "the store in {} has schema {schema}, written by a newer droverd; this one reads up \
             to {SCHEMA}: run the newer droverd",
            state_dir.display()
        )));
    }
    if schema == SCHEMA {
        return Ok(Vec::new());
    }
    let mut writes = Vec::new();
    let mut manifests = Vec::new();
    let mut migrated = Vec::new();
    let vms: Vec<(String, VmInfo)> = records::vms(store)?;
    for (name, info) in vms {
        let states: Vec<StateInfo> = records::states(store, &name)?;
        let history = store
            .get::<ConfigHistory>(HISTORY, &name)?
            .unwrap_or_else(|| ConfigHistory::new(info.config.clone()));
        let vm_dir = state_dir.join("vms").join(&name);
        let up = to_layer_chains(&vm_dir, info, history, states, |p| {
            drover_qemu::img::backing_file(p).ok().flatten()
        })?;
        writes.push(drover_store::put(VMS, &name, &VmRecord::from(&up.info))?);
        writes.push(drover_store::put(HISTORY, &name, &up.history)?);
        for s in &up.states {
            let record = StateRecord::from(s);
            writes.push(drover_store::put(
                STATES,
                &format!("{name}/{}", s.id),
                &record,
            )?);
            manifests.push(s.clone());
        }
        for (disk, chain) in &up.chains {
            writes.push(drover_store::put(LAYERS, &format!("{name}/{disk}"), chain)?);
        }
        migrated.push(name);
    }
    // The manifests beside the state files first: a crash before the store commits leaves the
    // store at schema 1, and the next start migrates again from the store's rows.
    for s in &manifests {
        let dir = state_dir.join("vms").join(&s.vm).join("states").join(&s.id);
        if dir.is_dir() {
            let json = StateRecord::from(s)
                .manifest_json()
                .map_err(|e| HostError::Internal(e.to_string()))?;
            let manifest = dir.join("manifest.json");
            crate::fsutil::replace_file(&manifest, &json)
                .map_err(|e| io_ctx("writing", &manifest, e))?;
        }
    }
    writes.push(drover_store::put(META, "schema", &SCHEMA)?);
    store.apply(writes)?;
    Ok(migrated)
}

/// One VM's records in schema 2.
pub(super) struct Upgraded {
    pub info: VmInfo,
    pub history: ConfigHistory,
    pub states: Vec<StateInfo>,
    pub chains: BTreeMap<String, DiskLayers>,
}

/// Rewrite one VM's schema-1 records (see the module doc). `backing` reads a layer's backing
/// file; pure otherwise.
pub(super) fn to_layer_chains(
    vm_dir: &Path,
    mut info: VmInfo,
    history: ConfigHistory,
    mut states: Vec<StateInfo>,
    mut backing: impl FnMut(&Path) -> Option<PathBuf>,
) -> Result<Upgraded> {
    let dirs = [vm_dir.join("disks"), vm_dir.join("layers")];
    // Files Drover made on top of disk `id`: `<id>.<...>.qcow2` in the VM's disks (not the
    // disk's own `<id>.qcow2`), or any layer a migration moved here. Never a user's image.
    let is_layer = |id: &str, p: &Path| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        let own = format!("{id}.qcow2");
        (p.parent() == Some(dirs[0].as_path())
            && name != own
            && name.starts_with(&format!("{id}.")))
            || p.parent() == Some(dirs[1].as_path())
    };
    let mut chains: BTreeMap<String, DiskLayers> = BTreeMap::new();
    // What the next default start would have opened is each disk's current content; its
    // origin is down the layers Drover made.
    let current = match (&info.running_config, info.state) {
        (Some(c), s) if s != VmState::Stopped => c.clone(),
        _ => history.resolve(history.latest().filter(|_| info.persist).unwrap_or(0))?,
    };
    let mut origins: BTreeMap<String, PathBuf> = BTreeMap::new();
    for d in &current.disks {
        let id = d.id.as_str();
        let o = origin_below(&d.path, &mut backing, |p| is_layer(id, p));
        let chain = chains.entry(id.to_string()).or_default();
        if o != d.path {
            chain.tops.insert(o.clone(), d.path.clone());
        }
        origins.insert(id.to_string(), o);
    }
    // Any other path a config names: a layer of a disk we know is that disk; else its own
    // origin (found the same way).
    let mut origin = |id: &str, path: &Path| -> PathBuf {
        match origins.get(id) {
            Some(o) if is_layer(id, path) || o == path => o.clone(),
            _ => origin_below(path, &mut backing, |p| is_layer(id, p)),
        }
    };
    for s in states.iter_mut().filter(|s| s.format < 2) {
        for d in s.config.disks.iter_mut() {
            let o = origin(d.id.as_str(), &d.path);
            s.layers.insert(d.id.to_string(), d.path.clone());
            chains
                .entry(d.id.to_string())
                .or_default()
                .pinned
                .entry(d.path.clone())
                .or_default()
                .insert(s.id.clone());
            d.path = o;
        }
        s.format = STATE_FORMAT;
    }
    let mut to_origins = |c: &mut VmConfig| {
        for d in c.disks.iter_mut() {
            d.path = origin(d.id.as_str(), &d.path);
        }
    };
    let mut new_history = history.clone();
    to_origins(&mut new_history.initial);
    for g in new_history.generations.iter_mut() {
        let mut full = history.resolve(g.id)?;
        to_origins(&mut full);
        g.stored = match g.stored {
            StoredConfig::Snapshot(_) => StoredConfig::Snapshot(full),
            StoredConfig::Diff(_) => StoredConfig::Diff(diff(&new_history.initial, &full)),
        };
    }
    to_origins(&mut info.config);
    for c in [&mut info.running_config, &mut info.next_config]
        .into_iter()
        .flatten()
    {
        to_origins(c);
    }
    Ok(Upgraded {
        info,
        history: new_history,
        states,
        chains,
    })
}

#[cfg(test)]
mod tests;
