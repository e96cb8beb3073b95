//! The QEMU command line for a VM.
//!
//! Built from PLATFORM.md's fastest measured recipe: q35 + qboot + an ELF vmlinux under TCG, no
//! default devices, virtio everywhere, and `pcie-root-port`s reserved at start so disks and NICs
//! can be hot-plugged later (q35 cannot add root ports at run time).

use drover_model::{Accel, DiskConfig, NicBackend, Platform, Plugged, VmConfig};
use std::path::{Path, PathBuf};

/// DIMM slots reserved when memory hot-plug is on.
pub const MEMORY_SLOTS: u32 = 8;
/// Longest unix socket path the kernel accepts (`sun_path` minus its NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// Guest RAM is this much larger than configured, so that its size is not a multiple of 256 KiB
/// (for VMs whose [`Platform::ram_pad`] says so: those created on a QEMU older than 9.0).
///
/// QEMU 7.2 syncs the migration dirty bitmap of such a RAM block 64 pages at a time, and that fast
/// path forgets to re-arm TCG's dirty tracking in the vCPU's TLB (fixed upstream in QEMU 9.0,
/// commit 03bfc2188f "physmem: Fix migration dirty bitmap coherency with TCG memory access"): the
/// guest's stores through TLB entries it already has are then not tracked during a live
/// migration, and the destination runs on stale pages; it hangs (a seqcount left odd, a spinlock
/// left held) or corrupts memory. bench/migrate_hang.py: 10 of 40 migrations broke the guest with
/// the exact size, none of 60 with the pad. Any other size takes QEMU's page-by-page path, which
/// is correct (it costs some migration time, not downtime). QEMU rounds RAM to 8 KiB. Harmless
/// under KVM; kept there too so that states and migrations do not depend on the accelerator.
/// A VM keeps its choice for life: the RAM size must be the same wherever its state loads.
pub const RAM_PAD: u64 = 8 << 10;

/// Files a running VM's QEMU uses, all inside its run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPaths {
    /// The run directory.
    pub dir: PathBuf,
    /// QMP socket (QEMU is the server).
    pub qmp: PathBuf,
    /// Guest channel port A socket (`org.drover.req`).
    pub port_a: PathBuf,
    /// Guest channel port B socket (`org.drover.evt`).
    pub port_b: PathBuf,
    /// QEMU's pid file.
    pub pidfile: PathBuf,
    /// QEMU's own stdout/stderr.
    pub qemu_log: PathBuf,
    /// Guest RAM as a shared file: saving state then needs only the device state.
    pub ram: PathBuf,
    /// The serial console's socket (QEMU is the server): what is written to it is the guest's
    /// serial input; output goes to the console log whether or not anyone is connected.
    pub console: PathBuf,
}

impl RunPaths {
    /// The standard layout under `dir`.
    pub fn new(dir: &Path) -> Self {
        RunPaths {
            dir: dir.to_path_buf(),
            qmp: dir.join("qmp.sock"),
            port_a: dir.join("port-a.sock"),
            port_b: dir.join("port-b.sock"),
            pidfile: dir.join("qemu.pid"),
            qemu_log: dir.join("qemu.log"),
            ram: dir.join("ram"),
            console: dir.join("console.sock"),
        }
    }

    /// The longest socket path, which must fit in `sun_path`.
    pub fn longest_socket(&self) -> &Path {
        [&self.qmp, &self.port_a, &self.port_b]
            .into_iter()
            .max_by_key(|p| p.as_os_str().len())
            .map(PathBuf::as_path)
            .unwrap_or(&self.qmp)
    }
}

/// A kernel to boot directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBoot {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Initrd, if any.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

/// One layer of a disk's backing chain, top first, when droverd names the chain itself: some
/// layer is a file QEMU may not open by name (outside droverd's state dir), handed to it as a
/// descriptor in an fd set (`/dev/fdset/N`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLayer {
    /// A path, or `/dev/fdset/N`.
    pub filename: String,
    /// Its format.
    pub format: drover_model::DiskFormat,
}

/// A descriptor QEMU inherits, put in fd set `set` (`-add-fd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdArg {
    /// The descriptor's number in droverd (kept in QEMU).
    pub fd: i32,
    /// The fd set.
    pub set: u32,
    /// What it is, for `query-fdsets`.
    pub opaque: String,
}

