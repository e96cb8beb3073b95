//! The NoCloud seed, applied by the agent where cloud-init is not installed: the hostname (every
//! boot, as cloud-init does) and root's SSH keys (once per instance id).
//!
//! The seed is a small FAT disk labelled `CIDATA` made by droverd; the agent finds it among the
//! whole disks, reads it into memory (bounded) and parses it with `fatfs`: no mount, no vfat
//! module. Only `drover.json` is read ([`drover_proto::seed`]), strictly; cloud-init's own files are
//! for cloud-init.

use std::fs;
use std::io::{self, Cursor, Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use drover_proto::seed::AgentSeed;

/// Largest device read as a seed (droverd makes them 1 MiB).
const MAX_SEED_DEVICE: u64 = 4 * 1024 * 1024;
/// The FAT volume label.
const LABEL: &str = "CIDATA";
/// Where the instance id the keys were installed for is kept.
pub const STATE_FILE: &str = "var/lib/drover/seed-instance";

/// What applying a seed changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The hostname set.
    pub hostname: String,
    /// Keys added to `authorized_keys` (0 when this instance's keys were already installed).
    pub keys_added: usize,
}

/// Finds the seed among the block devices in `sys_block` (`/sys/class/block`), read from `dev`
/// (`/dev`), and returns its `drover.json`. `Ok(None)`: no seed, or a seed without the file.
pub fn find(sys_block: &Path, dev: &Path) -> Result<Option<AgentSeed>, String> {
    let Ok(entries) = fs::read_dir(sys_block) else {
        return Ok(None);
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // Whole virtio or SCSI disks only (no partitions: the seed has none).
        .filter(|n| {
            (n.starts_with("vd") || n.starts_with("sd"))
                && n.bytes().last().is_some_and(|b| b.is_ascii_alphabetic())
        })
        .collect();
    names.sort();
    for name in names {
        let path = dev.join(&name);
        let Ok(image) = read_bounded(&path) else {
            continue;
        };
        if let Some(seed) = parse_image(image)? {
            return Ok(Some(seed));
        }
    }
    Ok(None)
}

fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = fs::File::open(path)?;
    // Block devices report size 0 in metadata: seek to the end instead.
    let size = io::Seek::seek(&mut f, io::SeekFrom::End(0))?;
    if size == 0 || size > MAX_SEED_DEVICE {
        return Err(io::Error::other("not a seed-sized device"));
    }
    io::Seek::rewind(&mut f)?;
    let mut buf = Vec::with_capacity(size as usize);
    f.take(MAX_SEED_DEVICE).read_to_end(&mut buf)?;
    Ok(buf)
}

/// A FAT image's `drover.json`, if it is a `CIDATA` volume. Errors for a seed that is there but
/// broken (so the user hears about it); `Ok(None)` for anything that is not a seed.
pub fn parse_image(image: Vec<u8>) -> Result<Option<AgentSeed>, String> {
    let Ok(fs) = fatfs::FileSystem::new(Cursor::new(image), fatfs::FsOptions::new()) else {
        return Ok(None);
    };
    if !fs.volume_label().trim_end().eq_ignore_ascii_case(LABEL) {
        return Ok(None);
    }
    let Ok(file) = fs.root_dir().open_file(drover_proto::seed::FILE) else {
        return Ok(None);
    };
    let mut text = Vec::new();
    file.take(drover_proto::seed::MAX_BYTES as u64 + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("reading the seed's {}: {e}", drover_proto::seed::FILE))?;
    AgentSeed::parse(&text).map(Some)
}

/// Applies `seed` under `root` (`/` outside tests): `/etc/hostname`, `/etc/hosts`, and
/// `root/.ssh/authorized_keys` once per instance id. Setting the kernel's hostname is left to
/// the caller ([`set_kernel_hostname`]).
pub fn apply(seed: &AgentSeed, root: &Path) -> io::Result<Applied> {
    write_atomic(
        &root.join("etc/hostname"),
        format!("{}\n", seed.hostname).as_bytes(),
        0o644,
    )?;
    let hosts_path = root.join("etc/hosts");
    let hosts = fs::read_to_string(&hosts_path).unwrap_or_default();
    write_atomic(
        &hosts_path,
        hosts_with(&hosts, &seed.hostname).as_bytes(),
        0o644,
    )?;

    let state = root.join(STATE_FILE);
    let done = fs::read_to_string(&state).unwrap_or_default();
    let mut keys_added = 0;
    if done.trim() != seed.instance_id {
        let ssh = root.join("root/.ssh");
        fs::create_dir_all(&ssh)?;
        fs::set_permissions(&ssh, fs::Permissions::from_mode(0o700))?;
        let ak = ssh.join("authorized_keys");
        let existing = fs::read_to_string(&ak).unwrap_or_default();
        let mut text = existing.clone();
        for k in &seed.ssh_keys {
            let k = k.trim();
            if !existing.lines().any(|l| l.trim() == k) {
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str(k);
                text.push('\n');
                keys_added += 1;
            }
        }
        if keys_added > 0 {
            write_atomic(&ak, text.as_bytes(), 0o600)?;
        }
        if let Some(parent) = state.parent() {
            fs::create_dir_all(parent)?;
        }
        write_atomic(&state, format!("{}\n", seed.instance_id).as_bytes(), 0o644)?;
    }
    Ok(Applied {
        hostname: seed.hostname.clone(),
        keys_added,
    })
}

