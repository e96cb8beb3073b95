//! droverd's storage records: what the store's `vms` and `states` tables and each state's
//! `manifest.json` hold. They are droverd's own types, apart from the API's wire types
//! ([`VmInfo`], [`StateInfo`]), so that a change on the wire cannot change what is on disk, and
//! what is shown but computed at read time is never stored ([`VmInfo::agent`]: the agent's
//! status, from the live link; [`VmInfo::unwritten`]: from the disk layers).
//!
//! Rows are read and written only through these types: [`VmRecord::from`] and
//! [`StateRecord::from`] where a row is written, `into()` the wire type where one is read.
//!
//! Versions, one scheme (the checks that existed before these types):
//! - a [`VmRecord`] is at the store's schema, [`SCHEMA`] (the row `meta/schema`, for every table
//!   in the store): `upgrade` migrates an older store once at open and refuses a newer one;
//! - a [`StateRecord`] carries its own version, `format` ([`STATE_FORMAT`](drover_api::STATE_FORMAT)), because it is also
//!   a file beside the state's data that travels without the store (a migration): `upgrade`
//!   migrates older ones, a restore or clone refuses one that is older or newer.
//!
//! The serde layout is frozen: the tests read records captured from the droverd that wrote
//! [`VmInfo`] and [`StateInfo`] themselves (`records/*.json`), check every field, and write them
//! back byte for byte. Nested values (configs, exits, marks) keep their own types.

use crate::error::Result;
use drover_api::{
    CloneOrigin, ExitInfo, Fence, GuestSaveNote, Hibernation, IdentityOutcome, MigrationMark,
    SavedOn, StateInfo, StatePhase, StateSection, VmInfo, VmState,
};
use drover_model::{Accel, PersistMode, Platform, VmConfig};
use drover_store::{Store, StoreExt};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The version of the store's records, [`VmRecord`] among them (the row `meta/schema`).
pub(super) const SCHEMA: u32 = 2;

/// One row of table `vms`: what droverd keeps of a VM (its [`VmInfo`] without what is
/// computed when shown); each field means what [`VmInfo`]'s field of the same name does.
/// Unknown fields are ignored, as they always were (rows that still hold `agent` read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct VmRecord {
    pub name: String,
    pub state: VmState,
    pub config: VmConfig,
    pub created_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<Accel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitInfo>,
    #[serde(default)]
    pub persist: bool,
    #[serde(default = "default_mode")]
    pub persist_mode: PersistMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_config: Option<VmConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_config: Option<VmConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationMark>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_reason: Option<String>,
    /// Records from before platforms were pinned have the default (`q35`, `-cpu max`, padded).
    #[serde(default)]
    pub platform: Platform,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<Fence>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hibernation: Option<Hibernation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityOutcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<CloneOrigin>,
}

/// What records from before `persist_mode` existed meant.
fn default_mode() -> PersistMode {
    PersistMode::Diff
}

impl From<&VmInfo> for VmRecord {
    /// The stored part of a VM: `agent` and `unwritten` are left out.
    fn from(i: &VmInfo) -> Self {
        let i = i.clone();
        VmRecord {
            name: i.name,
            state: i.state,
            config: i.config,
            created_at_ms: i.created_at_ms,
            pid: i.pid,
            accel: i.accel,
            started_at_ms: i.started_at_ms,
            last_exit: i.last_exit,
            persist: i.persist,
            persist_mode: i.persist_mode,
            running_config: i.running_config,
            next_config: i.next_config,
            started_from: i.started_from,
            migration: i.migration,
            paused_reason: i.paused_reason,
            platform: i.platform,
            fence: i.fence,
            hibernation: i.hibernation,
            identity: i.identity,
            clone_of: i.clone_of,
        }
    }
}

