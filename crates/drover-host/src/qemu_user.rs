//! Whom QEMU runs as, and what droverd prepares so that user can run it.
//!
//! QEMU runs as a dedicated user (`drover-qemu` by default; `droverd --qemu-user`), not as
//! droverd's root, so a guest that escapes into QEMU is that user: it cannot read `/etc/shadow`,
//! droverd's tokens or another user's images, nor write the host's files. What QEMU must use:
//! - directories it creates files in (the VM's run directory: sockets, pid file; the RAM
//!   directory; a state being written) are `root:drover-qemu 0770`, the directories above them
//!   `0710` (passage only);
//! - files droverd made for it (disk layers, console log, seed, a state's files) get the group,
//!   readable, and writable where QEMU may write (every layer of a writable disk: QEMU reopens
//!   backing layers read-write while it changes a chain; it opens a pinned layer read-only);
//! - files outside droverd's state dir (users' images in pools, an admin's paths) are opened by
//!   droverd and handed over as descriptors (fd sets), never opened by QEMU by name;
//! - a kernel or initrd QEMU cannot read is copied into the run directory.
//!
//! `--qemu-user root` (or a droverd not running as root) keeps QEMU as droverd's user, with every
//! capability dropped as before.

use drover_qemu::process::RunAs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The default user QEMU runs as; packages and `scripts/install-deps.sh` create it.
pub const DEFAULT_USER: &str = "drover-qemu";

/// Whom QEMU runs as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QemuUser {
    /// The user's name (`root` when QEMU keeps droverd's user).
    pub name: String,
    /// Its ids; `None`: QEMU runs as droverd's user.
    pub run_as: Option<RunAs>,
}

/// Why the user cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum QemuUserError {
    /// No such user.
    #[error("QEMU is to run as user {0}, which does not exist: create it with `useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin {0}` (scripts/install-deps.sh and the droverd package do), or pass --qemu-user root to run QEMU as droverd's user with its capabilities dropped")]
    NoSuchUser(String),
    /// The user is root under another name.
    #[error("--qemu-user {0} has uid 0: that is root; pass --qemu-user root to say so")]
    Root(String),
    /// Looking it up failed.
    #[error("looking up user {0}: {1}")]
    Lookup(String, nix::Error),
}

/// What QEMU needs of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Read it.
    Read,
    /// Execute it.
    Exec,
}

impl QemuUser {
    /// QEMU keeps droverd's user.
    pub fn droverd() -> QemuUser {
        QemuUser {
            name: "root".into(),
            run_as: None,
        }
    }

    /// Look up `name` (`root`: droverd's user). A droverd that is not root cannot change user:
    /// QEMU then runs as droverd's user whatever is asked.
    pub fn resolve(name: &str) -> Result<QemuUser, QemuUserError> {
        if name == "root" || !nix::unistd::geteuid().is_root() {
            return Ok(QemuUser::droverd());
        }
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| QemuUserError::Lookup(name.into(), e))?
            .ok_or_else(|| QemuUserError::NoSuchUser(name.into()))?;
        if user.uid.is_root() {
            return Err(QemuUserError::Root(name.into()));
        }
        let cname =
            std::ffi::CString::new(name).map_err(|_| QemuUserError::NoSuchUser(name.into()))?;
        let mut groups: Vec<u32> = nix::unistd::getgrouplist(&cname, user.gid)
            .map_err(|e| QemuUserError::Lookup(name.into(), e))?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        groups.sort_unstable();
        groups.dedup();
        Ok(QemuUser {
            name: name.into(),
            run_as: Some(RunAs {
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
                groups,
            }),
        })
    }

    /// Whether QEMU runs as a user of its own.
    pub fn is_dedicated(&self) -> bool {
        self.run_as.is_some()
    }

    /// A directory QEMU creates files in: group QEMU's, `rwx` for it (`0770`).
    pub fn workspace(&self, dir: &Path) -> std::io::Result<()> {
        self.set(dir, 0o770)
    }

    /// A directory QEMU only passes through or reads in (`0750`), or passes only (`0710`).
    pub fn passage(&self, dir: &Path, list: bool) -> std::io::Result<()> {
        self.set(dir, if list { 0o750 } else { 0o710 })
    }

    /// A file droverd made for QEMU: group QEMU's, readable, writable when `write`.
    pub fn grant(&self, file: &Path, write: bool) -> std::io::Result<()> {
        self.set(file, if write { 0o660 } else { 0o640 })
    }

    fn set(&self, path: &Path, mode: u32) -> std::io::Result<()> {
        let Some(u) = &self.run_as else {
            return Ok(());
        };
        let with =
            |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let meta = std::fs::symlink_metadata(path).map_err(with)?;
        if meta.file_type().is_symlink() {
            return Err(with(std::io::Error::other("is a symlink; not changing it")));
        }
        if meta.gid() != u.gid {
            std::os::unix::fs::lchown(path, None, Some(u.gid)).map_err(with)?;
        }
        if meta.mode() & 0o7777 != mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(with)?;
        }
        Ok(())
    }

    /// Whether QEMU's user may `need` the file at `path` by name, by mode bits along the whole
    /// path (ACLs aside: a `no` here may be a `yes` by ACL, never the other way round).
    pub fn may(&self, path: &Path, need: Need) -> bool {
        let Some(u) = &self.run_as else {
            return true;
        };
        let Ok(path) = std::fs::canonicalize(path) else {
            return false;
        };
        let mut dirs: Vec<&Path> = path.ancestors().skip(1).collect();
        dirs.reverse();
        let ok = |p: &Path, bit: u32| {
            std::fs::metadata(p).is_ok_and(|m| allowed(u, m.uid(), m.gid(), m.mode(), bit))
        };
        dirs.iter().all(|d| ok(d, 1))
            && ok(
                &path,
                match need {
                    Need::Read => 4,
                    Need::Exec => 1,
                },
            )
    }

    /// `path` if QEMU's user may read it, else a copy of it in `dir` that it may (a kernel or
    /// initrd outside its reach: named by an admin, or in a pool of a user's).
    pub fn readable_copy(&self, path: &Path, dir: &Path) -> std::io::Result<PathBuf> {
        if self.may(path, Need::Read) {
            return Ok(path.to_path_buf());
        }
        let name = path
            .file_name()
            .map(|n| format!("boot-{}", n.to_string_lossy()))
            .unwrap_or_else(|| "boot-file".into());
        let copy = dir.join(name);
        std::fs::copy(path, &copy).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("copying {} to {}: {e}", path.display(), copy.display()),
            )
        })?;
        self.grant(&copy, false)?;
        Ok(copy)
    }
}

