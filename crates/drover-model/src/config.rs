//! A VM config seen as a set of typed elements, and what is done with such sets: diffs between
//! configs, applying and rebasing them, composing a config from pieces of several, and the history
//! of generations a VM's config goes through (ARCHITECTURE.md §3).
//!
//! Elements are keyed `cpu`, `memory`, `machine`, `boot`, `disk:<id>` and `nic:<id>`. A diff is a
//! list of element operations; it carries no positions, so everything order-dependent is part of
//! an element's value:
//! - Disk order is what the guest sees (vda, vdb, ...), so each [`DiskConfig`] carries its
//!   `index`, and [`VmConfig::disks`] is kept sorted by it.
//! - NIC order carries no meaning in the model (guests tell NICs apart by MAC), so configs rebuilt
//!   from elements list NICs in one canonical order: cold-plugged by id, then hot-plugged by slot.
//!
//! The laws (tested with proptest): `apply(a, &diff(a, b)) == b` for valid `a` and canonical `b`
//! (see [`VmConfig::normalize`]) of the same name, and rebasing keeps the config a diff yields.

mod history;

pub use history::{ConfigHistory, Generation, PersistMode, StoredConfig};

use crate::size::format_size;
use crate::spec::{
    Accel, Boot, DiskConfig, ElementId, NicBackend, NicConfig, VmConfig, VmName, MAX_DISKS,
    MAX_FORWARDS, MAX_NICS, MAX_VCPUS, MIN_MEMORY, PCI_FIRST_DEVICE_ADDR, PCI_LAST_ADDR,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// Longest kernel command line accepted (the x86 boot protocol limit Drover assumes).
const MAX_CMDLINE: usize = 2048;

/// Why a config, a diff or a composition is not acceptable. Messages name the elements involved
/// and what would make it acceptable.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// An element key could not be read.
    #[error("invalid element {input:?}: {reason} (use cpu, memory, machine, boot, disk:<id> or nic:<id>)")]
    BadKey {
        /// What was given.
        input: String,
        /// What is wrong.
        reason: String,
    },
    /// An element stored under a key it does not belong to (e.g. a NIC under `disk:x`).
    #[error("element {key} holds the value of {found}")]
    KeyMismatch {
        /// The key given.
        key: ElementKey,
        /// The key the value belongs under.
        found: ElementKey,
    },
    /// A required element (cpu, memory, machine, boot) is absent.
    #[error("the config has no {0}: every VM needs one")]
    MissingElement(ElementKey),
    /// vCPU count out of range.
    #[error("invalid vCPU count {0}: must be between 1 and {MAX_VCPUS}")]
    BadCpus(u32),
    /// Memory out of range.
    #[error("invalid memory {}: must be at least {} and a whole number of MiB", format_size(*.0), format_size(MIN_MEMORY))]
    BadMemory(u64),
    /// Too many disks or NICs.
    #[error("too many {what}: {count}, at most {max}")]
    TooMany {
        /// Disks or NICs.
        what: &'static str,
        /// How many the config has.
        count: usize,
        /// Allowed.
        max: usize,
    },
    /// One element's value is inconsistent.
    #[error("{key}: {reason}")]
    BadElement {
        /// The element.
        key: ElementKey,
        /// What is wrong.
        reason: String,
    },
    /// The same disk or NIC is listed twice.
    #[error("{0} is listed twice in the config")]
    DuplicateElement(ElementKey),
    /// A disk and a NIC share an id (QEMU names devices and block nodes by it).
    #[error("{disk} and {nic} share an id: disk and NIC ids must be unique within a VM")]
    SharedId {
        /// The disk.
        disk: ElementKey,
        /// The NIC.
        nic: ElementKey,
    },
    /// Two disks claim the same place in the guest's disk order.
    #[error("{first} and {second} both use disk index {index}: give each disk its own place in the disk order")]
    DuplicateIndex {
        /// One disk.
        first: ElementKey,
        /// The other.
        second: ElementKey,
        /// The index both use.
        index: u32,
    },
    /// `disks` is not sorted by index.
    #[error("disks are out of order: {later} (index {later_index}) is listed after {earlier} (index {earlier_index}); list disks by index")]
    DisksOutOfOrder {
        /// The disk listed first.
        earlier: ElementKey,
        /// Its index.
        earlier_index: u32,
        /// The disk listed after it.
        later: ElementKey,
        /// Its (smaller) index.
        later_index: u32,
    },
    /// Two devices claim the same hot-plug port.
    #[error("{first} and {second} both use hot-plug slot {slot}")]
    DuplicateSlot {
        /// One device.
        first: ElementKey,
        /// The other.
        second: ElementKey,
        /// The slot both use.
        slot: u8,
    },
    /// Two devices claim the same root-bus PCI slot.
    #[error("{first} and {second} both use PCI slot {addr} of the root bus; give one of them another slot or none")]
    DuplicateAddr {
        /// One device.
        first: ElementKey,
        /// The other.
        second: ElementKey,
        /// The slot both use.
        addr: u8,
    },
    /// The boot section names a disk the config does not have.
    #[error("boot disk {0} is not one of the VM's disks")]
    BootDiskMissing(ElementKey),
    /// A change removes the disk the VM boots from.
    #[error("cannot remove {0}: it is the boot disk (boot from something else first)")]
    RemoveBootDisk(ElementKey),
    /// A change removes cpu, memory, machine or boot.
    #[error("cannot remove {0}: every VM needs one (change it instead)")]
    RemoveRequired(ElementKey),
    /// A diff adds an element the config already has.
    #[error("cannot add {0}: the config already has it")]
    AlreadyPresent(ElementKey),
    /// A change removes or modifies an element the config does not have.
    #[error("cannot {op} {key}: the config has no such element")]
    NotPresent {
        /// `remove` or `modify`.
        op: &'static str,
        /// The element.
        key: ElementKey,
    },
    /// A composition both removes an element and takes it from somewhere.
    #[error("{key} is both removed and taken from {label}: drop one of the two")]
    RemovedAndTaken {
        /// The element.
        key: ElementKey,
        /// Where it was to be taken from.
        label: String,
    },
    /// A composition takes the same element twice.
    #[error("{key} is taken twice, from {first} and from {second}: take it once")]
    TakenTwice {
        /// The element.
        key: ElementKey,
        /// First source.
        first: String,
        /// Second source.
        second: String,
    },
    /// A composition both sets a value and takes the element from somewhere.
    #[error("{key} is both set and taken from {label}: drop one of the two")]
    SetAndTaken {
        /// The element.
        key: ElementKey,
        /// Where it was to be taken from.
        label: String,
    },
    /// No generation has this id.
    #[error("unknown config generation {id}: the VM has {}", known_generations(.known))]
    UnknownGeneration {
        /// The id asked for.
        id: u32,
        /// The ids there are (0, the initial config, included).
        known: Vec<u32>,
    },
    /// A generation lacks the element asked for.
    #[error("config generation {id} has no {key}")]
    NotInGeneration {
        /// The generation.
        id: u32,
        /// The element.
        key: ElementKey,
    },
    /// Generation 0 cannot be deleted.
    #[error("generation 0 is the initial config and cannot be deleted (promote another generation to replace it)")]
    DeleteInitial,
    /// A persistence mode could not be read.
    #[error("unknown persistence mode {0:?}: use snapshot or diff")]
    BadMode(String),
}

