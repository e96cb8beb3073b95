//! `drover image build --distro debian-12`: a real Debian 12 system from Debian's packages.
//!
//! What it makes (in `cache_dir/debian-12/<key>/`): `disk.qcow2` (ext4 root labelled
//! [`ROOT_LABEL`], made by `debootstrap --variant=minbase` with systemd, udev, networkd, dbus,
//! openssh and the agent's `.deb` installed), the same PVH `vmlinux` as the default image and a
//! small root-loader `initrd.cpio` (busybox, the virtio and ext4 drivers, [`ROOT_INIT`]).
//!
//! Why the host boots the kernel (`--kernel/--initrd`) rather than GRUB on the disk: under TCG
//! SeaBIOS costs ~3.5 s and the bzImage boots half as fast as the uncompressed ELF (PLATFORM.md);
//! qboot + PVH does neither, and the guest needs no bootloader or initramfs-tools (nothing to
//! regenerate on a kernel upgrade). The disk still has the kernel's full module tree, so udev
//! loads whatever a hot-plugged device needs.
//!
//! Tuned for time to agent-ready ([`MASKED`]): the agent starts early from its udev rule, and
//! what a Drover VM does not need at boot is masked.
//!
//! Cached like the default image: a key over every input Drover controls (package list, the
//! generated files, the kernel, the agent); Debian's package versions are whatever the mirror has
//! when the image is first built (`--force` rebuilds). debootstrap's downloads are kept in
//! `debs/`, so a rebuild downloads nothing new. Needs root (debootstrap and chroot).
//!
//! [`ROOT_INIT`]: crate::initramfs::ROOT_INIT

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ImageError, IoContext};
use crate::{cache, deb, host, initramfs, Progress};

/// The distribution name users give (`--distro debian-12`).
pub const DISTRO: &str = "debian-12";
/// Its Debian suite.
const SUITE: &str = "bookworm";
/// Where debootstrap fetches packages from (the host's apt uses the same archive).
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Version of this builder's layout and logic; part of the key.
pub const FORMAT: u32 = 1;
/// The root filesystem's label (the kernel command line's `root=LABEL=...`).
pub const ROOT_LABEL: &str = "drover-root";
/// Size of the root filesystem (the qcow2 is sparse: only what is written takes space).
pub const DISK_SIZE: &str = "4G";
/// Packages on top of `--variant=minbase`.
pub const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "openssh-server",
    "iproute2",
    "kmod",
    "procps",
];
/// Module directories left out of the disk: hardware a Drover VM never has (~60% of the tree).
const PRUNED_MODULE_DIRS: &[&str] = &[
    "kernel/drivers/gpu",
    "kernel/drivers/net/wireless",
    "kernel/drivers/net/ethernet",
    "kernel/drivers/media",
    "kernel/drivers/infiniband",
    "kernel/drivers/staging",
    "kernel/drivers/bluetooth",
    "kernel/drivers/iio",
    "kernel/drivers/usb",
    "kernel/drivers/hid",
    "kernel/drivers/isdn",
    "kernel/drivers/scsi",
    "kernel/sound",
    "kernel/net/wireless",
    "kernel/net/mac80211",
    "kernel/net/bluetooth",
];

/// Units masked in the image (measured with `systemd-analyze blame` under TCG; see the README's
/// "Debian guests"): periodic maintenance a short-lived VM does not want at boot (apt, dpkg
/// backups, e2scrub, fstrim), a getty on a console that does not exist (tty1; the serial getty
/// stays), mounts and module loads for debugging, huge pages, DRM and EFI, and the wait for a
/// network that nothing here waits on. ssh and networkd stay.
pub const MASKED: &[&str] = &[
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "getty@tty1.service",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "dev-hugepages.mount",
    "modprobe@drm.service",
    "modprobe@efi_pstore.service",
    "systemd-networkd-wait-online.service",
    "systemd-network-generator.service",
];

