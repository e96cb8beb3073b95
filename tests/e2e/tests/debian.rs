//! Drover's Debian 12 image (`drover image build --distro debian-12`, cached in the image dir) as
//! a user runs it: one guest booted with the agent from its package, checked in sequence from
//! inside (Debian boots take about a minute under TCG, so one guest does everything): exec, the
//! hostname and SSH key from the NoCloud seed (an `ssh` login through a port forward), the app
//! socket's group, a guest save/restore with app data, an orderly stop whose next boot finds a
//! clean shutdown in the journal and an ext4 root that needed no recovery. The guest is a
//! `vm create --from-image debian-12` of the build's image, after its agent was purged offline
//! and put back by `drover image inject-agent`, so the agent it runs is the injected one.

use drover_e2e::{free_port, wait_for, Daemon};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// `ssh root@127.0.0.1 -p port CMD` with `key`, non-interactive; stdout on success.
fn ssh(key: &Path, port: u16, cmd: &str) -> Option<String> {
    let out = Command::new("ssh")
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string()])
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
        .args([
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=10",
        ])
        .args(["-o", "LogLevel=ERROR", "root@127.0.0.1", cmd])
        .output()
        .expect("run ssh (apt-get install openssh-client)");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A shell command in the guest, with a timeout that a loaded machine's TCG guest can meet.
fn sh(d: &Daemon, script: &str) -> String {
    d.ok(&[
        "vm",
        "exec",
        "deb",
        "--timeout",
        "180",
        "--",
        "sh",
        "-c",
        script,
    ])
}

fn start_timed(d: &Daemon, vm: &str) -> f64 {
    let t = Instant::now();
    d.ok(&["vm", "start", vm, "--wait", "--wait-timeout", "300"]);
    let s = t.elapsed().as_secs_f64();
    println!("{vm}: start --wait took {s:.1} s");
    s
}

