//! Kernel module selection: which `.ko` files go into the initramfs, and in which order `/init`
//! loads them (dependencies first).
//!
//! The dependency table comes from `modules.dep` when the kernel tree has one. Debian's kernel
//! packages do not ship it (the package's postinst runs `depmod`, and we never install the package),
//! so otherwise it is built from each needed module's `.modinfo` section (`depends=`), reading only
//! the modules in the closure instead of all ~4000.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::elf;

/// Whether a wanted module must be there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Boot cannot work without it: error if it is neither a module nor built in.
    Required,
    /// Nice to have: skipped (and reported) if the kernel has no such module.
    Optional,
}

/// The modules `/init` loads before it reports ready: the virtio drivers in the order given in
/// PLATFORM.md, then what the agent needs to see the ACPI power button (evdev, button).
pub const BOOT: &[(&str, Need)] = &[
    ("virtio_ring", Need::Required),
    ("virtio", Need::Required),
    ("virtio_console", Need::Required),
    ("virtio_blk", Need::Required),
    ("failover", Need::Required),
    ("net_failover", Need::Required),
    ("virtio_net", Need::Required),
    ("virtio_pci_modern_dev", Need::Required),
    ("virtio_pci_legacy_dev", Need::Required),
    ("virtio_pci", Need::Required),
    ("virtio_mmio", Need::Required),
    ("evdev", Need::Optional),
    ("button", Need::Optional),
    ("vmgenid", Need::Optional),
];

/// Modules only users' data disks need, loaded in the background after the ready marker: ext4
/// alone costs ~0.5 s of TCG boot time. ext4 and jbd2 name their checksum driver only as a soft
/// dependency on the alias `crypto-crc32c`, and without it mounting a metadata_csum filesystem
/// (mke2fs's default) fails, so the generic implementation is asked for explicitly.
pub const LATE: &[(&str, Need)] = &[("crc32c_generic", Need::Optional), ("ext4", Need::Optional)];

/// One module in the dependency table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    /// Path relative to `/lib/modules/<version>/`, e.g. `kernel/drivers/net/virtio_net.ko`.
    pub path: String,
    /// Names of the modules it needs loaded first (hard dependencies).
    pub deps: Vec<String>,
    /// Names of soft "pre" dependencies (loaded first when they exist as modules).
    pub soft_pre: Vec<String>,
}

/// Module name → entry.
pub type ModuleIndex = BTreeMap<String, ModuleEntry>;

/// The result of [`resolve`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resolved {
    /// Module names in load order (every module after its dependencies), no duplicates.
    pub order: Vec<String>,
    /// Wanted names skipped because the kernel has them built in.
    pub builtin: Vec<String>,
    /// Optional names skipped because the kernel has no such module.
    pub missing_optional: Vec<String>,
}

/// The module name for a path: the file name without `.ko[.xz|.zst|.gz]`, `-` turned into `_`
/// (what the kernel and modprobe do).
pub fn name_from_path(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.find(".ko").map_or(file, |i| &file[..i]);
    stem.replace('-', "_")
}

/// Parses `modules.dep`: `kernel/a.ko: kernel/b.ko kernel/c.ko` per line.
pub fn parse_modules_dep(text: &str) -> Result<ModuleIndex, String> {
    let mut index = ModuleIndex::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (module, deps) = line
            .split_once(':')
            .ok_or_else(|| format!("modules.dep line {}: no ':' in {line:?}", n + 1))?;
        let module = module.trim();
        let entry = ModuleEntry {
            path: module.to_string(),
            deps: deps.split_whitespace().map(name_from_path).collect(),
            soft_pre: Vec::new(),
        };
        index.insert(name_from_path(module), entry);
    }
    Ok(index)
}

/// Parses `modules.builtin` (one path per line) into module names.
pub fn parse_modules_builtin(text: &str) -> HashSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(name_from_path)
        .collect()
}

/// Parses a `.modinfo` section (NUL-separated `key=value` strings) into (depends, softdep pre).
pub fn parse_modinfo(section: &[u8]) -> (Vec<String>, Vec<String>) {
    let mut deps = Vec::new();
    let mut soft_pre = Vec::new();
    for item in section.split(|&b| b == 0) {
        let item = String::from_utf8_lossy(item);
        if let Some(v) = item.strip_prefix("depends=") {
            deps.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| s.replace('-', "_")),
            );
        } else if let Some(v) = item.strip_prefix("softdep=") {
            // "pre: a b post: c": only the names after "pre:" and before the next section.
            let mut in_pre = false;
            for word in v.split_whitespace() {
                match word {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    w if in_pre => soft_pre.push(w.replace('-', "_")),
                    _ => {}
                }
            }
        }
    }
    (deps, soft_pre)
}

