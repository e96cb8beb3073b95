//! Builds Drover's default guest image: Debian's kernel as an uncompressed ELF `vmlinux` (booted
//! through QEMU's PVH entry, twice as fast as the bzImage under TCG) and an uncompressed newc
//! initramfs with busybox, the virtio drivers, `/init` and `drover-agent`.
//!
//! The API is blocking; droverd and the CLI call it from a blocking thread. Builds are cached in
//! `ImageSpec::cache_dir` under a key over all inputs, serialised between processes by a file lock,
//! and installed atomically (see [`build`]).
//!
//! What the image expects of the VM: the kernel command line from [`default_cmdline`] (optionally
//! plus `drover.hostname=<name>`), a serial console on ttyS0 (where `/init` prints
//! [`READY_MARKER`]), virtio-serial ports named `org.drover.req` / `org.drover.evt` (linked as
//! `/dev/virtio-ports/<name>`, as is any other named port), and virtio NICs, which come up as
//! `eth0`, `eth1`, ... and are configured by DHCP (hot-plugged ones too).

mod cache;
pub mod cpio;
pub mod deb;
pub mod debian;
mod elf;
mod error;
mod host;
mod initramfs;
pub mod inject;
mod modules;
pub mod seed;
mod vmlinux;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use error::ImageError;
use error::IoContext;
pub use initramfs::READY_MARKER;

/// Version of the image layout and builder logic; part of the cache key, so bumping it rebuilds.
pub const FORMAT: u32 = 1;

/// Version of the unpacked-kernel stage (vmlinux + selected modules); bump when the module
/// selection or the stage's layout changes.
const KERNEL_STAGE_FORMAT: u32 = 1;

/// The metapackage whose dependency names the current kernel.
pub const DEFAULT_KERNEL_METAPACKAGE: &str = "linux-image-amd64";

/// Where the host's static busybox is (Debian's `busybox-static` package).
const BUSYBOX: &str = "/bin/busybox";

/// File names inside an image directory.
pub const VMLINUX_FILE: &str = "vmlinux";
/// The initramfs (uncompressed newc cpio).
pub const INITRAMFS_FILE: &str = "initramfs.cpio";
/// The [`ImageManifest`] as JSON.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The tuned kernel command line (PLATFORM.md, "Command line that boots fastest here").
///
/// `/init` needs nothing more. Append `drover.hostname=<name>` to set the guest's hostname
/// (default `drover-guest`).
///
/// `swiotlb=2048` (a 4 MiB bounce buffer): a VM made with `--max-memory` has a hot-plug range
/// above 4 GiB in its ACPI tables, and the kernel then sets 64 MiB aside for devices that cannot
/// reach memory there. Its devices are virtio, which can; at `--memory 128M` those 64 MiB left
/// too little to unpack the initramfs, and the guest died of OOM before its console said a
/// word. 4 MiB is kept for a hot-plugged device that would need it.
const DEFAULT_CMDLINE: &str =
    "console=ttyS0 quiet loglevel=0 mitigations=off i8042.noaux i8042.nokbd i8042.nopnp \
8250.nr_uarts=1 no_timer_check cryptomgr.notests tsc=reliable random.trust_cpu=on swiotlb=2048";

/// What to build.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Where images, downloads and the unpacked kernel are kept (created if missing).
    pub cache_dir: PathBuf,
    /// The statically linked `drover-agent` to put in the image.
    pub agent_binary: PathBuf,
    /// Kernel package to use; `None` resolves `linux-image-amd64`'s dependency to the concrete
    /// `linux-image-<ver>-amd64`. A metapackage name is resolved the same way.
    pub kernel_package: Option<String>,
    /// Rebuild even if an image with the same input key exists.
    pub force: bool,
}

impl ImageSpec {
    /// A spec with the default kernel and no forced rebuild.
    pub fn new(cache_dir: impl Into<PathBuf>, agent_binary: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            agent_binary: agent_binary.into(),
            kernel_package: None,
            force: false,
        }
    }
}

/// A built, intact image.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The image directory (`cache_dir/<first 16 hex digits of the key>`).
    pub dir: PathBuf,
    /// The uncompressed ELF kernel, for QEMU's `-kernel`.
    pub kernel: PathBuf,
    /// The uncompressed newc initramfs, for QEMU's `-initrd`.
    pub initrd: PathBuf,
    /// What went into it.
    pub manifest: ImageManifest,
}