#[test]
fn debian_guest_with_packaged_agent_seed_ssh_saves_and_clean_stop() {
    let d = Daemon::start();
    let img = d.json(&["image", "build", "--distro", "debian-12"]);
    let s = |k: &str| {
        img[k]
            .as_str()
            .unwrap_or_else(|| panic!("{k} in {img}"))
            .to_string()
    };
    let dir = d.dir.path();
    // The build is imported as the image `debian-12`, with its boot.
    let image = &img["image"];
    assert_eq!(image["name"], "debian-12", "{img}");
    let boot = &image["boot"];
    assert!(
        boot["cmdline"].as_str().is_some_and(|c| c == s("cmdline")),
        "{img}"
    );
    // Building again changes nothing: the same image, not imported twice.
    let again = d.json(&["image", "build", "--distro", "debian-12"]);
    assert_eq!(again["image"]["imported_at_ms"], image["imported_at_ms"]);
    assert!(again.get("note").is_none(), "{again}");

    // An image without the agent (its package purged offline, as a stock Debian image has
    // none), then `image inject-agent` puts it back: the guest below runs that agent.
    let file = image["file"].as_str().expect("image file").to_string();
    purge_agent(Path::new(&file), dir);
    let injected = d.json(&["image", "inject-agent", "debian-12"]);
    assert_eq!(injected["file"], file.as_str(), "{injected}");
    assert!(
        injected.get("replaced").is_none(),
        "the agent was gone: {injected}"
    );

    let key = dir.join("key");
    let kg = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen");
    assert!(kg.success());
    let port = free_port();
    let nic = format!("user,forward=tcp:127.0.0.1:{port}-:22");
    let pubkey = format!("{}.pub", key.display());
    #[rustfmt::skip]
    d.ok(&["vm", "create", "deb", "--from-image", "debian-12", "--memory", "1G", "--nic", &nic,
           "--ssh-key", &pubkey]);
    let v = d.json(&["vm", "show", "deb"]);
    let root = &v["config"]["disks"][0];
    assert_eq!(
        (&root["id"], &root["base"]),
        (&"root".into(), &"debian-12".into()),
        "{v}"
    );
    // The image is in use now: it cannot be changed under the VM's disk.
    let err = d.fails(4, &["image", "inject-agent", "debian-12"]);
    assert!(err.contains("deb"), "{err}");
    start_timed(&d, "deb");

    // The agent came from its package and runs as a systemd service.
    assert!(d
        .sh("deb", "dpkg-query -W -f '${Status}' drover-agent")
        .contains("install ok installed"));
    assert_eq!(sh(&d, "systemctl is-active drover-agent").trim(), "active");
    assert_eq!(
        sh(&d, "readlink /usr/bin/drover-guest").trim(),
        "drover-agent"
    );
    assert_eq!(sh(&d, "cat /proc/1/comm").trim(), "systemd");
    assert_eq!(
        sh(&d, "stat -c %G:%a /run/drover/agent.sock").trim(),
        "drover:660"
    );
    assert!(d
        .sh(
            "deb",
            "ls -d /etc/drover/hooks/migrated.d /etc/drover/hooks/restored.d"
        )
        .contains("restored.d"));
    let exit = d.drover(&[
        "vm",
        "exec",
        "deb",
        "--timeout",
        "180",
        "--",
        "sh",
        "-c",
        "echo out; exit 7",
    ]);
    assert_eq!(exit.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&exit.stdout), "out\n");

    // The seed: hostname from the VM name, the key lets us in over the forwarded port.
    let hn = wait_for("the seed's hostname", Duration::from_secs(30), || {
        let h = sh(&d, "hostname").trim().to_string();
        (h == "deb").then_some(h)
    });
    assert_eq!(hn, "deb");
    assert!(sh(&d, "cat /etc/hosts").contains("127.0.1.1\tdeb"));
    let via_ssh = wait_for(
        "an SSH login with the seeded key",
        Duration::from_secs(300),
        || ssh(&key, port, "hostname; id -u"),
    );
    assert_eq!(via_ssh, "deb\n0\n");

    // Where the boot went (for the README's figures; printed with --nocapture).
    // Not a check: systemd-analyze can be slow on a loaded machine, so its failure is no failure.
    let analyze = d.drover(&["vm", "exec", "deb", "--timeout", "180", "--", "sh", "-c",
        "systemd-analyze; systemd-analyze blame --no-pager | head -n 15; systemd-analyze critical-chain --no-pager drover-agent.service"]);
    println!("{}", String::from_utf8_lossy(&analyze.stdout));

    // A guest save and restore with app data, through drover-guest in the Debian guest.
    let g = d.json(&[
        "vm",
        "guest-access",
        "grant",
        "deb",
        "--principal",
        "app",
        "--ops",
        "save,restore",
    ]);
    let secret = g["secret"].as_str().expect("secret").to_string();
    let env = format!("DROVER_PRINCIPAL=app DROVER_SECRET={secret}");
    sh(
        &d,
        &format!(
            "(setsid env {env} drover-guest listen --app-id a1 > /root/events.log 2>&1 &); sleep 0.5"
        ),
    );
    let saved = sh(&d, &format!("echo before > /root/f && sync && {env} drover-guest save --name s1 --app-id a1 --data '{{\"n\":1}}' --wait"));
    let ev: serde_json::Value = serde_json::from_str(&saved).expect("save event");
    assert_eq!(ev["status"], "completed", "{ev}");
    sh(&d, &format!("echo after > /root/f && sync; ({env} drover-guest restore s1 --app-id a1 --data '{{\"why\":\"rollback\"}}' >/dev/null 2>&1 &)"));
    let deadline = Instant::now() + Duration::from_secs(240);
    let restored = loop {
        std::thread::sleep(Duration::from_millis(500));
        let out = d.drover(&[
            "vm",
            "exec",
            "deb",
            "--timeout",
            "120",
            "--",
            "cat",
            "/root/events.log",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["op"] == "restore");
        if let Some(e) = found {
            break e;
        }
        if Instant::now() > deadline {
            let audit = d.drover(&["vm", "audit", "deb"]);
            panic!(
                "no restore event in the restored guest; events.log:\n{text}\nexec: {}\naudit:\n{}\ndaemon log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&audit.stdout),
                drover_e2e::tail(&d.log(), 40)
            );
        }
    };
    assert_eq!(restored["status"], "completed", "{restored}");
    assert_eq!(restored["data"]["why"], "rollback");
    assert_eq!(sh(&d, "cat /root/f").trim(), "before");

    // An orderly stop through systemd; the next boot finds it clean.
    let t = Instant::now();
    d.ok(&["vm", "stop", "deb", "--timeout", "120"]);
    println!("deb: stop took {:.1} s", t.elapsed().as_secs_f64());
    let exit = d.json(&["vm", "show", "deb"]);
    println!("deb: last exit {}", exit["last_exit"]);
    start_timed(&d, "deb");
    let prev = sh(&d, "journalctl -b -1 -q --no-pager -o cat | tail -n 40");
    assert!(
        prev.contains("Reached target") && prev.contains("Power-Off")
            || prev.contains("System Power Off"),
        "the previous boot's journal does not end in a power-off:\n{prev}"
    );
    assert!(
        prev.contains("Stopped") || prev.contains("Stopping"),
        "{prev}"
    );
    // The agent can answer before journald has read the kernel's early messages: wait for
    // them (a suite run once found none at the first look).
    let kernel = wait_for(
        "the kernel's ext4 messages in the journal",
        Duration::from_secs(60),
        || {
            let k = sh(
                &d,
                "journalctl -b 0 -k -q --no-pager -o cat | grep EXT4-fs || true",
            );
            k.contains("EXT4-fs (vda)").then_some(k)
        },
    );
    assert!(
        !kernel.contains("recovery complete") && !kernel.contains("orphan"),
        "the root filesystem needed recovery after the stop:\n{kernel}"
    );
    d.ok(&["vm", "stop", "deb"]);
    d.ok(&["vm", "delete", "deb"]);
    let list = d.json(&["image", "list"]);
    assert_eq!(list[0]["used_by"], serde_json::json!([]), "{list}");
    assert!(
        Path::new(&file).is_file(),
        "the image stays after its VM goes"
    );
}

/// Remove the agent package from the disk at `file` offline (as root: a loop mount and
/// `dpkg --root --purge`), in place, with scratch space in `dir`.
fn purge_agent(file: &Path, dir: &Path) {
    let raw = dir.join("purge.raw");
    let mnt = dir.join("purge-root");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("run");
        assert!(out.status.success(), "{cmd:?}: {out:?}");
    };
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(file)
        .arg(&raw));
    run(Command::new("mount")
        .arg("-o")
        .arg("loop")
        .arg(&raw)
        .arg(&mnt));
    let purged = Command::new("dpkg")
        .arg(format!("--root={}", mnt.display()))
        .args(["--purge", "drover-agent"])
        .output()
        .expect("dpkg");
    let gone = !mnt.join("usr/bin/drover-agent").exists();
    run(Command::new("umount").arg(&mnt));
    assert!(purged.status.success() && gone, "{purged:?}");
    let _ = std::fs::remove_file(file);
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(file));
    std::fs::remove_file(&raw).expect("rm");
}
