//! The agent as a Debian package (`drover-agent_<version>_amd64.deb`) for real distributions.
//!
//! Built with `dpkg-deb --build --root-owner-group` from a staged tree: dpkg-deb is on every
//! Debian host that builds images already (the kernel is unpacked with it), needs no extra tool
//! from crates.io and packs the static agent exactly as built, whereas cargo-deb would have to be
//! installed and taught the static `--target` build.
//!
//! What the package holds and why:
//! - `/usr/bin/drover-agent` and the `drover-guest` link to it;
//! - `drover-agent.service`, started by a udev rule **only where the port `org.drover.req` exists**
//!   (a Drover VM), so the package is inert elsewhere; no `[Install]` section, nothing to enable;
//! - a `drover` system group (postinst) that owns the app socket, so members may use
//!   `drover-guest` without root;
//! - `/etc/drover/hooks/{migrated.d,restored.d}/` for the user's hooks.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{ImageError, IoContext};
use crate::host;

/// The package name.
pub const PACKAGE: &str = "drover-agent";

/// The systemd unit. Started early (no default dependencies: the agent needs only its device and
/// `/run`), after the root filesystem is writable (the seed is applied there), stopped late in
/// shutdown. Restarted if it dies, as `/init` does in the busybox image.
pub const SERVICE: &str = "\
[Unit]
Description=Drover guest agent (host channel on virtio-serial org.drover.req/evt)
DefaultDependencies=no
After=systemd-remount-fs.service
Before=shutdown.target
Conflicts=shutdown.target
ConditionPathExists=/dev/virtio-ports/org.drover.req

[Service]
ExecStart=/usr/bin/drover-agent
Restart=always
RestartSec=1
";

/// The udev rule: the port's name is set by the host, so only Drover VMs start the agent.
/// Debian's stock rules already link `/dev/virtio-ports/<name>`.
pub const UDEV_RULE: &str = "\
# Start drover-agent on Drover VMs only: they have a virtio-serial port named org.drover.req.
SUBSYSTEM==\"virtio-ports\", ATTR{name}==\"org.drover.req\", TAG+=\"systemd\", ENV{SYSTEMD_WANTS}+=\"drover-agent.service\"
";

/// postinst: the group, and a running system picks up the unit and the rule at once.
pub const POSTINST: &str = "\
#!/bin/sh
set -e
if [ \"$1\" = configure ]; then
    getent group drover >/dev/null || addgroup --system drover >/dev/null
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        udevadm control --reload || true
        # Starts (or restarts, on upgrade) the agent where the port exists.
        if [ -e /dev/virtio-ports/org.drover.req ]; then
            systemctl restart drover-agent.service || true
        fi
    fi
fi
exit 0
";

/// prerm: stop the agent before its binary goes away.
pub const PRERM: &str = "\
#!/bin/sh
set -e
if [ \"$1\" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop drover-agent.service || true
fi
exit 0
";

/// The `control` file for `version`.
pub fn control(version: &str, installed_kib: u64) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: Drover <drover@localhost>\n\
         Installed-Size: {installed_kib}\n\
         Depends: adduser\n\
         Section: admin\n\
         Priority: optional\n\
         Description: Drover guest agent and drover-guest CLI\n \
         Serves the Drover host inside a VM over virtio-serial: exec, orderly power-off through\n \
         systemd, guest saves and restores, scans, hot-plugged CPU and memory onlining.\n \
         Started by udev only on Drover VMs.\n"
    )
}

/// Every text in the package, for cache keys.
pub fn texts() -> Vec<(&'static str, String)> {
    vec![
        ("deb:service", SERVICE.to_string()),
        ("deb:udev", UDEV_RULE.to_string()),
        ("deb:postinst", POSTINST.to_string()),
        ("deb:prerm", PRERM.to_string()),
        ("deb:control", control("V", 0)),
    ]
}

/// The package file name for `version`.
pub fn file_name(version: &str) -> String {
    host::deb_file_name(PACKAGE, version)
}

