use super::*;
use drover_api::{Capture, MigrationPhase, MigrationRole};
use proptest::prelude::*;
use std::path::Path;

/// A `vms` row as the droverd before these types wrote it (`VmInfo` was the record), every
/// field set.
const VM_FIXTURE: &str = include_str!("vm_record.json");
/// A state's `manifest.json` (and `states` row) as that droverd wrote it, every field set.
const STATE_FIXTURE: &str = include_str!("state_manifest.json");

fn vm_fixture() -> VmRecord {
    serde_json::from_str(VM_FIXTURE).unwrap()
}

fn state_fixture() -> StateRecord {
    serde_json::from_str(STATE_FIXTURE).unwrap()
}

#[test]
fn a_vm_record_written_before_record_types_reads_unchanged() {
    let r = vm_fixture();
    assert_eq!(r.name, "web1");
    assert_eq!(r.state, VmState::Running);
    assert_eq!(r.config.name.as_str(), "web1");
    assert_eq!((r.config.cpus, r.config.memory), (2, 512 << 20));
    assert_eq!(r.config.max_memory, Some(1 << 30));
    assert_eq!(r.config.accel, Some(Accel::Tcg));
    let root = &r.config.disks[0];
    assert_eq!(root.id.as_str(), "root");
    assert_eq!(
        root.path,
        Path::new("/var/lib/drover/vms/web1/disks/root.qcow2")
    );
    assert_eq!(root.format, drover_model::DiskFormat::Qcow2);
    assert_eq!(
        (root.size, root.readonly, root.owned),
        (1 << 30, false, true)
    );
    assert_eq!(root.base.as_deref(), Some("debian12"));
    assert_eq!((root.index, root.slot, root.addr), (0, Some(2), Some(6)));
    let data = &r.config.disks[1];
    assert_eq!(data.format, drover_model::DiskFormat::Raw);
    assert_eq!((data.readonly, data.owned, data.index), (true, false, 1));
    assert_eq!(
        (data.base.as_ref(), data.slot, data.addr),
        (None, None, None)
    );
    let net0 = &r.config.nics[0];
    assert_eq!(net0.mac.to_string(), "52:54:00:12:34:56");
    assert_eq!((net0.slot, net0.addr), (Some(3), Some(7)));
    match &net0.backend {
        drover_model::NicBackend::User { forwards } => {
            assert_eq!(forwards.len(), 1);
            assert_eq!(forwards[0].to_string(), "tcp:127.0.0.1:2222-:22");
        }
        other => panic!("net0 backend {other:?}"),
    }
    assert_eq!(
        r.config.nics[1].backend,
        drover_model::NicBackend::Tap {
            ifname: "tap-web1".into()
        }
    );
    assert_eq!(
        r.config.boot,
        drover_model::Boot::Default {
            cmdline: Some("quiet".into())
        }
    );
    assert_eq!(r.created_at_ms, 1764650000000);
    assert_eq!(r.pid, Some(4242));
    assert_eq!(r.accel, Some(Accel::Tcg));
    assert_eq!(r.started_at_ms, Some(1764650001000));
    assert_eq!(
        r.last_exit,
        Some(ExitInfo {
            at_ms: 1764649999000,
            reason: "guest-poweroff".into(),
            detail: Some("shutdown reason: guest-shutdown".into()),
        })
    );
    assert!(r.persist);
    assert_eq!(r.persist_mode, PersistMode::Snapshot);
    let running = r.running_config.as_ref().unwrap();
    assert_eq!(running.cpus, 3);
    assert_eq!(
        running.boot,
        drover_model::Boot::Kernel {
            kernel: "/boot/vmlinux".into(),
            initrd: Some("/boot/initrd.img".into()),
            cmdline: Some("console=ttyS0".into()),
        }
    );
    let next = r.next_config.as_ref().unwrap();
    assert_eq!(
        (next.cpus, next.memory, next.accel),
        (4, 256 << 20, Some(Accel::Kvm))
    );
    assert_eq!(
        next.boot,
        drover_model::Boot::Disk {
            disk: drover_model::ElementId::new("root").unwrap()
        }
    );
    assert_eq!(r.started_from.as_deref(), Some("generation 3"));
    assert_eq!(
        r.migration,
        Some(MigrationMark {
            id: "m1764650000000-77".into(),
            role: MigrationRole::Outgoing,
            peer: "host-b".into(),
            phase: MigrationPhase::HandingOver,
        })
    );
    assert_eq!(
        r.paused_reason.as_deref(),
        Some("a disk write failed: no space left on device")
    );
    assert_eq!(
        r.platform,
        Platform {
            machine: Some("pc-q35-7.2".into()),
            cpu: Some("Westmere,-x2apic".into()),
            ram_pad: false,
        }
    );
    assert_eq!(
        r.fence,
        Some(Fence {
            service: "shop".into(),
            app: "web".into(),
            index: 1,
            token: 981,
        })
    );
    assert_eq!(
        r.hibernation,
        Some(Hibernation {
            state: "s4".into(),
            bytes: 335000,
            dir: "/var/lib/drover/vms/web1/states/s4".into(),
            at_ms: 1764650002000,
            agent: true,
        })
    );
    assert_eq!(
        r.identity,
        Some(IdentityOutcome {
            changed: vec!["hostname".into(), "mac:eth0".into()],
            hooks: vec!["10-net:0".into()],
            renewed: vec!["eth0".into()],
            error: Some("ssh host keys: no sshd".into()),
        })
    );
    assert_eq!(
        r.clone_of,
        Some(CloneOrigin {
            vm: "tmpl".into(),
            state: "s1".into(),
            at_ms: 1764640000000,
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            identity_applied_ms: Some(1764640000500),
        })
    );
    // Written back, it is the same bytes: what is on disk does not change.
    assert_eq!(serde_json::to_string_pretty(&r).unwrap(), VM_FIXTURE);
}

