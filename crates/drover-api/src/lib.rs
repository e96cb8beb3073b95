//! droverd's HTTP/JSON API: the types both sides share, and a client.
//!
//! Routes (all under `/v1` but `/metrics`; `drover-host`'s `api_routes` test checks this table
//! against the router, both ways):
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | `/metrics` |  | OpenMetrics text for Prometheus (not under `/v1`; viewers and up) |
//! | GET | `/openapi.json` |  | this API's OpenAPI 3.1 document (no token or role needed) |
//! | GET | `/events?follow=true&vm=NAME&since=SEQ` |  | NDJSON lines of [`Event`] (viewers and up) |
//! | GET | `/host` |  | [`HostInfo`] |
//! | GET | `/vms` |  | `Vec<VmInfo>` |
//! | POST | `/vms` | [`drover_model::VmSpec`] | [`VmInfo`] |
//! | GET | `/vms/{name}` |  | [`VmInfo`] |
//! | DELETE | `/vms/{name}?force=true&discard_changes=false` |  | [`VmInfo`] (as it was) |
//! | POST | `/vms/{name}/start` | [`StartRequest`] | [`VmInfo`] (QEMU running) |
//! | POST | `/vms/{name}/stop` | [`StopRequest`] | [`VmInfo`] |
//! | POST | `/vms/{name}/restart` | [`StopRequest`] | [`VmInfo`] |
//! | POST | `/vms/{name}/hibernate` |  | [`VmInfo`] (`hibernated`) |
//! | POST | `/vms/{name}/resume` | [`ResumeRequest`] | [`VmInfo`] (running) |
//! | GET | `/vms/{name}/agent?wait_s=N` |  | [`AgentStatus`] (waits up to N s for readiness) |
//! | POST | `/vms/{name}/exec` | [`ExecRequest`] | [`drover_proto::ExecResult`] |
//! | GET | `/vms/{name}/console?offset=N&max=M` |  | bytes; header `x-drover-next-offset` |
//! | GET | `/vms/{name}/console/ws` | WebSocket upgrade (token as subprotocol `bearer.TOKEN` beside `drover.console.v1`) | first a text frame [`ConsoleHello`], then the console's output as binary frames; binary or text frames from the client are typed into the guest (needs `vm.exec`) |
//! | POST | `/vms/{name}/attach` | [`AttachRequest`] | [`ChangeResult`] |
//! | POST | `/vms/{name}/detach` | [`DetachRequest`] | [`ChangeResult`] |
//! | POST | `/vms/{name}/set` | [`SetRequest`] | [`ChangeResult`] |
//! | GET | `/vms/{name}/config` |  | [`ConfigHistoryView`] |
//! | GET | `/vms/{name}/config/diff?from=A&to=B` |  | `Vec<String>` (the changes) |
//! | POST | `/vms/{name}/config/promote` | [`PromoteRequest`] | [`ConfigHistoryView`] (needs `config.persist`) |
//! | POST | `/vms/{name}/config/persist` | [`PersistRequest`] | [`VmInfo`] (needs `config.persist`) |
//! | GET | `/vms/{name}/config/{gen}` |  | [`VmConfig`] |
//! | GET | `/vms/{name}/journal` |  | `Vec<JournalEntry>` |
//! | GET | `/vms/{name}/guest-access` |  | the VM's guest principals |
//! | POST | `/vms/{name}/guest-access` | [`GuestGrantRequest`] | the principal and its secret (shown once) |
//! | DELETE | `/vms/{name}/guest-access/{principal}` |  | the principal (as it was) |
//! | GET | `/vms/{name}/audit` |  | `Vec<AuditEntry>` (guest requests and refused operator changes) |
//! | GET | `/vms/{name}/states` |  | `Vec<StateInfo>` |
//! | POST | `/vms/{name}/states` | [`SnapshotRequest`] | [`StateInfo`] |
//! | GET | `/vms/{name}/states/{state}` |  | [`StateInfo`] |
//! | DELETE | `/vms/{name}/states/{state}` |  | [`StateInfo`] (as it was) |
//! | POST | `/vms/{name}/states/{state}/restore` | [`ResumeRequest`] (optional) | [`VmInfo`] |
//! | POST | `/vms/{name}/states/{state}/check` | [`StateCheckRequest`] | [`StateCheck`] |
//! | GET | `/images` |  | `Vec<DiskImage>` |
//! | POST | `/images` | [`ImageImportRequest`] | [`DiskImage`] (admin) |
//! | GET | `/images/{name}` |  | [`DiskImage`] |
//! | DELETE | `/images/{name}` |  | [`DiskImage`] (as it was; admin; refused while a VM uses it) |
//! | GET | `/vms/{name}/files` | query `path`, `offset`, `len` | the bytes; headers `x-drover-file-size`, `x-drover-file-mode`, `x-drover-eof` |
//! | PUT | `/vms/{name}/files` | query `path`, `offset`, `done`, `mode`; the bytes (≤ 4 MiB) | [`FileWritten`] |
//! | POST | `/vms/{name}/states/{state}/clone` | [`CloneRequest`] | NDJSON progress, then [`CloneResult`] |
//! | POST | `/vms/{name}/migrate` | [`MigrateRequest`] | NDJSON progress, then the result |
//! | POST | `/vms/{name}/migrate/cancel` |  | nothing |
//! | POST | `/migrations/incoming` | [`IncomingRequest`] (droverd to droverd) | [`IncomingReady`] |
//! | POST | `/migrations/{name}/commit` | [`MigrationStep`] (droverd to droverd) |  |
//! | POST | `/migrations/{name}/abort` | [`MigrationStep`] (droverd to droverd) |  |
//! | GET | `/image` |  | [`ImageInfo`] |
//! | POST | `/image/build` | [`ImageBuildRequest`] | NDJSON lines of [`StreamItem<ImageInfo>`] |
//! | POST | `/image/inject-agent` | [`InjectAgentRequest`] | [`AgentInjected`] (admin; the agent package installed offline into a stopped disk) |
//! | GET | `/auth/roles` |  | the granted roles (uid, role) |
//! | POST | `/auth/roles` | a uid and a role (or none) |  |
//! | GET | `/auth/tokens` |  | `Vec<TokenInfo>` |
//! | POST | `/auth/tokens` | [`TokenCreateRequest`] | [`TokenCreated`] (the token, shown once) |
//! | DELETE | `/auth/tokens/{name}` |  | [`TokenInfo`] (as it was) |
//! | GET | `/auth/whoami` |  | [`WhoAmI`] (the caller, its role and permissions; viewers and up) |
//! | GET | `/` |  | the web console's page (not under `/v1`; no token needed to load it) |
//! | GET | `/ui/{file}` |  | the web console's scripts and styles (not under `/v1`) |
//!
//! On the unix socket the caller is the peer's uid; on TCP (HTTPS) it is the holder of the
//! `Authorization: Bearer <token>` header, with the token's role.
//!
//! Errors are [`ApiError`] with a stable [`ErrorCode`]. `GET /v1/openapi.json` describes every
//! route, its types, the permission it needs and its errors; droverd builds its router and that
//! document from the same handlers.

