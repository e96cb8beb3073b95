//! Command lines of `drover-agent` and `drover-guest` (the same binary).

use std::io::Read as _;
use std::path::{Path, PathBuf};

use clap::{ArgGroup, Args, Parser, Subcommand};
use drover_proto::ConfigChange;

/// Default path of port A, as `/init` links it.
pub const DEFAULT_PORT_A: &str = "/dev/virtio-ports/org.drover.req";
/// Default path of port B, as `/init` links it.
pub const DEFAULT_PORT_B: &str = "/dev/virtio-ports/org.drover.evt";
/// Where evdev nodes (the ACPI power button) appear.
pub const DEFAULT_INPUT_DIR: &str = "/dev/input";
/// Environment variable naming the guest principal.
pub const ENV_PRINCIPAL: &str = "DROVER_PRINCIPAL";
/// Environment variable holding the principal's secret.
pub const ENV_SECRET: &str = "DROVER_SECRET";
/// Default seconds `drover-guest` waits for an outcome.
pub const DEFAULT_WAIT_SECS: u64 = 300;
/// Most bytes read from a `--secret-file` (far more than any secret; a guard against `/dev/zero`).
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// The in-guest agent: serves the host over the guest channel.
#[derive(Debug, Parser)]
#[command(name = "drover-agent", version)]
pub struct AgentCli {
    /// Port A device (guest → host requests).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_PORT_A)]
    pub port_a: PathBuf,
    /// Port B device (host → guest commands).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_PORT_B)]
    pub port_b: PathBuf,
    /// Directory scanned for `event*` input devices (the ACPI power button).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_INPUT_DIR)]
    pub input_dir: PathBuf,
    /// The socket apps talk to (see `drover-guest --help`).
    #[arg(long, value_name = "PATH", default_value = crate::app::DEFAULT_SOCKET)]
    pub app_socket: PathBuf,
    /// Sysfs root scanned for offline (hot-plugged) CPUs and memory, which are onlined.
    #[arg(long, value_name = "DIR", default_value = crate::hotplug::DEFAULT_SYSFS)]
    pub sysfs: PathBuf,
    /// Run a `drover-guest` command instead of the agent.
    #[command(subcommand)]
    pub command: Option<AgentCommand>,
}

/// Subcommands of `drover-agent`.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Act as `drover-guest` (the same as invoking the binary under that name).
    Guest(GuestCli),
}

const GUEST_ABOUT: &str =
    "Ask the host for things from inside the VM, through the local drover-agent.";

const GUEST_LONG_ABOUT: &str = "\
Ask the host for things from inside the VM, through the local drover-agent.

Requests are asynchronous: the host acknowledges at once (accepted with a ticket, or refused with a
reason) and reports the outcome later as an event. Without --wait the command prints the ticket and
exits; with --wait it stays for the event and prints it. Nothing in the guest ever blocks on the
host beyond that first acknowledgement.

Requests act as a guest principal that a host administrator granted to this VM. Give its name and
secret in DROVER_PRINCIPAL and DROVER_SECRET, or with --principal NAME and --secret-file PATH (the
file's first line is the secret).

An --app-id names your app; every event for it reaches `drover-guest listen --app-id ID`, even
after the VM was saved and restored (where no request is pending any more). --data JSON is handed
back with the outcome, so an app can carry its own context across a restore.

`host-id` and `scan` need no principal: the host that runs the VM answers them for anyone in the
guest (what they reveal is no secret), within the host's rate limit.

Exit codes: 0 done (accepted, or completed with --wait), 1 usage or bad input, 2 refused by the
host (reason on stderr), 3 completed with status failed (error on stderr), 4 agent not reachable,
host did not acknowledge, or timed out waiting, 5 `scan` only: the VM moved to another host (or
was restored) during the scan, RC_INCONSISTENT_OUTPUT (the inventory is discarded; stdout has the
old and new host ids as JSON).";

const GUEST_EXAMPLES: &str = "\
Examples:
  export DROVER_PRINCIPAL=ops DROVER_SECRET=...
  drover-guest reconfigure --cpus 4 --memory 2G --wait
  drover-guest reconfigure --add-disk scratch:10G --add-nic net2
  drover-guest save --name before-upgrade --app-id upgrader --data '{\"step\":3}'
  drover-guest listen --app-id upgrader
  drover-guest list
  drover-guest host-id
  drover-guest scan --repeat-if-migrated --notify-if-migrated
  drover-guest help reconfigure";

/// The in-guest CLI for apps and operators inside the VM.
#[derive(Debug, Parser)]
#[command(
    name = "drover-guest",
    version,
    about = GUEST_ABOUT,
    long_about = GUEST_LONG_ABOUT,
    after_help = GUEST_EXAMPLES
)]
pub struct GuestCli {
    /// What to do.
    #[command(subcommand)]
    pub command: GuestCommand,
}

