//! Fault injection for crash tests: with `DROVER_TEST_CRASH_AT=<point>[,<point>...]` in its
//! environment, a **debug build** of droverd kills itself with SIGKILL when it reaches a named
//! point, so an end-to-end test can cut it off at a precise moment (no destructor runs, exactly
//! as a crash or `kill -9`). Release builds compile the check out and ignore the variable; no
//! request can set it (only the environment droverd starts with).
//!
//! Points: `save-receiver` (a save's receiving QEMU runs, the VM is not paused yet),
//! `save-disks-moved` (QEMU writes each disk's new overlay, the chains do not record it yet),
//! `save-copy` (a copying save's memory copied into RAM under a temporary name, the guest still
//! paused), `capture` (a fast save answered, its memory still streaming), `write-out-copy` (a ready
//! state's memory copied to a temporary file on disk, not renamed), `write-out-renamed` (its
//! memory in place, not yet recorded durable), `restore-ram-copy` (a restore copied an older
//! state's memory back into RAM under a temporary name), `start-spawned` (a start's QEMU
//! launched, QMP not connected yet), `restore-loading` (a restore's QEMU up, its state not
//! loaded), `delete-files` (a delete recorded, its files not removed yet), `clone-identity` (a
//! clone runs, its agent not yet given its identity), `restore-identity` (a resumed or restored
//! VM runs, its agent not yet given its new identity or MACs).

/// Die here if the test environment asks for it (debug builds only).
pub fn hit(point: &str) {
    #[cfg(debug_assertions)]
    {
        static POINTS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
        let points = POINTS.get_or_init(|| {
            std::env::var("DROVER_TEST_CRASH_AT")
                .map(|v| v.split(',').map(|p| p.trim().to_string()).collect())
                .unwrap_or_default()
        });
        if points.iter().any(|p| p == point) {
            tracing::warn!(point, "DROVER_TEST_CRASH_AT: killing droverd here");
            let _ =
                nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}