fn known_generations(known: &[u32]) -> String {
    let list: Vec<String> = known
        .iter()
        .map(|id| match id {
            0 => "0 (initial)".to_string(),
            id => id.to_string(),
        })
        .collect();
    format!("generations {}", list.join(", "))
}

/// The key of one element of a VM config; reads and prints as `cpu`, `memory`, `machine`,
/// `boot`, `disk:<id>` or `nic:<id>`. Ordered so diffs list cpu, memory, machine, boot, disks,
/// then NICs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ElementKey {
    /// vCPU count.
    Cpu,
    /// Guest memory.
    Memory,
    /// Machine settings (accelerator).
    Machine,
    /// Boot source.
    Boot,
    /// A disk, by id.
    Disk(ElementId),
    /// A NIC, by id.
    Nic(ElementId),
}

impl ElementKey {
    /// Whether every config has exactly one of this element (and it can be changed, not removed).
    pub fn is_required(&self) -> bool {
        matches!(
            self,
            ElementKey::Cpu | ElementKey::Memory | ElementKey::Machine | ElementKey::Boot
        )
    }
}

impl FromStr for ElementKey {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| ConfigError::BadKey {
            input: s.to_string(),
            reason,
        };
        let (kind, given_id) = match s.split_once(':') {
            Some((kind, id)) => (kind, Some(id)),
            None => (s, None),
        };
        let id = |kind: &str| match given_id {
            Some(id) => ElementId::new(id).map_err(|e| bad(e.to_string())),
            None => Err(bad(format!("{kind} needs an id, as in {kind}:data"))),
        };
        match kind {
            "cpu" | "memory" | "machine" | "boot" if given_id.is_some() => {
                Err(bad(format!("{kind} takes no id")))
            }
            "cpu" => Ok(ElementKey::Cpu),
            "memory" => Ok(ElementKey::Memory),
            "machine" => Ok(ElementKey::Machine),
            "boot" => Ok(ElementKey::Boot),
            "disk" => Ok(ElementKey::Disk(id("disk")?)),
            "nic" => Ok(ElementKey::Nic(id("nic")?)),
            _ => Err(bad(format!("unknown kind {kind:?}"))),
        }
    }
}
impl TryFrom<String> for ElementKey {
    type Error = ConfigError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}
