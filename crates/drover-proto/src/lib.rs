//! The guest channel between droverd and `drover-agent`.
//!
//! Two virtio-serial ports carry it:
//! - **port A** (`org.drover.req`): the *guest* initiates. The agent sends requests (its `Hello`,
//!   later save/restore/reconfigure requests from apps) and the host answers each with an [`Body::Ack`].
//! - **port B** (`org.drover.evt`): the *host* initiates. The host sends commands ([`Body::Ping`],
//!   [`Body::Exec`], [`Body::Shutdown`]) and events; the agent answers commands on the same port.
//!
//! Every message is one [`Frame`]: the 4-byte magic [`MAGIC`], a big-endian `u32` body length, then
//! the body as JSON. A body longer than [`MAX_FRAME_LEN`] is refused. The magic lets a reader
//! resynchronise after garbage (an agent restarted mid-write, a hostile guest): [`Decoder`] skips to
//! the next magic and reports what it dropped, so one bad frame never stops the channel.
//!
//! Everything read here may come from an untrusted guest: parsing is strict
//! (`deny_unknown_fields`), sizes are bounded, and no input can make the decoder buffer more than
//! `MAX_FRAME_LEN + HEADER_LEN` bytes.

pub mod seed;

use serde::{Deserialize, Serialize};

/// Version of the message schema carried in every frame.
pub const PROTOCOL_VERSION: u16 = 1;
/// Marks the start of every frame.
pub const MAGIC: [u8; 4] = *b"DRV1";
/// Magic plus length.
pub const HEADER_LEN: usize = 8;
/// Largest body accepted, in bytes.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;
/// Largest stdout or stderr an `exec` reply carries, in bytes (each).
pub const MAX_EXEC_OUTPUT: usize = 64 * 1024;
/// Longest argv (sum of argument lengths) an `exec` may carry.
pub const MAX_EXEC_ARGV: usize = 16 * 1024;
/// Longest stdin an `exec` may carry.
pub const MAX_EXEC_STDIN: usize = 64 * 1024;
/// Names of the two virtio-serial ports.
pub const PORT_A_NAME: &str = "org.drover.req";
/// Name of the host-initiated port.
pub const PORT_B_NAME: &str = "org.drover.evt";

/// One message on either port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Frame {
    /// Schema version ([`PROTOCOL_VERSION`] when sent by this build).
    pub v: u16,
    /// Request id chosen by the side that initiates; a reply carries the id of its request.
    pub id: u64,
    /// What the message says.
    pub body: Body,
}

impl Frame {
    /// A frame of the current version.
    pub fn new(id: u64, body: Body) -> Self {
        Frame {
            v: PROTOCOL_VERSION,
            id,
            body,
        }
    }
}

/// Message bodies. Each variant says who sends it and on which port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Body {
    /// Guest → host, port A: the agent is up. Sent each time the agent (re)opens port A.
    Hello(AgentInfo),
    /// Host → guest on port A (answering a guest request), or guest → host on port B (answering a
    /// host command that has no richer reply, such as `shutdown`).
    Ack {
        /// Whether the request was accepted.
        accepted: bool,
        /// Why not, when refused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// For an accepted guest [`Body::Request`]: the host's handle for it, repeated in the
        /// [`Body::Event`] that reports its outcome.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ticket: Option<String>,
    },
    /// Guest → host, port A: an app's request (through the agent). The host answers at once with
    /// an `Ack` (accepted with a ticket, or refused with a reason) and later reports the outcome as
    /// an [`Body::Event`] on port B. Nothing in the guest waits on the host in between.
    Request(GuestRequest),
    /// Host → guest, port B: the outcome of a request, or a notice from the host. The agent
    /// answers with an `Ack` once it has taken it (so the host can redeliver after a reconnect).
    Event(GuestEvent),
    /// Host → guest, port B: are you there? Answered with [`Body::Pong`].
    Ping,
    /// Guest → host, port B: the answer to [`Body::Ping`].
    Pong(AgentInfo),
    /// Host → guest, port B: run a command. Answered with [`Body::ExecResult`].
    Exec(ExecRequest),
    /// Guest → host, port B: the outcome of an [`Body::Exec`].
    ExecResult(ExecResult),
    /// Host → guest, port B: power the guest off (or reboot). Answered with an `Ack` before the
    /// agent syncs disks and powers off.
    Shutdown {
        /// Reboot instead of powering off.
        #[serde(default)]
        reboot: bool,
    },
    /// Host → guest, port B: set the guest's wall clock to the host's (after a restore the
    /// guest's clock stands where it was saved). Answered with an `Ack`.
    SetClock {
        /// The host's time, milliseconds since the Unix epoch.
        unix_ms: u64,
    },
    /// Host → guest, port B: write a piece of a file (`drover vm cp` into the guest). Answered
    /// with an `Ack` once the piece is written.
    FilePut(FilePut),
    /// Host → guest, port B: read a piece of a file. Answered with [`Body::FileData`].
    FileGet(FileGet),
    /// Guest → host, port B: the answer to [`Body::FileGet`].
    FileData(FileData),
    /// Host → guest, port B: take a new identity (a clone landed, or a restore asked for one).
    /// Answered with [`Body::IdentitySet`] once applied and the `restored.d` hooks ran.
    SetIdentity(IdentityUpdate),
    /// Guest → host, port B: the outcome of a [`Body::SetIdentity`].
    IdentitySet(IdentityApplied),
    /// Either direction: the request with this id failed.
    Error {
        /// Stable machine-readable code, e.g. `bad_request`, `unsupported`.
        code: String,
        /// Human-readable explanation.
        message: String,
    },
}

/// Largest piece of a file one [`Body::FilePut`] or [`Body::FileData`] carries (base64 in the
/// JSON body makes it 4/3 as large, under [`MAX_FRAME_LEN`]).
pub const MAX_FILE_CHUNK: usize = 512 * 1024;
/// Longest path in a file request.
pub const MAX_FILE_PATH: usize = 4096;

