//! Whether a VM's platform fits a QEMU: for a migration to another host and for loading a saved
//! state. Decided from the probes (`host info`) before anything changes, so an incompatible
//! pair is refused with the reason instead of failing halfway in QEMU.
//!
//! QEMU loads a migration stream or state only into the same machine type and a CPU model with
//! the same features. A pinned VM (`pc-q35-7.2`, `Westmere`) fits every QEMU that has both, so
//! 7.2 → 10.0 works and 10.0 → 7.2 does not (7.2 has no `pc-q35-10.0`). An unpinned VM (created
//! before pinning: `q35`, `-cpu max`) fits only a QEMU where those aliases mean the same.

use drover_api::{QemuFacts, SavedOn};
use drover_model::Platform;

/// `7.2` of `7.2.22`.
fn release(version: &str) -> &str {
    match version.match_indices('.').nth(1) {
        Some((i, _)) => &version[..i],
        None => version,
    }
}

/// What `q35` means on a host.
fn q35(f: &QemuFacts) -> Option<&str> {
    f.machine_aliases.get("q35").map(String::as_str)
}

/// Can VM `vm` with `platform` move from this host (`src`, its probe) to host `to` (`dst`)?
/// `live`: its running state moves (live migration) rather than only its disks and records.
/// `tcg`: it runs under TCG, where the CPU model matters (KVM passes the host CPU through).
pub fn check_migration(
    vm: &str,
    platform: &Platform,
    src: Option<&QemuFacts>,
    dst: Option<&QemuFacts>,
    to: &str,
    live: bool,
    tcg: bool,
) -> Result<(), String> {
    let Some(dst) = dst else {
        // A destination that could not probe its QEMU (or predates the probe) runs VMs as
        // before pinning; only an unpinned VM can be sure to mean the same there.
        return match (&platform.machine, live) {
            (Some(m), _) => Err(format!(
                "{to} does not report what its QEMU can do, so VM {vm}'s machine type {m} cannot \
                 be checked there; upgrade droverd on {to} (or check its QEMU runs) and try again"
            )),
            (None, _) => Ok(()),
        };
    };
    let theirs = format!("{to}'s QEMU {}", dst.version);
    match &platform.machine {
        Some(m) if !dst.machines.contains(m) => {
            return Err(format!(
                "VM {vm} is pinned to machine type {m}, which {theirs} does not have (its newest \
                 is {}); a QEMU loads only machine types of its own version or older: move it \
                 to a host with a newer QEMU",
                q35(dst).unwrap_or("unknown")
            ))
        }
        Some(_) => {}
        None if live => {
            let here = src.and_then(q35);
            if here.is_none() || here != q35(dst) {
                return Err(format!(
                    "VM {vm} was created before Drover pinned machine types: its q35 is {} here \
                     but {} on {to}, and QEMU cannot load one into the other; stop it and move \
                     it with --offline (it boots there on {to}'s q35), or migrate it between \
                     hosts with the same QEMU version",
                    here.unwrap_or("unknown"),
                    q35(dst).unwrap_or("unknown")
                ));
            }
        }
        None => {}
    }
    if !tcg {
        return Ok(());
    }
    match &platform.cpu {
        Some(cpu) => {
            let model = platform.cpu_model();
            if !dst.cpu_models.iter().any(|c| c == model) {
                return Err(format!(
                    "VM {vm} is pinned to CPU model {cpu}, which {theirs} cannot run under its \
                     accelerator; move it to a host that lists {model} in `drover host info`"
                ));
            }
        }
        None if live => {
            let here = src.map(|s| release(&s.version)).unwrap_or("unknown");
            if here != release(&dst.version) {
                return Err(format!(
                    "VM {vm} was created before Drover pinned CPU models and runs -cpu max, whose \
                     features differ between QEMU {here} (here) and {} ({to}); stop it and move it \
                     with --offline, or migrate it between hosts with the same QEMU version",
                    release(&dst.version)
                ));
            }
        }
        None => {}
    }
    Ok(())
}

