//! Virtio-serial ports as the guest kernel presents them, with their quirks:
//!
//! - the device node may not exist yet (modules loading, `/init` still making the
//!   `/dev/virtio-ports/<name>` links): wait for it;
//! - only one open at a time (a second gets `EBUSY`, e.g. while a previous agent is still dying):
//!   retry;
//! - reads return end-of-file while no host client is connected, and writes block: keep the port
//!   open and read again after a pause. The same descriptor resumes when the host reconnects, and
//!   keeping it means exec replies still in flight never hold the port against our own reopen.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use crate::wire::FrameWriter;

/// Pause between attempts to open a port, and between reads while the host is away.
pub const RETRY: Duration = Duration::from_millis(150);
/// Pause between reads in the first [`SOON`] after the host left: a restored or cloned guest's
/// new host connects within a fraction of a second, and [`RETRY`] would add up to its length
/// to every restore before the agent is heard. A read that returns at once costs microseconds.
pub const RETRY_SOON: Duration = Duration::from_millis(5);
/// How long after the host left the port is read again at [`RETRY_SOON`]'s pace.
pub const SOON: Duration = Duration::from_secs(3);

/// The pause before reading again, the host having left `away` ago (`None`: it has not been
/// connected on this descriptor, as at boot, or it has been away long).
pub fn pause_while_away(away: Option<Duration>) -> Duration {
    match away {
        Some(a) if a < SOON => RETRY_SOON,
        _ => RETRY,
    }
}

/// Open `path` read-write, waiting as long as it takes. Logs each new kind of failure once.
pub fn open_port(path: &Path) -> File {
    let mut last_error: Option<io::ErrorKind> = None;
    loop {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => {
                if last_error.is_some() {
                    crate::log!("opened {}", path.display());
                }
                return f;
            }
            Err(e) => {
                if last_error != Some(e.kind()) {
                    crate::log!("waiting for {}: {e}", path.display());
                    last_error = Some(e.kind());
                }
                thread::sleep(RETRY);
            }
        }
    }
}

/// Serve the port at `path` forever with `session`, which handles one host connection (reading
/// from the port until end of stream) and returns how many frames it received.
///
/// The port is opened once and reused across host reconnects; it is reopened only after a read or
/// write error (for example the device was unplugged).
pub fn run_port<S>(path: &Path, label: &str, mut session: S) -> !
where
    S: FnMut(&File, &FrameWriter<File>) -> io::Result<u64>,
{
    loop {
        let file = open_port(path);
        let writer = match file.try_clone() {
            Ok(w) => FrameWriter::new(w),
            Err(e) => {
                crate::log!("{label}: cannot duplicate port descriptor: {e}");
                drop(file);
                thread::sleep(RETRY);
                continue;
            }
        };
        crate::log!("{label}: serving {}", path.display());
        let mut left: Option<Instant> = None;
        loop {
            match session(&file, &writer) {
                Ok(frames) => {
                    if frames > 0 {
                        crate::log!("{label}: host disconnected");
                        left = Some(Instant::now());
                    }
                    thread::sleep(pause_while_away(left.map(|t| t.elapsed())));
                }
                Err(e) => {
                    crate::log!("{label}: {e}; reopening {}", path.display());
                    break;
                }
            }
        }
        drop(writer);
        drop(file);
        thread::sleep(RETRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_looked_for_often_only_just_after_it_left() {
        assert_eq!(pause_while_away(Some(Duration::ZERO)), RETRY_SOON);
        assert_eq!(pause_while_away(Some(SOON / 2)), RETRY_SOON);
        assert_eq!(pause_while_away(Some(SOON)), RETRY);
        assert_eq!(pause_while_away(None), RETRY);
    }
}
