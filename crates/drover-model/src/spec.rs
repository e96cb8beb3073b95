//! VM specs (what is asked) and configs (what is stored and booted).

use crate::size::{format_size, parse_size};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use thiserror::Error;

/// Most vCPUs a q35 guest takes without an IOMMU and x2APIC set-up.
pub const MAX_VCPUS: u32 = 255;
/// Smallest guest memory that boots the default image.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Disks per VM (q35 has room for more; beyond this is a mistake, not a need).
pub const MAX_DISKS: usize = 16;
/// NICs per VM.
pub const MAX_NICS: usize = 8;
/// Port forwards per NIC.
pub const MAX_FORWARDS: usize = 32;
/// Smallest disk Drover creates.
pub const MIN_DISK_SIZE: u64 = 1 << 20;
/// Largest disk Drover creates (qcow2 is sparse; this guards typos like `20000T`).
pub const MAX_DISK_SIZE: u64 = 64 << 40;

/// Why a spec or config is invalid. Each message names the field and what is allowed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ModelError {
    /// A VM name breaks the naming rule.
    #[error("invalid VM name {0:?}: use 1-63 characters a-z, 0-9 and '-', starting with a letter or digit")]
    BadName(String),
    /// A disk or NIC id breaks the naming rule.
    #[error("invalid id {0:?}: use 1-32 characters a-z, 0-9, '-' and '_', starting with a letter or digit")]
    BadId(String),
    /// Two elements share an id.
    #[error("duplicate id {0:?}: disk and NIC ids must be unique within a VM")]
    DuplicateId(String),
    /// vCPU count out of range.
    #[error("invalid vCPU count {0}: must be between 1 and {MAX_VCPUS}")]
    BadCpus(u32),
    /// Memory out of range.
    #[error("invalid memory {0}: must be at least {min} and a whole number of MiB", min = format_size(MIN_MEMORY))]
    BadMemory(String),
    /// A size could not be parsed.
    #[error(transparent)]
    Size(#[from] crate::size::SizeError),
    /// A disk entry is inconsistent.
    #[error("disk {id:?}: {reason}")]
    BadDisk {
        /// Disk id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// A NIC entry is inconsistent.
    #[error("nic {id:?}: {reason}")]
    BadNic {
        /// NIC id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// Too many of something.
    #[error("too many {what}: {count} given, at most {max}")]
    TooMany {
        /// Disks, NICs, forwards.
        what: &'static str,
        /// Given.
        count: usize,
        /// Allowed.
        max: usize,
    },
    /// The boot section is inconsistent.
    #[error("boot: {0}")]
    BadBoot(String),
    /// A TOML file could not be read as a spec.
    #[error("invalid VM file: {0}")]
    Toml(String),
    /// A port-forward rule could not be read.
    #[error("invalid port forward {input:?}: {reason} (form: [tcp|udp:][HOSTADDR:]HOSTPORT-:GUESTPORT, e.g. tcp:127.0.0.1:2222-:22)")]
    BadForward {
        /// What was given.
        input: String,
        /// What is wrong.
        reason: String,
    },
    /// A MAC address could not be read.
    #[error("invalid MAC address {0:?}: use six hex pairs like 52:54:00:12:34:56, unicast")]
    BadMac(String),
}

fn valid_label(s: &str, max: usize, extra: &[char]) -> bool {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    s.len() <= max
        && (first.is_ascii_lowercase() || first.is_ascii_digit())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || extra.contains(&c))
}

/// A VM name: a DNS label (so it can be the guest's hostname), lower case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmName(String);

impl VmName {
    /// Check and wrap a name.
    pub fn new(s: &str) -> Result<Self, ModelError> {
        if valid_label(s, 63, &[]) && !s.ends_with('-') {
            Ok(VmName(s.to_string()))
        } else {
            Err(ModelError::BadName(s.to_string()))
        }
    }
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for VmName {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        VmName::new(&s)
    }
}
impl From<VmName> for String {
    fn from(n: VmName) -> String {
        n.0
    }
}
impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl FromStr for VmName {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VmName::new(s)
    }
}

/// The id of a disk or NIC within a VM; also used in QEMU node and device names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ElementId(String);

