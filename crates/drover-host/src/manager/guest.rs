//! Requests from inside a guest (port A): guest principals with hashed secrets and allowed ops,
//! rate limiting, an audit trail, a durable per-VM queue, and outcomes delivered as events on
//! port B.
//!
//! A request is written to the store before it is acknowledged, and removed only once its
//! outcome has reached the guest's agent: a droverd that dies in between finds it at its next
//! start and reports it (never lost silently).

use super::live::Change;
use super::{lock, Manager};
use crate::action::VmAction;
use crate::agent_link::RequestHandler;
use crate::auth::{Caller, Permission};
use crate::error::{HostError, Result};
use crate::hostfacts;
use crate::vm_events::{Reaction, Subscriber, VmEvent};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use drover_api::{AuditEntry, GuestGrant, GuestPrincipal};
use drover_model::{DiskConfig, ElementId, MacAddr, NicBackend, NicConfig};
use drover_proto::{Body, ConfigChange, EventStatus, GuestEvent, GuestOp, GuestRequest};
use drover_store::StoreExt;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) const PRINCIPALS: &str = "principals";

/// The guest broker's per-VM tables.
pub(super) const TABLES: &[super::VmTable] = &[
    super::VmTable::by_prefix(PRINCIPALS),
    super::VmTable::by_prefix(AUDIT),
    super::VmTable::by_prefix(REQUESTS),
    super::VmTable::by_prefix(GUEST_DISKS),
];

/// The guest broker's part in the VM events: requests a previous droverd left queued are
/// answered once their VM is re-adopted, and a deleted VM's rate bucket and verified secrets go.
pub(super) const SUBSCRIBER: Subscriber<Manager> = Subscriber::new("guest broker", on_vm_event);

fn on_vm_event<'a>(m: &'a Manager, ev: &'a VmEvent) -> Reaction<'a> {
    match ev {
        VmEvent::Readopted { vm, .. } => m.resume_requests(vm),
        VmEvent::Deleted { vm } => m.s.broker.forget(vm),
        _ => {}
    }
    crate::vm_events::done()
}

/// What the guest broker keeps while droverd runs (not on disk).
#[derive(Default)]
pub(super) struct Broker {
    /// Request rate per VM.
    buckets: std::sync::Mutex<std::collections::HashMap<String, Bucket>>,
    /// Secrets already verified with argon2, per principal: (its stored hash, sha256 of the
    /// secret).
    verified: std::sync::Mutex<std::collections::BTreeMap<String, (String, [u8; 32])>>,
}

impl Broker {
    /// Drop what is kept of VM `vm` (deleted).
    fn forget(&self, vm: &str) {
        lock(&self.buckets).remove(vm);
        let prefix = format!("{vm}/");
        lock(&self.verified).retain(|k, _| !k.starts_with(&prefix));
    }
}

/// Secret checks (argon2, ~19 MiB each) running at once, across all VMs (and every daemon of
/// this process: it bounds the process's memory).
static ARGON2_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
/// Lines about what guests do, at most one per VM and kind every 10 s (with a count).
static GUEST_LOG: crate::limits::LogLimiter =
    crate::limits::LogLimiter::new(Duration::from_secs(10));
pub(super) const AUDIT: &str = "audit";
/// Disks a guest asked for (`<vm>/<disk id>` → bytes), for its quota.
pub(super) const GUEST_DISKS: &str = "guest_disks";
pub(super) const REQUESTS: &str = "requests";
/// Ops a principal can be granted.
pub const GUEST_OPS: [&str; 5] = ["reconfigure", "save", "list", "restore", "host-info"];
/// Sustained guest requests per second per VM, and the burst allowed above it.
const RATE: f64 = 5.0;
const BURST: f64 = 20.0;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Principal {
    ops: Vec<String>,
    secret_hash: String,
    created_at_ms: u64,
    created_by: String,
}

/// A request accepted and not yet reported back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Pending {
    ticket: String,
    principal: String,
    app_id: Option<String>,
    op: GuestOp,
    data: Option<serde_json::Value>,
    accepted_at_ms: u64,
}

/// Token bucket per VM.
#[derive(Debug)]
pub(super) struct Bucket {
    tokens: f64,
    last: Instant,
    dropped: u64,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket {
            tokens: BURST,
            last: Instant::now(),
            dropped: 0,
        }
    }
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * RATE).min(BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.dropped += 1;
            false
        }
    }
}

fn refuse(reason: impl Into<String>) -> Body {
    Body::Ack {
        accepted: false,
        reason: Some(reason.into()),
        ticket: None,
    }
}

