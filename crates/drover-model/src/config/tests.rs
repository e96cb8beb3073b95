use super::*;
use crate::spec::{DiskFormat, MacAddr, PortForward, Proto};
use proptest::prelude::*;
use proptest::sample::{select, subsequence, Index};
use std::path::PathBuf;

fn id(s: &str) -> ElementId {
    ElementId::new(s).unwrap()
}
fn key(s: &str) -> ElementKey {
    s.parse().unwrap()
}

fn disk(name: &str, index: u32, slot: Option<u8>) -> DiskConfig {
    DiskConfig {
        id: id(name),
        path: PathBuf::from(format!("/var/lib/drover/vm/{name}.qcow2")),
        format: DiskFormat::Qcow2,
        size: 1 << 30,
        readonly: false,
        owned: true,
        base: None,
        index,
        slot,
        addr: None,
    }
}

fn nic(name: &str, slot: Option<u8>) -> NicConfig {
    NicConfig {
        id: id(name),
        mac: MacAddr::qemu_local([0, 0, name.len() as u8]),
        backend: NicBackend::User {
            forwards: Vec::new(),
        },
        slot,
        addr: None,
    }
}

/// 1 vCPU, 512M, disks root (boot) and data, NIC net0.
fn base() -> VmConfig {
    VmConfig {
        name: VmName::new("web1").unwrap(),
        cpus: 1,
        memory: 512 << 20,
        disks: vec![disk("root", 0, None), disk("data", 1, None)],
        nics: vec![nic("net0", None)],
        boot: Boot::Disk { disk: id("root") },
        accel: None,
        max_memory: None,
    }
}

fn with_ops(ops: Vec<ElementOp>) -> ConfigDiff {
    ConfigDiff { ops }
}

// ---- keys and elements ----

#[test]
fn keys_parse_and_print() {
    for s in ["cpu", "memory", "machine", "boot", "disk:data", "nic:net_1"] {
        assert_eq!(key(s).to_string(), s);
    }
    assert_eq!(key("disk:data"), ElementKey::Disk(id("data")));
    let cases = [
        ("", "unknown kind"),
        ("cpus", "unknown kind"),
        ("Disk:x", "unknown kind"),
        ("serial", "unknown kind"),
        ("cpu:0", "cpu takes no id"),
        ("disk", "disk needs an id"),
        ("nic", "nic needs an id"),
        ("disk:", "invalid id"),
        ("disk:Data", "invalid id"),
        ("nic:a:b", "invalid id"),
    ];
    for (input, reason) in cases {
        let err = input.parse::<ElementKey>().unwrap_err();
        assert!(err.to_string().contains(reason), "{input:?}: {err}");
    }
    assert_eq!(
        serde_json::to_string(&key("nic:net0")).unwrap(),
        "\"nic:net0\""
    );
    assert!(serde_json::from_str::<ElementKey>("\"gpu:x\"").is_err());
}

#[test]
fn elements_round_trip_and_serialize_readably() {
    let c = base();
    let e = c.elements();
    assert_eq!(
        e.keys().map(ToString::to_string).collect::<Vec<_>>(),
        [
            "cpu",
            "memory",
            "machine",
            "boot",
            "disk:data",
            "disk:root",
            "nic:net0"
        ]
    );
    assert_eq!(VmConfig::from_elements(c.name.clone(), e).unwrap(), c);

    let op = ElementOp::Add {
        key: key("disk:data2"),
        element: Element::Disk(disk("data2", 2, Some(1))),
    };
    let json = serde_json::to_value(&op).unwrap();
    assert_eq!(json["op"], "add");
    assert_eq!(json["key"], "disk:data2");
    assert_eq!(json["element"]["kind"], "disk");
    assert_eq!(json["element"]["value"]["slot"], 1);
    let json = serde_json::to_value(ElementOp::Modify {
        key: ElementKey::Cpu,
        element: Element::Cpu(2),
    })
    .unwrap();
    assert_eq!(
        json,
        serde_json::json!({"op": "modify", "key": "cpu", "element": {"kind": "cpu", "value": 2}})
    );
    let json = serde_json::to_value(ElementOp::Remove {
        key: key("nic:net1"),
    })
    .unwrap();
    assert_eq!(json, serde_json::json!({"op": "remove", "key": "nic:net1"}));
}

