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
mod plugged;
mod size;
mod spec;

pub use config::*;
pub use layers::{origin_below, DiskLayers, LayerError, OpenPlan, LAYERS_FORMAT};
pub use platform::Platform;
pub use plugged::{Plugged, PluggedCpu, PluggedDimm};
pub use size::{format_size, parse_size, SizeError};
pub use spec::*;

/// Types that travel as strings (parsed with `TryFrom<String>`) are strings in the API document.
#[cfg(feature = "openapi")]
mod openapi {
    macro_rules! string_schema {
        ($($t:ty: $what:literal),* $(,)?) => {$(
            impl utoipa::PartialSchema for $t {
                fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                    utoipa::openapi::ObjectBuilder::new()
                        .schema_type(utoipa::openapi::schema::Type::String)
                        .description(Some($what))
                        .into()
                }
            }
            impl utoipa::ToSchema for $t {}
        )*};
    }
    string_schema!(
        crate::VmName: "A VM name: lowercase letters, digits and '-', starting with a letter",
        crate::ElementId: "A disk's or NIC's id",
        crate::MacAddr: "A MAC address (52:54:00:12:34:56)",
        crate::PortForward: "A port forward: [tcp|udp:][HOST_ADDR:]HOST_PORT-:GUEST_PORT",
        crate::ElementKey: "A config element: cpu, memory, disk:ID, nic:ID, boot, ...",
    );
}