/// Description of an image, stored as `manifest.json` in its directory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ImageManifest {
    /// [`FORMAT`] of the builder that made it.
    pub format: u32,
    /// sha256 (hex) over all inputs; equal keys mean equal images.
    pub key: String,
    /// Concrete kernel package, e.g. `linux-image-6.1.0-28-amd64`.
    pub kernel_package: String,
    /// `uname -r` of the kernel, e.g. `6.1.0-28-amd64`.
    pub kernel_version: String,
    /// Debian version of busybox-static.
    pub busybox_version: String,
    /// sha256 (hex) of the agent binary.
    pub agent_sha256: String,
    /// Module names in the order `/init` loads them: those before the ready marker, then those
    /// loaded in the background after it (ext4 and its dependencies, for data disks).
    pub modules: Vec<String>,
    /// Size of `vmlinux`.
    pub kernel_bytes: u64,
    /// Size of `initramfs.cpio`.
    pub initrd_bytes: u64,
    /// When it was built (seconds since the epoch).
    pub built_at_unix: u64,
    /// How long the build took, in milliseconds.
    pub build_ms: u64,
    /// The kernel command line to boot it with ([`default_cmdline`]).
    pub default_cmdline: String,
}

/// Progress reported by [`build`] through its callback.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Progress {
    /// A build step starts (human-readable).
    Step {
        /// What is being done.
        step: String,
    },
    /// Another builder holds the cache lock; waiting for it.
    WaitingForLock {
        /// The lock file.
        lock: PathBuf,
    },
    /// Downloading a package (not yet in the download cache).
    Downloading {
        /// Package name.
        package: String,
        /// Package version.
        version: String,
    },
    /// The cached image matches the inputs; nothing to build.
    UpToDate {
        /// The image directory.
        dir: PathBuf,
    },
    /// A new image is installed and current.
    Built {
        /// The image directory.
        dir: PathBuf,
        /// Build time in milliseconds.
        build_ms: u64,
    },
}

/// The tuned kernel command line the image is meant to boot with.
///
/// PLATFORM.md's fastest line under TCG; the image's `/init` adds no requirements. Append
/// `drover.hostname=<name>` to name the guest.
pub fn default_cmdline() -> &'static str {
    DEFAULT_CMDLINE
}