#[test]
fn configs_written_before_index_and_slot_still_read() {
    let mut c = base();
    let mut json = serde_json::to_value(&c).unwrap();
    for d in json["disks"].as_array_mut().unwrap() {
        assert!(d.get("slot").is_none(), "None slots are not written");
        d.as_object_mut().unwrap().remove("index");
    }
    let mut old: VmConfig = serde_json::from_value(json).unwrap();
    assert_eq!(old.disks[1].index, 0);
    assert_eq!(
        old.validate_config().unwrap_err().to_string(),
        "disk:root and disk:data both use disk index 0: give each disk its own place in the disk order"
    );
    old.normalize();
    assert_eq!(old, c);
    c.normalize();
    assert_eq!(old, c, "normalize leaves a valid config alone");
}

#[test]
fn from_elements_orders_devices() {
    let mut c = base();
    c.disks = vec![disk("b", 7, None), disk("a", 3, Some(1))];
    c.nics = vec![
        nic("z", Some(0)),
        nic("y", None),
        nic("hot", Some(2)),
        nic("b0", None),
    ];
    c.boot = Boot::Default { cmdline: None };
    let rebuilt = VmConfig::from_elements(c.name.clone(), c.elements()).unwrap();
    let disks: Vec<_> = rebuilt.disks.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(disks, ["a", "b"]);
    let nics: Vec<_> = rebuilt.nics.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(nics, ["b0", "y", "z", "hot"]);
}

#[test]
fn from_elements_errors() {
    let c = base();
    let mut e = c.elements();
    e.remove(&ElementKey::Cpu);
    assert_eq!(
        VmConfig::from_elements(c.name.clone(), e)
            .unwrap_err()
            .to_string(),
        "the config has no cpu: every VM needs one"
    );
    let mut e = c.elements();
    e.insert(key("disk:x"), Element::Nic(nic("x", None)));
    assert_eq!(
        VmConfig::from_elements(c.name.clone(), e).unwrap_err(),
        ConfigError::KeyMismatch {
            key: key("disk:x"),
            found: key("nic:x")
        }
    );
}

#[test]
fn validation_errors() {
    let check = |f: &dyn Fn(&mut VmConfig), want: &str| {
        let mut c = base();
        f(&mut c);
        let err = c.validate_config().unwrap_err().to_string();
        assert_eq!(err, want);
    };
    check(
        &|c| c.cpus = 0,
        "invalid vCPU count 0: must be between 1 and 255",
    );
    check(
        &|c| c.cpus = 256,
        "invalid vCPU count 256: must be between 1 and 255",
    );
    check(
        &|c| c.memory = 32 << 20,
        "invalid memory 32M: must be at least 64M and a whole number of MiB",
    );
    check(
        &|c| c.memory = (512 << 20) + 4096,
        "invalid memory 524292K: must be at least 64M and a whole number of MiB",
    );
    check(
        &|c| c.disks = (0..17).map(|i| disk(&format!("d{i}"), i, None)).collect(),
        "too many disks: 17, at most 16",
    );
    check(
        &|c| c.nics = (0..9).map(|i| nic(&format!("n{i}"), None)).collect(),
        "too many NICs: 9, at most 8",
    );
    check(
        &|c| c.disks[1] = disk("root", 1, None),
        "disk:root is listed twice in the config",
    );
    check(
        &|c| c.nics.push(nic("net0", None)),
        "nic:net0 is listed twice in the config",
    );
    check(
        &|c| c.nics.push(nic("data", None)),
        "disk:data and nic:data share an id: disk and NIC ids must be unique within a VM",
    );
    check(
        &|c| c.disks[1].index = 0,
        "disk:root and disk:data both use disk index 0: give each disk its own place in the disk order",
    );
    check(
        &|c| c.disks[0].index = 5,
        "disks are out of order: disk:data (index 1) is listed after disk:root (index 5); list disks by index",
    );
    check(
        &|c| {
            c.disks.push(disk("a", 2, Some(2)));
            c.nics.push(nic("n1", Some(2)));
        },
        "disk:a and nic:n1 both use hot-plug slot 2",
    );
    check(
        &|c| c.boot = Boot::Disk { disk: id("nope") },
        "boot disk disk:nope is not one of the VM's disks",
    );
    check(
        &|c| c.disks[1].path = PathBuf::from("data.qcow2"),
        "disk:data: image path data.qcow2 must be absolute",
    );
    check(
        &|c| {
            c.nics[0].backend = NicBackend::Tap {
                ifname: "tap/0".into(),
            }
        },
        "nic:net0: invalid tap name \"tap/0\": use 1-15 characters a-z, A-Z, 0-9, '-' and '_'",
    );
    check(
        &|c| {
            c.nics[0].backend = NicBackend::User {
                forwards: vec!["1-:2".parse().unwrap(); 33],
            }
        },
        "nic:net0: 33 port forwards, at most 32",
    );
    check(
        &|c| {
            c.boot = Boot::Kernel {
                kernel: "/boot/vmlinux".into(),
                initrd: Some("initrd.img".into()),
                cmdline: None,
            }
        },
        "boot: path initrd.img must be absolute",
    );
    check(
        &|c| {
            c.boot = Boot::Default {
                cmdline: Some("a\nb".into()),
            }
        },
        "boot: cmdline must be one line of at most 2048 bytes",
    );
    assert_eq!(base().validate_config(), Ok(()));
}

