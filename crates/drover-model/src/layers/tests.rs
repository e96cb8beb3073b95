use super::*;
use crate::config::ConfigHistory;
use crate::spec::{Boot, DiskConfig, DiskFormat, ElementId, VmConfig, VmName};
use crate::PersistMode;
use proptest::prelude::*;

/// A VM with one disk, `data`, at `origin`.
fn config(origin: &Path) -> VmConfig {
    VmConfig {
        name: VmName::new("p2").unwrap(),
        cpus: 1,
        memory: 256 << 20,
        disks: vec![DiskConfig::unplaced(
            ElementId::new("data").unwrap(),
            origin.to_path_buf(),
            DiskFormat::Qcow2,
            64 << 20,
            false,
            true,
        )],
        nics: Vec::new(),
        boot: Boot::Default { cmdline: None },
        accel: None,
        max_memory: None,
    }
}

/// qcow2 files as a model: each layer has an optional backing layer and the blocks written to
/// it; a read falls through to the backing layer.
#[derive(Default)]
struct Files {
    layers: BTreeMap<PathBuf, (Option<PathBuf>, BTreeMap<u8, u32>)>,
}

impl Files {
    fn create(&mut self, path: &Path, backing: Option<&Path>) {
        assert!(
            !self.layers.contains_key(path),
            "{} made twice",
            path.display()
        );
        self.layers.insert(
            path.to_path_buf(),
            (backing.map(Path::to_path_buf), BTreeMap::new()),
        );
    }
    fn write(&mut self, path: &Path, block: u8, v: u32) {
        self.layers
            .get_mut(path)
            .expect("layer exists")
            .1
            .insert(block, v);
    }
    /// Every block as the guest would read it through `path`.
    fn read(&self, path: &Path) -> BTreeMap<u8, u32> {
        let mut chain = Vec::new();
        let mut at = Some(path.to_path_buf());
        while let Some(p) = at {
            let (b, blocks) = &self.layers[&p];
            chain.push(blocks);
            at = b.clone();
        }
        let mut out = BTreeMap::new();
        for blocks in chain.into_iter().rev() {
            out.extend(blocks.iter().map(|(k, v)| (*k, *v)));
        }
        out
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Start with generation g (0: the initial config, as with persistence off).
    Start(u8),
    /// A live change (sealed as a generation at the next stop).
    Cpus(u8),
    Write(u8, u32),
    Save,
    Stop,
    Restore(u8),
    DeleteState(u8),
    /// Promote generation g: configs change, disks do not.
    Promote(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4).prop_map(Op::Start),
        (1u8..4).prop_map(Op::Cpus),
        (0u8..8, any::<u32>()).prop_map(|(b, v)| Op::Write(b, v)),
        Just(Op::Save),
        Just(Op::Stop),
        (0u8..6).prop_map(Op::Restore),
        (0u8..6).prop_map(Op::DeleteState),
        (0u8..4).prop_map(Op::Promote),
    ]
}