impl From<ElementKey> for String {
    fn from(k: ElementKey) -> String {
        k.to_string()
    }
}
impl fmt::Display for ElementKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElementKey::Cpu => f.write_str("cpu"),
            ElementKey::Memory => f.write_str("memory"),
            ElementKey::Machine => f.write_str("machine"),
            ElementKey::Boot => f.write_str("boot"),
            ElementKey::Disk(id) => write!(f, "disk:{id}"),
            ElementKey::Nic(id) => write!(f, "nic:{id}"),
        }
    }
}

/// The value of one element. Serialized as `{"kind": "disk", "value": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", content = "value", rename_all = "lowercase")]
pub enum Element {
    /// vCPU count.
    Cpu(u32),
    /// Memory in bytes.
    Memory(u64),
    /// Machine settings.
    Machine {
        /// Accelerator forced for the VM; the host decides when None.
        accel: Option<Accel>,
        /// Memory can be hot-plugged up to this size; None: no memory hot-plug (it costs boot time).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_memory: Option<u64>,
    },
    /// Boot source.
    Boot(Boot),
    /// A disk.
    Disk(DiskConfig),
    /// A NIC.
    Nic(NicConfig),
}

impl Element {
    /// The key this value belongs under.
    pub fn key(&self) -> ElementKey {
        match self {
            Element::Cpu(_) => ElementKey::Cpu,
            Element::Memory(_) => ElementKey::Memory,
            Element::Machine { .. } => ElementKey::Machine,
            Element::Boot(_) => ElementKey::Boot,
            Element::Disk(d) => ElementKey::Disk(d.id.clone()),
            Element::Nic(n) => ElementKey::Nic(n.id.clone()),
        }
    }
}

/// One line's worth of the value: `2`, `512M`, `64M qcow2 slot 1`, `user 52:54:00:12:34:56`.
impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Element::Cpu(n) => write!(f, "{n}"),
            Element::Memory(bytes) => f.write_str(&format_size(*bytes)),
            Element::Machine { accel, max_memory } => {
                match accel {
                    Some(a) => write!(f, "accel {a}")?,
                    None => f.write_str("accel auto")?,
                }
                match max_memory {
                    Some(m) => write!(f, ", memory hot-plug up to {}", format_size(*m)),
                    None => Ok(()),
                }
            }
            Element::Boot(boot) => fmt_boot(f, boot),
            Element::Disk(d) => {
                write!(f, "{} {}", format_size(d.size), d.format)?;
                if d.readonly {
                    f.write_str(" ro")?;
                }
                fmt_slot(f, d.slot)
            }
            Element::Nic(n) => {
                match &n.backend {
                    NicBackend::User { .. } => write!(f, "user {}", n.mac)?,
                    NicBackend::Tap { ifname } => write!(f, "tap {ifname} {}", n.mac)?,
                }
                if let NicBackend::User { forwards } = &n.backend {
                    for fwd in forwards {
                        write!(f, " fwd {fwd}")?;
                    }
                }
                fmt_slot(f, n.slot)
            }
        }
    }
}

fn fmt_slot(f: &mut fmt::Formatter<'_>, slot: Option<u8>) -> fmt::Result {
    match slot {
        Some(s) => write!(f, " slot {s}"),
        None => Ok(()),
    }
}

