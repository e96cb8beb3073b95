//! The NoCloud seed (cloud-init's `cidata`) Drover gives a VM: a small FAT image labelled
//! `CIDATA`, attached read-only, holding
//!
//! - `meta-data`: `instance-id`, `local-hostname` (the VM's name), `public-keys` (from `--ssh-key`);
//! - `user-data`: the user's file (`--user-data`) as given, else a `#cloud-config` with the keys;
//! - `network-config`: version 2, every NIC matched by its MAC address, DHCP;
//! - `drover.json`: the same hostname and keys for the Drover agent, which applies them where
//!   cloud-init is not installed (Drover's Debian image: cloud-init would add tens of seconds to a
//!   TCG boot). Strict JSON, so the agent parses nothing YAML.
//!
//! FAT rather than ISO9660: the `fatfs` crate writes it in memory in pure Rust, and the agent
//! reads it with the same crate straight from the block device (no vfat module or mount).
//!
//! [`generate`] is pure (text in, files out); [`write_fat`] packs them.

use std::io::{Cursor, Seek as _, Write as _};

/// The volume label cloud-init looks for (upper case: FAT labels are).
pub const LABEL: &str = "CIDATA";
/// Size of the FAT image: the files are tiny, and FAT12 needs no more.
pub const IMAGE_BYTES: usize = 1024 * 1024;
/// Most bytes of user-data accepted (it travels in the API's create request).
pub const MAX_USER_DATA: usize = 32 * 1024;
pub use drover_proto::seed::{FILE as AGENT_FILE, MAX_KEYS};

/// What goes into a seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedInput<'a> {
    /// cloud-init runs its once-per-instance modules again when this changes.
    pub instance_id: &'a str,
    /// The VM's name.
    pub hostname: &'a str,
    /// `authorized_keys` lines.
    pub ssh_keys: &'a [String],
    /// The user's own user-data, verbatim.
    pub user_data: Option<&'a str>,
    /// MAC addresses of the VM's NICs (`52:54:00:..`), in order.
    pub macs: &'a [String],
}

pub use drover_proto::seed::AgentSeed;

/// Why a seed cannot be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeedError {
    /// A key that is not one `authorized_keys` line.
    #[error("SSH key {index}: {why}; give a public key file such as ~/.ssh/id_ed25519.pub")]
    BadKey {
        /// 1-based position.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// Too much of something.
    #[error("{0}")]
    TooLarge(String),
    /// The hostname cannot be one.
    #[error("VM name {0:?} is not a valid hostname for the seed")]
    BadHostname(String),
    /// fatfs failed (in memory: a bug, not the user's doing).
    #[error("writing the seed image: {0}")]
    Fat(String),
}

/// The files of a seed, by name.
pub fn generate(input: &SeedInput<'_>) -> Result<Vec<(&'static str, String)>, SeedError> {
    check_hostname(input.hostname)?;
    if input.ssh_keys.len() > MAX_KEYS {
        return Err(SeedError::TooLarge(format!(
            "{} SSH keys given; at most {MAX_KEYS}",
            input.ssh_keys.len()
        )));
    }
    for (i, k) in input.ssh_keys.iter().enumerate() {
        check_key(k).map_err(|why| SeedError::BadKey { index: i + 1, why })?;
    }
    if let Some(u) = input.user_data {
        if u.len() > MAX_USER_DATA {
            return Err(SeedError::TooLarge(format!(
                "user-data is {} bytes; at most {MAX_USER_DATA}",
                u.len()
            )));
        }
    }
    // JSON strings are YAML double-quoted scalars: no quoting rules of our own.
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut meta = format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        q(input.instance_id),
        q(input.hostname)
    );
    let mut keys_yaml = String::new();
    for k in input.ssh_keys {
        keys_yaml.push_str(&format!("  - {}\n", q(k.trim())));
    }
    if !keys_yaml.is_empty() {
        meta.push_str("public-keys:\n");
        meta.push_str(&keys_yaml);
    }
    let user = match input.user_data {
        Some(u) => u.to_string(),
        None if keys_yaml.is_empty() => "#cloud-config\n{}\n".to_string(),
        None => format!("#cloud-config\nssh_authorized_keys:\n{keys_yaml}"),
    };
    let mut net = String::from("version: 2\nethernets:\n");
    for (i, mac) in input.macs.iter().enumerate() {
        net.push_str(&format!(
            "  nic{i}:\n    match:\n      macaddress: {}\n    dhcp4: true\n",
            q(&mac.to_ascii_lowercase())
        ));
    }
    if input.macs.is_empty() {
        net = "version: 2\nethernets: {}\n".to_string();
    }
    let agent = AgentSeed {
        instance_id: input.instance_id.to_string(),
        hostname: input.hostname.to_string(),
        ssh_keys: input
            .ssh_keys
            .iter()
            .map(|k| k.trim().to_string())
            .collect(),
    };
    let agent = serde_json::to_string_pretty(&agent).map_err(|e| SeedError::Fat(e.to_string()))?;
    Ok(vec![
        ("meta-data", meta),
        ("user-data", user),
        ("network-config", net),
        (AGENT_FILE, agent + "\n"),
    ])
}

fn check_hostname(h: &str) -> Result<(), SeedError> {
    if drover_proto::seed::valid_hostname(h) {
        Ok(())
    } else {
        Err(SeedError::BadHostname(h.to_string()))
    }
}

fn check_key(k: &str) -> Result<(), String> {
    drover_proto::seed::key_problem(k).map_or(Ok(()), Err)
}

