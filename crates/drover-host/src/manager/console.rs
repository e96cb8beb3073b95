//! The VMs' serial consoles: the logs (rotated at open), reading them, and keystrokes in.

use super::*;

impl Manager {
    /// Rotate every console.log past its cap: its bytes move to `console.log.1` (replacing the
    /// older one) and it starts empty again (QEMU appends, so it writes on at the new end).
    /// Checked every second, so a log exceeds its cap by at most one second of output; what a
    /// guest writes between the copy and the truncation is lost.
    pub(super) fn rotate_consoles(&self) {
        let cap = self.s.cfg.limits.console_log_max;
        let names: Vec<String> = lock(&self.s.vms).keys().cloned().collect();
        for name in names {
            let path = self.console_path(&name);
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.len() <= cap {
                continue;
            }
            let old = path.with_extension("log.1");
            let rotated = std::fs::copy(&path, &old).and_then(|_| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(0))
            });
            match rotated {
                Ok(()) => tracing::debug!(vm = name, bytes = meta.len(), "console log rotated"),
                Err(e) => tracing::warn!(vm = name, "cannot rotate {}: {e}", path.display()),
            }
        }
    }

    /// A place for one more console WebSocket, held while it is open; `None` when
    /// [`CONSOLE_SOCKETS_MAX`] are open.
    pub fn console_socket(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.s.console_sockets.clone().try_acquire_owned().ok()
    }

    /// Type `bytes` into the VM's serial console (its guest reads them as serial input).
    ///
    /// The caller's right to type was checked once for the whole console session.
    pub async fn console_input(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.look(name, VmAction::ConsoleInput, &Caller::daemon())?;
        self.s
            .console_inputs
            .send(&self.run_paths(name).console, bytes)
            .await
            .map_err(|e| HostError::Conflict(format!("VM {name}: {e}")))
    }

    /// Read the console log from `offset`, at most `max` bytes; returns the bytes and the next offset.
    pub fn console(&self, name: &str, offset: u64, max: usize) -> Result<(Vec<u8>, u64)> {
        self.slot(name)?;
        use std::io::{Read, Seek, SeekFrom};
        let path = self.console_path(name);
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
            Err(e) => return Err(io_ctx("reading", &path, e)),
        };
        let len = f.metadata().map_err(|e| io_ctx("reading", &path, e))?.len();
        // Past the end: the log was rotated since the caller's last read; start over.
        let start = if offset > len { 0 } else { offset };
        f.seek(SeekFrom::Start(start))
            .map_err(|e| io_ctx("reading", &path, e))?;
        let mut buf = Vec::new();
        f.take(max as u64)
            .read_to_end(&mut buf)
            .map_err(|e| io_ctx("reading", &path, e))?;
        let next = start + buf.len() as u64;
        Ok((buf, next))
    }
}
