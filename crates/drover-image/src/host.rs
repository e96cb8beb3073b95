//! The host tools the builder drives: apt-cache / apt-get (kernel package), dpkg-deb (unpacking),
//! dpkg-query and busybox itself (version and applet list).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{ImageError, IoContext};

/// Which Debian package provides a tool, for "not found" hints.
fn package_of(program: &str) -> &'static str {
    match program {
        "apt-get" | "apt-cache" => "apt",
        "dpkg-deb" | "dpkg-query" => "dpkg",
        _ => "busybox-static",
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// The last few lines of a command's stderr: enough to act on, short enough for one error line.
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let start = lines.len().saturating_sub(4);
    let mut s = lines[start..].join(" | ");
    if s.len() > 1000 {
        let mut cut = s.len() - 1000;
        while !s.is_char_boundary(cut) {
            cut += 1;
        }
        s = format!("...{}", &s[cut..]);
    }
    s
}

/// Runs `cmd`, returning its stdout; a spawn failure or non-zero exit becomes
/// [`ImageError::Command`] with `hint` (or an install hint if the program is missing).
pub fn run(cmd: &mut Command, hint: Option<&str>) -> Result<String, ImageError> {
    let command = describe(cmd);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|e| ImageError::Command {
        command: command.clone(),
        detail: format!("could not run it: {e}"),
        hint: Some(if e.kind() == std::io::ErrorKind::NotFound {
            format!("install it with `apt-get install {}`", package_of(&program))
        } else {
            hint.unwrap_or("check that it is installed and executable")
                .to_string()
        }),
    })?;
    if !out.status.success() {
        let err = tail(&out.stderr);
        return Err(ImageError::Command {
            command,
            detail: if err.is_empty() {
                format!("{}", out.status)
            } else {
                format!("{}: {err}", out.status)
            },
            hint: hint.map(str::to_string),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True for a concrete kernel image package (`linux-image-6.1.0-28-amd64`), false for a
/// metapackage (`linux-image-amd64`, `linux-image-cloud-amd64`).
fn is_concrete(pkg: &str) -> bool {
    pkg.strip_prefix("linux-image-")
        .and_then(|r| r.chars().next())
        .is_some_and(|c| c.is_ascii_digit())
}

/// Picks the concrete kernel package, and its version if pinned (`(= 6.1.119-1)`), out of the
/// `Depends:` field of `apt-cache show` output.
pub fn concrete_from_show(show: &str) -> Option<(String, Option<String>)> {
    let depends = show.lines().find_map(|l| l.strip_prefix("Depends:"))?;
    depends.split([',', '|']).find_map(|dep| {
        let dep = dep.trim();
        let (name, rest) = dep.split_once(' ').unwrap_or((dep, ""));
        if !is_concrete(name) {
            return None;
        }
        let version = rest
            .trim()
            .strip_prefix("(=")
            .and_then(|v| v.strip_suffix(')'))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty());
        Some((name.to_string(), version))
    })
}

fn show(pkg: &str, hint: &str) -> Result<String, ImageError> {
    run(
        Command::new("apt-cache").args(["show", "--no-all-versions", pkg]),
        Some(hint),
    )
}

/// Resolves `wanted` (a metapackage or a concrete kernel package) to (concrete package, candidate
/// version). One `apt-cache` run in the usual case: Debian's metapackages pin the exact version
/// of the kernel they depend on. (Each run costs about a second where apt's package cache is
/// disabled, as in Debian's container images.)
pub fn resolve_kernel(wanted: &str) -> Result<(String, String), ImageError> {
    const HINT: &str =
        "run `apt-get update` (and check /etc/apt/sources.list has Debian's main archive)";
    let version_of = |pkg: &str, text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("Version:").map(|v| v.trim().to_string()))
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ImageError::Kernel {
                package: pkg.to_string(),
                message: format!("`apt-cache show {pkg}` gave no version; {HINT}"),
            })
    };
    if is_concrete(wanted) {
        let text = show(wanted, HINT)?;
        return Ok((wanted.to_string(), version_of(wanted, &text)?));
    }
    let text = show(wanted, HINT)?;
    match concrete_from_show(&text) {
        Some((pkg, Some(version))) => Ok((pkg, version)),
        Some((pkg, None)) => {
            let text = show(&pkg, HINT)?;
            let version = version_of(&pkg, &text)?;
            Ok((pkg, version))
        }
        None => Err(ImageError::Kernel {
            package: wanted.to_string(),
            message: format!(
                "its dependencies name no linux-image-<version> package; {HINT}, or pass a concrete \
                 package such as linux-image-6.1.0-28-amd64"
            ),
        }),
    }
}

/// A fingerprint of apt's state (package lists, sources, preferences, dpkg status): while it is
/// unchanged, resolving a package gives the same answer, so the answer can be cached.
pub fn apt_fingerprint() -> String {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::MetadataExt;
    let mut h = Sha256::new();
    let mut add = |p: &Path| {
        if let Ok(m) = std::fs::metadata(p) {
            h.update(format!(
                "{} {} {} {}\n",
                p.display(),
                m.len(),
                m.mtime(),
                m.mtime_nsec()
            ));
        }
    };
    for dir in [
        "/var/lib/apt/lists",
        "/etc/apt/sources.list.d",
        "/etc/apt/preferences.d",
    ] {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        paths.sort();
        paths.iter().for_each(|p| add(p));
    }
    for f in [
        "/etc/apt/sources.list",
        "/etc/apt/preferences",
        "/var/lib/dpkg/status",
    ] {
        add(Path::new(f));
    }
    hex::encode(h.finalize())
}