// ---- diff, apply, rebase ----

#[test]
fn diff_is_minimal_and_sorted() {
    let a = base();
    let mut b = base();
    b.cpus = 2;
    b.memory = 1 << 30;
    b.disks.push(disk("data2", 2, Some(1)));
    b.disks[1].size = 2 << 30;
    b.nics.clear();
    let d = diff(&a, &b);
    let keys: Vec<String> = d.ops.iter().map(|op| op.key().to_string()).collect();
    assert_eq!(
        keys,
        ["cpu", "memory", "disk:data", "disk:data2", "nic:net0"]
    );
    assert!(matches!(d.ops[3], ElementOp::Add { .. }));
    assert!(matches!(d.ops[4], ElementOp::Remove { .. }));
    assert_eq!(apply(&a, &d).unwrap(), b);
    assert!(diff(&a, &a).is_empty());
}

#[test]
fn apply_is_strict() {
    let c = base();
    let err = |ops| apply(&c, &with_ops(ops)).unwrap_err().to_string();
    assert_eq!(
        err(vec![ElementOp::Add {
            key: key("disk:data"),
            element: Element::Disk(disk("data", 4, None)),
        }]),
        "cannot add disk:data: the config already has it"
    );
    assert_eq!(
        err(vec![ElementOp::Remove {
            key: key("nic:net1")
        }]),
        "cannot remove nic:net1: the config has no such element"
    );
    assert_eq!(
        err(vec![ElementOp::Modify {
            key: key("disk:x"),
            element: Element::Disk(disk("x", 4, None)),
        }]),
        "cannot modify disk:x: the config has no such element"
    );
    assert_eq!(
        err(vec![ElementOp::Remove { key: key("memory") }]),
        "cannot remove memory: every VM needs one (change it instead)"
    );
    assert_eq!(
        err(vec![ElementOp::Remove {
            key: key("disk:root")
        }]),
        "cannot remove disk:root: it is the boot disk (boot from something else first)"
    );
    assert_eq!(
        err(vec![ElementOp::Modify {
            key: key("disk:data"),
            element: Element::Disk(disk("other", 1, None)),
        }]),
        "element disk:data holds the value of disk:other"
    );
    assert_eq!(
        err(vec![ElementOp::Modify {
            key: ElementKey::Cpu,
            element: Element::Cpu(0),
        }]),
        "invalid vCPU count 0: must be between 1 and 255"
    );
    // Removing the boot disk is fine when the same diff boots from something else.
    let ok = apply(
        &c,
        &with_ops(vec![
            ElementOp::Modify {
                key: ElementKey::Boot,
                element: Element::Boot(Boot::Default { cmdline: None }),
            },
            ElementOp::Remove {
                key: key("disk:root"),
            },
        ]),
    )
    .unwrap();
    assert_eq!(ok.disks.len(), 1);
}

#[test]
fn rebase_keeps_the_result() {
    let old = base();
    let mut target = base();
    target.cpus = 4;
    target.disks.push(disk("data2", 2, Some(0)));
    let d = diff(&old, &target);
    let mut new_base = base();
    new_base.cpus = 4;
    new_base.disks.remove(1);
    let r = rebase(&old, &d, &new_base).unwrap();
    assert_eq!(apply(&new_base, &r).unwrap(), target);
    assert_eq!(
        r.to_string(),
        "+ disk:data 1G qcow2\n+ disk:data2 1G qcow2 slot 0"
    );
    let bad = with_ops(vec![ElementOp::Remove { key: key("nic:x") }]);
    assert!(rebase(&old, &bad, &new_base).is_err());
}

