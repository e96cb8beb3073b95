//! The rules of live changes (this module's docs, `undo_live`, `apply_live`), tested against
//! [`FakeVmm`] in paused time: a step that fails undoes the ones before it, nothing is applied
//! when any change is invalid, an unplug waits for the guest and frees the backend only after.

use super::{live_change, Change, LiveHost};
use crate::error::{HostError, Result};
use crate::vmm::fake::FakeVmm;
use crate::vmm::Vmm;
use drover_model::{
    DiskConfig, DiskFormat, ElementId, MacAddr, NicBackend, NicConfig, VmConfig, VmName,
};
use std::collections::HashMap;
use std::sync::Mutex;

const MIB: u64 = 1 << 20;

/// The host side, without files: plugs a disk from its path and records what it discards.
#[derive(Default)]
struct FakeHost {
    /// Disk id -> the block node its device writes to now, when not the boot-time one.
    nodes: HashMap<String, String>,
    discarded: Mutex<Vec<String>>,
}

impl LiveHost for FakeHost {
    async fn plug_disk<V: Vmm>(
        &self,
        vmm: &V,
        _cfg: &VmConfig,
        d: &DiskConfig,
        _owned: bool,
        port: u8,
    ) -> Result<()> {
        Ok(vmm.add_disk(d, port, None).await?)
    }

    fn discard_disk(&self, d: &DiskConfig) {
        self.discarded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(d.id.to_string());
    }

    fn active_node(&self, d: &DiskConfig) -> String {
        self.nodes
            .get(d.id.as_str())
            .cloned()
            .unwrap_or_else(|| drover_qemu::cmdline::disk_node(d))
    }
}

fn nic(id: &str, slot: Option<u8>) -> NicConfig {
    NicConfig {
        id: ElementId::new(id).unwrap(),
        mac: MacAddr::qemu_local([0, 0, slot.unwrap_or(9)]),
        backend: NicBackend::User { forwards: vec![] },
        slot,
        addr: None,
    }
}

fn disk(id: &str, slot: Option<u8>) -> DiskConfig {
    DiskConfig {
        id: ElementId::new(id).unwrap(),
        path: format!("/nonexistent/{id}.qcow2").into(),
        format: DiskFormat::Qcow2,
        size: 64 * MIB,
        readonly: false,
        owned: true,
        base: None,
        index: 0,
        slot,
        addr: None,
    }
}

/// A VM with 1 vCPU, 256 MiB growable to 1 GiB, a boot-time NIC `net0`, a hot-plugged NIC
/// `hot1` (port 0) and a hot-plugged disk `data` (port 1).
fn running() -> VmConfig {
    let mut data = disk("data", Some(1));
    data.index = 0;
    VmConfig {
        name: VmName::new("web").unwrap(),
        cpus: 1,
        memory: 256 * MIB,
        disks: vec![data],
        nics: vec![nic("net0", None), nic("hot1", Some(0))],
        boot: drover_model::Boot::Default { cmdline: None },
        accel: None,
        max_memory: Some(1024 * MIB),
    }
}

/// QEMU as it runs `running()`, with room for 4 vCPUs.
fn vmm() -> FakeVmm {
    FakeVmm::running(&running(), 4)
}

async fn change(vmm: &FakeVmm, host: &FakeHost, changes: Vec<Change>) -> Result<VmConfig> {
    live_change("web", vmm, host, &running(), changes, 8)
        .await
        .map(|(cfg, _)| cfg)
}

fn add_nic(id: &str) -> Change {
    Change::AddNic(nic(id, None))
}