/// Create `dir` and take its build lock, telling `progress` while another build holds it.
pub(crate) fn lock_dir(
    dir: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<cache::Lock, ImageError> {
    fs::create_dir_all(dir).ctx("create", dir)?;
    cache::lock(dir, &mut |lock| {
        progress(Progress::WaitingForLock {
            lock: lock.to_path_buf(),
        })
    })
}

/// Builds the image described by `spec`, or returns the cached one when the inputs are unchanged
/// (unless `spec.force`).
///
/// Steps: resolve the kernel package (`apt-cache`), download it (`apt-get download`, cached under
/// `downloads/`), unpack it (`dpkg-deb -x`), extract the ELF vmlinux from the bzImage, select the
/// virtio/evdev/button/ext4 modules and their dependencies, write the initramfs, then install
/// the image directory atomically and point `cache_dir/current` at it. The unpacked kernel is kept
/// under `kernels/`, so a new agent binary only costs an initramfs write (well under a second).
/// Older images, kernels and downloads are removed afterwards; the current image is kept.
///
/// If the package index cannot be read (offline, no `apt-get update`) but the current image was
/// built from the same agent and busybox, that image is returned with a warning in the log.
pub fn build(
    spec: &ImageSpec,
    progress: &mut dyn FnMut(Progress),
) -> Result<BuiltImage, ImageError> {
    let started = Instant::now();
    let cache_dir = &spec.cache_dir;
    let _lock = lock_dir(cache_dir, progress)?;

    progress(step("checking the agent and busybox binaries"));
    let agent_sha256 = inspect_agent(&spec.agent_binary)?;
    let busybox = inspect_busybox(Path::new(BUSYBOX))?;

    let wanted_kernel = spec
        .kernel_package
        .as_deref()
        .unwrap_or(DEFAULT_KERNEL_METAPACKAGE);
    progress(step(format!("resolving kernel package {wanted_kernel}")));
    let (package, version) = match resolve_kernel_cached(cache_dir, wanted_kernel, spec.force) {
        Ok(v) => v,
        Err(e) => {
            if !spec.force {
                if let Some(img) = load(cache_dir)? {
                    let m = &img.manifest;
                    let same_kernel =
                        !matches!(&spec.kernel_package, Some(k) if *k != m.kernel_package);
                    if same_kernel
                        && m.agent_sha256 == agent_sha256
                        && m.busybox_version == busybox.version
                    {
                        tracing::warn!(error = %e, dir = %img.dir.display(), "cannot check for a newer kernel; using the current image");
                        progress(Progress::UpToDate {
                            dir: img.dir.clone(),
                        });
                        return Ok(img);
                    }
                }
            }
            return Err(e);
        }
    };

    let key = input_key(&package, &version, &busybox, &agent_sha256);
    let name = key[..16].to_string();
    let dir = cache_dir.join(&name);
    if !spec.force {
        if let Some(img) = check_image(&dir)? {
            if img.manifest.key == key {
                if cache::read_current(cache_dir)? != Some(dir.clone()) {
                    cache::set_current(cache_dir, &name)?;
                }
                progress(Progress::UpToDate { dir: dir.clone() });
                return Ok(img);
            }
        }
    }

    let stage = kernel_stage(spec, &package, &version, progress)?;

    progress(step("writing the initramfs"));
    let tmp = tempfile::Builder::new()
        .prefix(cache::TMP_PREFIX)
        .tempdir_in(cache_dir)
        .ctx("create a temporary directory in", cache_dir)?;
    let work = tmp.path().join("image");
    fs::create_dir(&work).ctx("create", &work)?;
    let kernel = work.join(VMLINUX_FILE);
    copy_synced(&stage.dir.join(VMLINUX_FILE), &kernel)?;
    let initrd = work.join(INITRAMFS_FILE);
    let modules_root = stage.dir.join("modules");
    let initrd_bytes = initramfs::write(
        &initrd,
        &stage.inputs(&busybox, &spec.agent_binary, &modules_root),
    )?;
    // The agent may have been replaced while we were reading it; the key would then be wrong.
    if sha256_file(&spec.agent_binary)? != agent_sha256 {
        return Err(ImageError::Agent {
            path: spec.agent_binary.clone(),
            message: "changed while the image was being built; build again".into(),
        });
    }

    let manifest = ImageManifest {
        format: FORMAT,
        key: key.clone(),
        kernel_package: package.clone(),
        kernel_version: stage.info.kernel_version.clone(),
        busybox_version: busybox.version.clone(),
        agent_sha256,
        modules: stage
            .info
            .modules
            .iter()
            .chain(&stage.info.late_modules)
            .cloned()
            .collect(),
        kernel_bytes: stage.info.vmlinux_bytes,
        initrd_bytes,
        built_at_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        build_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        default_cmdline: DEFAULT_CMDLINE.to_string(),
    };
    let manifest_path = work.join(MANIFEST_FILE);
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| ImageError::Manifest {
        path: manifest_path.clone(),
        message: e.to_string(),
    })?;
    cache::write_synced(&manifest_path, &json)?;
    cache::sync_dir(&work)?;
    cache::install_dir(&work, &dir, cache_dir)?;
    cache::set_current(cache_dir, &name)?;
    drop(tmp);

    // Only the current image, its kernel stage and its package stay.
    let stage_name = stage.name.clone();
    let deb_name = host::deb_file_name(&package, &version);
    cache::remove_stale(cache_dir, &|n| {
        (cache::is_image_dir_name(n) && n != name) || n.starts_with(cache::TMP_PREFIX)
    });
    cache::remove_stale(&cache_dir.join("kernels"), &|n| n != stage_name);
    cache::remove_stale(&cache_dir.join("downloads"), &|n| n != deb_name);

    tracing::info!(dir = %dir.display(), build_ms = manifest.build_ms, kernel = %manifest.kernel_version, "guest image built");
    progress(Progress::Built {
        dir: dir.clone(),
        build_ms: manifest.build_ms,
    });
    Ok(BuiltImage {
        kernel: dir.join(VMLINUX_FILE),
        initrd: dir.join(INITRAMFS_FILE),
        dir,
        manifest,
    })
}

/// The kernel a distribution image boots, made ready by [`kernel_for_distro`].
pub(crate) struct DistroKernel {
    pub package: String,
    pub kernel_version: String,
    /// The whole kernel package unpacked (its full module tree, for the distribution's disk).
    pub unpacked: PathBuf,
}