mod client;
mod console;
mod peer;
pub use client::{
    fetch_server_cert, fingerprint, pem_fingerprint, Client, ClientError, Endpoint, RemoteSpec,
};
pub use console::{Console, ConsoleEvent};
pub use hyper::Method;

use drover_model::{Accel, PersistMode, VmConfig};
use serde::{Deserialize, Serialize};

/// The caller of a request as droverd sees it (`GET /v1/auth/whoami`): what the web console
/// shows and which of its buttons it offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WhoAmI {
    /// How journals and errors name the caller (`token ci`, `uid 1000`).
    pub name: String,
    /// Its role (`admin`, `operator`, `viewer`).
    pub role: Option<String>,
    /// The permissions the role holds (`vm.read`, `vm.lifecycle`, `config.change`, `vm.exec`,
    /// `config.persist`, `guest.access`, `admin`).
    pub permissions: Vec<String>,
}

/// The first frame of a console WebSocket (`GET /v1/vms/{name}/console/ws`), as JSON text.
/// Then come the last 64 KiB of the console log (binary), the text frame `{"live":true}`, and
/// from then on output as the guest writes it. Refused input is answered with an
/// [`ApiError`] as a text frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConsoleHello {
    /// The VM.
    pub vm: String,
    /// Whether what the client sends is typed into the guest (the caller holds `vm.exec`).
    pub input: bool,
    /// Why input is off, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// The WebSocket subprotocol of the console stream; a client also offers `bearer.TOKEN` on
/// TCP, since browsers cannot set an `Authorization` header on a WebSocket.
pub const CONSOLE_PROTOCOL: &str = "drover.console.v1";

/// Lifecycle state of a VM as recorded by droverd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// No QEMU process.
    Stopped,
    /// QEMU is being launched.
    Starting,
    /// QEMU is running the guest.
    Running,
    /// A stop is in progress.
    Stopping,
    /// QEMU paused the guest by itself (a disk write failed, e.g. its filesystem is full);
    /// `paused_reason` says why. It runs on once QEMU resumes it.
    Paused,
    /// Saved to disk and stopped (`vm hibernate`): no QEMU, no host memory or CPUs held;
    /// `hibernation` says which state holds it. `vm resume` brings it back from that point.
    Hibernated,
}

impl VmState {
    /// Every state (a new one belongs here too: `/metrics` exports a zero for each).
    pub const ALL: [VmState; 6] = [
        VmState::Stopped,
        VmState::Starting,
        VmState::Running,
        VmState::Stopping,
        VmState::Paused,
        VmState::Hibernated,
    ];

    /// The state's name, as the API and the CLI spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Paused => "paused",
            VmState::Hibernated => "hibernated",
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How and when a VM last stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExitInfo {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// Stable reason: `guest-poweroff`, `operator-stop`, `killed`, `crashed`, `start-failed`,
    /// `exited-while-daemon-down`.
    pub reason: String,
    /// Details (QEMU's shutdown reason, exit status, log tail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The in-guest agent as droverd sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentStatus {
    /// Both guest-channel sockets are connected.
    pub connected: bool,
    /// The agent has answered since QEMU started.
    pub ready: bool,
    /// What it said about itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<drover_proto::AgentInfo>,
    /// Milliseconds from QEMU's start to the agent's first answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_after_ms: Option<u64>,
    /// Something in the guest opened the request port (an agent starting) since QEMU started.
    #[serde(default)]
    pub guest_opened: bool,
    /// No agent seen: the guest's virtio-serial driver has been up a while (or QEMU has run
    /// long) and nothing in the guest ever opened the request port. Cleared if an agent shows
    /// up later.
    #[serde(default)]
    pub none_seen: bool,
}

/// Everything droverd knows about one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmInfo {
    /// Name.
    pub name: String,
    /// State.
    pub state: VmState,
    /// Configuration.
    pub config: VmConfig,
    /// Creation time (unix ms).
    pub created_at_ms: u64,
    /// QEMU's pid while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Accelerator of the running QEMU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<Accel>,
    /// Start time of the running QEMU (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    /// The last exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitInfo>,
    /// Agent status while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentStatus>,
    /// Whether live changes are kept (sealed as a generation at shutdown).
    #[serde(default)]
    pub persist: bool,
    /// How a generation is stored: the whole config, or a diff against the initial config.
    #[serde(default = "default_mode")]
    pub persist_mode: PersistMode,
    /// While running: the configuration QEMU runs now, live changes included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_config: Option<VmConfig>,
    /// While running: what will be sealed at shutdown when it differs from `running_config`
    /// (changes made with `--next-boot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_config: Option<VmConfig>,
    /// While running: where its config came from (`initial`, `generation 3`, `composed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_from: Option<String>,
    /// A migration this VM is part of (or arrived by).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationMark>,
    /// While `paused`: why QEMU paused the guest (e.g. a disk write failed: no space left).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_reason: Option<String>,
    /// The machine type, CPU model and RAM layout it is pinned to (recorded at create; records
    /// from before have the default: `q35`, `-cpu max`, padded RAM, as they always ran).
    #[serde(default)]
    pub platform: drover_model::Platform,
    /// The cluster member this VM is, and the fencing token of its last start (set by a
    /// controller's start; `None` for VMs that are not the cluster's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<Fence>,
    /// While `hibernated`: the state that holds the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hibernation: Option<Hibernation>,
    /// What the last resume with `--new-identity` or `--nic ID,mac=...` changed in the guest
    /// (kept until the next one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityOutcome>,
    /// Disks given as `image=PATH` whose latest data is, since a save, in a layer of droverd's
    /// over the user's image (disk id → that layer); `vm delete` writes it back into the image
    /// (or `--discard-changes`). Shown, never stored.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schema(value_type = BTreeMap<String, String>)]
    pub unwritten: std::collections::BTreeMap<String, std::path::PathBuf>,
    /// For a clone: the template state it came from (whose disk layers it reads) and the
    /// identity it was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<CloneOrigin>,
}