/// Subcommands of `drover-guest`.
#[derive(Debug, Subcommand)]
pub enum GuestCommand {
    /// Print this guest's agent information as JSON (read locally; the host is not asked).
    Status,
    /// Change this VM's CPUs, memory, disks or NICs (live where possible).
    ///
    /// The changes go to the host as one request, applied all or nothing, in this order: detach,
    /// cpus, memory, add-disk, add-nic. Hot-plugged CPUs and memory are brought online by the agent.
    #[command(after_help = "\
Examples:
  drover-guest reconfigure --cpus 4 --wait
  drover-guest reconfigure --memory 4G
  drover-guest reconfigure --add-disk data2:20G --add-disk logs:512M --wait
  drover-guest reconfigure --add-nic net1
  drover-guest reconfigure --detach data2 --wait")]
    Reconfigure(ReconfigureArgs),
    /// Save this VM's state (the host keeps it under a name).
    #[command(after_help = "\
Examples:
  drover-guest save --name nightly --wait
  drover-guest save --app-id backup --data '{\"job\":42}'   # the outcome reaches `listen --app-id backup`")]
    Save(SaveArgs),
    /// Restore a saved state of this VM.
    ///
    /// If it works, the guest continues from the saved state, where this command never ran: with
    /// --wait you only hear of a failure. Listen with --app-id in the restored guest to hear of
    /// success.
    #[command(after_help = "\
Examples:
  drover-guest restore nightly
  drover-guest restore nightly --app-id upgrader --data '{\"restored_from\":\"upgrade\"}'")]
    Restore(RestoreArgs),
    /// List this VM's saved states (waits for the answer; prints its result as JSON).
    #[command(
        after_help = "Example:\n  drover-guest list --principal ops --secret-file /etc/drover/secret"
    )]
    List(ListArgs),
    /// Show the host facts this VM may see (waits; prints the result as JSON).
    #[command(after_help = "Example:\n  drover-guest host-info")]
    HostInfo(ListArgs),
    /// Print every event for an app id as one JSON line each, as they come, until interrupted.
    ///
    /// Needs no credentials. Reconnects if the agent restarts (events in between are lost).
    #[command(after_help = "\
Example:
  drover-guest listen --app-id backup | while read -r ev; do echo \"got $ev\"; done")]
    Listen(ListenArgs),
    /// Print the identity of the host running this VM (id, serial, model, name) and the VM's
    /// generation id, as JSON. Needs no principal.
    ///
    /// The host that runs the VM answers, so the id changes when the VM is migrated; the
    /// generation id changes when the VM is restored from a saved state or cloned.
    #[command(after_help = "Example:\n  drover-guest host-id")]
    HostId(HostIdArgs),
    /// Inventory this VM (CPUs, memory, disks, NICs, DMI, kernel) safely across migrations.
    ///
    /// Reads the host id, scans, reads the host id again. Unchanged: prints the inventory as one
    /// JSON line and exits 0. Changed (the VM moved, or was restored, meanwhile): the inventory may
    /// mix two machines and is discarded; prints RC_INCONSISTENT_OUTPUT on stderr and the old and
    /// new host ids as JSON on stdout, and exits 5.
    ///
    /// --notify-if-migrated runs every executable in /etc/drover/hooks/migrated.d/ in name order
    /// (each at most 30 s; environment DROVER_OLD_HOST_ID, DROVER_NEW_HOST_ID,
    /// DROVER_OLD_GENERATION_ID, DROVER_NEW_GENERATION_ID, DROVER_MIGRATION_TRIGGER) and tells the
    /// host, which records it in the VM's audit trail (`drover vm audit VM` on the host, op
    /// migration-notice). Once per change: the agent runs the same hooks by itself when it notices a
    /// move (a pushed `migrated` event, a new host id or generation id), and whichever of the two
    /// comes first runs them; the other finds the change handled (recorded in /run/drover).
    /// Needs no principal.
    #[command(after_help = "\
