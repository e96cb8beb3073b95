//! A VM's life seen from inside the guest: CPUs and memory as asked, a disk whose data survives a
//! stop/start, state and console as a user checks them, graceful stop, guest power-off.

use drover_e2e::{free_port, http_get, wait_for, Daemon};
use std::time::Duration;

#[test]
fn guest_sees_its_shape_and_keeps_disk_data_across_stop_start() {
    let d = Daemon::start();
    let port = free_port();
    let nic = format!("user,forward=tcp:127.0.0.1:{port}-:80");
    #[rustfmt::skip]
    d.ok(&["vm", "create", "web1", "--cpus", "2", "--memory", "384M", "--disk", "size=64M,id=data", "--nic", &nic]);
    d.ok(&["vm", "start", "web1", "--wait"]);

    // A web server in the guest answers on the forwarded host port.
    d.sh("web1", "mkdir -p /tmp/www && echo hello-from-web1 > /tmp/www/index.html && httpd -p 80 -h /tmp/www");
    let body = wait_for(
        "the forwarded port to answer",
        Duration::from_secs(30),
        || http_get(port),
    );
    assert!(body.contains("hello-from-web1"), "{body}");

    // From inside the guest.
    assert_eq!(d.sh("web1", "nproc").trim(), "2");
    let mem_kb: u64 = d
        .sh("web1", "awk '/MemTotal/ {print $2}' /proc/meminfo")
        .trim()
        .parse()
        .expect("MemTotal");
    // The kernel keeps some memory for itself; MemTotal is a little under what was given.
    assert!(
        (300 * 1024..=384 * 1024).contains(&mem_kb),
        "MemTotal {mem_kb} kB for a 384M VM"
    );
    assert_eq!(d.sh("web1", "cat /sys/block/vda/serial").trim(), "data");
    assert_eq!(
        d.sh("web1", "cat /sys/block/vda/size").trim(),
        (64 * 2048).to_string()
    );
    assert_eq!(d.sh("web1", "hostname").trim(), "web1");
    assert!(d.sh("web1", "cat /proc/net/dev").contains("eth0"));

    // Exit codes and stderr of guest commands come back.
    let out = d.drover(&[
        "vm",
        "exec",
        "web1",
        "--",
        "sh",
        "-c",
        "echo oops >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "oops");

    // Write data to the disk, then stop and start.
    d.sh("web1", "echo drover-data-kept > /tmp/m && dd if=/tmp/m of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null");
    let v = d.json(&["vm", "show", "web1"]);
    assert_eq!(v["state"], "running");
    assert_eq!(v["agent"]["ready"], true);
    let boot1 = d.sh("web1", "cat /proc/sys/kernel/random/boot_id");

    // Starting a running VM and deleting it are refused with exit code 4, nothing changed.
    assert!(d
        .fails(4, &["vm", "start", "web1"])
        .contains("already running"));
    assert!(d
        .fails(4, &["vm", "delete", "web1"])
        .contains("stop it first or pass --force"));

    let stopped = d.json(&["vm", "stop", "web1"]);
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(stopped["last_exit"]["reason"], "operator-stop");
    // The agent shut the guest down cleanly; no kill was needed.
    assert_eq!(
        stopped["last_exit"]["detail"],
        "shut down by the guest agent"
    );

    d.ok(&["vm", "start", "web1", "--wait"]);
    let boot2 = d.sh("web1", "cat /proc/sys/kernel/random/boot_id");
    assert_ne!(boot1, boot2, "the guest really rebooted");
    assert_eq!(d.sh("web1", "head -c 16 /dev/vda"), "drover-data-kept");

    // The console log holds the boots.
    let console = d.ok(&["vm", "console", "web1"]);
    assert!(
        console.matches("DROVER-INIT-READY").count() >= 2,
        "console:\n{console}"
    );

    // The guest powers itself off: droverd notices and records why.
    let _ = d.drover(&[
        "vm",
        "exec",
        "web1",
        "--timeout",
        "5",
        "--",
        "poweroff",
        "-f",
    ]);
    let v = wait_for("the VM to stop", Duration::from_secs(20), || {
        let v = d.json(&["vm", "show", "web1"]);
        (v["state"] == "stopped").then_some(v)
    });
    assert_eq!(v["last_exit"]["reason"], "guest-poweroff", "{v}");

    let list = d.json(&["vm", "list"]);
    assert_eq!(list.as_array().map(|a| a.len()), Some(1));
    d.ok(&["vm", "delete", "web1"]);
    assert!(d
        .json(&["vm", "list"])
        .as_array()
        .is_some_and(|a| a.is_empty()));
    assert!(
        !d.state_dir().join("vms/web1").exists(),
        "owned disks and logs are removed"
    );
}

#[test]
fn force_delete_and_kill_when_the_guest_ignores_shutdown() {
    let d = Daemon::start();
    d.ok(&["vm", "create", "k1", "--memory", "256M"]);
    d.ok(&["vm", "start", "k1", "--wait"]);
    // Take the agent away (its respawn loop finds no binary): now nothing in the guest handles a
    // shutdown request or the ACPI button, so droverd must end up killing QEMU.
    d.sh("k1", "(sleep 0.3; mv /usr/bin/drover-agent /usr/bin/agent.off; kill -9 $(pidof drover-agent)) >/dev/null 2>&1 &");
    std::thread::sleep(Duration::from_millis(1000));
    let v = d.json(&["vm", "stop", "k1", "--timeout", "3"]);
    assert_eq!(v["state"], "stopped");
    assert_eq!(
        v["last_exit"]["detail"], "killed after the graceful-stop timeout",
        "{v}"
    );
    d.ok(&["vm", "start", "k1", "--wait"]);

    // A hostile guest: with the agent out of the way, it writes garbage, a frame claiming 4 GiB and
    // malformed JSON to the host's port. droverd drops them, says so in its log, and keeps serving:
    // the agent, once back, answers as before.
    d.sh(
        "k1",
        "(sleep 0.3; mv /usr/bin/drover-agent /usr/bin/agent.off; kill -9 $(pidof drover-agent); sleep 0.3; \
          p=/dev/virtio-ports/org.drover.req; head -c 300000 /dev/urandom >$p; printf 'DRV1\\377\\377\\377\\377' >$p; \
          printf 'DRV1\\000\\000\\000\\005{bad}' >$p; mv /usr/bin/agent.off /usr/bin/drover-agent) >/dev/null 2>&1 &",
    );
    std::thread::sleep(Duration::from_millis(1500));
    wait_for("the agent to come back", Duration::from_secs(30), || {
        let out = d.drover(&["vm", "exec", "k1", "--", "true"]);
        out.status.success().then_some(())
    });
    assert!(
        d.log().contains("dropped a guest frame"),
        "droverd logged the bad input"
    );
    assert_eq!(d.json(&["vm", "show", "k1"])["state"], "running");
    d.ok(&["vm", "delete", "k1", "--force"]);
    assert_eq!(
        drover_e2e::pids_mentioning(&d.state_dir().join("run").display().to_string()).len(),
        0,
        "no QEMU left"
    );
}

/// `vm cp` moves binary files of several requests' size both ways, exactly, with their mode, and
/// says clearly what it cannot do.
#[test]
fn files_copy_into_and_out_of_the_guest_byte_for_byte() {
    let d = Daemon::start();
    d.ok(&["vm", "create", "cp", "--memory", "256M"]);
    d.ok(&["vm", "start", "cp", "--wait"]);
    let dir = tempfile::tempdir().expect("tempdir");
    // 9 MiB + 7 bytes of random data: three API requests, many agent pieces, an odd tail.
    let src = dir.path().join("blob.bin");
    let mut data = vec![0u8; 9 * 1024 * 1024 + 7];
    let mut f = std::fs::File::open("/dev/urandom").expect("urandom");
    std::io::Read::read_exact(&mut f, &mut data).expect("random bytes");
    std::fs::write(&src, &data).expect("write blob");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    let want = sha256_hex(&data);

    let r = d.json(&["vm", "cp", src.to_str().expect("utf-8"), "cp:/tmp/"]);
    assert_eq!(r["bytes"], data.len() as u64, "{r}");
    assert_eq!(r["guest_path"], "/tmp/blob.bin", "{r}");
    eprintln!("vm cp of 9 MiB into the guest: {} ms", r["ms"]);
    let inside = d.sh(
        "cp",
        "sha256sum /tmp/blob.bin; stat -c %a /tmp/blob.bin; ls -a /tmp",
    );
    assert!(
        inside.contains(&want),
        "the guest has the same bytes: {inside}"
    );
    assert!(
        inside.lines().any(|l| l == "750"),
        "the local mode: {inside}"
    );
    assert!(
        !inside.contains("drover-part"),
        "no piece left over: {inside}"
    );

    // Out again, under another name, byte for byte.
    let back = dir.path().join("back.bin");
    d.ok(&[
        "vm",
        "cp",
        "cp:/tmp/blob.bin",
        back.to_str().expect("utf-8"),
    ]);
    assert_eq!(sha256_hex(&std::fs::read(&back).expect("copied out")), want);
    // --mode, and standard output.
    d.ok(&[
        "vm",
        "cp",
        src.to_str().expect("utf-8"),
        "cp:/tmp/x",
        "--mode",
        "600",
    ]);
    assert_eq!(d.sh("cp", "stat -c %a /tmp/x").trim(), "600");
    let out = d.drover(&["vm", "cp", "cp:/etc/hostname", "-"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        d.sh("cp", "cat /etc/hostname").trim()
    );

    // What cannot be: a missing file (not found), a directory, a relative guest path.
    let e = d.fails(
        3,
        &["vm", "cp", "cp:/nonexistent", back.to_str().expect("utf-8")],
    );
    assert!(e.contains("/nonexistent"), "{e}");
    let e = d.fails(1, &["vm", "cp", src.to_str().expect("utf-8"), "cp:/tmp"]);
    assert!(e.contains("directory"), "{e}");
    let e = d.fails(1, &["vm", "cp", src.to_str().expect("utf-8"), "cp:tmp/x"]);
    assert!(e.contains("absolute"), "{e}");
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// An imported image gives VMs thin copies: each sees the image's data, writes only its own,
/// the image file never changes, and it cannot be deleted while a VM uses it.
#[test]
fn imported_images_give_vms_thin_copies_that_never_write_the_image() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("base.raw");
    let mut data = vec![0u8; 16 << 20];
    data[..12].copy_from_slice(b"golden-image");
    std::fs::write(&raw, &data).expect("raw image");
    let raw_s = raw.to_str().expect("utf-8");

    let i = d.json(&["image", "import", "base", raw_s]);
    assert_eq!(i["virtual_size"], 16u64 << 20, "{i}");
    assert_eq!(i["source_format"], "raw", "{i}");
    let file = i["file"].as_str().expect("file").to_string();
    let before = sha256_hex(&std::fs::read(&file).expect("image file"));
    d.fails(4, &["image", "import", "base", raw_s]);
    let out = d.drover(&["image", "import", "ghost", "/nonexistent.qcow2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.qcow2"));

    d.ok(&[
        "vm",
        "create",
        "ta",
        "--memory",
        "128M",
        "--disk",
        "from=base,id=data",
    ]);
    d.ok(&[
        "vm",
        "create",
        "tb",
        "--memory",
        "128M",
        "--disk",
        "from=base,id=data,size=32M",
    ]);
    let e = d.fails(1, &["vm", "create", "tc", "--disk", "from=base,size=8M"]);
    assert!(e.contains("only grow"), "{e}");
    assert!(d
        .ok(&["vm", "show", "ta"])
        .contains("thin copy of image base"));
    d.ok(&["vm", "start", "ta", "--wait"]);
    d.ok(&["vm", "start", "tb", "--wait"]);
    assert_eq!(d.sh("ta", "head -c 12 /dev/vda"), "golden-image");
    d.sh(
        "ta",
        "printf from-ta-only | dd of=/dev/vda conv=notrunc,fsync 2>/dev/null",
    );
    assert_eq!(d.sh("ta", "head -c 12 /dev/vda"), "from-ta-only");
    assert_eq!(
        d.sh("tb", "head -c 12 /dev/vda"),
        "golden-image",
        "tb has its own copy"
    );
    assert_eq!(
        d.sh("tb", "cat /sys/block/vda/size").trim(),
        "65536",
        "grown to 32M"
    );

    let e = d.fails(4, &["image", "delete", "base"]);
    assert!(e.contains("ta") && e.contains("tb"), "names its users: {e}");
    let list = d.json(&["image", "list"]);
    assert_eq!(
        list[0]["used_by"],
        serde_json::json!(["ta", "tb"]),
        "{list}"
    );

    for vm in ["ta", "tb"] {
        d.ok(&["vm", "stop", vm]);
        d.ok(&["vm", "delete", vm]);
    }
    assert_eq!(
        sha256_hex(&std::fs::read(&file).expect("image file")),
        before,
        "the image was never written"
    );
    d.ok(&["image", "delete", "base"]);
    assert!(!std::path::Path::new(&file).exists());
    assert_eq!(d.json(&["image", "list"]), serde_json::json!([]));
}
