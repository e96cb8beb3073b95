//! The emulated machine a VM is pinned to: what a saved state or a migration stream must match.
//!
//! QEMU loads a state only into the same machine type and a CPU model with the same features.
//! Its aliases move with its version (`q35` is `pc-q35-7.2` on QEMU 7.2 and `pc-q35-10.0` on
//! 10.0; `-cpu max` gains features), so a VM records the versioned names at create and uses them
//! for every boot, save, restore and migration. Records from before this existed deserialize to
//! [`Platform::default`], which means exactly what such VMs had: `q35`, `-cpu max`, padded RAM.

use serde::{Deserialize, Serialize};

/// A VM's machine type, CPU model and RAM layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Platform {
    /// Versioned machine type (`pc-q35-7.2`); `None`: QEMU's `q35` alias, whatever it means
    /// for the QEMU that runs the VM (VMs created before machine types were pinned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// Named CPU model under TCG (`Westmere`, possibly with `,-feature` flags); `None`: `max`
    /// (VMs created before CPU models were pinned). Under KVM the host CPU is passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Guest RAM is 8 KiB larger than configured (a workaround for QEMU < 9; see
    /// `drover_qemu::cmdline::RAM_PAD`). Part of the platform because the RAM size must be the
    /// same wherever the VM's state is loaded. Default `true`: what older records had.
    #[serde(default = "yes")]
    pub ram_pad: bool,
}

fn yes() -> bool {
    true
}

impl Default for Platform {
    /// The platform of a VM recorded before platforms existed.
    fn default() -> Self {
        Platform {
            machine: None,
            cpu: None,
            ram_pad: true,
        }
    }
}

impl Platform {
    /// The machine type as given to QEMU's `-machine`.
    pub fn machine_arg(&self) -> &str {
        self.machine.as_deref().unwrap_or("q35")
    }

    /// The CPU model as given to QEMU's `-cpu` under TCG.
    pub fn cpu_arg(&self) -> &str {
        self.cpu.as_deref().unwrap_or("max")
    }

    /// The CPU model's name without its feature flags (`Westmere` of `Westmere,-x2apic`).
    pub fn cpu_model(&self) -> &str {
        self.cpu_arg().split(',').next().unwrap_or("max")
    }

    /// Whether both the machine type and the CPU model are pinned to versioned names.
    pub fn is_pinned(&self) -> bool {
        self.machine.is_some() && self.cpu.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_records_mean_what_they_meant() {
        let p: Platform = serde_json::from_str("{}").unwrap();
        assert_eq!(p, Platform::default());
        assert_eq!(p.machine_arg(), "q35");
        assert_eq!(p.cpu_arg(), "max");
        assert!(p.ram_pad && !p.is_pinned());
        let pinned = Platform {
            machine: Some("pc-q35-7.2".into()),
            cpu: Some("Westmere,-x2apic".into()),
            ram_pad: false,
        };
        let back: Platform =
            serde_json::from_str(&serde_json::to_string(&pinned).unwrap()).unwrap();
        assert_eq!(back, pinned);
        assert_eq!(back.cpu_model(), "Westmere");
        assert!(back.is_pinned());
    }
}