impl ElementId {
    /// Check and wrap an id.
    pub fn new(s: &str) -> Result<Self, ModelError> {
        if valid_label(s, 32, &['_']) {
            Ok(ElementId(s.to_string()))
        } else {
            Err(ModelError::BadId(s.to_string()))
        }
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for ElementId {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        ElementId::new(&s)
    }
}
impl From<ElementId> for String {
    fn from(n: ElementId) -> String {
        n.0
    }
}
impl fmt::Display for ElementId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A unicast MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A locally administered address in QEMU's 52:54:00 range derived from the given bytes.
    pub fn qemu_local(seed: [u8; 3]) -> Self {
        MacAddr([0x52, 0x54, 0x00, seed[0], seed[1], seed[2]])
    }
}
impl FromStr for MacAddr {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ModelError::BadMac(s.to_string());
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut out = [0u8; 6];
        for (slot, part) in out.iter_mut().zip(parts) {
            if part.len() != 2 {
                return Err(bad());
            }
            *slot = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if out[0] & 1 == 1 {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}
impl TryFrom<String> for MacAddr {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}
impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}
impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Transport of a port forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// A host port forwarded into the guest (user-mode networking).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortForward {
    /// tcp or udp.
    pub proto: Proto,
    /// Host address to bind; loopback unless given.
    pub host_addr: std::net::IpAddr,
    /// Host port.
    pub host_port: u16,
    /// Guest port.
    pub guest_port: u16,
}

impl FromStr for PortForward {
    type Err = ModelError;
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| ModelError::BadForward {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let (proto, rest) = match input.split_once(':') {
            Some(("tcp", rest)) => (Proto::Tcp, rest),
            Some(("udp", rest)) => (Proto::Udp, rest),
            _ => (Proto::Tcp, input),
        };
        let (host, guest) = rest.split_once("-:").ok_or_else(|| bad("missing '-:'"))?;
        let (host_addr, host_port) = match host.rsplit_once(':') {
            Some((addr, port)) => (addr.parse().map_err(|_| bad("bad host address"))?, port),
            None => (std::net::IpAddr::from([127, 0, 0, 1]), host),
        };
        let port = |p: &str, what: &str| -> Result<u16, ModelError> {
            match p.parse::<u16>() {
                Ok(0) | Err(_) => Err(bad(&format!("bad {what} port"))),
                Ok(v) => Ok(v),
            }
        };
        Ok(PortForward {
            proto,
            host_addr,
            host_port: port(host_port, "host")?,
            guest_port: port(guest, "guest")?,
        })
    }
}
impl TryFrom<String> for PortForward {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}
impl From<PortForward> for String {
    fn from(p: PortForward) -> String {
        p.to_string()
    }
}
impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        let addr = match self.host_addr {
            std::net::IpAddr::V6(a) => format!("[{a}]"),
            std::net::IpAddr::V4(a) => a.to_string(),
        };
        write!(f, "{proto}:{addr}:{}-:{}", self.host_port, self.guest_port)
    }
}

/// Accelerator choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware KVM.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(format!("unknown accelerator {s:?}: use kvm or tcg")),
        }
    }
}
impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// A disk as asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Id within the VM (default `disk0`, `disk1`, ...). Visible in the guest as the disk serial.
    #[serde(default)]
    pub id: Option<String>,
    /// Create a new qcow2 of this size (`10G`).
    #[serde(default)]
    pub size: Option<String>,
    /// Attach this existing image (qcow2 or raw) instead.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub image: Option<PathBuf>,
    /// Or: a thin copy of this imported image (`drover image import`), owned by the VM; `size`
    /// may grow it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Attach read-only.
    #[serde(default)]
    pub readonly: bool,
}

impl FromStr for DiskSpec {
    type Err = ModelError;
    /// `size=10G[,id=data][,ro]` or `image=/path[,id=os]` or just `10G`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut spec = DiskSpec {
            id: None,
            size: None,
            image: None,
            from: None,
            readonly: false,
        };
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("id", v)) => spec.id = Some(v.to_string()),
                Some(("size", v)) => spec.size = Some(v.to_string()),
                Some(("image", v)) => spec.image = Some(PathBuf::from(v)),
                Some(("from", v)) => spec.from = Some(v.to_string()),
                None if part == "ro" || part == "readonly" => spec.readonly = true,
                None if spec.size.is_none() && spec.image.is_none() => {
                    spec.size = Some(part.to_string())
                }
                _ => {
                    return Err(ModelError::BadDisk {
                        id: "?".into(),
                        reason: format!(
                            "cannot read {part:?} in {s:?} (form: size=10G[,id=data][,ro], image=/path[,id=os] or from=IMAGE[,size=20G][,id=os])"
                        ),
                    })
                }
            }
        }
        Ok(spec)
    }
}

