//! Host paths are an admin's business: image pools.
//!
//! A non-admin caller (a role granted to a uid, a token that is not admin) may name a disk image,
//! kernel or initrd only inside an **image pool**: a directory an admin allowed with
//! `droverd --image-pool NAME=DIR[:rw]`, or droverd's own guest-image directory (the pool
//! `drover`). Admins may name any path.
//!
//! How a path is checked, so neither symlinks, `..`, hard links nor races on the way out of a
//! pool get anywhere:
//! - the path is split at a pool's directory (lexically), and the rest is opened with `openat2`
//!   relative to that directory with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` (no `..` out of it,
//!   no symlink anywhere, no magic links), `O_NOFOLLOW`, non-blocking (a FIFO cannot hang us);
//! - the opened file is checked with `fstat`: a regular file, one link only (a hard link to
//!   `/etc/shadow` placed in a pool is refused), owned by root, by droverd's user or by the
//!   caller's own uid;
//! - the path recorded is the one the kernel reports for the opened file (`/proc/self/fd`).
//!
//! Every refusal of a non-admin caller — outside all pools, missing, a symlink, a directory, a
//! hard link, someone else's file — is the same error, so it tells nothing about whether a path
//! the caller may not use exists. Pools are read-only for non-admins unless marked `:rw`
//! (a writable image changes for every VM that uses it).

use crate::auth::{Caller, Permission};
use crate::error::HostError;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

/// One directory non-admins may take images from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Its name, as errors and `--help` show it.
    pub name: String,
    /// The directory, resolved (symlinks of the admin's own choosing followed once, at start).
    pub dir: PathBuf,
    /// Whether non-admins may attach its images read-write.
    pub writable: bool,
}

impl Pool {
    /// Parse `NAME=DIR` or `NAME=DIR:rw` (the `--image-pool` flag). The directory must exist.
    pub fn parse(s: &str) -> Result<Pool, String> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: use NAME=DIR or NAME=DIR:rw"))?;
        if name.is_empty()
            || name.len() > 32
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        {
            return Err(format!(
                "pool name {name:?}: 1-32 characters of a-z, A-Z, 0-9, '-', '_'"
            ));
        }
        let (dir, writable) = match rest.strip_suffix(":rw") {
            Some(d) => (d, true),
            None => (rest.strip_suffix(":ro").unwrap_or(rest), false),
        };
        let dir = Path::new(dir);
        if !dir.is_absolute() {
            return Err(format!("pool {name}: {} is not absolute", dir.display()));
        }
        let dir = std::fs::canonicalize(dir)
            .map_err(|e| format!("pool {name}: {}: {e}", dir.display()))?;
        if !dir.is_dir() {
            return Err(format!("pool {name}: {} is not a directory", dir.display()));
        }
        Ok(Pool {
            name: name.to_string(),
            dir,
            writable,
        })
    }
}

/// What a path is asked for (it goes into error messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathUse {
    /// A disk image attached read-only.
    DiskReadOnly,
    /// A disk image attached read-write.
    DiskReadWrite,
    /// A kernel or initrd.
    Boot,
}

/// The pools of one droverd.
#[derive(Debug, Clone, Default)]
pub struct Pools {
    pools: Vec<Pool>,
}

impl Pools {
    /// The admin's pools plus droverd's own guest-image directory (read-only pool `drover`,
    /// skipped when it does not exist yet).
    pub fn new(mut pools: Vec<Pool>, image_dir: &Path) -> Pools {
        if let Ok(dir) = std::fs::canonicalize(image_dir) {
            if !pools.iter().any(|p| p.name == "drover") {
                pools.push(Pool {
                    name: "drover".into(),
                    dir,
                    writable: false,
                });
            }
        }
        Pools { pools }
    }

    /// The pools, for `--help`-style listings.
    pub fn list(&self) -> &[Pool] {
        &self.pools
    }

