//! The crate's error type. Every variant names the file or command involved and, where there is
//! one, the fix (a package to install, a flag to build with).

use std::path::PathBuf;

/// Why an image could not be built or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// A file system operation failed.
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("create", "read", "rename ... to", ...).
        action: String,
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A host command could not run or failed.
    #[error("{command} failed: {detail}{}", hint.as_deref().map(|h| format!("; {h}")).unwrap_or_default())]
    Command {
        /// The command line, e.g. `apt-get download linux-image-6.1.0-28-amd64=6.1.119-1`.
        command: String,
        /// Exit status and the end of its stderr, or the spawn error.
        detail: String,
        /// What to do about it, if we know.
        hint: Option<String>,
    },

    /// The kernel package could not be resolved or did not contain what we need.
    #[error("kernel package {package}: {message}")]
    Kernel {
        /// The (meta)package name.
        package: String,
        /// What went wrong and what to do.
        message: String,
    },

    /// The ELF vmlinux could not be extracted from the bzImage.
    #[error("could not extract an ELF vmlinux from {}: {message}", path.display())]
    Vmlinux {
        /// The bzImage.
        path: PathBuf,
        /// What was (not) found.
        message: String,
    },

    /// A kernel module problem (missing required driver, unreadable or unsupported module file).
    #[error("kernel modules in {}: {message}", modules_dir.display())]
    Module {
        /// `.../lib/modules/<version>`.
        modules_dir: PathBuf,
        /// What went wrong.
        message: String,
    },

    /// The agent binary cannot run in the initramfs.
    #[error("agent binary {}: {message}", path.display())]
    Agent {
        /// `ImageSpec::agent_binary`.
        path: PathBuf,
        /// What is wrong and how to build a usable one.
        message: String,
    },

    /// The host's busybox is missing or unusable.
    #[error("busybox {}: {message}; run `apt-get install busybox-static`", path.display())]
    Busybox {
        /// Where it was looked for (`/bin/busybox`).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// Another process holds something we need, or a lock could not be taken.
    #[error("could not lock {}: {source}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A manifest could not be written or parsed.
    /// Building a distribution image failed for a reason of its own.
    #[error("Debian image: {message}")]
    Debian {
        /// What went wrong and what to do.
        message: String,
    },
    #[error("image manifest {}: {message}", path.display())]
    Manifest {
        /// `manifest.json`.
        path: PathBuf,
        /// The serde error.
        message: String,
    },
}

impl ImageError {
    /// Shorthand for [`ImageError::Io`].
    pub(crate) fn io(
        action: impl Into<String>,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        ImageError::Io {
            action: action.into(),
            path: path.into(),
            source,
        }
    }
}

/// Adds file context to `std::io::Result`s.
pub(crate) trait IoContext<T> {
    /// Maps an I/O error to [`ImageError::Io`] with `action` and `path`.
    fn ctx(self, action: &str, path: &std::path::Path) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, action: &str, path: &std::path::Path) -> Result<T, ImageError> {
        self.map_err(|e| ImageError::io(action, path, e))
    }
}
