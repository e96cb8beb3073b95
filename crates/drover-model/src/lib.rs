//! Pure types and logic of Drover's VM configuration. No I/O lives here.
//!
//! Two levels:
//! - [`VmSpec`] is what an operator asks for (CLI flags or a TOML file): sizes as text, disks to
//!   create or images to attach. It is parsed strictly and validated without touching the host.
//! - [`VmConfig`] is the resolved configuration droverd stores and boots: absolute paths, sizes in
//!   bytes, MAC addresses assigned. The host resolves a spec into a config (creating disks, checking
//!   images) and checks host-dependent limits (CPUs, memory) itself.
//!
//! A config is also a set of elements (`cpu`, `memory`, `disk:<id>`, ...; see [`ElementKey`]):
//! [`diff`], [`apply`], [`rebase`] and [`compose`] work on such sets, and [`ConfigHistory`] keeps
//! the generations of a VM's config.

mod config;
mod layers;
mod platform;
mod size;
mod spec;

pub use config::*;
pub use layers::{origin_below, DiskLayers, LayerError, OpenPlan, LAYERS_FORMAT};
pub use platform::Platform;
pub use size::{format_size, parse_size, SizeError};
pub use spec::*;
