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
    /// Begin stopping the guest. Under systemd this asks PID 1 for an orderly stop and returns
    /// (the agent keeps serving until systemd stops it); elsewhere it syncs and calls `reboot(2)`,
    /// which returns only if that failed.
    fn stop(&self, action: PowerAction);
}

/// The guest's init system, as far as powering off is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitSystem {
    /// systemd is PID 1: it stops services and unmounts filesystems when asked.
    Systemd,
    /// Drover's busybox `/init`, sysvinit or anything else: the agent syncs and calls `reboot(2)`
    /// itself (what the busybox image has always done).
    Other,
}

/// Which init system runs, by systemd's own test (`sd_booted(3)`): `/run/systemd/system` is a
/// directory only when systemd is PID 1. `root` is `/` except in tests.
pub fn detect_init(root: &Path) -> InitSystem {
    if root.join("run/systemd/system").is_dir() {
        InitSystem::Systemd
    } else {
        InitSystem::Other
    }
}

/// The signal that asks systemd (as PID 1) for `action`, as `systemd(1)` documents it:
/// `SIGRTMIN+4` starts `poweroff.target`, `SIGRTMIN+5` `reboot.target`. A signal needs neither
/// D-Bus nor `systemctl`, and systemd queues the job exactly as `systemctl poweroff` would.
pub fn systemd_signal(action: PowerAction) -> libc::c_int {
    libc::SIGRTMIN()
        + match action {
            PowerAction::PowerOff => 4,
            PowerAction::Reboot => 5,
        }
}

/// How long systemd gets to finish an orderly stop before the agent forces it with `reboot(2)`:
/// above systemd's default 90 s stop timeout for one unit, so a slow service is not cut short.
/// (Normally systemd stops the agent long before; the forced stop is for a PID 1 that does not
/// react at all.)
pub const FORCE_AFTER: Duration = Duration::from_secs(120);

/// The real thing: an orderly stop through systemd where it runs, else `sync()` then `reboot(2)`.
#[derive(Debug)]
pub struct SystemPower {
    init: InitSystem,
    force_after: Duration,
}

impl SystemPower {
    /// Detects the init system of this guest.
    pub fn detect() -> Self {
        let init = detect_init(Path::new("/"));
        crate::log!("init system: {init:?}");
        SystemPower {
            init,
            force_after: FORCE_AFTER,
        }
    }
}

impl Power for SystemPower {
    fn stop(&self, action: PowerAction) {
        if self.init == InitSystem::Systemd {
            let sig = systemd_signal(action);
            // SAFETY: kill(2) has no memory-safety preconditions.
            if unsafe { libc::kill(1, sig) } == 0 {
                crate::log!(
                    "{action:?}: asked systemd (signal {sig}); forcing it in {}s if still running",
                    self.force_after.as_secs()
                );
                let after = self.force_after;
                let spawned = thread::Builder::new()
                    .name("force-stop".into())
                    .spawn(move || {
                        thread::sleep(after);
                        crate::log!("{action:?}: systemd did not finish in time; forcing");
                        force_stop(action);
                    });
                if spawned.is_ok() {
                    return;
                }
            } else {
                crate::log!(
                    "{action:?}: cannot signal systemd ({}); forcing",
                    io::Error::last_os_error()
                );
            }
        }
        force_stop(action);
    }
}

/// `sync()` then `reboot(2)`: the only way where no init system stops services for us.
fn force_stop(action: PowerAction) {
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

/// Programs that handle the power button themselves where they run; the agent then leaves the
/// button to them (logind, for one, runs the inhibitor logic and a clean poweroff).
const BUTTON_HANDLERS: &[&str] = &["systemd-logind", "acpid"];

/// The power-button handler running in this guest, if any, found by the process names under
/// `proc` (normally `/proc`). Checked at each press, since they may start after the agent.
pub fn button_handler(proc: &Path) -> Option<&'static str> {
    let entries = std::fs::read_dir(proc).ok()?;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // `comm` is at most 16 bytes; read a little more to be safe, never a whole file.
        let mut comm = [0u8; 32];
        let n = File::open(entry.path().join("comm"))
            .and_then(|mut f| f.read(&mut comm))
            .unwrap_or(0);
        let comm = String::from_utf8_lossy(&comm[..n]);
        let comm = comm.trim_end();
        // The kernel cuts names to 15 bytes: "systemd-logind" fits.
        if let Some(h) = BUTTON_HANDLERS.iter().find(|h| **h == comm) {
            return Some(h);
        }
    }
    None
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
/// Where logind or acpid runs, a press is left to it ([`button_handler`]).
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
            if let Some(handler) = button_handler(Path::new("/proc")) {
                crate::log!("power button pressed ({name}); left to {handler}");
                continue;
            }
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

    #[test]
    fn detects_systemd_by_its_run_directory() {
        let d = crate::test_support::TempDir::new("power");
        assert_eq!(detect_init(d.path()), InitSystem::Other);
        // A file of that name is not systemd's directory.
        std::fs::create_dir_all(d.path().join("run/systemd")).unwrap();
        std::fs::write(d.path().join("run/systemd/system"), "").unwrap();
        assert_eq!(detect_init(d.path()), InitSystem::Other);
        std::fs::remove_file(d.path().join("run/systemd/system")).unwrap();
        std::fs::create_dir(d.path().join("run/systemd/system")).unwrap();
        assert_eq!(detect_init(d.path()), InitSystem::Systemd);
    }

    #[test]
    fn systemd_signals_are_the_documented_ones() {
        let min = libc::SIGRTMIN();
        assert_eq!(systemd_signal(PowerAction::PowerOff), min + 4);
        assert_eq!(systemd_signal(PowerAction::Reboot), min + 5);
    }

    #[test]
    fn power_button_left_to_logind_or_acpid() {
        let d = crate::test_support::TempDir::new("power");
        let proc_dir = |pid: &str, comm: &str| {
            let p = d.path().join(pid);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("comm"), format!("{comm}\n")).unwrap();
        };
        proc_dir("1", "systemd");
        proc_dir("self", "systemd-logind"); // not a pid: ignored
        proc_dir("42", "systemd-logind2");
        assert_eq!(button_handler(d.path()), None);
        proc_dir("311", "systemd-logind");
        assert_eq!(button_handler(d.path()), Some("systemd-logind"));
        std::fs::remove_dir_all(d.path().join("311")).unwrap();
        proc_dir("7", "acpid");
        assert_eq!(button_handler(d.path()), Some("acpid"));
        assert_eq!(button_handler(&d.path().join("missing")), None);
    }
}
