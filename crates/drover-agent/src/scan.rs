//! `drover-guest host-id` and `drover-guest scan`: a migration-safe inventory.
//!
//! A scan reads the host id, takes the inventory ([`crate::inventory`]), and reads the host id
//! again. If the VM moved in between (or was restored: the generation id changed), the inventory
//! may mix two machines, so it is discarded: `RC_INCONSISTENT_OUTPUT` on stderr, a JSON report
//! of the change on stdout, exit [`exit::INCONSISTENT`]. `--repeat-if-migrated` scans again (a
//! bounded number of times); `--notify-if-migrated` runs the `migrated.d` hooks and tells the host,
//! once per change ([`crate::migration`]: if the agent already handled the change, nothing runs
//! twice).

use std::io::{self, Write};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use drover_proto::{GuestOp, HostIdentityAnswer, NoticeTrigger};
use serde_json::{json, Value};

use crate::cli::ScanArgs;
use crate::guest::{ask, exit, fail, print_line, Failure};
use crate::migration::{Hooks, Identity};

/// Marker printed on stderr when the host changed during a scan.
pub const RC_INCONSISTENT_OUTPUT: &str = "RC_INCONSISTENT_OUTPUT";
/// Environment variable that sets `--pause-between` (milliseconds).
pub const ENV_PAUSE: &str = "DROVER_SCAN_PAUSE_MS";
/// How long to wait for one answer once the host took the request.
const ANSWER_WAIT: Duration = Duration::from_secs(15);

/// Ask the host that runs this VM for its identity. While the agent has no host (droverd
/// restarting, the VM moving), ask again every second until `timeout`.
pub fn host_identity(socket: &Path, timeout: Duration) -> Result<HostIdentityAnswer, Failure> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ask(
            socket,
            &GuestOp::HostIdentity {},
            Some(ANSWER_WAIT.min(left.max(Duration::from_secs(1)))),
        ) {
            Ok(event) => {
                return HostIdentityAnswer::from_result(&event["result"]).map_err(|e| {
                    fail(
                        exit::UNAVAILABLE,
                        format!("the host's identity answer is unusable: {e}"),
                    )
                })
            }
            Err(f) if f.code == exit::UNAVAILABLE && Instant::now() < deadline => {
                thread::sleep(Duration::from_secs(1));
            }
            Err(f) => return Err(f),
        }
    }
}

fn say(msg: &str) {
    let _ = writeln!(io::stderr().lock(), "drover-guest: {msg}");
}

/// Run a scan; see the module docs.
pub fn scan(out: &mut dyn Write, args: &ScanArgs) -> Result<(), Failure> {
    let timeout = Duration::from_secs(args.timeout);
    let pause = Duration::from_millis(args.pause_between.unwrap_or_else(|| {
        std::env::var(ENV_PAUSE)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }));
    let attempts = 1 + args.repeat_if_migrated.unwrap_or(0);
    let mut migrations: Vec<Value> = Vec::new();
    for attempt in 1..=attempts {
        let before = host_identity(&args.socket, timeout)?;
        say(&format!(
            "scan {attempt}/{attempts}: host {} (generation {}); scanning",
            before.host.id, before.generation_id
        ));
        let inventory = crate::inventory::scan(&crate::inventory::Roots::default());
        if !pause.is_zero() {
            thread::sleep(pause);
        }
        let after = host_identity(&args.socket, timeout)?;
        let (old, new) = (
            Identity::from_answer(&before),
            Identity::from_answer(&after),
        );
        if !old.differs(&new) {
            return print_line(
                out,
                &json!({
                    "status": "consistent",
                    "host": after.host,
                    "generation_id": after.generation_id,
                    "attempts": attempt,
                    "migrations": migrations,
                    "inventory": inventory,
                }),
            );
        }
        say(&format!(
            "{RC_INCONSISTENT_OUTPUT}: the VM moved during the scan (host {} -> {}, generation {} -> {}); output discarded{}",
            old.host_id,
            new.host_id,
            before.generation_id,
            after.generation_id,
            if attempt < attempts { "; scanning again" } else { "" }
        ));
        let mut m = json!({
            "old_host_id": old.host_id,
            "new_host_id": new.host_id,
            "old_generation_id": before.generation_id,
            "new_generation_id": after.generation_id,
        });
        if args.notify_if_migrated {
            notify(&args.socket, &old, &new, &mut m);
        }
        migrations.push(m);
    }
    let last = migrations.last().cloned().unwrap_or(Value::Null);
    print_line(
        out,
        &json!({
            "status": RC_INCONSISTENT_OUTPUT,
            "old_host_id": last["old_host_id"],
            "new_host_id": last["new_host_id"],
            "old_generation_id": last["old_generation_id"],
            "new_generation_id": last["new_generation_id"],
            "attempts": attempts,
            "migrations": migrations,
        }),
    )?;
    Err(fail(exit::INCONSISTENT, ""))
}

/// Run the hooks for `old` → `new` unless someone already did, and tell the host; the report
/// goes into `m`.
fn notify(socket: &Path, old: &Identity, new: &Identity, m: &mut Value) {
    let outcome = match Hooks::default().observe(new, Some(old), NoticeTrigger::Scan, true) {
        Ok(o) => o,
        Err(e) => {
            say(&format!("cannot run the migration hooks: {e}"));
            m["hooks"] = json!(format!("error: {e}"));
            return;
        }
    };
    m["hooks"] = json!(if outcome.ran {
        "ran"
    } else {
        "already-handled"
    });
    m["hook_results"] = outcome.hooks.iter().map(|h| h.to_json()).collect();
    if let Some(notice) = outcome.notice(new, NoticeTrigger::Scan) {
        // The ack means recorded; the outcome is awaited only so it does not arrive unclaimed.
        let sent = ask(socket, &GuestOp::MigrationNotice(notice), Some(ANSWER_WAIT));
        if let Err(f) = &sent {
            say(&format!("could not tell the host: {}", f.message));
        }
        m["host_notified"] = json!(sent.is_ok());
    }
}
