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
    spawn_confined(binary, env, args, log, None)
}

/// Capabilities (bit `1 << CAP_*`) a confined QEMU keeps: none by default.
pub type CapMask = u64;
/// `CAP_NET_BIND_SERVICE`: host ports below 1024 (forwards an admin chose).
pub const CAP_NET_BIND_SERVICE: CapMask = 1 << 10;
/// `CAP_SYS_PTRACE`: the `userfaultfd` system call with `vm.unprivileged_userfaultfd = 0`,
/// which QEMU before 8.1 needs for background snapshots (8.1 and later open /dev/userfaultfd).
pub const CAP_SYS_PTRACE: CapMask = 1 << 19;

/// How a confined QEMU runs: what it keeps, whom it runs as, what it inherits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confine {
    /// Capabilities kept (bits `1 << CAP_*`); none by default.
    pub keep: CapMask,
    /// Run as this user rather than droverd's: a QEMU escape is then that user, not root.
    pub run_as: Option<RunAs>,
    /// Descriptors QEMU inherits under their own numbers (named by `-add-fd fd=N`): files it may
    /// not open by name, opened for it by droverd.
    pub inherit: Vec<std::os::fd::RawFd>,
}

/// A user QEMU runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
    /// Its supplementary groups (e.g. `kvm`, for `/dev/kvm`).
    pub groups: Vec<u32>,
}