/// Builds the package from the static `agent` into `out_dir`; returns its path.
pub fn build(agent: &Path, version: &str, out_dir: &Path) -> Result<PathBuf, ImageError> {
    let stage = tempfile::Builder::new()
        .prefix(".deb-")
        .tempdir_in(out_dir)
        .ctx("create a temporary directory in", out_dir)?;
    let root = stage.path().join("root");
    let put = |rel: &str, mode: u32, data: &[u8]| -> Result<(), ImageError> {
        let path = root.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).ctx("create", parent)?;
        }
        fs::write(&path, data).ctx("write", &path)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).ctx("chmod", &path)
    };
    let agent_bytes = fs::read(agent).ctx("read", agent)?;
    put("usr/bin/drover-agent", 0o755, &agent_bytes)?;
    let link = root.join("usr/bin/drover-guest");
    std::os::unix::fs::symlink("drover-agent", &link).ctx("create symlink", &link)?;
    put(
        "lib/systemd/system/drover-agent.service",
        0o644,
        SERVICE.as_bytes(),
    )?;
    put(
        "lib/udev/rules.d/60-drover-agent.rules",
        0o644,
        UDEV_RULE.as_bytes(),
    )?;
    for d in ["etc/drover/hooks/migrated.d", "etc/drover/hooks/restored.d"] {
        fs::create_dir_all(root.join(d)).ctx("create", &root.join(d))?;
    }
    let kib = (agent_bytes.len() as u64).div_ceil(1024) + 8;
    put("DEBIAN/control", 0o644, control(version, kib).as_bytes())?;
    put("DEBIAN/postinst", 0o755, POSTINST.as_bytes())?;
    put("DEBIAN/prerm", 0o755, PRERM.as_bytes())?;

    let out = out_dir.join(file_name(version));
    let tmp_out = stage.path().join("out.deb");
    host::run(
        Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group", "-Zxz"])
            .arg(&root)
            .arg(&tmp_out),
        None,
    )?;
    fs::rename(&tmp_out, &out).ctx(&format!("move {} to", tmp_out.display()), &out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udev_rule_matches_only_the_drover_port() {
        assert!(UDEV_RULE.contains("ATTR{name}==\"org.drover.req\""));
        assert!(UDEV_RULE.contains("SYSTEMD_WANTS}+=\"drover-agent.service\""));
        assert!(
            !SERVICE.contains("[Install]"),
            "started by udev, not enabled"
        );
    }

    /// Builds a real package (needs dpkg-deb, as every Debian host has) and reads it back.
    #[test]
    fn package_has_binary_link_unit_rule_and_hooks() {
        let d = tempfile::tempdir().unwrap();
        let agent = d.path().join("agent");
        fs::write(&agent, b"\x7fELF not really").unwrap();
        let deb = build(&agent, "0.1.0", d.path()).unwrap();
        assert_eq!(deb, d.path().join("drover-agent_0.1.0_amd64.deb"));
        let list = host::run(Command::new("dpkg-deb").arg("-c").arg(&deb), None).unwrap();
        for want in [
            "-rwxr-xr-x root/root",
            "./usr/bin/drover-agent",
            "./usr/bin/drover-guest -> drover-agent",
            "./lib/systemd/system/drover-agent.service",
            "./lib/udev/rules.d/60-drover-agent.rules",
            "./etc/drover/hooks/migrated.d/",
            "./etc/drover/hooks/restored.d/",
        ] {
            assert!(list.contains(want), "{want} missing from:\n{list}");
        }
        let info = host::run(
            Command::new("dpkg-deb")
                .args(["-f"])
                .arg(&deb)
                .arg("Package"),
            None,
        )
        .unwrap();
        assert_eq!(info.trim(), "drover-agent");
        let scripts = host::run(
            Command::new("dpkg-deb").arg("-I").arg(&deb).arg("postinst"),
            None,
        )
        .unwrap();
        assert!(scripts.contains("addgroup --system drover"));
        // No leftovers besides the package.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 2);
    }
}