#[test]
fn display_and_describe() {
    let a = base();
    let mut b = base();
    b.cpus = 2;
    b.memory = 1 << 30;
    b.accel = Some(Accel::Kvm);
    b.boot = Boot::Default {
        cmdline: Some("quiet".into()),
    };
    let mut data2 = disk("data2", 2, Some(1));
    data2.size = 64 << 20;
    data2.readonly = true;
    b.disks.push(data2);
    b.disks[1].size = 2 << 30;
    b.disks[1].slot = Some(3);
    b.nics[0].backend = NicBackend::Tap {
        ifname: "tap0".into(),
    };
    b.nics.push(NicConfig {
        backend: NicBackend::User {
            forwards: vec![PortForward {
                proto: Proto::Tcp,
                host_addr: [127, 0, 0, 1].into(),
                host_port: 2222,
                guest_port: 22,
            }],
        },
        ..nic("net1", Some(2))
    });
    let d = diff(&a, &b);
    assert_eq!(
        d.to_string(),
        "~ cpu -> 2\n\
         ~ memory -> 1G\n\
         ~ machine -> accel kvm\n\
         ~ boot -> default image cmdline \"quiet\"\n\
         ~ disk:data -> 2G qcow2 slot 3\n\
         + disk:data2 64M qcow2 ro slot 1\n\
         ~ nic:net0 -> tap tap0 52:54:00:00:00:04\n\
         + nic:net1 user 52:54:00:00:00:04 fwd tcp:127.0.0.1:2222-:22 slot 2"
    );
    assert_eq!(
        describe(&a, &d),
        [
            "~ cpu 1 -> 2",
            "~ memory 512M -> 1G",
            "~ machine accel auto -> accel kvm",
            "~ boot disk:root -> default image cmdline \"quiet\"",
            "~ disk:data size 1G -> 2G, slot none -> 3",
            "+ disk:data2 64M qcow2 ro slot 1",
            "~ nic:net0 backend user -> tap tap0",
            "+ nic:net1 user 52:54:00:00:00:04 fwd tcp:127.0.0.1:2222-:22 slot 2",
        ]
    );
    let back = diff(&b, &a);
    let lines = describe(&b, &back);
    assert_eq!(lines[5], "- disk:data2");
    assert_eq!(lines[7], "- nic:net1");
    assert_eq!(ConfigDiff::default().to_string(), "");
}

// ---- compose ----

fn compose_from(f: impl FnOnce(&mut Compose)) -> Result<VmConfig, ConfigError> {
    let mut c = Compose {
        base: base(),
        without: Vec::new(),
        with: Vec::new(),
        set_cpus: None,
        set_memory: None,
    };
    f(&mut c);
    compose(&c)
}

#[test]
fn compose_builds_the_config() {
    let mut other_data = disk("data", 1, None);
    other_data.size = 8 << 30;
    let got = compose_from(|c| {
        c.without.push(key("nic:net0"));
        c.with.push((
            "generation 3".into(),
            key("nic:net1"),
            Element::Nic(nic("net1", None)),
        ));
        // Taking an element the base has replaces it.
        c.with.push((
            "generation 2".into(),
            key("disk:data"),
            Element::Disk(other_data.clone()),
        ));
        c.set_cpus = Some(2);
        c.set_memory = Some(2 << 30);
    })
    .unwrap();
    let mut want = base();
    want.cpus = 2;
    want.memory = 2 << 30;
    want.disks[1] = other_data;
    want.nics = vec![nic("net1", None)];
    assert_eq!(got, want);
    assert_eq!(compose_from(|_| {}).unwrap(), base());
}

#[test]
fn compose_errors() {
    let err = |f: &dyn Fn(&mut Compose)| compose_from(f).unwrap_err().to_string();
    assert_eq!(
        err(&|c| c.without.push(ElementKey::Cpu)),
        "cannot remove cpu: every VM needs one (change it instead)"
    );
    assert_eq!(
        err(&|c| c.without.push(key("disk:nope"))),
        "cannot remove disk:nope: the config has no such element"
    );
    assert_eq!(
        err(&|c| c.without.push(key("disk:root"))),
        "cannot remove disk:root: it is the boot disk (boot from something else first)"
    );
    assert_eq!(
        err(&|c| {
            c.without.push(key("disk:data"));
            c.with.push((
                "gen 2".into(),
                key("disk:data"),
                Element::Disk(disk("data", 1, None)),
            ));
        }),
        "disk:data is both removed and taken from gen 2: drop one of the two"
    );
    assert_eq!(
        err(&|c| {
            c.with.push((
                "gen 2".into(),
                key("disk:x"),
                Element::Disk(disk("x", 5, None)),
            ));
            c.with.push((
                "gen 3".into(),
                key("disk:x"),
                Element::Disk(disk("x", 6, None)),
            ));
        }),
        "disk:x is taken twice, from gen 2 and from gen 3: take it once"
    );
    assert_eq!(
        err(&|c| {
            c.with
                .push(("gen 2".into(), ElementKey::Cpu, Element::Cpu(4)));
            c.set_cpus = Some(2);
        }),
        "cpu is both set and taken from gen 2: drop one of the two"
    );
    assert_eq!(
        err(&|c| c
            .with
            .push(("gen 2".into(), key("disk:x"), Element::Disk(disk("x", 1, None))))),
        "disk:data and disk:x both use disk index 1: give each disk its own place in the disk order"
    );
    assert_eq!(
        err(&|c| {
            c.with.push((
                "gen 2".into(),
                key("disk:x"),
                Element::Disk(disk("x", 2, Some(1))),
            ));
            c.with.push((
                "gen 3".into(),
                key("nic:y"),
                Element::Nic(nic("y", Some(1))),
            ));
        }),
        "disk:x and nic:y both use hot-plug slot 1"
    );
    assert_eq!(
        err(&|c| c
            .with
            .push(("gen 2".into(), key("disk:x"), Element::Nic(nic("x", None))))),
        "element disk:x holds the value of nic:x"
    );
    assert_eq!(
        err(&|c| c.set_memory = Some(1 << 20)),
        "invalid memory 1M: must be at least 64M and a whole number of MiB"
    );
    // Naming an element twice in `without` removes it once.
    let c = compose_from(|c| c.without = vec![key("nic:net0"), key("nic:net0")]).unwrap();
    assert!(c.nics.is_empty());
}