/// Files written into the root filesystem (path, mode, text).
pub const FILES: &[(&str, u32, &str)] = &[
    ("etc/hostname", 0o644, "debian\n"),
    (
        "etc/hosts",
        0o644,
        "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n",
    ),
    (
        "etc/fstab",
        0o644,
        // No fsck pass: the root loader mounts it read-write (ext4's journal makes it whole).
        "LABEL=drover-root / ext4 errors=remount-ro 0 0\n",
    ),
    (
        "etc/systemd/network/80-drover-dhcp.network",
        0o644,
        "# Every virtio NIC by DHCP (user-mode networking answers it). Written by drover-image.\n\
         [Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n\n[DHCPv4]\nUseDomains=yes\n",
    ),
    (
        // One host key type, generated at first boot (each VM its own): an RSA key would take
        // seconds under TCG for nothing.
        "etc/ssh/sshd_config.d/drover.conf",
        0o644,
        "# Written by drover-image.\nHostKey /etc/ssh/ssh_host_ed25519_key\n",
    ),
    (
        "etc/systemd/system/drover-ssh-hostkey.service",
        0o644,
        "[Unit]\nDescription=SSH host key of this VM (first boot)\n\
         ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key\nBefore=ssh.service\n\n\
         [Service]\nType=oneshot\n\
         ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N \"\" -f /etc/ssh/ssh_host_ed25519_key\n\n\
         [Install]\nWantedBy=ssh.service\n",
    ),
];

/// Units enabled in the image.
const ENABLED: &[&str] = &["systemd-networkd.service", "drover-ssh-hostkey.service"];

/// The command line the image boots with: the tuned default plus the root filesystem.
pub fn cmdline() -> String {
    format!("{} root=LABEL={ROOT_LABEL}", crate::default_cmdline())
}

/// File names inside a Debian image directory.
pub const DISK_FILE: &str = "disk.qcow2";
/// The root-loader initramfs.
pub const INITRD_FILE: &str = "initrd.cpio";

/// Description of a Debian image (`manifest.json`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DebianManifest {
    /// [`FORMAT`].
    pub format: u32,
    /// `debian-12`.
    pub distro: String,
    /// sha256 over all inputs.
    pub key: String,
    /// The kernel package, e.g. `linux-image-6.1.0-28-amd64`.
    pub kernel_package: String,
    /// `uname -r`.
    pub kernel_version: String,
    /// sha256 of the agent binary in the package.
    pub agent_sha256: String,
    /// The agent package's file name.
    pub agent_deb: String,
    /// Packages on top of minbase.
    pub packages: Vec<String>,
    /// Masked units.
    pub masked: Vec<String>,
    /// Sizes, for the integrity check.
    pub kernel_bytes: u64,
    /// Size of the initrd.
    pub initrd_bytes: u64,
    /// Size of the qcow2 file.
    pub disk_bytes: u64,
    /// When and how long.
    pub built_at_unix: u64,
    /// Build time in milliseconds.
    pub build_ms: u64,
    /// The kernel command line to boot it with.
    pub cmdline: String,
}

/// A built Debian image.
#[derive(Debug, Clone)]
pub struct DebianImage {
    /// Its directory.
    pub dir: PathBuf,
    /// The PVH `vmlinux` (`--kernel`).
    pub kernel: PathBuf,
    /// The root loader (`--initrd`).
    pub initrd: PathBuf,
    /// The root disk: copy it per VM (`--disk image=COPY`).
    pub disk: PathBuf,
    /// The agent package.
    pub agent_deb: PathBuf,
    /// What went in.
    pub manifest: DebianManifest,
}

fn distro_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join(DISTRO)
}

/// The current Debian image, if built and intact.
pub fn load(cache_dir: &Path) -> Result<Option<DebianImage>, ImageError> {
    let dir = distro_dir(cache_dir);
    match cache::read_current(&dir)? {
        Some(d) => check(&d),
        None => Ok(None),
    }
}

fn check(dir: &Path) -> Result<Option<DebianImage>, ImageError> {
    let path = dir.join(crate::MANIFEST_FILE);
    let data = match fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ImageError::io("read", path, e)),
    };
    let Ok(manifest) = serde_json::from_slice::<DebianManifest>(&data) else {
        tracing::warn!(path = %path.display(), "unreadable Debian image manifest; ignoring it");
        return Ok(None);
    };
    let img = DebianImage {
        kernel: dir.join(crate::VMLINUX_FILE),
        initrd: dir.join(INITRD_FILE),
        disk: dir.join(DISK_FILE),
        agent_deb: dir.join(&manifest.agent_deb),
        dir: dir.to_path_buf(),
        manifest,
    };
    for (p, size) in [
        (&img.kernel, img.manifest.kernel_bytes),
        (&img.initrd, img.manifest.initrd_bytes),
        (&img.disk, img.manifest.disk_bytes),
    ] {
        if !fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() == size) {
            return Ok(None);
        }
    }
    crate::unshare(&img.kernel)?;
    Ok(img.agent_deb.is_file().then_some(img))
}

