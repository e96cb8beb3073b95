//! Powering the guest off or rebooting it, and the ACPI power button that asks for it.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// How the guest stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    /// Power off (`RB_POWER_OFF`).
    PowerOff,
    /// Reboot (`RB_AUTOBOOT`).
    Reboot,
}

/// Something that can stop the guest; a trait so tests can record instead of powering off.
pub trait Power: Send + Sync {
    /// Sync disks and stop the guest. Returns only if that failed (or in tests).
    fn stop(&self, action: PowerAction);
}

/// The real thing: `sync()` then `reboot(2)`.
#[derive(Debug, Default)]
pub struct SystemPower;

impl Power for SystemPower {
    fn stop(&self, action: PowerAction) {
        crate::log!("{action:?}: syncing disks");
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        let cmd = match action {
            PowerAction::PowerOff => libc::RB_POWER_OFF,
            PowerAction::Reboot => libc::RB_AUTOBOOT,
        };
        // SAFETY: reboot(2) with a valid command has no memory-safety preconditions; on success it
        // does not return.
        let rc = unsafe { libc::reboot(cmd) };
        if rc != 0 {
            crate::log!("{action:?} failed: {}", io::Error::last_os_error());
        }
    }
}

/// `EV_KEY` from `linux/input-event-codes.h`.
const EV_KEY: u16 = 1;
/// `KEY_POWER` from `linux/input-event-codes.h`.
const KEY_POWER: u16 = 116;
/// Size of `struct input_event` (24 bytes on x86_64: a 16-byte timeval, type, code, value).
const EVENT_SIZE: usize = std::mem::size_of::<libc::input_event>();

/// Whether one raw `struct input_event` is a press of the power key.
///
/// Fields are read from the end of the struct, past the timeval whose size depends on the
/// architecture.
pub fn is_power_press(event: &[u8]) -> bool {
    if event.len() != EVENT_SIZE {
        return false;
    }
    let tail = &event[EVENT_SIZE - 8..];
    let ty = u16::from_ne_bytes([tail[0], tail[1]]);
    let code = u16::from_ne_bytes([tail[2], tail[3]]);
    let value = i32::from_ne_bytes([tail[4], tail[5], tail[6], tail[7]]);
    ty == EV_KEY && code == KEY_POWER && value == 1
}

/// Watch every `event*` device under `dir` (normally `/dev/input`) and stop the guest when the
/// power key is pressed; this is what makes the host's ACPI `system_powerdown` work without acpid.
///
/// Runs forever. Rescans every few seconds because input drivers may be loaded after the agent
/// starts. With no devices it logs once and keeps looking.
pub fn watch_power_button(dir: &Path, power: Arc<dyn Power>) -> ! {
    let mut watched: HashSet<PathBuf> = HashSet::new();
    let mut said_none = false;
    loop {
        for path in event_devices(dir) {
            if watched.contains(&path) {
                continue;
            }
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    crate::log!("cannot open {}: {e}", path.display());
                    continue;
                }
            };
            let power = Arc::clone(&power);
            let name = path.display().to_string();
            let spawned = thread::Builder::new()
                .name("power-button".into())
                .spawn(move || watch_device(file, &name, power.as_ref()));
            match spawned {
                Ok(_) => {
                    watched.insert(path);
                }
                Err(e) => crate::log!("cannot watch {}: {e}", path.display()),
            }
        }
        if watched.is_empty() && !said_none {
            crate::log!(
                "no input devices under {}: power button not watched",
                dir.display()
            );
            said_none = true;
        }
        thread::sleep(Duration::from_secs(5));
    }
}

fn event_devices(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("event"))
        })
        .collect();
    out.sort();
    out
}

/// Read events from one device until it goes away.
fn watch_device(mut file: File, name: &str, power: &dyn Power) {
    // evdev returns whole events only, as many as fit in the buffer.
    let mut buf = vec![0u8; EVENT_SIZE * 64];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                crate::log!("{name}: {e}; no longer watched");
                return;
            }
        };
        if buf[..n].chunks_exact(EVENT_SIZE).any(is_power_press) {
            crate::log!("power button pressed ({name})");
            power.stop(PowerAction::PowerOff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ty: u16, code: u16, value: i32) -> Vec<u8> {
        let mut e = vec![0u8; EVENT_SIZE - 8];
        e.extend(ty.to_ne_bytes());
        e.extend(code.to_ne_bytes());
        e.extend(value.to_ne_bytes());
        e
    }

    #[test]
    fn recognises_power_press_only() {
        assert_eq!(EVENT_SIZE, 24);
        assert!(is_power_press(&event(1, 116, 1)));
        assert!(!is_power_press(&event(1, 116, 0)), "release");
        assert!(!is_power_press(&event(1, 30, 1)), "another key");
        assert!(!is_power_press(&event(0, 116, 1)), "EV_SYN");
        assert!(!is_power_press(&[0u8; 8]));
    }
}