/// A NIC as asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// Id within the VM (default `net0`, `net1`, ...).
    #[serde(default)]
    pub id: Option<String>,
    /// MAC address; assigned when absent.
    #[serde(default)]
    pub mac: Option<String>,
    /// Attach to this existing tap device instead of user-mode networking.
    #[serde(default)]
    pub tap: Option<String>,
    /// User-mode port forwards, `tcp:127.0.0.1:2222-:22`.
    #[serde(default)]
    pub forward: Vec<String>,
}

impl FromStr for NicSpec {
    type Err = ModelError;
    /// `user[,id=net0][,mac=..][,forward=tcp:2222-:22]...` or `tap=tap0[,id=..]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut spec = NicSpec {
            id: None,
            mac: None,
            tap: None,
            forward: Vec::new(),
        };
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("id", v)) => spec.id = Some(v.to_string()),
                Some(("mac", v)) => spec.mac = Some(v.to_string()),
                Some(("tap", v)) => spec.tap = Some(v.to_string()),
                Some(("forward", v)) | Some(("hostfwd", v)) => spec.forward.push(v.to_string()),
                None if part == "user" || part.is_empty() => {}
                _ => {
                    return Err(ModelError::BadNic {
                        id: "?".into(),
                        reason: format!(
                            "cannot read {part:?} in {s:?} (form: user[,id=net0][,mac=52:54:00:..][,forward=tcp:2222-:22] or tap=NAME[,id=..])"
                        ),
                    })
                }
            }
        }
        Ok(spec)
    }
}

/// What the VM boots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BootSpec {
    /// A kernel (ELF vmlinux or bzImage); the default guest image when absent.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub kernel: Option<PathBuf>,
    /// Its initrd.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line (appended to the tuned default for the default image).
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Boot from this disk id with firmware (SeaBIOS) instead of a kernel.
    #[serde(default)]
    pub disk: Option<String>,
}

/// A VM as an operator asks for it: from `drover vm create` flags or a TOML file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// VM name.
    pub name: String,
    /// vCPUs (default 1).
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Memory, e.g. `512M` (default).
    #[serde(default = "default_memory")]
    pub memory: String,
    /// Disks, in the order the guest sees them (vda, vdb, ...).
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskSpec>,
    /// NICs.
    #[serde(default, rename = "nic")]
    pub nics: Vec<NicSpec>,
    /// Boot source.
    #[serde(default)]
    pub boot: BootSpec,
    /// Force an accelerator for this VM (the host decides when absent).
    #[serde(default)]
    pub accel: Option<Accel>,
    /// Allow memory hot-plug up to this size (`4G`); off when absent, since it slows boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<String>,
    /// A NoCloud seed disk (`cidata`) for the guest: hostname, SSH keys, user-data, network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<SeedSpec>,
    /// A thin copy of this imported image (`drover image list`) as the root disk: the first
    /// disk, id `root`, owned by the VM; and, when the image records them (an image made by
    /// `drover image build --distro`), its kernel, initrd and command line unless `boot` names
    /// others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_image: Option<String>,
}

/// What goes into a VM's NoCloud seed (made by droverd at create, attached read-only as the
/// last disk). The hostname is the VM's name; the network config matches every NIC by MAC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SeedSpec {
    /// `authorized_keys` lines for root (or cloud-init's default user).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    /// The user's own user-data (`#cloud-config ...`), verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
}

fn default_cpus() -> u32 {
    1
}
fn default_memory() -> String {
    "512M".to_string()
}

impl VmSpec {
    /// A spec with defaults for everything but the name.
    pub fn named(name: &str) -> Self {
        VmSpec {
            name: name.to_string(),
            cpus: default_cpus(),
            memory: default_memory(),
            disks: Vec::new(),
            nics: Vec::new(),
            boot: BootSpec::default(),
            accel: None,
            max_memory: None,
            seed: None,
            from_image: None,
        }
    }