    /// The path droverd may use for `path`, named by `caller` for `usage`.
    ///
    /// Admins get their path back as given (they may name any file). Everyone else gets the
    /// resolved path of a checked file inside a pool, or one and the same refusal whatever the
    /// reason (see the module docs).
    pub fn resolve(
        &self,
        caller: &Caller,
        path: &Path,
        usage: PathUse,
    ) -> Result<PathBuf, HostError> {
        if caller.require(Permission::Admin).is_ok() {
            return Ok(path.to_path_buf());
        }
        let refuse = || {
            let pools: Vec<String> = self
                .pools
                .iter()
                .map(|p| format!("{}={}", p.name, p.dir.display()))
                .collect();
            HostError::Forbidden(format!(
                "{} {} is not a usable file in an image pool open to {} (pools: {}); images, kernels and initrds of non-admins come from pools an admin sets with `droverd --image-pool NAME=DIR`, as regular files with one link, owned by root or by you",
                match usage {
                    PathUse::Boot => "boot file",
                    _ => "disk image",
                },
                path.display(),
                caller.name,
                if pools.is_empty() { "none".to_string() } else { pools.join(", ") }
            ))
        };
        if !path.is_absolute() {
            return Err(HostError::Invalid(format!(
                "{} must be an absolute path",
                path.display()
            )));
        }
        for pool in &self.pools {
            let Ok(rest) = path.strip_prefix(&pool.dir) else {
                continue;
            };
            // Only plain names below the pool; `..` is refused by openat2 too, this says it early.
            if rest.as_os_str().is_empty()
                || rest
                    .components()
                    .any(|c| !matches!(c, Component::Normal(_)))
            {
                return Err(refuse());
            }
            let Ok(file) = open_beneath(&pool.dir, rest) else {
                return Err(refuse());
            };
            let Ok(st) = nix::sys::stat::fstat(file.as_raw_fd()) else {
                return Err(refuse());
            };
            let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
            let me = nix::unistd::geteuid().as_raw();
            let owner_ok = st.st_uid == 0 || st.st_uid == me || Some(st.st_uid) == caller.uid;
            if !regular || st.st_nlink != 1 || !owner_ok {
                return Err(refuse());
            }
            if usage != PathUse::Boot {
                // A qcow2 header can name any host file (a backing file, an external data file)
                // for QEMU to open: a user's image must hold its data itself.
                let refs = file
                    .try_clone()
                    .ok()
                    .map(|f| drover_qemu::qcow2::read_from(std::fs::File::from(f), path));
                if let Some(Ok(r)) = refs {
                    if r.backing.is_some() || r.external_data {
                        return Err(HostError::Forbidden(format!(
                            "disk image {} names {}: a non-admin's image must hold all its data; flatten it with `qemu-img convert -O qcow2 {} NEW.qcow2` (or ask an admin to attach it)",
                            path.display(),
                            match &r.backing {
                                Some(b) => format!("a backing file ({b})"),
                                None => "an external data file".to_string(),
                            },
                            path.display()
                        )));
                    }
                }
            }
            if usage == PathUse::DiskReadWrite && !pool.writable {
                // The file is in a pool the caller may read: saying so reveals nothing new.
                return Err(HostError::Forbidden(format!(
                    "image pool {} is read-only for {}: attach {} with readonly, or ask an admin to mark the pool :rw",
                    pool.name,
                    caller.name,
                    path.display()
                )));
            }
            let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
                .map_err(|_| refuse())?;
            // The kernel's answer is beneath the pool by construction; check anyway.
            if !real.starts_with(&pool.dir) {
                return Err(refuse());
            }
            return Ok(real);
        }
        Err(refuse())
    }
}

impl Pools {
    /// Check again, before QEMU opens it, a path recorded earlier: if it lies in a pool it must
    /// still be a regular file with one link, reached without symlinks, so a file swapped for a
    /// symlink or a hard link after it was checked is refused. (Who owns it was checked when it
    /// was named; paths outside pools were named by an admin.)
    pub fn recheck(&self, path: &Path) -> Result<(), HostError> {
        for pool in &self.pools {
            let Ok(rest) = path.strip_prefix(&pool.dir) else {
                continue;
            };
            let fine = open_beneath(&pool.dir, rest)
                .ok()
                .and_then(|f| nix::sys::stat::fstat(f.as_raw_fd()).ok())
                .is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_nlink == 1);
            if !fine {
                return Err(HostError::Forbidden(format!(
                    "{} in image pool {} is no longer a plain file (replaced by a symlink, a hard link or removed since it was named); an admin can check it",
                    path.display(),
                    pool.name
                )));
            }
            return Ok(());
        }
        Ok(())
    }
}

