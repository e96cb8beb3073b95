//! Whether a VM's platform fits a QEMU: for a migration to another host and for loading a saved
//! state. Decided from the probes (`host info`) before anything changes, so an incompatible
//! pair is refused with the reason instead of failing halfway in QEMU.
//!
//! QEMU loads a migration stream or state only into the same machine type and a CPU model with
//! the same features. A pinned VM (`pc-q35-7.2`, `Westmere`) fits every QEMU that has both, so
//! 7.2 → 10.0 works and 10.0 → 7.2 does not (7.2 has no `pc-q35-10.0`). An unpinned VM (created
//! before pinning: `q35`, `-cpu max`) fits only a QEMU where those aliases mean the same.

use drover_api::{Difference, QemuFacts, SavedOn, Verdict};
use drover_model::Accel;
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

/// The host a saved state is checked against: its QEMU, accelerator and identity.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// For messages: `this host`, or a remote's name.
    pub name: &'a str,
    /// Its QEMU's probe (absent: it could not probe, or predates the probe).
    pub qemu: Option<&'a QemuFacts>,
    /// The accelerator its VMs run under.
    pub accel: Accel,
    /// Its host id.
    pub host: Option<&'a str>,
}

/// Every aspect of the platform a state was saved on, compared with `target`: what is the same,
/// what a restore there adapts, what blocks it. States saved before the platform was recorded
/// (or a target without a probe) compare as unknown and load as before.
pub fn platform_differences(saved: Option<&SavedOn>, target: &Target) -> Vec<Difference> {
    let d = |what: &str, saved: &str, target: &str, verdict, note: String| Difference {
        what: what.into(),
        saved: saved.into(),
        target: target.into(),
        verdict,
        note,
    };
    let (Some(saved), Some(here)) = (saved, target.qemu) else {
        return vec![d(
            "platform",
            if saved.is_some() {
                "recorded"
            } else {
                "not recorded"
            },
            if target.qemu.is_some() {
                "probed"
            } else {
                "not probed"
            },
            Verdict::Adaptable,
            "the state's platform cannot be compared (saved before it was recorded, or the \
             target does not report its QEMU): it is loaded as before, and QEMU refuses it if it \
             does not fit"
                .into(),
        )];
    };
    let them = target.name;
    let mut out = Vec::new();
    let (sv, tv) = (release(&saved.qemu_version), release(&here.version));
    out.push(if saved.qemu_version == here.version {
        d(
            "qemu",
            &saved.qemu_version,
            &here.version,
            Verdict::Same,
            "the same QEMU".into(),
        )
    } else {
        d(
            "qemu",
            &saved.qemu_version,
            &here.version,
            Verdict::Adaptable,
            format!(
                "another QEMU: it loads the state if it has its machine type and CPU model \
                 (below); QEMU {sv} states load into QEMU {sv} or newer"
            ),
        )
    });
    out.push(if here.machines.contains(&saved.machine) {
        d(
            "machine",
            &saved.machine,
            &saved.machine,
            Verdict::Same,
            format!("{them}'s QEMU has it"),
        )
    } else {
        d(
            "machine",
            &saved.machine,
            q35(here).unwrap_or("unknown"),
            Verdict::Blocking,
            format!(
                "saved on QEMU {} with machine type {}, which {them}'s QEMU {} does not have; \
                 restore it on a host with QEMU {sv} or newer",
                saved.qemu_version, saved.machine, here.version
            ),
        )
    });
    let model = saved.cpu.split(',').next().unwrap_or(&saved.cpu);
    out.push(if saved.cpu == "max" {
        if sv == tv {
            d(
                "cpu-model",
                "max",
                "max",
                Verdict::Same,
                format!("-cpu max means the same on QEMU {tv}"),
            )
        } else {
            d(
                "cpu-model",
                "max",
                "max",
                Verdict::Blocking,
                format!(
                    "saved on QEMU {} with -cpu max, whose features differ on {them}'s QEMU {}; \
                     restore it on a host with QEMU {sv}",
                    saved.qemu_version, here.version
                ),
            )
        }
    } else if here.cpu_models.iter().any(|c| c == model) {
        d(
            "cpu-model",
            &saved.cpu,
            &saved.cpu,
            Verdict::Same,
            format!("{them}'s QEMU has it"),
        )
    } else {
        d(
            "cpu-model",
            &saved.cpu,
            "missing",
            Verdict::Blocking,
            format!(
                "saved with CPU model {}, which {them}'s QEMU {} cannot run",
                saved.cpu, here.version
            ),
        )
    });
    if saved.ram_stream.as_deref() == Some("mapped-ram") {
        let can = here
            .migration_capabilities
            .iter()
            .any(|c| c == "mapped-ram");
        out.push(d(
            "ram-stream",
            "mapped-ram",
            if can { "mapped-ram" } else { "missing" },
            if can {
                Verdict::Same
            } else {
                Verdict::Blocking
            },
            if can {
                format!("{them}'s QEMU reads it")
            } else {
                format!(
                    "saved with mapped-ram (QEMU {}), which {them}'s QEMU {} cannot read; \
                     restore it on a host with QEMU 9.0 or newer",
                    saved.qemu_version, here.version
                )
            },
        ));
    }
    if let Some(a) = saved.accel {
        let (sa, ta) = (a.to_string(), target.accel.to_string());
        out.push(if a == target.accel {
            d(
                "accelerator",
                &sa,
                &ta,
                Verdict::Same,
                "the same accelerator".into(),
            )
        } else {
            d(
                "accelerator",
                &sa,
                &ta,
                Verdict::Blocking,
                format!(
                    "saved under {sa}; {them} runs VMs under {ta}, and a CPU state does not load \
                     across accelerators: restore it on a host with {sa}, or boot the VM there"
                ),
            )
        });
    }
    if let (Some(from), Some(to)) = (saved.host.as_deref(), target.host) {
        out.push(if from == to {
            d(
                "host",
                from,
                to,
                Verdict::Same,
                "the host it was saved on".into(),
            )
        } else {
            d(
                "host",
                from,
                to,
                Verdict::Adaptable,
                "another host: the state and its disk layers move with the VM \
                 (`drover vm migrate NAME --to REMOTE --offline`), and the guest's agent is \
                 told it moved"
                    .into(),
            )
        });
    }
    out
}