    /// Read a spec from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ModelError> {
        toml::from_str(text).map_err(|e| ModelError::Toml(e.to_string()))
    }

    /// Check everything that does not need the host; returns the checked pieces.
    pub fn validate(&self) -> Result<ValidSpec, ModelError> {
        let name = VmName::new(&self.name)?;
        if self.cpus == 0 || self.cpus > MAX_VCPUS {
            return Err(ModelError::BadCpus(self.cpus));
        }
        let memory = parse_size(&self.memory)?;
        if memory < MIN_MEMORY || !memory.is_multiple_of(1 << 20) {
            return Err(ModelError::BadMemory(self.memory.clone()));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ModelError::TooMany {
                what: "disks",
                count: self.disks.len(),
                max: MAX_DISKS,
            });
        }
        if self.nics.len() > MAX_NICS {
            return Err(ModelError::TooMany {
                what: "NICs",
                count: self.nics.len(),
                max: MAX_NICS,
            });
        }
        let mut ids = std::collections::BTreeSet::new();
        let mut disks = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            let id = ElementId::new(d.id.as_deref().unwrap_or(&format!("disk{i}")))?;
            if !ids.insert(id.clone()) {
                return Err(ModelError::DuplicateId(id.to_string()));
            }
            let bad = |reason: &str| ModelError::BadDisk {
                id: id.to_string(),
                reason: reason.to_string(),
            };
            let size = |size: &str| -> Result<u64, ModelError> {
                let bytes = parse_size(size)?;
                if !(MIN_DISK_SIZE..=MAX_DISK_SIZE).contains(&bytes) {
                    return Err(bad(&format!(
                        "size {size} is out of range ({} to {})",
                        format_size(MIN_DISK_SIZE),
                        format_size(MAX_DISK_SIZE)
                    )));
                }
                Ok(bytes)
            };
            if let Some(name) = &d.from {
                if d.image.is_some() {
                    return Err(bad("give either image or from, not both"));
                }
                if !valid_image_name(name) {
                    return Err(bad(&format!(
                        "image name {name:?}: 1-64 characters of a-z, 0-9, '.', '_', '-'"
                    )));
                }
                let grow = d.size.as_deref().map(size).transpose()?;
                disks.push((
                    id,
                    DiskSource::FromImage {
                        name: name.clone(),
                        size: grow,
                    },
                    d.readonly,
                ));
                continue;
            }
            let source = match (&d.size, &d.image) {
                (Some(s), None) => DiskSource::Create { size: size(s)? },
                (None, Some(path)) => {
                    if !path.is_absolute() {
                        return Err(bad("image path must be absolute"));
                    }
                    DiskSource::Image { path: path.clone() }
                }
                (Some(_), Some(_)) => return Err(bad("give either size or image, not both")),
                (None, None) => return Err(bad("give a size (to create) or an image (to attach)")),
            };
            disks.push((id, source, d.readonly));
        }
        let mut nics = Vec::new();
        for (i, n) in self.nics.iter().enumerate() {
            let id = ElementId::new(n.id.as_deref().unwrap_or(&format!("net{i}")))?;
            if !ids.insert(id.clone()) {
                return Err(ModelError::DuplicateId(id.to_string()));
            }
            let mac = n.mac.as_deref().map(str::parse::<MacAddr>).transpose()?;
            if n.forward.len() > MAX_FORWARDS {
                return Err(ModelError::TooMany {
                    what: "port forwards",
                    count: n.forward.len(),
                    max: MAX_FORWARDS,
                });
            }
            let forwards = n
                .forward
                .iter()
                .map(|f| f.parse::<PortForward>())
                .collect::<Result<Vec<_>, _>>()?;
            let backend = match &n.tap {
                Some(tap) => {
                    if !forwards.is_empty() {
                        return Err(ModelError::BadNic {
                            id: id.to_string(),
                            reason: "port forwards need user-mode networking, not a tap".into(),
                        });
                    }
                    if tap.is_empty()
                        || tap.len() > 15
                        || !tap
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    {
                        return Err(ModelError::BadNic {
                            id: id.to_string(),
                            reason: format!("invalid tap name {tap:?}"),
                        });
                    }
                    NicBackend::Tap {
                        ifname: tap.clone(),
                    }
                }
                None => NicBackend::User { forwards },
            };
            nics.push((id, mac, backend));
        }
        if let Some(disk) = &self.boot.disk {
            if self.boot.kernel.is_some() {
                return Err(ModelError::BadBoot(
                    "give a kernel or a boot disk, not both".into(),
                ));
            }
            if !disks.iter().any(|(id, _, _)| id.as_str() == disk) {
                return Err(ModelError::BadBoot(format!(
                    "boot disk {disk:?} is not one of the VM's disks"
                )));
            }
        }
        if self.boot.initrd.is_some() && self.boot.kernel.is_none() {
            return Err(ModelError::BadBoot("an initrd needs a kernel".into()));
        }
        for p in [&self.boot.kernel, &self.boot.initrd].into_iter().flatten() {
            if !p.is_absolute() {
                return Err(ModelError::BadBoot(format!(
                    "path {} must be absolute",
                    p.display()
                )));
            }
        }
        if let Some(cmdline) = &self.boot.cmdline {
            if cmdline.len() > 2048 || cmdline.contains('\n') {
                return Err(ModelError::BadBoot(
                    "cmdline must be one line of at most 2048 bytes".into(),
                ));
            }
        }
        let max_memory = match &self.max_memory {
            None => None,
            Some(m) => {
                let max = parse_size(m)?;
                if max < memory || !max.is_multiple_of(1 << 20) {
                    return Err(ModelError::BadMemory(format!(
                        "max_memory {m} (it must be at least the memory size, in whole MiB)"
                    )));
                }
                Some(max)
            }
        };
        Ok(ValidSpec {
            name,
            cpus: self.cpus,
            memory,
            max_memory,
            disks,
            nics,
        })
    }
}

