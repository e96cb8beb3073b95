//! The guest's wall clock, set from the host's after a restore: the restored guest's clock
//! stands where it was when the state was saved, which may be days ago.

use std::io;

/// Set `CLOCK_REALTIME` to `unix_ms` (milliseconds since the Unix epoch).
pub fn set_clock(unix_ms: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (unix_ms / 1000) as libc::time_t,
        tv_nsec: ((unix_ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: a valid timespec on the stack; clock_settime reads it and keeps no reference.
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