/// Where a clone came from, and the identity droverd gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneOrigin {
    /// The template VM.
    pub vm: String,
    /// The template's state (its id).
    pub state: String,
    /// When it was cloned (ms since the epoch).
    pub at_ms: u64,
    /// The machine-id it was given (its hostname is its name).
    pub machine_id: String,
    /// When its agent confirmed the new identity; `None` until then (droverd sends it again
    /// after a restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_applied_ms: Option<u64>,
}

/// Options of `clone`: new VMs from a saved state of a running template.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    /// The clone's name, or with `count` the stem: `NAME-1` .. `NAME-N`.
    pub name: String,
    /// How many clones (1-64); `None`: one, named `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Only check that the clones can be made (names, state, resources); make nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// One clone made by `clone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CloneOutcome {
    /// Its name (and hostname).
    pub name: String,
    /// QEMU's pid.
    pub pid: Option<u32>,
    /// Its NICs' MAC addresses (NIC id -> MAC).
    pub macs: std::collections::BTreeMap<String, String>,
    /// The machine-id it was given.
    pub machine_id: String,
    /// Milliseconds from the start of this clone to its QEMU running the guest.
    pub running_ms: u64,
    /// Milliseconds from the start of this clone to its agent confirming the new identity
    /// (`None`: it did not, see `identity_error`).
    pub agent_ms: Option<u64>,
    /// `restored.d` hooks that ran in the guest (`name:exit code`).
    #[serde(default)]
    pub hooks: Vec<String>,
    /// Why the identity was not (fully) applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_error: Option<String>,
}

/// The answer of `clone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CloneResult {
    /// The template VM.
    pub template: String,
    /// Its state the clones came from (id).
    pub state: String,
    /// The clones, in order (none for a dry run).
    pub clones: Vec<CloneOutcome>,
    /// The names a dry run checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checked: Vec<String>,
    /// Milliseconds for all of it.
    pub total_ms: u64,
}

/// Options of `resume` and of a state's `restore` (the body of both, all optional): the shape
/// to grow to and the identity to take once the VM runs again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    /// vCPUs to have (added live; no fewer than it was saved with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory to have, in bytes (added live as DIMMs of 128 MiB, within its maximum memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// NICs to give a new MAC: each keeps its id and PCI address; the guest's agent takes the
    /// new address and renews its DHCP lease.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicMac>,
    /// Give the guest a new identity once it runs: hostname (the VM's name), machine-id, SSH
    /// host keys, a DHCP renew; its `restored.d` hooks run, and listening apps hear `restored`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub new_identity: bool,
}

/// One NIC to give a new MAC on resume (`--nic net0,mac=52:54:00:12:34:56`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicMac {
    /// The NIC's id.
    pub id: String,
    /// Its new MAC (unicast, `52:54:00:12:34:56`).
    #[schema(value_type = String)]
    pub mac: drover_model::MacAddr,
}

/// What a resume with a new identity or new MACs did inside the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityOutcome {
    /// What changed (`hostname`, `machine-id`, `mac:eth0`, `ssh-host-keys`).
    #[serde(default)]
    pub changed: Vec<String>,
    /// The `restored.d` hooks that ran, as `name:exit code`.
    #[serde(default)]
    pub hooks: Vec<String>,
    /// Interfaces whose DHCP lease was renewed.
    #[serde(default)]
    pub renewed: Vec<String>,
    /// Why it was not (fully) applied; the VM runs either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where a hibernated VM is: the saved state `vm resume` brings back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Hibernation {
    /// The state's id.
    pub state: String,
    /// Its size on disk (memory and device state).
    pub bytes: u64,
    /// Its directory.
    #[schema(value_type = String)]
    pub dir: std::path::PathBuf,
    /// When it was hibernated (ms since the epoch).
    pub at_ms: u64,
    /// Whether the guest agent answered when it was hibernated: a resume with a new identity
    /// or new MACs needs it.
    #[serde(default)]
    pub agent: bool,
}

/// A cluster controller's claim to start a member on this host: which member, and the etcd
/// revision its assignment was written at (the fencing token). droverd starts it only if the
/// assignment is, right now, to this host at exactly that revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Fence {
    /// The service.
    pub service: String,
    /// The app within it.
    pub app: String,
    /// 1-based replica index.
    pub index: u32,
    /// The assignment's etcd revision.
    pub token: i64,
}

impl Fence {
    /// The VM name of the member (`service-app-index`), as the controller names it.
    pub fn vm_name(&self) -> String {
        format!("{}-{}-{}", self.service, self.app, self.index)
    }
}

/// A VM's part in a migration between hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrationMark {
    /// The migration's id (shared by both hosts).
    pub id: String,
    /// Whether this host sends or receives the VM.
    pub role: MigrationRole,
    /// The other host (its host id).
    pub peer: String,
    /// How far it has come.
    pub phase: MigrationPhase,
}

/// Which side of a migration a host is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MigrationRole {
    /// This host sends the VM.
    Outgoing,
    /// This host receives it.
    Incoming,
}

/// Phases of a migration, as each host records them durably.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    /// Disks and memory are being copied; the source runs the VM.
    Copying,
    /// The source has paused the VM for good and asked the destination to take it over; until
    /// the destination confirms, the VM runs nowhere (never on both).
    HandingOver,
    /// The destination runs the VM and owns it.
    Committed,
}

