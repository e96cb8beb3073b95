use super::*;
use drover_model::OpenPlan;
use serde_json::json;

/// A disk element as schema 1 wrote it.
fn disk(id: &str, path: &Path, owned: bool, index: u32) -> serde_json::Value {
    json!({"id": id, "path": path, "format": "qcow2", "size": 64 << 20,
           "readonly": false, "owned": owned, "index": index})
}

fn config(cpus: u32, disks: Vec<serde_json::Value>) -> serde_json::Value {
    json!({"name": "p2", "cpus": cpus, "memory": 256 << 20, "disks": disks, "nics": [],
           "boot": {"type": "default", "cmdline": null}, "accel": null})
}

fn put(store: &dyn Store, table: &str, key: &str, v: &serde_json::Value) {
    store
        .apply(vec![Write::Put {
            table: table.into(),
            key: key.into(),
            value: serde_json::to_vec(v).unwrap(),
        }])
        .unwrap();
}

fn state(id: &str, cfg: serde_json::Value) -> serde_json::Value {
    json!({"format": 1, "id": id, "name": id, "vm": "p2", "created_at_ms": 1,
           "created_by": "uid 0", "mode": "fast", "config": cfg,
           "devices": {"file": "devices.bin", "bytes": 1, "sha256": "00"},
           "memory": {"file": "memory.bin", "bytes": 1}, "paused_ms": 3, "phase": "durable"})
}

use drover_store::Write;