/// A checked spec: what the host needs to resolve it into a [`VmConfig`].
#[derive(Debug, Clone)]
pub struct ValidSpec {
    /// Name.
    pub name: VmName,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// Memory hot-plug limit in bytes.
    pub max_memory: Option<u64>,
    /// Disks: id, where it comes from, read-only.
    pub disks: Vec<(ElementId, DiskSource, bool)>,
    /// NICs: id, MAC if given, backend.
    pub nics: Vec<(ElementId, Option<MacAddr>, NicBackend)>,
}

/// Where a disk comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// A new qcow2 of this many bytes, owned by the VM.
    Create {
        /// Bytes.
        size: u64,
    },
    /// An existing image, owned by the operator.
    Image {
        /// Absolute path.
        path: PathBuf,
    },
    /// A thin copy (a qcow2 overlay, owned by the VM) of an imported image.
    FromImage {
        /// The image's name (`drover image list`).
        name: String,
        /// Grow to this many bytes (default: the image's size).
        size: Option<u64>,
    },
}

/// Whether `name` can name an imported image: 1-64 of a-z, 0-9, '.', '_', '-', not starting
/// with '.' or '-'.
pub fn valid_image_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

/// Disk image formats Drover attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// qcow2.
    Qcow2,
    /// raw.
    Raw,
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        })
    }
}

/// A resolved disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DiskConfig {
    /// Id; the guest sees it as the disk's serial (`/sys/block/vdX/serial`).
    pub id: ElementId,
    /// Absolute path of the image.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// Virtual size in bytes.
    pub size: u64,
    /// Attached read-only.
    pub readonly: bool,
    /// Created by Drover and deleted with the VM (operator images are never deleted).
    pub owned: bool,
    /// The imported image this disk is a thin copy of (its backing file, never written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Place in the guest's disk order (vda, vdb, ...): `disks` is sorted by it, each disk has its
    /// own, gaps are allowed. Stored so the order survives when a config is rebuilt from its
    /// elements (diffs, composition); 0 in configs written before it existed, see
    /// [`VmConfig::normalize`].
    #[serde(default)]
    pub index: u32,
    /// Hot-plug port the disk sits on when it was hot-plugged (kept on later boots, so the guest
    /// finds it where it was); None when cold-plugged on the root bus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u8>,
    /// PCI slot on the root bus of a cold-plugged disk, recorded once ([`VmConfig::pin_pci`]) so
    /// the guest's name for it never depends on the other devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<u8>,
}

impl DiskConfig {
    /// A disk not placed yet (index 0, no hot-plug port or PCI address: placed when the config
    /// is normalized or the disk is plugged), with no imported base.
    pub fn unplaced(
        id: ElementId,
        path: PathBuf,
        format: DiskFormat,
        size: u64,
        readonly: bool,
        owned: bool,
    ) -> DiskConfig {
        DiskConfig {
            id,
            path,
            format,
            size,
            readonly,
            owned,
            base: None,
            index: 0,
            slot: None,
            addr: None,
        }
    }
}