/// Everything the command line needs besides the config.
#[derive(Debug, Clone)]
pub struct LaunchSpec<'a> {
    /// The VM.
    pub config: &'a VmConfig,
    /// The machine type, CPU model and RAM layout it is pinned to.
    pub platform: &'a Platform,
    /// Arguments of the QEMU installation itself (`-L DIR` for a private one).
    pub install_args: Vec<String>,
    /// The accelerator to use.
    pub accel: Accel,
    /// Where sockets and logs live.
    pub paths: &'a RunPaths,
    /// The serial console log (kept across runs, appended to).
    pub console_log: &'a Path,
    /// Direct kernel boot; `None` boots the disk named in the config with SeaBIOS.
    pub kernel: Option<KernelBoot>,
    /// Free root ports reserved for hot-plug.
    pub hotplug_ports: u32,
    /// vCPUs the VM may grow to while running.
    pub max_cpus: u32,
    /// Use qboot for kernel boots when it exists.
    pub qboot: Option<PathBuf>,
    /// Back guest RAM with `paths.ram` (shared), so state can be captured from outside QEMU.
    pub ram_file: bool,
    /// Map this file privately as guest RAM instead (a restored state's memory): the guest runs
    /// at once on the saved pages and its writes stay its own, so the state is never changed.
    pub ram_private: Option<&'a Path>,
    /// Start with the CPUs stopped (`-S`); an incoming migration then leaves the VM paused.
    pub stopped: bool,
    /// A QEMU that only holds the VM's state and never runs it (it receives a state capture):
    /// the same devices, but disks on `null-co` and NICs without host side, so it touches
    /// neither the images nor the host's ports the running VM uses.
    pub detached: bool,
    /// Wait for an incoming migration (a state restore) instead of booting.
    pub incoming: bool,
    /// The VM's generation id (a UUID), given to the guest by a `vmgenid` device; a new one on
    /// every restore or clone tells the guest it is not the only copy of its past. Anything that
    /// is not a UUID is left out rather than let into the command line, and so is the device when
    /// the VM boots with qboot, which cannot load its ACPI tables.
    pub generation_id: Option<&'a str>,
    /// Disks (by id) whose chain droverd names itself, top first (see [`ChainLayer`]).
    pub disk_chains: &'a std::collections::BTreeMap<String, Vec<ChainLayer>>,
    /// Descriptors for the fd sets those chains name.
    pub fds: &'a [FdArg],
    /// vCPUs and DIMMs the VM it continues had hot-plugged (a restore, a migration's
    /// destination): made again with the same ids and places, on top of a boot shape that is the
    /// config less them. Empty for a boot.
    pub plugged: &'a Plugged,
}

