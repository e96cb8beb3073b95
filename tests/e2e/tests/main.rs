//! Drover's end-to-end tests, one test binary: real droverd's, real guests under TCG, checks
//! from inside the guest. Each module is one feature's file (`lifecycle.rs`, `states.rs`, ...).
//! One binary rather than one per file: `cargo test` runs binaries one after another, so a
//! file with one long test (the Debian guest, the cluster) left the other core idle while it ran;
//! in one binary every test shares the `--test-threads` pool, and 23 debug links become one.
//! Pick a file's tests with a filter: `cargo test -p drover-e2e -- states::`.

mod api_document;
mod bad_input;
mod clone;
mod cluster_fence;
mod cluster_services;
mod console_attach;
mod crashsafe;
mod debian;
mod devices;
mod disk_layers;
mod hibernate;
mod lifecycle;
mod metrics;
mod migrate;
mod privilege;
mod qemu_versions;
mod readopt;
mod remote;
mod runtime_config;
mod scan;
mod states;
mod store;
mod web_console;