/// For a distribution image: under the default image's lock, the kernel stage (made if needed),
/// its `vmlinux` linked into `work`, the root-loader initramfs written there
/// ([`debian::INITRD_FILE`]), and the full kernel package unpacked into `unpack_to`.
pub(crate) fn kernel_for_distro(
    spec: &ImageSpec,
    (package, version): (String, String),
    work: &Path,
    unpack_to: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<DistroKernel, ImageError> {
    let cache_dir = &spec.cache_dir;
    let _lock = lock_dir(cache_dir, progress)?;
    let busybox = inspect_busybox(Path::new(BUSYBOX))?;
    let stage = kernel_stage(spec, &package, &version, progress)?;
    copy_synced(&stage.dir.join(VMLINUX_FILE), &work.join(VMLINUX_FILE))?;
    let modules_root = stage.dir.join("modules");
    initramfs::write_root_loader(
        &work.join(debian::INITRD_FILE),
        &stage.inputs(&busybox, &spec.agent_binary, &modules_root),
    )?;
    let deb = host::download(&package, &version, &cache_dir.join("downloads"))?;
    progress(step(format!("unpacking {}", deb.display())));
    host::extract_deb(&deb, unpack_to)?;
    Ok(DistroKernel {
        package,
        kernel_version: stage.info.kernel_version.clone(),
        unpacked: unpack_to.to_path_buf(),
    })
}

/// The current image in `cache_dir`, if one is built and intact (files present with the sizes in
/// its manifest). `Ok(None)` when there is none or it is damaged; errors only for I/O failures
/// other than "not found".
pub fn load(cache_dir: &Path) -> Result<Option<BuiltImage>, ImageError> {
    // A build may swap `current` and delete the old image while we look: if the image we read
    // turns out incomplete, look again once.
    for _ in 0..2 {
        let Some(dir) = cache::read_current(cache_dir)? else {
            return Ok(None);
        };
        if let Some(img) = check_image(&dir)? {
            return Ok(Some(img));
        }
        if cache::read_current(cache_dir)? == Some(dir) {
            return Ok(None);
        }
    }
    Ok(None)
}

/// A kernel package resolution, remembered with the apt state it was made in
/// (`cache_dir/resolved.json`).
#[derive(Serialize, Deserialize)]
struct Resolution {
    wanted: String,
    apt_fingerprint: String,
    package: String,
    version: String,
}

/// [`host::resolve_kernel`], skipped while apt's lists, sources and dpkg status are unchanged: it
/// is what makes a cached build take milliseconds instead of an `apt-cache` run (~1 s here).
fn resolve_kernel_cached(
    cache_dir: &Path,
    wanted: &str,
    force: bool,
) -> Result<(String, String), ImageError> {
    let path = cache_dir.join("resolved.json");
    let fingerprint = host::apt_fingerprint();
    if !force {
        let cached = fs::read(&path)
            .ok()
            .and_then(|d| serde_json::from_slice::<Resolution>(&d).ok());
        if let Some(r) = cached.filter(|r| r.wanted == wanted && r.apt_fingerprint == fingerprint) {
            return Ok((r.package, r.version));
        }
    }
    let (package, version) = host::resolve_kernel(wanted)?;
    let r = Resolution {
        wanted: wanted.to_string(),
        apt_fingerprint: fingerprint,
        package,
        version,
    };
    // Best effort: without the file the next build just asks apt again.
    let tmp = cache_dir.join("resolved.json.tmp");
    let saved = serde_json::to_vec_pretty(&r)
        .map_err(std::io::Error::other)
        .and_then(|json| fs::write(&tmp, json))
        .and_then(|()| fs::rename(&tmp, &path));
    if let Err(e) = saved {
        tracing::warn!(path = %path.display(), error = %e, "could not remember the kernel package resolution");
    }
    Ok((r.package, r.version))
}

fn step(s: impl Into<String>) -> Progress {
    Progress::Step { step: s.into() }
}

/// Reads `dir/manifest.json` and checks that the files it describes are there.
fn check_image(dir: &Path) -> Result<Option<BuiltImage>, ImageError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let data = match fs::read(&manifest_path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ImageError::io("read", manifest_path, e)),
    };
    let manifest: ImageManifest = match serde_json::from_slice(&data) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(path = %manifest_path.display(), error = %e, "unreadable image manifest; ignoring the image");
            return Ok(None);
        }
    };
    let kernel = dir.join(VMLINUX_FILE);
    let initrd = dir.join(INITRAMFS_FILE);
    for (path, size) in [
        (&kernel, manifest.kernel_bytes),
        (&initrd, manifest.initrd_bytes),
    ] {
        match fs::metadata(path) {
            Ok(m) if m.is_file() && m.len() == size => {}
            Ok(_) => {
                tracing::warn!(path = %path.display(), "image file has the wrong size; ignoring the image");
                return Ok(None);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ImageError::io("stat", path, e)),
        }
    }
    unshare(&kernel)?;
    Ok(Some(BuiltImage {
        dir: dir.to_path_buf(),
        kernel,
        initrd,
        manifest,
    }))
}

fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let data = fs::read(path).ctx("read", path)?;
    Ok(hex::encode(Sha256::digest(&data)))
}

