//! Helpers shared by the unit tests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use drover_proto::{EventStatus, GuestEvent};

/// A completed `save` event for `ticket`, addressed to `app`.
pub fn event(ticket: &str, app: Option<&str>) -> GuestEvent {
    GuestEvent {
        ticket: ticket.into(),
        app_id: app.map(str::to_string),
        op: "save".into(),
        status: EventStatus::Completed,
        result: serde_json::json!({"state": "s1"}),
        error: None,
        data: Some(serde_json::json!({"mine": 1})),
    }
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Create it.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "drover-agent-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