impl Pools {
    /// Open, for a QEMU that may not open it by name, a file named earlier (and checked then):
    /// in a pool beneath it without symlinks, as [`Pools::recheck`] requires; elsewhere (an
    /// admin's path) as it is. Read-write when `write`.
    pub fn open_for_qemu(&self, path: &Path, write: bool) -> Result<std::fs::File, HostError> {
        for pool in &self.pools {
            let Ok(rest) = path.strip_prefix(&pool.dir) else {
                continue;
            };
            self.recheck(path)?;
            let flags = if write {
                nix::fcntl::OFlag::O_RDWR
            } else {
                nix::fcntl::OFlag::O_RDONLY
            };
            return open_beneath_with(&pool.dir, rest, flags)
                .map(std::fs::File::from)
                .map_err(|e| {
                    HostError::Forbidden(format!(
                        "{} in image pool {}: cannot open it for QEMU ({e})",
                        path.display(),
                        pool.name
                    ))
                });
        }
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| crate::error::io_ctx("opening for QEMU", path, e))
    }
}

/// Open `rest` below `dir` with no way out of it (no `..` above it, no symlinks at all).
fn open_beneath(dir: &Path, rest: &Path) -> nix::Result<OwnedFd> {
    open_beneath_with(
        dir,
        rest,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_NONBLOCK,
    )
}

