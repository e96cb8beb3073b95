//! The generations a VM's config goes through: the initial config plus one generation sealed at
//! each shutdown with persistence on. Pure logic; the host stores a [`ConfigHistory`] as it is.
//!
//! Diff generations are all diffs against the initial config, never against each other, so any
//! generation can be deleted without touching the rest, and promoting one only rebases the diffs.

use super::{apply, diff, rebase, ConfigDiff, ConfigError, Element, ElementKey};
use crate::spec::VmConfig;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How a sealed generation is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum PersistMode {
    /// The whole config.
    Snapshot,
    /// A diff against the initial config (small; follows promotions by rebasing).
    Diff,
}

impl FromStr for PersistMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "snapshot" => Ok(PersistMode::Snapshot),
            "diff" => Ok(PersistMode::Diff),
            _ => Err(ConfigError::BadMode(s.to_string())),
        }
    }
}
impl fmt::Display for PersistMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PersistMode::Snapshot => "snapshot",
            PersistMode::Diff => "diff",
        })
    }
}

/// A stored generation's content: `{"kind": "snapshot", <config>}` or
/// `{"kind": "diff", "ops": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StoredConfig {
    /// The whole config, as sealed.
    Snapshot(VmConfig),
    /// A diff against the history's current initial config.
    Diff(ConfigDiff),
}

/// One sealed config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Generation {
    /// Id, from 1 up (0 stands for the initial config).
    pub id: u32,
    /// When it was sealed, in ms since the Unix epoch.
    pub created_at_ms: u64,
    /// Who sealed it (user, API client, `droverd` at shutdown).
    pub who: String,
    /// Why (free text: "shutdown", "hot-plugged disk:data2").
    pub why: String,
    /// Its content.
    pub stored: StoredConfig,
}

/// A VM's initial config and its sealed generations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConfigHistory {
    /// The config the VM starts from without persistence; generation 0.
    pub initial: VmConfig,
    /// Starts at 1; bumped each time a generation is promoted to be the initial config.
    pub initial_version: u32,
    /// Sealed generations, oldest first, ids increasing.
    pub generations: Vec<Generation>,
}

impl ConfigHistory {
    /// A history with only the initial config.
    pub fn new(initial: VmConfig) -> Self {
        ConfigHistory {
            initial,
            initial_version: 1,
            generations: Vec::new(),
        }
    }

    /// Every valid id: 0 (the initial config), then the generations'.
    pub fn ids(&self) -> Vec<u32> {
        std::iter::once(0)
            .chain(self.generations.iter().map(|g| g.id))
            .collect()
    }

    /// The generation with this id (not 0).
    pub fn generation(&self, id: u32) -> Result<&Generation, ConfigError> {
        self.generations
            .iter()
            .find(|g| g.id == id)
            .ok_or_else(|| self.unknown(id))
    }

    fn unknown(&self, id: u32) -> ConfigError {
        ConfigError::UnknownGeneration {
            id,
            known: self.ids(),
        }
    }

    /// The config generation `id` stands for; 0 is the initial config. A diff generation keeps
    /// the initial config's name.
    pub fn resolve(&self, id: u32) -> Result<VmConfig, ConfigError> {
        if id == 0 {
            return Ok(self.initial.clone());
        }
        match &self.generation(id)?.stored {
            StoredConfig::Snapshot(config) => Ok(config.clone()),
            StoredConfig::Diff(d) => apply(&self.initial, d),
        }
    }

    /// One element of generation `id`, e.g. to take it into a [`super::Compose`].
    pub fn element(&self, id: u32, key: &ElementKey) -> Result<Element, ConfigError> {
        self.resolve(id)?
            .elements()
            .remove(key)
            .ok_or_else(|| ConfigError::NotInGeneration {
                id,
                key: key.clone(),
            })
    }

    /// The newest generation's id; None when only the initial config exists.
    pub fn latest(&self) -> Option<u32> {
        self.generations.iter().map(|g| g.id).max()
    }

    /// Seal `config` as a new generation stored per `mode`, and return its id; or store nothing
    /// and return None when it has the same elements as the newest generation (the initial config
    /// when there is none). The new id is one above the newest, so deleting the newest
    /// generation lets its id be used again.
    pub fn seal(
        &mut self,
        config: &VmConfig,
        mode: PersistMode,
        who: &str,
        why: &str,
        now_ms: u64,
    ) -> Result<Option<u32>, ConfigError> {
        config.validate_config()?;
        let latest = self.latest();
        let current = self.resolve(latest.unwrap_or(0))?;
        // Elements, not configs, are compared: NIC order carries no meaning.
        if current.elements() == config.elements() {
            return Ok(None);
        }
        let id = latest.map_or(1, |l| l + 1);
        let stored = match mode {
            PersistMode::Snapshot => StoredConfig::Snapshot(config.clone()),
            PersistMode::Diff => StoredConfig::Diff(diff(&self.initial, config)),
        };
        self.generations.push(Generation {
            id,
            created_at_ms: now_ms,
            who: who.to_string(),
            why: why.to_string(),
            stored,
        });
        Ok(Some(id))
    }

    /// Make generation `id` the initial config: `initial_version` goes up by one and every diff
    /// generation is rebased, so each id resolves to the same config as before. The promoted
    /// generation stays (it now resolves to the initial config). Promoting 0 changes nothing. On
    /// error (a stored diff that no longer applies) the history is left as it was.
    pub fn promote(&mut self, id: u32) -> Result<(), ConfigError> {
        if id == 0 {
            return Ok(());
        }
        let new_initial = self.resolve(id)?;
        let rebased = self
            .generations
            .iter()
            .map(|g| match &g.stored {
                StoredConfig::Diff(d) => rebase(&self.initial, d, &new_initial).map(Some),
                StoredConfig::Snapshot(_) => Ok(None),
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (g, d) in self.generations.iter_mut().zip(rebased) {
            if let Some(d) = d {
                g.stored = StoredConfig::Diff(d);
            }
        }
        self.initial = new_initial;
        self.initial_version += 1;
        Ok(())
    }

    /// Remove generation `id` and return it. The others are unaffected (diffs are against the
    /// initial config, not each other).
    pub fn delete(&mut self, id: u32) -> Result<Generation, ConfigError> {
        if id == 0 {
            return Err(ConfigError::DeleteInitial);
        }
        let pos = self
            .generations
            .iter()
            .position(|g| g.id == id)
            .ok_or_else(|| self.unknown(id))?;
        Ok(self.generations.remove(pos))
    }
}
