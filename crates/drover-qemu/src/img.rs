//! Disk images through `qemu-img`.

use drover_model::DiskFormat;
use std::path::{Path, PathBuf};

/// Disk image failures, each naming the image.
#[derive(Debug, thiserror::Error)]
pub enum ImgError {
    /// qemu-img could not be run.
    #[error(
        "cannot run {0}: {1} (install it: scripts/install-deps.sh, or give droverd --qemu-dir)"
    )]
    Spawn(PathBuf, std::io::Error),
    /// The image does not exist.
    #[error("disk image {0} does not exist")]
    Missing(PathBuf),
    /// qemu-img refused the image.
    #[error("disk image {path} is not usable: {message}")]
    Unusable {
        /// The image.
        path: PathBuf,
        /// What qemu-img said.
        message: String,
    },
    /// Creating an image failed.
    #[error("cannot create disk image {path}: {message}")]
    Create {
        /// The image.
        path: PathBuf,
        /// What qemu-img said.
        message: String,
    },
}

/// What `qemu-img info` tells about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Format.
    pub format: DiskFormat,
    /// Virtual size in bytes.
    pub virtual_size: u64,
}

/// Run the `qemu-img` of the QEMU installation this process uses ([`crate::install::current`]).
fn run(args: &[&str]) -> Result<std::process::Output, ImgError> {
    let q = crate::install::current();
    q.command(&q.qemu_img)
        .args(args)
        .output()
        .map_err(|e| ImgError::Spawn(q.qemu_img.clone(), e))
}

fn stderr_line(out: &std::process::Output) -> String {
    let s = String::from_utf8_lossy(&out.stderr);
    let s = s.trim();
    s.strip_prefix("qemu-img: ").unwrap_or(s).to_string()
}

/// Create a qcow2 image of `size` bytes; refuses to overwrite.
pub fn create_qcow2(path: &Path, size: u64) -> Result<(), ImgError> {
    create(path, size, &["-o", "compat=1.1"])
}

/// Create a qcow2 overlay at `path` whose backing file is `backing` (a qcow2 of `size` bytes).
/// Does not open the backing file (a running QEMU may hold its lock).
pub fn create_overlay(path: &Path, backing: &Path, size: u64) -> Result<(), ImgError> {
    let b = backing.to_string_lossy();
    create(path, size, &["-u", "-b", &b, "-F", "qcow2"])
}

/// Write everything `top` and the layers between it and `base` hold into `base` (a file in
/// `top`'s backing chain): `qemu-img commit -b BASE TOP`. The layers are left as they are.
pub fn commit(top: &Path, base: &Path) -> Result<(), ImgError> {
    let (t, b) = (top.to_string_lossy(), base.to_string_lossy());
    let out = run(&["commit", "-q", "-f", "qcow2", "-b", &b, &t])?;
    if !out.status.success() {
        return Err(ImgError::Create {
            path: base.to_path_buf(),
            message: stderr_line(&out),
        });
    }
    Ok(())
}

/// Copy the raw image `raw` into a new qcow2 at `path` (never over an existing file).
pub fn convert_raw_to_qcow2(raw: &Path, path: &Path) -> Result<(), ImgError> {
    convert_to_qcow2(raw, DiskFormat::Raw, path)
}

/// Copy image `src` of `format` — with everything its backing chain holds — into a new
/// standalone qcow2 at `path` (never over an existing file).
pub fn convert_to_qcow2(src: &Path, format: DiskFormat, path: &Path) -> Result<(), ImgError> {
    if path.exists() {
        return Err(ImgError::Create {
            path: path.to_path_buf(),
            message: "a file already exists there".into(),
        });
    }
    let (r, p, f) = (
        src.to_string_lossy(),
        path.to_string_lossy(),
        format.to_string(),
    );
    let out = run(&[
        "convert",
        "-q",
        "-f",
        &f,
        "-O",
        "qcow2",
        "-o",
        "compat=1.1",
        &r,
        &p,
    ])?;
    if !out.status.success() {
        return Err(ImgError::Create {
            path: path.to_path_buf(),
            message: stderr_line(&out),
        });
    }
    Ok(())
}

/// `qemu-img create -f qcow2 OPTIONS PATH SIZE`, never over an existing file.
fn create(path: &Path, size: u64, options: &[&str]) -> Result<(), ImgError> {
    if path.exists() {
        return Err(ImgError::Create {
            path: path.to_path_buf(),
            message: "a file already exists there".into(),
        });
    }
    let (p, size) = (path.to_string_lossy(), size.to_string());
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(options);
    args.extend_from_slice(&[&p, &size]);
    let out = run(&args)?;
    if !out.status.success() {
        return Err(ImgError::Create {
            path: path.to_path_buf(),
            message: stderr_line(&out),
        });
    }
    Ok(())
}