/// Checks that the agent is a static x86-64 executable; returns its sha256.
fn inspect_agent(path: &Path) -> Result<String, ImageError> {
    const BUILD: &str =
        "build it with RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release \
                         -p drover-agent --target x86_64-unknown-linux-gnu";
    let data = fs::read(path).map_err(|e| ImageError::Agent {
        path: path.to_path_buf(),
        message: format!("cannot read it ({e}); {BUILD}"),
    })?;
    match elf::check_static_executable(&data) {
        elf::StaticCheck::Static => Ok(hex::encode(Sha256::digest(&data))),
        elf::StaticCheck::Dynamic => Err(ImageError::Agent {
            path: path.to_path_buf(),
            message: format!(
                "is dynamically linked (it has an ELF interpreter) and the initramfs has no dynamic \
                 loader or libc; {BUILD}"
            ),
        }),
        elf::StaticCheck::Invalid(why) => Err(ImageError::Agent {
            path: path.to_path_buf(),
            message: format!("is not a usable x86-64 Linux executable: {why}; {BUILD}"),
        }),
    }
}

/// What the image needs to know about the host's busybox.
#[derive(Debug)]
struct Busybox {
    version: String,
    sha256: String,
    applets: Vec<String>,
}

fn inspect_busybox(path: &Path) -> Result<Busybox, ImageError> {
    let bad = |message: String| ImageError::Busybox {
        path: path.to_path_buf(),
        message,
    };
    let data = fs::read(path).map_err(|e| bad(format!("cannot read it ({e})")))?;
    match elf::check_static_executable(&data) {
        elf::StaticCheck::Static => {}
        elf::StaticCheck::Dynamic => {
            return Err(bad(
                "is dynamically linked (from the `busybox` package, not `busybox-static`)".into(),
            ))
        }
        elf::StaticCheck::Invalid(why) => {
            return Err(bad(format!("is not a usable executable: {why}")))
        }
    }
    let version = host::installed_version("busybox-static")
        .or_else(|| host::busybox_banner(path))
        .ok_or_else(|| {
            bad("cannot tell its version (dpkg-query and `busybox` both failed)".into())
        })?;
    let applets = host::busybox_applets(path)?;
    for needed in [
        "bin/sh",
        "sbin/insmod",
        "bin/mount",
        "sbin/ip",
        "sbin/udhcpc",
    ] {
        if !applets.iter().any(|a| a == needed) {
            return Err(bad(format!("has no `{needed}` applet")));
        }
    }
    Ok(Busybox {
        version,
        sha256: hex::encode(Sha256::digest(&data)),
        applets,
    })
}

/// The cache key: sha256 over everything that determines the image's contents.
fn input_key(package: &str, version: &str, busybox: &Busybox, agent_sha256: &str) -> String {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        // Length-prefixed, so no two different inputs hash the same bytes.
        h.update(format!("{name} {}\n", value.len()));
        h.update(value);
        h.update(b"\n");
    };
    field("format", FORMAT.to_string().as_bytes());
    field(
        "kernel-stage-format",
        KERNEL_STAGE_FORMAT.to_string().as_bytes(),
    );
    field("kernel-package", package.as_bytes());
    field("kernel-version", version.as_bytes());
    field("busybox-version", busybox.version.as_bytes());
    field("busybox-sha256", busybox.sha256.as_bytes());
    field("agent-sha256", agent_sha256.as_bytes());
    for (path, text) in initramfs::generated_texts() {
        field(path, text.as_bytes());
    }
    field("modules", wanted_modules().as_bytes());
    field("cmdline", DEFAULT_CMDLINE.as_bytes());
    hex::encode(h.finalize())
}