/// `POST /v1/vms/{name}/migrate`: move a VM to another host.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrateRequest {
    /// The destination droverd (URL, token, trusted certificate).
    pub to: RemoteSpec,
    /// The destination's name as the caller knows it (for messages).
    pub to_name: String,
    /// Both hosts see the VM's disk files at the same paths: do not copy them.
    #[serde(default)]
    pub shared_storage: bool,
    /// The VM is stopped: copy its disks and records, start nothing.
    #[serde(default)]
    pub offline: bool,
    /// Longest pause QEMU may plan for the switch-over (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Bandwidth cap for memory and disks (bytes/s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<u64>,
}

/// Progress of a migration (sent as the text of stream progress items, JSON-encoded).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrateProgress {
    /// `disks`, `memory`, `switch-over`, `handing-over`.
    pub stage: String,
    /// Disk bytes copied so far and in all.
    pub disk_done: u64,
    /// Disk bytes in all.
    pub disk_total: u64,
    /// Memory bytes sent so far.
    pub ram_done: u64,
    /// Guest memory size.
    pub ram_total: u64,
    /// Memory still to send in this pass.
    pub ram_remaining: u64,
    /// Bytes per second the guest dirties.
    pub dirty_rate: u64,
    /// QEMU's expected downtime (ms).
    pub expected_downtime_ms: u64,
}

/// The outcome of a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrateResult {
    /// The VM.
    pub vm: String,
    /// Source host id.
    pub from: String,
    /// Destination host id.
    pub to: String,
    /// The migration id.
    pub id: String,
    /// From the request to the VM running on the destination (ms).
    pub total_ms: u64,
    /// How long the guest was paused, as QEMU measured it (ms); 0 for offline migrations.
    pub downtime_ms: u64,
    /// Memory bytes sent.
    pub ram_bytes: u64,
    /// Disk bytes copied.
    pub disk_bytes: u64,
    /// Whether the VM was stopped (offline migration).
    pub offline: bool,
}

/// One stored row of a VM, carried from host to host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PackedRow {
    /// Table.
    pub table: String,
    /// Key.
    pub key: String,
    /// The value (JSON).
    pub value: serde_json::Value,
}

/// `POST /v1/migrations/incoming` (droverd to droverd): get ready to receive a VM.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IncomingRequest {
    /// Migration id.
    pub id: String,
    /// Source host id.
    pub from: String,
    /// The VM's record (as on the source).
    pub vm: VmInfo,
    /// Its other rows: history, journal, principals, audit, generation id.
    pub rows: Vec<PackedRow>,
    /// Disks stay where they are (same paths on both hosts).
    #[serde(default)]
    pub shared_storage: bool,
    /// The VM is stopped.
    #[serde(default)]
    pub offline: bool,
    /// Files that travel with the VM: its saved states and the disk layers they pin.
    #[serde(default)]
    pub files: Vec<MovedFile>,
    /// vCPUs and DIMMs the running VM has hot-plugged: the destination's QEMU is started with
    /// them (a live migration; empty for an offline one, or a VM never grown live).
    #[serde(default, skip_serializing_if = "drover_model::Plugged::is_empty")]
    pub plugged: drover_model::Plugged,
}

/// A file that travels with a migrating VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MovedFile {
    /// Its path on the source (records that name it are rewritten to the new path).
    pub src: String,
    /// Where it goes, relative to the VM's directory on the destination (`states/s1/memory.bin`,
    /// `layers/...`).
    pub rel: String,
    /// Size in bytes.
    pub size: u64,
    /// A qcow2 disk layer (its backing file is re-pointed on arrival).
    #[serde(default)]
    pub layer: bool,
}

/// The destination's answer: where to send memory and disks.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IncomingReady {
    /// QEMU migration URI (`tcp:HOST:PORT`); empty for offline migrations.
    pub migrate_uri: String,
    /// NBD server address.
    pub nbd_host: String,
    /// NBD server port per disk id (offline: one qemu-nbd each), or one shared port.
    pub nbd_ports: Vec<(String, u16)>,
    /// A qemu-nbd port per moved file (by `rel`), each exporting it raw as `f`.
    #[serde(default)]
    pub file_ports: Vec<(String, u16)>,
}

/// `POST /v1/migrations/{vm}/commit` and `/abort` (droverd to droverd).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrationStep {
    /// Migration id (must match the destination's record).
    pub id: String,
    /// The source's measured downtime (for the guest's `migrated` event).
    #[serde(default)]
    pub downtime_ms: u64,
}

fn default_mode() -> PersistMode {
    PersistMode::Diff
}

/// One element of another generation, for a composed start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ElementFrom {
    /// The generation (0 = the initial config).
    pub generation: u32,
    /// The element (`nic:net1`).
    #[schema(value_type = String)]
    pub element: drover_model::ElementKey,
}

impl std::str::FromStr for ElementFrom {
    type Err = String;

    /// `GEN:KEY`, as `3:nic:net1`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (g, key) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: use GEN:KEY, e.g. 3:nic:net1"))?;
        Ok(ElementFrom {
            generation: g
                .parse()
                .map_err(|_| format!("{s:?}: {g:?} is not a generation number"))?,
            element: key.parse().map_err(|e| format!("{s:?}: {e}"))?,
        })
    }
}

/// Options of `start`: which configuration to boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// Boot this generation (0 = the initial config) instead of the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<u32>,
    /// Leave out these elements (`disk:data2`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub without: Vec<drover_model::ElementKey>,
    /// Take these elements from other generations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub with: Vec<ElementFrom>,
    /// Boot with this many vCPUs instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Boot with this much memory instead, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// Store the composed config as a new generation.
    #[serde(default)]
    pub save_as_generation: bool,
    /// A cluster controller's start: refused unless the member's assignment is to this host at
    /// this token (see [`Fence`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<Fence>,
}

/// A live change: attach a disk or NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    /// The new element's id.
    pub id: String,
    /// What to attach.
    pub device: NewDevice,
    /// Record for the next start instead of changing the running VM.
    #[serde(default)]
    pub next_boot: bool,
}

