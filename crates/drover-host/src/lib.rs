//! droverd's library: the VM manager, the guest channel broker and the host API.
//!
//! - [`manager`]: VM records, lifecycle (create/start/stop/restart/delete), supervision,
//!   re-adoption of running QEMUs after a daemon restart.
//! - [`agent_link`]: the host end of a VM's guest channel (ports A and B).
//! - [`api`]: the HTTP/JSON routes.
//! - [`action`]: every lifecycle verb with the states it is valid in.
//! - [`compat`]: whether a VM's machine type and CPU model fit another host's QEMU or a state.
//! - [`metrics`]: what `/metrics` exports to Prometheus.
//! - [`vm_events`]: the bus on which the lifecycle tells features what happened to a VM.
//! - [`vmm`]: the backend seam, what the coordination code asks of a running VMM (QEMU, or a
//!   fake in unit tests).

pub mod action;
pub mod agent_link;
pub mod api;
pub mod auth;
pub mod cluster;
pub mod compat;
pub mod config_file;
pub mod console;
pub mod crashpoint;
pub mod error;
pub mod events;
pub mod fence_watchdog;
pub mod filecopy;
pub mod fsutil;
pub mod guest_ram;
pub mod hostfacts;
pub mod limits;
pub mod manager;
pub mod metrics;
#[cfg(test)]
mod openapi_check;
pub mod pools;
pub mod qemu_user;
pub mod serve;
pub mod tls;
pub mod vm_events;
pub mod vmm;
pub mod web;

/// One line of image-build progress for logs and the CLI.
pub fn image_progress(p: &drover_image::Progress) -> String {
    use drover_image::Progress;
    match p {
        Progress::Step { step } => step.clone(),
        Progress::WaitingForLock { lock } => {
            format!("waiting for another build (lock {})", lock.display())
        }
        Progress::Downloading { package, version } => format!("downloading {package} {version}"),
        Progress::UpToDate { dir } => format!("image is up to date ({})", dir.display()),
        Progress::Built { dir, build_ms } => format!(
            "built {} in {:.1}s",
            dir.display(),
            *build_ms as f64 / 1000.0
        ),
        other => format!("{other:?}"),
    }
}