/// The wanted module lists as one string (part of both cache keys).
fn wanted_modules() -> String {
    let list = |l: &[(&str, modules::Need)]| {
        l.iter()
            .map(|(n, need)| format!("{n}:{need:?}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "boot: {}; late: {}",
        list(modules::BOOT),
        list(modules::LATE)
    )
}

/// Copy `from` to `to` and sync it. `std::fs::copy` uses `copy_file_range`, which shares the
/// blocks where the filesystem can (btrfs, xfs) without sharing the inode: a hard link would
/// give the image's `vmlinux` two names, and image pools refuse a file with more than one link
/// (a hard link is how a file outside a pool would be smuggled in).
fn copy_synced(from: &Path, to: &Path) -> Result<(), ImageError> {
    fs::copy(from, to).ctx(&format!("copy {} to", from.display()), to)?;
    fs::File::open(to)
        .and_then(|f| f.sync_all())
        .ctx("fsync", to)
}

/// Give `path` a single link again. Images built by earlier versions hard-linked their `vmlinux` with
/// the kernel stage; image pools refuse such a file, so a cached image would no longer start.
/// Copying it and renaming the copy over the name keeps the cache without a rebuild.
pub(crate) fn unshare(path: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).ctx("stat", path)?;
    if meta.nlink() <= 1 {
        return Ok(());
    }
    let tmp = path.with_extension("unshare.tmp");
    copy_synced(path, &tmp)?;
    fs::rename(&tmp, path).ctx(&format!("rename {} to", tmp.display()), path)?;
    tracing::info!(path = %path.display(), "gave a cached image file its own inode (it was hard-linked)");
    Ok(())
}

/// Description of an unpacked kernel stage (`kernels/<name>/kernel.json`).
#[derive(Serialize, Deserialize, Clone, Debug)]
struct KernelInfo {
    format: u32,
    /// The module lists the selection was made from ([`wanted_modules`]).
    wanted: String,
    package: String,
    version: String,
    kernel_version: String,
    vmlinux_bytes: u64,
    /// Names of the modules loaded before the ready marker, in load order.
    modules: Vec<String>,
    /// Their paths relative to `modules/` (plain `.ko`), same order.
    module_paths: Vec<String>,
    /// Names of the modules loaded in the background after it.
    late_modules: Vec<String>,
    /// Their paths, same order.
    late_module_paths: Vec<String>,
    modules_dep: String,
    builtin: Vec<String>,
    missing_optional: Vec<String>,
}

struct KernelStage {
    name: String,
    dir: PathBuf,
    info: KernelInfo,
}

impl KernelStage {
    /// The initramfs inputs from this stage (`modules_root` is `dir/modules`).
    fn inputs<'a>(
        &'a self,
        busybox: &'a Busybox,
        agent: &'a Path,
        modules_root: &'a Path,
    ) -> initramfs::Inputs<'a> {
        initramfs::Inputs {
            kernel_version: &self.info.kernel_version,
            busybox: Path::new(BUSYBOX),
            applets: &busybox.applets,
            agent,
            modules_root,
            modules: &self.info.module_paths,
            late_modules: &self.info.late_module_paths,
            modules_dep: &self.info.modules_dep,
        }
    }
}