/// A device to attach, each with only what it takes (`kind` names which).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum NewDevice {
    /// A new, empty qcow2 disk in the VM's directory, removed with the VM.
    NewDisk {
        /// Its size in bytes.
        size: u64,
    },
    /// An existing image (an absolute path the caller may use: in an image pool, or any for
    /// an admin); never removed by droverd.
    Image {
        /// The image file.
        #[schema(value_type = String)]
        path: std::path::PathBuf,
        /// Attach it read-only.
        #[serde(default)]
        readonly: bool,
    },
    /// A NIC on QEMU's user-mode networking.
    Nic {
        /// Its MAC address (a random one in QEMU's 52:54:00 range when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<String>)]
        mac: Option<drover_model::MacAddr>,
        /// Host ports forwarded into the guest (`tcp:8081-:80`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        #[schema(value_type = Vec<String>)]
        forwards: Vec<drover_model::PortForward>,
    },
}

/// A live change: remove a disk or NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DetachRequest {
    /// Element id.
    pub id: String,
    /// Record for the next start instead of changing the running VM.
    #[serde(default)]
    pub next_boot: bool,
}

/// A live change: vCPUs and/or memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetRequest {
    /// New vCPU count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// New memory size, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// Record for the next start instead of changing the running VM.
    #[serde(default)]
    pub next_boot: bool,
}

/// What a change did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChangeResult {
    /// The VM after the change.
    pub vm: VmInfo,
    /// `live` (applied to the running VM), `next-boot` (recorded for the next start) or
    /// `config` (the VM is stopped: its next start uses it).
    pub applied: String,
    /// One line per element changed.
    pub changes: Vec<String>,
    /// Something the operator should know (persistence off, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// A VM's configuration history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConfigHistoryView {
    /// VM name.
    pub name: String,
    /// Whether live changes are kept.
    pub persist: bool,
    /// How generations are stored.
    pub persist_mode: PersistMode,
    /// What a plain `start` boots (0 = the initial config).
    pub default_start: u32,
    /// The generations, oldest first; generation 0 is the initial config.
    pub generations: Vec<GenerationView>,
}

/// One stored generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GenerationView {
    /// Its id (0 = the initial config).
    pub id: u32,
    /// When it was stored (unix ms).
    pub created_at_ms: u64,
    /// Who stored it.
    pub who: String,
    /// Why.
    pub why: String,
    /// `initial`, `snapshot` or `diff`.
    pub kind: String,
    /// How it differs from the initial config, one line per element.
    pub changes: Vec<String>,
    /// The config it yields.
    pub config: VmConfig,
}

/// Set the persistence flag or mode.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PersistRequest {
    /// On or off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Snapshot or diff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<PersistMode>,
}

/// Promote a generation to be the initial config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// The generation.
    pub generation: u32,
}

/// A saved VM state: device state, memory, pinned disk layers and the config it ran with.
/// Stored as `manifest.json` beside its sections; the format is versioned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StateInfo {
    /// Manifest format ([`STATE_FORMAT`]); newer ones are refused, not misread.
    pub format: u32,
    /// Id within the VM (`s1`, `s2`, ...).
    pub id: String,
    /// Name given at save (defaults to the id).
    pub name: String,
    /// The VM.
    pub vm: String,
    /// When (unix ms).
    pub created_at_ms: u64,
    /// Who asked (`uid 0`, `guest:backup`).
    pub created_by: String,
    /// `fast` (RAM file + x-ignore-shared) or `classic` (RAM in the migration stream).
    pub mode: String,
    /// The config the VM ran with. Its disks name their origins (format 2 on); the layers this
    /// state pins are in `layers`.
    pub config: VmConfig,
    /// Disk id → the qcow2 layer this state pins (read-only from the save on).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schema(value_type = BTreeMap<String, String>)]
    pub layers: std::collections::BTreeMap<String, std::path::PathBuf>,
    /// Device state (and, for classic saves, RAM).
    pub devices: StateSection,
    /// Guest RAM (fast saves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<StateSection>,
    /// How long the VM was paused, in milliseconds.
    pub paused_ms: u64,
    /// How a fast save captured the memory: `copy` or `stream` (absent for classic saves and
    /// states saved before this was kept, which streamed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<Capture>,
    /// How far the save has come. A fast save answers once the guest runs again; its memory is
    /// still being captured and written to disk behind it.
    #[serde(default)]
    pub phase: StatePhase,
    /// Why the save failed after it was answered (phase `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// For a save asked from inside the guest: the request's ticket, app and data, re-announced
    /// as completed when this state is restored (the instance that asked is gone by then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_save: Option<GuestSaveNote>,
    /// The QEMU and machine it was saved on (absent from states saved before this was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_on: Option<SavedOn>,
    /// vCPUs and DIMMs the VM had hot-plugged when it was saved: a restore makes them again
    /// (its config is the whole shape, boot shape plus these). Absent when it had none.
    #[serde(default, skip_serializing_if = "drover_model::Plugged::is_empty")]
    pub plugged: drover_model::Plugged,
}

/// Where a state was saved: what a QEMU must offer to load it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SavedOn {
    /// The QEMU version (`7.2.22`).
    pub qemu_version: String,
    /// The versioned machine type the state's devices belong to (`pc-q35-7.2`), the alias
    /// resolved where the VM was not pinned.
    pub machine: String,
    /// The CPU model (`Westmere`, `max`).
    pub cpu: String,
    /// How a classic save's RAM was written: `mapped-ram` (QEMU >= 9.0), or absent for QEMU's
    /// migration stream; a restore reads it the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_stream: Option<String>,
    /// The accelerator it ran under (absent from states saved before this was kept): a TCG
    /// state's CPU state does not load under KVM, nor the reverse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<Accel>,
    /// The id of the host it was saved on (`drover host info`'s identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// An imported disk image (`drover image import`): VMs get thin copies of it