/// A change of several steps either all lands, each added device on its own free port, or
/// (below) none does.
#[tokio::test(start_paused = true)]
async fn every_step_lands_and_added_devices_take_free_ports() {
    let (vmm, host) = (vmm(), FakeHost::default());
    let cfg = change(
        &vmm,
        &host,
        vec![
            add_nic("n2"),
            Change::AddDisk(disk("d2", None), true),
            Change::Cpus(3),
            Change::Memory(384 * MIB),
        ],
    )
    .await
    .unwrap();
    let port = |id: &str| {
        cfg.nics
            .iter()
            .find(|n| n.id.as_str() == id)
            .map(|n| n.slot)
            .or_else(|| {
                cfg.disks
                    .iter()
                    .find(|d| d.id.as_str() == id)
                    .map(|d| d.slot)
            })
    };
    // Ports 0 and 1 are taken by hot1 and data.
    assert_eq!((port("n2"), port("d2")), (Some(Some(2)), Some(Some(3))));
    assert_eq!((cfg.cpus, cfg.memory), (3, 384 * MIB));
    let devices = vmm.devices();
    for id in ["nic-n2", "disk-d2", "vcpu-s1-c0-t0", "vcpu-s2-c0-t0"] {
        assert!(devices.iter().any(|d| d == id), "{id} in {devices:?}");
    }
    assert!(
        devices.iter().any(|d| d.starts_with("dimm-m")),
        "{devices:?}"
    );
}

/// "Checked against the config model first": one invalid change among several, even the
/// last, and the VMM is not asked for anything.
#[tokio::test(start_paused = true)]
async fn an_invalid_change_anywhere_applies_nothing() {
    let (vmm, host) = (vmm(), FakeHost::default());
    let cases = [
        // vCPUs only grow live.
        vec![add_nic("n2"), Change::Cpus(3), Change::Cpus(2)],
        // Memory grows in 128 MiB blocks.
        vec![add_nic("n2"), Change::Memory(300 * MIB)],
        // A device attached at boot cannot be unplugged live.
        vec![Change::Cpus(2), Change::Remove("net0".into())],
    ];
    for changes in cases {
        assert!(change(&vmm, &host, changes).await.is_err());
    }
    assert_eq!(vmm.calls(), Vec::<String>::new());
}

/// "Undone there if a step fails": a NIC and a disk plugged by the first steps are unplugged
/// and their backends freed when a later step fails; the disk image made for it goes too;
/// the caller gets the failing step's error.
#[tokio::test(start_paused = true)]
async fn a_failing_later_step_undoes_the_earlier_ones() {
    let (vmm, host) = (vmm(), FakeHost::default());
    let (devices, backends) = (vmm.devices(), vmm.backends());
    // device_add: nic-n2, disk-d2, then the first vCPU fails.
    vmm.fail("device_add", 3);
    let e = change(
        &vmm,
        &host,
        vec![
            add_nic("n2"),
            Change::AddDisk(disk("d2", None), true),
            Change::Cpus(2),
        ],
    )
    .await
    .unwrap_err();
    assert!(matches!(e, HostError::Qmp(_)), "{e}");
    assert!(e.to_string().contains("injected failure"), "{e}");
    assert_eq!((vmm.devices(), vmm.backends()), (devices, backends));
    let calls = vmm.calls();
    let undo = &calls[calls.len() - 4..];
    assert_eq!(
        undo,
        [
            "device_del disk-d2",
            "blockdev-del disk-d2",
            "device_del nic-n2",
            "netdev_del nic-n2"
        ],
        "newest first: {calls:?}"
    );
    assert_eq!(*host.discarded.lock().unwrap(), ["d2"]);
}

/// A vCPU the guest keeps when a later step fails is not hidden: the error names it and says
/// it stays until the VM stops; the vCPUs it released are gone.
#[tokio::test(start_paused = true)]
async fn what_the_guest_keeps_in_an_undo_is_reported() {
    let (vmm, host) = (vmm(), FakeHost::default());
    vmm.hold("vcpu-s2-c0-t0");
    vmm.fail("object-add", 1);
    let e = change(
        &vmm,
        &host,
        vec![Change::Cpus(3), Change::Memory(384 * MIB)],
    )
    .await
    .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, HostError::Conflict(_)), "{msg}");
    assert!(
        msg.contains("injected failure") && msg.contains("except vcpu-s2-c0-t0,"),
        "{msg}"
    );
    assert!(msg.contains("stay until VM web stops"), "{msg}");
    let devices = vmm.devices();
    assert!(
        devices.contains(&"vcpu-s2-c0-t0".to_string()),
        "{devices:?}"
    );
    assert!(
        !devices.contains(&"vcpu-s1-c0-t0".to_string()),
        "{devices:?}"
    );
}

