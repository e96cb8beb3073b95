//! Least privilege and bounded resources, tried as an attacker would: a real non-root local user
//! with the operator role (or none) against `droverd --socket-mode 666`.
//!
//! The users are made here when missing (`useradd --system`), and commands run as them with
//! `runuser`; the tests need root, as every e2e test does.

use drover_e2e::{bin_dir, image_bytes, pids_mentioning, qemu_img, wait_for, Daemon};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The uid of local user `name`, created (system user, no home, no login) when missing.
fn ensure_user(name: &str) -> u32 {
    let id = |n: &str| {
        Command::new("id")
            .args(["-u", n])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
    };
    if let Some(uid) = id(name) {
        return uid;
    }
    let out = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ])
        .output()
        .expect("run useradd");
    assert!(
        out.status.success(),
        "useradd {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    id(name).expect("the new user")
}

/// Run `drover ARGS` as `user` against `d`.
fn drover_as(d: &Daemon, user: &str, args: &[&str]) -> Output {
    Command::new("runuser")
        .args(["-u", user, "--", "env"])
        .arg(format!("DROVER_SOCKET={}", d.socket().display()))
        .arg(bin_dir().join("drover"))
        .args(args)
        .output()
        .expect("runuser")
}

/// Run `drover ARGS` as `user`, expecting exit `code`; returns stderr.
fn fails_as(d: &Daemon, user: &str, code: i32, args: &[&str]) -> String {
    let out = drover_as(d, user, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "drover {args:?} as {user}: {err}"
    );
    err
}

/// A daemon other users can connect to.
fn open_daemon(extra: &[&str]) -> Daemon {
    let mut flags = vec!["--socket-mode", "666"];
    flags.extend_from_slice(extra);
    let d = Daemon::start_with(&flags);
    // The socket lives in the daemon's private temp dir: let others through to it.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn droverd_pid(d: &Daemon) -> i32 {
    let sock = d.socket().display().to_string();
    pids_mentioning(&sock)
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "droverd")
        })
        .expect("droverd's pid")
}