/// A piece of a file to write. Pieces come in order: the first (offset 0) starts a fresh
/// temporary file next to `path`, each next one continues it where the last ended, and the one
/// marked `done` makes it durable and puts it in place of `path` in one rename, so a reader of
/// `path` sees the old file or the whole new one, never half.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FilePut {
    /// Absolute path in the guest.
    pub path: String,
    /// Where this piece goes (the bytes written so far).
    pub offset: u64,
    /// The bytes, base64 on the wire.
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    /// The last piece: sync, set `mode`, rename into place.
    #[serde(default)]
    pub done: bool,
    /// Permission bits for the finished file (default 0644).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// A piece of a file to read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FileGet {
    /// Absolute path in the guest.
    pub path: String,
    /// Where to start.
    pub offset: u64,
    /// At most this many bytes (at most [`MAX_FILE_CHUNK`]).
    pub len: u32,
}

/// A piece of a file read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FileData {
    /// The bytes from the asked offset, base64 on the wire.
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    /// The file's size when read.
    pub size: u64,
    /// Its permission bits.
    pub mode: u32,
    /// The piece ends at the end of the file.
    pub eof: bool,
}

/// Bytes as a base64 string in JSON.
mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

/// A file request's path: absolute, no NUL, not too long.
fn check_file_path(path: &str) -> Result<(), ProtoError> {
    if !path.starts_with('/') || path.len() > MAX_FILE_PATH || path.contains('\0') {
        return Err(ProtoError::Invalid(format!(
            "a guest path must be absolute, without NUL, at most {MAX_FILE_PATH} bytes"
        )));
    }
    Ok(())
}

/// Longest principal name.
pub const MAX_PRINCIPAL: usize = 64;
/// Longest secret.
pub const MAX_SECRET: usize = 256;
/// Longest app id.
pub const MAX_APP_ID: usize = 64;
/// Largest app data (encoded JSON) attached to a request or event.
pub const MAX_APP_DATA: usize = 64 * 1024;
/// Most changes in one reconfigure request.
pub const MAX_CHANGES: usize = 16;

/// An app's request, as the agent forwards it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GuestRequest {
    /// The guest principal the app acts as (granted by a host administrator).
    pub principal: String,
    /// Its secret; checked against a hash on the host, never stored there in clear.
    pub secret: String,
    /// The app's id, stable across saved states: events go to the listener with this id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    /// What is asked.
    pub op: GuestOp,
    /// Opaque app data, returned with the outcome (at most [`MAX_APP_DATA`] bytes encoded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

/// Operations a guest may ask for. The host checks each against the principal's allowed ops,
/// named by [`GuestOp::name`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestOp {
    /// Change the VM's configuration (live where possible).
    Reconfigure {
        /// The changes, applied in order, all or nothing.
        changes: Vec<ConfigChange>,
    },
    /// Save the VM's state.
    Save {
        /// A name for the state.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// List saved states.
    List,
    /// Restore a saved state.
    Restore {
        /// The state's name or id.
        state: String,
    },
    /// Report the host facts the guest may see.
    HostInfo,
    /// Which host runs the VM now, and the VM's generation id: answered (as the event's
    /// `result`, a [`HostIdentityAnswer`]) by the host that currently runs the VM, so the answer
    /// changes when the VM moves or is restored.
    ///
    /// Needs no grant ([`GuestOp::needs_grant`]): the agent asks it for itself and for scans,
    /// without a principal. It reveals nothing secret (a host's id, DMI serial and model, and a
    /// random generation id); the host still rate-limits it like every request.
    // A struct variant, not a unit one: serde rejects unknown fields only for those.
    HostIdentity {},
    /// The guest noticed that it moved (or was restored) and ran its `migrated.d` hooks: the host
    /// records it in the VM's audit trail (`drover vm audit NAME`).
    ///
    /// Needs no grant, like [`GuestOp::HostIdentity`]: it only adds one bounded audit record and
    /// changes nothing; the rate limit still applies.
    MigrationNotice(MigrationNotice),
}

impl GuestOp {
    /// The permission name of the op (`reconfigure`, `save`, `list`, `restore`, `host-info`,
    /// `host-identity`, `migration-notice`).
    pub fn name(&self) -> &'static str {
        match self {
            GuestOp::Reconfigure { .. } => "reconfigure",
            GuestOp::Save { .. } => "save",
            GuestOp::List => "list",
            GuestOp::Restore { .. } => "restore",
            GuestOp::HostInfo => "host-info",
            GuestOp::HostIdentity {} => "host-identity",
            GuestOp::MigrationNotice(_) => "migration-notice",
        }
    }

    /// Whether the op needs a principal granted it. Ops that do not are answered without checking
    /// credentials (the request may carry an empty principal and secret); see each op for why.
    pub fn needs_grant(&self) -> bool {
        !matches!(self, GuestOp::HostIdentity {} | GuestOp::MigrationNotice(_))
    }
}

/// Longest host id ([`valid_host_id`]).
pub const MAX_HOST_ID: usize = 64;
/// Longest serial, model or name in a [`HostIdentity`].
pub const MAX_HOST_FIELD: usize = 128;
/// Longest generation id (a UUID is 36 bytes).
pub const MAX_GENERATION_ID: usize = 64;
/// The [`GuestEvent::op`] of the host's notice that the VM has just been live-migrated.
pub const NOTICE_MIGRATED: &str = "migrated";
/// The [`GuestEvent::op`] of the agent's notice to every listening app that an
/// [`IdentityUpdate`] was applied; its `result` names what changed, with old and new values.
pub const NOTICE_RESTORED: &str = "restored";

/// Whether `s` is a well-formed host id: 1-[`MAX_HOST_ID`] characters of `A-Z a-z 0-9 . _ -`.
pub fn valid_host_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_HOST_ID
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Printable ASCII or any non-control character, at most `max` bytes.
fn valid_text(s: &str, max: usize) -> bool {
    s.len() <= max && !s.chars().any(char::is_control)
}

/// A generation id: 1-[`MAX_GENERATION_ID`] characters of hex digits and `-`.
pub fn valid_generation_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_GENERATION_ID
        && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// A host's component id: what a guest (or a licence scanner in it) sees of the machine it runs on.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HostIdentity {
    /// The host id (droverd `--host-id`; default derived from /etc/machine-id), unique in a fleet.
    pub id: String,
    /// The machine's serial number (DMI `product_serial`, else derived from the id).
    pub serial: String,
    /// The machine's model (DMI `product_name`, else a fixed description).
    pub model: String,
    /// The host's name.
    pub name: String,
}