/// [`spawn`], and with `Some(confine)` QEMU runs with no capability outside `confine.keep` (its
/// bounding, inheritable and ambient sets emptied before exec, and `no_new_privs`, so neither
/// it nor anything it executes can get one back), as `confine.run_as` if given (the kept
/// capabilities then as ambient ones, the only kind a non-root exec keeps).
pub fn spawn_confined(
    binary: &Path,
    env: &[(&str, PathBuf)],
    args: &[String],
    log: &Path,
    confine: Option<&Confine>,
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
    let confine = confine.cloned();
    // SAFETY: only raw system calls between fork and exec (setsid, fcntl, prctl, capset,
    // setres[ug]id, setgroups), no allocation: `confine` was moved in before the fork.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if let Some(c) = &confine {
                for &fd in &c.inherit {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                confine_now(c)?;
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|source| ProcessError::Spawn {
        binary: binary.to_path_buf(),
        source,
    })
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `capset` with the same mask in the effective, permitted and inheritable sets (the first 32
/// capabilities in `data[0]`, the rest in `data[1]`).
///
/// # Safety
/// Between fork and exec: a raw system call, nothing else.
unsafe fn cap_set_all(mask: CapMask, inheritable_only_clear: bool) -> std::io::Result<()> {
    let mut hdr = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    if inheritable_only_clear {
        if libc::syscall(
            libc::SYS_capget,
            &mut hdr as *mut CapHeader,
            data.as_mut_ptr(),
        ) != 0
        {
            return Ok(());
        }
        data[0].inheritable = 0;
        data[1].inheritable = 0;
    } else {
        for (i, d) in data.iter_mut().enumerate() {
            let part = (mask >> (32 * i)) as u32;
            *d = CapData {
                effective: part,
                permitted: part,
                inheritable: part,
            };
        }
    }
    if libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Drop every capability outside `c.keep` for good and become `c.run_as` (runs between fork
/// and exec: only async-signal-safe calls; raw `setres[ug]id`, since glibc's wrappers signal
/// threads a forked child does not have).
fn confine_now(c: &Confine) -> std::io::Result<()> {
    let keep = c.keep;
    // SAFETY: prctl, capset and setres[ug]id with integer arguments or our own stack memory.
    unsafe {
        for cap in 0..64u64 {
            if keep & (1 << cap) == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
            {
                let e = std::io::Error::last_os_error();
                // Past the last capability this kernel knows.
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(e);
                }
            }
        }
        // Inheritable capabilities would survive exec past the bounding set: clear them.
        cap_set_all(0, true)?;
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
        if let Some(u) = &c.run_as {
            let check = |r: libc::c_long| {
                if r != 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            check(libc::syscall(
                libc::SYS_setgroups,
                u.groups.len() as libc::size_t,
                u.groups.as_ptr(),
            ))?;
            check(libc::syscall(libc::SYS_setresgid, u.gid, u.gid, u.gid))?;
            if keep != 0 {
                check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) as libc::c_long)?;
            }
            check(libc::syscall(libc::SYS_setresuid, u.uid, u.uid, u.uid))?;
            if keep != 0 {
                // A non-root exec keeps only ambient capabilities; they need the same ones
                // permitted and inheritable first.
                cap_set_all(keep, false)?;
                for cap in 0..64u64 {
                    if keep & (1 << cap) != 0 {
                        check(libc::prctl(
                            libc::PR_CAP_AMBIENT,
                            libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                            cap as libc::c_ulong,
                            0,
                            0,
                        ) as libc::c_long)?;
                    }
                }
            }
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The kernel's `PF_EXITING` task flag (`/proc/PID/stat` field 9): set when the process has
/// called `exit` or been killed, before its memory is torn down and its files closed.
const PF_EXITING: u64 = 0x4;

/// Whether a `/proc/PID/stat` text shows a process that is exiting or has exited (zombie).
fn stat_says_exiting(stat: &str) -> bool {
    // After the command name (which may hold spaces and parentheses): state is field 3,
    // flags field 9.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return true;
    };
    let mut f = rest.split_whitespace();
    let state = f.next();
    if matches!(state, Some("Z") | Some("X") | None) {
        return true;
    }
    f.nth(5)
        .and_then(|flags| flags.parse::<u64>().ok())
        .is_none_or(|flags| flags & PF_EXITING != 0)
}

/// Whether process `pid` has begun to exit (or is gone). A QEMU past this point has done all its
/// own clean-up (its sockets and pid file are unlinked); the kernel may still take a while
/// (50-200 ms for a few hundred MiB of guest memory here) to free its memory and close its
/// files, so disk images it had open may still be locked.
pub fn is_exiting(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => stat_says_exiting(&s),
        Err(_) => true,
    }
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

/// When `pid` started, in clock ticks since boot (`/proc/PID/stat` field 22): with the pid, it
/// names one process for good (a recycled pid starts later).
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, starttime 22.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// The executable name of `pid` (`/proc/PID/comm`).
pub fn comm(pid: u32) -> Option<String> {
    Some(
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()?
            .trim()
            .to_string(),
    )
}

/// Live processes with a command-line argument naming a path under `dir` (as the argument
/// itself, or after a `=`, `:` or `,` as in `path=...` or `unix:...`), each with the rest of
/// that path below `dir`. How droverd finds the processes of its own state dir, whatever its
/// records say; other state dirs never match, even one whose path contains this one.
pub fn with_path_under(dir: &Path) -> Vec<(u32, String)> {
    let mut prefix = dir.display().to_string();
    if !prefix.ends_with('/') {
        prefix.push('/');
    }
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    let me = std::process::id();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let found = cmdline.split(|b| *b == 0).find_map(|arg| {
            let arg = String::from_utf8_lossy(arg);
            std::iter::once(0)
                .chain(arg.match_indices(['=', ':', ',']).map(|(i, _)| i + 1))
                .find_map(|i| arg[i..].strip_prefix(&prefix).map(str::to_string))
        });
        if let Some(rest) = found {
            if is_alive(pid, "") {
                out.push((pid, rest));
            }
        }
    }
    out
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
    fn exiting_is_read_from_the_flags_and_state() {
        // A running QEMU (flags 0x40400040), one past exit (0x40400044), a zombie, and a name
        // with spaces and parentheses.
        let running = "7499 (qemu-system-x86) S 1 7499 7499 0 -1 1077936448 4421 0 0 0";
        let leaving = "7499 (qemu-system-x86) R 1 7499 7499 0 -1 1077936452 4421 0 0 0";
        let zombie = "7499 (qemu-system-x86) Z 1 7499 7499 0 -1 1077936452 4421 0 0 0";
        let odd = "42 (a) b (c) S 1 42 42 0 -1 1077936448 1 0 0 0";
        assert!(!stat_says_exiting(running));
        assert!(stat_says_exiting(leaving));
        assert!(stat_says_exiting(zombie));
        assert!(!stat_says_exiting(odd));
        assert!(stat_says_exiting("garbage"));
        // This test's own process is not exiting; a pid that does not exist is gone.
        assert!(!is_exiting(std::process::id()));
        assert!(is_exiting(u32::MAX - 1));
    }

    #[tokio::test]
    async fn a_confined_process_keeps_only_the_capabilities_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let args: Vec<String> = [
            "-c",
            "grep -E '^(CapEff|CapBnd|CapInh|NoNewPrivs)' /proc/self/status",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut c = spawn_confined(
            Path::new("/bin/sh"),
            &[],
            &args,
            &log,
            Some(&Confine {
                keep: CAP_NET_BIND_SERVICE,
                ..Confine::default()
            }),
        )
        .unwrap();
        assert!(c.wait().await.unwrap().success());
        let out = std::fs::read_to_string(&log).unwrap();
        let field = |k: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        assert_eq!(field("CapBnd:"), "0000000000000400", "{out}");
        assert_eq!(field("CapInh:"), "0000000000000000", "{out}");
        assert_eq!(field("NoNewPrivs:"), "1", "{out}");
        // Root keeps at most what the bounding set allows.
        let eff = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
        assert_eq!(eff & !CAP_NET_BIND_SERVICE, 0, "{out}");
    }

    /// As another user, with one capability kept and one descriptor inherited: the process is
    /// that user, has that capability (ambient) and no other, and reads the descriptor's file
    /// although it could not open it by name.
    #[tokio::test]
    async fn a_process_run_as_a_user_keeps_its_capability_and_inherited_descriptor() {
        if !nix::unistd::geteuid().is_root() {
            return; // setresuid needs root; CI runs as root.
        }
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "only-root-may-read\n").unwrap();
        std::fs::set_permissions(
            &secret,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
        )
        .unwrap();
        let file = std::fs::File::open(&secret).unwrap();
        let fd = file.as_raw_fd();
        let log = dir.path().join("log");
        let script = format!(
            "grep -E '^(Uid|Gid|Groups|CapEff|CapAmb|NoNewPrivs)' /proc/self/status; cat <&{fd}; cat {} 2>/dev/null || echo refused-by-name",
            secret.display()
        );
        // bash: dash takes only one-digit descriptors in `<&N`, and tests run in parallel.
        let args = vec!["-c".to_string(), script];
        let mut c = spawn_confined(
            Path::new("/bin/bash"),
            &[],
            &args,
            &log,
            Some(&Confine {
                keep: CAP_NET_BIND_SERVICE,
                run_as: Some(RunAs {
                    uid: 65534,
                    gid: 65534,
                    groups: vec![65534],
                }),
                inherit: vec![fd],
            }),
        )
        .unwrap();
        let status = c.wait().await.unwrap();
        let out = std::fs::read_to_string(&log).unwrap();
        assert!(status.success(), "{status}: {out}");
        let field = |k: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_default()
        };
        assert_eq!(field("Uid:"), "65534 65534 65534 65534", "{out}");
        assert_eq!(field("Gid:"), "65534 65534 65534 65534", "{out}");
        assert_eq!(field("Groups:"), "65534", "{out}");
        assert_eq!(field("CapEff:"), "0000000000000400", "{out}");
        assert_eq!(field("CapAmb:"), "0000000000000400", "{out}");
        assert_eq!(field("NoNewPrivs:"), "1", "{out}");
        assert!(out.contains("only-root-may-read"), "{out}");
        assert!(out.contains("refused-by-name"), "{out}");
    }

    #[test]
    fn self_is_alive_and_bogus_is_not() {
        let me = std::process::id();
        assert!(is_alive(me, ""));
        assert!(!is_alive(me, "certainly-not-in-my-cmdline-xyz"));
        assert!(!is_alive(u32::MAX - 1, ""));
    }

    #[test]
    fn finds_processes_by_a_path_under_a_dir_and_only_that_dir() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let other = dir.path().join("xrun");
        // `sh -c SCRIPT ARG` keeps ARG in its command line while the script runs.
        let mut a = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30; :"])
            .arg(format!("path={}/vm1/cap-s1/qmp.sock", run.display()))
            .spawn()
            .unwrap();
        let mut b = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30; :"])
            .arg(format!("{}/vm1/x", other.display()))
            .spawn()
            .unwrap();
        // Until the child has exec'd, its command line is still ours; and the shell's own child
        // has the shell's command line until it has exec'd `sleep`.
        let want = vec![(a.id(), "vm1/cap-s1/qmp.sock".to_string())];
        let mut found = Vec::new();
        for _ in 0..100 {
            found = with_path_under(&run);
            if found == want {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(found, want);
        assert!(start_ticks(a.id()).is_some_and(|t| t > 0));
        assert_eq!(comm(a.id()).as_deref(), Some("sh"));
        let _ = a.kill();
        let _ = b.kill();
        let _ = a.wait();
        let _ = b.wait();
        assert!(with_path_under(&run).is_empty());
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