/// Packs `files` into a FAT image labelled [`LABEL`].
pub fn write_fat(files: &[(&str, String)]) -> Result<Vec<u8>, SeedError> {
    let fat = |e: std::io::Error| SeedError::Fat(e.to_string());
    let mut disk = Cursor::new(vec![0u8; IMAGE_BYTES]);
    let mut label = [b' '; 11];
    label[..LABEL.len()].copy_from_slice(LABEL.as_bytes());
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new().volume_label(label),
    )
    .map_err(fat)?;
    disk.rewind().map_err(fat)?;
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).map_err(fat)?;
        for (name, text) in files {
            let mut f = fs.root_dir().create_file(name).map_err(fat)?;
            f.truncate().map_err(fat)?;
            f.write_all(text.as_bytes()).map_err(fat)?;
            f.flush().map_err(fat)?;
        }
        fs.unmount().map_err(fat)?;
    }
    Ok(disk.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFake user@host";

    fn input<'a>(keys: &'a [String], macs: &'a [String], user: Option<&'a str>) -> SeedInput<'a> {
        SeedInput {
            instance_id: "i-web1-1",
            hostname: "web1",
            ssh_keys: keys,
            user_data: user,
            macs,
        }
    }

    fn file<'a>(files: &'a [(&str, String)], name: &str) -> &'a str {
        &files.iter().find(|(n, _)| *n == name).unwrap().1
    }

    #[test]
    fn meta_user_and_network_data() {
        let keys = vec![format!("{KEY}\n")];
        let macs = vec!["52:54:00:AB:CD:01".to_string(), "52:54:00:ab:cd:02".into()];
        let files = generate(&input(&keys, &macs, None)).unwrap();
        assert_eq!(
            file(&files, "meta-data"),
            format!(
                "instance-id: \"i-web1-1\"\nlocal-hostname: \"web1\"\npublic-keys:\n  - \"{KEY}\"\n"
            )
        );
        assert_eq!(
            file(&files, "user-data"),
            format!("#cloud-config\nssh_authorized_keys:\n  - \"{KEY}\"\n")
        );
        let net = file(&files, "network-config");
        assert!(
            net.starts_with("version: 2\nethernets:\n  nic0:\n"),
            "{net}"
        );
        assert!(net.contains("macaddress: \"52:54:00:ab:cd:01\""), "{net}");
        assert!(net.contains(
            "  nic1:\n    match:\n      macaddress: \"52:54:00:ab:cd:02\"\n    dhcp4: true\n"
        ));
        let agent: AgentSeed = serde_json::from_str(file(&files, AGENT_FILE)).unwrap();
        assert_eq!(
            agent,
            AgentSeed {
                instance_id: "i-web1-1".into(),
                hostname: "web1".into(),
                ssh_keys: vec![KEY.into()],
            }
        );
    }

    #[test]
    fn user_data_is_kept_verbatim_and_keys_still_reach_meta_data() {
        let keys = vec![KEY.to_string()];
        let mine = "#cloud-config\npackages: [nginx]\n";
        let files = generate(&input(&keys, &[], Some(mine))).unwrap();
        assert_eq!(file(&files, "user-data"), mine);
        assert!(file(&files, "meta-data").contains(KEY));
        assert_eq!(
            file(&files, "network-config"),
            "version: 2\nethernets: {}\n"
        );
        let none = generate(&input(&[], &[], None)).unwrap();
        assert_eq!(file(&none, "user-data"), "#cloud-config\n{}\n");
        assert!(!file(&none, "meta-data").contains("public-keys"));
    }

    #[test]
    fn bad_inputs_are_refused_with_the_reason() {
        let bad = |k: &str| {
            generate(&input(&[k.to_string()], &[], None))
                .unwrap_err()
                .to_string()
        };
        assert!(bad("").contains("empty"));
        assert!(bad("-----BEGIN OPENSSH PRIVATE KEY----- ssh-ed25519").contains("private"));
        assert!(bad("ssh-ed25519 AAAA\nssh-rsa BBBB").contains("more than one line"));
        assert!(bad("hello world").contains("no key type"));
        assert!(bad("ssh-ed25519 AA\u{7}AA").contains("control"));
        // A YAML injection attempt stays one quoted scalar.
        let sneaky = "ssh-ed25519 AAAA\" \nruncmd: [reboot]";
        assert!(bad(sneaky).contains("more than one line"));
        let ok = generate(&input(&["ssh-ed25519 AAAA \"quoted\" c".into()], &[], None)).unwrap();
        assert!(file(&ok, "meta-data").contains(r#"- "ssh-ed25519 AAAA \"quoted\" c""#));
        let many: Vec<String> = (0..=MAX_KEYS).map(|_| KEY.to_string()).collect();
        assert!(matches!(
            generate(&input(&many, &[], None)),
            Err(SeedError::TooLarge(_))
        ));
        let big = "x".repeat(MAX_USER_DATA + 1);
        assert!(matches!(
            generate(&input(&[], &[], Some(&big))),
            Err(SeedError::TooLarge(_))
        ));
        for h in ["", "-a", "a_b", "a.b", &"a".repeat(64)] {
            let i = SeedInput {
                hostname: h,
                ..input(&[], &[], None)
            };
            assert!(
                matches!(generate(&i), Err(SeedError::BadHostname(_))),
                "{h}"
            );
        }
    }

    #[test]
    fn fat_image_has_the_label_and_the_files() {
        let keys = vec![KEY.to_string()];
        let files = generate(&input(&keys, &[], None)).unwrap();
        let img = write_fat(&files).unwrap();
        assert_eq!(img.len(), IMAGE_BYTES);
        let fs = fatfs::FileSystem::new(Cursor::new(img), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim_end(), LABEL);
        for (name, text) in &files {
            let mut s = String::new();
            fs.root_dir()
                .open_file(name)
                .unwrap()
                .read_to_string(&mut s)
                .unwrap();
            assert_eq!(&s, text, "{name}");
        }
    }
}