fn fmt_boot(f: &mut fmt::Formatter<'_>, boot: &Boot) -> fmt::Result {
    match boot {
        Boot::Default { cmdline } => {
            f.write_str("default image")?;
            if let Some(c) = cmdline {
                write!(f, " cmdline {c:?}")?;
            }
            Ok(())
        }
        Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            write!(f, "kernel {}", kernel.display())?;
            if let Some(i) = initrd {
                write!(f, " initrd {}", i.display())?;
            }
            if let Some(c) = cmdline {
                write!(f, " cmdline {c:?}")?;
            }
            Ok(())
        }
        Boot::Disk { disk } => write!(f, "disk:{disk}"),
    }
}

fn check_key(key: &ElementKey, element: &Element) -> Result<(), ConfigError> {
    let found = element.key();
    if &found == key {
        Ok(())
    } else {
        Err(ConfigError::KeyMismatch {
            key: key.clone(),
            found,
        })
    }
}

impl VmConfig {
    /// The config's elements by key. Meant for valid configs: of two disks or NICs with the same
    /// id (which [`VmConfig::validate_config`] rejects) only the last is kept.
    pub fn elements(&self) -> BTreeMap<ElementKey, Element> {
        let mut map = BTreeMap::new();
        map.insert(ElementKey::Cpu, Element::Cpu(self.cpus));
        map.insert(ElementKey::Memory, Element::Memory(self.memory));
        map.insert(
            ElementKey::Machine,
            Element::Machine {
                accel: self.accel,
                max_memory: self.max_memory,
            },
        );
        map.insert(ElementKey::Boot, Element::Boot(self.boot.clone()));
        for d in &self.disks {
            map.insert(ElementKey::Disk(d.id.clone()), Element::Disk(d.clone()));
        }
        for n in &self.nics {
            map.insert(ElementKey::Nic(n.id.clone()), Element::Nic(n.clone()));
        }
        map
    }

    /// Build and validate a config from its elements: disks sorted by index, NICs in canonical
    /// order (cold-plugged by id, then hot-plugged by slot).
    pub fn from_elements(
        name: VmName,
        elements: BTreeMap<ElementKey, Element>,
    ) -> Result<VmConfig, ConfigError> {
        let (mut cpus, mut memory, mut machine, mut boot) = (None, None, None, None);
        let mut disks = Vec::new();
        let mut nics = Vec::new();
        for (key, element) in elements {
            check_key(&key, &element)?;
            match element {
                Element::Cpu(n) => cpus = Some(n),
                Element::Memory(m) => memory = Some(m),
                Element::Machine { accel, max_memory } => machine = Some((accel, max_memory)),
                Element::Boot(b) => boot = Some(b),
                Element::Disk(d) => disks.push(d),
                Element::Nic(n) => nics.push(n),
            }
        }
        disks.sort_by(|a, b| (a.index, &a.id).cmp(&(b.index, &b.id)));
        nics.sort_by(|a, b| (a.slot, &a.id).cmp(&(b.slot, &b.id)));
        let (accel, max_memory) =
            machine.ok_or(ConfigError::MissingElement(ElementKey::Machine))?;
        let config = VmConfig {
            name,
            cpus: cpus.ok_or(ConfigError::MissingElement(ElementKey::Cpu))?,
            memory: memory.ok_or(ConfigError::MissingElement(ElementKey::Memory))?,
            disks,
            nics,
            boot: boot.ok_or(ConfigError::MissingElement(ElementKey::Boot))?,
            accel,
            max_memory,
        };
        config.validate_config()?;
        Ok(config)
    }