impl HostIdentity {
    /// Check the bounds an untrusted peer's identity must keep.
    pub fn check(&self) -> Result<(), ProtoError> {
        if !valid_host_id(&self.id) {
            return Err(ProtoError::Invalid(format!(
                "host id must be 1-{MAX_HOST_ID} characters of a-z, A-Z, 0-9, '.', '_', '-'"
            )));
        }
        for (what, v) in [
            ("serial", &self.serial),
            ("model", &self.model),
            ("name", &self.name),
        ] {
            if !valid_text(v, MAX_HOST_FIELD) {
                return Err(ProtoError::Invalid(format!(
                    "host {what} must be at most {MAX_HOST_FIELD} bytes without control characters"
                )));
            }
        }
        Ok(())
    }
}

/// The `result` of a [`GuestOp::HostIdentity`] request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HostIdentityAnswer {
    /// The host that runs the VM now.
    pub host: HostIdentity,
    /// The VM's generation id (QEMU `vmgenid`): new on every restore or clone.
    pub generation_id: String,
}

impl HostIdentityAnswer {
    /// Parse and check an event's `result`.
    pub fn from_result(v: &serde_json::Value) -> Result<Self, ProtoError> {
        let a: HostIdentityAnswer = serde_json::from_value(v.clone())
            .map_err(|e| ProtoError::Malformed(format!("host identity answer: {e}")))?;
        a.host.check()?;
        if !valid_generation_id(&a.generation_id) {
            return Err(ProtoError::Invalid("malformed generation id".into()));
        }
        Ok(a)
    }
}

/// What set off a [`GuestOp::MigrationNotice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum NoticeTrigger {
    /// `drover-guest scan --notify-if-migrated` saw the host id change during a scan.
    Scan,
    /// The host pushed a `migrated` event.
    Pushed,
    /// The agent's own check saw a new host id or generation id.
    Agent,
}

/// The guest's report that it moved, as [`GuestOp::MigrationNotice`] carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MigrationNotice {
    /// The host id before.
    pub old_host_id: String,
    /// The host id now.
    pub new_host_id: String,
    /// The generation id before, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_generation_id: Option<String>,
    /// The generation id now, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_generation_id: Option<String>,
    /// Who noticed.
    pub trigger: NoticeTrigger,
    /// How many `migrated.d` hooks ran.
    pub hooks_run: u32,
    /// Of those, how many failed or timed out.
    pub hooks_failed: u32,
}

impl MigrationNotice {
    fn check(&self) -> Result<(), ProtoError> {
        if !valid_host_id(&self.old_host_id) || !valid_host_id(&self.new_host_id) {
            return Err(ProtoError::Invalid(
                "malformed host id in migration notice".into(),
            ));
        }
        for g in [&self.old_generation_id, &self.new_generation_id]
            .into_iter()
            .flatten()
        {
            if !valid_generation_id(g) {
                return Err(ProtoError::Invalid(
                    "malformed generation id in migration notice".into(),
                ));
            }
        }
        Ok(())
    }
}

/// The host's notice that the VM was just live-migrated: a [`GuestEvent`] with op
/// [`NOTICE_MIGRATED`], status [`EventStatus::Notice`] and this as its `result`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MigratedNotice {
    /// The host id of the source.
    pub from: String,
    /// The host id of the destination (the host sending this).
    pub to: String,
    /// How long the guest was paused, as QEMU measured it.
    pub downtime_ms: u64,
}

impl GuestEvent {
    /// The agent's [`NOTICE_RESTORED`] event for every listening app: `result` says what
    /// changed (`{"changed": [...], "hostname": {"old":..,"new":..}, ...}`).
    pub fn restored(ticket: String, result: serde_json::Value) -> GuestEvent {
        GuestEvent {
            ticket,
            app_id: None,
            op: NOTICE_RESTORED.to_string(),
            status: EventStatus::Notice,
            result,
            error: None,
            data: None,
        }
    }

    /// The `migrated` notice event, with the host's `ticket` for it.
    pub fn migrated(ticket: String, notice: &MigratedNotice) -> GuestEvent {
        GuestEvent {
            ticket,
            app_id: None,
            op: NOTICE_MIGRATED.to_string(),
            status: EventStatus::Notice,
            result: serde_json::json!({
                "from": notice.from,
                "to": notice.to,
                "downtime_ms": notice.downtime_ms,
            }),
            error: None,
            data: None,
        }
    }

    /// This event as a `migrated` notice: `None` if it is another event, `Some(Err)` if it claims
    /// to be one but is malformed (bad host ids, unknown fields).
    pub fn migrated_notice(&self) -> Option<Result<MigratedNotice, ProtoError>> {
        if self.op != NOTICE_MIGRATED || self.status != EventStatus::Notice {
            return None;
        }
        Some(
            serde_json::from_value::<MigratedNotice>(self.result.clone())
                .map_err(|e| ProtoError::Malformed(format!("migrated notice: {e}")))
                .and_then(|n| {
                    if valid_host_id(&n.from) && valid_host_id(&n.to) {
                        Ok(n)
                    } else {
                        Err(ProtoError::Invalid(
                            "malformed host id in migrated notice".into(),
                        ))
                    }
                }),
        )
    }
}

/// One configuration change asked for from inside the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "change", rename_all = "snake_case", deny_unknown_fields)]
pub enum ConfigChange {
    /// Set the vCPU count.
    SetCpus {
        /// vCPUs.
        count: u32,
    },
    /// Set the memory size.
    SetMemory {
        /// Bytes.
        bytes: u64,
    },
    /// Add a new empty disk.
    AttachDisk {
        /// Disk id (becomes its serial).
        id: String,
        /// Size in bytes.
        size: u64,
    },
    /// Add a NIC (user-mode networking).
    AttachNic {
        /// NIC id.
        id: String,
    },
    /// Remove a disk or NIC by id.
    Detach {
        /// Element id.
        id: String,
    },
}

/// The outcome of a guest request, or a notice from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GuestEvent {
    /// The request's ticket (from its `Ack`); a host notice has its own.
    pub ticket: String,
    /// The app the event is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    /// The op's name ([`GuestOp::name`]) or the notice's kind (e.g. `migrated`).
    pub op: String,
    /// `completed`, `failed` or `notice`.
    pub status: EventStatus,
    /// Op-specific result.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub result: serde_json::Value,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The app data attached to the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EventStatus {
    /// Done.
    Completed,
    /// Not done; see `error`.
    Failed,
    /// Not an answer to a request.
    Notice,
}

