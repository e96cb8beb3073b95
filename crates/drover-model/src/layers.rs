//! Which qcow2 layer holds a disk's current content: storage bookkeeping, kept apart from
//! configs. A config names a disk by id and its *origin* (the image the user gave, or the file
//! Drover made when the disk was created); that path never changes. Saves, restores and starts
//! move the disk's *top* layer here instead, so sealing, choosing or promoting a generation never
//! records or reopens a layer.
//!
//! Invariant: a layer that a saved state pins is never opened read-write.
//! [`DiskLayers::check_writable`] is the one check, and every call that hands out a layer to
//! write to ([`DiskLayers::set_top`], [`DiskLayers::save`]) goes through it. Pure logic: the host
//! makes the qcow2 files and stores a [`DiskLayers`] per VM and disk id.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Current format of a [`DiskLayers`] record; newer ones are refused, not misread.
pub const LAYERS_FORMAT: u32 = 1;

/// One disk's layer chain: the current top layer of each origin the disk id has named, and the
/// layers saved states pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DiskLayers {
    /// Record format ([`LAYERS_FORMAT`]).
    pub format: u32,
    /// Origin → the layer that holds its current content. An origin not listed is its own top.
    /// (A disk id may name another image in another generation; each keeps its own top.)
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, String>))]
    pub tops: BTreeMap<PathBuf, PathBuf>,
    /// Layers pinned by saved states → the ids of those states.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, BTreeSet<String>>))]
    pub pinned: BTreeMap<PathBuf, BTreeSet<String>>,
}

/// Why a layer operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayerError {
    /// The layer belongs to saved states: writing to it would change them.
    #[error("disk layer {} is pinned by saved state(s) {}: it is never opened read-write (a fresh overlay goes on top of it)", layer.display(), states.iter().cloned().collect::<Vec<_>>().join(", "))]
    Pinned {
        /// The layer.
        layer: PathBuf,
        /// The states that pin it.
        states: BTreeSet<String>,
    },
    /// A restore named a layer its state does not pin.
    #[error("state {state} does not pin disk layer {}; its manifest and the VM's layer records disagree", layer.display())]
    NotPinnedBy {
        /// The layer.
        layer: PathBuf,
        /// The state.
        state: String,
    },
    /// A record written by a newer droverd.
    #[error("disk layer record format {0} is newer than this droverd reads ({LAYERS_FORMAT}); upgrade droverd")]
    Format(u32),
}

/// What a start must do so the guest gets the disk's current content in a writable layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenPlan {
    /// Open this layer (the top, not pinned) read-write as it is.
    Use(PathBuf),
    /// The top is pinned by a state: make a fresh overlay backed by it, and open that.
    Overlay {
        /// The pinned top.
        backing: PathBuf,
    },
}

impl Default for DiskLayers {
    /// A disk whose origin is its own top and which no state pins.
    fn default() -> Self {
        DiskLayers {
            format: LAYERS_FORMAT,
            tops: BTreeMap::new(),
            pinned: BTreeMap::new(),
        }
    }
}

impl DiskLayers {
    /// A disk whose origin is its own top and which no state pins.
    pub fn new() -> Self {
        Self::default()
    }

    /// Refuse a record this droverd would misread.
    pub fn check_format(&self) -> Result<(), LayerError> {
        if self.format > LAYERS_FORMAT {
            return Err(LayerError::Format(self.format));
        }
        Ok(())
    }

    /// The layer holding `origin`'s current content.
    pub fn top<'a>(&'a self, origin: &'a Path) -> &'a Path {
        self.tops
            .get(origin)
            .map(PathBuf::as_path)
            .unwrap_or(origin)
    }

    /// Whether a saved state pins `layer`.
    pub fn is_pinned(&self, layer: &Path) -> bool {
        self.pinned.get(layer).is_some_and(|s| !s.is_empty())
    }