    /// Check a resolved config: vCPU and memory ranges, device counts, unique ids, disks sorted by
    /// unique indexes, one device per hot-plug slot, a boot disk that exists, absolute paths.
    /// Host-dependent limits (host CPUs and memory, free hot-plug ports) are the host's to check.
    pub fn validate_config(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_VCPUS {
            return Err(ConfigError::BadCpus(self.cpus));
        }
        if self.memory < MIN_MEMORY || !self.memory.is_multiple_of(1 << 20) {
            return Err(ConfigError::BadMemory(self.memory));
        }
        if let Some(max) = self.max_memory {
            if max < self.memory || !max.is_multiple_of(1 << 20) {
                return Err(ConfigError::BadElement {
                    key: ElementKey::Machine,
                    reason: format!(
                        "the memory hot-plug limit {} is below the memory size {}",
                        format_size(max),
                        format_size(self.memory)
                    ),
                });
            }
        }
        for (what, count, max) in [
            ("disks", self.disks.len(), MAX_DISKS),
            ("NICs", self.nics.len(), MAX_NICS),
        ] {
            if count > max {
                return Err(ConfigError::TooMany { what, count, max });
            }
        }
        let mut disk_ids = BTreeSet::new();
        let mut indexes: BTreeMap<u32, ElementKey> = BTreeMap::new();
        let mut slots: BTreeMap<u8, ElementKey> = BTreeMap::new();
        let mut addrs: BTreeMap<u8, ElementKey> = BTreeMap::new();
        let mut claim_slot = |slot: Option<u8>, addr: Option<u8>, key: &ElementKey| {
            if let Some(slot) = slot {
                if let Some(first) = slots.insert(slot, key.clone()) {
                    return Err(ConfigError::DuplicateSlot {
                        first,
                        second: key.clone(),
                        slot,
                    });
                }
            }
            match addr {
                Some(a) if slot.is_some() => Err(ConfigError::BadElement {
                    key: key.clone(),
                    reason: format!(
                        "it sits on hot-plug slot {} and on PCI slot {a} of the root bus; a device has one place",
                        slot.unwrap_or_default()
                    ),
                }),
                Some(a) if !(PCI_FIRST_DEVICE_ADDR..=PCI_LAST_ADDR).contains(&a) => {
                    Err(ConfigError::BadElement {
                        key: key.clone(),
                        reason: format!(
                            "PCI slot {a} is outside {PCI_FIRST_DEVICE_ADDR}..={PCI_LAST_ADDR}, the slots devices may use"
                        ),
                    })
                }
                Some(a) => match addrs.insert(a, key.clone()) {
                    Some(first) => Err(ConfigError::DuplicateAddr {
                        first,
                        second: key.clone(),
                        addr: a,
                    }),
                    None => Ok(()),
                },
                None => Ok(()),
            }
        };
        for d in &self.disks {
            let key = ElementKey::Disk(d.id.clone());
            if !disk_ids.insert(&d.id) {
                return Err(ConfigError::DuplicateElement(key));
            }
            if let Some(first) = indexes.insert(d.index, key.clone()) {
                return Err(ConfigError::DuplicateIndex {
                    first,
                    second: key,
                    index: d.index,
                });
            }
            if !d.path.is_absolute() {
                return Err(ConfigError::BadElement {
                    key,
                    reason: format!("image path {} must be absolute", d.path.display()),
                });
            }
            claim_slot(d.slot, d.addr, &key)?;
        }
        for pair in self.disks.windows(2) {
            if let [earlier, later] = pair {
                if later.index < earlier.index {
                    return Err(ConfigError::DisksOutOfOrder {
                        earlier: ElementKey::Disk(earlier.id.clone()),
                        earlier_index: earlier.index,
                        later: ElementKey::Disk(later.id.clone()),
                        later_index: later.index,
                    });
                }
            }
        }
        let mut nic_ids = BTreeSet::new();
        for n in &self.nics {
            let key = ElementKey::Nic(n.id.clone());
            if !nic_ids.insert(&n.id) {
                return Err(ConfigError::DuplicateElement(key));
            }
            if disk_ids.contains(&n.id) {
                return Err(ConfigError::SharedId {
                    disk: ElementKey::Disk(n.id.clone()),
                    nic: key,
                });
            }
            check_nic(n, &key)?;
            claim_slot(n.slot, n.addr, &key)?;
        }
        check_boot(&self.boot, &disk_ids)
    }

    /// Bring a config into the form [`VmConfig::from_elements`] builds: when the disk indexes do
    /// not increase along `disks` (as in configs written before indexes existed, all 0), the list
    /// order wins and indexes are renumbered 0, 1, ...; NICs are put in canonical order.
    pub fn normalize(&mut self) {
        if self.disks.windows(2).any(|w| w[0].index >= w[1].index) {
            for (i, d) in (0u32..).zip(self.disks.iter_mut()) {
                d.index = i;
            }
        }
        self.nics
            .sort_by(|a, b| (a.slot, &a.id).cmp(&(b.slot, &b.id)));
    }
}