/// (`vm create --disk from=NAME`), and it is never written to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiskImage {
    /// Its name.
    pub name: String,
    /// Its file in droverd's state dir (a standalone qcow2).
    #[schema(value_type = String)]
    pub file: std::path::PathBuf,
    /// The guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes on disk.
    pub bytes: u64,
    /// Where it was imported from.
    pub source: String,
    /// The source's format (`qcow2`, `raw`).
    pub source_format: String,
    /// When (ms since the epoch).
    pub imported_at_ms: u64,
    /// The VMs whose disks are thin copies of it.
    #[serde(default)]
    pub used_by: Vec<String>,
    /// How to boot it, for an image built by `drover image build --distro` (`vm create
    /// --from-image` uses it); `None` for an imported file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<ImageBoot>,
    /// The build's input key, for a built image: a rebuild with other inputs refreshes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_key: Option<String>,
}

/// `drover image inject-agent TARGET`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InjectAgentRequest {
    /// An imported image's name, or a disk file's absolute path on the host.
    pub target: String,
    /// The caller vouches for the disk: injecting mounts it on the host and runs its own
    /// programs (dpkg's maintainer scripts) as root. Not needed for an image droverd built.
    #[serde(default)]
    pub trusted: bool,
}

/// What `drover image inject-agent` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentInjected {
    /// As asked.
    pub target: String,
    /// The disk file written (a standalone qcow2 now).
    #[schema(value_type = String)]
    pub file: std::path::PathBuf,
    /// The agent package's version now installed.
    pub version: String,
    /// The version it replaced, if one was installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced: Option<String>,
    /// The partition holding the root file system (`None`: the whole disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// The file's size now.
    pub bytes: u64,
}

/// The kernel, initrd and command line an image boots with (copies kept beside the image).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageBoot {
    /// The kernel (`--kernel`).
    #[schema(value_type = String)]
    pub kernel: std::path::PathBuf,
    /// The initrd (`--initrd`).
    #[schema(value_type = String)]
    pub initrd: std::path::PathBuf,
    /// The kernel command line (`--cmdline`).
    pub cmdline: String,
}

/// `drover image import NAME FILE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageImportRequest {
    /// The name to give it (1-64 of a-z, 0-9, '.', '_', '-').
    pub name: String,
    /// The file on the host (qcow2 or raw; a qcow2's backing chain is folded in).
    #[schema(value_type = String)]
    pub path: std::path::PathBuf,
}

/// The answer to a piece of `drover vm cp` into a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FileWritten {
    /// The guest path.
    pub path: String,
    /// Bytes of the file written so far.
    pub written: u64,
    /// The file is complete and in place.
    pub done: bool,
}

/// What to check a saved state against (`drover snapshot check`): a target host and the shape
/// to resume as.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StateCheckRequest {
    /// The target host, as its `GET /v1/host` answered (the CLI asks it for `--on REMOTE`);
    /// absent: this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Box<HostInfo>>,
    /// The target's name, for messages (a remote's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_name: Option<String>,
    /// vCPUs to resume with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory to resume with, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// NICs to give a new MAC (as a resume's or restore's `--nic ID,mac=MAC`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicMac>,
    /// Whether the resume or restore asks for a new identity (needs the guest agent).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub new_identity: bool,
}

/// Whether a saved state fits a target, difference by difference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StateCheck {
    /// The VM.
    pub vm: String,
    /// The state's id.
    pub state: String,
    /// The target host's name (`here` for the host that answered).
    pub target: String,
    /// No difference blocks: the state can be restored there as asked.
    pub fits: bool,
    /// Every aspect compared, the same ones included.
    pub differences: Vec<Difference>,
}

/// One aspect of a saved state compared with a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Difference {
    /// What is compared (`qemu`, `machine`, `cpu-model`, `accelerator`, `vcpus`, ...).
    pub what: String,
    /// The state's value.
    pub saved: String,
    /// The target's (or the asked) value.
    pub target: String,
    /// Whether it matters.
    pub verdict: Verdict,
    /// What happens about it, or why it blocks.
    pub note: String,
}

/// How a difference between a state and its target is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Nothing differs.
    Same,
    /// Differs, and is adapted on the way (loaded as saved, then changed live).
    Adaptable,
    /// Differs so that the state cannot be restored there.
    Blocking,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Same => "same",
            Verdict::Adaptable => "adaptable",
            Verdict::Blocking => "blocking",
        })
    }
}

/// How far a saved state has come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StatePhase {
    /// The point in time is fixed and the guest runs on; its memory is still being streamed out.
    /// A restore of it waits until it is ready.
    Capturing,
    /// Complete and restorable; memory still only in RAM (/dev/shm), being written to disk.
    Ready,
    /// Complete, on disk and synced: survives a host reboot.
    #[default]
    Durable,
    /// The capture failed after the save was answered (see `failure`); not restorable.
    Failed,
}

impl StatePhase {
    /// The phase as shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            StatePhase::Capturing => "capturing",
            StatePhase::Ready => "ready",
            StatePhase::Durable => "durable",
            StatePhase::Failed => "failed",
        }
    }
}

/// Current state manifest format. 2: `config` names disks by origin, `layers` holds the pinned
/// layers (format 1 named them in `config`; droverd migrates those once at start).
pub const STATE_FORMAT: u32 = 2;

/// One stored part of a state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StateSection {
    /// File name inside the state's directory.
    pub file: String,
    /// Size in bytes.
    pub bytes: u64,
    /// sha256, hex; `None` while it is still being computed (large memory files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// What a guest save remembers of its request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GuestSaveNote {
    /// The ticket.
    pub ticket: String,
    /// The app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    /// Its data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

/// Save a VM's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// A name (1-64 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Put RAM in the migration stream instead of copying the RAM file (for comparison).
    #[serde(default)]
    pub classic: bool,
    /// How a fast save captures the guest's memory (ignored with `classic`).
    #[serde(default)]
    pub capture: Capture,
}

/// How a fast save captures the guest's memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Capture {
    /// `copy` when this host copies the guest's memory within about a second, else `stream`.
    #[default]
    Auto,
    /// Pause the guest while its memory is copied: the state is restorable when the save
    /// answers; the pause grows with the memory the guest has touched (about 0.4 s per GiB).
    Copy,
    /// Pause the guest only for its device state (~0.1 s at any size), then stream its memory
    /// out while it runs (writes are slower meanwhile); restorable once the stream is done.
    Stream,
}