    /// The invariant, checked in one place: `layer` may be opened read-write only when no
    /// saved state pins it.
    pub fn check_writable(&self, layer: &Path) -> Result<(), LayerError> {
        match self.pinned.get(layer) {
            Some(states) if !states.is_empty() => Err(LayerError::Pinned {
                layer: layer.to_path_buf(),
                states: states.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// For a start of any config naming `origin`: use its top, or put a fresh overlay on it
    /// when a state pins it.
    pub fn plan_open(&self, origin: &Path) -> OpenPlan {
        let top = self.top(origin);
        if self.is_pinned(top) {
            OpenPlan::Overlay {
                backing: top.to_path_buf(),
            }
        } else {
            OpenPlan::Use(top.to_path_buf())
        }
    }

    /// Record `layer` (the planned top, or a fresh overlay) as what the guest writes to now.
    pub fn set_top(&mut self, origin: &Path, layer: &Path) -> Result<(), LayerError> {
        self.check_writable(layer)?;
        if layer == origin {
            self.tops.remove(origin);
        } else {
            self.tops.insert(origin.to_path_buf(), layer.to_path_buf());
        }
        Ok(())
    }

    /// A save: the current top becomes `state`'s (pinned, read-only from now on) and `overlay`,
    /// made on it, is the new top. Returns the pinned layer.
    pub fn save(
        &mut self,
        origin: &Path,
        state: &str,
        overlay: &Path,
    ) -> Result<PathBuf, LayerError> {
        self.check_writable(overlay)?;
        let pinned = self.top(origin).to_path_buf();
        self.pinned
            .entry(pinned.clone())
            .or_default()
            .insert(state.to_string());
        self.set_top(origin, overlay)?;
        Ok(pinned)
    }

    /// Undo [`DiskLayers::save`]'s pin when the save failed (the overlay stays the top: QEMU
    /// writes to it already).
    pub fn unpin_layer(&mut self, layer: &Path, state: &str) {
        if let Some(s) = self.pinned.get_mut(layer) {
            s.remove(state);
            if s.is_empty() {
                self.pinned.remove(layer);
            }
        }
    }

    /// A restore of `state`, whose layer of this disk is `layer`: check that it pins it; the
    /// caller makes a fresh overlay on it and records it with [`DiskLayers::set_top`].
    pub fn plan_restore(&self, state: &str, layer: &Path) -> Result<PathBuf, LayerError> {
        match self.pinned.get(layer) {
            Some(s) if s.contains(state) => Ok(layer.to_path_buf()),
            _ => Err(LayerError::NotPinnedBy {
                layer: layer.to_path_buf(),
                state: state.to_string(),
            }),
        }
    }

    /// A deleted state: drop its pins. Returns the layers no state pins any more (still kept:
    /// newer layers may be built on them).
    pub fn unpin(&mut self, state: &str) -> Vec<PathBuf> {
        let mut freed = Vec::new();
        self.pinned.retain(|layer, states| {
            states.remove(state);
            if states.is_empty() {
                freed.push(layer.clone());
            }
            !states.is_empty()
        });
        freed
    }

    /// Re-point the pinned layers (copied elsewhere, e.g. by a migration).
    pub fn map_pinned(&mut self, f: impl Fn(&Path) -> PathBuf) {
        self.pinned = std::mem::take(&mut self.pinned)
            .into_iter()
            .map(|(l, s)| (f(&l), s))
            .collect();
    }
}

/// The origin under a layer written by an older droverd: follow `backing` down from `layer`
/// while `is_drover_layer` says the file is one Drover made on top of a disk (at most 256
/// steps). Used once, to migrate records that named layers in configs.
pub fn origin_below(
    layer: &Path,
    mut backing: impl FnMut(&Path) -> Option<PathBuf>,
    is_drover_layer: impl Fn(&Path) -> bool,
) -> PathBuf {
    let mut at = layer.to_path_buf();
    for _ in 0..256 {
        if !is_drover_layer(&at) {
            break;
        }
        match backing(&at) {
            Some(b) => at = b,
            None => break,
        }
    }
    at
}

#[cfg(test)]
mod tests;