// ---- history ----

#[test]
fn history_seal_resolve_delete() {
    let mut h = ConfigHistory::new(base());
    assert_eq!(h.latest(), None);
    assert_eq!(
        h.seal(&base(), PersistMode::Diff, "droverd", "shutdown", 1),
        Ok(None)
    );
    let mut c1 = base();
    c1.cpus = 2;
    assert_eq!(
        h.seal(&c1, PersistMode::Diff, "droverd", "shutdown", 2),
        Ok(Some(1))
    );
    assert_eq!(
        h.seal(&c1, PersistMode::Snapshot, "droverd", "shutdown", 3),
        Ok(None)
    );
    let mut c2 = c1.clone();
    c2.disks.push(disk("data2", 2, Some(0)));
    assert_eq!(
        h.seal(
            &c2,
            PersistMode::Snapshot,
            "alice",
            "hot-plugged disk:data2",
            4
        ),
        Ok(Some(2))
    );
    // Back to the initial config is a change from generation 2.
    assert_eq!(
        h.seal(&base(), PersistMode::Diff, "droverd", "shutdown", 5),
        Ok(Some(3))
    );
    assert_eq!(h.latest(), Some(3));
    assert_eq!(h.resolve(1).unwrap(), c1);
    assert_eq!(h.resolve(2).unwrap(), c2);
    assert_eq!(h.resolve(3).unwrap(), base());
    assert!(matches!(h.generation(3).unwrap().stored, StoredConfig::Diff(ref d) if d.is_empty()));
    assert_eq!(
        h.element(2, &key("disk:data2")).unwrap(),
        Element::Disk(disk("data2", 2, Some(0)))
    );
    assert_eq!(
        h.element(1, &key("disk:data2")).unwrap_err().to_string(),
        "config generation 1 has no disk:data2"
    );
    assert_eq!(
        h.resolve(9).unwrap_err().to_string(),
        "unknown config generation 9: the VM has generations 0 (initial), 1, 2, 3"
    );
    let mut invalid = base();
    invalid.cpus = 0;
    assert!(h.seal(&invalid, PersistMode::Diff, "x", "y", 6).is_err());

    assert_eq!(h.delete(0), Err(ConfigError::DeleteInitial));
    assert_eq!(h.delete(2).unwrap().who, "alice");
    assert_eq!(h.ids(), [0, 1, 3]);
    assert_eq!(h.resolve(1).unwrap(), c1);
    assert!(matches!(
        h.delete(2),
        Err(ConfigError::UnknownGeneration { id: 2, .. })
    ));
    assert!(matches!(
        h.promote(2),
        Err(ConfigError::UnknownGeneration { id: 2, .. })
    ));
}

#[test]
fn history_promote() {
    let mut h = ConfigHistory::new(base());
    let mut c1 = base();
    c1.memory = 1 << 30;
    c1.disks.push(disk("data2", 2, Some(1)));
    let mut c2 = base();
    c2.nics.clear();
    h.seal(&c1, PersistMode::Diff, "a", "b", 1).unwrap();
    h.seal(&c2, PersistMode::Diff, "a", "b", 2).unwrap();
    h.promote(0).unwrap();
    assert_eq!(h.initial_version, 1);
    h.promote(1).unwrap();
    assert_eq!(h.initial_version, 2);
    assert_eq!(h.initial, c1);
    assert_eq!(h.resolve(0).unwrap(), c1);
    assert_eq!(h.resolve(1).unwrap(), c1);
    assert_eq!(h.resolve(2).unwrap(), c2);
    assert!(matches!(h.generation(1).unwrap().stored, StoredConfig::Diff(ref d) if d.is_empty()));

    // A diff that no longer applies fails the promotion and leaves the history alone.
    let mut broken = h.clone();
    broken.generations[1].stored = StoredConfig::Diff(with_ops(vec![ElementOp::Remove {
        key: key("nic:gone"),
    }]));
    let before = broken.clone();
    assert!(broken.promote(1).is_err());
    assert_eq!(broken, before);
}

