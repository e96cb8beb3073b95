//! `drover`: the command-line interface to droverd.

mod attach;
mod cluster;
mod conventions;
mod copy;
mod output;
mod remotes;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use drover_api::{
    Client, ClientError, ErrorCode, ExecRequest, ImageBuildRequest, StopRequest, VmInfo,
};
use drover_model::{format_size, DiskSpec, NicSpec, VmSpec};
use output::Out;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Drover: run and manage QEMU virtual machines.
///
/// Talks to droverd over its unix socket, or to a remote droverd over HTTPS with --remote NAME
/// (see `drover remote add`). Start the daemon with `droverd` (as root), then:
///
///   drover vm create web1 --cpus 2 --memory 1G --disk size=4G,id=data --nic user,forward=tcp:2222-:22
///   drover vm start web1 --wait
///   drover vm exec web1 -- uname -a
///   drover vm list
///
/// Every command takes --output json for scripts. Exit codes: 0 ok, 1 error, 2 usage (or a
/// request too large), 3 not found, 4 wrong state or already exists, 5 droverd unreachable,
/// 6 timeout or agent unavailable, 7 not enough host resources, 8 permission denied (or too
/// many wrong tokens); `vm exec` exits with the guest command's code.
#[derive(Parser, Debug)]
#[command(
    name = "drover",
    version,
    about,
    long_about,
    max_term_width = 100,
    verbatim_doc_comment
)]
struct Cli {
    /// droverd's API socket.
    #[arg(
        long,
        global = true,
        env = "DROVER_SOCKET",
        default_value = "/run/drover/drover.sock"
    )]
    socket: PathBuf,
    /// Send the command to this remote droverd instead of the local socket (see `drover remote`).
    #[arg(long, global = true, env = "DROVER_REMOTE", value_name = "NAME")]
    remote: Option<String>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Human-readable.
    Table,
    /// JSON, for scripts.
    Json,
    /// YAML: the same data as JSON, for people who read it.
    Yaml,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create, run and inspect virtual machines.
    #[command(subcommand)]
    Vm(Box<VmCmd>),
    /// This host: accelerator, QEMU, resources.
    #[command(subcommand)]
    Host(HostCmd),
    /// Guest images: the default one (Debian kernel + busybox + drover-agent) and Debian 12.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Who may do what on this host (roles by uid; root is always admin; tokens for TCP callers).
    #[command(subcommand)]
    Auth(AuthCmd),
    /// Named remote droverd's (HTTPS + bearer token) that --remote NAME sends commands to.
    #[command(subcommand)]
    Remote(RemoteCmd),
    /// Saved VM states: device state, memory and disk layers; save, list, restore, delete.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// What happened to VMs: created, started, stopped, exited, state-saved, restored,
    /// migrated, hibernated, resumed, deleted; one JSON object per line (whatever --output says).
    ///
    /// Without --follow it prints the recent events droverd keeps (the last 1000 since it
    /// started) and exits; with --follow it keeps printing them as they happen (Ctrl-C to stop).
    /// Each line has `seq`, `at_ms`, `time` (RFC 3339, UTC), `vm`, `kind` and `details`. A reader
    /// that falls 256 events behind gets a line of kind `lagged` and the stream ends; run it again
    /// with --since SEQ (the last seq it printed) to catch up. Needs the viewer role or more.
    ///
    /// Examples:
    ///   drover events                                  # recent events, then exit
    ///   drover events --follow                         # every VM, as it happens
    ///   drover events --follow --vm web1 | jq -c 'select(.kind == "exited") | .details'
    ///   drover events --since 1764600000000123         # only what came after that one
    ///   drover --remote h2 events --follow             # another host's (a viewer token will do)
    #[command(verbatim_doc_comment)]
    Events {
        /// Keep the stream open and print events as they happen.
        #[arg(long, short)]
        follow: bool,
        /// Only this VM's events.
        #[arg(long, value_name = "NAME")]
        vm: Option<String>,
        /// Only events after this one (its `seq`).
        #[arg(long, value_name = "SEQ")]
        since: Option<u64>,
    },
    /// Print a shell completion script.
    ///
    /// Examples:
    ///   drover completion bash > /etc/bash_completion.d/drover
    ///   drover completion zsh > "${fpath[1]}/_drover"
    ///   drover completion fish > ~/.config/fish/completions/drover.fish
    #[command(verbatim_doc_comment)]
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages for drover and every subcommand (drover.1, drover-vm.1, drover-vm-start.1, ...).
    ///
    /// Example: drover man --dir /usr/local/share/man/man1 && man drover-vm-start
    #[command(verbatim_doc_comment)]
    Man {
        /// Where to write the pages.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Services of several VMs placed across the cluster's hosts: apply, list, show, explain, delete.
    #[command(subcommand)]
    Service(cluster::ServiceCmd),
    /// The cluster (etcd, controllers, hosts): status, and which cluster commands use.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
}

/// `snapshot create --capture`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CaptureArg {
    /// Copy when that takes at most about a second, else stream.
    Auto,
    /// Pause while the memory is copied.
    Copy,
    /// Pause briefly, stream the memory out while the guest runs.
    Stream,
}

impl From<CaptureArg> for drover_api::Capture {
    fn from(c: CaptureArg) -> Self {
        match c {
            CaptureArg::Auto => drover_api::Capture::Auto,
            CaptureArg::Copy => drover_api::Capture::Copy,
            CaptureArg::Stream => drover_api::Capture::Stream,
        }
    }
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// Save a running VM's state (it pauses for the save, then runs on).
    ///
    /// A fast save takes the guest's memory one of two ways (--capture):
    ///   copy    the guest stays paused while its memory is copied in RAM (about 0.4 s per GiB
    ///           it has touched); the state is restorable (`ready`) when the command returns
    ///   stream  the guest pauses ~0.1 s at any size, then its memory streams out while it runs
    ///           (phase `capturing`, its writes slower meanwhile) until the state is `ready`
    ///   auto    copy when that takes at most about a second on this host, else stream (a VM
    ///           running on a restored state's memory always streams)
    /// Then the memory is written to disk (`durable`). A host crash before `durable` loses the
    /// state; a droverd crash does not: the next droverd finishes the capture from the
    /// receiving QEMU (which outlives it) and writes the memory out.
    ///
    /// Example: drover snapshot create web1 --name before-upgrade
    ///          drover snapshot show web1 before-upgrade     # phase: capturing, ready, durable
    ///          drover snapshot create big-db --capture stream   # a 64 GiB guest: short pause
    #[command(verbatim_doc_comment)]
    Create {
        /// VM name.
        vm: String,
        /// A name for the state.
        #[arg(long)]
        name: Option<String>,
        /// Put RAM in QEMU's migration stream (slow; for comparison with the fast path).
        #[arg(long)]
        classic: bool,
        /// How a fast save takes the memory: auto, copy (longer pause, restorable at once) or
        /// stream (short pause, restorable later).
        #[arg(long, value_enum, default_value_t = CaptureArg::Auto, conflicts_with = "classic")]
        capture: CaptureArg,
    },
    /// List a VM's saved states.
    List {
        /// VM name.
        vm: String,
    },
    /// Show one state: its sections, checksums, config.
    Show {
        /// VM name.
        vm: String,
        /// State id or name.
        state: String,
    },
    /// Restore a state: the VM (stopped, or running: it is replaced) runs from the saved moment.
    ///
    /// With --on REMOTE the state is checked against that host first, the VM moves there with
    /// its states (live if it runs, else offline), and the state is restored there.
    ///
    /// With --cpus, --memory, --nic ID,mac=MAC or --new-identity the VM is adapted once it
    /// runs, exactly as `vm resume` adapts it; what cannot be adapted is refused before anything
    /// changes. Exit code 6 when it runs but its agent did not take the new identity or MACs.
    ///
    /// Examples:
    ///   drover snapshot restore web1 before-upgrade
    ///   drover snapshot restore web1 s2 --on b2
    ///   drover snapshot restore web1 s2 --cpus 2 --memory 1G --new-identity
    ///   drover snapshot restore web1 s2 --on b2 --nic net0,mac=52:54:00:12:34:56
    #[command(verbatim_doc_comment)]
    Restore {
        /// VM name.
        vm: String,
        /// State id or name.
        state: String,
        /// Restore it on this remote host (`drover remote list`).
        #[arg(long, value_name = "REMOTE")]
        on: Option<String>,
        #[command(flatten)]
        shape: ShapeArgs,
    },
    /// Delete a state.
    Delete {
        /// VM name.
        vm: String,
        /// State id or name.
        state: String,
    },
    /// Check, before anything changes, whether a state can be restored on a host and shape.
    ///
    /// Compares what the state was saved on (QEMU version, machine type, CPU model,
    /// accelerator, host) and its shape with the target, and lists every aspect as `same`,
    /// `adaptable` (adapted on the way: vCPUs and memory hot-plugged after the restore, another
    /// host reached by moving the VM) or `blocking` (with the reason: a machine type the target's
    /// QEMU lacks, a CPU model it cannot run, a shrink). `vm resume` and `snapshot restore`
    /// refuse with the same reasons. Exits 0 when the state fits, 4 when something blocks.
    ///
    /// Examples:
    ///   drover snapshot check web1 before-upgrade
    ///   drover snapshot check web1 s2 --on b2 --cpus 4 --memory 2G
    ///   drover snapshot check web1 s2 --on b2 --output json | jq '.differences[] | select(.verdict=="blocking")'
    #[command(verbatim_doc_comment)]
    Check {
        /// VM name.
        vm: String,
        /// State id or name.
        state: String,
        /// Check against this remote host (`drover remote list`) instead of the VM's host.
        #[arg(long, value_name = "REMOTE")]
        on: Option<String>,
        #[command(flatten)]
        shape: ShapeArgs,
    },
}