#[test]
fn a_state_manifest_written_before_record_types_reads_unchanged() {
    let r = state_fixture();
    assert_eq!(r.format, drover_api::STATE_FORMAT);
    assert_eq!((r.id.as_str(), r.name.as_str()), ("s4", "before-upgrade"));
    assert_eq!(r.vm, "web1");
    assert_eq!(r.created_at_ms, 1764650002000);
    assert_eq!(r.created_by, "guest:backup");
    assert_eq!(r.mode, "fast");
    assert_eq!(r.config.disks[0].addr, Some(6));
    assert_eq!(r.config.nics[0].addr, Some(7));
    assert_eq!(r.config.boot, drover_model::Boot::Default { cmdline: None });
    assert_eq!(
        r.layers["root"],
        Path::new("/var/lib/drover/vms/web1/disks/root.s4-1764650002000.qcow2")
    );
    assert_eq!(
        r.devices,
        StateSection {
            file: "devices.bin".into(),
            bytes: 335000,
            sha256: Some("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into()),
        }
    );
    assert_eq!(
        r.memory,
        Some(StateSection {
            file: "memory.bin".into(),
            bytes: 512 << 20,
            sha256: None,
        })
    );
    assert_eq!(r.paused_ms, 12);
    assert_eq!(r.capture, Some(Capture::Stream));
    assert_eq!(r.phase, StatePhase::Ready);
    assert_eq!(r.failure.as_deref(), Some("memory capture: disk full"));
    assert_eq!(
        r.guest_save,
        Some(GuestSaveNote {
            ticket: "t-17".into(),
            app_id: Some("backup".into()),
            data: Some(serde_json::json!({"reason": "nightly", "n": 3})),
        })
    );
    assert_eq!(
        r.saved_on,
        Some(SavedOn {
            qemu_version: "7.2.22".into(),
            machine: "pc-q35-7.2".into(),
            cpu: "Westmere".into(),
            ram_stream: Some("mapped-ram".into()),
            accel: Some(Accel::Tcg),
            host: Some("host-a".into()),
        })
    );
    assert_eq!(
        String::from_utf8(r.manifest_json().unwrap()).unwrap(),
        STATE_FIXTURE
    );
}

#[test]
fn old_minimal_records_read_with_their_defaults() {
    // Schema 2 VM row with only what it must have, as the first droverds wrote them.
    let r: VmRecord = serde_json::from_value(serde_json::json!({
        "name": "a", "state": "stopped", "created_at_ms": 1,
        "config": {"name": "a", "cpus": 1, "memory": 1, "disks": [], "nics": [],
                   "boot": {"type": "default"}}}))
    .unwrap();
    assert!(!r.persist);
    assert_eq!(r.persist_mode, PersistMode::Diff);
    assert_eq!(r.platform, Platform::default());
    // A state saved before `capture` and `phase` were kept streamed and is durable.
    let mut s = serde_json::to_value(state_fixture()).unwrap();
    for k in [
        "layers",
        "memory",
        "capture",
        "phase",
        "failure",
        "guest_save",
        "saved_on",
    ] {
        s.as_object_mut().unwrap().remove(k);
    }
    let s: StateRecord = serde_json::from_value(s).unwrap();
    assert_eq!((s.capture, s.phase), (None, StatePhase::Durable));
    assert!(s.layers.is_empty() && s.memory.is_none() && s.saved_on.is_none());
}

#[test]
fn what_is_shown_but_computed_is_never_stored() {
    let mut info = VmInfo::from(vm_fixture());
    assert_eq!((info.agent.as_ref(), info.unwritten.len()), (None, 0));
    info.agent = Some(drover_api::AgentStatus {
        connected: true,
        ready: true,
        ..Default::default()
    });
    info.unwritten
        .insert("root".into(), "/var/lib/drover/layer.qcow2".into());
    let json = serde_json::to_value(VmRecord::from(&info)).unwrap();
    assert!(json.get("agent").is_none() && json.get("unwritten").is_none());
    assert_eq!(VmRecord::from(&info), vm_fixture());
    // A row that holds them (written before `agent` was cleared on write) still reads.
    let mut old = serde_json::to_value(&info).unwrap();
    old["unwritten"] = serde_json::json!({"root": "/x.qcow2"});
    let r: VmRecord = serde_json::from_value(old).unwrap();
    assert_eq!(r, vm_fixture());
}

fn opt<T: std::fmt::Debug + Clone + 'static>(
    s: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<Option<T>> {
    proptest::option::of(s).boxed()
}

fn text() -> impl Strategy<Value = String> {
    "[ -~]{0,12}"
}

prop_compose! {
    fn arb_vm()(
        (name, state, created_at_ms, pid, accel, started_at_ms) in (
            "[a-z][a-z0-9-]{0,15}",
            proptest::sample::select(VmState::ALL.to_vec()),
            any::<u64>(),
            opt(any::<u32>()),
            opt(proptest::sample::select(vec![Accel::Kvm, Accel::Tcg])),
            opt(any::<u64>()),
        ),
        (last_exit, persist, snapshot, running, next, started_from) in (
            opt((any::<u64>(), text(), opt(text()))),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            opt(text()),
        ),
        (migration, paused_reason, platform, fence) in (
            opt((text(), any::<bool>(), text(), 0..3usize)),
            opt(text()),
            (opt(text()), opt(text()), any::<bool>()),
            opt((text(), text(), any::<u32>(), any::<i64>())),
        ),
        (hibernation, identity, clone_of) in (
            opt((text(), any::<u64>(), text(), any::<u64>(), any::<bool>())),
            opt((proptest::collection::vec(text(), 0..3), opt(text()))),
            opt((text(), any::<u64>(), opt(any::<u64>()))),
        ),
    ) -> VmRecord {
        let base = vm_fixture();
        VmRecord {
            name,
            state,
            config: base.config.clone(),
            created_at_ms,
            pid,
            accel,
            started_at_ms,
            last_exit: last_exit.map(|(at_ms, reason, detail)| ExitInfo { at_ms, reason, detail }),
            persist,
            persist_mode: if snapshot { PersistMode::Snapshot } else { PersistMode::Diff },
            running_config: base.running_config.filter(|_| running),
            next_config: base.next_config.filter(|_| next),
            started_from,
            migration: migration.map(|(id, out, peer, phase)| MigrationMark {
                id,
                role: if out { MigrationRole::Outgoing } else { MigrationRole::Incoming },
                peer,
                phase: [MigrationPhase::Copying, MigrationPhase::HandingOver, MigrationPhase::Committed][phase],
            }),
            paused_reason,
            platform: Platform { machine: platform.0, cpu: platform.1, ram_pad: platform.2 },
            fence: fence.map(|(service, app, index, token)| Fence { service, app, index, token }),
            hibernation: hibernation.map(|(state, bytes, dir, at_ms, agent)| Hibernation {
                state, bytes, dir: dir.into(), at_ms, agent,
            }),
            identity: identity.map(|(changed, error)| IdentityOutcome {
                hooks: changed.iter().map(|c| format!("{c}:0")).collect(),
                renewed: changed.clone(),
                changed,
                error,
            }),
            clone_of: clone_of.map(|(vm, at_ms, identity_applied_ms)| CloneOrigin {
                state: format!("{vm}-s1"),
                machine_id: format!("{at_ms:032x}"),
                vm,
                at_ms,
                identity_applied_ms,
            }),
        }
    }
}

prop_compose! {
    fn arb_state()(
        (format, id, name, vm, created_at_ms, created_by, mode) in (
            0..4u32, text(), text(), text(), any::<u64>(), text(), text(),
        ),
        (layers, devices, memory, paused_ms) in (
            proptest::collection::btree_map("[a-z]{1,6}", text(), 0..3),
            (text(), any::<u64>(), opt(text())),
            opt((text(), any::<u64>(), opt(text()))),
            any::<u64>(),
        ),
        (capture, phase, failure, guest_save, saved_on, plugged) in (
            opt(proptest::sample::select(vec![Capture::Auto, Capture::Copy, Capture::Stream])),
            proptest::sample::select(vec![
                StatePhase::Capturing, StatePhase::Ready, StatePhase::Durable, StatePhase::Failed,
            ]),
            opt(text()),
            opt((text(), opt(text()), opt(any::<i64>()))),
            opt((text(), text(), text(), opt(text()), any::<bool>(), opt(text()))),
            opt((text(), text(), any::<u32>(), text(), any::<u64>(), any::<u64>())),
        ),
    ) -> StateRecord {
        let section = |(file, bytes, sha256)| StateSection { file, bytes, sha256 };
        StateRecord {
            format, id, name, vm, created_at_ms, created_by, mode,
            config: state_fixture().config,
            layers: layers.into_iter().map(|(k, v)| (k, v.into())).collect(),
            devices: section(devices),
            memory: memory.map(section),
            paused_ms,
            capture,
            phase,
            failure,
            guest_save: guest_save.map(|(ticket, app_id, data)| GuestSaveNote {
                ticket, app_id, data: data.map(serde_json::Value::from),
            }),
            saved_on: saved_on.map(|(qemu_version, machine, cpu, ram_stream, tcg, host)| SavedOn {
                qemu_version, machine, cpu, ram_stream,
                accel: Some(if tcg { Accel::Tcg } else { Accel::Kvm }),
                host,
            }),
            plugged: plugged
                .map(|(cpu, driver, socket, dimm, bytes, addr)| drover_model::Plugged {
                    cpus: vec![drover_model::PluggedCpu { id: cpu, driver, socket, core: 0, thread: 0 }],
                    dimms: vec![drover_model::PluggedDimm { id: dimm, bytes, addr, slot: socket }],
                })
                .unwrap_or_default(),
        }
    }
}

proptest! {
    /// Every stored field survives record → wire → record, and the record's own JSON.
    #[test]
    fn vm_records_round_trip_through_the_wire_type(r in arb_vm()) {
        let info = VmInfo::from(r.clone());
        prop_assert_eq!(&VmRecord::from(&info), &r);
        let json = serde_json::to_vec(&r).unwrap();
        prop_assert_eq!(serde_json::from_slice::<VmRecord>(&json).unwrap(), r);
    }

    #[test]
    fn state_records_round_trip_through_the_wire_type(r in arb_state()) {
        prop_assert_eq!(&StateRecord::from(&StateInfo::from(r.clone())), &r);
        let json = r.manifest_json().unwrap();
        prop_assert_eq!(serde_json::from_slice::<StateRecord>(&json).unwrap(), r);
    }
}
