//! Devices hot-plugged into a running VM, as its QEMU holds them.
//!
//! A VM grown live (`drover vm set NAME cpus=4 memory=2G`) runs with vCPU and DIMM devices its
//! command line never named. A QEMU that continues it — a restore of its saved state, a live
//! migration's destination — must hold the same devices with the same ids, addresses and order
//! before it loads the state, or QEMU refuses the state (an unknown RAM block, a missing CPU).
//! [`Plugged`] is that list; the config stays the VM's whole shape, and the command line is
//! built from the config minus what is plugged ([`Plugged::base_cpus`], [`Plugged::base_memory`])
//! plus these devices.

use crate::VmConfig;
use serde::{Deserialize, Serialize};

/// What a running VM has hot-plugged, in the order its QEMU made it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Plugged {
    /// vCPUs beyond the boot ones, in the order QEMU numbered them (its CPU index).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpus: Vec<PluggedCpu>,
    /// Memory DIMMs, in slot order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dimms: Vec<PluggedDimm>,
}

/// One hot-plugged vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PluggedCpu {
    /// Its device id (`vcpu-s1-c0-t0`).
    pub id: String,
    /// The CPU device type (`max-x86_64-cpu`, `Westmere-x86_64-cpu`).
    pub driver: String,
    /// Its topology slot.
    pub socket: u32,
    /// Core within the socket.
    pub core: u32,
    /// Thread within the core.
    pub thread: u32,
}

/// One hot-plugged memory DIMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PluggedDimm {
    /// The id it was plugged with: its device is `dimm-<id>`, its memory `mem-<id>`.
    pub id: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Guest-physical address.
    pub addr: u64,
    /// DIMM slot.
    pub slot: u32,
}

impl Plugged {
    /// Nothing hot-plugged: the command line alone makes the VM.
    pub fn is_empty(&self) -> bool {
        self.cpus.is_empty() && self.dimms.is_empty()
    }

    /// Bytes of memory the DIMMs hold.
    pub fn dimm_bytes(&self) -> u64 {
        self.dimms.iter().map(|d| d.bytes).sum()
    }

    /// The vCPUs the command line boots for `config` (its whole count, less the plugged ones).
    pub fn base_cpus(&self, config: &VmConfig) -> u32 {
        config.cpus.saturating_sub(self.cpus.len() as u32).max(1)
    }

    /// The boot memory for `config` (its whole size, less the DIMMs).
    pub fn base_memory(&self, config: &VmConfig) -> u64 {
        config.memory.saturating_sub(self.dimm_bytes())
    }

    /// Whether this list can continue a VM of `config`'s shape: fewer vCPUs and less memory
    /// plugged than the VM has in all, and ids and types QEMU can take on its command line
    /// (a state's manifest may come from another host). `Err` says what is wrong.
    pub fn check(&self, config: &VmConfig) -> Result<(), String> {
        if self.cpus.len() as u32 >= config.cpus || self.dimm_bytes() >= config.memory {
            return Err(format!(
                "{} plugged vCPUs and {} MiB of DIMMs do not fit a VM of {} vCPUs and {} MiB",
                self.cpus.len(),
                self.dimm_bytes() >> 20,
                config.cpus,
                config.memory >> 20
            ));
        }
        let word = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let names = self.cpus.iter().flat_map(|c| [&c.id, &c.driver]);
        match names
            .chain(self.dimms.iter().map(|d| &d.id))
            .find(|s| !word(s))
        {
            Some(bad) => Err(format!("{bad:?} is not a device name QEMU can be given")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(cpus: u32, memory: u64) -> VmConfig {
        VmConfig {
            name: "a".parse().unwrap(),
            cpus,
            memory,
            disks: Vec::new(),
            nics: Vec::new(),
            boot: crate::Boot::Default { cmdline: None },
            accel: None,
            max_memory: Some(1 << 30),
        }
    }

    fn dimm(id: &str, mib: u64) -> PluggedDimm {
        PluggedDimm {
            id: id.into(),
            bytes: mib << 20,
            addr: 4 << 30,
            slot: 0,
        }
    }

    #[test]
    fn the_boot_shape_is_the_config_less_what_was_plugged() {
        let p = Plugged {
            cpus: vec![PluggedCpu {
                id: "vcpu-s1-c0-t0".into(),
                driver: "max-x86_64-cpu".into(),
                socket: 1,
                core: 0,
                thread: 0,
            }],
            dimms: vec![dimm("m1", 128), dimm("m2", 256)],
        };
        let c = cfg(2, 512 << 20);
        assert_eq!(p.base_cpus(&c), 1);
        assert_eq!(p.base_memory(&c), 128 << 20);
        assert_eq!(p.check(&c), Ok(()));
        // More plugged than the config holds: not this VM's list.
        assert!(p.check(&cfg(1, 512 << 20)).is_err());
        assert!(p.check(&cfg(2, 384 << 20)).is_err());
        assert!(Plugged::default().is_empty());
        assert_eq!(Plugged::default().check(&c), Ok(()));
    }

    #[test]
    fn names_that_would_reach_qemus_command_line_unescaped_are_refused() {
        let c = cfg(2, 512 << 20);
        let mut p = Plugged {
            dimms: vec![dimm("m1,share=on", 128)],
            ..Plugged::default()
        };
        assert!(p.check(&c).unwrap_err().contains("m1,share=on"));
        p.dimms[0].id = "m1".into();
        assert_eq!(p.check(&c), Ok(()));
    }

    #[test]
    fn an_empty_list_is_left_out_of_the_record() {
        assert_eq!(serde_json::to_string(&Plugged::default()).unwrap(), "{}");
        let back: Plugged = serde_json::from_str("{}").unwrap();
        assert!(back.is_empty());
    }
}