/// A DIMM's memory backend is dropped only once the guest released the DIMM: kept (and
/// reported) when it did not, dropped after the device when it did.
#[tokio::test(start_paused = true)]
async fn a_dimm_backend_goes_only_after_its_device() {
    for guest_keeps in [false, true] {
        let (vmm, host) = (vmm(), FakeHost::default());
        vmm.fail("netdev_add", 1);
        if guest_keeps {
            // The DIMM's id is made at the step; hold whatever DIMM shows up.
            vmm.hold_prefix("dimm-");
        }
        let e = change(&vmm, &host, vec![Change::Memory(384 * MIB), add_nic("n2")])
            .await
            .unwrap_err();
        let calls = vmm.calls();
        let del_dimm = calls.iter().position(|c| c.starts_with("device_del dimm-"));
        let del_mem = calls.iter().position(|c| c.starts_with("object-del mem-"));
        let mem_left = vmm.backends().iter().any(|b| b.starts_with("mem-"));
        if guest_keeps {
            assert!(del_dimm.is_some() && del_mem.is_none(), "{calls:?}");
            assert!(mem_left);
            assert!(e.to_string().contains("except dimm-m"), "{e}");
        } else {
            assert!(del_dimm.is_some() && del_dimm < del_mem, "{calls:?}");
            assert!(!mem_left);
            assert!(matches!(e, HostError::Qmp(_)), "{e}");
        }
    }
}

/// A detach the guest does not acknowledge in time fails and leaves the device attached,
/// backend and all (freeing the backend under a device the guest still uses is never tried).
#[tokio::test(start_paused = true)]
async fn a_device_the_guest_holds_stays_attached() {
    let (vmm, host) = (vmm(), FakeHost::default());
    vmm.hold("nic-hot1");
    let e = change(&vmm, &host, vec![Change::Remove("hot1".into())])
        .await
        .unwrap_err();
    assert!(matches!(e, HostError::Timeout(_)), "{e}");
    assert!(e.to_string().contains("it stays attached"), "{e}");
    assert!(vmm.devices().contains(&"nic-hot1".to_string()));
    assert!(vmm.backends().contains(&"nic-hot1".to_string()));
    assert_eq!(vmm.calls(), ["device_del nic-hot1"]);
}

/// A detached disk frees the block node its device writes to now (a state save may have put
/// a layer on top since it was plugged), after the device is gone.
#[tokio::test(start_paused = true)]
async fn a_detached_disk_frees_its_active_node() {
    let vmm = vmm();
    vmm.move_to_node("disk-data", "disk-data-l2");
    let host = FakeHost {
        nodes: HashMap::from([("data".to_string(), "disk-data-l2".to_string())]),
        ..FakeHost::default()
    };
    let cfg = change(&vmm, &host, vec![Change::Remove("data".into())])
        .await
        .unwrap();
    assert!(cfg.disks.is_empty());
    assert_eq!(
        vmm.calls(),
        ["device_del disk-data", "blockdev-del disk-data-l2"]
    );
    assert!(!vmm.backends().contains(&"disk-data-l2".to_string()));
}

/// The guest already let go of a removed device: a later failing step does not plug it back.
#[tokio::test(start_paused = true)]
async fn a_removed_device_is_not_plugged_back() {
    let (vmm, host) = (vmm(), FakeHost::default());
    vmm.fail("netdev_add", 1);
    change(
        &vmm,
        &host,
        vec![Change::Remove("hot1".into()), add_nic("n2")],
    )
    .await
    .unwrap_err();
    assert!(!vmm.devices().contains(&"nic-hot1".to_string()));
    let calls = vmm.calls();
    assert_eq!(
        calls,
        [
            "device_del nic-hot1",
            "netdev_del nic-hot1",
            "netdev_add nic-n2"
        ]
    );
}