impl From<VmRecord> for VmInfo {
    /// A stored VM as the API shows it, before what is computed when shown is filled in.
    fn from(r: VmRecord) -> Self {
        VmInfo {
            name: r.name,
            state: r.state,
            config: r.config,
            created_at_ms: r.created_at_ms,
            pid: r.pid,
            accel: r.accel,
            started_at_ms: r.started_at_ms,
            last_exit: r.last_exit,
            agent: None,
            persist: r.persist,
            persist_mode: r.persist_mode,
            running_config: r.running_config,
            next_config: r.next_config,
            started_from: r.started_from,
            migration: r.migration,
            paused_reason: r.paused_reason,
            platform: r.platform,
            fence: r.fence,
            hibernation: r.hibernation,
            identity: r.identity,
            unwritten: BTreeMap::new(),
            clone_of: r.clone_of,
        }
    }
}

/// A saved state's manifest: one row of table `states` (key `VM/ID`) and the `manifest.json`
/// beside the state's data, the same fields in both; each means what [`StateInfo`]'s field of
/// the same name does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StateRecord {
    /// Its version: [`STATE_FORMAT`](drover_api::STATE_FORMAT) for states this droverd writes.
    pub format: u32,
    pub id: String,
    pub name: String,
    pub vm: String,
    pub created_at_ms: u64,
    pub created_by: String,
    pub mode: String,
    pub config: VmConfig,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub layers: BTreeMap<String, PathBuf>,
    pub devices: StateSection,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<StateSection>,
    pub paused_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<drover_api::Capture>,
    #[serde(default)]
    pub phase: StatePhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_save: Option<GuestSaveNote>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_on: Option<SavedOn>,
    #[serde(default, skip_serializing_if = "drover_model::Plugged::is_empty")]
    pub plugged: drover_model::Plugged,
}

impl From<&StateInfo> for StateRecord {
    fn from(s: &StateInfo) -> Self {
        let s = s.clone();
        StateRecord {
            format: s.format,
            id: s.id,
            name: s.name,
            vm: s.vm,
            created_at_ms: s.created_at_ms,
            created_by: s.created_by,
            mode: s.mode,
            config: s.config,
            layers: s.layers,
            devices: s.devices,
            memory: s.memory,
            paused_ms: s.paused_ms,
            capture: s.capture,
            phase: s.phase,
            failure: s.failure,
            guest_save: s.guest_save,
            saved_on: s.saved_on,
            plugged: s.plugged,
        }
    }
}

impl From<StateRecord> for StateInfo {
    fn from(r: StateRecord) -> Self {
        StateInfo {
            format: r.format,
            id: r.id,
            name: r.name,
            vm: r.vm,
            created_at_ms: r.created_at_ms,
            created_by: r.created_by,
            mode: r.mode,
            config: r.config,
            layers: r.layers,
            devices: r.devices,
            memory: r.memory,
            paused_ms: r.paused_ms,
            capture: r.capture,
            phase: r.phase,
            failure: r.failure,
            guest_save: r.guest_save,
            saved_on: r.saved_on,
            plugged: r.plugged,
        }
    }
}

/// Every VM's record (table `vms`), as the [`VmInfo`] droverd keeps in memory.
pub(super) fn vms(store: &dyn Store) -> Result<Vec<(String, VmInfo)>> {
    Ok(store
        .list::<VmRecord>(super::VMS)?
        .into_iter()
        .map(|(k, r)| (k, r.into()))
        .collect())
}

/// A VM's saved states (table `states`, keys `VM/...`), in key order.
pub(super) fn states(store: &dyn Store, vm: &str) -> Result<Vec<StateInfo>> {
    Ok(store
        .list_prefix::<StateRecord>(super::state::STATES, &format!("{vm}/"))?
        .into_iter()
        .map(|(_, r)| r.into())
        .collect())
}

impl StateRecord {
    /// The manifest file's content (`manifest.json`).
    pub fn manifest_json(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec_pretty(self)
    }
}

#[cfg(test)]
mod tests;