/// Returns the unpacked kernel for `package=version`, making it if needed (or if `spec.force`).
fn kernel_stage(
    spec: &ImageSpec,
    package: &str,
    version: &str,
    progress: &mut dyn FnMut(Progress),
) -> Result<KernelStage, ImageError> {
    let kernels = spec.cache_dir.join("kernels");
    let name = format!(
        "{package}_{}.k{KERNEL_STAGE_FORMAT}",
        version.replace(':', "%3a")
    );
    let dir = kernels.join(&name);
    if !spec.force {
        if let Some(info) = check_stage(&dir, package, version) {
            return Ok(KernelStage { name, dir, info });
        }
    }
    fs::create_dir_all(&kernels).ctx("create", &kernels)?;

    let downloads = spec.cache_dir.join("downloads");
    if !downloads
        .join(host::deb_file_name(package, version))
        .is_file()
    {
        progress(Progress::Downloading {
            package: package.to_string(),
            version: version.to_string(),
        });
    }
    let deb = host::download(package, version, &downloads)?;

    progress(step(format!("unpacking {}", deb.display())));
    let tmp = tempfile::Builder::new()
        .prefix(cache::TMP_PREFIX)
        .tempdir_in(&kernels)
        .ctx("create a temporary directory in", &kernels)?;
    let unpacked = tmp.path().join("deb");
    host::extract_deb(&deb, &unpacked)?;
    let work = tmp.path().join("stage");
    fs::create_dir(&work).ctx("create", &work)?;

    let (bzimage, kernel_version) = find_vmlinuz(&unpacked, package)?;
    progress(step(format!(
        "extracting the ELF vmlinux from {}",
        bzimage.display()
    )));
    let compressed = fs::read(&bzimage).ctx("read", &bzimage)?;
    let elf = vmlinux::extract(&compressed).map_err(|message| ImageError::Vmlinux {
        path: bzimage.clone(),
        message,
    })?;
    drop(compressed);
    cache::write_synced(&work.join(VMLINUX_FILE), &elf)?;
    let vmlinux_bytes = elf.len() as u64;
    drop(elf);

    progress(step("selecting kernel modules"));
    let mod_root = unpacked.join("lib/modules").join(&kernel_version);
    let module_err = |message: String| ImageError::Module {
        modules_dir: mod_root.clone(),
        message,
    };
    let builtin = match fs::read_to_string(mod_root.join("modules.builtin")) {
        Ok(t) => modules::parse_modules_builtin(&t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
        Err(e) => return Err(ImageError::io("read", mod_root.join("modules.builtin"), e)),
    };
    let dep_path = mod_root.join("modules.dep");
    let index = match fs::read_to_string(&dep_path) {
        Ok(text) => modules::parse_modules_dep(&text).map_err(module_err)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Debian's packages leave modules.dep to depmod in postinst: read .modinfo instead.
            let files = modules::scan_module_files(&mod_root)
                .map_err(|(p, e)| ImageError::io("list", p, e))?;
            let roots: Vec<&str> = modules::BOOT
                .iter()
                .chain(modules::LATE)
                .map(|(n, _)| *n)
                .collect();
            modules::index_from_modinfo(&mod_root, &files, &roots).map_err(module_err)?
        }
        Err(e) => return Err(ImageError::io("read", dep_path, e)),
    };
    let hint = "the guest needs the virtio drivers: use a kernel package that has them (Debian's \
                linux-image-*-amd64 does)";
    let boot = modules::resolve(&index, &builtin, modules::BOOT, &[])
        .map_err(|m| module_err(format!("{m}; {hint}")))?;
    let late =
        modules::resolve(&index, &builtin, modules::LATE, &boot.order).map_err(module_err)?;
    let missing: Vec<&String> = boot
        .missing_optional
        .iter()
        .chain(&late.missing_optional)
        .collect();
    if !missing.is_empty() {
        tracing::warn!(?missing, kernel = %kernel_version, "optional modules not in this kernel");
    }
    // Copies the modules of one phase into the stage, decompressed; returns their paths.
    let copy = |order: &[String]| -> Result<Vec<String>, ImageError> {
        let mut paths = Vec::new();
        for name in order {
            let Some(entry) = index.get(name) else {
                continue;
            };
            let src = mod_root.join(&entry.path);
            let data = modules::read_module(&src)
                .map_err(|m| module_err(format!("{}: {m}", src.display())))?;
            let rel = modules::plain_ko(&entry.path);
            let dst = work.join("modules").join(&rel);
            if let Some(parent) = dst.parent() {
                fs::create_dir_all(parent).ctx("create", parent)?;
            }
            cache::write_synced(&dst, &data)?;
            paths.push(rel);
        }
        Ok(paths)
    };
    let module_paths = copy(&boot.order)?;
    let late_module_paths = copy(&late.order)?;
    let all: Vec<String> = boot.order.iter().chain(&late.order).cloned().collect();
    let info = KernelInfo {
        format: KERNEL_STAGE_FORMAT,
        wanted: wanted_modules(),
        package: package.to_string(),
        version: version.to_string(),
        kernel_version,
        vmlinux_bytes,
        modules_dep: modules::render_modules_dep(&index, &all),
        modules: boot.order,
        module_paths,
        late_modules: late.order,
        late_module_paths,
        builtin: boot.builtin.into_iter().chain(late.builtin).collect(),
        missing_optional: boot
            .missing_optional
            .into_iter()
            .chain(late.missing_optional)
            .collect(),
    };
    let info_path = work.join("kernel.json");
    let json = serde_json::to_vec_pretty(&info).map_err(|e| ImageError::Manifest {
        path: info_path.clone(),
        message: e.to_string(),
    })?;
    cache::write_synced(&info_path, &json)?;
    cache::sync_dir(&work)?;
    cache::install_dir(&work, &dir, &kernels)?;
    Ok(KernelStage { name, dir, info })
}

/// The kernel stage's description if the stage is complete and for this package.
fn check_stage(dir: &Path, package: &str, version: &str) -> Option<KernelInfo> {
    let info: KernelInfo = serde_json::from_slice(&fs::read(dir.join("kernel.json")).ok()?).ok()?;
    let ok = info.format == KERNEL_STAGE_FORMAT
        && info.wanted == wanted_modules()
        && info.package == package
        && info.version == version
        && fs::metadata(dir.join(VMLINUX_FILE)).is_ok_and(|m| m.len() == info.vmlinux_bytes)
        && info
            .module_paths
            .iter()
            .chain(&info.late_module_paths)
            .all(|p| dir.join("modules").join(p).is_file());
    ok.then_some(info)
}