fn check_nic(n: &NicConfig, key: &ElementKey) -> Result<(), ConfigError> {
    let bad = |reason: String| ConfigError::BadElement {
        key: key.clone(),
        reason,
    };
    match &n.backend {
        NicBackend::User { forwards } if forwards.len() > MAX_FORWARDS => Err(bad(format!(
            "{} port forwards, at most {MAX_FORWARDS}",
            forwards.len()
        ))),
        NicBackend::Tap { ifname }
            if ifname.is_empty()
                || ifname.len() > 15
                || !ifname
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
        {
            Err(bad(format!(
                "invalid tap name {ifname:?}: use 1-15 characters a-z, A-Z, 0-9, '-' and '_'"
            )))
        }
        _ => Ok(()),
    }
}

fn check_boot(boot: &Boot, disk_ids: &BTreeSet<&ElementId>) -> Result<(), ConfigError> {
    let bad = |reason: String| ConfigError::BadElement {
        key: ElementKey::Boot,
        reason,
    };
    let cmdline = match boot {
        Boot::Disk { disk } => {
            if !disk_ids.contains(disk) {
                return Err(ConfigError::BootDiskMissing(ElementKey::Disk(disk.clone())));
            }
            None
        }
        Boot::Default { cmdline } => cmdline.as_ref(),
        Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            for p in std::iter::once(kernel).chain(initrd) {
                if !p.is_absolute() {
                    return Err(bad(format!("path {} must be absolute", p.display())));
                }
            }
            cmdline.as_ref()
        }
    };
    match cmdline {
        Some(c) if c.len() > MAX_CMDLINE || c.contains('\n') => Err(bad(format!(
            "cmdline must be one line of at most {MAX_CMDLINE} bytes"
        ))),
        _ => Ok(()),
    }
}

/// One change to one element.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ElementOp {
    /// Add an element the config does not have.
    Add {
        /// Its key.
        key: ElementKey,
        /// Its value.
        element: Element,
    },
    /// Remove an element the config has (never cpu, memory, machine or boot).
    Remove {
        /// Its key.
        key: ElementKey,
    },
    /// Replace the value of an element the config has.
    Modify {
        /// Its key.
        key: ElementKey,
        /// The new value.
        element: Element,
    },
}

impl ElementOp {
    /// The element the operation is about.
    pub fn key(&self) -> &ElementKey {
        match self {
            ElementOp::Add { key, .. }
            | ElementOp::Remove { key }
            | ElementOp::Modify { key, .. } => key,
        }
    }
}

/// Operations turning one config into another; serialized as `{"ops": [...]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConfigDiff {
    /// Applied in order. [`diff`] makes at most one per key, sorted by key.
    pub ops: Vec<ElementOp>,
}

impl ConfigDiff {
    /// Whether the diff changes nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// One line per operation: `+ disk:data2 64M qcow2 slot 1`, `- nic:net1`, `~ memory -> 1G`.
/// Use [`describe`] to show old values too.
impl fmt::Display for ConfigDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, op) in self.ops.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            match op {
                ElementOp::Add { key, element } => write!(f, "+ {key} {element}")?,
                ElementOp::Remove { key } => write!(f, "- {key}")?,
                ElementOp::Modify { key, element } => write!(f, "~ {key} -> {element}")?,
            }
        }
        Ok(())
    }
}

/// The operations turning `a` into `b`: one per element that differs, sorted by key. The name is
/// not an element: it stays that of the config a diff is applied to.
pub fn diff(a: &VmConfig, b: &VmConfig) -> ConfigDiff {
    let (old, new) = (a.elements(), b.elements());
    let keys: BTreeSet<&ElementKey> = old.keys().chain(new.keys()).collect();
    let ops = keys
        .into_iter()
        .filter_map(|key| match (old.get(key), new.get(key)) {
            (Some(_), None) => Some(ElementOp::Remove { key: key.clone() }),
            (None, Some(e)) => Some(ElementOp::Add {
                key: key.clone(),
                element: e.clone(),
            }),
            (Some(o), Some(n)) if o != n => Some(ElementOp::Modify {
                key: key.clone(),
                element: n.clone(),
            }),
            _ => None,
        })
        .collect();
    ConfigDiff { ops }
}

