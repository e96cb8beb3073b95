//! Disks and files carried to another host over NBD without a running QEMU (offline
//! migration, saved states): `qemu-nbd` serves the destination's new file, `qemu-img convert`
//! writes the source's content into it.

use crate::install::QemuInstall;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a copy over NBD failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// A program could not be run.
    #[error("running {program}: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// qemu-nbd did not listen in time.
    #[error("qemu-nbd did not start for {0}")]
    NotListening(PathBuf),
    /// qemu-img failed; its message.
    #[error("{0}")]
    Copy(String),
}

/// The export name every server here uses (one file or disk each).
pub const EXPORT: &str = "f";

/// Serve `path` (format `fmt`) on `ip:port` as [`EXPORT`], writable, until killed; returns its
/// pid once it listens.
pub async fn serve(
    q: &QemuInstall,
    ip: IpAddr,
    port: u16,
    path: &Path,
    fmt: &str,
) -> Result<u32, NbdError> {
    let child = q
        .tokio_command(&q.qemu_nbd)
        .args(["-f", fmt, "-x", EXPORT, "-b", &ip.to_string()])
        .args(["-p", &port.to_string(), "--persistent", "--shared=2"])
        .arg(path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|source| NbdError::Spawn {
            program: q.qemu_nbd.clone(),
            source,
        })?;
    let pid = child.id().unwrap_or(0);
    // qemu-nbd listens within milliseconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect((ip, port)).await.is_err() {
        if Instant::now() > deadline {
            crate::process::signal(pid, nix::sys::signal::Signal::SIGKILL);
            return Err(NbdError::NotListening(path.to_path_buf()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(pid)
}

/// Write the content of `src` (format `fmt`) into the NBD export `export` at `host:port`.
pub async fn copy_into(
    q: &QemuInstall,
    src: &Path,
    fmt: &str,
    host: &str,
    port: u16,
    export: &str,
) -> Result<(), NbdError> {
    let out = q
        .tokio_command(&q.qemu_img)
        .args(["convert", "-n", "-U", "-f", fmt])
        .arg(src)
        .args(["-O", "raw"])
        .arg(format!("nbd://{host}:{port}/{export}"))
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| NbdError::Spawn {
            program: q.qemu_img.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NbdError::Copy(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}