/// The key over every input.
fn input_key(kernel_package: &str, kernel_package_version: &str, agent_sha256: &str) -> String {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &str| {
        h.update(format!("{name} {}\n{value}\n", value.len()));
    };
    field("format", &FORMAT.to_string());
    field("suite", SUITE);
    field("packages", &PACKAGES.join(","));
    field("pruned", &PRUNED_MODULE_DIRS.join(","));
    field("masked", &MASKED.join(","));
    field("enabled", &ENABLED.join(","));
    field("agent-early", "sysinit.target.wants");
    field("disk-size", DISK_SIZE);
    for (p, mode, t) in FILES {
        field(p, &format!("{mode:o} {t}"));
    }
    for (p, t) in deb::texts() {
        field(p, &t);
    }
    field("root-init", initramfs::ROOT_INIT);
    field("cmdline", &cmdline());
    field("kernel-package", kernel_package);
    field("kernel-package-version", kernel_package_version);
    field("agent", agent_sha256);
    field("builder-version", env!("CARGO_PKG_VERSION"));
    hex::encode(h.finalize())
}

/// Builds (or returns the cached) Debian 12 image. See the module docs.
pub fn build(
    spec: &crate::ImageSpec,
    progress: &mut dyn FnMut(Progress),
) -> Result<DebianImage, ImageError> {
    let started = Instant::now();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ImageError::Debian {
            message:
                "building a Debian image needs root (debootstrap, chroot); run droverd as root"
                    .into(),
        });
    }
    let dir = distro_dir(&spec.cache_dir);
    let _lock = crate::lock_dir(&dir, progress)?;
    let agent_sha256 = crate::inspect_agent(&spec.agent_binary)?;
    let wanted = spec
        .kernel_package
        .as_deref()
        .unwrap_or(crate::DEFAULT_KERNEL_METAPACKAGE);
    progress(step(format!("resolving kernel package {wanted}")));
    let (package, kversion) = match crate::resolve_kernel_cached(
        &spec.cache_dir,
        wanted,
        spec.force,
    ) {
        Ok(v) => v,
        Err(e) => match load(&spec.cache_dir)? {
            // Offline: the current image is still right if it has this agent.
            Some(img) if !spec.force && img.manifest.agent_sha256 == agent_sha256 => {
                tracing::warn!(error = %e, "cannot check for a newer kernel; using the current Debian image");
                progress(Progress::UpToDate {
                    dir: img.dir.clone(),
                });
                return Ok(img);
            }
            _ => return Err(e),
        },
    };
    let key = input_key(&package, &kversion, &agent_sha256);
    let name = key[..16].to_string();
    let final_dir = dir.join(&name);
    if !spec.force {
        if let Some(img) = check(&final_dir)? {
            if img.manifest.key == key {
                if cache::read_current(&dir)? != Some(final_dir.clone()) {
                    cache::set_current(&dir, &name)?;
                }
                progress(Progress::UpToDate { dir: final_dir });
                return Ok(img);
            }
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix(cache::TMP_PREFIX)
        .tempdir_in(&dir)
        .ctx("create a temporary directory in", &dir)?;
    let work = tmp.path().join("image");
    fs::create_dir(&work).ctx("create", &work)?;
    // The kernel, its stage and the full package belong to the default image's cache: they are
    // linked or unpacked into our own directory under its lock.
    let kernel = crate::kernel_for_distro(
        spec,
        (package, kversion),
        &work,
        &tmp.path().join("kernel"),
        progress,
    )?;

    let version = env!("CARGO_PKG_VERSION");
    progress(step("packaging the agent (.deb)"));
    let agent_deb = deb::build(&spec.agent_binary, version, &work)?;

    let root = tmp.path().join("root");
    let debs = dir.join("debs");
    fs::create_dir_all(&debs).ctx("create", &debs)?;
    progress(step(format!(
        "debootstrap {SUITE} (minbase + {}); minutes on first build",
        PACKAGES.join(" ")
    )));
    host::run(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", PACKAGES.join(",")))
            .arg(format!("--cache-dir={}", debs.display()))
            .arg(SUITE)
            .arg(&root)
            .arg(DEFAULT_MIRROR),
        Some("install debootstrap (`apt-get install debootstrap`) and check that the Debian mirror is reachable"),
    )?;

    progress(step("configuring the system"));
    configure(&root)?;
    progress(step("installing the kernel modules"));
    install_modules(&root, &kernel.unpacked, &kernel.kernel_version)?;
    progress(step("installing the agent package"));
    let in_root = root.join("tmp").join(deb::file_name(version));
    fs::copy(&agent_deb, &in_root).ctx("copy the agent package to", &in_root)?;
    chroot(
        &root,
        &["dpkg", "-i", &format!("/tmp/{}", deb::file_name(version))],
    )?;
    fs::remove_file(&in_root).ctx("remove", &in_root)?;
    clean(&root)?;

    progress(step("making the ext4 root filesystem and the qcow2 disk"));
    let raw = tmp.path().join("root.raw");
    host::run(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", ROOT_LABEL])
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg("-d")
            .arg(&root)
            .arg(&raw)
            .arg(DISK_SIZE),
        Some("install e2fsprogs (1.43 or newer: mke2fs -d)"),
    )?;
    let disk = work.join(DISK_FILE);
    host::run(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&disk),
        Some("install qemu-utils"),
    )?;
    fs::remove_file(&raw).ctx("remove", &raw)?;
    fs::remove_dir_all(&root).ctx("remove", &root)?;
    fs::File::open(&disk)
        .and_then(|f| f.sync_all())
        .ctx("fsync", &disk)?;

    let size = |p: &Path| fs::metadata(p).map(|m| m.len()).ctx("stat", p);
    let manifest = DebianManifest {
        format: FORMAT,
        distro: DISTRO.into(),
        key: key.clone(),
        kernel_package: kernel.package.clone(),
        kernel_version: kernel.kernel_version.clone(),
        agent_sha256,
        agent_deb: deb::file_name(version),
        packages: PACKAGES.iter().map(|s| s.to_string()).collect(),
        masked: MASKED.iter().map(|s| s.to_string()).collect(),
        kernel_bytes: size(&work.join(crate::VMLINUX_FILE))?,
        initrd_bytes: size(&work.join(INITRD_FILE))?,
        disk_bytes: size(&disk)?,
        built_at_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        build_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        cmdline: cmdline(),
    };
    let mpath = work.join(crate::MANIFEST_FILE);
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| ImageError::Manifest {
        path: mpath.clone(),
        message: e.to_string(),
    })?;
    cache::write_synced(&mpath, &json)?;
    cache::sync_dir(&work)?;
    cache::install_dir(&work, &final_dir, &dir)?;
    cache::set_current(&dir, &name)?;
    drop(tmp);
    cache::remove_stale(&dir, &|n| {
        (cache::is_image_dir_name(n) && n != name) || n.starts_with(cache::TMP_PREFIX)
    });
    tracing::info!(dir = %final_dir.display(), build_ms = manifest.build_ms, "Debian image built");
    progress(Progress::Built {
        dir: final_dir.clone(),
        build_ms: manifest.build_ms,
    });
    check(&final_dir)?.ok_or_else(|| ImageError::Debian {
        message: format!(
            "{} is incomplete right after the build",
            final_dir.display()
        ),
    })
}