/// The file name a downloaded package is cached under.
pub fn deb_file_name(pkg: &str, version: &str) -> String {
    // Epochs ("1:2.3") have a colon, which apt itself writes as %3a in file names.
    format!("{pkg}_{}_amd64.deb", version.replace(':', "%3a"))
}

/// Downloads `pkg=version` into `downloads` (unless already there) and returns the .deb's path.
///
/// apt-get writes into a private temporary directory first and the file is renamed into place,
/// so an interrupted download never leaves a truncated .deb that later builds would trust.
pub fn download(pkg: &str, version: &str, downloads: &Path) -> Result<PathBuf, ImageError> {
    let dest = downloads.join(deb_file_name(pkg, version));
    if dest.is_file() {
        return Ok(dest);
    }
    std::fs::create_dir_all(downloads).ctx("create", downloads)?;
    let tmp = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(downloads)
        .ctx("create a temporary directory in", downloads)?;
    let mut cmd = Command::new("apt-get");
    cmd.arg("download");
    // As root, apt drops to the `_apt` user, which cannot write into a private cache directory:
    // it then warns and downloads as root anyway. Say so up front to keep the log clean.
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        cmd.args(["-o", "APT::Sandbox::User=root"]);
    }
    cmd.arg(format!("{pkg}={version}")).current_dir(tmp.path());
    run(
        &mut cmd,
        Some(
            "run `apt-get update`; the package index may be out of date or the mirror unreachable",
        ),
    )?;
    let deb = std::fs::read_dir(tmp.path())
        .ctx("list", tmp.path())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| ImageError::Kernel {
            package: pkg.to_string(),
            message: format!("apt-get download left no .deb in {}", tmp.path().display()),
        })?;
    std::fs::rename(&deb, &dest).ctx(&format!("move {} to", deb.display()), &dest)?;
    Ok(dest)
}

/// Unpacks a .deb's files into `dest` (`dpkg-deb -x`).
pub fn extract_deb(deb: &Path, dest: &Path) -> Result<(), ImageError> {
    let hint = format!(
        "the cached package may be damaged: delete {} and build again",
        deb.display()
    );
    run(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest),
        Some(&hint),
    )
    .map(|_| ())
}

/// The installed version of the Debian package `pkg`, if dpkg knows it.
pub fn installed_version(pkg: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", pkg])
        .output()
        .ok()?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !v.is_empty()).then_some(v)
}

/// `busybox --list-full`: applet paths relative to `/` (e.g. `bin/sh`, `sbin/ip`).
pub fn busybox_applets(busybox: &Path) -> Result<Vec<String>, ImageError> {
    let out = run(
        Command::new(busybox).arg("--list-full"),
        Some("run `apt-get install busybox-static`"),
    )?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| l.contains('/') && !l.starts_with('/'))
        .map(str::to_string)
        .collect())
}

/// The first line of busybox's banner, e.g. `BusyBox v1.35.0 (Debian 1:1.35.0-4+b1) multi-call binary.`
pub fn busybox_banner(busybox: &Path) -> Option<String> {
    let out = Command::new(busybox).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_concrete_dependency() {
        let out = "Package: linux-image-amd64\nVersion: 6.1.192-3\nDepends: linux-image-6.1.0-57-amd64 (= 6.1.192-3)\n";
        assert_eq!(
            concrete_from_show(out),
            Some((
                "linux-image-6.1.0-57-amd64".into(),
                Some("6.1.192-3".into())
            ))
        );
        let out = "Package: x\nDepends: initramfs-tools | linux-initramfs-tool, linux-image-6.1.0-28-cloud-amd64\n";
        assert_eq!(
            concrete_from_show(out),
            Some(("linux-image-6.1.0-28-cloud-amd64".into(), None))
        );
        assert_eq!(
            concrete_from_show("Package: x\nDepends: libc6 (>= 2.36)\n"),
            None
        );
        assert_eq!(concrete_from_show("Package: x\n"), None);
        assert!(is_concrete("linux-image-6.1.0-28-amd64"));
        assert!(!is_concrete("linux-image-amd64"));
    }

    #[test]
    fn deb_names_escape_epochs() {
        assert_eq!(
            deb_file_name("busybox-static", "1:1.35.0-4"),
            "busybox-static_1%3a1.35.0-4_amd64.deb"
        );
    }

    #[test]
    fn failing_command_reports_stderr_and_hint() {
        let err = run(
            Command::new("sh").args(["-c", "echo oops >&2; exit 3"]),
            Some("do the thing"),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "sh -c echo oops >&2; exit 3 failed: exit status: 3: oops; do the thing"
            ),
            "{msg}"
        );
        let err = run(&mut Command::new("apt-cache-does-not-exist"), None).unwrap_err();
        assert!(err.to_string().contains("apt-get install"), "{err}");
    }
}