/// All `.ko*` files under `root` (the `/lib/modules/<version>` directory), name → relative path.
pub fn scan_module_files(
    root: &Path,
) -> Result<BTreeMap<String, String>, (PathBuf, std::io::Error)> {
    let mut found = BTreeMap::new();
    let mut stack = vec![root.join("kernel")];
    while let Some(dir) = stack.pop() {
        let entries = fs::read_dir(&dir).map_err(|e| (dir.clone(), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| (dir.clone(), e))?;
            let path = entry.path();
            let ft = entry.file_type().map_err(|e| (path.clone(), e))?;
            if ft.is_dir() {
                stack.push(path);
            } else if entry.file_name().to_string_lossy().contains(".ko") {
                if let Ok(rel) = path.strip_prefix(root) {
                    let rel = rel.to_string_lossy().into_owned();
                    found.insert(name_from_path(&rel), rel);
                }
            }
        }
    }
    Ok(found)
}

/// Reads a module file, decompressing `.ko.xz`; other compressions are refused with a reason.
pub fn read_module(path: &Path) -> Result<Vec<u8>, String> {
    let data = fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.ends_with(".ko") {
        Ok(data)
    } else if name.ends_with(".ko.xz") {
        liblzma::decode_all(&data[..]).map_err(|e| format!("xz decoding failed: {e}"))
    } else {
        Err("compressed with a method drover-image cannot decompress (only plain .ko and .ko.xz are \
             supported); use a kernel package with uncompressed or xz-compressed modules"
            .to_string())
    }
}