fn step(s: impl Into<String>) -> Progress {
    Progress::Step { step: s.into() }
}

fn chroot(root: &Path, args: &[&str]) -> Result<String, ImageError> {
    host::run(
        Command::new("chroot")
            .arg(root)
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        None,
    )
}

/// The generated files, enabled and masked units, the VM-specific state removed.
fn configure(root: &Path) -> Result<(), ImageError> {
    for (rel, mode, text) in FILES {
        let path = root.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).ctx("create", parent)?;
        }
        fs::write(&path, text).ctx("write", &path)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).ctx("chmod", &path)?;
    }
    // Persistent journal: the previous boot's shutdown can be checked (`journalctl -b -1`).
    let journal = root.join("var/log/journal");
    fs::create_dir_all(&journal).ctx("create", &journal)?;
    let ssh = root.join("root/.ssh");
    fs::create_dir_all(&ssh).ctx("create", &ssh)?;
    fs::set_permissions(&ssh, fs::Permissions::from_mode(0o700)).ctx("chmod", &ssh)?;
    // Each VM its own identity: machine-id made at first boot, SSH host key too.
    fs::write(root.join("etc/machine-id"), "").ctx("write", &root.join("etc/machine-id"))?;
    let _ = fs::remove_file(root.join("var/lib/dbus/machine-id"));
    for entry in fs::read_dir(root.join("etc/ssh"))
        .ctx("list", &root.join("etc/ssh"))?
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
            fs::remove_file(entry.path()).ctx("remove", &entry.path())?;
        }
    }
    let mut args = vec!["systemctl", "enable", "--quiet"];
    args.extend(ENABLED);
    chroot(root, &args)?;
    // The agent starts as soon as the root is writable, from the links the root loader made,
    // rather than after udev's coldplug (the package's udev rule still starts it on any other
    // boot path; its ConditionPathExists keeps it off where the port is missing).
    let wants = root.join("etc/systemd/system/sysinit.target.wants");
    fs::create_dir_all(&wants).ctx("create", &wants)?;
    let link = wants.join("drover-agent.service");
    std::os::unix::fs::symlink("/lib/systemd/system/drover-agent.service", &link)
        .ctx("create symlink", &link)?;
    if !MASKED.is_empty() {
        let mut args = vec!["systemctl", "mask", "--quiet"];
        args.extend(MASKED);
        chroot(root, &args)?;
    }
    Ok(())
}