/// Mode-bit permission of `u` for `bit` (4 read, 2 write, 1 execute/search) on a file owned by
/// `uid:gid` with `mode`.
pub fn allowed(u: &RunAs, uid: u32, gid: u32, mode: u32, bit: u32) -> bool {
    let class = if uid == u.uid {
        mode >> 6
    } else if gid == u.gid || u.groups.contains(&gid) {
        mode >> 3
    } else {
        mode
    };
    class & bit != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu() -> RunAs {
        RunAs {
            uid: 990,
            gid: 990,
            groups: vec![990, 106],
        }
    }

    #[test]
    fn mode_bits_by_owner_group_and_others() {
        let u = qemu();
        assert!(allowed(&u, 0, 0, 0o644, 4), "others may read");
        assert!(!allowed(&u, 0, 0, 0o640, 4), "group root is not ours");
        assert!(allowed(&u, 0, 990, 0o640, 4), "our group");
        assert!(allowed(&u, 0, 106, 0o660, 2), "a supplementary group (kvm)");
        assert!(!allowed(&u, 0, 990, 0o640, 2));
        assert!(
            !allowed(&u, 990, 0, 0o077, 4),
            "the owner class decides for the owner"
        );
        assert!(allowed(&u, 0, 0, 0o711, 1), "passage");
        assert!(!allowed(&u, 0, 0, 0o700, 1));
    }

    #[test]
    fn droverds_user_may_everything_and_changes_nothing() {
        let u = QemuUser::droverd();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(u.may(&f, Need::Read));
        u.grant(&f, true).unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
        assert_eq!(u.readable_copy(&f, dir.path()).unwrap(), f);
    }

    #[test]
    fn a_dedicated_user_gets_its_group_and_a_copy_of_what_it_cannot_read() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let u = QemuUser {
            name: "nobody".into(),
            run_as: Some(RunAs {
                uid: 65534,
                gid: 65534,
                groups: vec![65534],
            }),
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let secret = dir.path().join("vmlinux");
        std::fs::write(&secret, "kernel").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(!u.may(&secret, Need::Read));
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        u.workspace(&run).unwrap();
        let m = std::fs::metadata(&run).unwrap();
        assert_eq!((m.gid(), m.mode() & 0o7777), (65534, 0o770));
        let copy = u.readable_copy(&secret, &run).unwrap();
        assert_eq!(copy, run.join("boot-vmlinux"));
        assert!(u.may(&copy, Need::Read));
        assert_eq!(std::fs::read_to_string(&copy).unwrap(), "kernel");
        // Behind a directory it may not pass, nothing is readable.
        u.passage(&run, false).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!u.may(&copy, Need::Read));
        // A symlink is never changed (it could point anywhere).
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        assert!(u.grant(&link, true).is_err());
        assert_eq!(std::fs::metadata(&secret).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn resolving_root_or_a_missing_user() {
        assert_eq!(QemuUser::resolve("root").unwrap(), QemuUser::droverd());
        if nix::unistd::geteuid().is_root() {
            assert!(matches!(
                QemuUser::resolve("no-such-user-drover-xyz"),
                Err(QemuUserError::NoSuchUser(_))
            ));
            let nobody = QemuUser::resolve("nobody").unwrap();
            assert_eq!(nobody.run_as.unwrap().uid, 65534);
        }
    }
}