#[derive(Subcommand, Debug)]
enum HostCmd {
    /// Show the accelerator, the QEMU droverd runs and what it can do, CPUs, memory and disk.
    ///
    /// The QEMU part is droverd's probe at start: version and installation (`droverd
    /// --qemu-dir`), what `q35` means there (`pc-q35-7.2`, `pc-q35-10.0`), the machine type
    /// and CPU model new VMs are pinned to, usable CPU models, migration capabilities, and the
    /// version-specific behaviour in force. A VM migrates live to another host only if that
    /// host's QEMU has the VM's machine type and CPU model (compare with `drover vm show`).
    ///
    /// Examples:
    ///   drover host info
    ///   drover --remote h2 --output json host info | jq .qemu.machine_aliases
    #[command(verbatim_doc_comment)]
    Info,
    /// Every host of the cluster: up/down/draining, used and total resources.
    #[command(alias = "ls")]
    List(cluster::EtcdArgs),
    /// Drain a cluster host: it takes no new members, and its stateless members move to other
    /// hosts, one member per app at a time and only while the app's other members are ready
    /// (each is stopped, then started elsewhere: never two copies). Members with shared or
    /// local disks, or `relocatable = false`, stay. Follow it with `drover host list` and
    /// `drover service show`.
    ///
    /// Examples:
    ///   drover host drain h2
    ///   drover host undrain h2
    #[command(verbatim_doc_comment)]
    Drain {
        /// The host's cluster name.
        name: String,
        #[command(flatten)]
        etcd: cluster::EtcdArgs,
    },
    /// Let a drained host take members again (members moved off it stay where they are).
    Undrain {
        /// The host's cluster name.
        name: String,
        #[command(flatten)]
        etcd: cluster::EtcdArgs,
    },
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// Build the default guest image (downloads the Debian kernel with apt; cached).
    ///
    /// With --distro debian-12: a real Debian 12 system (debootstrap: systemd, udev, networkd,
    /// openssh, the drover-agent .deb), as a qcow2 root disk booted with Drover's kernel and a
    /// small root loader. Takes minutes the first time (needs root on the host and the Debian
    /// mirror); cached afterwards. The result is imported as the image `debian-12` (again
    /// after a rebuild that changed it, unless VMs use the old one: then it says so), with its
    /// kernel, initrd and command line, so a VM is one thin copy away:
    ///
    ///   drover image build --distro debian-12
    ///   drover vm create deb1 --from-image debian-12 --memory 1G \
    ///       --ssh-key ~/.ssh/id_ed25519.pub --nic user,forward=tcp:127.0.0.1:2222-:22
    ///   drover vm start deb1 --wait && ssh -p 2222 root@127.0.0.1
    ///
    /// (`drover image show --distro debian-12` prints the build's DISK, KERNEL, INITRD and
    /// CMDLINE, to boot a copy of the disk of your own with --kernel/--initrd/--cmdline.)
    #[command(verbatim_doc_comment)]
    Build {
        /// Rebuild even if nothing changed.
        #[arg(long)]
        force: bool,
        /// Build a distribution image instead: `debian-12`.
        #[arg(long, value_name = "NAME", value_parser = ["debian-12"])]
        distro: Option<String>,
    },
    /// Show the current image: kernel version, sizes, inputs.
    Show {
        /// Show a distribution image instead: `debian-12`.
        #[arg(long, value_name = "NAME", value_parser = ["debian-12"])]
        distro: Option<String>,
    },
    /// Import a disk image (qcow2 or raw) that VMs then get thin copies of.
    ///
    /// The file is copied into droverd's state dir as a standalone qcow2 (a backing chain is
    /// folded in), checked by qemu-img, synced; the original is not needed afterwards. A VM's
    /// disk from it is an overlay that shares the image's blocks and writes only its own; the
    /// image itself is never written. Needs admin (it reads a host path).
    ///
    /// Examples:
    ///   drover image import debian-12 /srv/images/debian-12.qcow2
    ///   drover vm create web1 --memory 1G --disk from=debian-12,id=root,size=20G ...
    #[command(verbatim_doc_comment)]
    Import {
        /// A name for it (a-z, 0-9, '.', '_', '-').
        name: String,
        /// The image file on the host running droverd.
        file: PathBuf,
    },
    /// List imported disk images and the VMs using each.
    List,
    /// Delete an imported disk image (refused while a VM's disk is a copy of it).
    Delete {
        /// Its name.
        name: String,
    },
    /// Install the agent package into a stopped Debian or Ubuntu disk, offline.
    ///
    /// For images without cloud-init to install it at boot. TARGET is an imported image no VM
    /// uses, or a disk file (qcow2 or raw, a path on droverd's host) that no running VM uses
    /// and no VM's saved states are layered on. droverd copies the disk to a scratch file,
    /// loop-mounts its root (the whole disk, or the partition holding /var/lib/dpkg), runs
    /// `dpkg --root` with the package, and renames the result (a standalone qcow2) over the
    /// target, which stays whole until then. Needs admin, and root for droverd.
    ///
    /// Trust: the host mounts the disk and dpkg runs the disk's own /bin/sh (chrooted, as root)
    /// for the package's scripts, so a disk can run code as root on this host. An image
    /// `drover image build` made needs nothing more; any other needs --trusted (you vouch for
    /// it: you built it, or it comes from its distribution). A disk of a VM is refused: its
    /// guest has written it (install the agent inside the VM: `drover vm cp` the .deb, dpkg -i).
    ///
    /// Examples:
    ///   drover image inject-agent debian-12
    ///   drover image inject-agent ubuntu-24.04 --trusted
    ///   drover image inject-agent /srv/images/bookworm.qcow2 --trusted
    #[command(verbatim_doc_comment)]
    InjectAgent {
        /// An image's name (`drover image list`), or a disk file's path.
        target: String,
        /// Vouch for the disk: its own programs run as root on this host.
        #[arg(long)]
        trusted: bool,
    },
}

#[derive(Subcommand, Debug)]
enum AuthCmd {
    /// Give a local user (by uid) a role: admin, operator (run and change VMs) or viewer.
    Grant {
        /// The user's uid.
        #[arg(long)]
        uid: u32,
        /// The role.
        #[arg(long, value_parser = ["admin", "operator", "viewer"])]
        role: String,
    },
    /// Take a user's role away.
    Revoke {
        /// The user's uid.
        #[arg(long)]
        uid: u32,
    },
    /// List granted roles.
    List,
    /// Bearer tokens for callers over TCP (`droverd --listen`): create, list, revoke.
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Create a token with a role; prints it once (droverd keeps only its sha256).
    ///
    /// Example: drover auth token create --role operator --name ci > ci.token
    #[command(verbatim_doc_comment)]
    Create {
        /// The role: admin, operator (run and change VMs) or viewer (read only).
        #[arg(long, value_parser = ["admin", "operator", "viewer"])]
        role: String,
        /// A name to list and revoke it by [default: ROLE-N].
        #[arg(long)]
        name: Option<String>,
    },
    /// List tokens: name, role, the start of their hash.
    List,
    /// Revoke a token by name; callers holding it are refused from the next request on.
    Revoke {
        /// The token's name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum RemoteCmd {
    /// Remember a remote droverd; checks that it answers unless --no-check.
    ///
    /// Example (droverd --listen 10.77.0.12:7443 --state-dir /var/lib/drover-h2):
    ///   drover remote add h2 https://10.77.0.12:7443 \
    ///       --token-file /var/lib/drover-h2/tls/admin.token --ca-file /var/lib/drover-h2/tls/cert.pem
    ///   drover --remote h2 vm list
    ///
    /// The token and certificate are copied into the remotes file (mode 0600):
    /// $DROVER_CONFIG_DIR/remotes.toml, default ~/.config/drover/remotes.toml.
    #[command(verbatim_doc_comment)]
    Add {
        /// A name for it (letters, digits, '-', '_', '.').
        name: String,
        /// https://HOST:PORT
        url: String,
        /// A file holding the bearer token (`drover auth token create` on that host prints one).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// The certificate to trust (PEM): the remote's STATE_DIR/tls/cert.pem, or its CA.
        #[arg(long, value_name = "FILE", required_unless_present = "trust_first_use")]
        ca_file: Option<PathBuf>,
        /// No CA file: pin the certificate the remote presents now (trust on first use). Its
        /// SHA-256 fingerprint is printed; compare it with droverd's log on that host.
        #[arg(long, conflicts_with = "ca_file")]
        trust_first_use: bool,
        /// Overwrite a remote of that name.
        #[arg(long)]
        replace: bool,
        /// Save it without checking that it answers.
        #[arg(long)]
        no_check: bool,
    },
    /// List remotes (never their tokens).
    #[command(alias = "ls")]
    List,
    /// Forget a remote.
    #[command(alias = "rm")]
    Remove {
        /// Its name.
        name: String,
    },
}

/// The shape and identity a resumed or restored VM is adapted to once it runs.
#[derive(Args, Debug, Clone)]
struct ShapeArgs {
    /// Grow to this many vCPUs once it runs (hot-plugged; within the host's CPUs).
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// Grow to this much memory once it runs (hot-plugged DIMMs; needs --max-memory at
    /// create, and steps of 128M).
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    memory: Option<u64>,
    /// Give NIC ID a new MAC (repeatable). It keeps its id and PCI address; the guest's
    /// agent takes the new address and renews its DHCP lease. Needs the agent.
    #[arg(long = "nic", value_name = "ID,mac=MAC")]
    nics: Vec<String>,
    /// Give the guest a new identity once it runs: hostname (the VM's name), machine-id,
    /// SSH host keys where it has any, a DHCP renew; /etc/drover/hooks/restored.d/* run with
    /// the old and new values, and apps under `drover-guest listen` get a `restored` event.
    /// Needs the agent.
    #[arg(long)]
    new_identity: bool,
}

impl ShapeArgs {
    /// As the body of a resume or restore.
    fn request(&self) -> anyhow::Result<drover_api::ResumeRequest> {
        Ok(drover_api::ResumeRequest {
            cpus: self.cpus,
            memory: self.memory,
            nics: self
                .nics
                .iter()
                .map(|n| parse_nic_mac(n))
                .collect::<anyhow::Result<Vec<_>>>()?,
            new_identity: self.new_identity,
        })
    }
}

#[derive(Args, Debug)]
struct WaitArgs {
    /// Wait until the guest agent answers. Ends early, with an error, when the VM shows no
    /// agent: its guest's virtio-serial driver has been up droverd's `--no-agent-after` (120 s
    /// by default) and nothing opened the agent's port (`vm show` then says `agent: none seen`).
    #[arg(long)]
    wait: bool,
    /// Seconds to wait for the agent with --wait.
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    wait_timeout: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// A disk.
    Disk,
    /// A NIC.
    Nic,
}

/// One `--set` of `vm start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShapeSet {
    Cpus(u32),
    Memory(u64),
}

/// A size flag's value (`512M`, `2G`) as bytes.
fn parse_size_arg(s: &str) -> Result<u64, String> {
    drover_model::parse_size(s).map_err(|e| e.to_string())
}

fn parse_shape(kv: &str) -> Result<ShapeSet, String> {
    match kv.split_once('=') {
        Some(("cpus", v)) => v
            .parse()
            .map(ShapeSet::Cpus)
            .map_err(|_| format!("{v:?} is not a number of vCPUs")),
        Some(("memory", v)) => drover_model::parse_size(v)
            .map(ShapeSet::Memory)
            .map_err(|e| e.to_string()),
        _ => Err("use cpus=N or memory=SIZE".into()),
    }
}

#[derive(Args, Debug, Default)]
#[command(group(clap::ArgGroup::new("composition").multiple(true)))]
struct PickArgs {
    /// Boot this config generation (0 = the initial config).
    #[arg(long, value_name = "GEN")]
    config: Option<u32>,
    /// Leave out an element, e.g. disk:data2. Repeatable.
    #[arg(long, value_name = "KEY", group = "composition")]
    without: Vec<drover_model::ElementKey>,
    /// Take an element from a generation, e.g. 3:nic:net1. Repeatable.
    #[arg(long, value_name = "GEN:KEY", group = "composition")]
    with: Vec<drover_api::ElementFrom>,
    /// Override cpus=N or memory=SIZE. Repeatable.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_shape, group = "composition")]
    set: Vec<ShapeSet>,
    /// Store the composed config as a new generation (with --without, --with or --set).
    #[arg(long, requires = "composition")]
    save_as_generation: bool,
}