impl std::fmt::Display for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Capture::Auto => "auto",
            Capture::Copy => "copy",
            Capture::Stream => "stream",
        })
    }
}

/// Restore a saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// State id or name.
    pub state: String,
}

/// Grant a guest principal access to a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GuestGrantRequest {
    /// Principal name (what apps in the guest pass as DROVER_PRINCIPAL).
    pub principal: String,
    /// Ops it may ask for: reconfigure, save, list, restore, host-info.
    pub ops: Vec<String>,
}

/// A granted principal with its secret, shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GuestGrant {
    /// Principal.
    pub principal: String,
    /// The secret, in clear, only in this answer (droverd keeps a hash).
    pub secret: String,
    /// Allowed ops.
    pub ops: Vec<String>,
}

/// A guest principal as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GuestPrincipal {
    /// Principal.
    pub principal: String,
    /// Allowed ops.
    pub ops: Vec<String>,
    /// When granted (unix ms).
    pub created_at_ms: u64,
    /// By whom.
    pub created_by: String,
}

/// One audited guest request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Order.
    pub seq: u64,
    /// When (unix ms).
    pub at_ms: u64,
    /// The principal named in the request.
    pub principal: String,
    /// The op.
    pub op: String,
    /// The app id, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    /// The ticket, when accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    /// `accepted`, `refused`, `completed`, `failed`.
    pub outcome: String,
    /// Why (refusals, failures) or what (completions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One journaled change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JournalEntry {
    /// Sequence number within the VM.
    pub seq: u64,
    /// When (unix ms).
    pub at_ms: u64,
    /// Who asked (`uid 0`, `guest:backup`).
    pub who: String,
    /// What changed, one line per element.
    pub changes: Vec<String>,
    /// `live`, `next-boot`, `config`, `sealed generation N`, `promoted N`, `persist on`, ...
    pub kind: String,
}

/// How to stop a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StopRequest {
    /// Seconds for the graceful steps (agent, then ACPI) before QEMU is killed.
    #[serde(default = "default_stop_timeout")]
    pub timeout_s: u64,
    /// Skip the graceful steps.
    #[serde(default)]
    pub force: bool,
}

/// Default graceful-stop budget.
pub fn default_stop_timeout() -> u64 {
    30
}

impl Default for StopRequest {
    fn default() -> Self {
        StopRequest {
            timeout_s: default_stop_timeout(),
            force: false,
        }
    }
}

/// A command to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExecRequest {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Standard input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Seconds before the agent kills it.
    #[serde(default = "default_exec_timeout")]
    pub timeout_s: u64,
}

/// Default exec timeout.
pub fn default_exec_timeout() -> u64 {
    60
}

/// The host as `drover host info` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostInfo {
    /// droverd's version.
    pub daemon_version: String,
    /// Host name.
    pub hostname: String,
    /// Accelerator VMs get by default.
    pub accel: Accel,
    /// Why.
    pub accel_reason: String,
    /// QEMU binary.
    pub qemu_binary: String,
    /// Its version.
    pub qemu_version: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// Total memory, bytes.
    pub memory_total: u64,
    /// Available memory, bytes.
    pub memory_available: u64,
    /// State directory.
    pub state_dir: String,
    /// Size of the state directory's filesystem, bytes.
    pub disk_total: u64,
    /// Free space there, bytes.
    pub disk_free: u64,
    /// VMs defined.
    pub vms_defined: u32,
    /// VMs running.
    pub vms_running: u32,
    /// Memory given to running VMs, bytes.
    pub memory_allocated: u64,
    /// The host's component id (id, serial, model, name): what its guests read as their host.
    /// Absent from daemons older than the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<drover_proto::HostIdentity>,
    /// What droverd's QEMU can do, probed once at start (absent when the probe failed, or from
    /// daemons older than the field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<QemuFacts>,
}

/// What a host's QEMU can do (`drover host info`): the probe droverd ran at start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QemuFacts {
    /// Version (`10.0.2`).
    pub version: String,
    /// The distribution's package version.
    #[serde(default)]
    pub package: String,
    /// The installation's prefix (`droverd --qemu-dir`); absent for the system's QEMU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// `qemu-img` and `qemu-nbd` of the same installation.
    #[serde(default)]
    pub qemu_img: String,
    /// See `qemu_img`.
    #[serde(default)]
    pub qemu_nbd: String,
    /// Firmware directory.
    #[serde(default)]
    pub firmware_dir: String,
    /// Versioned q35 machine types.
    pub machines: Vec<String>,
    /// What each alias means here (`q35` → `pc-q35-10.0`).
    #[serde(default)]
    pub machine_aliases: std::collections::BTreeMap<String, String>,
    /// CPU models usable as they are under this host's accelerator.
    pub cpu_models: Vec<String>,
    /// Migration capabilities.
    pub migration_capabilities: Vec<String>,
    /// QMP commands in its schema.
    #[serde(default)]
    pub qmp_commands: usize,
    /// What a VM created now is pinned to.
    #[serde(default)]
    pub new_vm_platform: drover_model::Platform,
    /// Version-specific behaviour in force, one line each.
    #[serde(default)]
    pub quirks: Vec<String>,
    /// How long the probe took (ms).
    #[serde(default)]
    pub probe_ms: u64,
}

/// The default guest image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageInfo {
    /// Image directory.
    pub dir: String,
    /// ELF kernel.
    pub kernel: String,
    /// Initramfs.
    pub initrd: String,
    /// Everything the builder recorded (inputs, sizes, build time).
    pub manifest: serde_json::Value,
    /// A distribution image's root disk (copy it per VM); `None` for the default image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// The kernel command line to boot a distribution image with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// A distribution image's disk image (`vm create --from-image NAME`), as imported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<DiskImage>,
    /// Why that image was left as it was (VMs use it), when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Ask for an image build.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageBuildRequest {
    /// Rebuild even if the inputs are unchanged.
    #[serde(default)]
    pub force: bool,
    /// A distribution image (`debian-12`) instead of the default busybox one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distro: Option<String>,
}