Examples:
  drover-guest scan > inventory.json || echo \"scan failed: $?\"
  drover-guest scan --repeat-if-migrated=5 --notify-if-migrated")]
    Scan(ScanArgs),
}

/// `drover-guest host-id`.
#[derive(Debug, Clone, Args)]
pub struct HostIdArgs {
    /// The agent's app socket.
    #[arg(long, value_name = "PATH", default_value = crate::app::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Seconds to keep asking while the agent has no host (droverd restarting, VM moving).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub timeout: u64,
}

/// `drover-guest scan`.
#[derive(Debug, Clone, Args)]
pub struct ScanArgs {
    /// Scan again when the host changed, at most N more times (default 3).
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "3",
          value_parser = clap::value_parser!(u32).range(1..=20))]
    pub repeat_if_migrated: Option<u32>,
    /// When the host changed, run the hooks in /etc/drover/hooks/migrated.d/ and tell the host.
    #[arg(long)]
    pub notify_if_migrated: bool,
    /// The agent's app socket.
    #[arg(long, value_name = "PATH", default_value = crate::app::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Seconds each read of the host id may take while the agent has no host.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub timeout: u64,
    /// For tests: sleep this many milliseconds between the inventory and the second read of the
    /// host id, widening the window for a migration (also $DROVER_SCAN_PAUSE_MS).
    #[arg(long, value_name = "MS", hide = true)]
    pub pause_between: Option<u64>,
}

/// What every request to the host needs.
#[derive(Debug, Clone, Args)]
pub struct RequestArgs {
    /// Guest principal to act as [default: $DROVER_PRINCIPAL].
    #[arg(long, value_name = "NAME")]
    pub principal: Option<String>,
    /// File whose first line is the principal's secret [default: $DROVER_SECRET].
    #[arg(long, value_name = "PATH")]
    pub secret_file: Option<PathBuf>,
    /// Your app's id; events for it reach `drover-guest listen --app-id ID`.
    #[arg(long, value_name = "ID")]
    pub app_id: Option<String>,
    /// JSON handed back with the outcome event (at most 64 KiB).
    #[arg(long, value_name = "JSON", value_parser = parse_json)]
    pub data: Option<serde_json::Value>,
    /// The agent's app socket.
    #[arg(long, value_name = "PATH", default_value = crate::app::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Seconds to wait for the outcome event.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_WAIT_SECS)]
    pub timeout: u64,
}

/// `drover-guest reconfigure`.
#[derive(Debug, Clone, Args)]
#[command(group(
    ArgGroup::new("changes")
        .required(true)
        .multiple(true)
        .args(["cpus", "memory", "add_disk", "add_nic", "detach"])
))]
pub struct ReconfigureArgs {
    /// Set the vCPU count.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub cpus: Option<u32>,
    /// Set the memory size: bytes, or with a K, M, G or T suffix (powers of 1024), e.g. 512M.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Add an empty disk with this id (its serial in the guest) and size, e.g. data2:10G.
    #[arg(long, value_name = "ID:SIZE", value_parser = parse_disk)]
    pub add_disk: Vec<DiskSpec>,
    /// Add a NIC with this id.
    #[arg(long, value_name = "ID")]
    pub add_nic: Vec<String>,
    /// Remove the disk or NIC with this id.
    #[arg(long, value_name = "ID")]
    pub detach: Vec<String>,
    /// Wait for the outcome and print it.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub request: RequestArgs,
}

/// `--add-disk ID:SIZE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Disk id.
    pub id: String,
    /// Bytes.
    pub size: u64,
}