#[test]
fn history_serializes() {
    let mut h = ConfigHistory::new(base());
    let mut c = base();
    c.cpus = 3;
    h.seal(&c, PersistMode::Snapshot, "a", "b", 1).unwrap();
    c.cpus = 4;
    h.seal(&c, PersistMode::Diff, "a", "b", 2).unwrap();
    let json = serde_json::to_value(&h).unwrap();
    assert_eq!(json["generations"][0]["stored"]["kind"], "snapshot");
    assert_eq!(json["generations"][0]["stored"]["cpus"], 3);
    assert_eq!(json["generations"][1]["stored"]["kind"], "diff");
    assert_eq!(json["generations"][1]["stored"]["ops"][0]["key"], "cpu");
    let back: ConfigHistory = serde_json::from_value(json).unwrap();
    assert_eq!(back, h);
}

#[test]
fn persist_mode_text() {
    for m in [PersistMode::Snapshot, PersistMode::Diff] {
        assert_eq!(m.to_string().parse::<PersistMode>(), Ok(m));
        assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{m}\""));
    }
    assert_eq!(
        "full".parse::<PersistMode>().unwrap_err().to_string(),
        "unknown persistence mode \"full\": use snapshot or diff"
    );
}

// ---- properties ----

/// Disk and NIC ids come from small pools so independent configs share many of them.
const DISK_IDS: [&str; 6] = ["root", "data", "logs", "d3", "scratch", "cache"];
const NIC_IDS: [&str; 5] = ["net0", "net1", "wan", "lan", "mgmt"];

fn arb_accel() -> impl Strategy<Value = Option<Accel>> {
    prop_oneof![Just(None), Just(Some(Accel::Kvm)), Just(Some(Accel::Tcg))]
}

fn arb_cmdline() -> impl Strategy<Value = Option<String>> {
    proptest::option::of("[a-z=. ]{0,20}")
}

/// Path directory, size in MiB, format, read-only, owned.
fn arb_disk_body() -> impl Strategy<Value = (&'static str, u64, DiskFormat, bool, bool)> {
    (
        select(vec!["/var/lib/drover/vm", "/srv/images"]),
        1u64..100_000,
        prop_oneof![Just(DiskFormat::Qcow2), Just(DiskFormat::Raw)],
        any::<bool>(),
        any::<bool>(),
    )
}

fn arb_backend() -> impl Strategy<Value = NicBackend> {
    let forward =
        (any::<bool>(), 1u16.., 1u16..).prop_map(|(udp, host_port, guest_port)| PortForward {
            proto: if udp { Proto::Udp } else { Proto::Tcp },
            host_addr: [127, 0, 0, 1].into(),
            host_port,
            guest_port,
        });
    prop_oneof![
        proptest::collection::vec(forward, 0..=2)
            .prop_map(|forwards| NicBackend::User { forwards }),
        select(vec!["tap0", "tap1", "br-tap_2"]).prop_map(|t| NicBackend::Tap {
            ifname: t.to_string()
        }),
    ]
}

/// 0 default image, 1 kernel, 2 a disk (default image when there are no disks).
fn arb_boot() -> impl Strategy<Value = (u8, Option<String>, Index)> {
    (0u8..3, arb_cmdline(), any::<Index>())
}

