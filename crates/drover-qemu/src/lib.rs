//! QEMU as Drover's VM backend.
//!
//! - [`accel`]: pick KVM only where it really works, else TCG.
//! - [`cmdline`]: the QEMU command line for a [`drover_model::VmConfig`].
//! - [`qmp`]: an async QMP client with command/reply matching and an event stream.
//! - [`process`]: spawning QEMU so it outlives droverd, and checking on a pid later.
//! - [`img`]: `qemu-img` for creating and checking disk images.

pub mod accel;
pub mod cmdline;
pub mod hotplug;
pub mod img;
pub mod migrate;
pub mod process;
pub mod qmp;