/// [`open_beneath`] with the access flags given.
fn open_beneath_with(dir: &Path, rest: &Path, access: nix::fcntl::OFlag) -> nix::Result<OwnedFd> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    let dirfd = nix::fcntl::open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let dirfd = unsafe { OwnedFd::from_raw_fd(dirfd) };
    let how = OpenHow::new()
        .flags(access | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    let fd = nix::fcntl::openat2(dirfd.as_raw_fd(), rest, how)?;
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether a non-admin may ask for a port forward: an unprivileged host port (1024 or above) on
/// a loopback address. Admins choose freely.
pub fn check_forward(caller: &Caller, f: &drover_model::PortForward) -> Result<(), HostError> {
    if caller.require(Permission::Admin).is_ok() {
        return Ok(());
    }
    if f.host_port < 1024 || !f.host_addr.is_loopback() {
        return Err(HostError::Forbidden(format!(
            "forward {f}: {} may forward only host ports 1024 and above on a loopback address (e.g. tcp:127.0.0.1:2222-:22); other addresses and privileged ports are an admin's choice",
            caller.name
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;
    use std::os::unix::fs::PermissionsExt;

    fn op() -> Caller {
        Caller {
            name: "uid 1000".into(),
            role: Some(Role::Operator),
            uid: Some(1000),
        }
    }

    fn err_text(r: Result<PathBuf, HostError>) -> String {
        match r {
            Err(HostError::Forbidden(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn non_admins_get_only_checked_files_inside_pools() {
        let t = tempfile::tempdir().unwrap();
        let pool_dir = t.path().join("pool");
        std::fs::create_dir_all(pool_dir.join("sub")).unwrap();
        std::fs::write(pool_dir.join("a.img"), b"x").unwrap();
        std::fs::write(pool_dir.join("sub/b.img"), b"x").unwrap();
        let secret = t.path().join("secret");
        std::fs::write(&secret, b"s").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&secret, pool_dir.join("link.img")).unwrap();
        std::os::unix::fs::symlink(t.path(), pool_dir.join("up")).unwrap();
        std::fs::hard_link(&secret, pool_dir.join("hard.img")).unwrap();
        let pool = Pool::parse(&format!("p={}", pool_dir.display())).unwrap();
        let pools = Pools::new(vec![pool.clone()], &t.path().join("no-images"));
        let ro = PathUse::DiskReadOnly;
        let got = pools.resolve(&op(), &pool_dir.join("a.img"), ro).unwrap();
        assert_eq!(got, pool.dir.join("a.img"));
        assert!(pools
            .resolve(&op(), &pool_dir.join("sub/b.img"), PathUse::Boot)
            .is_ok());
        // One and the same answer for each way of trying, so nothing tells them apart
        // (but the path itself, which the caller gave).
        let generic = |p: &Path| {
            err_text(pools.resolve(&op(), p, ro)).replacen(&p.display().to_string(), "P", 1)
        };
        let base = generic(&secret);
        assert!(
            base.contains("image pool") && base.contains("--image-pool"),
            "{base}"
        );
        for p in [
            pool_dir.join("missing.img"),
            pool_dir.join("link.img"),
            pool_dir.join("up/secret"),
            pool_dir.join("../secret"),
            pool_dir.join("sub/../../secret"),
            pool_dir.join("hard.img"),
            pool_dir.join("sub"),
            pool_dir.clone(),
            PathBuf::from("/etc/shadow"),
            PathBuf::from("/root/nope/vmlinux"),
        ] {
            assert_eq!(generic(&p), base, "{}", p.display());
        }
        // Read-write needs a pool marked :rw.
        let rw = PathUse::DiskReadWrite;
        let e = err_text(pools.resolve(&op(), &pool_dir.join("a.img"), rw));
        assert!(e.contains("read-only"), "{e}");
        let rw_pools = Pools::new(
            vec![Pool::parse(&format!("p={}:rw", pool_dir.display())).unwrap()],
            Path::new("/nonexistent"),
        );
        assert!(rw_pools.resolve(&op(), &pool_dir.join("a.img"), rw).is_ok());
        // Admins name any path, as given.
        let admin = Caller::daemon();
        assert_eq!(pools.resolve(&admin, &secret, rw).unwrap(), secret);
        // A pool file swapped for a symlink after it was named is refused at the next start.
        assert!(pools.recheck(&got).is_ok());
        std::fs::remove_file(&got).unwrap();
        std::os::unix::fs::symlink(&secret, &got).unwrap();
        assert!(matches!(pools.recheck(&got), Err(HostError::Forbidden(_))));
        assert!(
            pools.recheck(&secret).is_ok(),
            "outside pools: an admin's path"
        );
        std::fs::remove_file(&got).unwrap();
        std::fs::write(&got, b"x").unwrap();
        // Relative paths are a usage error for everyone but admins.
        assert!(matches!(
            pools.resolve(&op(), Path::new("a.img"), ro),
            Err(HostError::Invalid(_))
        ));
    }

    /// A qcow2 header naming a backing file (here `/etc/shadow`) would have QEMU open it: a
    /// non-admin's image with one is refused, with the way out; without one it is fine.
    #[test]
    fn a_users_qcow2_naming_another_file_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let pool_dir = t.path().join("pool");
        std::fs::create_dir_all(&pool_dir).unwrap();
        let header = |backing: Option<&str>| {
            let mut h = vec![0u8; 512];
            h[0..4].copy_from_slice(b"QFI\xfb");
            h[4..8].copy_from_slice(&3u32.to_be_bytes());
            if let Some(b) = backing {
                h[8..16].copy_from_slice(&200u64.to_be_bytes());
                h[16..20].copy_from_slice(&(b.len() as u32).to_be_bytes());
                h[200..200 + b.len()].copy_from_slice(b.as_bytes());
            }
            h
        };
        std::fs::write(pool_dir.join("evil.qcow2"), header(Some("/etc/shadow"))).unwrap();
        std::fs::write(pool_dir.join("flat.qcow2"), header(None)).unwrap();
        let pools = Pools::new(
            vec![Pool::parse(&format!("p={}", pool_dir.display())).unwrap()],
            Path::new("/nonexistent"),
        );
        let ro = PathUse::DiskReadOnly;
        let e = err_text(pools.resolve(&op(), &pool_dir.join("evil.qcow2"), ro));
        assert!(
            e.contains("backing file (/etc/shadow)") && e.contains("qemu-img convert"),
            "{e}"
        );
        assert!(pools
            .resolve(&op(), &pool_dir.join("flat.qcow2"), ro)
            .is_ok());
        assert!(
            pools
                .resolve(&Caller::daemon(), &pool_dir.join("evil.qcow2"), ro)
                .is_ok(),
            "an admin's choice"
        );
    }

    #[test]
    fn pool_flags_parse() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().display();
        assert!(!Pool::parse(&format!("a={d}")).unwrap().writable);
        assert!(Pool::parse(&format!("a={d}:rw")).unwrap().writable);
        assert!(Pool::parse(&format!("a b={d}")).is_err());
        assert!(Pool::parse("a=relative").is_err());
        assert!(Pool::parse(&format!("a={d}/missing")).is_err());
        assert!(Pool::parse("nodir").is_err());
    }

    #[test]
    fn non_admin_forwards_are_unprivileged_and_loopback() {
        let f = |s: &str| s.parse::<drover_model::PortForward>().unwrap();
        assert!(check_forward(&op(), &f("tcp:127.0.0.1:2222-:22")).is_ok());
        assert!(check_forward(&op(), &f("2222-:22")).is_ok());
        assert!(check_forward(&op(), &f("tcp:0.0.0.0:2222-:22")).is_err());
        assert!(check_forward(&op(), &f("tcp:127.0.0.1:23-:22")).is_err());
        assert!(check_forward(&op(), &f("udp:10.0.0.1:5353-:53")).is_err());
        assert!(check_forward(&Caller::daemon(), &f("tcp:0.0.0.0:23-:22")).is_ok());
    }
}