/// Ask for a new API token for TCP callers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenCreateRequest {
    /// `admin`, `operator` or `viewer`.
    pub role: String,
    /// A name to list and revoke it by (default: chosen by droverd).
    #[serde(default)]
    pub name: Option<String>,
}

/// A token as droverd keeps it: never the token itself, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenInfo {
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: String,
    /// The first hex digits of sha256(token), to tell tokens apart.
    pub sha256_prefix: String,
}

/// A new token: `token` is shown this once and stored only hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenCreated {
    /// The bearer token.
    pub token: String,
    /// What droverd recorded.
    #[serde(flatten)]
    pub info: TokenInfo,
}

/// One line of a streamed (NDJSON) answer: progress, then a result or an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StreamItem<T> {
    /// A step of a long operation.
    Progress(String),
    /// The outcome.
    Result(T),
    /// The failure.
    Error(ApiError),
}

/// Stable error codes for scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The VM (or other object) does not exist.
    NotFound,
    /// The name is taken.
    AlreadyExists,
    /// The request is malformed or a value is out of range.
    InvalidArgument,
    /// The object is in the wrong state for this (running, stopped, busy).
    Conflict,
    /// The host cannot give what is asked.
    InsufficientResources,
    /// The guest agent is not connected or did not answer.
    AgentUnavailable,
    /// The operation did not finish in time.
    Timeout,
    /// The default guest image is not built.
    ImageMissing,
    /// The caller lacks the permission.
    Forbidden,
    /// A TCP caller gave no bearer token, or one droverd does not know.
    Unauthenticated,
    /// Another host (a migration's destination) could not be reached.
    PeerUnreachable,
    /// The request body is larger than this route takes.
    TooLarge,
    /// Too many failed attempts (wrong tokens) from this address; wait and try again.
    TooManyRequests,
    /// Something failed inside droverd.
    Internal,
}

impl ErrorCode {
    /// The HTTP status for this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::NotFound => 404,
            ErrorCode::AlreadyExists | ErrorCode::Conflict => 409,
            ErrorCode::InvalidArgument => 400,
            ErrorCode::Forbidden => 403,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::PeerUnreachable => 502,
            ErrorCode::TooLarge => 413,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::InsufficientResources => 507,
            ErrorCode::AgentUnavailable => 503,
            ErrorCode::Timeout => 504,
            ErrorCode::ImageMissing => 424,
            ErrorCode::Internal => 500,
        }
    }
}

/// An error answer.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error, utoipa::ToSchema,
)]
#[error("{message}")]
pub struct ApiError {
    /// Stable code.
    pub code: ErrorCode,
    /// One line a person can act on.
    pub message: String,
}

impl ApiError {
    /// Build one.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

/// One line of `GET /v1/events` (and of `drover events`): something that happened to a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Increasing across the host's events (and across droverd restarts); give the last one
    /// you saw as `?since=` to catch up after a reconnect. `0` on a `lagged` line.
    pub seq: u64,
    /// When (unix ms).
    pub at_ms: u64,
    /// When, as RFC 3339 in UTC (`2026-12-01T15:47:03.123Z`).
    pub time: String,
    /// The VM (absent on a `lagged` line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// What happened.
    pub kind: EventKind,
    /// More about it, by kind: `stopped`/`exited` carry `reason` (and `detail`), `started`
    /// carries `from` (the config it booted), `state-saved`/`restored` carry `state` (its id),
    /// `migrated` carries `direction` (`out` or `in`) and `peer`, `lagged` carries `missed`.
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

/// Kinds of [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// The VM was defined.
    Created,
    /// QEMU runs it (a start, a restart's second half).
    Started,
    /// It stopped because someone asked (`vm stop`, `vm restart`).
    Stopped,
    /// It stopped by itself: the guest powered off, QEMU crashed or was killed.
    Exited,
    /// A saved state (a snapshot) was taken.
    StateSaved,
    /// It runs again from a saved state.
    Restored,
    /// It moved between hosts (sent from here, or arrived here).
    Migrated,
    /// It was saved to disk and stopped.
    Hibernated,
    /// It runs again from its hibernation.
    Resumed,
    /// It was deleted.
    Deleted,
    /// Not about a VM: this follower fell too far behind and its stream ends here.
    Lagged,
}

impl EventKind {
    /// Every kind.
    pub const ALL: [EventKind; 11] = [
        EventKind::Created,
        EventKind::Started,
        EventKind::Stopped,
        EventKind::Exited,
        EventKind::StateSaved,
        EventKind::Restored,
        EventKind::Migrated,
        EventKind::Hibernated,
        EventKind::Resumed,
        EventKind::Deleted,
        EventKind::Lagged,
    ];

    /// The kind's name, as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Started => "started",
            EventKind::Stopped => "stopped",
            EventKind::Exited => "exited",
            EventKind::StateSaved => "state-saved",
            EventKind::Restored => "restored",
            EventKind::Migrated => "migrated",
            EventKind::Hibernated => "hibernated",
            EventKind::Resumed => "resumed",
            EventKind::Deleted => "deleted",
            EventKind::Lagged => "lagged",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_names_elements_of_other_generations_as_structured_values() {
        let w: ElementFrom = "3:nic:net1".parse().expect("parses");
        assert_eq!(w.generation, 3);
        assert_eq!(w.element.to_string(), "nic:net1");
        assert!("nic:net1".parse::<ElementFrom>().is_err());
        assert!("3:nonsense".parse::<ElementFrom>().is_err());
        let req: StartRequest = serde_json::from_value(serde_json::json!({
            "without": ["disk:data2"],
            "with": [{"generation": 1, "element": "nic:net1"}],
            "memory": 335544320u64,
        }))
        .expect("a typed start");
        assert_eq!(req.with, vec!["1:nic:net1".parse().expect("parses")]);
        assert_eq!(req.memory, Some(320 << 20));
        // A malformed element is refused where it is read, not deep in the daemon.
        assert!(
            serde_json::from_value::<StartRequest>(serde_json::json!({"without": ["disk"]}))
                .is_err()
        );
    }
}