impl ReconfigureArgs {
    /// The changes, in the documented order.
    pub fn changes(&self) -> Vec<ConfigChange> {
        // Detaches first, so an id can be freed and reused in one request.
        let mut out: Vec<ConfigChange> = self
            .detach
            .iter()
            .map(|id| ConfigChange::Detach { id: id.clone() })
            .collect();
        out.extend(self.cpus.map(|count| ConfigChange::SetCpus { count }));
        out.extend(self.memory.map(|bytes| ConfigChange::SetMemory { bytes }));
        out.extend(self.add_disk.iter().map(|d| ConfigChange::AttachDisk {
            id: d.id.clone(),
            size: d.size,
        }));
        out.extend(
            self.add_nic
                .iter()
                .map(|id| ConfigChange::AttachNic { id: id.clone() }),
        );
        out
    }
}

/// `drover-guest save`.
#[derive(Debug, Clone, Args)]
pub struct SaveArgs {
    /// A name for the state.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Wait for the outcome and print it.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub request: RequestArgs,
}

/// `drover-guest restore`.
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// The saved state's name or id.
    #[arg(value_name = "STATE")]
    pub state: String,
    /// Wait for the outcome (you only hear of a failure: success continues elsewhere).
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub request: RequestArgs,
}

/// `drover-guest list` and `host-info`: always wait.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub request: RequestArgs,
}

/// `drover-guest listen`.
#[derive(Debug, Clone, Args)]
pub struct ListenArgs {
    /// The app id whose events to print.
    #[arg(long, value_name = "ID")]
    pub app_id: String,
    /// The agent's app socket.
    #[arg(long, value_name = "PATH", default_value = crate::app::DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// Whether the program was invoked as `drover-guest` (argv[0] basename).
pub fn invoked_as_guest(argv0: Option<&std::ffi::OsStr>) -> bool {
    argv0
        .map(std::path::Path::new)
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "drover-guest")
}

/// A principal and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Principal name.
    pub principal: String,
    /// Its secret.
    pub secret: String,
}

impl std::fmt::Debug for Credentials {
    // Never print a secret, not even in a debug dump.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("principal", &self.principal)
            .field("secret", &"<hidden>")
            .finish()
    }
}

/// The credentials for a request: flags first, then the environment (looked up with `env`).
pub fn credentials(
    args: &RequestArgs,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Credentials, String> {
    let principal = args
        .principal
        .clone()
        .or_else(|| env(ENV_PRINCIPAL))
        .filter(|p| !p.is_empty());
    let secret = match &args.secret_file {
        Some(path) => Some(read_secret_file(path)?),
        None => env(ENV_SECRET).filter(|s| !s.is_empty()),
    };
    match (principal, secret) {
        (Some(principal), Some(secret)) => Ok(Credentials { principal, secret }),
        (None, _) => Err(format!(
            "no principal: set {ENV_PRINCIPAL} or pass --principal NAME \
             (a host administrator grants principals to this VM)"
        )),
        (Some(_), None) => Err(format!(
            "no secret: set {ENV_SECRET} or pass --secret-file PATH"
        )),
    }
}

/// The first line of `path`, trimmed.
fn read_secret_file(path: &Path) -> Result<String, String> {
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SECRET_FILE).read_to_end(&mut buf))
        .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&buf);
    let secret = text.lines().next().unwrap_or("").trim();
    if secret.is_empty() {
        return Err(format!(
            "secret file {} has an empty first line",
            path.display()
        ));
    }
    Ok(secret.to_string())
}

/// A size: bytes, or a number with `K`, `M`, `G` or `T` (powers of 1024; `KiB`, `KB` also taken).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512M, 2G, 1073741824)"))?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M, G or T)")),
    };
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes == 0 {
        return Err("size must be more than 0".into());
    }
    Ok(bytes)
}

/// `ID:SIZE`, e.g. `data2:10G`.
pub fn parse_disk(s: &str) -> Result<DiskSpec, String> {
    let (id, size) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: expected ID:SIZE, e.g. data2:10G"))?;
    if id.is_empty() {
        return Err(format!("{s:?}: the disk id is empty"));
    }
    Ok(DiskSpec {
        id: id.to_string(),
        size: parse_size(size)?,
    })
}

