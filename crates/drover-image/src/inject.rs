//! `drover image inject-agent`: the agent's package installed into a stopped Debian or Ubuntu
//! disk offline, for images that have no cloud-init to install it at first boot.
//!
//! How: the disk (qcow2 or raw, any backing chain folded in) is converted to a raw scratch
//! file, its root file system found (the whole disk, or the partition of a GPT/MBR table that
//! holds `/var/lib/dpkg`) and loop-mounted, the package installed with the host's
//! `dpkg --root` (its maintainer scripts run chrooted in the guest's root, with the host's
//! `/dev` bound in so they write to a real `/dev/null`), unmounted, and the scratch converted to
//! a standalone qcow2 at `out`. The source is only ever read: the caller puts `out` in place.
//! Needs root (loop mounts), qemu-img, util-linux (`sfdisk`, `mount`) and dpkg on the host.
//!
//! Trust: the host kernel parses the disk's file system and dpkg runs the disk's own shell for
//! the maintainer scripts (chroot is no boundary for root), so this is for disks the admin
//! trusts (images they built or imported), not for a disk an untrusted guest has written.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{ImageError, IoContext};
use crate::{deb, host};

/// What an injection did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    /// The package version now installed.
    pub version: String,
    /// The version it replaced, if the disk had one.
    pub replaced: Option<String>,
    /// The partition (1-based) that holds the root, `None` for a whole-disk file system.
    pub partition: Option<u32>,
}

/// A partition of a disk's table, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Part {
    number: u32,
    offset: u64,
    size: u64,
}

/// Install the agent package made from `agent_binary` into the disk `src` (format `format`,
/// `qcow2` or `raw`), writing the result to `out` (a new standalone qcow2). `scratch` holds the
/// raw copy meanwhile (as large as the disk's data).
pub fn inject_agent(
    src: &Path,
    format: &str,
    agent_binary: &Path,
    out: &Path,
    scratch: &Path,
) -> Result<Injected, ImageError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ImageError::Debian {
            message: "injecting the agent needs root (loop mounts); run droverd as root".into(),
        });
    }
    if !matches!(format, "qcow2" | "raw") {
        return Err(ImageError::Debian {
            message: format!(
                "{}: a {format} disk; give a qcow2 or raw one",
                src.display()
            ),
        });
    }
    let tmp = tempfile::Builder::new()
        .prefix(".inject-")
        .tempdir_in(scratch)
        .ctx("create a temporary directory in", scratch)?;
    let raw = tmp.path().join("disk.raw");
    host::run(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", format, "-O", "raw"])
            .arg(src)
            .arg(&raw),
        Some("install qemu-utils"),
    )?;
    let version = env!("CARGO_PKG_VERSION");
    let package = deb::build(agent_binary, version, tmp.path())?;
    let mnt = tmp.path().join("root");
    fs::create_dir(&mnt).ctx("create", &mnt)?;
    let (mount, partition) = mount_root(&raw, &mnt)?;
    let admindir = mnt.join("var/lib/dpkg");
    let replaced = installed(&admindir);
    let dev = Mount::bind(Path::new("/dev"), &mnt.join("dev"))?;
    let done = host::run(
        Command::new("dpkg")
            .arg(format!("--root={}", mnt.display()))
            .args(["--force-unsafe-io", "-i"])
            .arg(&package)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        Some("the guest needs a shell and adduser (the package's Depends), as Debian and Ubuntu have"),
    );
    drop(dev);
    let now = installed(&admindir);
    mount.unmount()?;
    done?;
    if now.as_deref() != Some(version) {
        return Err(ImageError::Debian {
            message: format!(
                "dpkg ran, but {} is not installed at {version} in the image (dpkg says {now:?})",
                deb::PACKAGE
            ),
        });
    }
    host::run(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(out),
        Some("install qemu-utils"),
    )?;
    fs::File::open(out)
        .and_then(|f| f.sync_all())
        .ctx("fsync", out)?;
    Ok(Injected {
        version: version.to_string(),
        replaced,
        partition,
    })
}

/// The installed version of the agent package in the root whose dpkg database is `admindir`.
fn installed(admindir: &Path) -> Option<String> {
    let out = Command::new("dpkg-query")
        .arg(format!("--admindir={}", admindir.display()))
        .args(["-W", "-f", "${db:Status-Abbrev}|${Version}", deb::PACKAGE])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (status, v) = text.split_once('|')?;
    (out.status.success() && status.starts_with("ii")).then(|| v.trim().to_string())
}

