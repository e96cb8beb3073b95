//! QEMU processes: spawned so they outlive droverd, and checked on by pid afterwards.

use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Process failures.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The QEMU binary could not be run.
    #[error("cannot run {binary}: {source} (install QEMU: scripts/install-deps.sh, or give droverd --qemu-dir)")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A file QEMU needs could not be prepared.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// `--version` output not understood.
    #[error("cannot read the version of {0}")]
    Version(PathBuf),
}

/// Spawn QEMU detached from droverd's session, its output appended to `log`.
///
/// It gets its own session (so a terminal's Ctrl-C or droverd's death does not reach it) and no
/// pipes (a dead reader would kill it with SIGPIPE). droverd stays its parent while it lives, so
/// exits are reaped promptly; after a droverd restart the QMP socket's end tells instead.
pub fn spawn(
    binary: &Path,
    env: &[(&str, PathBuf)],
    args: &[String],
    log: &Path,
) -> Result<tokio::process::Child, ProcessError> {
    let io = |source| ProcessError::Io {
        path: log.to_path_buf(),
        source,
    };
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io)?;
    let err = out.try_clone().map_err(io)?;
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(false);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    cmd.spawn().map_err(|source| ProcessError::Spawn {
        binary: binary.to_path_buf(),
        source,
    })
}

/// Whether `pid` is a live (not zombie) process whose command line mentions `marker`.
///
/// A zombie counts as exited: after a droverd restart QEMU is no longer our child and init reaps
/// it late (PLATFORM.md). The marker guards against a recycled pid.
pub fn is_alive(pid: u32, marker: &str) -> bool {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(_) => return false,
    };
    // The state follows the last ')' (the command name may contain spaces and parentheses).
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    if matches!(state, Some('Z') | Some('X') | None) {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => String::from_utf8_lossy(&cmdline).contains(marker),
        Err(_) => false,
    }
}

/// Read a pid file.
pub fn read_pidfile(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Send a signal, ignoring a process that is already gone.
pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// QEMU's version from `BINARY --version` (`7.2.19`).
pub fn version(binary: &Path) -> Result<String, ProcessError> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|source| ProcessError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| ProcessError::Version(binary.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_is_alive_and_bogus_is_not() {
        let me = std::process::id();
        assert!(is_alive(me, ""));
        assert!(!is_alive(me, "certainly-not-in-my-cmdline-xyz"));
        assert!(!is_alive(u32::MAX - 1, ""));
    }

    #[tokio::test]
    async fn spawned_process_survives_in_own_session() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut child = spawn(
            Path::new("/bin/sh"),
            &[("DROVER_T", PathBuf::from("hi"))],
            &["-c".into(), "echo $DROVER_T; exit 3".into()],
            &log,
        )
        .unwrap();
        let status = child.wait().await.unwrap();
        assert_eq!(status.code(), Some(3));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "hi\n");
    }
}
