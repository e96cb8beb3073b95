//! QEMU as Drover's VM backend.
//!
//! - [`accel`]: pick KVM only where it really works, else TCG.
//! - [`cmdline`]: the QEMU command line for a [`drover_model::VmConfig`].
//! - [`qmp`]: an async QMP client with command/reply matching and an event stream.
//! - [`process`]: spawning QEMU so it outlives droverd, and checking on a pid later.
//! - [`img`]: `qemu-img` for creating and checking disk images.
//! - [`install`]: which QEMU installation runs (emulator, `qemu-img`, `qemu-nbd`, firmware).
//! - [`probe`]: what that QEMU can do, and the version-specific behaviour that follows.
//! - [`qcow2`]: what a qcow2 header names outside the file (backing, external data).
//! - [`migrate`]: saving and loading VM state through QEMU's migration machinery.
//! - [`live_migration`]: the QMP sequences of moving a running VM to another host.
//! - [`nbd`]: disks and files carried to another host with `qemu-nbd` and `qemu-img`.

pub mod accel;
pub mod cmdline;
pub mod hotplug;
pub mod img;
pub mod install;
pub mod live_migration;
pub mod migrate;
pub mod nbd;
pub mod probe;
pub mod process;
pub mod qcow2;
pub mod qmp;