/// The blocking ones among `diffs`, as one message naming each (`None`: nothing blocks).
pub fn blocking(state: &str, diffs: &[Difference]) -> Option<String> {
    let why: Vec<&str> = diffs
        .iter()
        .filter(|d| d.verdict == Verdict::Blocking)
        .map(|d| d.note.as_str())
        .collect();
    (!why.is_empty()).then(|| format!("state {state} cannot be restored: {}", why.join("; ")))
}

/// Can state `state` (saved on `saved`) load into `target`'s QEMU? States saved before this was
/// recorded are loaded as before.
pub fn check_restore(state: &str, saved: Option<&SavedOn>, target: &Target) -> Result<(), String> {
    match blocking(state, &platform_differences(saved, target)) {
        Some(e) => Err(e),
        None => Ok(()),
    }
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
            accel: None,
            host: None,
        };
        let t = |q| Target {
            name: "this host",
            qemu: Some(q),
            accel: Accel::Tcg,
            host: None,
        };
        assert_eq!(
            check_restore(
                "s1",
                Some(&on("7.2.22", "pc-q35-7.2", "Westmere")),
                &t(&v10)
            ),
            Ok(())
        );
        let e = check_restore(
            "s1",
            Some(&on("10.0.2", "pc-q35-10.0", "Westmere")),
            &t(&v7),
        )
        .unwrap_err();
        assert!(e.contains("QEMU 10.0 or newer"), "{e}");
        let e =
            check_restore("s1", Some(&on("7.2.22", "pc-q35-7.2", "max")), &t(&v10)).unwrap_err();
        assert!(e.contains("-cpu max"), "{e}");
        assert_eq!(
            check_restore("s1", Some(&on("7.2.9", "pc-q35-7.2", "max")), &t(&v7)),
            Ok(())
        );
        assert_eq!(check_restore("s1", None, &t(&v7)), Ok(()));
        let mut mapped = on("10.0.2", "pc-q35-7.2", "Westmere");
        mapped.ram_stream = Some("mapped-ram".into());
        let e = check_restore("s1", Some(&mapped), &t(&v7)).unwrap_err();
        assert!(e.contains("mapped-ram"), "{e}");
        let mut v10m = v10.clone();
        v10m.migration_capabilities = vec!["mapped-ram".into()];
        assert_eq!(check_restore("s1", Some(&mapped), &t(&v10m)), Ok(()));
        assert_eq!(release("10.0.2"), "10.0");
        assert_eq!(release("7"), "7");
    }

    /// A check lists every aspect with its verdict, and a refusal names every blocking one.
    #[test]
    fn a_check_names_each_difference_and_every_blocker() {
        let v7 = facts("7.2.22", "pc-q35-7.2");
        let saved = SavedOn {
            qemu_version: "10.0.2".into(),
            machine: "pc-q35-10.0".into(),
            cpu: "max".into(),
            ram_stream: None,
            accel: Some(Accel::Kvm),
            host: Some("h1".into()),
        };
        let target = Target {
            name: "b2",
            qemu: Some(&v7),
            accel: Accel::Tcg,
            host: Some("h2"),
        };
        let diffs = platform_differences(Some(&saved), &target);
        let verdict = |w: &str| {
            diffs
                .iter()
                .find(|d| d.what == w)
                .map(|d| d.verdict)
                .unwrap_or_else(|| panic!("{w} compared: {diffs:?}"))
        };
        assert_eq!(verdict("qemu"), Verdict::Adaptable);
        assert_eq!(verdict("machine"), Verdict::Blocking);
        assert_eq!(verdict("cpu-model"), Verdict::Blocking);
        assert_eq!(verdict("accelerator"), Verdict::Blocking);
        assert_eq!(verdict("host"), Verdict::Adaptable);
        let e = blocking("s1", &diffs).unwrap_or_default();
        for part in ["pc-q35-10.0", "-cpu max", "under kvm", "b2"] {
            assert!(e.contains(part), "{part} in {e}");
        }
        // The same platform: all the same, nothing blocks.
        let same = SavedOn {
            qemu_version: "7.2.22".into(),
            machine: "pc-q35-7.2".into(),
            cpu: "Westmere".into(),
            ram_stream: None,
            accel: Some(Accel::Tcg),
            host: Some("h2".into()),
        };
        let diffs = platform_differences(Some(&same), &target);
        assert!(
            diffs.iter().all(|d| d.verdict == Verdict::Same),
            "{diffs:?}"
        );
        assert_eq!(blocking("s1", &diffs), None);
        // Unknown platform: one adaptable line, no refusal.
        let diffs = platform_differences(None, &target);
        assert_eq!(diffs.len(), 1);
        assert_eq!(blocking("s1", &diffs), None);
    }
}
