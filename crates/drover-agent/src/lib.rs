//! The in-guest agent (`drover-agent`) and its in-guest CLI (`drover-guest`, the same binary).
//!
//! The agent runs inside a minimal guest (busybox initramfs, no udev, no systemd), respawned by
//! `/init`, as root. It speaks the [`drover_proto`] guest channel over two virtio-serial ports:
//!
//! - port A (`org.drover.req`, [`port_a`]): guest-initiated; the agent says `Hello` whenever the host
//!   (re)connects, and later forwards app requests.
//! - port B (`org.drover.evt`, [`port_b`]): host-initiated; ping, exec, shutdown.
//!
//! Layout: the protocol logic ([`port_a::PortA`], [`port_b::PortB`]) is generic over `Read + Write`
//! streams so it is tested over socket pairs; [`device`] owns the virtio-serial quirks (waiting for
//! the device, EBUSY, EOF while the host is away); [`agent`] wires the threads together. An
//! app-facing unix socket (`/run/drover/agent.sock`) and its `drover-guest` commands (save,
//! restore, listen) belong in their own module next to [`guest`], feeding requests into port A.

#![warn(missing_docs)]

/// Write one line prefixed `drover-agent:` to stderr (the guest console).
///
/// Unlike `eprintln!`, this never panics: a console that went away must not kill the agent.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {{
        if ::std::cfg!(test) {
            // Goes through the test harness's capture, so passing tests stay quiet.
            ::std::eprintln!("drover-agent: {}", ::std::format_args!($($arg)*));
        } else {
            use ::std::io::Write as _;
            let _ = ::std::writeln!(
                ::std::io::stderr().lock(),
                "drover-agent: {}",
                ::std::format_args!($($arg)*)
            );
        }
    }};
}

pub mod agent;
pub mod cli;
pub mod device;
pub mod exec;
pub mod guest;
pub mod info;
pub mod port_a;
pub mod port_b;
pub mod power;
pub mod wire;

/// Lock a mutex even if a thread panicked while holding it.
///
/// The data guarded here (a port writer, a counter) stays usable after such a panic, and the agent
/// must keep serving rather than cascade the panic.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