impl Manager {
    /// Grant `principal` the `ops` on VM `name`; returns its secret, once.
    pub fn guest_grant(
        &self,
        name: &str,
        principal: &str,
        ops: &[String],
        caller: &Caller,
    ) -> Result<GuestGrant> {
        caller.require(Permission::GuestAccess)?;
        self.slot(name)?;
        if principal.is_empty()
            || principal.len() > drover_proto::MAX_PRINCIPAL
            || !principal
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(HostError::Invalid(format!(
                "invalid principal {principal:?}: 1-{} characters of a-z, A-Z, 0-9, '-', '_', '.'",
                drover_proto::MAX_PRINCIPAL
            )));
        }
        if ops.is_empty() {
            return Err(HostError::Invalid(format!(
                "give at least one op: {}",
                GUEST_OPS.join(", ")
            )));
        }
        for op in ops {
            if !GUEST_OPS.contains(&op.as_str()) {
                return Err(HostError::Invalid(format!(
                    "unknown op {op:?}: use {}",
                    GUEST_OPS.join(", ")
                )));
            }
        }
        let secret = hex::encode(rand::random::<[u8; 24]>());
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        let hash = argon2::Argon2::default()
            .hash_password(secret.as_bytes(), &salt)
            .map_err(|e| HostError::Internal(format!("hashing the secret: {e}")))?
            .to_string();
        let p = Principal {
            ops: ops.to_vec(),
            secret_hash: hash,
            created_at_ms: hostfacts::now_ms(),
            created_by: caller.name.clone(),
        };
        self.s.store.apply(vec![drover_store::put(
            PRINCIPALS,
            &format!("{name}/{principal}"),
            &p,
        )?])?;
        Ok(GuestGrant {
            principal: principal.to_string(),
            secret,
            ops: ops.to_vec(),
        })
    }

    /// Take a principal's access away.
    pub fn guest_revoke(&self, name: &str, principal: &str, caller: &Caller) -> Result<()> {
        caller.require(Permission::GuestAccess)?;
        self.slot(name)?;
        let key = format!("{name}/{principal}");
        if self.s.store.get_raw(PRINCIPALS, &key)?.is_none() {
            return Err(HostError::NotFound(format!(
                "principal {principal} of VM {name}"
            )));
        }
        self.s.store.apply(vec![drover_store::Write::Delete {
            table: PRINCIPALS.into(),
            key,
        }])?;
        Ok(())
    }

    /// The principals of a VM.
    pub fn guest_principals(&self, name: &str, caller: &Caller) -> Result<Vec<GuestPrincipal>> {
        caller.require(Permission::GuestAccess)?;
        self.slot(name)?;
        Ok(self
            .s
            .store
            .list_prefix::<Principal>(PRINCIPALS, &format!("{name}/"))?
            .into_iter()
            .map(|(n, p)| GuestPrincipal {
                principal: n,
                ops: p.ops,
                created_at_ms: p.created_at_ms,
                created_by: p.created_by,
            })
            .collect())
    }

    /// The audit trail of a VM's guest requests.
    pub fn guest_audit(&self, name: &str, caller: &Caller) -> Result<Vec<AuditEntry>> {
        caller.require(Permission::GuestAccess)?;
        self.slot(name)?;
        self.vm_records(AUDIT, name)
    }

    // The audit record's fields, spelled out at each call site on purpose.
    #[allow(clippy::too_many_arguments)]
    fn audit_write(
        &self,
        vm: &str,
        principal: &str,
        op: &str,
        app_id: Option<&str>,
        ticket: Option<&str>,
        outcome: &str,
        detail: Option<String>,
    ) -> Result<drover_store::Write> {
        let seq = self.next_seq();
        let e = AuditEntry {
            seq,
            at_ms: hostfacts::now_ms(),
            principal: principal.to_string(),
            op: op.to_string(),
            app_id: app_id.map(str::to_string),
            ticket: ticket.map(str::to_string),
            outcome: outcome.to_string(),
            detail,
        };
        if seq.is_multiple_of(64) {
            self.prune_audit(vm);
        }
        Ok(drover_store::put(AUDIT, &format!("{vm}/{seq:020}"), &e)?)
    }

    /// Drop a VM's audit records past the retention: older than the age limit, or beyond the
    /// count (oldest first). Runs every 64th record, so the trail stays near its bounds.
    pub(super) fn prune_audit(&self, vm: &str) {
        let limits = &self.s.cfg.limits;
        let list = match self
            .s
            .store
            .list_prefix::<AuditEntry>(AUDIT, &format!("{vm}/"))
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(vm, "cannot read the audit trail to prune it: {e}");
                return;
            }
        };
        let cutoff = hostfacts::now_ms().saturating_sub(limits.audit_max_age.as_millis() as u64);
        let excess = list.len().saturating_sub(limits.audit_max_entries);
        let gone: Vec<drover_store::Write> = list
            .iter()
            .enumerate()
            .filter(|(i, (_, e))| *i < excess || e.at_ms < cutoff)
            .map(|(_, (k, _))| drover_store::Write::Delete {
                table: AUDIT.into(),
                key: format!("{vm}/{k}"),
            })
            .collect();
        if gone.is_empty() {
            return;
        }
        let n = gone.len();
        match self.s.store.apply(gone) {
            Ok(()) => tracing::debug!(vm, dropped = n, "audit records past retention dropped"),
            Err(e) => tracing::warn!(vm, "cannot prune the audit trail: {e}"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn audit(
        &self,
        vm: &str,
        principal: &str,
        op: &str,
        app_id: Option<&str>,
        ticket: Option<&str>,
        outcome: &str,
        detail: Option<String>,
    ) {
        let written = self
            .audit_write(vm, principal, op, app_id, ticket, outcome, detail)
            .and_then(|w| Ok(self.s.store.apply(vec![w])?));
        if let Err(e) = written {
            tracing::error!(vm, "could not write the audit record: {e}");
        }
    }

    /// The port-A handler of VM `name`.
    pub(super) fn request_handler(&self, name: &str) -> RequestHandler {
        let mgr = self.clone();
        let vm = name.to_string();
        Arc::new(move |req: GuestRequest| {
            let mgr = mgr.clone();
            let vm = vm.clone();
            Box::pin(async move {
                let op = req.op.name();
                let ack = mgr.accept(&vm, req).await;
                let accepted = matches!(ack, Body::Ack { accepted: true, .. });
                let outcome = if accepted { "accepted" } else { "refused" };
                crate::metrics::global().guest_request(op, outcome);
                ack
            })
        })
    }

    /// Check and queue one request; the answer is the `Ack`.
    async fn accept(&self, vm: &str, req: GuestRequest) -> Body {
        let op = req.op.name();
        let allowed = lock(&self.s.broker.buckets)
            .entry(vm.to_string())
            .or_default()
            .take();
        if !allowed {
            let dropped = lock(&self.s.broker.buckets)
                .get(vm)
                .map(|b| b.dropped)
                .unwrap_or(0);
            if let Some(held_back) = GUEST_LOG.allow(&format!("{vm}/rate")) {
                tracing::warn!(vm, dropped, held_back, "guest requests rate-limited");
            }
            return refuse(format!("rate limited: at most {RATE} requests per second"));
        }
        if !req.op.needs_grant() {
            return self.accept_ungranted(vm, req);
        }
        // A refusal is audited with the reason for the host, and answered with one for the guest
        // that does not tell a wrong secret from an unknown principal.
        let refused = |why: &str, tell: String| {
            self.audit(
                vm,
                &req.principal,
                op,
                req.app_id.as_deref(),
                None,
                "refused",
                Some(why.into()),
            );
            refuse(tell)
        };
        let key = format!("{vm}/{}", req.principal);
        let principal = match self.s.store.get::<Principal>(PRINCIPALS, &key) {
            Ok(Some(p)) => p,
            Ok(None) => {
                return refused(
                    "unknown principal",
                    "unknown principal or wrong secret".into(),
                )
            }
            Err(e) => return refuse(format!("host error: {e}")),
        };
        // argon2 is deliberately slow (tens of ms): verify a secret once per grant, then compare
        // a sha256 of it. Our secrets are long random strings, so the fast hash gives nothing
        // away; a new grant (a new stored hash) drops the shortcut.
        let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(req.secret.as_bytes()).into();
        let known = lock(&self.s.broker.verified)
            .get(&key)
            .is_some_and(|(h, d)| *h == principal.secret_hash && *d == digest);
        let ok = known || {
            // Each argon2 check takes ~19 MiB: a few at a time, whatever a flood of wrong
            // secrets asks for, so droverd's memory stays bounded.
            let Ok(Ok(_permit)) =
                tokio::time::timeout(Duration::from_secs(5), ARGON2_SLOTS.acquire()).await
            else {
                return refuse("host busy checking secrets; ask again in a moment");
            };
            let (hash, secret) = (principal.secret_hash.clone(), req.secret.clone());
            tokio::task::spawn_blocking(move || {
                PasswordHash::new(&hash)
                    .map(|h| {
                        argon2::Argon2::default()
                            .verify_password(secret.as_bytes(), &h)
                            .is_ok()
                    })
                    .unwrap_or(false)
            })
            .await
            .unwrap_or(false)
        };
        if ok && !known {
            lock(&self.s.broker.verified).insert(key, (principal.secret_hash.clone(), digest));
        }
        if !ok {
            return refused("wrong secret", "unknown principal or wrong secret".into());
        }
        if !principal.ops.iter().any(|o| o == op) {
            return refused(
                "op not granted",
                format!(
                    "principal {} may not ask for {op} (granted: {})",
                    req.principal,
                    principal.ops.join(", ")
                ),
            );
        }
        let ticket = format!("g{}", self.next_seq());
        let pending = Pending {
            ticket: ticket.clone(),
            principal: req.principal.clone(),
            app_id: req.app_id.clone(),
            op: req.op,
            data: req.data,
            accepted_at_ms: hostfacts::now_ms(),
        };
        // Durable before acknowledged.
        let stored =
            drover_store::put(REQUESTS, &format!("{vm}/{ticket}"), &pending).and_then(|w| {
                let a = self
                    .audit_write(
                        vm,
                        &pending.principal,
                        op,
                        pending.app_id.as_deref(),
                        Some(&ticket),
                        "accepted",
                        None,
                    )
                    .map_err(|e| drover_store::StoreError::Op {
                        op: "audit",
                        table: AUDIT.into(),
                        key: vm.into(),
                        message: e.to_string(),
                    })?;
                self.s.store.apply(vec![w, a])
            });
        if let Err(e) = stored {
            return refuse(format!("host error: {e}"));
        }
        let mgr = self.clone();
        let vm_name = vm.to_string();
        // One request at a time per VM: the op lock inside serializes them.
        tokio::spawn(async move { mgr.run_request(&vm_name, pending).await });
        Body::Ack {
            accepted: true,
            reason: None,
            ticket: Some(ticket),
        }
    }

    /// Ops that need no grant (see [`GuestOp::needs_grant`]): credentials are not checked, and
    /// nothing is queued durably. They are cheap, change nothing but one audit record, and a
    /// guest whose answer is lost (droverd restarted) simply asks again.
    fn accept_ungranted(&self, vm: &str, req: GuestRequest) -> Body {
        let ticket = format!("g{}", self.next_seq());
        let outcome = match &req.op {
            // Not audited: scans ask twice per run, and the answer is no secret.
            GuestOp::HostIdentity {} => self
                .identity_answer(vm)
                .and_then(|a| serde_json::to_value(a).map_err(|e| e.to_string())),
            GuestOp::MigrationNotice(n) => {
                let generations = match (&n.old_generation_id, &n.new_generation_id) {
                    (Some(a), Some(b)) if a != b => format!("; generation {a} -> {b}"),
                    _ => String::new(),
                };
                let detail = format!(
                    "guest reports host {} -> {} (noticed by {}){generations}; hooks run {}, failed {}",
                    n.old_host_id,
                    n.new_host_id,
                    serde_json::to_value(n.trigger)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    n.hooks_run,
                    n.hooks_failed
                );
                if let Some(held_back) = GUEST_LOG.allow(&format!("{vm}/notice")) {
                    let short: String = detail.chars().take(300).collect();
                    tracing::info!(vm, held_back, "{short}");
                }
                // Durable before acknowledged, like every accepted request.
                let written = self
                    .audit_write(
                        vm,
                        "agent",
                        req.op.name(),
                        req.app_id.as_deref(),
                        Some(&ticket),
                        "recorded",
                        Some(detail),
                    )
                    .and_then(|w| Ok(self.s.store.apply(vec![w])?));
                if let Err(e) = written {
                    return refuse(format!("host error: {e}"));
                }
                Ok(serde_json::json!({"recorded": true}))
            }
            // needs_grant() is true for every other op; refuse rather than panic if that changes.
            other => return refuse(format!("{} needs a principal", other.name())),
        };
        let pending = Pending {
            ticket: ticket.clone(),
            principal: String::new(),
            app_id: req.app_id,
            op: req.op,
            data: req.data,
            accepted_at_ms: hostfacts::now_ms(),
        };
        let mgr = self.clone();
        let vm_name = vm.to_string();
        tokio::spawn(async move {
            if !mgr.deliver(&vm_name, &pending, outcome).await {
                tracing::debug!(
                    vm = vm_name,
                    ticket = pending.ticket,
                    "could not deliver the answer to {}",
                    pending.op.name()
                );
            }
        });
        Body::Ack {
            accepted: true,
            reason: None,
            ticket: Some(ticket),
        }
    }

    /// Do the work, report it to the guest, then forget the request.
    async fn run_request(&self, vm: &str, p: Pending) {
        let t0 = std::time::Instant::now();
        let caller = Caller {
            name: format!("guest:{}", p.principal),
            role: None,
            uid: None,
        };
        let outcome: std::result::Result<serde_json::Value, String> = match &p.op {
            GuestOp::Reconfigure { changes } => self.guest_reconfigure(vm, changes, &caller).await,
            // Answered at accept time; only a request queued by a build before that could get here.
            GuestOp::HostIdentity {} => self
                .identity_answer(vm)
                .and_then(|a| serde_json::to_value(a).map_err(|e| e.to_string())),
            GuestOp::MigrationNotice(_) => Ok(serde_json::json!({"recorded": false})),
            GuestOp::HostInfo => Ok(self.guest_host_info()),
            GuestOp::List => self
                .states(vm)
                .map(|list| {
                    serde_json::Value::Array(
                        list.into_iter()
                            .map(|s| serde_json::json!({"id": s.id, "name": s.name, "created_at_ms": s.created_at_ms, "created_by": s.created_by}))
                            .collect(),
                    )
                })
                .map_err(|e| e.to_string()),
            GuestOp::Save { name } => {
                let note = drover_api::GuestSaveNote { ticket: p.ticket.clone(), app_id: p.app_id.clone(), data: p.data.clone() };
                match self.door(vm, VmAction::GuestSave, &caller).await {
                    Err(e) => Err(e.to_string()),
                    Ok(op) => {
                        match self.guest_state_quota(vm) {
                            Err(why) => Err(why),
                            Ok(()) => crate::metrics::timed(crate::metrics::Op::Save, self.save_locked(vm, &op, name.clone(), super::state::SaveHow::Fast(drover_api::Capture::Auto), &caller.name, Some(note)))
                            .await
                            .map(|s| serde_json::json!({"state": s.id, "name": s.name, "paused_ms": s.paused_ms}))
                            .map_err(|e| e.to_string()),
                        }
                    }
                }
            }
            GuestOp::Restore { state } => match self.guest_restore(vm, state, &caller).await {
                Ok(restored) => {
                    // The guest now runs from the saved state. If that state was saved at a guest's
                    // request, the app waiting there for the save's answer gets it now.
                    if let Some(note) = restored.guest_save.clone() {
                        let save = Pending {
                            ticket: note.ticket,
                            principal: restored.created_by.trim_start_matches("guest:").to_string(),
                            app_id: note.app_id,
                            op: GuestOp::Save { name: Some(restored.name.clone()) },
                            data: note.data,
                            accepted_at_ms: restored.created_at_ms,
                        };
                        self.deliver(vm, &save, Ok(serde_json::json!({"state": restored.id, "name": restored.name, "restored": true}))).await;
                    }
                    Ok(serde_json::json!({"state": restored.id, "name": restored.name}))
                }
                Err(e) => Err(e),
            },
        };
        let worked = t0.elapsed();
        self.finish(vm, &p, outcome).await;
        tracing::debug!(
            vm,
            ticket = p.ticket,
            op = p.op.name(),
            work_ms = worked.as_millis() as u64,
            total_ms = t0.elapsed().as_millis() as u64,
            since_accept_ms = hostfacts::now_ms().saturating_sub(p.accepted_at_ms),
            "guest request done"
        );
    }

    async fn guest_restore(
        &self,
        vm: &str,
        state: &str,
        caller: &Caller,
    ) -> std::result::Result<drover_api::StateInfo, String> {
        let op = self
            .door(vm, VmAction::GuestRestore, caller)
            .await
            .map_err(|e| e.to_string())?;
        let st = self.state(vm, state).map_err(|e| e.to_string())?;
        let restore = self.restore_locked(vm, &op, state);
        crate::metrics::timed(crate::metrics::Op::Restore, restore)
            .await
            .map_err(|e| e.to_string())?;
        Ok(st)
    }

    /// Send an outcome event on port B, retrying while the VM runs. Returns whether it arrived.
    async fn deliver(
        &self,
        vm: &str,
        p: &Pending,
        outcome: std::result::Result<serde_json::Value, String>,
    ) -> bool {
        let (status, result, error) = match outcome {
            Ok(v) => (EventStatus::Completed, v, None),
            Err(e) => (EventStatus::Failed, serde_json::Value::Null, Some(e)),
        };
        let event = GuestEvent {
            ticket: p.ticket.clone(),
            app_id: p.app_id.clone(),
            op: p.op.name().to_string(),
            status,
            result,
            error,
            data: p.data.clone(),
        };
        for attempt in 0..5u32 {
            let Ok(slot) = self.slot(vm) else {
                return false;
            };
            let Some(rt) = self.runtime(&slot) else {
                return false;
            };
            // After a restore the agent reconnects; give it a moment.
            let _ = rt.agent.wait_ready(Duration::from_secs(10)).await;
            if rt
                .agent
                .call(Body::Event(event.clone()), Duration::from_secs(10))
                .await
                .is_ok()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(500 * (attempt as u64 + 1))).await;
        }
        false
    }

    /// Report an outcome on port B (retrying while the VM runs), audit it, drop the request.
    pub(super) async fn finish(
        &self,
        vm: &str,
        p: &Pending,
        outcome: std::result::Result<serde_json::Value, String>,
    ) {
        let status = if outcome.is_ok() {
            EventStatus::Completed
        } else {
            EventStatus::Failed
        };
        let error = outcome.as_ref().err().cloned();
        let delivered = self.deliver(vm, p, outcome).await;
        let outcome = match status {
            EventStatus::Completed => "completed",
            _ => "failed",
        };
        crate::metrics::global().guest_request(p.op.name(), outcome);
        let detail = match (&error, delivered) {
            (Some(e), true) => Some(e.clone()),
            (Some(e), false) => Some(format!("{e}; the guest could not be told")),
            (None, false) => Some("the guest could not be told".into()),
            (None, true) => None,
        };
        let writes = self
            .audit_write(
                vm,
                &p.principal,
                p.op.name(),
                p.app_id.as_deref(),
                Some(&p.ticket),
                outcome,
                detail,
            )
            .map(|a| {
                vec![
                    a,
                    drover_store::Write::Delete {
                        table: REQUESTS.into(),
                        key: format!("{vm}/{}", p.ticket),
                    },
                ]
            });
        if let Err(e) = writes.and_then(|w| Ok(self.s.store.apply(w)?)) {
            tracing::error!(
                vm,
                "could not record the outcome of guest request {}: {e}",
                p.ticket
            );
        }
    }

    /// Requests left from before a droverd restart: report each as failed (their effect, if any,
    /// is in the VM's journal), so no app waits for an answer that never comes.
    pub(super) fn resume_requests(&self, vm: &str) {
        let pending: Vec<Pending> = match self.vm_records(REQUESTS, vm) {
            Ok(list) => list,
            Err(e) => {
                tracing::error!(vm, "cannot read queued guest requests: {e}");
                return;
            }
        };
        for p in pending {
            let mgr = self.clone();
            let vm = vm.to_string();
            tokio::spawn(async move {
                tracing::warn!(
                    vm,
                    ticket = p.ticket,
                    "guest request interrupted by a droverd restart; reporting it failed"
                );
                mgr.finish(
                    &vm,
                    &p,
                    Err("droverd restarted before this request completed; see `drover vm config journal` for what was applied, and ask again".into()),
                )
                .await;
            });
        }
    }

    async fn guest_reconfigure(
        &self,
        vm: &str,
        changes: &[ConfigChange],
        caller: &Caller,
    ) -> std::result::Result<serde_json::Value, String> {
        // Held from the quota check to the change, so two requests cannot both pass it.
        let op = self
            .door(vm, VmAction::GuestChange, caller)
            .await
            .map_err(|e| e.to_string())?;
        let slot = op.slot();
        let mut list = Vec::new();
        for c in changes {
            list.push(match c {
                ConfigChange::SetCpus { count } => Change::Cpus(*count),
                ConfigChange::SetMemory { bytes } => Change::Memory(*bytes),
                ConfigChange::AttachDisk { id, size } => {
                    let id = ElementId::new(id).map_err(|e| e.to_string())?;
                    if !(drover_model::MIN_DISK_SIZE..=drover_model::MAX_DISK_SIZE).contains(size) {
                        return Err(format!("disk size {size} is out of range"));
                    }
                    let (count, bytes) = self.guest_disks_held(vm, slot);
                    let asked = list.iter().filter_map(|c| match c {
                        Change::AddDisk(d, _) => Some(d.size),
                        _ => None,
                    });
                    let (count, bytes) = asked.fold((count, bytes), |(c, b), s| (c + 1, b + s));
                    self.guest_disk_quota(vm, count, bytes, *size)?;
                    let path = self.vm_dir(vm).join("disks").join(format!("{id}.qcow2"));
                    Change::AddDisk(
                        DiskConfig::unplaced(
                            id,
                            path,
                            drover_model::DiskFormat::Qcow2,
                            *size,
                            false,
                            true,
                        ),
                        true,
                    )
                }
                ConfigChange::AttachNic { id } => Change::AddNic(NicConfig {
                    id: ElementId::new(id).map_err(|e| e.to_string())?,
                    mac: MacAddr::qemu_local(rand::random()),
                    backend: NicBackend::User {
                        forwards: Vec::new(),
                    },
                    slot: None,
                    addr: None,
                }),
                ConfigChange::Detach { id } => Change::Remove(id.clone()),
            });
        }
        let asked: Vec<(String, u64)> = list
            .iter()
            .filter_map(|c| match c {
                Change::AddDisk(d, _) => Some((d.id.to_string(), d.size)),
                _ => None,
            })
            .collect();
        let record = |mgr: &Manager| {
            let writes: Vec<drover_store::Write> = asked
                .iter()
                .filter_map(|(id, size)| {
                    drover_store::put(GUEST_DISKS, &format!("{vm}/{id}"), size).ok()
                })
                .collect();
            if let Err(e) = mgr.s.store.apply(writes) {
                tracing::error!(vm, "cannot record the guest's disks for its quota: {e}");
            }
        };
        match self.change(vm, &op, list.clone(), false, caller).await {
            Ok(r) => {
                record(self);
                Ok(serde_json::json!({"applied": r.applied, "changes": r.changes}))
            }
            Err(HostError::Conflict(why)) => {
                // Not possible live (shrinking, memory without hot-plug, ...): do what the app
                // asked the long way — shut down, reconfigure, start again.
                tracing::info!(vm, "guest reconfigure needs a restart: {why}");
                let restart = async {
                    self.stop_locked(vm, &op, 30, false).await?;
                    let r = self.change(vm, &op, list, false, caller).await?;
                    record(self);
                    self.start_locked(vm, &op, &drover_api::StartRequest::default(), caller)
                        .await?;
                    Ok::<_, HostError>(r)
                }
                .await
                .map_err(|e| e.to_string())?;
                Ok(
                    serde_json::json!({"applied": "restart", "changes": restart.changes, "why": why}),
                )
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// The disks a VM's guest asked for that the VM still has: how many, and their size.
    fn guest_disks_held(&self, vm: &str, slot: &super::VmSlot) -> (u32, u64) {
        let info = lock(&slot.info).clone();
        let config = info.running_config.as_ref().unwrap_or(&info.config);
        let asked = self
            .s
            .store
            .list_prefix::<u64>(GUEST_DISKS, &format!("{vm}/"))
            .unwrap_or_default();
        asked
            .iter()
            .filter(|(id, _)| config.disks.iter().any(|d| d.id.as_str() == id))
            .fold((0, 0), |(c, b), (_, size)| (c + 1, b + size))
    }

    /// Whether one more guest-asked disk of `size` fits the VM's quota (`count` and `bytes`
    /// already held) and the host's free space.
    fn guest_disk_quota(
        &self,
        vm: &str,
        count: u32,
        bytes: u64,
        size: u64,
    ) -> std::result::Result<(), String> {
        let l = &self.s.cfg.limits;
        if count + 1 > l.guest_disk_count {
            return Err(format!(
                "VM {vm}'s guest already has {count} disks it asked for, its quota is {}; detach one first (the host admin sets it with droverd --guest-disk-max-count)",
                l.guest_disk_count
            ));
        }
        if bytes.saturating_add(size) > l.guest_disk_bytes {
            return Err(format!(
                "a {} disk would take VM {vm}'s guest-asked disks to {} of its {} quota (droverd --guest-disk-max-size)",
                hostfacts::human_size(size),
                hostfacts::human_size(bytes.saturating_add(size)),
                hostfacts::human_size(l.guest_disk_bytes)
            ));
        }
        let (_, free) = hostfacts::disk(&self.vm_dir(vm));
        if size > free {
            return Err(format!(
                "a {} disk is more than the host has free ({})",
                hostfacts::human_size(size),
                hostfacts::human_size(free)
            ));
        }
        Ok(())
    }

    /// Whether the VM may take one more state at its guest's request.
    fn guest_state_quota(&self, vm: &str) -> std::result::Result<(), String> {
        let l = &self.s.cfg.limits;
        let states = self.states(vm).map_err(|e| e.to_string())?;
        if states.len() as u32 >= l.guest_state_count {
            return Err(format!(
                "VM {vm} holds {} saved states, its quota for guest saves is {}; delete one first (the host admin sets it with droverd --guest-state-max-count)",
                states.len(),
                l.guest_state_count
            ));
        }
        let bytes: u64 = states
            .iter()
            .map(|s| s.devices.bytes + s.memory.as_ref().map_or(0, |m| m.bytes))
            .sum();
        if bytes >= l.guest_state_bytes {
            return Err(format!(
                "VM {vm}'s saved states take {}, its quota for guest saves is {}; delete one first (droverd --guest-state-max-size)",
                hostfacts::human_size(bytes),
                hostfacts::human_size(l.guest_state_bytes)
            ));
        }
        Ok(())
    }

    fn guest_host_info(&self) -> serde_json::Value {
        let (_, free) = hostfacts::disk(&self.s.cfg.state_dir);
        serde_json::json!({
            "host_id": self.s.cfg.identity.id,
            "hostname": hostfacts::hostname(),
            "free_disk_bytes": free,
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A manager on a fresh state dir under `dir` (no QEMU is started).
    pub(in crate::manager) async fn manager(dir: &std::path::Path) -> Manager {
        Manager::for_tests(dir, crate::limits::Limits::default()).await
    }

    fn req(op: GuestOp) -> GuestRequest {
        GuestRequest {
            principal: String::new(),
            secret: String::new(),
            app_id: None,
            op,
            data: None,
        }
    }

    /// The audit trail is kept to its count and age; guest-asked disks and states to their
    /// quotas; console logs to their cap.
    #[tokio::test]
    async fn growth_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let limits = crate::limits::Limits {
            audit_max_entries: 10,
            console_log_max: 1024,
            guest_disk_count: 2,
            guest_disk_bytes: 1 << 30,
            guest_state_count: 0,
            ..Default::default()
        };
        let m = Manager::for_tests(dir.path(), limits).await;
        m.create(
            drover_model::VmSpec::from_toml("name = \"g1\"\nmemory = \"64M\"").unwrap(),
            &Caller::daemon(),
        )
        .await
        .unwrap();
        for _ in 0..300 {
            m.audit(
                "g1",
                "p",
                "save",
                None,
                None,
                "refused",
                Some("wrong secret".into()),
            );
        }
        m.prune_audit("g1");
        let admin = Caller::daemon();
        let kept = m.guest_audit("g1", &admin).unwrap();
        assert_eq!(kept.len(), 10);
        // The newest are the ones kept.
        assert!(kept.windows(2).all(|w| w[0].seq < w[1].seq));
        // Disks: count, then total size.
        assert!(m.guest_disk_quota("g1", 0, 0, 512 << 20).is_ok());
        let e = m.guest_disk_quota("g1", 2, 0, 1 << 20).unwrap_err();
        assert!(e.contains("--guest-disk-max-count"), "{e}");
        let e = m
            .guest_disk_quota("g1", 1, 768 << 20, 512 << 20)
            .unwrap_err();
        assert!(e.contains("1.2 GiB") && e.contains("1.0 GiB"), "{e}");
        assert!(m.guest_disk_quota("g1", 0, 0, 1 << 40).is_err());
        // States: the quota is counted before a save.
        let e = m.guest_state_quota("g1").unwrap_err();
        assert!(e.contains("--guest-state-max-count"), "{e}");
        // The console log is rotated past its cap.
        let log = m.console_path("g1");
        std::fs::write(&log, vec![b'x'; 5000]).unwrap();
        m.rotate_consoles();
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        assert_eq!(
            std::fs::metadata(log.with_extension("log.1"))
                .unwrap()
                .len(),
            5000
        );
        // A reader past the new end starts over.
        std::fs::write(&log, b"new").unwrap();
        assert_eq!(m.console("g1", 5000, 100).unwrap(), (b"new".to_vec(), 3));
    }

    /// A deleted VM's rate bucket goes with it: a new VM of the same name is not held back by
    /// what the old one asked.
    #[tokio::test]
    async fn a_new_vm_of_a_deleted_ones_name_is_not_rate_limited_by_it() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path()).await;
        let daemon = Caller::daemon();
        let spec = || drover_model::VmSpec::from_toml("name = \"g1\"\nmemory = \"64M\"").unwrap();
        let limited = |ack: &Body| matches!(ack, Body::Ack { accepted: false, reason: Some(r), .. } if r.starts_with("rate limited"));
        m.create(spec(), &daemon).await.unwrap();
        let mut held = false;
        for _ in 0..1000 {
            if limited(&m.accept("g1", req(GuestOp::HostIdentity {})).await) {
                held = true;
                break;
            }
        }
        assert!(held, "a flood of requests is rate-limited");
        m.delete("g1", false, true, &daemon).await.unwrap();
        m.create(spec(), &daemon).await.unwrap();
        let ack = m.accept("g1", req(GuestOp::HostIdentity {})).await;
        assert!(!limited(&ack), "{ack:?}");
    }

    /// Identity ops are answered without a principal; the notice lands in the audit trail; the
    /// generation id is made at create, renewed on demand, and goes with the VM.
    #[tokio::test]
    async fn identity_requests_generation_ids_and_notices() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path()).await;
        m.create(
            drover_model::VmSpec::from_toml("name = \"g1\"\nmemory = \"64M\"").unwrap(),
            &Caller::daemon(),
        )
        .await
        .unwrap();
        let g0 = m.generation_id("g1").unwrap();
        assert!(drover_proto::valid_generation_id(&g0));
        assert_eq!(m.generation_id("g1").unwrap(), g0, "stable until renewed");
        let a = m.identity_answer("g1").unwrap();
        assert_eq!(
            (a.host.id.as_str(), a.generation_id.as_str()),
            ("host-t", g0.as_str())
        );
        assert_eq!(a.host.serial, "drover-host-t");
        let g1 = m.regenerate_generation_id("g1", "restore of s1").unwrap();
        assert_ne!(g1, g0);
        assert_eq!(m.generation_id("g1").unwrap(), g1);
        assert!(m.regenerate_generation_id("nope", "x").is_err());

        let ack = m.accept("g1", req(GuestOp::HostIdentity {})).await;
        assert!(
            matches!(
                &ack,
                Body::Ack {
                    accepted: true,
                    ticket: Some(_),
                    ..
                }
            ),
            "{ack:?}"
        );
        let notice = drover_proto::MigrationNotice {
            old_host_id: "host-s".into(),
            new_host_id: "host-t".into(),
            old_generation_id: None,
            new_generation_id: None,
            trigger: drover_proto::NoticeTrigger::Scan,
            hooks_run: 1,
            hooks_failed: 0,
        };
        let ack = m.accept("g1", req(GuestOp::MigrationNotice(notice))).await;
        assert!(matches!(ack, Body::Ack { accepted: true, .. }), "{ack:?}");
        let admin = Caller {
            name: "root".into(),
            role: Some(crate::auth::Role::Admin),
            uid: Some(0),
        };
        let audit = m.guest_audit("g1", &admin).unwrap();
        assert_eq!(
            audit.len(),
            1,
            "host-identity reads are not audited: {audit:?}"
        );
        assert_eq!(audit[0].op, "migration-notice");
        assert_eq!(audit[0].outcome, "recorded");
        assert!(audit[0]
            .detail
            .as_deref()
            .unwrap_or("")
            .contains("host host-s -> host-t"));
        // Ops that need a grant still need a principal.
        let ack = m.accept("g1", req(GuestOp::List)).await;
        assert!(
            matches!(
                ack,
                Body::Ack {
                    accepted: false,
                    ..
                }
            ),
            "{ack:?}"
        );
        // Not running: nothing to notify.
        assert!(matches!(
            m.notify_migrated("g1", "host-s", "host-t", 5).await,
            Err(HostError::Conflict(_))
        ));
        assert!(matches!(
            m.notify_migrated("g1", "bad id", "host-t", 5).await,
            Err(HostError::Invalid(_))
        ));

        m.delete("g1", false, false, &Caller::daemon())
            .await
            .unwrap();
        m.create(
            drover_model::VmSpec::from_toml("name = \"g1\"\nmemory = \"64M\"").unwrap(),
            &Caller::daemon(),
        )
        .await
        .unwrap();
        assert_ne!(
            m.generation_id("g1").unwrap(),
            g1,
            "a new VM of the same name starts afresh"
        );
    }
}