/// The backing file of a qcow2 image, if it has one (as recorded in the image).
pub fn backing_file(path: &Path) -> Result<Option<std::path::PathBuf>, ImgError> {
    let p = path.to_string_lossy();
    let out = run(&["info", "-U", "--output", "json", &p])?;
    if !out.status.success() {
        return Err(ImgError::Unusable {
            path: path.to_path_buf(),
            message: stderr_line(&out),
        });
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| ImgError::Unusable {
            path: path.to_path_buf(),
            message: format!("unreadable qemu-img info: {e}"),
        })?;
    Ok(v.get("full-backing-filename")
        .or_else(|| v.get("backing-filename"))
        .and_then(|b| b.as_str())
        .map(std::path::PathBuf::from))
}

/// Point a qcow2 image at another backing file with the same content (`rebase -u`: metadata
/// only; for a layer that moved to another host or directory).
pub fn set_backing(path: &Path, backing: &Path) -> Result<(), ImgError> {
    let (p, b) = (path.to_string_lossy(), backing.to_string_lossy());
    let out = run(&["rebase", "-u", "-F", "qcow2", "-b", &b, &p])?;
    if !out.status.success() {
        return Err(ImgError::Unusable {
            path: path.to_path_buf(),
            message: stderr_line(&out),
        });
    }
    Ok(())
}

/// Inspect an existing image: it must exist, be qcow2 or raw, and (qcow2) pass `qemu-img check`.
pub fn inspect(path: &Path) -> Result<ImageInfo, ImgError> {
    if !path.exists() {
        return Err(ImgError::Missing(path.to_path_buf()));
    }
    let unusable = |message: String| ImgError::Unusable {
        path: path.to_path_buf(),
        message,
    };
    let p = path.to_string_lossy();
    // -U: read even if a running VM holds the image's lock.
    let out = run(&["info", "-U", "--output", "json", &p])?;
    if !out.status.success() {
        return Err(unusable(stderr_line(&out)));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| unusable(format!("unreadable qemu-img info: {e}")))?;
    let format = match v.get("format").and_then(|f| f.as_str()) {
        Some("qcow2") => DiskFormat::Qcow2,
        Some("raw") => DiskFormat::Raw,
        Some(other) => {
            return Err(unusable(format!(
                "format {other} is not supported (use qcow2 or raw)"
            )))
        }
        None => return Err(unusable("qemu-img reported no format".into())),
    };
    let virtual_size = v
        .get("virtual-size")
        .and_then(|s| s.as_u64())
        .ok_or_else(|| unusable("qemu-img reported no size".into()))?;
    if virtual_size == 0 {
        return Err(unusable("the image is empty".into()));
    }
    if format == DiskFormat::Qcow2 {
        if v.get("backing-filename").is_some() {
            // Backing chains are Drover's own business (snapshots); an operator image must stand alone.
            return Err(unusable(
                "images with a backing file are not supported; flatten it with qemu-img convert"
                    .into(),
            ));
        }
        let out = run(&["check", "-U", "-q", &p])?;
        if !out.status.success() {
            return Err(unusable(format!(
                "qemu-img check found damage: {}",
                stderr_line(&out)
            )));
        }
    }
    Ok(ImageInfo {
        format,
        virtual_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have_qemu_img() -> bool {
        std::process::Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_ok()
    }

    #[test]
    fn create_inspect_and_reject_damage() {
        if !have_qemu_img() {
            eprintln!("qemu-img not installed; skipping");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.qcow2");
        create_qcow2(&p, 64 << 20).unwrap();
        assert_eq!(
            inspect(&p).unwrap(),
            ImageInfo {
                format: DiskFormat::Qcow2,
                virtual_size: 64 << 20
            }
        );
        assert!(matches!(
            create_qcow2(&p, 1 << 20),
            Err(ImgError::Create { .. })
        ));
        assert!(matches!(
            inspect(&dir.path().join("none")),
            Err(ImgError::Missing(_))
        ));
        // Truncating a qcow2's header corrupts it.
        let bytes = std::fs::read(&p).unwrap();
        let bad = dir.path().join("bad.qcow2");
        std::fs::write(&bad, &bytes[..40]).unwrap();
        assert!(
            matches!(inspect(&bad), Err(ImgError::Unusable { .. })),
            "{:?}",
            inspect(&bad)
        );
        let raw = dir.path().join("r.img");
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        assert_eq!(inspect(&raw).unwrap().format, DiskFormat::Raw);
    }
}