/// Apply `d` to `base`, strictly: adding an element that exists, removing or modifying one that
/// does not, removing a required element or the boot disk, or a result that fails
/// [`VmConfig::validate_config`] is an error. The result is in canonical form (see
/// [`VmConfig::from_elements`]) and keeps `base`'s name.
pub fn apply(base: &VmConfig, d: &ConfigDiff) -> Result<VmConfig, ConfigError> {
    let mut elements = base.elements();
    let mut removed = BTreeSet::new();
    for op in &d.ops {
        match op {
            ElementOp::Add { key, element } => {
                check_key(key, element)?;
                if elements.contains_key(key) {
                    return Err(ConfigError::AlreadyPresent(key.clone()));
                }
                elements.insert(key.clone(), element.clone());
            }
            ElementOp::Remove { key } => {
                if key.is_required() {
                    return Err(ConfigError::RemoveRequired(key.clone()));
                }
                if elements.remove(key).is_none() {
                    return Err(ConfigError::NotPresent {
                        op: "remove",
                        key: key.clone(),
                    });
                }
                removed.insert(key.clone());
            }
            ElementOp::Modify { key, element } => {
                check_key(key, element)?;
                match elements.get_mut(key) {
                    Some(value) => *value = element.clone(),
                    None => {
                        return Err(ConfigError::NotPresent {
                            op: "modify",
                            key: key.clone(),
                        })
                    }
                }
            }
        }
    }
    check_boot_disk_kept(&elements, &removed)?;
    VmConfig::from_elements(base.name.clone(), elements)
}

/// A more telling error than "boot disk missing" when the boot disk was removed on purpose.
fn check_boot_disk_kept(
    elements: &BTreeMap<ElementKey, Element>,
    removed: &BTreeSet<ElementKey>,
) -> Result<(), ConfigError> {
    if let Some(Element::Boot(Boot::Disk { disk })) = elements.get(&ElementKey::Boot) {
        let key = ElementKey::Disk(disk.clone());
        if removed.contains(&key) && !elements.contains_key(&key) {
            return Err(ConfigError::RemoveBootDisk(key));
        }
    }
    Ok(())
}

/// A diff against `new_base` that yields the config `d` yields against `old_base` (fails if `d`
/// does not apply to `old_base`).
pub fn rebase(
    old_base: &VmConfig,
    d: &ConfigDiff,
    new_base: &VmConfig,
) -> Result<ConfigDiff, ConfigError> {
    let target = apply(old_base, d)?;
    Ok(diff(new_base, &target))
}

/// `d` rendered for a person, one line per operation, with the old values taken from `base`:
/// `+ disk:data2 64M qcow2 slot 1`, `- nic:net1`, `~ memory 512M -> 1G`,
/// `~ disk:data size 1G -> 2G, slot none -> 1`.
pub fn describe(base: &VmConfig, d: &ConfigDiff) -> Vec<String> {
    let old = base.elements();
    d.ops
        .iter()
        .map(|op| match op {
            ElementOp::Add { key, element } => format!("+ {key} {element}"),
            ElementOp::Remove { key } => format!("- {key}"),
            ElementOp::Modify { key, element } => match old.get(key) {
                Some(before) => format!("~ {key} {}", describe_change(before, element)),
                None => format!("~ {key} -> {element}"),
            },
        })
        .collect()
}

/// `old -> new` for scalars; the changed fields for disks and NICs, whose one-line form leaves
/// out the path and MAC details.
fn describe_change(before: &Element, after: &Element) -> String {
    fn opt<T: fmt::Display>(v: &Option<T>) -> String {
        v.as_ref().map_or_else(|| "none".to_string(), T::to_string)
    }
    let mut fields: Vec<String> = Vec::new();
    let mut field = |name: &str, a: String, b: String| {
        if a != b {
            fields.push(format!("{name} {a} -> {b}"));
        }
    };
    match (before, after) {
        (Element::Disk(a), Element::Disk(b)) => {
            field(
                "path",
                a.path.display().to_string(),
                b.path.display().to_string(),
            );
            field("size", format_size(a.size), format_size(b.size));
            field("format", a.format.to_string(), b.format.to_string());
            field("readonly", a.readonly.to_string(), b.readonly.to_string());
            field("owned", a.owned.to_string(), b.owned.to_string());
            field("index", a.index.to_string(), b.index.to_string());
            field("slot", opt(&a.slot), opt(&b.slot));
            field("pci", opt(&a.addr), opt(&b.addr));
        }
        (Element::Nic(a), Element::Nic(b)) => {
            field("mac", a.mac.to_string(), b.mac.to_string());
            field("backend", backend(&a.backend), backend(&b.backend));
            field("slot", opt(&a.slot), opt(&b.slot));
            field("pci", opt(&a.addr), opt(&b.addr));
        }
        _ => return format!("{before} -> {after}"),
    }
    if fields.is_empty() {
        "unchanged".to_string()
    } else {
        fields.join(", ")
    }
}