fn valid_app_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_APP_ID
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn data_len(d: &Option<serde_json::Value>) -> usize {
    d.as_ref().map(|v| v.to_string().len()).unwrap_or(0)
}

impl Body {
    /// The wire name of the body's type, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Body::Hello(_) => "hello",
            Body::Ack { .. } => "ack",
            Body::Request(_) => "request",
            Body::Event(_) => "event",
            Body::Ping => "ping",
            Body::Pong(_) => "pong",
            Body::Exec(_) => "exec",
            Body::ExecResult(_) => "exec_result",
            Body::Shutdown { .. } => "shutdown",
            Body::SetClock { .. } => "set_clock",
            Body::FilePut(_) => "file_put",
            Body::FileGet(_) => "file_get",
            Body::FileData(_) => "file_data",
            Body::SetIdentity(_) => "set_identity",
            Body::IdentitySet(_) => "identity_set",
            Body::Error { .. } => "error",
        }
    }
}

/// Longest hostname in an [`IdentityUpdate`] (one DNS label).
pub const MAX_HOSTNAME: usize = 63;
/// Most NICs in one [`IdentityUpdate`].
pub const MAX_IDENTITY_NICS: usize = 16;

/// A new identity for the guest, pushed by the host after a clone lands or a state is resumed
/// with `--nic ID,mac=...` / `--new-identity`: the agent sets the hostname, machine-id and NIC
/// MAC addresses, renews DHCP on the interfaces that changed (on every one with a new hostname),
/// regenerates SSH host keys with a new machine-id, runs `/etc/drover/hooks/restored.d/*` with
/// the old and new values, and tells listening apps with a [`NOTICE_RESTORED`] event. Applying
/// the same `token` twice changes nothing the second time (the host may resend after a
/// reconnect or a droverd restart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IdentityUpdate {
    /// Names this update; the agent records the last one it applied.
    pub token: String,
    /// The new hostname (a lower-case DNS label); absent: kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The new machine-id: 32 lower-case hex digits; absent: kept (and so are SSH host keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// NICs to give a new MAC, found by the MAC they have now.
    #[serde(default)]
    pub nics: Vec<NicIdentity>,
    /// Why (`clone of state s1 of web1`), handed to the hooks.
    pub reason: String,
}

/// One NIC's address change in an [`IdentityUpdate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NicIdentity {
    /// The MAC the guest's interface has now (`52:54:00:12:34:56`).
    pub old_mac: String,
    /// The MAC it is to have.
    pub mac: String,
}

/// What the agent did with an [`IdentityUpdate`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IdentityApplied {
    /// The hostname now.
    pub hostname: String,
    /// `true` when this token had been applied before (nothing was changed or run again).
    #[serde(default)]
    pub already: bool,
    /// Interfaces that took a new MAC, as `eth0=52:54:00:...`.
    #[serde(default)]
    pub nics: Vec<String>,
    /// The `restored.d` hooks that ran, as `name:exit code`.
    #[serde(default)]
    pub hooks: Vec<String>,
    /// Interfaces whose DHCP lease was renewed (`eth0`).
    #[serde(default)]
    pub renewed: Vec<String>,
    /// SSH host keys regenerated (`/etc/ssh/ssh_host_ed25519_key`).
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// What changed, as the [`NOTICE_RESTORED`] event names it (`hostname`, `machine-id`,
    /// `mac:eth0`, `ssh-host-keys`).
    #[serde(default)]
    pub changed: Vec<String>,
    /// What could not be applied (an interface not found, a file not writable).
    #[serde(default)]
    pub errors: Vec<String>,
}

/// Whether `s` is a MAC address as Drover writes them (six lower-case hex pairs, colons).
pub fn valid_mac(s: &str) -> bool {
    s.len() == 17
        && s.split(':').count() == 6
        && s.split(':').all(|p| {
            p.len() == 2
                && p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// Whether `s` is a machine-id: 32 lower-case hex digits.
pub fn valid_machine_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `s` is a hostname a clone may get: one lower-case DNS label.
pub fn valid_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_HOSTNAME
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl IdentityUpdate {
    /// Checks every field's bounds and syntax (a guest writes these into its files).
    pub fn check(&self) -> Result<(), ProtoError> {
        if self.token.is_empty()
            || self.token.len() > 64
            || !self
                .token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(ProtoError::Invalid(
                "identity token must be 1-64 characters of a-z, A-Z, 0-9, '-'".into(),
            ));
        }
        if self.hostname.as_deref().is_some_and(|h| !valid_hostname(h)) {
            return Err(ProtoError::Invalid(format!(
                "hostname must be one lower-case DNS label of 1-{MAX_HOSTNAME} characters"
            )));
        }
        if self
            .machine_id
            .as_deref()
            .is_some_and(|m| !valid_machine_id(m))
        {
            return Err(ProtoError::Invalid(
                "machine-id must be 32 lower-case hex digits".into(),
            ));
        }
        if self.nics.len() > MAX_IDENTITY_NICS {
            return Err(ProtoError::Invalid(format!(
                "at most {MAX_IDENTITY_NICS} NICs per identity update"
            )));
        }
        if self
            .nics
            .iter()
            .any(|n| !valid_mac(&n.old_mac) || !valid_mac(&n.mac))
        {
            return Err(ProtoError::Invalid(
                "a NIC's MAC must be six lower-case hex pairs separated by ':'".into(),
            ));
        }
        if self.reason.len() > 256 || self.reason.contains(['\0', '\n']) {
            return Err(ProtoError::Invalid(
                "identity reason must be one line of at most 256 bytes".into(),
            ));
        }
        Ok(())
    }
}

/// What the agent reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AgentInfo {
    /// The agent's version (`CARGO_PKG_VERSION`).
    pub agent_version: String,
    /// Highest protocol version the agent speaks.
    pub protocol: u16,
    /// Guest uptime in milliseconds (from `/proc/uptime`).
    pub uptime_ms: u64,
    /// Changes on every guest boot (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
}

/// A command for the guest to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Bytes written to the command's stdin (UTF-8), then stdin is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Kill the command after this many milliseconds.
    pub timeout_ms: u64,
}