#[derive(Subcommand, Debug)]
enum GuestAccessCmd {
    /// Let a principal ask for some ops; prints its secret once (give it to the app in the guest
    /// as DROVER_PRINCIPAL / DROVER_SECRET).
    ///
    /// Example: drover vm guest-access grant web1 --principal backup --ops save,list,restore,host-info
    #[command(verbatim_doc_comment)]
    Grant {
        /// VM name.
        name: String,
        /// Principal name.
        #[arg(long)]
        principal: String,
        /// Comma-separated ops: reconfigure, save, list, restore, host-info.
        #[arg(long, value_delimiter = ',', required = true)]
        ops: Vec<String>,
    },
    /// Take a principal's access away.
    Revoke {
        /// VM name.
        name: String,
        /// Principal name.
        #[arg(long)]
        principal: String,
    },
    /// List the principals and their ops.
    List {
        /// VM name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// List the generations: who stored them, when, why, and how they differ from the initial.
    List {
        /// VM name.
        name: String,
    },
    /// Show one generation's full config.
    Show {
        /// VM name.
        name: String,
        /// Generation (0 = initial).
        generation: u32,
    },
    /// How generation TO differs from FROM.
    Diff {
        /// VM name.
        name: String,
        /// From this generation.
        from: u32,
        /// To this one.
        to: u32,
    },
    /// Make a generation the new initial config (other generations keep what they yield).
    Promote {
        /// VM name.
        name: String,
        /// Generation.
        generation: u32,
    },
    /// Keep live changes across shutdown (on) or not (off); needs the config.persist permission.
    Persist {
        /// VM name.
        name: String,
        /// on or off (omit to change only the mode).
        #[arg(value_parser = ["on", "off"])]
        state: Option<String>,
        /// Store generations as the whole config or as a diff against the initial one.
        #[arg(long, value_parser = ["snapshot", "diff"])]
        mode: Option<String>,
    },
    /// Every recorded change: live, next-boot, sealed, promoted, persistence flips.
    Journal {
        /// VM name.
        name: String,
    },
}

// One value per run, parsed once: boxing `Create`'s many flags would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum VmCmd {
    /// Define a VM (from flags or a TOML file); creates its disks.
    ///
    /// Examples:
    ///   drover vm create web1 --cpus 2 --memory 1G --disk 4G --nic user,forward=tcp:8080-:80
    ///   drover vm create db --disk size=20G,id=data --disk image=/srv/seed.qcow2,id=seed,ro
    ///   drover vm create app1 --disk from=debian-12,id=root,size=20G   (a thin copy of an imported image)
    ///   drover vm create --file web1.toml
    ///   drover vm create deb1 --from-image debian-12 --memory 1G --ssh-key ~/.ssh/id_ed25519.pub
    ///       (after `drover image build --distro debian-12`: its disk, kernel, initrd and cmdline)
    ///   drover vm create deb2 --kernel K --initrd I --cmdline C --disk image=/srv/deb2.qcow2 \
    ///       --user-data cloud.yaml   (your own copy of a disk, booted with your own kernel)
    ///
    /// A TOML file has the same fields: name, cpus, memory, from_image, [[disk]] (id, size | image
    /// | from, readonly), [[nic]] (id, mac, tap, forward = [...]), [boot] (kernel, initrd, cmdline,
    /// disk), [seed] (ssh_keys = [...], user_data = "...").
    ///
    /// Unless you are an admin, images, kernels and initrds must be files in an image pool
    /// (droverd --image-pool NAME=DIR; read-only unless the pool is NAME=DIR:rw), forwards use
    /// a loopback address and a host port of 1024 or above, and tap devices are refused:
    ///   drover vm create web2 --disk image=/srv/drover/images/base.qcow2,ro --nic user,forward=tcp:127.0.0.1:2222-:22
    #[command(verbatim_doc_comment)]
    Create {
        /// VM name (a-z, 0-9, '-'; it becomes the guest's hostname).
        name: Option<String>,
        /// Read the VM from this TOML file (flags given as well override it).
        #[arg(long, short)]
        file: Option<PathBuf>,
        /// vCPUs [default: 1].
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory, e.g. 512M, 2G [default: 512M].
        #[arg(long)]
        memory: Option<String>,
        /// A disk: SIZE, size=SIZE[,id=ID][,ro], image=/path[,id=ID][,ro], or
        /// from=IMAGE[,size=SIZE][,id=ID][,ro] (a thin copy of `drover image list`'s IMAGE, owned
        /// by the VM). Repeatable.
        #[arg(long = "disk", value_name = "SPEC")]
        disks: Vec<String>,
        /// The root disk: a thin copy of this image (`drover image list`), the first disk, id
        /// `root`, owned by the VM. An image built by `drover image build --distro` also brings
        /// its kernel, initrd and command line (unless --kernel or --boot-disk is given).
        #[arg(long, value_name = "IMAGE")]
        from_image: Option<String>,
        /// A NIC: user[,id=ID][,mac=MAC][,forward=tcp:HOSTPORT-:GUESTPORT]... or tap=IFNAME. Repeatable.
        #[arg(long = "nic", value_name = "SPEC")]
        nics: Vec<String>,
        /// Boot this kernel instead of the default guest image.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initrd for --kernel.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line (appended to the default image's).
        #[arg(long)]
        cmdline: Option<String>,
        /// Boot from this disk id with firmware instead of a kernel.
        #[arg(long, value_name = "DISK_ID")]
        boot_disk: Option<String>,
        /// Force an accelerator for this VM.
        #[arg(long, value_parser = ["kvm", "tcg"])]
        accel: Option<String>,
        /// Allow memory hot-plug up to this size (costs some boot time).
        #[arg(long, value_name = "SIZE")]
        max_memory: Option<String>,
        /// Give the guest a NoCloud seed disk (cloud-init `cidata`, read by drover-agent too):
        /// hostname = VM name, network by MAC. Implied by --ssh-key and --user-data.
        #[arg(long, conflicts_with = "no_seed")]
        seed: bool,
        /// No seed disk, even with --ssh-key or --user-data in a --file.
        #[arg(long)]
        no_seed: bool,
        /// Public keys for root's authorized_keys, from this file (one per line). Repeatable.
        #[arg(long = "ssh-key", value_name = "FILE", conflicts_with = "no_seed")]
        ssh_keys: Vec<PathBuf>,
        /// cloud-init user-data for the seed, from this file (at most 32 KiB).
        #[arg(long, value_name = "FILE", conflicts_with = "no_seed")]
        user_data: Option<PathBuf>,
        /// Start it right away.
        #[arg(long)]
        start: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Start a stopped VM.
    ///
    /// By default it boots its latest config generation when persistence is on, else its
    /// initial config. Pick another, or compose one:
    ///   drover vm start web1 --config 0                     # the initial config
    ///   drover vm start web1 --config 3 --without disk:data2 --with 2:nic:net1 --set memory=2G
    /// Whichever config it boots, each disk has its current content (a config names the disk,
    /// not a layer); only `drover snapshot restore` takes disks back to a saved state.
    #[command(verbatim_doc_comment)]
    Start {
        /// VM name.
        name: String,
        #[command(flatten)]
        pick: PickArgs,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Attach a disk or NIC; live when the VM runs (hot-plug), else for its next start.
    ///
    /// A device keeps its PCI address for life: one attached to a stopped VM (or --next-boot)
    /// takes the next free slot of the root bus, one hot-plugged stays on its hot-plug port at
    /// every later boot (4 ports; detach one to free it). Nothing beside it moves, so guest
    /// names such as enp0s7 stay. Each user-mode NIC gets its own subnet (10.0.2.0/24 for the
    /// first, 10.0.3.0/24 for the second, ...), so every NIC's forwards answer.
    ///
    /// Examples:
    ///   drover vm attach web1 disk --id data2 --size 1G
    ///   drover vm attach web1 disk --id seed --image /srv/seed.qcow2 --readonly
    ///   drover vm attach web1 nic --id net1 --forward tcp:8081-:80
    #[command(verbatim_doc_comment)]
    Attach {
        /// VM name.
        name: String,
        /// What to attach.
        #[arg(value_enum)]
        kind: Kind,
        /// The new element's id (a disk's id is its serial in the guest).
        #[arg(long)]
        id: String,
        /// Disk: create a new qcow2 of this size.
        #[arg(long, value_parser = parse_size_arg, conflicts_with_all = ["image", "readonly"])]
        size: Option<u64>,
        /// Disk: attach an existing image.
        #[arg(long)]
        image: Option<PathBuf>,
        /// Disk: read-only (with --image).
        #[arg(long, requires = "image")]
        readonly: bool,
        /// NIC: MAC address.
        #[arg(long)]
        mac: Option<drover_model::MacAddr>,
        /// NIC: port forward, e.g. tcp:8081-:80. Repeatable.
        #[arg(long)]
        forward: Vec<drover_model::PortForward>,
        /// Do not change the running VM; record the change for its next start.
        #[arg(long)]
        next_boot: bool,
    },
    /// Detach a disk or NIC (hot-unplug: the guest must release it).
    Detach {
        /// VM name.
        name: String,
        /// Element id.
        id: String,
        /// Do not change the running VM; record the change for its next start.
        #[arg(long)]
        next_boot: bool,
    },
    /// Change vCPUs or memory: `drover vm set web1 cpus=2 memory=1G`.
    ///
    /// Live, vCPUs and memory can only grow (memory needs --max-memory at create, in 128M steps);
    /// anything else takes --next-boot.
    Set {
        /// VM name.
        name: String,
        /// cpus=N and/or memory=SIZE.
        #[arg(required = true, value_name = "KEY=VALUE", value_parser = parse_shape)]
        settings: Vec<ShapeSet>,
        /// Do not change the running VM; record the change for its next start.
        #[arg(long)]
        next_boot: bool,
    },
    /// The VM's configuration history: generations, diffs, promote, persistence.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Which apps inside the VM may ask the host for things (guest principals).
    #[command(subcommand, name = "guest-access")]
    GuestAccess(GuestAccessCmd),
    /// The audit trail of requests from inside the VM.
    Audit {
        /// VM name.
        name: String,
    },
    /// Move a VM to another host (a remote, see `drover remote add`).
    ///
    /// Live by default: disks are copied while the guest runs (unless both hosts see them
    /// at the same paths: --shared-storage), then memory; the guest pauses only for the
    /// final switch-over. The VM's records, config history, saved states, guest principals
    /// and audit trail move with it; afterwards exactly one host has it. A failure or
    /// --cancel leaves it running here. A stopped VM moves with --offline.
    ///
    /// Between QEMU versions: the destination's QEMU must have the VM's machine type and CPU
    /// model (`drover vm show` / `drover host info`): a VM made on QEMU 7.2 (pc-q35-7.2) moves
    /// to 10.0, one made on 10.0 (pc-q35-10.0) not to 7.2. Otherwise the move is refused
    /// before anything changes, with the reason (exit 4).
    ///
    /// Examples:
    ///   drover vm migrate web1 --to h2
    ///   drover --remote h1 vm migrate web1 --to h2 --downtime-ms 20 --output json
    ///   drover vm migrate web1 --cancel
    ///   drover vm migrate db --to h3 --offline
    #[command(verbatim_doc_comment)]
    Migrate {
        /// VM name.
        name: String,
        /// The destination: a remote name (`drover remote list`).
        #[arg(long, required_unless_present = "cancel", value_name = "REMOTE")]
        to: Option<String>,
        /// Both hosts see the VM's disk files at the same paths; do not copy them.
        #[arg(long)]
        shared_storage: bool,
        /// Move a stopped VM: copy disks and records, start nothing.
        #[arg(long)]
        offline: bool,
        /// Longest switch-over pause QEMU may plan, in milliseconds [default: 20].
        #[arg(long, value_name = "MS")]
        downtime_ms: Option<u64>,
        /// Bandwidth cap per second for memory and disks, e.g. 100M [default: none].
        #[arg(long, value_name = "SIZE")]
        bandwidth: Option<String>,
        /// Cancel the migration of NAME that is running now.
        #[arg(long, conflicts_with_all = ["to", "offline", "shared_storage"])]
        cancel: bool,
    },
    /// Stop a VM: the guest agent's shutdown, then ACPI power-down, then kill after --timeout.
    Stop {
        /// VM name.
        name: String,
        /// Seconds for a graceful shutdown before QEMU is killed.
        #[arg(long, default_value_t = 30, value_name = "SECS")]
        timeout: u64,
        /// Kill at once.
        #[arg(long)]
        force: bool,
    },
    /// Stop then start a VM.
    Restart {
        /// VM name.
        name: String,
        /// Seconds for a graceful shutdown before QEMU is killed.
        #[arg(long, default_value_t = 30, value_name = "SECS")]
        timeout: u64,
        /// Kill at once instead of shutting down.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Save a running VM to disk and stop it, freeing its memory and CPUs on this host.
    ///
    /// The memory and device state go to a state on disk (synced before this answers); the VM
    /// shows `hibernated` with that state's size and place, survives droverd restarts and host
    /// reboots, and `drover vm resume NAME` brings it back running from this point.
    ///
    /// Example: drover vm hibernate web1 && drover vm show web1
    #[command(verbatim_doc_comment)]
    Hibernate {
        /// VM name.
        name: String,
    },
    /// Bring a hibernated VM back, running from where it was hibernated (the state is then
    /// deleted), optionally adapted once it runs: grown to more vCPUs or memory, NICs given new
    /// MACs, a new identity in the guest. What cannot be adapted is refused before anything
    /// changes (it stays hibernated). Exit code 6 when it runs but its agent did not take the
    /// new identity or MACs (`drover vm show NAME` says why).
    ///
    /// Example: drover vm resume web1 --wait
    ///          drover vm resume web1 --cpus 2 --memory 1G --wait
    ///          drover vm resume web1 --nic net0,mac=52:54:00:12:34:56 --wait
    ///          drover vm resume web1 --new-identity --wait   # a second machine, not the first
    #[command(verbatim_doc_comment)]
    Resume {
        /// VM name.
        name: String,
        #[command(flatten)]
        shape: ShapeArgs,
        /// Resume it on this remote host (`drover remote list`): checked there first, then its
        /// state and disks move as `vm migrate --offline` moves them, then it resumes there.
        #[arg(long, value_name = "REMOTE")]
        on: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Start new VMs from a saved state of a running template: instant clones.
    ///
    /// Each clone maps the state's memory privately (pages shared with the template's state
    /// until the clone writes them), gets thin qcow2 overlays on the state's disk layers, its own
    /// MACs, and, through its agent once it runs, its own hostname (its name), machine-id and
    /// generation id; the guest's restored.d and migrated.d hooks run. Clones are ordinary VMs
    /// afterwards. The state must be a fast one that has finished capturing (`ready`); the
    /// template's NICs must not forward host ports. While a clone exists, its template and that
    /// state cannot be deleted (or migrated). Everything is checked for all N before the first
    /// is made. Exit code 6 when a clone runs but its agent did not take its identity.
    ///
    /// Example: drover snapshot create tmpl --name warm
    ///          drover vm clone tmpl/warm web                # one clone, named web
    ///          drover vm clone tmpl/warm web --count 10     # web-1 .. web-10
    ///          drover --output json vm clone tmpl/warm web --count 3 --dry-run
    #[command(verbatim_doc_comment)]
    Clone {
        /// The template VM and its state (id or name): VM/STATE.
        #[arg(value_name = "VM/STATE")]
        source: String,
        /// The clone's name; with --count, the stem of NAME-1 .. NAME-N.
        name: String,
        /// How many clones to make (1-64).
        #[arg(long, value_name = "N")]
        count: Option<u32>,
        /// Only check that the clones can be made (state, names, memory); make nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete a stopped VM and the disks Drover created for it (your own images are kept).
    Delete {
        /// VM name.
        name: String,
        /// Stop it first if it is running.
        #[arg(long)]
        force: bool,
        /// Do not write the VM's latest data back into disks given as `image=PATH`: each image
        /// stays as it was when the VM's first save pinned it (`vm show` lists such disks).
        #[arg(long)]
        discard_changes: bool,
    },
    /// List VMs.
    #[command(alias = "ls")]
    List,
    /// Show one VM in detail.
    Show {
        /// VM name.
        name: String,
    },
    /// Print the VM's serial console log, or attach to the console to type into it.
    ///
    /// --attach connects this terminal to the guest's serial port (raw mode on a terminal:
    /// every key, Ctrl-C too, goes to the guest) until the detach key, Ctrl-] unless
    /// --detach-key says otherwise. Only new output shows; the log keeps all of it. With piped
    /// input, the end of input detaches once the output has been quiet for 2 s. Needs vm.exec,
    /// over the local socket or a remote (--remote) alike; the web console is the same console.
    ///
    /// Examples:
    ///   drover vm console web1 --follow
    ///   drover vm console web1 --attach
    ///   drover vm console web1 --attach --detach-key ctrl-p
    ///   echo 'uname -a' | drover vm console web1 --attach
    #[command(verbatim_doc_comment)]
    Console {
        /// VM name.
        name: String,
        /// Keep printing new output (Ctrl-C to stop).
        #[arg(long, short, conflicts_with = "attach")]
        follow: bool,
        /// Type into the console: stdin goes to the guest, its output to stdout.
        #[arg(long, short)]
        attach: bool,
        /// The key that detaches (ctrl-X or ^X).
        #[arg(long, default_value = "ctrl-]", value_parser = attach::parse_detach_key, requires = "attach")]
        detach_key: u8,
    },
    /// Copy a file into or out of a running guest, through its agent (binary-safe, any size).
    ///
    /// Name the guest side VM:/path. A copy into the guest is written beside the target and
    /// renamed over it once complete and synced, so the old file stays whole until then; it
    /// takes the local file's mode unless --mode says otherwise. A copy out is written the same
    /// way locally. '-' is standard input or output. Needs vm.exec.
    ///
    /// Examples:
    ///   drover vm cp ./drover-agent_0.1.0_amd64.deb web1:/tmp/
    ///   drover vm cp web1:/var/log/syslog ./syslog
    ///   tar c ./site | drover vm cp - web1:/srv/site.tar --mode 600
    #[command(verbatim_doc_comment)]
    Cp {
        /// From: a local path, or VM:/path in a guest.
        src: String,
        /// To: VM:/path (VM:/dir/ keeps the file's name), or a local path.
        dst: String,
        /// Permission bits of the file made in the guest, octal (e.g. 755).
        #[arg(long, value_name = "OCTAL")]
        mode: Option<String>,
    },
    /// Run a command inside the guest through its agent; exits with the command's exit code.
    ///
    /// Example: drover vm exec web1 -- sh -c 'df -h; free -m'
    #[command(verbatim_doc_comment)]
    Exec {
        /// VM name.
        name: String,
        /// Seconds before the command is killed.
        #[arg(long, default_value_t = 60, value_name = "SECS")]
        timeout: u64,
        /// Send this file as the command's stdin ('-' for drover's own stdin).
        #[arg(long, value_name = "FILE")]
        stdin: Option<PathBuf>,
        /// The command and its arguments (after --).
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
}

/// One progress line of a migration, from the JSON droverd streams.
fn migrate_line(line: &str) -> String {
    let Ok(p) = serde_json::from_str::<drover_api::MigrateProgress>(line) else {
        return line.to_string();
    };
    let pct = |a: u64, b: u64| a.saturating_mul(100).checked_div(b).unwrap_or(100);
    match p.stage.as_str() {
        "disks" => format!(
            "copying disks: {} of {} ({}%)",
            output::fmt_bytes(p.disk_done),
            output::fmt_bytes(p.disk_total),
            pct(p.disk_done, p.disk_total)
        ),
        "memory" => format!(
            "copying memory: {} sent, {} left, guest dirties {}/s, expected pause {} ms",
            output::fmt_bytes(p.ram_done),
            output::fmt_bytes(p.ram_remaining),
            output::fmt_bytes(p.dirty_rate),
            p.expected_downtime_ms
        ),
        "switch-over" => "switching over (guest paused)".to_string(),
        "handing-over" => "handing over to the destination".to_string(),
        other => other.to_string(),
    }
}

/// Exit codes by error kind; documented in `drover --help`.
fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<remotes::UnknownRemote>().is_some() {
        return 2;
    }
    match e.downcast_ref::<ClientError>() {
        Some(c) if c.is_unreachable() => 5,
        Some(c) => match c.code() {
            Some(ErrorCode::NotFound) => 3,
            Some(ErrorCode::Conflict | ErrorCode::AlreadyExists) => 4,
            Some(ErrorCode::Timeout | ErrorCode::AgentUnavailable) => 6,
            Some(ErrorCode::InsufficientResources) => 7,
            Some(
                ErrorCode::Forbidden | ErrorCode::Unauthenticated | ErrorCode::TooManyRequests,
            ) => 8,
            Some(ErrorCode::TooLarge) => 2,
            Some(ErrorCode::PeerUnreachable) => 5,
            _ => 1,
        },
        None => 1,
    }
}

fn main() -> ExitCode {
    conventions::restore_sigpipe();
    let cli = Cli::parse();
    // These need no daemon.
    match &cli.cmd {
        Cmd::Completion { shell } => {
            conventions::completion::<Cli>(*shell);
            return ExitCode::SUCCESS;
        }
        Cmd::Man { dir } => {
            return match conventions::man_pages::<Cli>(dir) {
                Ok(n) => {
                    eprintln!("wrote {n} man pages into {}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("drover: {e:#}");
                    ExitCode::from(1)
                }
            };
        }
        _ => {}
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drover: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    let out = Out::new(cli.output != Format::Table, cli.output == Format::Yaml);
    let remote = cli.remote.clone();
    match rt.block_on(run(cli, &out)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            out.error(&e);
            let unauthenticated = e
                .downcast_ref::<ClientError>()
                .and_then(|c| c.code())
                .is_some_and(|c| c == ErrorCode::Unauthenticated);
            if let (Some(r), true, false) = (remote, unauthenticated, out.is_json()) {
                eprintln!("drover: remote {r} has no token droverd accepts; store a valid one with `drover remote add {r} URL --token-file FILE --ca-file FILE --replace`");
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

async fn token_cmd(c: &Client, out: &Out, cmd: TokenCmd) -> anyhow::Result<u8> {
    match cmd {
        TokenCmd::Create { role, name } => {
            let t: drover_api::TokenCreated = c
                .post(
                    "/v1/auth/tokens",
                    &drover_api::TokenCreateRequest { role, name },
                )
                .await?;
            if out.is_json() {
                out.json_only(&t);
            } else {
                // The token alone on stdout, so `> file` captures just it.
                println!("{}", t.token);
                eprintln!(
                    "created token {} (role {}); shown once, droverd keeps only its hash",
                    t.info.name, t.info.role
                );
            }
        }
        TokenCmd::List => {
            let list: Vec<drover_api::TokenInfo> = c.get("/v1/auth/tokens").await?;
            if out.is_json() {
                out.json_only(&list);
            } else if list.is_empty() {
                println!("no tokens");
            } else {
                for t in &list {
                    println!("{:<20} {:<9} sha256 {}…", t.name, t.role, t.sha256_prefix);
                }
            }
        }
        TokenCmd::Revoke { name } => {
            let t: drover_api::TokenInfo = c
                .call::<(), drover_api::TokenInfo>(
                    drover_api::Method::DELETE,
                    &format!("/v1/auth/tokens/{}", token_name(&name)?),
                    None,
                )
                .await?;
            out.line(&format!("revoked token {} (role {})", t.name, t.role));
            out.json_only(&t);
        }
    }
    Ok(0)
}

/// The client for this invocation: the named remote, or the local socket.
fn client(cli: &Cli) -> anyhow::Result<Client> {
    let Some(name) = cli.remote.as_deref().filter(|n| !n.is_empty()) else {
        return Ok(Client::new(&cli.socket));
    };
    let path = remotes::config_file()?;
    let all = remotes::Remotes::load(&path)?;
    Ok(all.get(name)?.client()?)
}

async fn remote_cmd(cmd: RemoteCmd, out: &Out) -> anyhow::Result<u8> {
    let path = remotes::config_file()?;
    let mut all = remotes::Remotes::load(&path)?;
    match cmd {
        RemoteCmd::List => {
            let fp = |r: &remotes::Remote| drover_api::pem_fingerprint(r.ca.as_bytes());
            if out.is_json() {
                let list: Vec<serde_json::Value> = all
                    .remote
                    .iter()
                    .map(|(n, r)| {
                        serde_json::json!({"name": n, "url": r.url, "token": r.token.is_some(), "ca_sha256": fp(r)})
                    })
                    .collect();
                out.json_only(&list);
            } else if all.remote.is_empty() {
                println!("no remotes (add one with `drover remote add NAME https://HOST:PORT --token-file F --ca-file F`)");
            } else {
                for (n, r) in &all.remote {
                    let tok = if r.token.is_some() {
                        ""
                    } else {
                        "  (no token)"
                    };
                    // The start of the pinned certificate's fingerprint tells hosts apart.
                    let short: String = fp(r).unwrap_or_default().chars().take(23).collect();
                    println!("{n:<12} {:<28} ca sha256 {short}…{tok}", r.url);
                }
            }
        }
        RemoteCmd::Remove { name } => {
            all.get(&name)?;
            all.remote.remove(&name);
            all.save(&path)?;
            out.line(&format!("removed remote {name}"));
            out.json_only(&serde_json::json!({"removed": name}));
        }
        RemoteCmd::Add {
            name,
            url,
            token_file,
            ca_file,
            // clap requires it when --ca-file is absent; the match on ca_file covers both.
            trust_first_use: _,
            replace,
            no_check,
        } => {
            if !remotes::valid_name(&name) {
                anyhow::bail!("bad remote name {name:?}: use letters, digits, '-', '_', '.'");
            }
            if all.remote.contains_key(&name) && !replace {
                anyhow::bail!("a remote named {name} exists already; pass --replace to overwrite it, or `drover remote remove {name}`");
            }
            let token = token_file
                .as_deref()
                .map(|p| {
                    std::fs::read_to_string(p)
                        .map(|t| t.trim().to_string())
                        .with_context(|| format!("reading the token file {}", p.display()))
                })
                .transpose()?;
            let ca = match &ca_file {
                Some(f) => std::fs::read_to_string(f)
                    .with_context(|| format!("reading the CA file {}", f.display()))?,
                None => {
                    let (pem, fp) = drover_api::fetch_server_cert(&url).await?;
                    eprintln!("drover: pinned the certificate {url} presents, SHA-256 {fp}; droverd logs its fingerprint at start (\"serving the API on TCP\") - compare them");
                    pem
                }
            };
            // Builds the TLS setup, so a bad URL or CA file is refused before anything is saved.
            let c = Client::https(&url, token.as_deref(), ca.as_bytes())?;
            let url = c.url().unwrap_or(&url).to_string();
            let host = if no_check {
                None
            } else {
                Some(c.get::<drover_api::HostInfo>("/v1/host").await?)
            };
            all.remote.insert(
                name.clone(),
                remotes::Remote {
                    url: url.clone(),
                    token,
                    ca,
                },
            );
            all.save(&path)?;
            match &host {
                Some(h) => out.line(&format!(
                    "added remote {name}: {url} (host {}, droverd {})",
                    h.hostname, h.daemon_version
                )),
                None => out.line(&format!("added remote {name}: {url} (not checked)")),
            }
            out.json_only(
                &serde_json::json!({"name": name, "url": url, "checked": host.is_some()}),
            );
        }
    }
    Ok(0)
}

fn token_name(name: &str) -> anyhow::Result<&str> {
    // Token names are checked by droverd; refuse what would not fit a URL path segment.
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
    {
        anyhow::bail!("invalid token name {name:?}: use letters, digits, '-', '_', '.', '@'");
    }
    Ok(name)
}

/// What a fast save's answer must tell: what a crash before it is durable costs.
fn durability_note(vm: &str, id: &str, memory: u64, ready: bool) -> String {
    // Rough rates on an ordinary host: the stream runs at ~0.5 GiB/s, the write-out at ~300 MB/s.
    let stream_s = if ready {
        0.0
    } else {
        (memory as f64 / (1u64 << 29) as f64).ceil().max(1.0)
    };
    let durable_s = stream_s + (memory as f64 / 300e6).ceil();
    let now = if ready {
        "restorable now".to_string()
    } else {
        format!("restorable in ~{stream_s:.0} s")
    };
    format!(
        "{now}; durable in ~{durable_s:.0} s (`drover snapshot show {vm} {id}`): a host crash before then loses this state, a droverd crash does not (the next droverd finishes it)"
    )
}

/// An image name as a URL segment.
fn image_seg(name: &str) -> anyhow::Result<String> {
    if !drover_model::valid_image_name(name) {
        anyhow::bail!("invalid image name {name:?}: use a-z, 0-9, '.', '_' and '-'");
    }
    Ok(name.to_string())
}

pub(crate) fn seg(name: &str) -> anyhow::Result<String> {
    // Names are validated by the daemon; refuse path tricks before they reach a URL.
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        anyhow::bail!("invalid VM name {name:?}: use a-z, 0-9 and '-'");
    }
    Ok(name.to_string())
}

async fn run(cli: Cli, out: &Out) -> anyhow::Result<u8> {
    // `remote` commands edit the remotes file and must work whatever --remote says.
    let c = match cli.cmd {
        // Cluster commands talk to etcd, not to a droverd.
        Cmd::Remote(_)
        | Cmd::Service(_)
        | Cmd::Cluster(_)
        | Cmd::Host(HostCmd::List(_) | HostCmd::Drain { .. } | HostCmd::Undrain { .. }) => {
            Client::new(&cli.socket)
        }
        _ => client(&cli)?,
    };
    match cli.cmd {
        Cmd::Remote(cmd) => return remote_cmd(cmd, out).await,
        Cmd::Service(cmd) => return cluster::service_cmd(cmd, out).await,
        Cmd::Cluster(cmd) => return cluster::cluster_cmd(cmd, out).await,
        Cmd::Host(HostCmd::List(etcd)) => return cluster::host_list(etcd, out).await,
        Cmd::Host(HostCmd::Drain { name, etcd }) => {
            return cluster::host_drain(&name, true, etcd, out).await
        }
        Cmd::Host(HostCmd::Undrain { name, etcd }) => {
            return cluster::host_drain(&name, false, etcd, out).await
        }
        Cmd::Host(HostCmd::Info) => {
            let h: drover_api::HostInfo = c.get("/v1/host").await?;
            out.host(&h);
        }
        Cmd::Image(ImageCmd::Show { distro }) => {
            let path = match &distro {
                Some(d) => format!("/v1/image?distro={d}"),
                None => "/v1/image".to_string(),
            };
            let i: drover_api::ImageInfo = c.get(&path).await?;
            out.image(&i);
        }
        Cmd::Image(ImageCmd::Import { name, file }) => {
            let path = std::path::absolute(&file)
                .with_context(|| format!("resolving {}", file.display()))?;
            let p = out.progress(&format!("importing {} as {name}", path.display()));
            let i: drover_api::DiskImage = c
                .post("/v1/images", &drover_api::ImageImportRequest { name, path })
                .await?;
            p.done(&format!(
                "imported {} ({} virtual, {} on disk)",
                i.name,
                format_size(i.virtual_size),
                format_size(i.bytes)
            ));
            out.json_only(&i);
        }
        Cmd::Image(ImageCmd::List) => {
            let list: Vec<drover_api::DiskImage> = c.get("/v1/images").await?;
            out.disk_images(&list);
        }
        Cmd::Image(ImageCmd::Delete { name }) => {
            let i: drover_api::DiskImage = c
                .call::<(), _>(
                    drover_api::Method::DELETE,
                    &format!("/v1/images/{}", image_seg(&name)?),
                    None,
                )
                .await?;
            let p = out.progress("");
            p.done(&format!("deleted image {}", i.name));
            out.json_only(&i);
        }
        Cmd::Image(ImageCmd::InjectAgent { target, trusted }) => {
            // A name is an image; anything with a slash (or an existing file here) a file.
            let target = if target.contains('/') || std::path::Path::new(&target).is_file() {
                std::path::absolute(&target)
                    .with_context(|| format!("resolving {target}"))?
                    .display()
                    .to_string()
            } else {
                target
            };
            let p = out.progress(&format!("installing the agent into {target}"));
            let r: drover_api::AgentInjected = c
                .post(
                    "/v1/image/inject-agent",
                    &drover_api::InjectAgentRequest { target, trusted },
                )
                .await?;
            p.done(&format!(
                "installed drover-agent {} into {}{}",
                r.version,
                r.file.display(),
                r.replaced
                    .as_deref()
                    .map(|v| format!(" (it had {v})"))
                    .unwrap_or_default()
            ));
            out.json_only(&r);
        }
        Cmd::Image(ImageCmd::Build { force, distro }) => {
            let p = out.progress("building the guest image");
            let started = Instant::now();
            let i: drover_api::ImageInfo = c
                .post_stream(
                    "/v1/image/build",
                    &ImageBuildRequest { force, distro },
                    |line| p.set(line),
                )
                .await?;
            p.done(&format!(
                "guest image ready in {:.1}s",
                started.elapsed().as_secs_f64()
            ));
            out.image(&i);
        }
        Cmd::Vm(cmd) => return vm(&c, out, *cmd).await,
        Cmd::Events { follow, vm, since } => {
            let mut path = format!("/v1/events?follow={follow}");
            if let Some(vm) = vm {
                path.push_str(&format!("&vm={}", seg(&vm)?));
            }
            if let Some(since) = since {
                path.push_str(&format!("&since={since}"));
            }
            let mut stdout = std::io::stdout();
            let mut failed = None;
            let mut lagged = false;
            c.get_lines(&path, |e: drover_api::Event| {
                lagged = e.kind == drover_api::EventKind::Lagged;
                let line = serde_json::to_string(&e).unwrap_or_default();
                // A closed pipe (`| head`) ends the command quietly.
                match writeln!(stdout, "{line}").and_then(|_| stdout.flush()) {
                    Ok(()) => true,
                    Err(err) => {
                        failed = Some(err);
                        false
                    }
                }
            })
            .await?;
            if let Some(err) = failed {
                if err.kind() != std::io::ErrorKind::BrokenPipe {
                    return Err(anyhow::anyhow!("writing events: {err}"));
                }
            }
            if lagged {
                anyhow::bail!("this reader fell too far behind and droverd dropped it; run `drover events --follow --since SEQ` with the last seq printed to catch up");
            }
        }
        // Answered in main(), before any daemon is asked.
        Cmd::Completion { .. } | Cmd::Man { .. } => return Ok(0),
        Cmd::Snapshot(cmd) => match cmd {
            SnapshotCmd::Create {
                vm,
                name,
                classic,
                capture,
            } => {
                let p = out.progress(&format!("saving the state of {vm}"));
                let st: drover_api::StateInfo = c
                    .post(
                        &format!("/v1/vms/{}/states", seg(&vm)?),
                        &drover_api::SnapshotRequest {
                            name,
                            classic,
                            capture: capture.into(),
                        },
                    )
                    .await?;
                p.done(&format!(
                    "saved {} ({}) of {vm}; the VM was paused {} ms{}",
                    st.id,
                    st.name,
                    st.paused_ms,
                    st.capture
                        .map(|c| format!(" (memory: {c})"))
                        .unwrap_or_default()
                ));
                if let Some(m) = &st.memory {
                    match st.phase {
                        drover_api::StatePhase::Capturing => {
                            out.line(&durability_note(&vm, &st.id, m.bytes, false))
                        }
                        drover_api::StatePhase::Ready => {
                            out.line(&durability_note(&vm, &st.id, m.bytes, true))
                        }
                        _ => {}
                    }
                }
                out.json_only(&st);
            }
            SnapshotCmd::List { vm } => {
                let list: Vec<drover_api::StateInfo> =
                    c.get(&format!("/v1/vms/{}/states", seg(&vm)?)).await?;
                out.states(&list);
            }
            SnapshotCmd::Show { vm, state } => {
                let st: drover_api::StateInfo = c
                    .get(&format!("/v1/vms/{}/states/{}", seg(&vm)?, seg(&state)?))
                    .await?;
                out.state(&st);
            }
            SnapshotCmd::Restore {
                vm,
                state,
                on,
                shape,
            } => {
                let req = shape.request()?;
                let mut target = c.clone();
                if let Some(r) = &on {
                    let v: VmInfo = c.get(&format!("/v1/vms/{}", seg(&vm)?)).await?;
                    if let Some(code) = check_on(&c, out, &vm, &state, r, &req).await? {
                        return Ok(code);
                    }
                    let opts = MigrateOpts {
                        offline: v.state != drover_api::VmState::Running,
                        ..Default::default()
                    };
                    migrate_vm(&c, out, &vm, r, opts).await?;
                    target = remote_client(r)?;
                }
                let c = &target;
                let p = out.progress(&format!("restoring {state} of {vm}"));
                let v: VmInfo = c
                    .post(
                        &format!("/v1/vms/{}/states/{}/restore", seg(&vm)?, seg(&state)?),
                        &req,
                    )
                    .await?;
                p.done(&format!(
                    "{vm} runs from {state} (pid {})",
                    v.pid.unwrap_or(0)
                ));
                out.json_only(&v);
                if !identity_taken(out, &vm, &req, &v) {
                    return Ok(6);
                }
            }
            SnapshotCmd::Check {
                vm,
                state,
                on,
                shape,
            } => {
                let r = check_state(&c, &vm, &state, on.as_deref(), &shape.request()?).await?;
                out.state_check(&r);
                return Ok(if r.fits { 0 } else { 4 });
            }
            SnapshotCmd::Delete { vm, state } => {
                let st: drover_api::StateInfo = c
                    .call::<(), drover_api::StateInfo>(
                        drover_api::Method::DELETE,
                        &format!("/v1/vms/{}/states/{}", seg(&vm)?, seg(&state)?),
                        None,
                    )
                    .await?;
                out.line(&format!("deleted state {} ({}) of {vm}", st.id, st.name));
            }
        },
        Cmd::Auth(cmd) => {
            let (uid, role) = match cmd {
                AuthCmd::Token(cmd) => return token_cmd(&c, out, cmd).await,
                AuthCmd::List => {
                    let roles: Vec<(u32, String)> = c.get("/v1/auth/roles").await?;
                    out.roles(&roles);
                    return Ok(0);
                }
                AuthCmd::Grant { uid, role } => (uid, Some(role)),
                AuthCmd::Revoke { uid } => (uid, None),
            };
            let roles: Vec<(u32, String)> = c
                .post(
                    "/v1/auth/roles",
                    &serde_json::json!({"uid": uid, "role": role}),
                )
                .await?;
            out.roles(&roles);
        }
    }
    Ok(0)
}

async fn vm(c: &Client, out: &Out, cmd: VmCmd) -> anyhow::Result<u8> {
    match cmd {
        VmCmd::List => {
            let vms: Vec<VmInfo> = c.get("/v1/vms").await?;
            out.vm_list(&vms);
        }
        VmCmd::Show { name } => {
            let v: VmInfo = c.get(&format!("/v1/vms/{}", seg(&name)?)).await?;
            out.vm(&v);
        }
        VmCmd::Create {
            name,
            file,
            cpus,
            memory,
            disks,
            from_image,
            nics,
            kernel,
            initrd,
            cmdline,
            boot_disk,
            accel,
            max_memory,
            seed,
            no_seed,
            ssh_keys,
            user_data,
            start,
            wait,
        } => {
            let mut spec = match &file {
                Some(f) => {
                    let text = std::fs::read_to_string(f)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?;
                    VmSpec::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?
                }
                None => VmSpec::named(
                    name.as_deref()
                        .ok_or_else(|| anyhow::anyhow!("give a VM name or --file"))?,
                ),
            };
            if let Some(n) = name {
                spec.name = n;
            }
            if let Some(v) = cpus {
                spec.cpus = v;
            }
            if let Some(v) = memory {
                spec.memory = v;
            }
            for d in disks {
                spec.disks.push(d.parse::<DiskSpec>()?);
            }
            if from_image.is_some() {
                spec.from_image = from_image;
            }
            for n in nics {
                spec.nics.push(n.parse::<NicSpec>()?);
            }
            if kernel.is_some() {
                spec.boot.kernel = kernel.map(absolute).transpose()?;
            }
            if initrd.is_some() {
                spec.boot.initrd = initrd.map(absolute).transpose()?;
            }
            if cmdline.is_some() {
                spec.boot.cmdline = cmdline;
            }
            if boot_disk.is_some() {
                spec.boot.disk = boot_disk;
            }
            if max_memory.is_some() {
                spec.max_memory = max_memory;
            }
            if seed || !ssh_keys.is_empty() || user_data.is_some() {
                let s = spec.seed.get_or_insert_with(Default::default);
                for f in &ssh_keys {
                    let text = std::fs::read_to_string(f).map_err(|e| {
                        anyhow::anyhow!("cannot read SSH key file {}: {e}", f.display())
                    })?;
                    let keys = drover_proto::seed::keys_from_file(&text);
                    if keys.is_empty() {
                        anyhow::bail!("{} has no public key in it", f.display());
                    }
                    s.ssh_keys.extend(keys);
                }
                if let Some(f) = &user_data {
                    s.user_data = Some(std::fs::read_to_string(f).map_err(|e| {
                        anyhow::anyhow!("cannot read user-data file {}: {e}", f.display())
                    })?);
                }
            }
            if no_seed {
                spec.seed = None;
            }
            if let Some(a) = accel {
                spec.accel = Some(a.parse().map_err(anyhow::Error::msg)?);
            }
            for d in &mut spec.disks {
                if let Some(img) = d.image.take() {
                    d.image = Some(absolute(img)?);
                }
            }
            // Catch spec mistakes before talking to the daemon, with the same messages it would give.
            spec.validate()?;
            let v: VmInfo = c.post("/v1/vms", &spec).await?;
            if start {
                return start_vm(c, out, &v.name, &PickArgs::default(), &wait).await;
            }
            out.created(&v);
        }
        VmCmd::Start { name, pick, wait } => return start_vm(c, out, &name, &pick, &wait).await,
        VmCmd::Attach {
            name,
            kind,
            id,
            size,
            image,
            readonly,
            mac,
            forward,
            next_boot,
        } => {
            let device = match (kind, size, image) {
                (Kind::Disk, _, _) if mac.is_some() || !forward.is_empty() => {
                    anyhow::bail!("--mac and --forward are for NICs")
                }
                (Kind::Disk, Some(size), None) => drover_api::NewDevice::NewDisk { size },
                (Kind::Disk, None, Some(image)) => drover_api::NewDevice::Image {
                    path: absolute(image)?,
                    readonly,
                },
                (Kind::Disk, _, _) => {
                    anyhow::bail!("give either --size (a new disk) or --image (an existing one)")
                }
                (Kind::Nic, None, None) if !readonly => drover_api::NewDevice::Nic {
                    mac,
                    forwards: forward,
                },
                (Kind::Nic, _, _) => anyhow::bail!("--size, --image and --readonly are for disks"),
            };
            let req = drover_api::AttachRequest {
                id,
                device,
                next_boot,
            };
            let r: drover_api::ChangeResult = c
                .post(&format!("/v1/vms/{}/attach", seg(&name)?), &req)
                .await?;
            out.change(&r);
        }
        VmCmd::Detach {
            name,
            id,
            next_boot,
        } => {
            let req = drover_api::DetachRequest { id, next_boot };
            let p = out.progress(&format!(
                "detaching from {name} (the guest must release it)"
            ));
            let r: drover_api::ChangeResult = c
                .post(&format!("/v1/vms/{}/detach", seg(&name)?), &req)
                .await?;
            drop(p);
            out.change(&r);
        }
        VmCmd::Set {
            name,
            settings,
            next_boot,
        } => {
            let mut req = drover_api::SetRequest {
                next_boot,
                ..Default::default()
            };
            for s in settings {
                match s {
                    ShapeSet::Cpus(n) => req.cpus = Some(n),
                    ShapeSet::Memory(b) => req.memory = Some(b),
                }
            }
            let r: drover_api::ChangeResult = c
                .post(&format!("/v1/vms/{}/set", seg(&name)?), &req)
                .await?;
            out.change(&r);
        }
        VmCmd::GuestAccess(cmd) => match cmd {
            GuestAccessCmd::Grant {
                name,
                principal,
                ops,
            } => {
                let g: drover_api::GuestGrant = c
                    .post(
                        &format!("/v1/vms/{}/guest-access", seg(&name)?),
                        &drover_api::GuestGrantRequest { principal, ops },
                    )
                    .await?;
                if out.is_json() {
                    out.json_only(&g);
                } else {
                    println!("granted {} on {name}: {}", g.principal, g.ops.join(", "));
                    println!("secret (shown once): {}", g.secret);
                    println!(
                        "in the guest: DROVER_PRINCIPAL={} DROVER_SECRET={} drover-guest ...",
                        g.principal, g.secret
                    );
                }
            }
            GuestAccessCmd::Revoke { name, principal } => {
                let _: serde_json::Value = c
                    .call::<(), serde_json::Value>(
                        drover_api::Method::DELETE,
                        &format!("/v1/vms/{}/guest-access/{}", seg(&name)?, seg(&principal)?),
                        None,
                    )
                    .await?;
                out.line(&format!("revoked {principal} on {name}"));
            }
            GuestAccessCmd::List { name } => {
                let list: Vec<drover_api::GuestPrincipal> = c
                    .get(&format!("/v1/vms/{}/guest-access", seg(&name)?))
                    .await?;
                out.principals(&list);
            }
        },
        VmCmd::Audit { name } => {
            let list: Vec<drover_api::AuditEntry> =
                c.get(&format!("/v1/vms/{}/audit", seg(&name)?)).await?;
            out.audit(&list);
        }
        VmCmd::Config(cmd) => match cmd {
            ConfigCmd::List { name } => {
                let h: drover_api::ConfigHistoryView =
                    c.get(&format!("/v1/vms/{}/config", seg(&name)?)).await?;
                out.history(&h);
            }
            ConfigCmd::Show { name, generation } => {
                let cfg: drover_model::VmConfig = c
                    .get(&format!("/v1/vms/{}/config/{generation}", seg(&name)?))
                    .await?;
                out.config(&cfg);
            }
            ConfigCmd::Diff { name, from, to } => {
                let lines: Vec<String> = c
                    .get(&format!(
                        "/v1/vms/{}/config/diff?from={from}&to={to}",
                        seg(&name)?
                    ))
                    .await?;
                out.lines(&lines, &format!("generations {from} and {to} are the same"));
            }
            ConfigCmd::Promote { name, generation } => {
                let h: drover_api::ConfigHistoryView = c
                    .post(
                        &format!("/v1/vms/{}/config/promote", seg(&name)?),
                        &drover_api::PromoteRequest { generation },
                    )
                    .await?;
                out.line(&format!(
                    "generation {generation} is now the initial config of {name}"
                ));
                out.history(&h);
            }
            ConfigCmd::Persist { name, state, mode } => {
                let req = drover_api::PersistRequest {
                    enabled: state.map(|s| s == "on"),
                    mode: mode
                        .map(|m| m.parse::<drover_model::PersistMode>())
                        .transpose()?,
                };
                let v: VmInfo = c
                    .post(&format!("/v1/vms/{}/config/persist", seg(&name)?), &req)
                    .await?;
                out.line(&format!(
                    "persistence for {name}: {} (mode {})",
                    if v.persist { "on" } else { "off" },
                    v.persist_mode
                ));
                out.json_only(&v);
            }
            ConfigCmd::Journal { name } => {
                let j: Vec<drover_api::JournalEntry> =
                    c.get(&format!("/v1/vms/{}/journal", seg(&name)?)).await?;
                out.journal(&j);
            }
        },
        VmCmd::Migrate {
            name,
            to,
            shared_storage,
            offline,
            downtime_ms,
            bandwidth,
            cancel,
        } => {
            if cancel {
                let v: serde_json::Value = c
                    .post(
                        &format!("/v1/vms/{}/migrate/cancel", seg(&name)?),
                        &serde_json::json!({}),
                    )
                    .await?;
                let p = out.progress("");
                p.done(&format!(
                    "cancelling the migration of {name}; it keeps running here"
                ));
                out.json_only(&v);
                return Ok(0);
            }
            let to_name = to.context("--to REMOTE is required")?;
            let bandwidth = bandwidth
                .map(|b| drover_model::parse_size(&b))
                .transpose()
                .context("--bandwidth")?;
            let r = migrate_vm(
                c,
                out,
                &name,
                &to_name,
                MigrateOpts {
                    shared_storage,
                    offline,
                    downtime_ms,
                    bandwidth,
                },
            )
            .await?;
            out.json_only(&r);
        }
        VmCmd::Stop {
            name,
            timeout,
            force,
        } => {
            let p = out.progress(&format!("stopping {name}"));
            let v: VmInfo = c
                .post(
                    &format!("/v1/vms/{}/stop", seg(&name)?),
                    &StopRequest {
                        timeout_s: timeout,
                        force,
                    },
                )
                .await?;
            p.done(&format!("{name} stopped ({})", stop_how(&v)));
            out.json_only(&v);
        }
        VmCmd::Restart {
            name,
            timeout,
            force,
            wait,
        } => {
            let p = out.progress(&format!("restarting {name}"));
            let v: VmInfo = c
                .post(
                    &format!("/v1/vms/{}/restart", seg(&name)?),
                    &StopRequest {
                        timeout_s: timeout,
                        force,
                    },
                )
                .await?;
            p.done(&format!("{name} restarted (pid {})", v.pid.unwrap_or(0)));
            if wait.wait {
                wait_agent(c, out, &name, wait.wait_timeout).await?;
            } else {
                out.json_only(&v);
            }
        }
        VmCmd::Hibernate { name } => {
            let p = out.progress(&format!("hibernating {name}"));
            let v: VmInfo = c
                .post(&format!("/v1/vms/{}/hibernate", seg(&name)?), &())
                .await?;
            match &v.hibernation {
                Some(h) => p.done(&format!(
                    "{name} hibernated: {} on disk in {} (state {}); `drover vm resume {name}` brings it back",
                    format_size(h.bytes),
                    h.dir.display(),
                    h.state
                )),
                None => p.done(&format!("{name} is {}", v.state)),
            }
            out.json_only(&v);
        }
        VmCmd::Resume {
            name,
            shape,
            on,
            wait,
        } => {
            let req = shape.request()?;
            let mut target = c.clone();
            if let Some(r) = &on {
                let v: VmInfo = c.get(&format!("/v1/vms/{}", seg(&name)?)).await?;
                let Some(h) = v.hibernation else {
                    out.error(&anyhow::anyhow!("VM {name} is {}, not hibernated", v.state));
                    return Ok(4);
                };
                if let Some(code) = check_on(c, out, &name, &h.state, r, &req).await? {
                    return Ok(code);
                }
                let opts = MigrateOpts {
                    offline: true,
                    ..Default::default()
                };
                migrate_vm(c, out, &name, r, opts).await?;
                target = remote_client(r)?;
            }
            let c = &target;
            let p = out.progress(&format!("resuming {name}"));
            let v: VmInfo = c
                .post(&format!("/v1/vms/{}/resume", seg(&name)?), &req)
                .await?;
            p.done(&format!("{name} resumed (pid {})", v.pid.unwrap_or(0)));
            let taken = identity_taken(out, &name, &req, &v);
            if wait.wait {
                wait_agent(c, out, &name, wait.wait_timeout).await?;
            } else {
                out.json_only(&v);
            }
            if !taken {
                return Ok(6);
            }
        }
        VmCmd::Clone {
            source,
            name,
            count,
            dry_run,
        } => {
            let Some((vm, state)) = source.split_once('/') else {
                anyhow::bail!(
                    "{source}: give the template and its state as VM/STATE (e.g. tmpl/s1)"
                );
            };
            let n = count.unwrap_or(1);
            let p = out.progress(&format!(
                "{} {n} clone(s) of {vm}/{state}",
                if dry_run { "checking" } else { "making" }
            ));
            let r: drover_api::CloneResult = c
                .post_stream(
                    &format!("/v1/vms/{}/states/{}/clone", seg(vm)?, seg(state)?),
                    &drover_api::CloneRequest {
                        name,
                        count,
                        dry_run,
                    },
                    // Without a spinner, each clone on a line of its own.
                    |line| p.set(line),
                )
                .await?;
            if dry_run {
                p.done(&format!(
                    "{} clone(s) of {vm}/{} can be made: {}",
                    r.checked.len(),
                    r.state,
                    r.checked.join(", ")
                ));
                out.json_only(&r);
                return Ok(0);
            }
            let failed = r
                .clones
                .iter()
                .filter(|c| c.identity_error.is_some())
                .count();
            p.done(&format!(
                "{} clone(s) of {vm}/{} running in {:.1}s{}",
                r.clones.len(),
                r.state,
                r.total_ms as f64 / 1000.0,
                if failed > 0 {
                    format!("; {failed} without their new identity")
                } else {
                    String::new()
                }
            ));
            if out.is_json() {
                out.json_only(&r);
            } else {
                for cl in &r.clones {
                    let macs: Vec<&str> = cl.macs.values().map(String::as_str).collect();
                    out.line(&format!(
                        "{}\tpid {}\trunning {} ms\tagent {}\tmac {}\tmachine-id {}{}",
                        cl.name,
                        cl.pid.unwrap_or(0),
                        cl.running_ms,
                        cl.agent_ms
                            .map(|ms| format!("{ms} ms"))
                            .unwrap_or_else(|| "-".into()),
                        if macs.is_empty() {
                            "-".to_string()
                        } else {
                            macs.join(",")
                        },
                        cl.machine_id,
                        cl.identity_error
                            .as_deref()
                            .map(|e| format!("\tidentity not applied: {e}"))
                            .unwrap_or_default()
                    ));
                }
            }
            if failed > 0 {
                return Ok(6);
            }
        }
        VmCmd::Delete {
            name,
            force,
            discard_changes,
        } => {
            let v: VmInfo = c
                .call::<(), VmInfo>(
                    drover_api::Method::DELETE,
                    &format!(
                        "/v1/vms/{}?force={force}&discard_changes={discard_changes}",
                        seg(&name)?
                    ),
                    None,
                )
                .await?;
            out.line(&format!("deleted VM {}", v.name));
            for d in v.config.disks.iter().filter(|d| !d.owned && !d.readonly) {
                let how = if v.unwritten.contains_key(d.id.as_str()) {
                    "left as it was at the VM's first save (--discard-changes)"
                } else {
                    "kept, with the VM's latest data"
                };
                out.line(&format!("  disk {}: {} {how}", d.id, d.path.display()));
            }
            out.json_only(&v);
        }
        VmCmd::Console {
            name,
            attach: true,
            detach_key,
            ..
        } => attach::attach(c, &seg(&name)?, detach_key).await?,
        VmCmd::Console { name, follow, .. } => {
            let name = seg(&name)?;
            let mut offset = 0u64;
            let mut stdout = std::io::stdout();
            loop {
                let (headers, bytes) = c
                    .get_bytes(&format!("/v1/vms/{name}/console?offset={offset}"))
                    .await?;
                let next = headers
                    .get("x-drover-next-offset")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(offset + bytes.len() as u64);
                stdout.write_all(&bytes)?;
                stdout.flush()?;
                let more = next > offset;
                offset = next;
                if !follow && !more {
                    break;
                }
                if !more {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        VmCmd::Cp { src, dst, mode } => {
            let r = copy::copy(c, out, &src, &dst, mode.as_deref()).await?;
            out.json_only(&r);
        }
        VmCmd::Exec {
            name,
            timeout,
            stdin,
            command,
        } => {
            let stdin = match stdin {
                None => None,
                Some(p) if p.as_os_str() == "-" => {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                    Some(s)
                }
                Some(p) => Some(
                    std::fs::read_to_string(&p)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?,
                ),
            };
            let r: drover_proto::ExecResult = c
                .post(
                    &format!("/v1/vms/{}/exec", seg(&name)?),
                    &ExecRequest {
                        argv: command,
                        stdin,
                        timeout_s: timeout,
                    },
                )
                .await?;
            return Ok(out.exec(&r));
        }
    }
    Ok(0)
}

fn absolute(p: PathBuf) -> anyhow::Result<PathBuf> {
    Ok(std::path::absolute(&p)?)
}

fn stop_how(v: &VmInfo) -> String {
    v.last_exit
        .as_ref()
        .map(|e| e.detail.clone().unwrap_or_else(|| e.reason.clone()))
        .unwrap_or_default()
}

async fn start_vm(
    c: &Client,
    out: &Out,
    name: &str,
    pick: &PickArgs,
    wait: &WaitArgs,
) -> anyhow::Result<u8> {
    let p = out.progress(&format!("starting {name}"));
    let req = drover_api::StartRequest {
        config: pick.config,
        without: pick.without.clone(),
        with: pick.with.clone(),
        cpus: pick.set.iter().rev().find_map(|s| match s {
            ShapeSet::Cpus(n) => Some(*n),
            ShapeSet::Memory(_) => None,
        }),
        memory: pick.set.iter().rev().find_map(|s| match s {
            ShapeSet::Memory(b) => Some(*b),
            ShapeSet::Cpus(_) => None,
        }),
        save_as_generation: pick.save_as_generation,
        fence: None,
    };
    let v: VmInfo = c
        .post(&format!("/v1/vms/{}/start", seg(name)?), &req)
        .await?;
    let accel = v.accel.map(|a| a.to_string()).unwrap_or_default();
    p.done(&format!(
        "{name} running (pid {}, {accel}, {} vCPU, {})",
        v.pid.unwrap_or(0),
        v.config.cpus,
        format_size(v.config.memory)
    ));
    if wait.wait {
        wait_agent(c, out, name, wait.wait_timeout).await?;
    } else {
        out.json_only(&v);
    }
    Ok(0)
}

/// How `vm migrate` moves a VM (its flags).
#[derive(Debug, Default, Clone, Copy)]
struct MigrateOpts {
    shared_storage: bool,
    offline: bool,
    downtime_ms: Option<u64>,
    bandwidth: Option<u64>,
}

/// `--nic ID,mac=MAC` of `vm resume`.
fn parse_nic_mac(s: &str) -> anyhow::Result<drover_api::NicMac> {
    let bad =
        || anyhow::anyhow!("--nic {s}: give it as ID,mac=MAC (e.g. net0,mac=52:54:00:12:34:56)");
    let (id, rest) = s.split_once(',').ok_or_else(bad)?;
    if rest.split(',').any(|kv| kv.starts_with("net=")) {
        // NICs attach to QEMU user networking or to a tap device the host owns; droverd has no
        // named host networks to move a NIC between, so there is nothing `net=` could name.
        anyhow::bail!(
            "--nic {s}: net= is not supported: this host has no named networks (a NIC is user-mode \
             NAT or an existing tap device); resume or restore as it was, then `drover vm detach` \
             the NIC and `drover vm attach` one on the backend you want"
        );
    }
    let mac = rest.strip_prefix("mac=").ok_or_else(bad)?;
    if id.is_empty() || mac.is_empty() || mac.contains(',') {
        return Err(bad());
    }
    let mac = mac
        .parse::<drover_model::MacAddr>()
        .map_err(|e| anyhow::anyhow!("--nic {s}: {e}"))?;
    Ok(drover_api::NicMac {
        id: id.to_string(),
        mac,
    })
}

/// Move VM `name` to remote `to_name`, showing progress; what `vm migrate` and the `--on REMOTE`
/// of `vm resume` and `snapshot restore` do.
async fn migrate_vm(
    c: &Client,
    out: &Out,
    name: &str,
    to_name: &str,
    opts: MigrateOpts,
) -> anyhow::Result<drover_api::MigrateResult> {
    let all = remotes::Remotes::load(&remotes::config_file()?)?;
    let spec = all.get(to_name)?.clone();
    let p = out.progress(&format!("migrating {name} to {to_name}"));
    let (mut last_stage, mut last_line) = (String::new(), Instant::now());
    let r: drover_api::MigrateResult = c
        .post_stream(
            &format!("/v1/vms/{}/migrate", seg(name)?),
            &drover_api::MigrateRequest {
                to: spec,
                to_name: to_name.to_string(),
                shared_storage: opts.shared_storage,
                offline: opts.offline,
                downtime_ms: opts.downtime_ms,
                bandwidth: opts.bandwidth,
            },
            |line| {
                // Without a spinner, a line per stage or per second, not per update.
                let text = migrate_line(line);
                let stage = text.split(':').next().unwrap_or_default().to_string();
                if p.is_live()
                    || stage != last_stage
                    || last_line.elapsed() >= Duration::from_secs(1)
                {
                    p.set(&text);
                    last_stage = stage;
                    last_line = Instant::now();
                }
            },
        )
        .await?;
    p.done(&if r.offline {
        format!(
            "{name} moved to {} (offline, {} of disks) in {:.1}s",
            r.to,
            output::fmt_bytes(r.disk_bytes),
            r.total_ms as f64 / 1000.0
        )
    } else {
        format!(
            "{name} now runs on {} after {:.1}s; the guest was paused {} ms ({} of memory, {} of disks copied)",
            r.to,
            r.total_ms as f64 / 1000.0,
            r.downtime_ms,
            output::fmt_bytes(r.ram_bytes),
            output::fmt_bytes(r.disk_bytes)
        )
    });
    Ok(r)
}

/// A client for remote `name`.
fn remote_client(name: &str) -> anyhow::Result<Client> {
    let all = remotes::Remotes::load(&remotes::config_file()?)?;
    Ok(all.get(name)?.client()?)
}

/// Check state `state` of `vm` against remote `on` (its `GET /v1/host`; `None`: the VM's host)
/// as `cpus`/`memory`.
async fn check_state(
    c: &Client,
    vm: &str,
    state: &str,
    on: Option<&str>,
    shape: &drover_api::ResumeRequest,
) -> anyhow::Result<drover_api::StateCheck> {
    let target = match on {
        None => None,
        Some(r) => {
            let h: drover_api::HostInfo = remote_client(r)?
                .get("/v1/host")
                .await
                .with_context(|| format!("asking {r} what it offers"))?;
            Some(Box::new(h))
        }
    };
    Ok(c.post(
        &format!("/v1/vms/{}/states/{}/check", seg(vm)?, seg(state)?),
        &drover_api::StateCheckRequest {
            target,
            target_name: on.map(str::to_string),
            cpus: shape.cpus,
            memory: shape.memory,
            nics: shape.nics.clone(),
            new_identity: shape.new_identity,
        },
    )
    .await?)
}

/// Check state `state` of `vm` against remote `on` before moving anything: `Some(4)` (the
/// blocking lines printed) when it does not fit.
async fn check_on(
    c: &Client,
    out: &Out,
    vm: &str,
    state: &str,
    on: &str,
    shape: &drover_api::ResumeRequest,
) -> anyhow::Result<Option<u8>> {
    let r = check_state(c, vm, state, Some(on), shape).await?;
    if r.fits {
        return Ok(None);
    }
    let why: Vec<&str> = r
        .differences
        .iter()
        .filter(|d| d.verdict == drover_api::Verdict::Blocking)
        .map(|d| d.note.as_str())
        .collect();
    out.error(&anyhow::anyhow!(
        "state {state} of {vm} cannot be restored on {on}, nothing was moved: {}",
        why.join("; ")
    ));
    Ok(Some(4))
}

/// After a resume or restore as `req`: print what the agent changed in the guest; false when a
/// new identity or MACs were asked for and not taken.
fn identity_taken(out: &Out, name: &str, req: &drover_api::ResumeRequest, v: &VmInfo) -> bool {
    if req.nics.is_empty() && !req.new_identity {
        return true;
    }
    let list = |l: &[String]| {
        if l.is_empty() {
            "none".to_string()
        } else {
            l.join(", ")
        }
    };
    match &v.identity {
        Some(i) => match &i.error {
            None => {
                out.line(&format!(
                    "  changed in the guest: {}; hooks: {}",
                    list(&i.changed),
                    list(&i.hooks)
                ));
                true
            }
            Some(e) => {
                out.error(&anyhow::anyhow!(
                    "{name} runs, but its new identity or MACs were not applied: {e}"
                ));
                false
            }
        },
        None => false,
    }
}

async fn wait_agent(c: &Client, out: &Out, name: &str, timeout: u64) -> anyhow::Result<()> {
    let p = out.progress(&format!("waiting for the guest agent in {name}"));
    let st: drover_api::AgentStatus = c
        .get(&format!("/v1/vms/{}/agent?wait_s={timeout}", seg(name)?))
        .await?;
    let after = st
        .ready_after_ms
        .map(|ms| format!(" {:.2}s after start", ms as f64 / 1000.0))
        .unwrap_or_default();
    p.done(&format!(
        "agent ready{after} (agent {})",
        st.info
            .as_ref()
            .map(|i| i.agent_version.as_str())
            .unwrap_or("?")
    ));
    let v: VmInfo = c.get(&format!("/v1/vms/{}", seg(name)?)).await?;
    out.json_only(&v);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn nic_macs_parse_as_id_comma_mac() {
        let n = super::parse_nic_mac("net0,mac=52:54:00:AB:cd:01").unwrap();
        assert_eq!(
            (n.id.as_str(), n.mac.to_string().as_str()),
            ("net0", "52:54:00:ab:cd:01")
        );
        let e = super::parse_nic_mac("net0,mac=01:00:5e:00:00:01")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--nic net0,mac=01:00:5e:00:00:01"), "{e}");
        for bad in [
            "net0",
            "net0,52:54:00:ab:cd:01",
            ",mac=52:54:00:ab:cd:01",
            "net0,mac=",
            "net0,mac=a,b",
        ] {
            let e = super::parse_nic_mac(bad).unwrap_err().to_string();
            assert!(e.contains("ID,mac=MAC"), "{bad}: {e}");
        }
        // Moving a NIC to another network is refused by name, with what to do instead.
        for net in ["net0,net=lan", "net0,mac=52:54:00:ab:cd:01,net=lan"] {
            let e = super::parse_nic_mac(net).unwrap_err().to_string();
            assert!(
                e.contains("net= is not supported") && e.contains("vm attach"),
                "{e}"
            );
        }
    }
}