/// The kernel's modules (less [`PRUNED_MODULE_DIRS`]) into the root, and depmod.
fn install_modules(root: &Path, unpacked: &Path, kernel_version: &str) -> Result<(), ImageError> {
    let from = unpacked.join("lib/modules").join(kernel_version);
    for d in PRUNED_MODULE_DIRS {
        let p = from.join(d);
        if p.exists() {
            fs::remove_dir_all(&p).ctx("remove", &p)?;
        }
    }
    let to_parent = root.join("lib/modules");
    fs::create_dir_all(&to_parent).ctx("create", &to_parent)?;
    let to = to_parent.join(kernel_version);
    // Same filesystem (both under the cache's temporary directory): a rename.
    fs::rename(&from, &to).ctx(&format!("move {} to", from.display()), &to)?;
    chroot(root, &["depmod", "-a", kernel_version])?;
    Ok(())
}

/// What no VM needs from the build: package lists and downloads.
fn clean(root: &Path) -> Result<(), ImageError> {
    for d in ["var/lib/apt/lists", "var/cache/apt/archives"] {
        let dir = root.join(d);
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_file() {
                fs::remove_file(&p).ctx("remove", &p)?;
            }
        }
    }
    for f in [
        "var/cache/apt/pkgcache.bin",
        "var/cache/apt/srcpkgcache.bin",
    ] {
        let _ = fs::remove_file(root.join(f));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_changes_with_inputs() {
        let k = input_key("linux-image-6.1.0-28-amd64", "6.1.119-1", "aa");
        assert_eq!(
            k,
            input_key("linux-image-6.1.0-28-amd64", "6.1.119-1", "aa")
        );
        assert_ne!(
            k,
            input_key("linux-image-6.1.0-28-amd64", "6.1.119-1", "ab")
        );
        assert_ne!(
            k,
            input_key("linux-image-6.1.0-29-amd64", "6.1.119-1", "aa")
        );
    }

    #[test]
    fn cmdline_names_the_root_label() {
        let c = cmdline();
        assert!(c.starts_with(crate::default_cmdline()));
        assert!(c.ends_with(" root=LABEL=drover-root"), "{c}");
    }

    #[test]
    fn load_refuses_incomplete_images() {
        let d = tempfile::tempdir().unwrap();
        assert!(load(d.path()).unwrap().is_none());
        let dir = distro_dir(d.path()).join("0123456789abcdef");
        fs::create_dir_all(&dir).unwrap();
        let m = DebianManifest {
            format: FORMAT,
            distro: DISTRO.into(),
            key: "k".into(),
            kernel_package: "p".into(),
            kernel_version: "v".into(),
            agent_sha256: "a".into(),
            agent_deb: "drover-agent_0.1.0_amd64.deb".into(),
            packages: vec![],
            masked: vec![],
            kernel_bytes: 1,
            initrd_bytes: 2,
            disk_bytes: 3,
            built_at_unix: 0,
            build_ms: 0,
            cmdline: cmdline(),
        };
        fs::write(
            dir.join(crate::MANIFEST_FILE),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        fs::write(dir.join(crate::VMLINUX_FILE), "k").unwrap();
        fs::write(dir.join(INITRD_FILE), "ii").unwrap();
        fs::write(dir.join(DISK_FILE), "ddd").unwrap();
        fs::write(dir.join(&m.agent_deb), "deb").unwrap();
        cache::set_current(&distro_dir(d.path()), "0123456789abcdef").unwrap();
        let img = load(d.path()).unwrap().unwrap();
        assert_eq!(img.manifest, m);
        fs::write(dir.join(DISK_FILE), "dd").unwrap();
        assert!(load(d.path()).unwrap().is_none(), "truncated disk");
    }
}