/// Valid configs named `vm`, in canonical form.
fn arb_config() -> impl Strategy<Value = VmConfig> {
    (1u32..=8, 64u64..=4096, 0usize..=5, 0usize..=3)
        .prop_flat_map(|(cpus, mib, nd, nn)| {
            (
                (Just(cpus), Just(mib), arb_accel(), arb_boot()),
                subsequence(DISK_IDS.to_vec(), nd).prop_shuffle(),
                subsequence((0u32..12).collect::<Vec<_>>(), nd),
                proptest::collection::vec(arb_disk_body(), nd),
                subsequence(NIC_IDS.to_vec(), nn),
                proptest::collection::vec((any::<[u8; 3]>(), arb_backend()), nn),
                Just((0u8..8).collect::<Vec<_>>()).prop_shuffle(),
                proptest::collection::vec(any::<bool>(), nd + nn),
            )
        })
        .prop_map(
            |((cpus, mib, accel, boot), disk_ids, indexes, bodies, nic_ids, nics, slots, hot)| {
                let mut slots = slots.into_iter();
                let mut hot = hot.into_iter();
                let mut slot = || {
                    if hot.next().unwrap_or(false) {
                        slots.next()
                    } else {
                        None
                    }
                };
                let disks: Vec<DiskConfig> = disk_ids
                    .iter()
                    .zip(indexes)
                    .zip(bodies)
                    .map(
                        |((name, index), (dir, mib, format, readonly, owned))| DiskConfig {
                            id: id(name),
                            path: PathBuf::from(format!("{dir}/{name}.img")),
                            format,
                            size: mib << 20,
                            readonly,
                            owned,
                            base: None,
                            index,
                            slot: slot(),
                            addr: None,
                        },
                    )
                    .collect();
                let nics: Vec<NicConfig> = nic_ids
                    .iter()
                    .zip(nics)
                    .map(|(name, (seed, backend))| NicConfig {
                        id: id(name),
                        mac: MacAddr::qemu_local(seed),
                        backend,
                        slot: slot(),
                        addr: None,
                    })
                    .collect();
                let (kind, cmdline, pick) = boot;
                let boot = match kind {
                    1 => Boot::Kernel {
                        kernel: "/boot/vmlinux".into(),
                        initrd: cmdline.as_ref().map(|_| "/boot/initrd".into()),
                        cmdline,
                    },
                    2 if !disks.is_empty() => Boot::Disk {
                        disk: disks[pick.index(disks.len())].id.clone(),
                    },
                    _ => Boot::Default { cmdline },
                };
                let mut config = VmConfig {
                    name: VmName::new("vm").unwrap(),
                    cpus,
                    memory: mib << 20,
                    disks,
                    nics,
                    boot,
                    accel,
                    max_memory: (mib % 3 == 0).then_some((mib << 20) * 2),
                };
                // Configs from before PCI slots were recorded, and configs with them.
                if cpus % 2 == 0 {
                    config.pin_pci();
                }
                VmConfig::from_elements(config.name.clone(), config.elements()).unwrap()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn apply_diff_yields_target(a in arb_config(), b in arb_config()) {
        let d = diff(&a, &b);
        prop_assert_eq!(apply(&a, &d).unwrap(), b);
        let keys: Vec<&ElementKey> = d.ops.iter().map(ElementOp::key).collect();
        prop_assert!(keys.windows(2).all(|w| w[0] < w[1]), "one op per key, sorted");
        prop_assert_eq!(describe(&a, &d).len(), d.ops.len());
        let json = serde_json::to_string(&d).unwrap();
        prop_assert_eq!(serde_json::from_str::<ConfigDiff>(&json).unwrap(), d);
    }

    #[test]
    fn diff_with_itself_is_empty(a in arb_config()) {
        prop_assert!(diff(&a, &a).is_empty());
        prop_assert_eq!(apply(&a, &ConfigDiff::default()).unwrap(), a.clone());
        let mut n = a.clone();
        n.normalize();
        prop_assert_eq!(n, a);
    }

    #[test]
    fn rebase_keeps_what_a_diff_yields(
        old in arb_config(),
        target in arb_config(),
        new_base in arb_config(),
    ) {
        let d = diff(&old, &target);
        let r = rebase(&old, &d, &new_base).unwrap();
        prop_assert_eq!(apply(&new_base, &r).unwrap(), apply(&old, &d).unwrap());
    }

    #[test]
    fn promote_keeps_every_generation(
        initial in arb_config(),
        sealed in proptest::collection::vec((arb_config(), any::<bool>()), 1..6),
        pick in any::<Index>(),
    ) {
        let mut h = ConfigHistory::new(initial);
        for (i, (config, snapshot)) in (0u64..).zip(&sealed) {
            let mode = if *snapshot { PersistMode::Snapshot } else { PersistMode::Diff };
            h.seal(config, mode, "test", "prop", i).unwrap();
            // Sealing what was just sealed stores nothing.
            prop_assert_eq!(h.seal(config, mode, "test", "again", i), Ok(None));
        }
        let ids = h.ids();
        let before: Vec<VmConfig> = ids.iter().map(|&id| h.resolve(id).unwrap()).collect();
        let chosen = ids[pick.index(ids.len())];
        h.promote(chosen).unwrap();
        // Generation 0 is the initial config, which is what promotion changes.
        for (&id, config) in ids.iter().zip(&before).skip(1) {
            prop_assert_eq!(&h.resolve(id).unwrap(), config, "generation {}", id);
        }
        prop_assert_eq!(&h.resolve(0).unwrap(), &before[pick.index(ids.len())]);
        prop_assert_eq!(h.initial_version, if chosen == 0 { 1 } else { 2 });
        let latest = h.resolve(h.latest().unwrap_or(0)).unwrap();
        prop_assert_eq!(h.seal(&latest, PersistMode::Diff, "t", "p", 99), Ok(None));
    }
}

// ---- PCI slots ----

/// A config without recorded slots gets the layout it booted with before (root ports 1-4, the
/// guest channel 5, then disks and NICs in order); after that, adding or removing a device
/// never moves another one, and a hot-plugged device keeps its port.
#[test]
fn pci_slots_are_pinned_once_and_never_move() {
    let mut c = base();
    c.pin_pci();
    let addrs = |c: &VmConfig| -> Vec<(String, Option<u8>)> {
        c.disks
            .iter()
            .map(|d| (d.id.to_string(), d.addr))
            .chain(c.nics.iter().map(|n| (n.id.to_string(), n.addr)))
            .collect()
    };
    assert_eq!(
        addrs(&c),
        [
            ("root".to_string(), Some(6)),
            ("data".to_string(), Some(7)),
            ("net0".to_string(), Some(8))
        ]
    );
    let pinned = c.clone();
    c.pin_pci();
    assert_eq!(c, pinned, "pinning twice changes nothing");

    // A disk added later goes after everything; net0 stays at 8.
    c.disks.push(disk("data2", 2, None));
    c.pin_pci();
    assert_eq!(c.nics[0].addr, Some(8));
    assert_eq!(c.disks[2].addr, Some(9));
    // Removing a disk frees its slot without moving the others.
    c.disks.retain(|d| d.id.as_str() != "data");
    c.pin_pci();
    assert_eq!(
        addrs(&c),
        [
            ("root".to_string(), Some(6)),
            ("data2".to_string(), Some(9)),
            ("net0".to_string(), Some(8))
        ]
    );
    // A hot-plugged device stays on its port and takes no root-bus slot.
    c.nics.push(nic("net1", Some(0)));
    c.pin_pci();
    assert_eq!(c.nics[1].addr, None);
    c.validate_config().unwrap();
    // The slots go through elements (generations, diffs, compositions) unchanged.
    let rebuilt = VmConfig::from_elements(c.name.clone(), c.elements()).unwrap();
    assert_eq!(addrs(&rebuilt), addrs(&c));
    let json = serde_json::to_string(&c).unwrap();
    assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), c);

    // When the slots after the last one run out, the first free one is taken.
    let mut full = base();
    full.disks[0].addr = Some(PCI_LAST_ADDR);
    full.pin_pci();
    assert_eq!(full.disks[1].addr, Some(PCI_FIRST_DEVICE_ADDR));
    assert_eq!(full.nics[0].addr, Some(PCI_FIRST_DEVICE_ADDR + 1));
}