/// Mount the disk's Debian-style root (the whole disk, or the partition with a dpkg database).
fn mount_root(raw: &Path, mnt: &Path) -> Result<(Mount, Option<u32>), ImageError> {
    let parts = partitions(raw);
    if parts.is_empty() {
        let m = Mount::image(raw, None, mnt)?;
        if mnt.join("var/lib/dpkg/status").is_file() {
            return Ok((m, None));
        }
        m.unmount()?;
    }
    for p in &parts {
        let Ok(m) = Mount::image(raw, Some(*p), mnt) else {
            continue;
        };
        if mnt.join("var/lib/dpkg/status").is_file() {
            return Ok((m, Some(p.number)));
        }
        m.unmount()?;
    }
    Err(ImageError::Debian {
        message: format!(
            "no Debian or Ubuntu root file system (one with /var/lib/dpkg/status) on the disk ({} partition(s) looked at)",
            parts.len().max(1)
        ),
    })
}

/// The disk's partitions, from `sfdisk --json` (none: no table, a whole-disk file system).
fn partitions(raw: &Path) -> Vec<Part> {
    let Ok(out) = Command::new("sfdisk").arg("--json").arg(raw).output() else {
        return Vec::new();
    };
    if !out.status.success() {
        return Vec::new();
    }
    parse_sfdisk(&String::from_utf8_lossy(&out.stdout))
}

/// The partitions in `sfdisk --json` output, in table order.
fn parse_sfdisk(json: &str) -> Vec<Part> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let table = &v["partitiontable"];
    let sector = table["sectorsize"].as_u64().unwrap_or(512);
    let Some(list) = table["partitions"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let start = p["start"].as_u64()?;
            let size = p["size"].as_u64()?;
            // `node` ends in the partition number (`disk.raw1`, `disk.raw15`).
            let number = p["node"]
                .as_str()
                .and_then(|n| {
                    let digits = n.len() - n.trim_end_matches(|c: char| c.is_ascii_digit()).len();
                    n[n.len() - digits..].parse().ok()
                })
                .unwrap_or(i as u32 + 1);
            Some(Part {
                number,
                offset: start.checked_mul(sector)?,
                size: size.checked_mul(sector)?,
            })
        })
        .collect()
}

/// A mount, unmounted when dropped (lazily, if something still holds it).
struct Mount {
    at: PathBuf,
    mounted: bool,
}

impl Mount {
    /// Loop-mount the file system in `raw` (at `part`, or the whole file) at `at`.
    fn image(raw: &Path, part: Option<Part>, at: &Path) -> Result<Mount, ImageError> {
        let mut opts = "loop".to_string();
        if let Some(p) = part {
            opts.push_str(&format!(",offset={},sizelimit={}", p.offset, p.size));
        }
        host::run(
            Command::new("mount").args(["-o", &opts]).arg(raw).arg(at),
            Some("loop devices are needed (modprobe loop)"),
        )?;
        Ok(Mount {
            at: at.to_path_buf(),
            mounted: true,
        })
    }

    /// Bind `from` at `at` (made if missing).
    fn bind(from: &Path, at: &Path) -> Result<Mount, ImageError> {
        fs::create_dir_all(at).ctx("create", at)?;
        host::run(Command::new("mount").arg("--bind").arg(from).arg(at), None)?;
        Ok(Mount {
            at: at.to_path_buf(),
            mounted: true,
        })
    }

    /// Unmount now, reporting a failure.
    fn unmount(mut self) -> Result<(), ImageError> {
        self.mounted = false;
        host::run(Command::new("umount").arg(&self.at), None).map(|_| ())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let unmounted = || {
            Command::new("umount")
                .arg(&self.at)
                .status()
                .is_ok_and(|s| s.success())
        };
        if self.mounted && !unmounted() {
            let _ = Command::new("umount").arg("-l").arg(&self.at).status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_come_from_sfdisk_json_in_bytes() {
        let json = r#"{"partitiontable": {"label": "gpt", "sectorsize": 512, "partitions": [
            {"node": "/t/disk.raw1", "start": 262144, "size": 8124383, "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4"},
            {"node": "/t/disk.raw14", "start": 2048, "size": 8192},
            {"node": "/t/disk.raw15", "start": 10240, "size": 227328}]}}"#;
        let p = parse_sfdisk(json);
        assert_eq!(
            p,
            vec![
                Part {
                    number: 1,
                    offset: 262144 * 512,
                    size: 8124383 * 512
                },
                Part {
                    number: 14,
                    offset: 2048 * 512,
                    size: 8192 * 512
                },
                Part {
                    number: 15,
                    offset: 10240 * 512,
                    size: 227328 * 512
                },
            ]
        );
        assert!(parse_sfdisk("{}").is_empty());
        assert!(parse_sfdisk("garbage").is_empty());
        // An absurd start does not wrap around.
        let huge = r#"{"partitiontable": {"sectorsize": 4096, "partitions": [{"node": "x1", "start": 18446744073709551615, "size": 1}]}}"#;
        assert!(parse_sfdisk(huge).is_empty());
    }
}