/// How a NIC reaches the world.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum NicBackend {
    /// QEMU user-mode networking (NAT) with optional port forwards.
    User {
        /// Forwards from the host into the guest.
        forwards: Vec<PortForward>,
    },
    /// An existing tap device (no vhost on these hosts).
    Tap {
        /// Interface name.
        ifname: String,
    },
}

/// A resolved NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NicConfig {
    /// Id.
    pub id: ElementId,
    /// MAC address.
    pub mac: MacAddr,
    /// Backend.
    pub backend: NicBackend,
    /// Hot-plug port the NIC sits on when it was hot-plugged (kept on later boots, so the guest
    /// names it as before); None when cold-plugged on the root bus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u8>,
    /// PCI slot on the root bus of a cold-plugged NIC (`enp0s<addr>` in a systemd guest),
    /// recorded once ([`VmConfig::pin_pci`]) so adding a disk never renames it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<u8>,
}

/// A resolved boot source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Boot {
    /// Drover's default guest image (current build at start time), with extra cmdline.
    Default {
        /// Appended to the image's command line.
        #[serde(default)]
        cmdline: Option<String>,
    },
    /// A given kernel and initrd.
    Kernel {
        /// Kernel path.
        #[cfg_attr(feature = "openapi", schema(value_type = String))]
        kernel: PathBuf,
        /// Initrd path.
        #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
        initrd: Option<PathBuf>,
        /// Full command line.
        cmdline: Option<String>,
    },
    /// Firmware boot from a disk.
    Disk {
        /// Disk id.
        disk: ElementId,
    },
}

/// A VM's resolved configuration: what droverd stores and boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VmConfig {
    /// Name.
    pub name: VmName,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// Disks in guest order.
    pub disks: Vec<DiskConfig>,
    /// NICs.
    pub nics: Vec<NicConfig>,
    /// Boot source.
    pub boot: Boot,
    /// Accelerator forced for this VM.
    #[serde(default)]
    pub accel: Option<Accel>,
    /// Memory hot-plug limit; None disables memory hot-plug (its ACPI set-up slows boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<u64>,
}

/// First root-bus PCI slot given to a disk or NIC. Slots 1-4 held the hot-plug root ports and 5
/// the guest channel before addresses were recorded, and disks then NICs followed in order: a
/// config written then gets the addresses it booted with ([`VmConfig::pin_pci`]).
pub const PCI_FIRST_DEVICE_ADDR: u8 = 6;
/// Last root-bus PCI slot a device may take (q35 keeps 0x1f for its ICH9 functions).
pub const PCI_LAST_ADDR: u8 = 0x1e;

impl VmConfig {
    /// Give every cold-plugged disk and NIC without a recorded PCI slot the first free slot
    /// after the highest one in use (wrapping to the first free one when none is left after it):
    /// disks in guest order, then NICs. Deterministic, and a no-op once every device has one, so
    /// it runs before every change and at every boot: a device keeps its slot whatever is added
    /// or removed beside it. A config without any recorded slot gets exactly the layout it
    /// booted with before slots were recorded. A device on a hot-plug port keeps its port.
    pub fn pin_pci(&mut self) {
        let mut used: std::collections::BTreeSet<u8> = self
            .disks
            .iter()
            .filter_map(|d| d.addr)
            .chain(self.nics.iter().filter_map(|n| n.addr))
            .collect();
        let mut next = used
            .last()
            .map_or(PCI_FIRST_DEVICE_ADDR, |a| a.saturating_add(1))
            .max(PCI_FIRST_DEVICE_ADDR);
        let mut take = |used: &mut std::collections::BTreeSet<u8>| {
            let free = (next..=PCI_LAST_ADDR)
                .chain(PCI_FIRST_DEVICE_ADDR..next.min(PCI_LAST_ADDR + 1))
                .find(|a| !used.contains(a))?;
            used.insert(free);
            next = free.saturating_add(1);
            Some(free)
        };
        for d in self.disks.iter_mut() {
            if d.slot.is_none() && d.addr.is_none() {
                d.addr = take(&mut used);
            }
        }
        for n in self.nics.iter_mut() {
            if n.slot.is_none() && n.addr.is_none() {
                n.addr = take(&mut used);
            }
        }
    }

    /// This config with [`VmConfig::pin_pci`] applied.
    pub fn pinned(&self) -> VmConfig {
        let mut c = self.clone();
        c.pin_pci();
        c
    }
}

