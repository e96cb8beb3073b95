//! Every growth has a limit: the bounds droverd keeps on what guests and callers can make it
//! store, with defaults an admin can change with droverd flags.

use std::time::Duration;

/// Bounds on per-VM growth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// A VM's `console.log` is rotated (to `console.log.1`) when it grows past this many bytes,
    /// so a VM's console takes at most about twice this on disk.
    pub console_log_max: u64,
    /// Disks a VM's guest may ask for (`reconfigure --add-disk`) that it still has.
    pub guest_disk_count: u32,
    /// Their total size in bytes (virtual: what the guest could fill).
    pub guest_disk_bytes: u64,
    /// Saved states a VM's guest may keep (`save`).
    pub guest_state_count: u32,
    /// Bytes all of a VM's saved states may take on disk before a guest's `save` is refused.
    pub guest_state_bytes: u64,
    /// Audit records older than this are dropped.
    pub audit_max_age: Duration,
    /// At most this many audit records per VM are kept (the oldest go first).
    pub audit_max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            console_log_max: 8 << 20,
            guest_disk_count: 4,
            guest_disk_bytes: 16 << 30,
            guest_state_count: 4,
            guest_state_bytes: 8 << 30,
            audit_max_age: Duration::from_secs(30 * 24 * 3600),
            audit_max_entries: 10_000,
        }
    }
}

/// A log line that a flood would repeat: said the first time, then at most once per `every`,
/// with how many were not said in between.
#[derive(Debug)]
pub struct LogLimiter {
    every: Duration,
    state: std::sync::Mutex<std::collections::BTreeMap<String, (std::time::Instant, u64)>>,
}

impl LogLimiter {
    /// At most one line per key each `every`.
    pub const fn new(every: Duration) -> Self {
        LogLimiter {
            every,
            state: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    /// Whether to log now for `key`; `Some(n)` is how many were held back since the last line.
    pub fn allow(&self, key: &str) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut m = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // Forget quiet keys so a stream of new keys (addresses) cannot grow the map for ever.
        if m.len() > 4096 {
            let every = self.every;
            m.retain(|_, (at, _)| now.duration_since(*at) < every);
        }
        match m.get_mut(key) {
            Some((at, held)) if now.duration_since(*at) < self.every => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                let n = *held;
                *at = now;
                *held = 0;
                Some(n)
            }
            None => {
                m.insert(key.to_string(), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_logs_one_line_per_interval_with_a_count() {
        let l = LogLimiter::new(Duration::from_millis(50));
        assert_eq!(l.allow("a"), Some(0));
        for _ in 0..1000 {
            assert_eq!(l.allow("a"), None);
        }
        assert_eq!(l.allow("b"), Some(0));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(l.allow("a"), Some(1000));
        assert_eq!(l.allow("a"), None);
    }
}