/// QEMU's option-value escaping: a comma inside a value is doubled.
fn esc(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// `8-4-4-4-12` hex digits.
fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// QEMU device/node id of a disk.
pub fn disk_node(d: &DiskConfig) -> String {
    format!("disk-{}", d.id)
}

/// `bytes` (whole MiB, as configured), plus [`RAM_PAD`] when `pad`, as a QEMU size.
fn ram_size(bytes: u64, pad: bool) -> String {
    format!("{}K", ram_bytes(bytes, pad) >> 10)
}

/// The size of the guest RAM backend (the RAM file QEMU maps) for `bytes` of memory.
pub fn ram_bytes(bytes: u64, pad: bool) -> u64 {
    ((bytes >> 20) << 20) + if pad { RAM_PAD } else { 0 }
}

/// QEMU device id of guest-channel port A: QEMU names it in `VSERPORT_CHANGE` when the guest
/// opens or closes the port (only ports with an id are reported).
pub const PORT_A_DEVICE: &str = "vport-a";
/// QEMU device id of guest-channel port B.
pub const PORT_B_DEVICE: &str = "vport-b";
/// QOM path of the guest channel's virtio device, for `x-query-virtio-status`.
pub const VSER_VIRTIO_PATH: &str = "/machine/peripheral/vser0/virtio-backend";

/// QEMU id of hot-plug root port `slot`.
pub fn port_id(slot: u8) -> String {
    format!("hp{slot}")
}

/// Where a device sits: on its hot-plug root port, or at its slot on the root bus.
fn placement(slot: Option<u8>, addr: Option<u8>) -> String {
    match (slot, addr) {
        (Some(s), _) => format!(",bus={}", port_id(s)),
        (None, Some(a)) => format!(",bus=pcie.0,addr={a:#04x}"),
        (None, None) => String::new(),
    }
}

/// Subnets of user-mode NICs: the n-th cold-plugged one gets `10.0.(2+n).0/24`, the one on
/// hot-plug port `s` gets `10.0.(2+MAX_NICS+s).0/24`. Each user NIC is its own NAT, and two of
/// them on QEMU's default 10.0.2.0/24 give the guest two equal routes: replies to one NIC's
/// forwards then leave through the other and never arrive. A NIC's subnet depends on nothing
/// hot-plugged beside it, and stays on later boots (hot-plugged devices keep their port).
pub fn user_net_numbers(c: &VmConfig) -> std::collections::BTreeMap<String, u8> {
    let mut out = std::collections::BTreeMap::new();
    let mut cold = 0u8;
    for n in &c.nics {
        if !matches!(n.backend, NicBackend::User { .. }) {
            continue;
        }
        let k = match n.slot {
            Some(s) => (drover_model::MAX_NICS as u8).saturating_add(s),
            None => {
                cold = cold.saturating_add(1);
                cold - 1
            }
        };
        out.insert(n.id.to_string(), k);
    }
    out
}

/// The `net=`, `host=`, `dns=` and `dhcpstart=` options of user NIC number `k` (none for 0:
/// QEMU's default 10.0.2.0/24 is what the first one always had).
pub fn user_net_options(k: u8) -> Option<[(&'static str, String); 4]> {
    if k == 0 {
        return None;
    }
    let third = 2u8.saturating_add(k);
    Some([
        ("net", format!("10.0.{third}.0/24")),
        ("host", format!("10.0.{third}.2")),
        ("dns", format!("10.0.{third}.3")),
        ("dhcpstart", format!("10.0.{third}.15")),
    ])
}

fn user_net(nets: &std::collections::BTreeMap<String, u8>, n: &drover_model::NicConfig) -> String {
    nets.get(n.id.as_str())
        .and_then(|k| user_net_options(*k))
        .map(|opts| opts.iter().map(|(k, v)| format!(",{k}={v}")).collect())
        .unwrap_or_default()
}

/// QEMU id of a NIC's netdev and device.
pub fn nic_node(id: &str) -> String {
    format!("nic-{id}")
}

/// A disk's `-blockdev` with its chain named top first: every layer's `backing` is the next
/// one, the last one's is left to its header (opened by QEMU, as QEMU's user).
pub fn chain_blockdev(node: &str, readonly: bool, chain: &[ChainLayer]) -> serde_json::Value {
    let mut below: Option<serde_json::Value> = None;
    for (i, l) in chain.iter().enumerate().rev() {
        let top = i == 0;
        let ro = !top || readonly;
        let mut v = serde_json::json!({
            "driver": l.format.to_string(),
            "read-only": ro,
            "file": {"driver": "file", "filename": l.filename, "read-only": ro},
        });
        if top {
            v["node-name"] = node.into();
            v["discard"] = "unmap".into();
        }
        if let Some(b) = below.take() {
            v["backing"] = b;
        }
        below = Some(v);
    }
    below.unwrap_or(serde_json::Value::Null)
}

/// Build the argument list (without the program name).
pub fn build(spec: &LaunchSpec<'_>) -> Vec<String> {
    // A config from before PCI slots were recorded boots with the slots it always had.
    let pinned = spec.config.pinned();
    let c = &pinned;
    let p = spec.paths;
    let mut a: Vec<String> = Vec::new();
    let pad = spec.platform.ram_pad;
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let install: Vec<&str> = spec.install_args.iter().map(String::as_str).collect();
    push(&install);
    push(&["-name", &format!("guest={},debug-threads=on", c.name)]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    match spec.accel {
        // `-cpu host` needs arch-capabilities masked on some hosts (PLATFORM.md); harmless elsewhere.
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host,-arch-capabilities"]),
        Accel::Tcg => push(&["-accel", "tcg", "-cpu", spec.platform.cpu_arg()]),
    }
    push(&["-machine", spec.platform.machine_arg()]);
    if spec.kernel.is_some() {
        if let Some(qboot) = &spec.qboot {
            push(&["-bios", &esc(qboot)]);
        }
    }
    let plugged = spec.plugged;
    let (cpus, memory) = (plugged.base_cpus(c), plugged.base_memory(c));
    push(&[
        "-smp",
        &format!("cpus={cpus},maxcpus={}", spec.max_cpus.max(c.cpus)),
    ]);
    match c.max_memory {
        // DIMM slots for memory hot-plug; only when asked for, since the ACPI memory devices
        // cost the guest boot time, and only with room to grow: QEMU refuses `slots=` with a
        // `maxmem` equal to the size.
        Some(max) if max > memory => push(&[
            "-m",
            &format!(
                "size={},slots={MEMORY_SLOTS},maxmem={}",
                ram_size(memory, pad),
                ram_size(max, pad)
            ),
        ]),
        _ => push(&["-m", &ram_size(memory, pad)]),
    }
    if let Some(file) = spec.ram_private {
        push(&[
            "-object",
            &format!(
                "memory-backend-file,id=ram0,size={},mem-path={},share=off",
                ram_size(memory, pad),
                esc(file)
            ),
            "-machine",
            "memory-backend=ram0",
        ]);
    } else if spec.ram_file {
        push(&[
            "-object",
            &format!(
                "memory-backend-file,id=ram0,size={},mem-path={},share=on",
                ram_size(memory, pad),
                esc(&p.ram)
            ),
            "-machine",
            "memory-backend=ram0",
        ]);
    }
    // In the order QEMU made them: a state names vCPUs by that order.
    for cpu in &plugged.cpus {
        push(&[
            "-device",
            &format!(
                "{},id={},socket-id={},core-id={},thread-id={}",
                cpu.driver, cpu.id, cpu.socket, cpu.core, cpu.thread
            ),
        ]);
    }
    for d in &plugged.dimms {
        let (dimm, mem) = crate::hotplug::dimm_ids(&d.id);
        push(&[
            "-object",
            &format!("memory-backend-ram,id={mem},size={}", d.bytes),
            "-device",
            &format!(
                "pc-dimm,id={dimm},memdev={mem},addr={},slot={}",
                d.addr, d.slot
            ),
        ]);
    }
    if spec.stopped {
        push(&["-S"]);
    }
    if spec.incoming {
        push(&["-incoming", "defer"]);
    }
    // A socket chardev with a log file: QEMU writes the guest's output to the log whether or not
    // a client is connected (checked on 7.2 and 10.0), and a client's bytes are the guest's
    // serial input. A detached QEMU never runs the guest: output to a file is enough.
    let console = if spec.detached {
        format!("file,id=console,path={},append=on", esc(spec.console_log))
    } else {
        format!(
            "socket,id=console,path={},server=on,wait=off,logfile={},logappend=on",
            esc(&p.console),
            esc(spec.console_log)
        )
    };
    push(&["-chardev", &console, "-serial", "chardev:console"]);
    if let Some(k) = &spec.kernel {
        push(&["-kernel", &esc(&k.kernel)]);
        if let Some(initrd) = &k.initrd {
            push(&["-initrd", &esc(initrd)]);
        }
        push(&["-append", &k.cmdline]);
    }
    // qboot cannot load vmgenid's ACPI tables (its linker/loader lacks WRITE_POINTER): QEMU then
    // hangs before the kernel. With qboot the device is left out; the guest still learns its
    // generation id from the host through its agent.
    let qboot_boot = spec.kernel.is_some() && spec.qboot.is_some();
    if let Some(g) = spec.generation_id.filter(|g| is_uuid(g) && !qboot_boot) {
        push(&["-device", &format!("vmgenid,id=vmgenid0,guid={g}")]);
    }
    let boot_disk = match &c.boot {
        drover_model::Boot::Disk { disk } => Some(disk.clone()),
        _ => None,
    };
    if !spec.detached {
        for f in spec.fds {
            let opaque: String = f
                .opaque
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '.'))
                .collect();
            push(&[
                "-add-fd",
                &format!("fd={},set={},opaque={opaque}", f.fd, f.set),
            ]);
        }
    }
    // Disks and NICs at their recorded root-bus slots come first (see the root ports below);
    // those on hot-plug ports after the ports.
    let mut behind_ports: Vec<String> = Vec::new();
    for d in &c.disks {
        let node = disk_node(d);
        let blockdev = if spec.detached {
            serde_json::json!({
                "driver": "null-co",
                "node-name": node,
                "read-only": d.readonly,
                "size": d.size,
                "read-zeroes": true,
            })
        } else if let Some(chain) = spec.disk_chains.get(d.id.as_str()) {
            chain_blockdev(&node, d.readonly, chain)
        } else {
            serde_json::json!({
                "driver": d.format.to_string(),
                "node-name": node,
                "read-only": d.readonly,
                "discard": "unmap",
                "file": {"driver": "file", "filename": d.path, "read-only": d.readonly},
            })
        };
        push(&["-blockdev", &blockdev.to_string()]);
        let mut dev = format!(
            "virtio-blk-pci,drive={node},id={node},serial={}{}",
            d.id,
            placement(d.slot, d.addr)
        );
        if boot_disk.as_ref() == Some(&d.id) {
            dev.push_str(",bootindex=0");
        }
        if d.slot.is_some() {
            behind_ports.push(dev);
        } else {
            push(&["-device", &dev]);
        }
    }
    let user_nets = user_net_numbers(c);
    for n in &c.nics {
        let node = nic_node(n.id.as_str());
        let netdev = match &n.backend {
            _ if spec.detached => format!("user,id={node},restrict=on{}", user_net(&user_nets, n)),
            NicBackend::User { forwards } => {
                let mut s = format!("user,id={node}{}", user_net(&user_nets, n));
                for f in forwards {
                    let proto = match f.proto {
                        drover_model::Proto::Tcp => "tcp",
                        drover_model::Proto::Udp => "udp",
                    };
                    s.push_str(&format!(
                        ",hostfwd={proto}:{}:{}-:{}",
                        f.host_addr, f.host_port, f.guest_port
                    ));
                }
                s
            }
            // No vhost on these hosts (PLATFORM.md), and Drover does not run ifup scripts.
            NicBackend::Tap { ifname } => {
                format!("tap,id={node},ifname={ifname},script=no,downscript=no,vhost=off")
            }
        };
        push(&["-netdev", &netdev]);
        let dev = format!(
            "virtio-net-pci,netdev={node},id={node},mac={}{}",
            n.mac,
            placement(n.slot, n.addr)
        );
        if n.slot.is_some() {
            behind_ports.push(dev);
        } else {
            push(&["-device", &dev]);
        }
    }
    // Root ports and the guest channel take the root-bus slots the devices leave free, in this
    // order: ports keep their order (and so the guest's bus numbers behind them) whatever the
    // devices are, and with devices from before slots were recorded they land where they did.
    for i in 0..spec.hotplug_ports {
        push(&[
            "-device",
            &format!(
                "pcie-root-port,id={},chassis={},bus=pcie.0",
                port_id(i as u8),
                i + 1
            ),
        ]);
    }
    push(&["-device", "virtio-serial-pci,id=vser0"]);
    for (id, dev, path, name) in [
        ("porta", PORT_A_DEVICE, &p.port_a, drover_proto::PORT_A_NAME),
        ("portb", PORT_B_DEVICE, &p.port_b, drover_proto::PORT_B_NAME),
    ] {
        push(&[
            "-chardev",
            &format!("socket,id={id},path={},server=on,wait=off", esc(path)),
            "-device",
            &format!("virtserialport,bus=vser0.0,chardev={id},name={name},id={dev}"),
        ]);
    }
    // Devices that were hot-plugged go back on their ports, which now exist.
    for dev in &behind_ports {
        push(&["-device", dev]);
    }
    push(&["-qmp", &format!("unix:{},server=on,wait=off", esc(&p.qmp))]);
    push(&["-pidfile", &esc(&p.pidfile)]);
    push(&["-msg", "timestamp=on"]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_model::*;

    fn config() -> VmConfig {
        VmConfig {
            name: VmName::new("web1").unwrap(),
            cpus: 2,
            memory: 1 << 30,
            disks: vec![DiskConfig::unplaced(
                ElementId::new("data").unwrap(),
                "/var/lib/drover/vms/web1/data,1.qcow2".into(),
                DiskFormat::Qcow2,
                1 << 30,
                false,
                true,
            )],
            nics: vec![NicConfig {
                id: ElementId::new("net0").unwrap(),
                mac: "52:54:00:00:00:01".parse().unwrap(),
                backend: NicBackend::User {
                    forwards: vec!["tcp:2222-:22".parse().unwrap()],
                },
                slot: None,
                addr: None,
            }],
            boot: Boot::Default { cmdline: None },
            accel: None,
            max_memory: Some(4 << 30),
        }
    }

    #[test]
    fn command_line_has_what_the_guest_needs() {
        let cfg = config();
        let paths = RunPaths::new(Path::new("/run/x"));
        let args = build(&LaunchSpec {
            config: &cfg,
            platform: &Platform::default(),
            install_args: Vec::new(),
            accel: Accel::Tcg,
            paths: &paths,
            console_log: Path::new("/var/log/c.log"),
            kernel: Some(KernelBoot {
                kernel: "/img/vmlinux".into(),
                initrd: Some("/img/initramfs".into()),
                cmdline: "console=ttyS0".into(),
            }),
            hotplug_ports: 4,
            max_cpus: 4,
            qboot: Some("/usr/share/qemu/qboot.rom".into()),
            ram_file: true,
            ram_private: None,
            stopped: false,
            detached: false,
            incoming: false,
            generation_id: Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
            disk_chains: &Default::default(),
            fds: &[],
            plugged: &Plugged::default(),
        });
        let joined = args.join(" ");
        assert!(joined.contains("-smp cpus=2,maxcpus=4 -m size=1048584K,slots=8,maxmem=4194312K"));
        assert!(joined.contains("-accel tcg -cpu max"));
        assert!(joined.contains("-bios /usr/share/qemu/qboot.rom"));
        assert_eq!(joined.matches("pcie-root-port").count(), 4);
        assert!(joined.contains("name=org.drover.req") && joined.contains("name=org.drover.evt"));
        assert!(joined.contains("serial=data"));
        // The comma in the disk path is inside JSON, which needs no escaping.
        assert!(joined.contains("data,1.qcow2"));
        assert!(joined.contains("hostfwd=tcp:127.0.0.1:2222-:22"));
        assert!(joined.contains("mac=52:54:00:00:00:01"));
        assert!(joined.contains("-qmp unix:/run/x/qmp.sock,server=on,wait=off"));
        assert!(joined
            .contains("memory-backend-file,id=ram0,size=1048584K,mem-path=/run/x/ram,share=on"));
        assert!(!joined.contains("-incoming"));
        assert!(
            !joined.contains("vmgenid"),
            "qboot hangs on vmgenid's ACPI tables"
        );
    }

    #[test]
    fn a_grown_vm_continues_as_its_boot_shape_plus_the_devices_it_plugged() {
        // 2 vCPUs and 1 GiB in all, of which one vCPU and a 256 MiB DIMM were plugged live.
        let cfg = config();
        let plugged = Plugged {
            cpus: vec![drover_model::PluggedCpu {
                id: "vcpu-s1-c0-t0".into(),
                driver: "max-x86_64-cpu".into(),
                socket: 1,
                core: 0,
                thread: 0,
            }],
            dimms: vec![drover_model::PluggedDimm {
                id: "m7".into(),
                bytes: 256 << 20,
                addr: 4 << 30,
                slot: 0,
            }],
        };
        let paths = RunPaths::new(Path::new("/run/x"));
        let args = build(&LaunchSpec {
            max_cpus: 4,
            ram_private: Some(Path::new("/st/memory.bin")),
            incoming: true,
            plugged: &plugged,
            ..plain_spec(&cfg, &paths)
        });
        let joined = args.join(" ");
        // The boot RAM (and the state's RAM file mapped as it) is the 768 MiB not in the DIMM.
        assert!(joined.contains("-smp cpus=1,maxcpus=4 -m size=786440K,slots=8,maxmem=4194312K"));
        assert!(joined.contains("id=ram0,size=786440K,mem-path=/st/memory.bin,share=off"));
        assert!(joined
            .contains("-device max-x86_64-cpu,id=vcpu-s1-c0-t0,socket-id=1,core-id=0,thread-id=0"));
        assert!(joined.contains("-object memory-backend-ram,id=mem-m7,size=268435456"));
        assert!(joined.contains("-device pc-dimm,id=dimm-m7,memdev=mem-m7,addr=4294967296,slot=0"));
    }

    #[test]
    fn disk_boot_uses_firmware() {
        let mut cfg = config();
        cfg.boot = Boot::Disk {
            disk: ElementId::new("data").unwrap(),
        };
        let paths = RunPaths::new(Path::new("/run/x"));
        let args = build(&LaunchSpec {
            config: &cfg,
            platform: &Platform::default(),
            install_args: Vec::new(),
            accel: Accel::Kvm,
            paths: &paths,
            console_log: Path::new("/c,log"),
            kernel: None,
            hotplug_ports: 0,
            max_cpus: 1,
            qboot: Some("/usr/share/qemu/qboot.rom".into()),
            ram_file: false,
            ram_private: None,
            stopped: false,
            detached: false,
            incoming: true,
            generation_id: Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
            disk_chains: &Default::default(),
            fds: &[],
            plugged: &Plugged::default(),
        });
        let joined = args.join(" ");
        assert!(!joined.contains("-bios"));
        assert!(joined.contains("bootindex=0"));
        // The console takes input on its socket and logs output to the (escaped) log path.
        assert!(joined.contains(
            "-chardev socket,id=console,path=/run/x/console.sock,server=on,wait=off,logfile=/c,,log,logappend=on -serial chardev:console"
        ));
        assert!(joined.contains("-accel kvm"));
        assert!(joined.contains("-incoming defer") && !joined.contains("memory-backend-file"));
        assert!(joined.contains("-m size=1048584K,"));
        assert!(joined
            .contains("-device vmgenid,id=vmgenid0,guid=0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"));
        assert!(is_uuid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"));
        assert!(!is_uuid("not,a-uuid") && !is_uuid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0,x=1"));
    }

    #[test]
    fn ram_size_is_never_a_multiple_of_256k() {
        // QEMU 7.2 + TCG loses guest stores during a live migration when it is (see RAM_PAD).
        for mib in [1u64, 256, 512, 1024, 4096] {
            let s = ram_size(mib << 20, true);
            let kib: u64 = s.strip_suffix('K').unwrap().parse().unwrap();
            assert_eq!(kib, (mib << 10) + 8);
            assert_ne!(kib % 256, 0, "{s}");
            assert_eq!(kib % 8, 0, "QEMU rounds RAM to 8 KiB: {s}");
        }
        let mut cfg = config();
        cfg.max_memory = None;
        let paths = RunPaths::new(Path::new("/run/x"));
        let spec = LaunchSpec {
            config: &cfg,
            platform: &Platform::default(),
            install_args: Vec::new(),
            accel: Accel::Tcg,
            paths: &paths,
            console_log: Path::new("/c.log"),
            kernel: None,
            hotplug_ports: 0,
            max_cpus: 2,
            qboot: None,
            ram_file: false,
            ram_private: Some(Path::new("/s/memory.bin")),
            stopped: true,
            detached: false,
            incoming: true,
            generation_id: None,
            disk_chains: &Default::default(),
            fds: &[],
            plugged: &Plugged::default(),
        };
        let joined = build(&spec).join(" ");
        assert!(joined.contains("-m 1048584K "), "{joined}");
        assert!(
            joined.contains("size=1048584K,mem-path=/s/memory.bin,share=off"),
            "{joined}"
        );
        assert!(
            joined.contains("-cpu max -machine q35 "),
            "unpinned: as before"
        );

        // A pinned platform is used as recorded; a VM made on QEMU >= 9 has no pad.
        let platform = Platform {
            machine: Some("pc-q35-7.2".into()),
            cpu: Some("Westmere".into()),
            ram_pad: false,
        };
        let joined = build(&LaunchSpec {
            platform: &platform,
            install_args: vec!["-L".into(), "/opt/q/usr/share/qemu".into()],
            ..spec
        })
        .join(" ");
        assert!(
            joined.starts_with("-L /opt/q/usr/share/qemu -name "),
            "{joined}"
        );
        assert!(joined.contains("-accel tcg -cpu Westmere -machine pc-q35-7.2 "));
        assert!(joined.contains("-m 1048576K ") && joined.contains("size=1048576K,"));
        assert!(!joined.contains("-cpu max") && !joined.contains("-machine q35"));
    }

    /// A disk whose origin QEMU may not open by name: the chain is named top first, the origin
    /// through its fd set, read-only below the top; the descriptors are given with `-add-fd`.
    #[test]
    fn a_named_chain_reaches_the_origin_through_its_fd_set() {
        let chain = vec![
            ChainLayer {
                filename: "/var/lib/drover/vms/web1/disks/data.o1.qcow2".into(),
                format: DiskFormat::Qcow2,
            },
            ChainLayer {
                filename: "/dev/fdset/1".into(),
                format: DiskFormat::Raw,
            },
        ];
        let v = chain_blockdev("disk-data", false, &chain);
        assert_eq!(v["node-name"], "disk-data");
        assert_eq!(v["read-only"], false);
        assert_eq!(
            v["file"]["filename"],
            "/var/lib/drover/vms/web1/disks/data.o1.qcow2"
        );
        assert_eq!(v["backing"]["driver"], "raw");
        assert_eq!(v["backing"]["read-only"], true);
        assert_eq!(v["backing"]["file"]["filename"], "/dev/fdset/1");
        assert_eq!(v["backing"]["file"]["read-only"], true);
        assert!(
            v["backing"].get("backing").is_none(),
            "left to the origin's header"
        );
        assert!(v["backing"].get("node-name").is_none());
        // A read-only disk is read-only at the top too.
        assert_eq!(chain_blockdev("disk-data", true, &chain)["read-only"], true);

        let c = config();
        let paths = RunPaths::new(Path::new("/run/x"));
        let chains = std::collections::BTreeMap::from([(c.disks[0].id.to_string(), chain)]);
        let fds = [
            FdArg {
                fd: 7,
                set: 1,
                opaque: "disk-data ro".into(),
            },
            FdArg {
                fd: 8,
                set: 1,
                opaque: "disk-data,rw".into(),
            },
        ];
        let args = build(&LaunchSpec {
            hotplug_ports: 0,
            disk_chains: &chains,
            fds: &fds,
            plugged: &Plugged::default(),
            ..plain_spec(&c, &paths)
        });
        let joined = args.join(" ");
        assert!(
            joined.contains("-add-fd fd=7,set=1,opaque=disk-dataro "),
            "{joined}"
        );
        assert!(
            joined.contains("-add-fd fd=8,set=1,opaque=disk-datarw "),
            "{joined}"
        );
        assert!(joined.contains("\"filename\":\"/dev/fdset/1\""), "{joined}");
    }

    fn plain_spec<'a>(cfg: &'a VmConfig, paths: &'a RunPaths) -> LaunchSpec<'a> {
        LaunchSpec {
            config: cfg,
            platform: &DEFAULT_PLATFORM,
            install_args: Vec::new(),
            accel: Accel::Tcg,
            paths,
            console_log: Path::new("/c.log"),
            kernel: None,
            hotplug_ports: 4,
            max_cpus: 2,
            qboot: None,
            ram_file: false,
            ram_private: None,
            stopped: false,
            detached: false,
            incoming: false,
            generation_id: None,
            disk_chains: &NO_CHAINS,
            fds: &[],
            plugged: &NOTHING_PLUGGED,
        }
    }
    static NOTHING_PLUGGED: Plugged = Plugged {
        cpus: Vec::new(),
        dimms: Vec::new(),
    };
    static DEFAULT_PLATFORM: Platform = Platform {
        machine: None,
        cpu: None,
        ram_pad: true,
    };
    static NO_CHAINS: std::collections::BTreeMap<String, Vec<ChainLayer>> =
        std::collections::BTreeMap::new();

    /// The `-device` arguments, in order.
    fn devices(args: &[String]) -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == "-device")
            .map(|w| w[1].clone())
            .collect()
    }

    /// Disks and NICs sit at the slots recorded in the config (a config without them gets the
    /// layout QEMU's own allocation gave before), ahead of the root ports and the guest channel
    /// so QEMU places those around them; a hot-plugged device stays on its port.
    #[test]
    fn devices_sit_at_their_recorded_pci_slots() {
        let paths = RunPaths::new(Path::new("/run/x"));
        let cfg = config();
        let devs = devices(&build(&plain_spec(&cfg, &paths)));
        assert!(
            devs[0].starts_with("virtio-blk-pci,") && devs[0].ends_with(",bus=pcie.0,addr=0x06"),
            "{devs:?}"
        );
        assert!(
            devs[1].starts_with("virtio-net-pci,") && devs[1].ends_with(",bus=pcie.0,addr=0x07"),
            "{devs:?}"
        );
        assert!(
            devs[2..6]
                .iter()
                .all(|d| d.starts_with("pcie-root-port,id=hp") && !d.contains("addr=")),
            "{devs:?}"
        );
        assert_eq!(devs[6], "virtio-serial-pci,id=vser0");

        // Adding a disk leaves the NIC where it was.
        let mut more = cfg.pinned();
        more.disks.push(DiskConfig {
            id: ElementId::new("data2").unwrap(),
            index: 1,
            ..cfg.disks[0].clone()
        });
        more.pin_pci();
        let joined = build(&plain_spec(&more, &paths)).join(" ");
        assert!(
            joined.contains("mac=52:54:00:00:00:01,bus=pcie.0,addr=0x07"),
            "{joined}"
        );
        assert!(
            joined.contains("serial=data2,bus=pcie.0,addr=0x08"),
            "{joined}"
        );

        // A NIC hot-plugged on port 2 is there again on the next boot.
        more.nics.push(NicConfig {
            id: ElementId::new("net1").unwrap(),
            mac: "52:54:00:00:00:02".parse().unwrap(),
            backend: NicBackend::User {
                forwards: Vec::new(),
            },
            slot: Some(2),
            addr: None,
        });
        let joined = build(&plain_spec(&more, &paths)).join(" ");
        assert!(
            joined.contains("mac=52:54:00:00:00:02,bus=hp2 "),
            "{joined}"
        );
    }

    /// Each user NIC is its own NAT on its own subnet: the first keeps QEMU's default, the next
    /// cold-plugged ones follow, a hot-plugged one has one by its port (as when it was plugged).
    #[test]
    fn every_user_nic_has_its_own_subnet() {
        let paths = RunPaths::new(Path::new("/run/x"));
        let mut cfg = config();
        let second = NicConfig {
            id: ElementId::new("net1").unwrap(),
            mac: "52:54:00:00:00:02".parse().unwrap(),
            backend: NicBackend::User {
                forwards: vec!["tcp:2223-:22".parse().unwrap()],
            },
            slot: None,
            addr: None,
        };
        cfg.nics.push(second.clone());
        cfg.nics.push(NicConfig {
            id: ElementId::new("net2").unwrap(),
            slot: Some(1),
            ..second.clone()
        });
        let args = build(&plain_spec(&cfg, &paths));
        let netdevs: Vec<&String> = args
            .windows(2)
            .filter(|w| w[0] == "-netdev")
            .map(|w| &w[1])
            .collect();
        assert_eq!(
            netdevs[0],
            "user,id=nic-net0,hostfwd=tcp:127.0.0.1:2222-:22"
        );
        assert_eq!(
            netdevs[1],
            "user,id=nic-net1,net=10.0.3.0/24,host=10.0.3.2,dns=10.0.3.3,dhcpstart=10.0.3.15,hostfwd=tcp:127.0.0.1:2223-:22"
        );
        assert!(
            netdevs[2].starts_with("user,id=nic-net2,net=10.0.11.0/24,"),
            "{netdevs:?}"
        );
        let nets = user_net_numbers(&cfg);
        assert_eq!(nets.get("net2"), Some(&(MAX_NICS as u8 + 1)));
    }

    /// `--max-memory` equal to `--memory` leaves no room for DIMMs: QEMU refuses `slots=` then.
    #[test]
    fn no_memory_slots_without_headroom() {
        let paths = RunPaths::new(Path::new("/run/x"));
        let mut cfg = config();
        cfg.max_memory = Some(cfg.memory);
        let joined = build(&plain_spec(&cfg, &paths)).join(" ");
        assert!(joined.contains("-m 1048584K "), "{joined}");
        assert!(!joined.contains("slots="), "{joined}");
        cfg.max_memory = Some(cfg.memory * 2);
        let joined = build(&plain_spec(&cfg, &paths)).join(" ");
        assert!(
            joined.contains("-m size=1048584K,slots=8,maxmem=2097160K "),
            "{joined}"
        );
    }
}