/// Builds a dependency table from the `.modinfo` sections of the modules reachable from `roots`
/// (hard and soft-pre dependencies), reading only those files.
pub fn index_from_modinfo(
    root: &Path,
    files: &BTreeMap<String, String>,
    roots: &[&str],
) -> Result<ModuleIndex, String> {
    let mut index = ModuleIndex::new();
    let mut queue: Vec<String> = roots.iter().map(|s| s.to_string()).collect();
    while let Some(name) = queue.pop() {
        if index.contains_key(&name) {
            continue;
        }
        let Some(rel) = files.get(&name) else {
            continue;
        };
        let path = root.join(rel);
        let data = read_module(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let section =
            elf::section(&data, ".modinfo").map_err(|e| format!("{}: {e}", path.display()))?;
        let (deps, soft_pre) = section.map(parse_modinfo).unwrap_or_default();
        queue.extend(deps.iter().cloned());
        queue.extend(soft_pre.iter().cloned());
        index.insert(
            name,
            ModuleEntry {
                path: rel.clone(),
                deps,
                soft_pre,
            },
        );
    }
    Ok(index)
}

/// Resolves `wanted` against `index` into a load order: depth-first, dependencies before the
/// module, each module once, none of those in `loaded` (already loaded by an earlier phase).
/// Built-in names are skipped; a missing required module or a missing hard dependency is an error
/// (the kernel tree would be inconsistent).
pub fn resolve(
    index: &ModuleIndex,
    builtin: &HashSet<String>,
    wanted: &[(&str, Need)],
    loaded: &[String],
) -> Result<Resolved, String> {
    let mut out = Resolved::default();
    let mut done: BTreeSet<String> = loaded.iter().cloned().collect();
    let mut visiting = Vec::new();
    for &(name, need) in wanted {
        let name = name.replace('-', "_");
        if index.contains_key(&name) {
            visit(
                index,
                builtin,
                &name,
                &mut done,
                &mut visiting,
                &mut out.order,
            )?;
        } else if builtin.contains(&name) {
            out.builtin.push(name);
        } else if need == Need::Required {
            return Err(format!(
                "required module {name} is neither a module nor built into the kernel"
            ));
        } else {
            out.missing_optional.push(name);
        }
    }
    Ok(out)
}

fn visit(
    index: &ModuleIndex,
    builtin: &HashSet<String>,
    name: &str,
    done: &mut BTreeSet<String>,
    visiting: &mut Vec<String>,
    order: &mut Vec<String>,
) -> Result<(), String> {
    if done.contains(name) {
        return Ok(());
    }
    if visiting.iter().any(|v| v == name) {
        return Err(format!(
            "dependency cycle: {} -> {name}",
            visiting.join(" -> ")
        ));
    }
    let Some(entry) = index.get(name) else {
        return Err(format!("module {name} is not in the module tree"));
    };
    visiting.push(name.to_string());
    for dep in &entry.deps {
        if index.contains_key(dep) {
            visit(index, builtin, dep, done, visiting, order)?;
        } else if !builtin.contains(dep) {
            return Err(format!(
                "module {name} depends on {dep}, which is neither a module nor built in"
            ));
        }
    }
    // Soft dependencies name aliases as often as modules (e.g. `crypto-crc32c`); only real
    // module names are followed.
    for dep in &entry.soft_pre {
        if index.contains_key(dep) {
            visit(index, builtin, dep, done, visiting, order)?;
        }
    }
    visiting.pop();
    done.insert(name.to_string());
    order.push(name.to_string());
    Ok(())
}

/// Renders a `modules.dep` for the modules in `order` (paths relative to the module directory),
/// so busybox `modprobe` works in the guest for what the image carries.
pub fn render_modules_dep(index: &ModuleIndex, order: &[String]) -> String {
    let mut s = String::new();
    for name in order {
        let Some(e) = index.get(name) else { continue };
        s.push_str(&plain_ko(&e.path));
        s.push(':');
        for d in e.deps.iter().filter_map(|d| index.get(d)) {
            s.push(' ');
            s.push_str(&plain_ko(&d.path));
        }
        s.push('\n');
    }
    s
}

/// The path of the (decompressed) module as stored in the initramfs: `x.ko.xz` → `x.ko`.
pub fn plain_ko(path: &str) -> String {
    match path.find(".ko") {
        Some(i) => format!("{}.ko", &path[..i]),
        None => path.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::testutil::module;

    const DEP: &str = "\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/fs/ext4/ext4.ko.xz: kernel/fs/jbd2/jbd2.ko.xz kernel/lib/crc16.ko.xz
kernel/fs/jbd2/jbd2.ko.xz:
kernel/lib/crc16.ko.xz:
kernel/arch/x86/crypto/crc32c-intel.ko:
";

    fn pos(order: &[String], n: &str) -> usize {
        order
            .iter()
            .position(|x| x == n)
            .unwrap_or_else(|| panic!("{n} not in {order:?}"))
    }

    #[test]
    fn resolves_dependencies_first_without_duplicates() {
        let index = parse_modules_dep(DEP).unwrap();
        let builtin = parse_modules_builtin(
            "kernel/drivers/virt/vmgenid.ko\nkernel/drivers/input/evdev.ko\n",
        );
        let wanted = [
            ("virtio_net", Need::Required),
            ("virtio_console", Need::Required),
            ("virtio_pci", Need::Required),
            ("evdev", Need::Optional),
            ("ext4", Need::Optional),
            ("crc32c-intel", Need::Optional),
            ("vmgenid", Need::Optional),
            ("button", Need::Optional),
        ];
        let r = resolve(&index, &builtin, &wanted, &[]).unwrap();
        assert_eq!(
            r.order,
            [
                "failover",
                "net_failover",
                "virtio_ring",
                "virtio",
                "virtio_net",
                "virtio_console",
                "virtio_pci_modern_dev",
                "virtio_pci",
                "jbd2",
                "crc16",
                "ext4",
                "crc32c_intel"
            ]
        );
        // Every dependency precedes its dependant; nothing twice.
        for (name, e) in &index {
            if let Some(i) = r.order.iter().position(|x| x == name) {
                for d in &e.deps {
                    assert!(pos(&r.order, d) < i, "{d} must load before {name}");
                }
            }
        }
        let unique: HashSet<_> = r.order.iter().collect();
        assert_eq!(unique.len(), r.order.len());
        assert_eq!(r.builtin, ["evdev", "vmgenid"]);
        assert_eq!(r.missing_optional, ["button"]);
    }

    #[test]
    fn missing_required_module_is_an_error() {
        let index = parse_modules_dep(DEP).unwrap();
        let err = resolve(
            &index,
            &HashSet::new(),
            &[("virtio_blk", Need::Required)],
            &[],
        )
        .unwrap_err();
        assert!(err.contains("virtio_blk"), "{err}");
        // Built in is fine.
        let builtin = parse_modules_builtin("kernel/drivers/block/virtio_blk.ko\n");
        let r = resolve(&index, &builtin, &[("virtio_blk", Need::Required)], &[]).unwrap();
        assert!(r.order.is_empty());
        assert_eq!(r.builtin, ["virtio_blk"]);
    }

    #[test]
    fn missing_dependency_and_cycles_are_errors() {
        let index = parse_modules_dep("kernel/a.ko: kernel/b.ko\n").unwrap();
        assert!(
            resolve(&index, &HashSet::new(), &[("a", Need::Required)], &[])
                .unwrap_err()
                .contains("depends on b")
        );
        let index =
            parse_modules_dep("kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n").unwrap();
        assert!(
            resolve(&index, &HashSet::new(), &[("a", Need::Required)], &[])
                .unwrap_err()
                .contains("cycle")
        );
        assert!(parse_modules_dep("garbage line\n").is_err());
    }

    #[test]
    fn names_from_paths() {
        assert_eq!(
            name_from_path("kernel/arch/x86/crypto/crc32c-intel.ko"),
            "crc32c_intel"
        );
        assert_eq!(name_from_path("kernel/fs/ext4/ext4.ko.zst"), "ext4");
        assert_eq!(
            plain_ko("kernel/fs/ext4/ext4.ko.xz"),
            "kernel/fs/ext4/ext4.ko"
        );
    }

    #[test]
    fn parses_modinfo_depends_and_softdeps() {
        let (deps, soft) =
            parse_modinfo(b"license=GPL\0softdep=pre: crypto-crc32c other post: after\0depends=jbd2,mbcache,crc16\0name=ext4\0");
        assert_eq!(deps, ["jbd2", "mbcache", "crc16"]);
        assert_eq!(soft, ["crypto_crc32c", "other"]);
        let (deps, soft) = parse_modinfo(b"depends=\0name=evdev\0");
        assert!(deps.is_empty() && soft.is_empty());
    }

    #[test]
    fn builds_index_from_modinfo_of_a_module_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let put = |rel: &str, modinfo: &[u8]| {
            let p = root.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, module(modinfo)).unwrap();
        };
        put(
            "kernel/fs/ext4/ext4.ko",
            b"softdep=pre: crypto-crc32c\0depends=jbd2,crc16\0",
        );
        put("kernel/fs/jbd2/jbd2.ko", b"depends=\0");
        put("kernel/lib/crc16.ko", b"depends=\0");
        put(
            "kernel/crypto/crc32c_generic.ko",
            b"alias=crypto-crc32c\0depends=\0",
        );
        put("kernel/drivers/gpu/huge.ko", b"depends=nothing\0");
        // An xz-compressed module is read through liblzma.
        let xz = liblzma::encode_all(&module(b"depends=\0")[..], 6).unwrap();
        fs::create_dir_all(root.join("kernel/input")).unwrap();
        fs::write(root.join("kernel/input/evdev.ko.xz"), xz).unwrap();

        let files = scan_module_files(root).unwrap();
        assert_eq!(files.len(), 6);
        assert_eq!(files["crc32c_generic"], "kernel/crypto/crc32c_generic.ko");
        let index =
            index_from_modinfo(root, &files, &["ext4", "evdev", "crc32c_generic", "absent"])
                .unwrap();
        // Only the closure was read, not the unrelated module.
        assert_eq!(
            index.keys().collect::<Vec<_>>(),
            ["crc16", "crc32c_generic", "evdev", "ext4", "jbd2"]
        );
        let r = resolve(
            &index,
            &HashSet::new(),
            &[("evdev", Need::Optional), ("ext4", Need::Optional)],
            &[],
        )
        .unwrap();
        assert_eq!(r.order, ["evdev", "jbd2", "crc16", "ext4"]);
        // A later phase skips what an earlier one loaded.
        let late = resolve(
            &index,
            &HashSet::new(),
            &[("ext4", Need::Optional)],
            &["jbd2".to_string()],
        )
        .unwrap();
        assert_eq!(late.order, ["crc16", "ext4"]);
        assert_eq!(
            render_modules_dep(&index, &r.order),
            "kernel/input/evdev.ko:\nkernel/fs/jbd2/jbd2.ko:\nkernel/lib/crc16.ko:\n\
             kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/lib/crc16.ko\n"
        );
    }

    #[test]
    fn unsupported_compression_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.ko.zst");
        fs::write(&p, b"zstd").unwrap();
        assert!(read_module(&p)
            .unwrap_err()
            .contains("only plain .ko and .ko.xz"));
    }
}