/// What a user expects: the disk's current content, and each state's content as saved.
#[derive(Default)]
struct Expected {
    current: BTreeMap<u8, u32>,
    states: BTreeMap<String, BTreeMap<u8, u32>>,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn disks_keep_their_content_and_states_are_never_written(ops in prop::collection::vec(op(), 1..60)) {
        let origin = PathBuf::from("/vm/disks/data.qcow2");
        let mut history = ConfigHistory::new(config(&origin));
        let mut files = Files::default();
        files.create(&origin, None);
        let mut layers = DiskLayers::new();
        let mut want = Expected::default();
        // The layer QEMU writes to while the VM runs; state id -> its pinned layer.
        let mut running: Option<PathBuf> = None;
        let mut running_cfg: Option<VmConfig> = None;
        let mut state_layer: BTreeMap<String, PathBuf> = BTreeMap::new();
        let (mut n, mut next_state) = (0u32, 0u32);
        let mut fresh = |what: &str| { n += 1; PathBuf::from(format!("/vm/disks/data.{what}{n}.qcow2")) };
        for op in ops {
            match op {
                Op::Start(g) if running.is_none() => {
                    let ids = history.ids();
                    let cfg = history.resolve(ids[g as usize % ids.len()]).unwrap();
                    // The config names the disk's origin, whatever was saved or sealed since.
                    prop_assert_eq!(&cfg.disks[0].path, &origin);
                    let layer = match layers.plan_open(&cfg.disks[0].path) {
                        OpenPlan::Use(p) => p,
                        OpenPlan::Overlay { backing } => {
                            let o = fresh("o");
                            files.create(&o, Some(&backing));
                            o
                        }
                    };
                    layers.set_top(&origin, &layer).unwrap();
                    running = Some(layer);
                    running_cfg = Some(cfg);
                }
                Op::Cpus(c) => {
                    if let Some(cfg) = running_cfg.as_mut() {
                        cfg.cpus = c as u32;
                    }
                }
                Op::Write(b, v) => {
                    if let Some(layer) = &running {
                        prop_assert!(!layers.is_pinned(layer), "guest writes to a pinned layer");
                        files.write(layer, b, v);
                        want.current.insert(b, v);
                    }
                }
                Op::Save if running.is_some() => {
                    next_state += 1;
                    let id = format!("s{next_state}");
                    let overlay = fresh("s");
                    let top = layers.top(&origin).to_path_buf();
                    files.create(&overlay, Some(&top));
                    let pinned = layers.save(&origin, &id, &overlay).unwrap();
                    prop_assert_eq!(&pinned, running.as_ref().unwrap());
                    state_layer.insert(id.clone(), pinned);
                    running = Some(overlay);
                    want.states.insert(id, want.current.clone());
                }
                Op::Stop => {
                    running = None;
                    if let Some(cfg) = running_cfg.take() {
                        // Sealing records only real changes: the disk never moved.
                        if let Some(g) = history.seal(&cfg, PersistMode::Diff, "t", "stop", 0).unwrap() {
                            prop_assert_eq!(history.resolve(g).unwrap().cpus, cfg.cpus);
                            prop_assert_eq!(&history.resolve(g).unwrap().disks, &config(&origin).disks);
                        }
                    }
                }
                Op::Restore(i) => {
                    let Some(id) = state_layer.keys().nth(i as usize).cloned() else { continue };
                    running_cfg = Some(history.resolve(history.latest().unwrap_or(0)).unwrap());
                    let backing = layers.plan_restore(&id, &state_layer[&id]).unwrap();
                    let o = fresh("r");
                    files.create(&o, Some(&backing));
                    layers.set_top(&origin, &o).unwrap();
                    running = Some(o);
                    want.current = want.states[&id].clone();
                }
                Op::DeleteState(i) => {
                    let Some(id) = state_layer.keys().nth(i as usize).cloned() else { continue };
                    layers.unpin(&id);
                    state_layer.remove(&id);
                    want.states.remove(&id);
                }
                Op::Promote(g) => {
                    let ids = history.ids();
                    history.promote(ids[g as usize % ids.len()]).unwrap();
                }
                Op::Start(_) | Op::Save => {}
            }
            // What a user checks after every step.
            prop_assert_eq!(files.read(layers.top(&origin)), want.current.clone());
            for (id, layer) in &state_layer {
                prop_assert!(layers.is_pinned(layer));
                prop_assert_eq!(&files.read(layer), &want.states[id], "state {} changed", id);
                prop_assert!(layers.check_writable(layer).is_err());
            }
            if let Some(r) = &running {
                prop_assert_eq!(r.as_path(), layers.top(&origin));
            }
        }
    }
}

#[test]
fn a_pinned_layer_is_never_handed_out_to_write() {
    let origin = Path::new("/d/data.qcow2");
    let mut l = DiskLayers::new();
    assert_eq!(l.plan_open(origin), OpenPlan::Use(origin.to_path_buf()));
    let pinned = l.save(origin, "s1", Path::new("/d/o1")).unwrap();
    assert_eq!(pinned, origin);
    // Starting any config that names the origin now writes above the state.
    l.tops.clear();
    assert_eq!(
        l.plan_open(origin),
        OpenPlan::Overlay {
            backing: origin.to_path_buf()
        }
    );
    let err = l.set_top(origin, origin).unwrap_err();
    assert!(matches!(err, LayerError::Pinned { .. }), "{err}");
    assert!(err.to_string().contains("s1"));
    assert!(l.save(origin, "s2", origin).is_err());
    assert!(l.plan_restore("s2", origin).is_err());
    assert_eq!(l.unpin("s1"), vec![origin.to_path_buf()]);
    assert!(l.check_writable(origin).is_ok());
}

#[test]
fn newer_records_are_refused() {
    let l = DiskLayers {
        format: LAYERS_FORMAT + 1,
        ..DiskLayers::new()
    };
    assert!(l.check_format().is_err());
}

#[test]
fn origin_below_follows_drover_layers_only() {
    let backing: BTreeMap<PathBuf, PathBuf> = [
        ("/vm/disks/data.s2-9.qcow2", "/vm/disks/data.s1-5.qcow2"),
        ("/vm/disks/data.s1-5.qcow2", "/img/user.qcow2"),
        ("/img/user.qcow2", "/img/base.qcow2"),
    ]
    .into_iter()
    .map(|(a, b)| (PathBuf::from(a), PathBuf::from(b)))
    .collect();
    let is_layer = |p: &Path| p.starts_with("/vm/disks") && p != Path::new("/vm/disks/data.qcow2");
    let below = |p: &Path| backing.get(p).cloned();
    assert_eq!(
        origin_below(Path::new("/vm/disks/data.s2-9.qcow2"), below, is_layer),
        PathBuf::from("/img/user.qcow2")
    );
    assert_eq!(
        origin_below(
            Path::new("/img/user.qcow2"),
            |p| backing.get(p).cloned(),
            is_layer
        ),
        PathBuf::from("/img/user.qcow2")
    );
}