#[test]
fn pci_slots_are_checked() {
    let mut c = base();
    c.pin_pci();
    c.nics[0].addr = c.disks[0].addr;
    assert_eq!(
        c.validate_config().unwrap_err().to_string(),
        "disk:root and nic:net0 both use PCI slot 6 of the root bus; give one of them another slot or none"
    );
    c.nics[0].addr = Some(0x1f);
    assert!(c
        .validate_config()
        .unwrap_err()
        .to_string()
        .contains("outside 6..=30"));
    c.nics[0].addr = Some(9);
    c.nics[0].slot = Some(1);
    assert!(c
        .validate_config()
        .unwrap_err()
        .to_string()
        .contains("a device has one place"));
}

/// A device taken from another generation keeps its slot unless a device of the base holds it.
#[test]
fn composed_configs_keep_slots_and_resolve_clashes() {
    let mut a = base();
    a.pin_pci();
    let mut other = a.clone();
    other.nics.push(nic("net1", None));
    other.disks.retain(|d| d.id.as_str() != "data");
    other.nics[1].addr = Some(7); // data's slot in `a`
    let mut net2 = nic("net2", None);
    net2.addr = Some(20);
    let c = compose(&Compose {
        base: a.clone(),
        without: Vec::new(),
        with: vec![
            (
                "gen 2".into(),
                key("nic:net1"),
                Element::Nic(other.nics[1].clone()),
            ),
            ("gen 3".into(), key("nic:net2"), Element::Nic(net2)),
        ],
        set_cpus: None,
        set_memory: None,
    })
    .unwrap();
    let addr = |id: &str| {
        c.nics
            .iter()
            .find(|n| n.id.as_str() == id)
            .and_then(|n| n.addr)
    };
    assert_eq!(addr("net0"), Some(8));
    assert_eq!(addr("net2"), Some(20), "no clash: kept");
    assert_eq!(
        addr("net1"),
        Some(21),
        "clashed with disk:data: the next free slot"
    );
    assert_eq!(c.disks[1].addr, Some(7));
}