/// The outcome of a command run in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ExecResult {
    /// Exit code, when the command exited normally.
    pub exit_code: Option<i32>,
    /// Signal number, when a signal ended it.
    pub signal: Option<i32>,
    /// Whether the agent killed it for exceeding its timeout.
    pub timed_out: bool,
    /// Standard output, lossily decoded as UTF-8, at most [`MAX_EXEC_OUTPUT`] bytes.
    pub stdout: String,
    /// Standard error, likewise.
    pub stderr: String,
    /// Whether stdout was cut at the cap.
    pub stdout_truncated: bool,
    /// Whether stderr was cut at the cap.
    pub stderr_truncated: bool,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// Why a frame could not be encoded or was dropped while decoding.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    /// The JSON body is larger than [`MAX_FRAME_LEN`].
    #[error("frame body of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Declared or actual length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Bytes that did not start with [`MAGIC`] were skipped.
    #[error("skipped {0} bytes of garbage before the next frame")]
    Garbage(usize),
    /// The body was not a valid message.
    #[error("malformed frame body: {0}")]
    Malformed(String),
    /// The frame's version is newer than this build understands.
    #[error("unsupported protocol version {0} (this build speaks {PROTOCOL_VERSION})")]
    Version(u16),
    /// A field breaks a bound (argv too long, ...).
    #[error("invalid message: {0}")]
    Invalid(String),
}

/// Encode one frame: magic, length, JSON.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, ProtoError> {
    let body = serde_json::to_vec(frame).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME_LEN {
        return Err(ProtoError::TooLarge {
            len: body.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    // Cannot truncate: body.len() <= MAX_FRAME_LEN < u32::MAX.
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Parse and check one frame body.
pub fn decode_body(body: &[u8]) -> Result<Frame, ProtoError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(ProtoError::TooLarge {
            len: body.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let frame: Frame =
        serde_json::from_slice(body).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    if frame.v == 0 || frame.v > PROTOCOL_VERSION {
        return Err(ProtoError::Version(frame.v));
    }
    validate(&frame.body)?;
    Ok(frame)
}

/// Bounds that JSON parsing alone does not enforce.
fn validate(body: &Body) -> Result<(), ProtoError> {
    match body {
        Body::Exec(req) => {
            if req.argv.is_empty() {
                return Err(ProtoError::Invalid("exec argv is empty".into()));
            }
            let total: usize = req.argv.iter().map(|a| a.len()).sum();
            if total > MAX_EXEC_ARGV {
                return Err(ProtoError::Invalid(format!(
                    "exec argv is {total} bytes, limit {MAX_EXEC_ARGV}"
                )));
            }
            if req.argv.iter().any(|a| a.contains('\0')) {
                return Err(ProtoError::Invalid("exec argv contains a NUL byte".into()));
            }
            if req.stdin.as_ref().is_some_and(|s| s.len() > MAX_EXEC_STDIN) {
                return Err(ProtoError::Invalid(format!(
                    "exec stdin exceeds {MAX_EXEC_STDIN} bytes"
                )));
            }
        }
        Body::ExecResult(r) => {
            // A little slack for lossy decoding, which can grow invalid bytes into U+FFFD.
            let cap = MAX_EXEC_OUTPUT * 3;
            if r.stdout.len() > cap || r.stderr.len() > cap {
                return Err(ProtoError::Invalid("exec output exceeds its cap".into()));
            }
        }
        Body::Hello(info) | Body::Pong(info) => {
            if info.agent_version.len() > 64 || info.boot_id.len() > 64 {
                return Err(ProtoError::Invalid("agent info field too long".into()));
            }
        }
        Body::FilePut(p) => {
            check_file_path(&p.path)?;
            if p.data.len() > MAX_FILE_CHUNK {
                return Err(ProtoError::Invalid(format!(
                    "a file piece exceeds {MAX_FILE_CHUNK} bytes"
                )));
            }
            if p.mode.is_some_and(|m| m > 0o7777) {
                return Err(ProtoError::Invalid("file mode beyond 0o7777".into()));
            }
        }
        Body::FileGet(g) => {
            check_file_path(&g.path)?;
            if g.len as usize > MAX_FILE_CHUNK {
                return Err(ProtoError::Invalid(format!(
                    "a file piece exceeds {MAX_FILE_CHUNK} bytes"
                )));
            }
        }
        Body::FileData(d) => {
            if d.data.len() > MAX_FILE_CHUNK {
                return Err(ProtoError::Invalid(format!(
                    "a file piece exceeds {MAX_FILE_CHUNK} bytes"
                )));
            }
        }
        Body::Error { code, message } => {
            if code.len() > 64 || message.len() > 4096 {
                return Err(ProtoError::Invalid("error field too long".into()));
            }
        }
        Body::Ack { reason, ticket, .. } => {
            if reason.as_ref().is_some_and(|r| r.len() > 4096) {
                return Err(ProtoError::Invalid("ack reason too long".into()));
            }
            if ticket.as_ref().is_some_and(|t| t.len() > 64) {
                return Err(ProtoError::Invalid("ack ticket too long".into()));
            }
        }
        Body::Request(r) => {
            // Ops without a grant may come without a principal (the agent asks for itself).
            let principal_ok = if r.op.needs_grant() {
                !r.principal.is_empty()
            } else {
                true
            };
            if !principal_ok || r.principal.len() > MAX_PRINCIPAL {
                return Err(ProtoError::Invalid(format!(
                    "principal must be 1-{MAX_PRINCIPAL} bytes"
                )));
            }
            if r.secret.len() > MAX_SECRET {
                return Err(ProtoError::Invalid(format!(
                    "secret exceeds {MAX_SECRET} bytes"
                )));
            }
            if r.app_id.as_deref().is_some_and(|a| !valid_app_id(a)) {
                return Err(ProtoError::Invalid(format!(
                    "app id must be 1-{MAX_APP_ID} characters of a-z, A-Z, 0-9, '.', '_', '-'"
                )));
            }
            if data_len(&r.data) > MAX_APP_DATA {
                return Err(ProtoError::Invalid(format!(
                    "app data exceeds {MAX_APP_DATA} bytes"
                )));
            }
            match &r.op {
                GuestOp::Reconfigure { changes } => {
                    if changes.is_empty() || changes.len() > MAX_CHANGES {
                        return Err(ProtoError::Invalid(format!(
                            "reconfigure needs 1-{MAX_CHANGES} changes"
                        )));
                    }
                    for c in changes {
                        if let ConfigChange::AttachDisk { id, .. }
                        | ConfigChange::AttachNic { id }
                        | ConfigChange::Detach { id } = c
                        {
                            if id.is_empty() || id.len() > 32 {
                                return Err(ProtoError::Invalid(
                                    "element id must be 1-32 bytes".into(),
                                ));
                            }
                        }
                    }
                }
                GuestOp::Save { name: Some(n) } | GuestOp::Restore { state: n }
                    if n.is_empty() || n.len() > 64 =>
                {
                    return Err(ProtoError::Invalid("state name must be 1-64 bytes".into()));
                }
                GuestOp::MigrationNotice(n) => n.check()?,
                _ => {}
            }
        }
        Body::Event(e) => {
            if e.ticket.len() > 64
                || e.op.len() > 32
                || e.error.as_ref().is_some_and(|m| m.len() > 4096)
            {
                return Err(ProtoError::Invalid("event field too long".into()));
            }
            if e.app_id.as_deref().is_some_and(|a| !valid_app_id(a)) {
                return Err(ProtoError::Invalid("bad app id in event".into()));
            }
            if data_len(&e.data) > MAX_APP_DATA || e.result.to_string().len() > MAX_APP_DATA {
                return Err(ProtoError::Invalid("event data too large".into()));
            }
        }
        Body::SetIdentity(u) => u.check()?,
        Body::IdentitySet(a) => {
            if a.hostname.len() > MAX_HOSTNAME
                || a.nics.len() > MAX_IDENTITY_NICS
                || a.nics.iter().any(|n| n.len() > 64)
                || a.hooks.len() > 64
                || a.hooks.iter().any(|h| h.len() > 256)
                || a.errors.len() > MAX_IDENTITY_NICS + 4
                || a.errors.iter().any(|e| e.len() > 1024)
            {
                return Err(ProtoError::Invalid(
                    "identity outcome field too long".into(),
                ));
            }
        }
        Body::Ping | Body::Shutdown { .. } | Body::SetClock { .. } => {}
    }
    Ok(())
}

/// Incremental decoder for a byte stream of frames.
///
/// Feed bytes with [`Decoder::push`], then call [`Decoder::next_frame`] until it returns `None`.
/// Errors are per frame: after one, decoding continues with the next frame.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append bytes read from the port.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held, waiting for the rest of a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, an error for a dropped one, or `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Result<Frame, ProtoError>> {
        // Resynchronise: drop everything before the first possible magic.
        let start = find_magic(&self.buf);
        if start > 0 {
            self.buf.drain(..start);
            return Some(Err(ProtoError::Garbage(start)));
        }
        if self.buf.len() < HEADER_LEN {
            return None;
        }
        let len = u32::from_be_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]) as usize;
        if len > MAX_FRAME_LEN {
            // Drop the magic so the next call scans for the following frame.
            self.buf.drain(..MAGIC.len());
            return Some(Err(ProtoError::TooLarge {
                len,
                max: MAX_FRAME_LEN,
            }));
        }
        if self.buf.len() < HEADER_LEN + len {
            return None;
        }
        let result = decode_body(&self.buf[HEADER_LEN..HEADER_LEN + len]);
        self.buf.drain(..HEADER_LEN + len);
        Some(result)
    }
}

