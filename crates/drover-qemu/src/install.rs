//! Which QEMU installation Drover runs: emulator, `qemu-img`, `qemu-nbd` and firmware of one
//! version, so that they always match.
//!
//! Either the system's (found on `PATH`, firmware in `/usr/share/qemu`) or one unpacked under a
//! prefix (`droverd --qemu-dir DIR`, as `scripts/install-deps.sh --qemu-prefix DIR` makes it):
//! `DIR/usr/bin/{qemu-system-x86_64,qemu-img,qemu-nbd}`, firmware in `DIR/usr/share/qemu`
//! (given to QEMU as `-L`), modules in `DIR/usr/lib/x86_64-linux-gnu/qemu` (`QEMU_MODULE_DIR`).
//!
//! A droverd runs one installation for its whole life; [`set_current`] records it for the
//! helpers that run `qemu-img` without a manager at hand ([`crate::img`]).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The system's firmware directory (Debian's `qemu-system-data`).
pub const SYSTEM_DATA_DIR: &str = "/usr/share/qemu";
/// Where Debian's packages put QEMU's loadable modules, relative to a prefix.
const MODULE_SUBDIR: &str = "usr/lib/x86_64-linux-gnu/qemu";

/// An installation that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file the installation must have is missing.
    #[error("{dir} is not a QEMU installation: {missing} is missing (unpack one there with scripts/install-deps.sh --qemu-prefix {dir})")]
    Missing {
        /// The prefix.
        dir: PathBuf,
        /// The missing file.
        missing: PathBuf,
    },
}

/// One QEMU installation's programs and data.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QemuInstall {
    /// The prefix given with `--qemu-dir`; `None` for the system's QEMU.
    pub dir: Option<PathBuf>,
    /// `qemu-system-x86_64`.
    pub emulator: PathBuf,
    /// `qemu-img`.
    pub qemu_img: PathBuf,
    /// `qemu-nbd`.
    pub qemu_nbd: PathBuf,
    /// Firmware directory, passed as `-L` when it is not the system's.
    pub data_dir: PathBuf,
    /// Loadable modules (`QEMU_MODULE_DIR`), for a prefix.
    pub module_dir: Option<PathBuf>,
}

impl QemuInstall {
    /// The system's QEMU: programs looked up on `PATH` (by name if absent, so the error comes
    /// when it is run and names the program).
    pub fn system() -> Self {
        QemuInstall {
            dir: None,
            emulator: which("qemu-system-x86_64"),
            qemu_img: which("qemu-img"),
            qemu_nbd: which("qemu-nbd"),
            data_dir: PathBuf::from(SYSTEM_DATA_DIR),
            module_dir: None,
        }
    }

    /// The QEMU unpacked under `dir`; every program and the firmware directory must be there.
    pub fn in_dir(dir: &Path) -> Result<Self, InstallError> {
        let bin = dir.join("usr/bin");
        let modules = dir.join(MODULE_SUBDIR);
        let q = QemuInstall {
            dir: Some(dir.to_path_buf()),
            emulator: bin.join("qemu-system-x86_64"),
            qemu_img: bin.join("qemu-img"),
            qemu_nbd: bin.join("qemu-nbd"),
            data_dir: dir.join("usr/share/qemu"),
            module_dir: modules.is_dir().then_some(modules),
        };
        for p in [&q.emulator, &q.qemu_img, &q.qemu_nbd, &q.data_dir] {
            if !p.exists() {
                return Err(InstallError::Missing {
                    dir: dir.to_path_buf(),
                    missing: p.clone(),
                });
            }
        }
        Ok(q)
    }

    /// The same installation with another emulator binary (the older `--qemu` flag).
    pub fn with_emulator(mut self, emulator: PathBuf) -> Self {
        self.emulator = emulator;
        self
    }

    /// qboot, the fast firmware for direct kernel boots (~3.5 s faster than SeaBIOS here).
    pub fn qboot(&self) -> PathBuf {
        self.data_dir.join("qboot.rom")
    }

    /// Arguments every emulator run gets first: its own firmware directory, for a prefix.
    pub fn emulator_args(&self) -> Vec<String> {
        match &self.dir {
            Some(_) => vec!["-L".into(), self.data_dir.display().to_string()],
            None => Vec::new(),
        }
    }

    /// Environment every program of this installation runs with.
    pub fn env(&self) -> Vec<(&'static str, PathBuf)> {
        self.module_dir
            .iter()
            .map(|m| ("QEMU_MODULE_DIR", m.clone()))
            .collect()
    }

    /// A command running `program` (one of this installation's) with its environment.
    pub fn command(&self, program: &Path) -> std::process::Command {
        let mut c = std::process::Command::new(program);
        c.envs(self.env());
        c
    }

    /// The same as a tokio command.
    pub fn tokio_command(&self, program: &Path) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(program);
        c.envs(self.env());
        c
    }
}

/// `name` on `PATH`, else `name` itself.
fn which(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from(name))
}

static CURRENT: OnceLock<QemuInstall> = OnceLock::new();

/// Record the installation this process runs (once; later calls with another one are ignored
/// and return `false`).
pub fn set_current(q: QemuInstall) -> bool {
    let wanted = q.clone();
    CURRENT.get_or_init(|| q) == &wanted
}

/// The installation this process runs: the one given to [`set_current`], else the system's.
pub fn current() -> &'static QemuInstall {
    CURRENT.get_or_init(QemuInstall::system)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_must_hold_every_program() {
        let dir = tempfile::tempdir().unwrap();
        let err = QemuInstall::in_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("qemu-system-x86_64 is missing"), "{err}");
        assert!(err.contains("--qemu-prefix"), "{err}");
        std::fs::create_dir_all(dir.path().join("usr/bin")).unwrap();
        std::fs::create_dir_all(dir.path().join("usr/share/qemu")).unwrap();
        std::fs::create_dir_all(dir.path().join(MODULE_SUBDIR)).unwrap();
        for p in ["qemu-system-x86_64", "qemu-img"] {
            std::fs::write(dir.path().join("usr/bin").join(p), b"").unwrap();
        }
        let err = QemuInstall::in_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("qemu-nbd is missing"), "{err}");
        std::fs::write(dir.path().join("usr/bin/qemu-nbd"), b"").unwrap();
        let q = QemuInstall::in_dir(dir.path()).unwrap();
        assert_eq!(q.qboot(), dir.path().join("usr/share/qemu/qboot.rom"));
        assert_eq!(
            q.emulator_args(),
            ["-L".to_string(), q.data_dir.display().to_string()]
        );
        assert_eq!(
            q.env(),
            [("QEMU_MODULE_DIR", dir.path().join(MODULE_SUBDIR))]
        );
        let sys = QemuInstall::system();
        assert!(sys.emulator_args().is_empty() && sys.env().is_empty());
        assert_eq!(sys.qboot(), Path::new("/usr/share/qemu/qboot.rom"));
    }
}
