//! The in-guest agent (`drover-agent`) and its in-guest CLI (`drover-guest`, the same binary).
//!
//! The agent runs inside a minimal guest (busybox initramfs, no udev, no systemd), respawned by
//! `/init`, as root. It speaks the [`drover_proto`] guest channel over two virtio-serial ports:
//!
//! - port A (`org.drover.req`, [`port_a`]): guest-initiated; the agent says `Hello` whenever the host
//!   (re)connects, and forwards apps' requests, handing each the host's immediate `Ack`.
//! - port B (`org.drover.evt`, [`port_b`]): host-initiated; ping, exec, shutdown, and events (the
//!   outcomes of apps' requests), which [`hub`] routes to the apps waiting or listening for them.
//!
//! Apps reach the agent on a unix socket ([`app`], `/run/drover/agent.sock`), directly or through
//! the `drover-guest` commands ([`cli`], [`guest`]). The agent also brings hot-plugged CPUs and
//! memory online ([`hotplug`]).
//!
//! Layout: the protocol logic ([`port_a::PortA`], [`port_b::PortB`]) is generic over `Read + Write`
//! streams so it is tested over socket pairs; [`device`] owns the virtio-serial quirks (waiting for
//! the device, EBUSY, EOF while the host is away); [`agent`] wires the threads together.

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
pub mod app;
pub mod cli;
pub mod clock;
pub mod device;
pub mod exec;
pub mod files;
pub mod guest;
pub mod hotplug;
pub mod hub;
pub mod info;
pub mod inventory;
pub mod migration;
pub mod port_a;
pub mod port_b;
pub mod power;
pub mod scan;
pub mod seed;
pub mod wire;

#[cfg(test)]
mod test_support;

/// Lock a mutex even if a thread panicked while holding it.
///
/// The data guarded here (a port writer, a counter) stays usable after such a panic, and the agent
/// must keep serving rather than cascade the panic.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