fn status_field(pid: i32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

fn rss_kib(pid: i32) -> u64 {
    status_field(pid, "VmRSS:")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap_or(0)
}

fn sha(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// The non-root operator reads and writes nothing outside the pools, learns nothing of paths
/// it may not use, forwards no privileged port; inside a pool it gets its image; QEMU runs
/// confined; a serial flood stays under the console cap; guest-asked disks and states hold
/// to their quotas.
#[test]
fn operator_is_not_root_and_guests_are_bounded() {
    let op = "drover-e2e-op";
    let uid = ensure_user(op);
    let pool = tempfile::Builder::new()
        .prefix("drv-pool-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(pool.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut img = b"POOL-MARKER-7c1".to_vec();
    img.resize(1 << 20, 0);
    let raw = pool.path().join("base.raw");
    std::fs::write(&raw, &img).unwrap();
    // qcow2, so the VM's states can pin a layer over it.
    let base = pool.path().join("base.qcow2");
    qemu_img(&[
        "convert".as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        raw.as_os_str(),
        base.as_os_str(),
    ]);
    // Root's and 0600: QEMU (its own user) cannot open it by name; droverd hands it over.
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", pool.path().join("shadow.img")).unwrap();
    // A qcow2 whose header names /etc/shadow as its backing file.
    let evil = pool.path().join("evil.qcow2");
    qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        "raw".as_ref(),
        "-b".as_ref(),
        "/etc/shadow".as_ref(),
        "-u".as_ref(),
        evil.as_os_str(),
        "1M".as_ref(),
    ]);
    // The operator's own pool, read-write: an image only it may read.
    let mine = tempfile::Builder::new()
        .prefix("drv-mine-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(mine.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // qcow2: a save pins it under an overlay.
    let own = mine.path().join("own.qcow2");
    qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        own.as_os_str(),
        "2M".as_ref(),
    ]);
    std::os::unix::fs::chown(&own, Some(uid), None).unwrap();
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o600)).unwrap();
    let own_bytes = |offset: usize, len: usize| image_bytes(&own, offset, len);
    let pool_flag = format!("base={}", pool.path().display());
    let mine_flag = format!("mine={}:rw", mine.path().display());
    let d = open_daemon(&[
        "--image-pool",
        &pool_flag,
        "--image-pool",
        &mine_flag,
        "--console-log-max",
        "1M",
        "--guest-disk-max-count",
        "1",
        "--guest-disk-max-size",
        "64M",
        "--guest-state-max-count",
        "1",
    ]);
    d.ok(&[
        "auth",
        "grant",
        "--uid",
        &uid.to_string(),
        "--role",
        "operator",
    ]);
    let secret = d.dir.path().join("root-only.img");
    std::fs::write(&secret, vec![7u8; 1 << 20]).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let shadow_before = sha(Path::new("/etc/shadow"));

    // Host files outside the pools: refused, with one answer whether they exist or not.
    let refusal = |path: &str, arg: String| {
        let e = fails_as(&d, op, 8, &["vm", "create", "x", "--disk", &arg]);
        assert!(e.contains("image pool"), "{e}");
        e.replace(path, "P")
    };
    let base_msg = refusal("/etc/shadow", "image=/etc/shadow,ro".into());
    let s = secret.display().to_string();
    assert_eq!(refusal(&s, format!("image={s},ro")), base_msg);
    assert_eq!(refusal(&s, format!("image={s}")), base_msg);
    let up = format!(
        "{}/../{}",
        pool.path().display(),
        secret.strip_prefix("/tmp").unwrap().display()
    );
    assert_eq!(refusal(&up, format!("image={up},ro")), base_msg);
    let link = pool.path().join("shadow.img").display().to_string();
    assert_eq!(refusal(&link, format!("image={link},ro")), base_msg);
    assert_eq!(
        refusal("/root/none.img", "image=/root/none.img,ro".into()),
        base_msg
    );
    // Kernels: a root-only path and a missing one cannot be told apart.
    let k1 = fails_as(&d, op, 8, &["vm", "create", "x", "--kernel", "/etc/shadow"]);
    let k2 = fails_as(
        &d,
        op,
        8,
        &["vm", "create", "x", "--kernel", "/root/nothing/vmlinux"],
    );
    assert_eq!(
        k1.replace("/etc/shadow", "P"),
        k2.replace("/root/nothing/vmlinux", "P")
    );
    // A pool is read-only for non-admins.
    let b = base.display().to_string();
    let e = fails_as(
        &d,
        op,
        8,
        &["vm", "create", "x", "--disk", &format!("image={b}")],
    );
    assert!(e.contains("read-only"), "{e}");
    // A user's qcow2 naming another file is refused, saying why.
    let ev = evil.display().to_string();
    let e = fails_as(
        &d,
        op,
        8,
        &["vm", "create", "x", "--disk", &format!("image={ev},ro")],
    );
    assert!(e.contains("backing file (/etc/shadow)"), "{e}");
    // Forwards: no privileged port, no address but loopback.
    for fwd in [
        "tcp:127.0.0.1:23-:22",
        "tcp:0.0.0.0:2323-:22",
        "tcp:0.0.0.0:23-:22",
    ] {
        let e = fails_as(
            &d,
            op,
            8,
            &["vm", "create", "x", "--nic", &format!("user,forward={fwd}")],
        );
        assert!(e.contains("loopback"), "{fwd}: {e}");
    }
    assert!(
        d.json(&["vm", "list"]).as_array().unwrap().is_empty(),
        "nothing was created"
    );

    // What the pool allows works, and the guest reads the pool's image.
    let out = drover_as(
        &d,
        op,
        &[
            "vm",
            "create",
            "vm1",
            "--memory",
            "256M",
            "--disk",
            &format!("image={b},ro"),
            "--nic",
            "user,forward=tcp:127.0.0.1:24022-:22",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = drover_as(&d, op, &["vm", "start", "vm1", "--wait"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        drover_e2e::tail(&d.log(), 30)
    );
    let head = d.sh("vm1", "head -c 15 /dev/vda");
    assert_eq!(head, "POOL-MARKER-7c1");
    let e = fails_as(
        &d,
        op,
        8,
        &[
            "vm",
            "attach",
            "vm1",
            "disk",
            "--id",
            "s",
            "--image",
            "/etc/shadow",
            "--readonly",
        ],
    );
    assert!(e.contains("image pool"), "{e}");
    assert_eq!(sha(Path::new("/etc/shadow")), shadow_before);

    // QEMU runs with seccomp and without capabilities.
    let qemu = pids_mentioning(&d.state_dir().display().to_string())
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.starts_with("qemu"))
        })
        .expect("the VM's QEMU");
    assert_eq!(status_field(qemu, "Seccomp:"), "2", "seccomp filter mode");
    assert_eq!(status_field(qemu, "NoNewPrivs:"), "1");
    // ... whose filter lets it start no program (it is handed state files, never runs `cat`).
    let cmdline = std::fs::read(format!("/proc/{qemu}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("spawn=deny"), "QEMU's sandbox: {cmdline}");
    let eff = u64::from_str_radix(&status_field(qemu, "CapEff:"), 16).unwrap();
    // None at all as its own user (QEMU 7.2 gets userfaultfd from the sysctl, not ptrace).
    assert_eq!(eff, 0, "QEMU's capabilities: {eff:x}");
    // ... and as its own user, not root: an escape cannot read /etc/shadow or write host files.
    let qemu_uid = ensure_user("drover-qemu");
    assert_ne!(qemu_uid, 0);
    let uids: Vec<String> = status_field(qemu, "Uid:")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(
        uids,
        vec![qemu_uid.to_string(); 4],
        "QEMU's real, effective, saved and fs uids"
    );
    assert!(
        !status_field(qemu, "Groups:")
            .split_whitespace()
            .any(|g| g == "0"),
        "no root group"
    );

    // The operator's own 0600 image, hot-plugged read-write: QEMU gets it as a descriptor (it
    // may not open it by name), the guest writes to it, the file changes on the host.
    let o = own.display().to_string();
    let out = drover_as(
        &d,
        op,
        &["vm", "attach", "vm1", "disk", "--id", "u", "--image", &o],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        drover_e2e::tail(&d.log(), 20)
    );
    let dev = wait_for(
        "the hot-plugged disk in the guest",
        Duration::from_secs(30),
        || {
            let o = d.drover(&[
            "vm", "exec", "vm1", "--", "sh", "-c",
            "for b in /sys/block/vd*; do [ \"$(cat $b/serial 2>/dev/null)\" = u ] && echo ${b##*/}; done",
        ]);
            let name = String::from_utf8_lossy(&o.stdout).trim().to_string();
            (!name.is_empty()).then_some(name)
        },
    );
    d.sh(
        "vm1",
        &format!(
            "echo USER-WRITE-9 | dd of=/dev/{dev} bs=512 seek=8 conv=notrunc,fsync 2>/dev/null"
        ),
    );
    assert_eq!(
        own_bytes(4096, 12),
        b"USER-WRITE-9".to_vec(),
        "the guest's write reached the user's file"
    );

    // A serial-port flood keeps console.log under its cap (1 MiB, checked every second).
    let log = d.state_dir().join("vms/vm1/console.log");
    let flood = std::thread::spawn({
        let cli = d.cli();
        move || {
            cli.sh("vm1", "i=0; while [ $i -lt 24 ]; do head -c 131072 /dev/zero | tr '\\0' x > /dev/ttyS0; i=$((i+1)); done")
        }
    });
    let mut largest = 0;
    while !flood.is_finished() {
        largest = largest.max(std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(100));
    }
    flood.join().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let now = std::fs::metadata(&log).unwrap().len();
    let rotated = std::fs::metadata(log.with_extension("log.1"))
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!("console flood of 3 MiB: largest console.log {largest} B, now {now} B, console.log.1 {rotated} B");
    assert!(rotated > 0, "the log was rotated");
    assert!(
        largest < 3 << 20 && now <= 1 << 20 && rotated < 3 << 20,
        "{largest} {now} {rotated}"
    );

    // Guest-asked disks and states hold to their quotas (1 disk of at most 64M; 1 state).
    let g = d.json(&[
        "vm",
        "guest-access",
        "grant",
        "vm1",
        "--principal",
        "app",
        "--ops",
        "reconfigure,save",
    ]);
    let s = g["secret"].as_str().unwrap().to_string();
    let ask = |args: &str| {
        let out = d.drover(&[
            "vm",
            "exec",
            "vm1",
            "--",
            "sh",
            "-c",
            &format!("DROVER_PRINCIPAL=app DROVER_SECRET={s} drover-guest {args}"),
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        serde_json::from_str::<serde_json::Value>(text.trim()).unwrap_or(serde_json::Value::String(
            text + &String::from_utf8_lossy(&out.stderr),
        ))
    };
    let ev = ask("reconfigure --add-disk big:1G --wait");
    assert!(ev.to_string().contains("quota"), "{ev}");
    let ev = ask("reconfigure --add-disk g1:32M --wait");
    assert_eq!(ev["status"], "completed", "{ev}");
    let ev = ask("reconfigure --add-disk g2:16M --wait");
    assert!(ev.to_string().contains("--guest-disk-max-count"), "{ev}");
    let ev = ask("save --name s1 --wait");
    assert_eq!(ev["status"], "completed", "{ev}");
    // The save put an overlay on the user's image (QEMU reopened it read-only, from its fd
    // set): the guest still reads and writes the disk; the file keeps what the state saw.
    d.sh(
        "vm1",
        &format!(
            "echo AFTER-SAVE-3 | dd of=/dev/{dev} bs=512 seek=16 conv=notrunc,fsync 2>/dev/null"
        ),
    );
    assert_eq!(
        d.sh(
            "vm1",
            &format!("dd if=/dev/{dev} bs=512 skip=16 count=1 2>/dev/null | head -c 12")
        ),
        "AFTER-SAVE-3"
    );
    assert_eq!(
        own_bytes(8192, 12),
        vec![0u8; 12],
        "a pinned layer is not written"
    );
    let ev = ask("save --name s2 --wait");
    assert!(ev.to_string().contains("--guest-state-max-count"), "{ev}");
    assert_eq!(
        d.json(&["snapshot", "list", "vm1"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    d.ok(&["vm", "delete", "vm1", "--force"]);
}

/// Python, run as a user: open `n` connections to the socket and hold them, or send big bodies.
const CLIENT: &str = r#"
import socket, sys, time
path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "idle":
    held = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        held.append(s)
    print("open", len(held), flush=True)
    time.sleep(float(sys.argv[4]))
else:
    statuses = []
    chunk = b"x" * (1 << 20)
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(b"POST /v1/migrations/incoming HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % (60 << 20))
        # The answer comes before any of the body is sent: droverd does not wait for it.
        s.settimeout(10)
        try:
            statuses.append(s.recv(4096).split(b"\r\n")[0].decode())
        except OSError as e:
            statuses.append("error " + str(e))
        try:
            for _ in range(60):
                s.sendall(chunk)
        except OSError:
            pass
        s.close()
    print("\n".join(statuses), flush=True)
"#;

fn python_as(user: &str, args: &[&str]) -> Command {
    let mut c = Command::new("runuser");
    c.args([
        "-u",
        user,
        "--",
        "sh",
        "-c",
        "ulimit -n 4096; exec python3 -c \"$0\" \"$@\"",
        CLIENT,
    ]);
    c.args(args);
    c
}

/// A no-role user's and a viewer's 60 MB bodies are refused before they are read (droverd's
/// RSS stays under 64 MB); 1,100 idle connections of one user leave an admin's `vm list`
/// answering within a second.
#[test]
fn unauthorised_bodies_and_idle_floods_do_not_reach_droverd() {
    let nobody = "drover-e2e-none";
    let viewer = "drover-e2e-view";
    ensure_user(nobody);
    let vuid = ensure_user(viewer);
    let d = open_daemon(&[]);
    d.ok(&[
        "auth",
        "grant",
        "--uid",
        &vuid.to_string(),
        "--role",
        "viewer",
    ]);
    let pid = droverd_pid(&d);
    let sock = d.socket().display().to_string();
    let before = rss_kib(pid);
    for user in [nobody, viewer] {
        let out = python_as(user, &[&sock, "body", "10"])
            .output()
            .expect("python3");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.lines().filter(|l| l.contains(" 403 ")).count(),
            10,
            "{user}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let after = rss_kib(pid);
    eprintln!("droverd RSS before {before} KiB, after 20 bodies of 60 MB: {after} KiB");
    assert!(after < 64 << 10, "RSS {after} KiB");

    // 1,100 idle connections of one user: the ones past its cap are closed at once.
    let mut flood = python_as(nobody, &[&sock, "idle", "1100", "20"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(flood.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "open 1100");
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        d.ok(&["vm", "list"]);
        times.push(t.elapsed());
    }
    times.sort();
    eprintln!("admin vm list with 1,100 idle connections open: {times:?}");
    assert!(times[2] < Duration::from_secs(1), "{times:?}");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    assert!(fds < 200, "droverd holds {fds} descriptors");
    let _ = flood.kill();
    let _ = flood.wait();
    wait_for("droverd to be responsive", Duration::from_secs(5), || {
        d.drover(&["vm", "list"]).status.success().then_some(())
    });
}

/// SIGTERM: droverd stops serving, exits within its grace time, and starts no QEMU meanwhile.
#[test]
fn sigterm_is_clean() {
    let d = open_daemon(&["--shutdown-grace", "3"]);
    d.ok(&["vm", "create", "t1", "--memory", "128M"]);
    let pid = droverd_pid(&d);
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_for("droverd to exit", Duration::from_secs(6), || {
        (!Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z")))
        .then_some(())
    });
    eprintln!("droverd exited {:?} after SIGTERM", t.elapsed());
    assert!(
        d.drover(&["vm", "start", "t1"]).status.code() == Some(5),
        "nothing serves any more"
    );
    assert!(
        pids_mentioning(&d.state_dir().display().to_string()).is_empty(),
        "no QEMU started"
    );
}