/// Can state `state` (saved on `saved`) load into this host's QEMU (`here`)? States saved
/// before this was recorded are loaded as before.
pub fn check_restore(
    state: &str,
    saved: Option<&SavedOn>,
    here: Option<&QemuFacts>,
) -> Result<(), String> {
    let (Some(saved), Some(here)) = (saved, here) else {
        return Ok(());
    };
    if !here.machines.contains(&saved.machine) {
        return Err(format!(
            "state {state} was saved on QEMU {} with machine type {}, which this host's QEMU {} \
             does not have; restore it on a host with QEMU {} or newer",
            saved.qemu_version,
            saved.machine,
            here.version,
            release(&saved.qemu_version)
        ));
    }
    if saved.ram_stream.as_deref() == Some("mapped-ram")
        && !here
            .migration_capabilities
            .iter()
            .any(|c| c == "mapped-ram")
    {
        return Err(format!(
            "state {state} was saved with mapped-ram (QEMU {}), which this host's QEMU {} cannot \
             read; restore it on a host with QEMU 9.0 or newer",
            saved.qemu_version, here.version
        ));
    }
    if saved.cpu == "max" {
        if release(&saved.qemu_version) != release(&here.version) {
            return Err(format!(
                "state {state} was saved on QEMU {} with -cpu max, whose features differ on this \
                 host's QEMU {}; restore it on a host with QEMU {}",
                saved.qemu_version,
                here.version,
                release(&saved.qemu_version)
            ));
        }
    } else {
        let model = saved.cpu.split(',').next().unwrap_or(&saved.cpu);
        if !here.cpu_models.iter().any(|c| c == model) {
            return Err(format!(
                "state {state} was saved with CPU model {}, which this host's QEMU {} cannot run",
                saved.cpu, here.version
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(version: &str, newest: &str) -> QemuFacts {
        let mut machines: Vec<String> = ["pc-q35-7.1", "pc-q35-7.2"].map(String::from).to_vec();
        if newest != "pc-q35-7.2" {
            machines.extend(["pc-q35-9.2", newest].map(String::from));
        }
        QemuFacts {
            version: version.into(),
            machines,
            machine_aliases: [("q35".to_string(), newest.to_string())].into(),
            cpu_models: ["Westmere", "max", "qemu64"].map(String::from).to_vec(),
            ..Default::default()
        }
    }

    fn pinned(machine: &str) -> Platform {
        Platform {
            machine: Some(machine.into()),
            cpu: Some("Westmere".into()),
            ram_pad: true,
        }
    }

    #[test]
    fn pinned_vms_move_up_not_down() {
        let (v7, v10) = (
            facts("7.2.22", "pc-q35-7.2"),
            facts("10.0.2", "pc-q35-10.0"),
        );
        let up = check_migration(
            "w",
            &pinned("pc-q35-7.2"),
            Some(&v7),
            Some(&v10),
            "h2",
            true,
            true,
        );
        assert_eq!(up, Ok(()));
        let down = check_migration(
            "w",
            &pinned("pc-q35-10.0"),
            Some(&v10),
            Some(&v7),
            "h1",
            true,
            true,
        )
        .unwrap_err();
        assert!(
            down.contains("pc-q35-10.0") && down.contains("h1's QEMU 7.2.22"),
            "{down}"
        );
        let mut odd = pinned("pc-q35-7.2");
        odd.cpu = Some("Haswell,-pcid".into());
        let cpu = check_migration("w", &odd, Some(&v7), Some(&v10), "h2", true, true).unwrap_err();
        assert!(cpu.contains("Haswell"), "{cpu}");
        assert_eq!(
            check_migration("w", &odd, Some(&v7), Some(&v10), "h2", true, false),
            Ok(()),
            "KVM passes the host CPU through"
        );
    }

    #[test]
    fn unpinned_vms_move_live_only_between_equal_versions() {
        let (v7, v10) = (
            facts("7.2.22", "pc-q35-7.2"),
            facts("10.0.2", "pc-q35-10.0"),
        );
        let old = Platform::default();
        let e = check_migration("w", &old, Some(&v7), Some(&v10), "h2", true, true).unwrap_err();
        assert!(
            e.contains("q35 is pc-q35-7.2 here but pc-q35-10.0 on h2"),
            "{e}"
        );
        assert_eq!(
            check_migration("w", &old, Some(&v7), Some(&v7.clone()), "h2", true, true),
            Ok(())
        );
        assert_eq!(
            check_migration("w", &old, Some(&v7), Some(&v10), "h2", false, true),
            Ok(()),
            "offline it boots fresh"
        );
        let mut same_machine = old.clone();
        same_machine.machine = Some("pc-q35-7.2".into());
        let e = check_migration("w", &same_machine, Some(&v7), Some(&v10), "h2", true, true)
            .unwrap_err();
        assert!(
            e.contains("-cpu max") && e.contains("7.2") && e.contains("10.0"),
            "{e}"
        );
        assert!(check_migration(
            "w",
            &pinned("pc-q35-7.2"),
            Some(&v7),
            None,
            "h2",
            true,
            true
        )
        .is_err());
        assert_eq!(
            check_migration("w", &old, Some(&v7), None, "h2", true, true),
            Ok(())
        );
    }

    #[test]
    fn states_load_where_their_machine_exists() {
        let (v7, v10) = (
            facts("7.2.22", "pc-q35-7.2"),
            facts("10.0.2", "pc-q35-10.0"),
        );
        let on = |q: &str, m: &str, cpu: &str| SavedOn {
            qemu_version: q.into(),
            machine: m.into(),
            cpu: cpu.into(),
            ram_stream: None,
        };
        assert_eq!(
            check_restore(
                "s1",
                Some(&on("7.2.22", "pc-q35-7.2", "Westmere")),
                Some(&v10)
            ),
            Ok(())
        );
        let e = check_restore(
            "s1",
            Some(&on("10.0.2", "pc-q35-10.0", "Westmere")),
            Some(&v7),
        )
        .unwrap_err();
        assert!(e.contains("QEMU 10.0 or newer"), "{e}");
        let e =
            check_restore("s1", Some(&on("7.2.22", "pc-q35-7.2", "max")), Some(&v10)).unwrap_err();
        assert!(e.contains("-cpu max"), "{e}");
        assert_eq!(
            check_restore("s1", Some(&on("7.2.9", "pc-q35-7.2", "max")), Some(&v7)),
            Ok(())
        );
        assert_eq!(check_restore("s1", None, Some(&v7)), Ok(()));
        let mut mapped = on("10.0.2", "pc-q35-7.2", "Westmere");
        mapped.ram_stream = Some("mapped-ram".into());
        let e = check_restore("s1", Some(&mapped), Some(&v7)).unwrap_err();
        assert!(e.contains("mapped-ram"), "{e}");
        let mut v10m = v10.clone();
        v10m.migration_capabilities = vec!["mapped-ram".into()];
        assert_eq!(check_restore("s1", Some(&mapped), Some(&v10m)), Ok(()));
        assert_eq!(release("10.0.2"), "10.0");
        assert_eq!(release("7"), "7");
    }
}