/// The records the sequence left with schema 1 (two saves, a generation sealed after
/// each, persistence on): generations and the VM name the overlay of the last save, states
/// name the layers they pin. A disk from a user's image with a backing file of its own too.
#[test]
fn schema_1_records_are_migrated_once_to_layer_chains() {
    let dir = tempfile::tempdir().unwrap();
    let sd = dir.path().join("state");
    let disks = sd.join("vms/p2/disks");
    std::fs::create_dir_all(&disks).unwrap();
    let user_dir = dir.path().join("images");
    std::fs::create_dir_all(&user_dir).unwrap();
    let (base, user) = (user_dir.join("base.qcow2"), user_dir.join("user.qcow2"));
    drover_qemu::img::create_qcow2(&base, 64 << 20).unwrap();
    drover_qemu::img::create_overlay(&user, &base, 64 << 20).unwrap();
    let data = disks.join("data.qcow2");
    drover_qemu::img::create_qcow2(&data, 64 << 20).unwrap();
    let (d1, d2) = (
        disks.join("data.s1-100.qcow2"),
        disks.join("data.s2-200.qcow2"),
    );
    let (i1, i2) = (
        disks.join("img.s1-100.qcow2"),
        disks.join("img.s2-200.qcow2"),
    );
    for (o, b) in [(&d1, &data), (&d2, &d1), (&i1, &user), (&i2, &i1)] {
        drover_qemu::img::create_overlay(o, b, 64 << 20).unwrap();
    }
    for s in ["s1", "s2"] {
        std::fs::create_dir_all(sd.join("vms/p2/states").join(s)).unwrap();
    }
    let at = |d: &Path, i: &Path| vec![disk("data", d, true, 0), disk("img", i, false, 1)];
    let store = drover_store::RedbStore::open(&sd.join("droverd.redb")).unwrap();
    put(
        &store,
        VMS,
        "p2",
        &json!({"name": "p2", "state": "stopped", "config": config(1, at(&data, &user)),
                "created_at_ms": 1, "persist": true, "persist_mode": "diff"}),
    );
    // Sealed the way schema 1 sealed them: the config with the disks at the save's overlays.
    let cfg =
        |d: &Path, i: &Path| -> VmConfig { serde_json::from_value(config(1, at(d, i))).unwrap() };
    let mut old = ConfigHistory::new(cfg(&data, &user));
    let mode = drover_model::PersistMode::Diff;
    assert_eq!(
        old.seal(&cfg(&d1, &i1), mode, "droverd", "stop", 2)
            .unwrap(),
        Some(1)
    );
    let snap = drover_model::PersistMode::Snapshot;
    assert_eq!(
        old.seal(&cfg(&d2, &i2), snap, "droverd", "stop", 3)
            .unwrap(),
        Some(2)
    );
    let history = serde_json::to_value(&old).unwrap();
    put(&store, HISTORY, "p2", &history);
    put(
        &store,
        STATES,
        "p2/s1",
        &state("s1", config(1, at(&data, &user))),
    );
    put(
        &store,
        STATES,
        "p2/s2",
        &state("s2", config(1, at(&d1, &i1))),
    );

    assert_eq!(upgrade(&store, &sd).unwrap(), vec!["p2".to_string()]);

    // Every config names the origins; sealing after saves recorded no real change.
    let h: ConfigHistory = store.get(HISTORY, "p2").unwrap().unwrap();
    for g in h.ids() {
        let c = h.resolve(g).unwrap();
        assert_eq!(c.disks[0].path, data, "generation {g}");
        assert_eq!(
            c.disks[1].path, user,
            "generation {g}: a user's image is its own origin"
        );
        assert_eq!(c.elements(), h.initial.elements(), "generation {g}");
    }
    let info: VmRecord = store.get(VMS, "p2").unwrap().unwrap();
    assert_eq!(info.config.disks[0].path, data);
    // The chains: the last save's overlay is current, each state pins its layers.
    let chain: DiskLayers = store.get(LAYERS, "p2/data").unwrap().unwrap();
    assert_eq!(chain.top(&data), d2.as_path());
    assert_eq!(chain.plan_open(&data), OpenPlan::Use(d2.clone()));
    assert!(chain.pinned[&data].contains("s1") && chain.pinned[&d1].contains("s2"));
    let chain: DiskLayers = store.get(LAYERS, "p2/img").unwrap().unwrap();
    assert_eq!(chain.top(&user), i2.as_path());
    assert!(chain.pinned[&user].contains("s1") && chain.pinned[&i1].contains("s2"));
    for (id, layer) in [("s1", &data), ("s2", &d1)] {
        let s: StateRecord = store.get(STATES, &format!("p2/{id}")).unwrap().unwrap();
        assert_eq!(s.format, STATE_FORMAT);
        assert_eq!(&s.layers["data"], layer);
        assert_eq!(s.config.disks[0].path, data);
        let on_disk: StateRecord = serde_json::from_slice(
            &std::fs::read(sd.join("vms/p2/states").join(id).join("manifest.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(on_disk, s);
    }
    // Recorded: it does not run twice.
    assert!(upgrade(&store, &sd).unwrap().is_empty());
    assert_eq!(store.get::<u32>(META, "schema").unwrap(), Some(SCHEMA));
}

/// With persistence off, an old droverd's next start opened the initial config's path: the
/// layer the first save pinned. Migrated, that layer stays pinned and a start overlays it.
#[test]
fn a_pinned_initial_disk_gets_an_overlay_after_migration() {
    let vm_dir = Path::new("/s/vms/p2");
    let data = vm_dir.join("disks/data.qcow2");
    let o1 = vm_dir.join("disks/data.s1-5.qcow2");
    let cfg = |p: &Path| -> VmConfig {
        serde_json::from_value(config(1, vec![disk("data", p, true, 0)])).unwrap()
    };
    let info: VmInfo = serde_json::from_value(json!({"name": "p2", "state": "stopped",
        "config": config(1, vec![disk("data", &data, true, 0)]), "created_at_ms": 1,
        "persist": false}))
    .unwrap();
    let mut history = ConfigHistory::new(cfg(&data));
    history
        .seal(
            &cfg(&o1),
            drover_model::PersistMode::Diff,
            "droverd",
            "stop",
            2,
        )
        .unwrap();
    let s1: StateInfo =
        serde_json::from_value(state("s1", config(1, vec![disk("data", &data, true, 0)]))).unwrap();
    let backing = |p: &Path| (p == o1).then(|| data.clone());
    let up = to_layer_chains(vm_dir, info, history, vec![s1], backing).unwrap();
    let chain = &up.chains["data"];
    assert_eq!(
        chain.plan_open(&data),
        OpenPlan::Overlay {
            backing: data.clone()
        }
    );
    assert_eq!(up.history.resolve(1).unwrap().disks[0].path, data);
    assert!(up.history.resolve(1).unwrap().elements() == up.history.initial.elements());
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = drover_store::RedbStore::open(&dir.path().join("d.redb")).unwrap();
    store.put(META, "schema", &(SCHEMA + 1)).unwrap();
    let e = upgrade(&store, dir.path()).unwrap_err().to_string();
    assert!(e.contains("newer droverd"), "{e}");
}
