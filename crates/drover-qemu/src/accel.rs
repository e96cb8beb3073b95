//! Accelerator detection.
//!
//! `/dev/kvm` alone proves nothing: on some hosts it comes from a software module (`kvm_pvm`) on
//! which stock Linux guests hang. KVM is used only when a hardware module (`kvm_intel`,
//! `kvm_amd`) is loaded and `/dev/kvm` opens read-write.

use drover_model::Accel;
use std::path::Path;

/// The accelerator chosen for a host, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccelChoice {
    /// What VMs use unless they force one.
    pub accel: Accel,
    /// One sentence for the log and `drover host info`.
    pub reason: String,
}

/// Detect on this host, reading `/sys/module` and `/dev/kvm`.
pub fn detect() -> AccelChoice {
    detect_in(Path::new("/sys/module"), Path::new("/dev/kvm"))
}

/// Detection against given paths (for tests).
pub fn detect_in(sys_module: &Path, dev_kvm: &Path) -> AccelChoice {
    let hw = ["kvm_intel", "kvm_amd"]
        .into_iter()
        .find(|m| sys_module.join(m).exists());
    let soft = ["kvm_pvm"]
        .into_iter()
        .find(|m| sys_module.join(m).exists());
    let openable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev_kvm)
        .is_ok();
    match (hw, openable) {
        (Some(m), true) => AccelChoice {
            accel: Accel::Kvm,
            reason: format!("hardware KVM ({m}) is available"),
        },
        (Some(m), false) => AccelChoice {
            accel: Accel::Tcg,
            reason: format!("{m} is loaded but {} cannot be opened; using TCG (software emulation)", dev_kvm.display()),
        },
        (None, _) => AccelChoice {
            accel: Accel::Tcg,
            reason: match soft {
                Some(m) => format!("{} is provided by {m}, a software layer stock Linux guests cannot run on; using TCG (software emulation)", dev_kvm.display()),
                None if openable => format!("{} exists but no hardware KVM module is loaded; using TCG (software emulation)", dev_kvm.display()),
                None => "no hardware KVM on this host; using TCG (software emulation)".to_string(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_kvm_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("kvm_pvm")).unwrap();
        let kvm = dir.path().join("kvm");
        std::fs::write(&kvm, b"").unwrap();
        let c = detect_in(dir.path(), &kvm);
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("kvm_pvm"), "{}", c.reason);
    }

    #[test]
    fn hardware_kvm_is_used() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("kvm_intel")).unwrap();
        let kvm = dir.path().join("kvm");
        std::fs::write(&kvm, b"").unwrap();
        assert_eq!(detect_in(dir.path(), &kvm).accel, Accel::Kvm);
        assert_eq!(
            detect_in(dir.path(), &dir.path().join("missing")).accel,
            Accel::Tcg
        );
    }
}
