//! Devices a guest can rely on, checked from inside the minimal guest: a NIC keeps its PCI
//! address (and so its name in a systemd guest, `enp0s7`) when a disk is added, across restarts
//! and after it was hot-plugged; two user-mode NICs each answer their own port forward; a VM
//! whose memory is already at its hot-plug limit starts.

use drover_e2e::{free_port, http_get, wait_for, Daemon};
use std::time::Duration;

/// PCI address (`0000:00:07.0`) of the guest NIC with this MAC.
fn nic_pci(d: &Daemon, vm: &str, mac: &str) -> String {
    let script = format!(
        "for n in /sys/class/net/eth*; do [ \"$(cat $n/address)\" = {mac} ] && basename $(dirname $(readlink -f $n/device)); done; true"
    );
    let out = d.sh(vm, &script).trim().to_string();
    assert!(out.starts_with("0000:"), "NIC {mac} in {vm}: {out:?}");
    out
}

/// The MAC of NIC `id` as droverd recorded it (in the running config while it runs).
fn mac_of(d: &Daemon, vm: &str, id: &str) -> String {
    let v = d.json(&["vm", "show", vm]);
    let cfg = if v["running_config"].is_object() {
        &v["running_config"]
    } else {
        &v["config"]
    };
    cfg["nics"]
        .as_array()
        .and_then(|nics| nics.iter().find(|n| n["id"] == id))
        .and_then(|n| n["mac"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no NIC {id} in {v}"))
}

fn restart(d: &Daemon, vm: &str) {
    d.ok(&["vm", "stop", vm]);
    d.ok(&["vm", "start", vm, "--wait"]);
}

#[test]
fn nics_keep_their_pci_address_across_added_disks_restarts_and_hot_plug() {
    let d = Daemon::start();
    #[rustfmt::skip]
    d.ok(&["vm", "create", "pci", "--memory", "256M", "--disk", "size=16M,id=data", "--nic", "user"]);
    d.ok(&["vm", "start", "pci", "--wait"]);
    let mac0 = mac_of(&d, "pci", "net0");
    let first = nic_pci(&d, "pci", &mac0);
    // Where QEMU's own allocation put it before slots were recorded (systemd: enp0s7).
    assert_eq!(first, "0000:00:07.0");
    let show = d.ok(&["vm", "show", "pci"]);
    assert!(
        show.contains(&format!("{mac0} user (pci 00:07.0)")),
        "{show}"
    );

    // A disk added while stopped: the NIC stays where it was, the disk goes after it.
    d.ok(&["vm", "stop", "pci"]);
    #[rustfmt::skip]
    d.ok(&["vm", "attach", "pci", "disk", "--id", "data2", "--size", "8M"]);
    d.ok(&["vm", "start", "pci", "--wait"]);
    assert_eq!(
        nic_pci(&d, "pci", &mac0),
        first,
        "adding a disk moved the NIC"
    );
    let disks = d.sh(
        "pci",
        "for b in /sys/block/vd*; do echo $(cat $b/serial) $(basename $(dirname $(readlink -f $b/device))); done",
    );
    assert!(disks.contains("data2 0000:00:08.0"), "{disks}");

    // A NIC hot-plugged live, then a restart: it is at the same address (same port) again.
    d.json(&["vm", "attach", "pci", "nic", "--id", "net1"]);
    let mac1 = mac_of(&d, "pci", "net1");
    let hot = wait_for("the hot-plugged NIC", Duration::from_secs(15), || {
        let out = d.sh(
            "pci",
            &format!("for n in /sys/class/net/eth*; do [ \"$(cat $n/address)\" = {mac1} ] && basename $(dirname $(readlink -f $n/device)); done; true"),
        );
        let out = out.trim().to_string();
        out.starts_with("0000:").then_some(out)
    });
    assert!(!hot.starts_with("0000:00:"), "on a root port's bus: {hot}");
    restart(&d, "pci");
    assert_eq!(
        nic_pci(&d, "pci", &mac1),
        hot,
        "the hot-plugged NIC moved on reboot"
    );
    assert_eq!(nic_pci(&d, "pci", &mac0), first);

    // And it can still be unplugged live, since it sits on its port again.
    d.json(&["vm", "detach", "pci", "net1"]);
    d.ok(&["vm", "stop", "pci"]);
    d.ok(&["vm", "delete", "pci"]);
}

#[test]
fn two_user_nics_each_answer_their_forward() {
    let d = Daemon::start();
    let (p0, p1) = (free_port(), free_port());
    let n0 = format!("user,forward=tcp:127.0.0.1:{p0}-:80");
    let n1 = format!("user,forward=tcp:127.0.0.1:{p1}-:80");
    #[rustfmt::skip]
    d.ok(&["vm", "create", "two", "--memory", "256M", "--nic", &n0, "--nic", &n1]);
    d.ok(&["vm", "start", "two", "--wait"]);
    d.sh(
        "two",
        "mkdir -p /tmp/www && echo hello-two > /tmp/www/index.html && httpd -p 80 -h /tmp/www",
    );
    for port in [p0, p1] {
        let body = wait_for(
            &format!("forward {port} to answer"),
            Duration::from_secs(30),
            || http_get(port),
        );
        assert!(body.contains("hello-two"), "{body}");
    }
    // Each NIC has its own subnet.
    let addrs = d.sh("two", "ip -4 -o addr show | awk '{print $2, $4}'");
    assert!(addrs.contains("10.0.2.15/24"), "{addrs}");
    assert!(addrs.contains("10.0.3.15/24"), "{addrs}");
    d.ok(&["vm", "stop", "two"]);
    d.ok(&["vm", "delete", "two"]);
}

#[test]
fn memory_at_its_hot_plug_limit_starts() {
    let d = Daemon::start();
    #[rustfmt::skip]
    d.ok(&["vm", "create", "full", "--memory", "256M", "--max-memory", "256M"]);
    d.ok(&["vm", "start", "full", "--wait"]);
    let mem_kb: u64 = d
        .sh("full", "awk '/MemTotal/ {print $2}' /proc/meminfo")
        .trim()
        .parse()
        .expect("MemTotal");
    assert!((200 * 1024..=256 * 1024).contains(&mem_kb), "{mem_kb} kB");
    // Growing past the limit is refused, not attempted.
    let out = d.drover(&["vm", "set", "full", "memory=512M"]);
    assert!(!out.status.success());
    d.ok(&["vm", "stop", "full"]);
    d.ok(&["vm", "delete", "full"]);
}

/// One newc cpio member: a regular file.
fn cpio_file(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let header = format!(
        "070701{ino:08X}{mode:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
        0,
        0,
        1,
        0,
        data.len(),
        0,
        0,
        0,
        0,
        name.len() + 1,
        0
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// A guest without an agent (the image's initramfs with `/usr/bin/drover-agent` replaced by a
/// sleeper, as a second archive the kernel unpacks over the first): `start --wait` says so
/// well before its timeout, `vm show` and `vm exec` too. droverd waits `--no-agent-after`
/// (120 s by default) after the guest's driver came up; 20 s here, so the test is quick and
/// the setting is checked too.
#[test]
fn a_vm_without_an_agent_is_shown_as_such_early() {
    let d = Daemon::start_with(&["--no-agent-after", "20"]);
    let image =
        std::fs::canonicalize(drover_e2e::image_dir().join("current")).expect("the guest image");
    let mut initrd = std::fs::read(image.join("initramfs.cpio")).expect("the image's initramfs");
    while !initrd.len().is_multiple_of(4) {
        initrd.push(0);
    }
    let mut extra = Vec::new();
    cpio_file(
        &mut extra,
        1,
        "usr/bin/drover-agent",
        0o100755,
        b"#!/bin/sh\nexec sleep 1000000\n",
    );
    cpio_file(&mut extra, 2, "TRAILER!!!", 0, b"");
    initrd.extend_from_slice(&extra);
    let dir = d.state_dir().parent().expect("daemon dir").to_path_buf();
    let path = dir.join("noagent.cpio");
    std::fs::write(&path, &initrd).expect("write the initrd");
    let kernel = image.join("vmlinux").display().to_string();
    #[rustfmt::skip]
    d.ok(&["vm", "create", "bare", "--memory", "256M", "--kernel", &kernel, "--initrd", &path.display().to_string(), "--cmdline", "console=ttyS0 quiet"]);
    let t = std::time::Instant::now();
    let out = d.drover(&["vm", "start", "bare", "--wait", "--wait-timeout", "300"]);
    let took = t.elapsed();
    eprintln!("vm start --wait said there is no agent after {took:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "no agent, yet --wait succeeded: {err}"
    );
    assert!(err.contains("shows no guest agent"), "{err}");
    // The guest's driver is up within seconds; 20 s later it is said, well before the 300 s
    // asked (and before the 60 s more a guest without a known driver gets).
    assert!(took < Duration::from_secs(75), "said after {took:?}");
    assert!(
        took >= Duration::from_secs(20),
        "said after {took:?}: before --no-agent-after"
    );
    let show = d.ok(&["vm", "show", "bare"]);
    assert!(show.contains("agent:     none seen"), "{show}");
    let v = d.json(&["vm", "show", "bare"]);
    assert_eq!(v["agent"]["none_seen"], true);
    assert_eq!(v["agent"]["guest_opened"], false);
    let exec = d.drover(&["vm", "exec", "bare", "--", "true"]);
    let exec_err = String::from_utf8_lossy(&exec.stderr).to_string();
    assert!(exec_err.contains("shows no guest agent"), "{exec_err}");
    d.ok(&["vm", "stop", "bare", "--force"]);
    d.ok(&["vm", "delete", "bare"]);
}