impl BootSpec {
    /// Resolve the boot section (already validated by [`VmSpec::validate`]).
    pub fn resolve(&self) -> Result<Boot, ModelError> {
        Ok(match (&self.kernel, &self.disk) {
            (Some(kernel), _) => Boot::Kernel {
                kernel: kernel.clone(),
                initrd: self.initrd.clone(),
                cmdline: self.cmdline.clone(),
            },
            (None, Some(disk)) => Boot::Disk {
                disk: ElementId::new(disk)?,
            },
            (None, None) => Boot::Default {
                cmdline: self.cmdline.clone(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(VmName::new("web-1").is_ok());
        assert!(VmName::new("1abc").is_ok());
        for bad in [
            "",
            "-a",
            "a-",
            "Web",
            "a_b",
            "a.b",
            &"a".repeat(64),
            "a b",
            "ä",
        ] {
            assert!(VmName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn forwards() {
        let f: PortForward = "tcp:127.0.0.1:2222-:22".parse().unwrap();
        assert_eq!((f.host_port, f.guest_port, f.proto), (2222, 22, Proto::Tcp));
        let f: PortForward = "8080-:80".parse().unwrap();
        assert_eq!(f.host_addr.to_string(), "127.0.0.1");
        let f: PortForward = "udp:0.0.0.0:53-:53".parse().unwrap();
        assert_eq!(f.proto, Proto::Udp);
        assert_eq!(f.to_string().parse::<PortForward>().unwrap(), f);
        for bad in ["", "22", "0-:22", "tcp:x:1-:2", "1-:70000"] {
            assert!(bad.parse::<PortForward>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn macs() {
        let m: MacAddr = "52:54:00:ab:cd:ef".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        assert!("01:00:5e:00:00:01".parse::<MacAddr>().is_err(), "multicast");
        assert!("52:54:00:ab:cd".parse::<MacAddr>().is_err());
        assert!("52:54:00:ab:cd:zz".parse::<MacAddr>().is_err());
    }

    #[test]
    fn toml_spec() {
        let spec = VmSpec::from_toml(
            r#"
            name = "web1"
            cpus = 2
            memory = "1G"
            [[disk]]
            id = "data"
            size = "2G"
            [[nic]]
            forward = ["tcp:2222-:22"]
            "#,
        )
        .unwrap();
        let v = spec.validate().unwrap();
        assert_eq!(v.memory, 1 << 30);
        assert_eq!(v.disks[0].1, DiskSource::Create { size: 2 << 30 });
        assert_eq!(v.nics[0].0.as_str(), "net0");
        assert!(VmSpec::from_toml("name = \"x\"\nbogus = 1").is_err());
    }

    #[test]
    fn bad_specs() {
        let mut s = VmSpec::named("a");
        s.cpus = 0;
        assert_eq!(s.validate().unwrap_err(), ModelError::BadCpus(0));
        let mut s = VmSpec::named("a");
        s.memory = "1M".into();
        assert!(matches!(s.validate(), Err(ModelError::BadMemory(_))));
        let mut s = VmSpec::named("a");
        s.disks = vec![
            "size=1G,id=x".parse().unwrap(),
            "size=1G,id=x".parse().unwrap(),
        ];
        assert_eq!(
            s.validate().unwrap_err(),
            ModelError::DuplicateId("x".into())
        );
        let mut s = VmSpec::named("a");
        s.disks = vec!["image=relative.qcow2".parse().unwrap()];
        assert!(matches!(s.validate(), Err(ModelError::BadDisk { .. })));
        let mut s = VmSpec::named("a");
        s.boot.disk = Some("nope".into());
        assert!(matches!(s.validate(), Err(ModelError::BadBoot(_))));
        assert!("size=1G,bogus".parse::<DiskSpec>().is_err());
        assert!("user,bogus=1".parse::<NicSpec>().is_err());
    }

    #[test]
    fn disk_and_nic_flags() {
        let d: DiskSpec = "2G".parse().unwrap();
        assert_eq!(d.size.as_deref(), Some("2G"));
        let d: DiskSpec = "image=/x.qcow2,id=os,ro".parse().unwrap();
        assert!(d.readonly && d.id.as_deref() == Some("os"));
        let n: NicSpec = "user,forward=tcp:2222-:22,forward=8080-:80"
            .parse()
            .unwrap();
        assert_eq!(n.forward.len(), 2);
    }
}