fn backend(b: &NicBackend) -> String {
    match b {
        NicBackend::Tap { ifname } => format!("tap {ifname}"),
        NicBackend::User { forwards } if forwards.is_empty() => "user".to_string(),
        NicBackend::User { forwards } => {
            let list: Vec<String> = forwards.iter().map(ToString::to_string).collect();
            format!("user fwd {}", list.join(" "))
        }
    }
}

/// A config composed at start (`drover vm start NAME --config GEN --without disk:data2
/// --with GEN2:nic:net1 --set memory=2G --set cpus=2`).
#[derive(Debug, Clone)]
pub struct Compose {
    /// The config started from (the initial config or a generation).
    pub base: VmConfig,
    /// Elements to leave out; never cpu, memory, machine or boot, nor the boot disk.
    pub without: Vec<ElementKey>,
    /// Elements taken from elsewhere: (where from, for error messages; key; value). An element
    /// the base has is replaced by the taken one; one it lacks is added.
    pub with: Vec<(String, ElementKey, Element)>,
    /// New vCPU count.
    pub set_cpus: Option<u32>,
    /// New memory size in bytes.
    pub set_memory: Option<u64>,
}

/// Build the composed config and validate it. A taken disk that clashes with another disk's
/// index or slot is reported naming both.
pub fn compose(c: &Compose) -> Result<VmConfig, ConfigError> {
    let mut elements = c.base.elements();
    let mut taken: BTreeMap<&ElementKey, &str> = BTreeMap::new();
    for (label, key, element) in &c.with {
        check_key(key, element)?;
        if let Some(first) = taken.insert(key, label) {
            return Err(ConfigError::TakenTwice {
                key: key.clone(),
                first: first.to_string(),
                second: label.clone(),
            });
        }
    }
    let mut removed = BTreeSet::new();
    for key in &c.without {
        if key.is_required() {
            return Err(ConfigError::RemoveRequired(key.clone()));
        }
        if let Some(label) = taken.get(key) {
            return Err(ConfigError::RemovedAndTaken {
                key: key.clone(),
                label: label.to_string(),
            });
        }
        // Naming an element twice in `without` removes it once; only an absent one is an error.
        if elements.remove(key).is_none() && !removed.contains(key) {
            return Err(ConfigError::NotPresent {
                op: "remove",
                key: key.clone(),
            });
        }
        removed.insert(key.clone());
    }
    // A taken device keeps its PCI slot unless a device of the base holds it; it then gets a
    // free one (the base's devices keep their names in the guest).
    let base_addrs: BTreeSet<u8> = elements
        .iter()
        .filter(|(k, _)| !taken.contains_key(k))
        .filter_map(|(_, e)| element_addr(e))
        .collect();
    let mut moved = false;
    for (_, key, element) in &c.with {
        let mut element = element.clone();
        match &mut element {
            Element::Disk(d) if d.addr.is_some_and(|a| base_addrs.contains(&a)) => {
                d.addr = None;
                moved = true;
            }
            Element::Nic(n) if n.addr.is_some_and(|a| base_addrs.contains(&a)) => {
                n.addr = None;
                moved = true;
            }
            _ => {}
        }
        elements.insert(key.clone(), element);
    }
    for (key, value) in [
        (ElementKey::Cpu, c.set_cpus.map(Element::Cpu)),
        (ElementKey::Memory, c.set_memory.map(Element::Memory)),
    ] {
        if let Some(value) = value {
            if let Some(label) = taken.get(&key) {
                return Err(ConfigError::SetAndTaken {
                    key,
                    label: label.to_string(),
                });
            }
            elements.insert(key, value);
        }
    }
    check_boot_disk_kept(&elements, &removed)?;
    let mut config = VmConfig::from_elements(c.base.name.clone(), elements)?;
    if moved {
        config.pin_pci();
    }
    Ok(config)
}

fn element_addr(e: &Element) -> Option<u8> {
    match e {
        Element::Disk(d) => d.addr,
        Element::Nic(n) => n.addr,
        _ => None,
    }
}

#[cfg(test)]
mod tests;