/// Index of the first position where [`MAGIC`] starts, or where a prefix of it ends the buffer;
/// `buf.len()` when there is none.
fn find_magic(buf: &[u8]) -> usize {
    let mut i = 0;
    while i < buf.len() {
        let rest = &buf[i..];
        let n = rest.len().min(MAGIC.len());
        if rest[..n] == MAGIC[..n] {
            return i;
        }
        i += 1;
    }
    buf.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info() -> AgentInfo {
        AgentInfo {
            agent_version: "0.1.0".into(),
            protocol: 1,
            uptime_ms: 1234,
            boot_id: "abc".into(),
        }
    }

    /// File pieces carry any bytes (base64 on the wire), within the piece and path limits.
    #[test]
    fn file_pieces_round_trip_and_are_bounded() {
        let data: Vec<u8> = (0..=255u8).cycle().take(MAX_FILE_CHUNK).collect();
        let put = Body::FilePut(FilePut {
            path: "/usr/bin/drover-agent".into(),
            offset: 7,
            data,
            done: true,
            mode: Some(0o755),
        });
        let bytes = encode(&Frame::new(3, put.clone())).unwrap();
        assert!(bytes.len() <= MAX_FRAME_LEN + HEADER_LEN);
        assert_eq!(decode_body(&bytes[HEADER_LEN..]).unwrap().body, put);
        let bad = |body: Body| {
            let json = serde_json::to_vec(&Frame::new(1, body)).unwrap();
            decode_body(&json).unwrap_err()
        };
        let piece = |path: &str, len: usize| FilePut {
            path: path.into(),
            offset: 0,
            data: vec![0; len],
            done: false,
            mode: None,
        };
        assert!(matches!(
            bad(Body::FilePut(piece("/x", MAX_FILE_CHUNK + 1))),
            ProtoError::Invalid(_)
        ));
        assert!(matches!(
            bad(Body::FilePut(piece("relative", 1))),
            ProtoError::Invalid(_)
        ));
        assert!(matches!(
            bad(Body::FileGet(FileGet {
                path: "/x".into(),
                offset: 0,
                len: MAX_FILE_CHUNK as u32 + 1
            })),
            ProtoError::Invalid(_)
        ));
        let not_b64 = br#"{"v":1,"id":1,"body":{"type":"file_data","data":"!!","size":1,"mode":420,"eof":true}}"#;
        assert!(matches!(
            decode_body(not_b64).unwrap_err(),
            ProtoError::Malformed(_)
        ));
    }

    #[test]
    fn round_trip() {
        let f = Frame::new(7, Body::Hello(info()));
        let bytes = encode(&f).unwrap();
        let mut d = Decoder::new();
        d.push(&bytes);
        assert_eq!(d.next_frame(), Some(Ok(f)));
        assert_eq!(d.next_frame(), None);
    }

    #[test]
    fn garbage_then_frame_resyncs() {
        let f = Frame::new(1, Body::Ping);
        let mut d = Decoder::new();
        d.push(b"xx\x00garbage");
        d.push(&encode(&f).unwrap());
        assert!(matches!(d.next_frame(), Some(Err(ProtoError::Garbage(_)))));
        assert_eq!(d.next_frame(), Some(Ok(f)));
    }

    #[test]
    fn oversized_is_dropped_and_next_frame_survives() {
        let mut d = Decoder::new();
        d.push(&MAGIC);
        d.push(&((MAX_FRAME_LEN as u32) + 1).to_be_bytes());
        d.push(b"junk");
        let f = Frame::new(2, Body::Ping);
        d.push(&encode(&f).unwrap());
        assert!(matches!(
            d.next_frame(),
            Some(Err(ProtoError::TooLarge { .. }))
        ));
        assert!(matches!(d.next_frame(), Some(Err(ProtoError::Garbage(_)))));
        assert_eq!(d.next_frame(), Some(Ok(f)));
    }

    #[test]
    fn malformed_and_unknown_fields_rejected() {
        let bad = br#"{"v":1,"id":1,"body":{"type":"ping"},"extra":1}"#;
        assert!(matches!(decode_body(bad), Err(ProtoError::Malformed(_))));
        let newer = br#"{"v":99,"id":1,"body":{"type":"ping"}}"#;
        assert_eq!(decode_body(newer), Err(ProtoError::Version(99)));
        let empty_exec = br#"{"v":1,"id":1,"body":{"type":"exec","argv":[],"timeout_ms":1}}"#;
        assert!(matches!(
            decode_body(empty_exec),
            Err(ProtoError::Invalid(_))
        ));
    }

    #[test]
    fn requests_and_events_round_trip_and_are_bounded() {
        let req = Frame::new(
            3,
            Body::Request(GuestRequest {
                principal: "backup".into(),
                secret: "s3cret".into(),
                app_id: Some("app-1".into()),
                op: GuestOp::Reconfigure {
                    changes: vec![
                        ConfigChange::SetMemory { bytes: 1 << 30 },
                        ConfigChange::AttachDisk {
                            id: "d2".into(),
                            size: 1 << 26,
                        },
                    ],
                },
                data: Some(serde_json::json!({"k": [1, 2]})),
            }),
        );
        let mut d = Decoder::new();
        d.push(&encode(&req).unwrap());
        assert_eq!(d.next_frame(), Some(Ok(req)));
        let bad_app = br#"{"v":1,"id":1,"body":{"type":"request","principal":"p","secret":"s","app_id":"a b","op":{"op":"list"}}}"#;
        assert!(matches!(decode_body(bad_app), Err(ProtoError::Invalid(_))));
        let no_changes = br#"{"v":1,"id":1,"body":{"type":"request","principal":"p","secret":"s","op":{"op":"reconfigure","changes":[]}}}"#;
        assert!(matches!(
            decode_body(no_changes),
            Err(ProtoError::Invalid(_))
        ));
        let unknown_op = br#"{"v":1,"id":1,"body":{"type":"request","principal":"p","secret":"s","op":{"op":"format_host"}}}"#;
        assert!(matches!(
            decode_body(unknown_op),
            Err(ProtoError::Malformed(_))
        ));
        let big = "x".repeat(MAX_APP_DATA + 1);
        let ev = Frame::new(
            4,
            Body::Event(GuestEvent {
                ticket: "t1".into(),
                app_id: None,
                op: "save".into(),
                status: EventStatus::Completed,
                result: serde_json::Value::Null,
                error: None,
                data: Some(serde_json::Value::String(big)),
            }),
        );
        let bytes = encode(&ev).unwrap();
        assert!(matches!(
            decode_body(&bytes[HEADER_LEN..]),
            Err(ProtoError::Invalid(_))
        ));
    }

    fn request(principal: &str, op: GuestOp) -> Frame {
        Frame::new(
            5,
            Body::Request(GuestRequest {
                principal: principal.into(),
                secret: String::new(),
                app_id: None,
                op,
                data: None,
            }),
        )
    }

    fn round(f: &Frame) -> Result<Frame, ProtoError> {
        decode_body(&encode(f).unwrap()[HEADER_LEN..])
    }

    #[test]
    fn identity_ops_need_no_principal_and_are_bounded() {
        let f = request("", GuestOp::HostIdentity {});
        assert_eq!(round(&f), Ok(f));
        assert!(!GuestOp::HostIdentity {}.needs_grant());
        assert!(GuestOp::List.needs_grant());
        // Ops that need a grant still need a principal.
        assert!(matches!(
            round(&request("", GuestOp::List)),
            Err(ProtoError::Invalid(_))
        ));
        let notice = MigrationNotice {
            old_host_id: "h1".into(),
            new_host_id: "h2.b_c-d".into(),
            old_generation_id: Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into()),
            new_generation_id: None,
            trigger: NoticeTrigger::Scan,
            hooks_run: 1,
            hooks_failed: 0,
        };
        let f = request("", GuestOp::MigrationNotice(notice.clone()));
        assert_eq!(round(&f), Ok(f.clone()));
        let wire = String::from_utf8(encode(&f).unwrap()[HEADER_LEN..].to_vec()).unwrap();
        assert!(wire.contains(r#""op":"migration_notice""#), "{wire}");
        for bad in [
            MigrationNotice {
                new_host_id: "has space".into(),
                ..notice.clone()
            },
            MigrationNotice {
                old_host_id: "x".repeat(MAX_HOST_ID + 1),
                ..notice.clone()
            },
            MigrationNotice {
                new_generation_id: Some("not-a-uuid!".into()),
                ..notice.clone()
            },
        ] {
            assert!(matches!(
                round(&request("", GuestOp::MigrationNotice(bad))),
                Err(ProtoError::Invalid(_))
            ));
        }
        let unknown = br#"{"v":1,"id":1,"body":{"type":"request","principal":"","secret":"","op":{"op":"host_identity","x":1}}}"#;
        assert!(matches!(
            decode_body(unknown),
            Err(ProtoError::Malformed(_))
        ));
        let extra = br#"{"v":1,"id":1,"body":{"type":"request","principal":"","secret":"","op":{"op":"migration_notice","old_host_id":"a","new_host_id":"b","trigger":"scan","hooks_run":0,"hooks_failed":0,"extra":1}}}"#;
        assert!(matches!(decode_body(extra), Err(ProtoError::Malformed(_))));
    }

    #[test]
    fn host_identity_answer_parses_strictly() {
        let good = serde_json::json!({
            "host": {"id": "h1", "serial": "S-1", "model": "Standard PC", "name": "box"},
            "generation_id": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
        });
        let a = HostIdentityAnswer::from_result(&good).unwrap();
        assert_eq!(a.host.id, "h1");
        let mut bad = good.clone();
        bad["host"]["id"] = "".into();
        assert!(HostIdentityAnswer::from_result(&bad).is_err());
        let mut bad = good.clone();
        bad["host"]["model"] = serde_json::Value::String(format!("bell{}", '\u{7}'));
        assert!(HostIdentityAnswer::from_result(&bad).is_err());
        let mut bad = good.clone();
        bad["generation_id"] = "zz".into();
        assert!(HostIdentityAnswer::from_result(&bad).is_err());
        let mut bad = good;
        bad["extra"] = 1.into();
        assert!(HostIdentityAnswer::from_result(&bad).is_err());
    }

    #[test]
    fn migrated_notice_round_trips_and_is_checked() {
        let n = MigratedNotice {
            from: "h1".into(),
            to: "h2".into(),
            downtime_ms: 12,
        };
        let ev = GuestEvent::migrated("m1".into(), &n);
        let f = Frame::new(9, Body::Event(ev.clone()));
        let Ok(Frame {
            body: Body::Event(back),
            ..
        }) = round(&f)
        else {
            panic!("round trip")
        };
        assert_eq!(back.migrated_notice(), Some(Ok(n)));
        let mut other = ev.clone();
        other.op = "save".into();
        assert_eq!(other.migrated_notice(), None);
        let mut bad = ev;
        bad.result["to"] = "no way".into();
        assert!(matches!(bad.migrated_notice(), Some(Err(_))));
    }

    #[test]
    fn encode_refuses_oversized() {
        let f = Frame::new(
            1,
            Body::Error {
                code: "x".into(),
                message: "y".repeat(MAX_FRAME_LEN),
            },
        );
        assert!(matches!(encode(&f), Err(ProtoError::TooLarge { .. })));
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder, and it never holds more than one frame's worth.
        #[test]
        fn decoder_is_total_and_bounded(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..512), 0..32)) {
            let mut d = Decoder::new();
            for c in chunks {
                d.push(&c);
                while let Some(_r) = d.next_frame() {}
                prop_assert!(d.buffered() <= HEADER_LEN + MAX_FRAME_LEN);
            }
        }

        /// Valid frames split at any points decode to themselves, even after garbage.
        #[test]
        fn split_frames_decode(ids in proptest::collection::vec(any::<u64>(), 1..8), split in 1usize..64, garbage in proptest::collection::vec(any::<u8>(), 0..16)) {
            let frames: Vec<Frame> = ids.iter().map(|&id| Frame::new(id, Body::Ack { accepted: id % 2 == 0, reason: None, ticket: None })).collect();
            let mut stream: Vec<u8> = garbage.iter().map(|b| if *b == b'D' { b'x' } else { *b }).collect();
            for f in &frames { stream.extend(encode(f).unwrap()); }
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for chunk in stream.chunks(split) {
                d.push(chunk);
                while let Some(r) = d.next_frame() { if let Ok(f) = r { got.push(f); } }
            }
            prop_assert_eq!(got, frames);
        }
    }

    fn identity() -> IdentityUpdate {
        IdentityUpdate {
            token: "0f3c-aa".into(),
            hostname: Some("web-3".into()),
            machine_id: Some("0123456789abcdef0123456789abcdef".into()),
            nics: vec![NicIdentity {
                old_mac: "52:54:00:12:34:56".into(),
                mac: "52:54:00:ab:cd:ef".into(),
            }],
            reason: "clone of state s1 of web".into(),
        }
    }

    #[test]
    fn identity_updates_are_checked_field_by_field() {
        let ok = identity();
        let frame = Frame::new(9, Body::SetIdentity(ok.clone()));
        let bytes = encode(&frame).unwrap();
        assert_eq!(decode_body(&bytes[HEADER_LEN..]).unwrap(), frame);
        // Only new MACs (a resume with `--nic` but no `--new-identity`): hostname and
        // machine-id are kept.
        let macs_only = IdentityUpdate {
            hostname: None,
            machine_id: None,
            ..ok.clone()
        };
        let frame = Frame::new(10, Body::SetIdentity(macs_only));
        let bytes = encode(&frame).unwrap();
        assert_eq!(decode_body(&bytes[HEADER_LEN..]).unwrap(), frame);
        type Spoil = Box<dyn Fn(&mut IdentityUpdate)>;
        let bad: Vec<(&str, Spoil)> = vec![
            (
                "hostname upper case",
                Box::new(|u| u.hostname = Some("Web".into())),
            ),
            (
                "hostname with a dot",
                Box::new(|u| u.hostname = Some("a.b".into())),
            ),
            (
                "hostname too long",
                Box::new(|u| u.hostname = Some("a".repeat(64))),
            ),
            (
                "hostname ends in -",
                Box::new(|u| u.hostname = Some("a-".into())),
            ),
            (
                "short machine-id",
                Box::new(|u| u.machine_id = Some("abc".into())),
            ),
            (
                "machine-id upper",
                Box::new(|u| u.machine_id = Some("0123456789ABCDEF0123456789abcdef".into())),
            ),
            (
                "mac with a dash",
                Box::new(|u| u.nics[0].mac = "52-54-00-ab-cd-ef".into()),
            ),
            (
                "old mac short",
                Box::new(|u| u.nics[0].old_mac = "52:54:00:ab:cd".into()),
            ),
            ("token with a slash", Box::new(|u| u.token = "../x".into())),
            (
                "reason of two lines",
                Box::new(|u| u.reason = "a\nb".into()),
            ),
            (
                "too many nics",
                Box::new(|u| u.nics = vec![u.nics[0].clone(); MAX_IDENTITY_NICS + 1]),
            ),
        ];
        for (why, spoil) in bad {
            let mut u = identity();
            spoil(&mut u);
            let bytes = encode(&Frame::new(9, Body::SetIdentity(u))).unwrap();
            assert!(
                matches!(
                    decode_body(&bytes[HEADER_LEN..]),
                    Err(ProtoError::Invalid(_))
                ),
                "{why} must be refused"
            );
        }
    }
}