/// `/etc/hosts` with `127.0.1.1` naming `hostname` (Debian's convention), other lines kept.
pub fn hosts_with(hosts: &str, hostname: &str) -> String {
    let mut out: Vec<String> = hosts
        .lines()
        .filter(|l| l.split_whitespace().next() != Some("127.0.1.1"))
        .map(str::to_string)
        .collect();
    if !out
        .iter()
        .any(|l| l.split_whitespace().next() == Some("127.0.0.1"))
    {
        out.insert(0, "127.0.0.1\tlocalhost".into());
    }
    let at = out
        .iter()
        .position(|l| l.split_whitespace().next() == Some("127.0.0.1"))
        .map_or(0, |i| i + 1);
    out.insert(at, format!("127.0.1.1\t{hostname}"));
    out.join("\n") + "\n"
}

/// sethostname(2).
pub fn set_kernel_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, valid for the call.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let tmp = PathBuf::from(format!("{}.drover-tmp", path.display()));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

/// At agent start: find the seed and apply it, logging what happened; never fatal.
pub fn apply_at_boot() {
    match find(Path::new("/sys/class/block"), Path::new("/dev")) {
        Ok(None) => {}
        Ok(Some(seed)) => match apply(&seed, Path::new("/")) {
            Ok(a) => {
                if let Err(e) = set_kernel_hostname(&a.hostname) {
                    crate::log!("seed: cannot set the hostname: {e}");
                }
                crate::log!(
                    "seed: hostname {}, {} SSH key(s) added",
                    a.hostname,
                    a.keys_added
                );
            }
            Err(e) => crate::log!("seed: cannot apply it: {e}"),
        },
        Err(e) => crate::log!("seed: ignored: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

    fn fat(label: &str, files: &[(&str, &str)]) -> Vec<u8> {
        let mut disk = Cursor::new(vec![0u8; 1024 * 1024]);
        let mut l = [b' '; 11];
        l[..label.len()].copy_from_slice(label.as_bytes());
        fatfs::format_volume(&mut disk, fatfs::FormatVolumeOptions::new().volume_label(l)).unwrap();
        {
            let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).unwrap();
            for (n, t) in files {
                fs.root_dir()
                    .create_file(n)
                    .unwrap()
                    .write_all(t.as_bytes())
                    .unwrap();
            }
        }
        disk.into_inner()
    }

    const SEED: &str =
        r#"{"instance_id":"i-1","hostname":"web1","ssh_keys":["ssh-ed25519 AAAA me"]}"#;

    #[test]
    fn reads_only_cidata_volumes() {
        let s = parse_image(fat("CIDATA", &[("drover.json", SEED)]))
            .unwrap()
            .unwrap();
        assert_eq!(s.hostname, "web1");
        assert_eq!(
            parse_image(fat("OTHER", &[("drover.json", SEED)])).unwrap(),
            None
        );
        assert_eq!(
            parse_image(fat("CIDATA", &[("meta-data", "x")])).unwrap(),
            None
        );
        assert_eq!(parse_image(vec![0u8; 4096]).unwrap(), None, "not FAT");
        let bad = parse_image(fat("CIDATA", &[("drover.json", "{\"hostname\":1}")]));
        assert!(bad.is_err(), "a broken seed is reported");
    }

    #[test]
    fn finds_the_seed_among_disks() {
        let d = TempDir::new("seed");
        let sys = d.path().join("sys");
        let dev = d.path().join("dev");
        for n in ["vda", "vda1", "vdb", "loop0"] {
            fs::create_dir_all(sys.join(n)).unwrap();
        }
        fs::create_dir_all(&dev).unwrap();
        fs::write(dev.join("vda"), vec![1u8; 8192]).unwrap();
        fs::write(dev.join("vdb"), fat("CIDATA", &[("drover.json", SEED)])).unwrap();
        assert_eq!(find(&sys, &dev).unwrap().unwrap().instance_id, "i-1");
        fs::remove_file(dev.join("vdb")).unwrap();
        assert_eq!(find(&sys, &dev).unwrap(), None);
    }

    #[test]
    fn apply_sets_names_and_adds_keys_once_per_instance() {
        let d = TempDir::new("seed-apply");
        let root = d.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(
            root.join("etc/hosts"),
            "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1 ip6\n",
        )
        .unwrap();
        let mut seed = AgentSeed::parse(SEED.as_bytes()).unwrap();
        let a = apply(&seed, root).unwrap();
        assert_eq!(a.keys_added, 1);
        assert_eq!(
            fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "web1\n"
        );
        assert_eq!(
            fs::read_to_string(root.join("etc/hosts")).unwrap(),
            "127.0.0.1\tlocalhost\n127.0.1.1\tweb1\n::1 ip6\n"
        );
        let ak = root.join("root/.ssh/authorized_keys");
        assert_eq!(fs::read_to_string(&ak).unwrap(), "ssh-ed25519 AAAA me\n");
        let mode = fs::metadata(&ak).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // The user removes the key; the same instance does not put it back.
        fs::write(&ak, "").unwrap();
        assert_eq!(apply(&seed, root).unwrap().keys_added, 0);
        assert_eq!(fs::read_to_string(&ak).unwrap(), "");
        // A new instance (a new seed) installs its keys, without duplicates.
        seed.instance_id = "i-2".into();
        seed.ssh_keys.push("ssh-rsa BBBB other".into());
        fs::write(&ak, "ssh-ed25519 AAAA me\n").unwrap();
        assert_eq!(apply(&seed, root).unwrap().keys_added, 1);
        assert_eq!(
            fs::read_to_string(&ak).unwrap(),
            "ssh-ed25519 AAAA me\nssh-rsa BBBB other\n"
        );
    }

    #[test]
    fn hosts_file_without_entries() {
        assert_eq!(hosts_with("", "a"), "127.0.0.1\tlocalhost\n127.0.1.1\ta\n");
    }
}