/// `boot/vmlinuz-<ver>` in an unpacked kernel package, and `<ver>`.
fn find_vmlinuz(root: &Path, package: &str) -> Result<(PathBuf, String), ImageError> {
    let boot = root.join("boot");
    let found: Vec<(PathBuf, String)> = fs::read_dir(&boot)
        .ctx("list", &boot)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("vmlinuz-")
                .map(|v| (e.path(), v.to_string()))
        })
        .collect();
    match found.as_slice() {
        [(path, ver)] if root.join("lib/modules").join(ver).is_dir() => Ok((path.clone(), ver.clone())),
        [(_, ver)] => Err(ImageError::Kernel {
            package: package.to_string(),
            message: format!("has boot/vmlinuz-{ver} but no lib/modules/{ver}"),
        }),
        _ => Err(ImageError::Kernel {
            package: package.to_string(),
            message: format!(
                "expected exactly one boot/vmlinuz-* in the package, found {}; is it a kernel image package?",
                found.len()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busybox_fixture() -> Busybox {
        Busybox {
            version: "1:1.35.0-4".into(),
            sha256: "bb".into(),
            applets: vec![],
        }
    }

    #[test]
    fn key_depends_on_every_input() {
        let bb = busybox_fixture();
        let k = input_key("linux-image-6.1.0-28-amd64", "6.1.119-1", &bb, "aa");
        assert_eq!(k.len(), 64);
        assert_eq!(
            k,
            input_key("linux-image-6.1.0-28-amd64", "6.1.119-1", &bb, "aa")
        );
        assert_ne!(
            k,
            input_key("linux-image-6.1.0-28-amd64", "6.1.119-2", &bb, "aa")
        );
        assert_ne!(
            k,
            input_key("linux-image-6.1.0-28-amd64", "6.1.119-1", &bb, "ab")
        );
        let bb2 = Busybox {
            sha256: "bc".into(),
            ..busybox_fixture()
        };
        assert_ne!(
            k,
            input_key("linux-image-6.1.0-28-amd64", "6.1.119-1", &bb2, "aa")
        );
    }

    #[test]
    fn cmdline_is_the_tuned_one() {
        let c = default_cmdline();
        for p in [
            "console=ttyS0",
            "quiet",
            "loglevel=0",
            "mitigations=off",
            "swiotlb=2048",
            "8250.nr_uarts=1",
            "random.trust_cpu=on",
        ] {
            assert!(c.split(' ').any(|w| w == p), "{p} missing from {c}");
        }
    }

    #[test]
    fn dynamic_agent_is_refused_with_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("agent");
        fs::write(&p, elf::testutil::exec(3, 62, true)).unwrap();
        let msg = inspect_agent(&p).unwrap_err().to_string();
        assert!(
            msg.contains("dynamically linked") && msg.contains("+crt-static"),
            "{msg}"
        );
        fs::write(&p, elf::testutil::exec(3, 62, false)).unwrap();
        assert_eq!(inspect_agent(&p).unwrap().len(), 64);
        let msg = inspect_agent(&d.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("cannot read"), "{msg}");
    }

    #[test]
    fn load_checks_sizes() {
        let d = tempfile::tempdir().unwrap();
        let cache = d.path();
        assert!(load(cache).unwrap().is_none());
        let dir = cache.join("0123456789abcdef");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join(VMLINUX_FILE), b"\x7fELFkernel").unwrap();
        fs::write(dir.join(INITRAMFS_FILE), b"070701").unwrap();
        let m = ImageManifest {
            format: FORMAT,
            key: "0123456789abcdef".repeat(4),
            kernel_package: "linux-image-6.1.0-28-amd64".into(),
            kernel_version: "6.1.0-28-amd64".into(),
            busybox_version: "1".into(),
            agent_sha256: "aa".into(),
            modules: vec!["virtio".into()],
            kernel_bytes: 10,
            initrd_bytes: 6,
            built_at_unix: 0,
            build_ms: 1,
            default_cmdline: DEFAULT_CMDLINE.into(),
        };
        fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(load(cache).unwrap().is_none(), "no current pointer yet");
        cache::set_current(cache, "0123456789abcdef").unwrap();
        // A cache from before kernels were copied: the image's vmlinux shares the stage's inode.
        let stage_copy = cache.join("stage-vmlinux");
        fs::hard_link(dir.join(VMLINUX_FILE), &stage_copy).unwrap();
        let img = load(cache).unwrap().unwrap();
        assert_eq!(img.manifest, m);
        assert_eq!(img.kernel, dir.join(VMLINUX_FILE));
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            fs::metadata(&img.kernel).unwrap().nlink(),
            1,
            "an image pool refuses a hard-linked kernel"
        );
        assert_eq!(fs::read(&img.kernel).unwrap(), b"\x7fELFkernel");
        assert_eq!(fs::read(&stage_copy).unwrap(), b"\x7fELFkernel");
        fs::write(dir.join(INITRAMFS_FILE), b"0707").unwrap();
        assert!(
            load(cache).unwrap().is_none(),
            "truncated initramfs must not load"
        );
    }
}