/// Any valid JSON.
pub fn parse_json(s: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not valid JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;
    use clap::CommandFactory as _;
    use std::ffi::OsStr;

    fn guest(args: &[&str]) -> Result<GuestCommand, clap::Error> {
        GuestCli::try_parse_from(std::iter::once("drover-guest").chain(args.iter().copied()))
            .map(|c| c.command)
    }

    #[test]
    fn clis_are_well_formed() {
        AgentCli::command().debug_assert();
        GuestCli::command().debug_assert();
    }

    #[test]
    fn defaults_and_guest_subcommand() {
        let cli = AgentCli::try_parse_from(["drover-agent"]).unwrap();
        assert_eq!(cli.port_a, PathBuf::from(DEFAULT_PORT_A));
        assert_eq!(cli.port_b, PathBuf::from(DEFAULT_PORT_B));
        assert_eq!(cli.app_socket, PathBuf::from(crate::app::DEFAULT_SOCKET));
        assert_eq!(cli.sysfs, PathBuf::from("/sys"));
        assert!(cli.command.is_none());
        let cli = AgentCli::try_parse_from(["drover-agent", "--port-b", "/x", "guest", "status"])
            .unwrap();
        assert_eq!(cli.port_b, PathBuf::from("/x"));
        assert!(matches!(
            cli.command,
            Some(AgentCommand::Guest(GuestCli {
                command: GuestCommand::Status
            }))
        ));
    }

    #[test]
    fn argv0_dispatch() {
        assert!(invoked_as_guest(Some(OsStr::new("/usr/bin/drover-guest"))));
        assert!(invoked_as_guest(Some(OsStr::new("drover-guest"))));
        assert!(!invoked_as_guest(Some(OsStr::new("/sbin/drover-agent"))));
        assert!(!invoked_as_guest(None));
    }

    #[test]
    fn reconfigure_parses_sizes_and_orders_changes() {
        let GuestCommand::Reconfigure(r) = guest(&[
            "reconfigure",
            "--add-disk",
            "d2:1G",
            "--memory",
            "512M",
            "--cpus",
            "3",
            "--add-nic",
            "n1",
            "--detach",
            "old",
            "--add-disk",
            "d3:4096",
            "--wait",
        ])
        .unwrap() else {
            panic!()
        };
        assert!(r.wait);
        assert_eq!(
            r.changes(),
            vec![
                ConfigChange::Detach { id: "old".into() },
                ConfigChange::SetCpus { count: 3 },
                ConfigChange::SetMemory { bytes: 512 << 20 },
                ConfigChange::AttachDisk {
                    id: "d2".into(),
                    size: 1 << 30
                },
                ConfigChange::AttachDisk {
                    id: "d3".into(),
                    size: 4096
                },
                ConfigChange::AttachNic { id: "n1".into() },
            ]
        );
        assert_eq!(r.request.socket, PathBuf::from(crate::app::DEFAULT_SOCKET));
        assert_eq!(r.request.timeout, DEFAULT_WAIT_SECS);
    }

    #[test]
    fn bad_reconfigure_lines_are_usage_errors() {
        for args in [
            &["reconfigure"][..],
            &["reconfigure", "--wait"],
            &["reconfigure", "--cpus", "0"],
            &["reconfigure", "--memory", "12Q"],
            &["reconfigure", "--add-disk", "d2"],
            &["reconfigure", "--add-disk", ":1G"],
            &["reconfigure", "--cpus", "1", "--data", "{nope"],
        ] {
            assert!(guest(args).is_err(), "{args:?} should fail");
        }
        let GuestCommand::Reconfigure(r) = guest(&[
            "reconfigure",
            "--cpus",
            "1",
            "--data",
            r#"{"a":1}"#,
            "--app-id",
            "x",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(r.request.data, Some(serde_json::json!({"a": 1})));
        assert_eq!(r.request.app_id.as_deref(), Some("x"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert_eq!(parse_size("10k"), Ok(10 << 10));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("0").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("99999999999999T").is_err());
        assert_eq!(
            parse_disk("d2:1G"),
            Ok(DiskSpec {
                id: "d2".into(),
                size: 1 << 30
            })
        );
    }

    #[test]
    fn other_commands_parse() {
        assert!(matches!(
            guest(&["save", "--name", "n", "--wait"]).unwrap(),
            GuestCommand::Save(SaveArgs { wait: true, ref name, .. }) if name.as_deref() == Some("n")
        ));
        assert!(matches!(
            guest(&["restore", "s1"]).unwrap(),
            GuestCommand::Restore(RestoreArgs { wait: false, ref state, .. }) if state == "s1"
        ));
        assert!(guest(&["restore"]).is_err());
        assert!(
            matches!(guest(&["list", "--timeout", "5"]).unwrap(), GuestCommand::List(ListArgs { request }) if request.timeout == 5)
        );
        assert!(matches!(
            guest(&["host-info"]).unwrap(),
            GuestCommand::HostInfo(_)
        ));
        assert!(guest(&["listen"]).is_err(), "listen needs --app-id");
        assert!(matches!(
            guest(&["host-id"]).unwrap(),
            GuestCommand::HostId(HostIdArgs { timeout: 60, .. })
        ));
        let GuestCommand::Scan(s) = guest(&["scan"]).unwrap() else {
            panic!()
        };
        assert_eq!(
            (s.repeat_if_migrated, s.notify_if_migrated, s.pause_between),
            (None, false, None)
        );
        let GuestCommand::Scan(s) =
            guest(&["scan", "--repeat-if-migrated", "--notify-if-migrated"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (s.repeat_if_migrated, s.notify_if_migrated),
            (Some(3), true)
        );
        let GuestCommand::Scan(s) =
            guest(&["scan", "--repeat-if-migrated=5", "--pause-between", "100"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (s.repeat_if_migrated, s.pause_between),
            (Some(5), Some(100))
        );
        assert!(guest(&["scan", "--repeat-if-migrated=0"]).is_err());
        assert!(
            guest(&["scan", "--repeat-if-migrated=99"]).is_err(),
            "bounded"
        );
        assert!(matches!(
            guest(&["listen", "--app-id", "a", "--socket", "/tmp/s"]).unwrap(),
            GuestCommand::Listen(ListenArgs { ref app_id, .. }) if app_id == "a"
        ));
    }

    fn request_args(args: &[&str]) -> RequestArgs {
        match guest(&[&["list"], args].concat()).unwrap() {
            GuestCommand::List(l) => l.request,
            _ => unreachable!(),
        }
    }

    #[test]
    fn credentials_from_env_flags_and_file() {
        let env = |k: &str| match k {
            ENV_PRINCIPAL => Some("env-p".to_string()),
            ENV_SECRET => Some("env-s".to_string()),
            _ => None,
        };
        let none = |_: &str| None;
        let c = credentials(&request_args(&[]), env).unwrap();
        assert_eq!(
            (c.principal.as_str(), c.secret.as_str()),
            ("env-p", "env-s")
        );
        assert!(!format!("{c:?}").contains("env-s"), "secret never printed");

        let dir = TempDir::new("secret");
        let file = dir.path().join("secret");
        std::fs::write(&file, "  s3cret \nsecond line\n").unwrap();
        let f = file.to_str().unwrap();
        let c = credentials(
            &request_args(&["--principal", "flag-p", "--secret-file", f]),
            env,
        )
        .unwrap();
        assert_eq!(
            (c.principal.as_str(), c.secret.as_str()),
            ("flag-p", "s3cret")
        );

        let e = credentials(&request_args(&[]), none).unwrap_err();
        assert!(
            e.contains(ENV_PRINCIPAL) && e.contains("--principal"),
            "{e}"
        );
        let e = credentials(&request_args(&["--principal", "p"]), none).unwrap_err();
        assert!(e.contains(ENV_SECRET) && e.contains("--secret-file"), "{e}");
        let missing = dir.path().join("missing");
        let e = credentials(
            &request_args(&[
                "--principal",
                "p",
                "--secret-file",
                missing.to_str().unwrap(),
            ]),
            none,
        )
        .unwrap_err();
        assert!(e.contains("cannot read secret file"), "{e}");
        std::fs::write(&file, "\n").unwrap();
        let e = credentials(
            &request_args(&["--principal", "p", "--secret-file", f]),
            none,
        )
        .unwrap_err();
        assert!(e.contains("empty"), "{e}");
    }
}
