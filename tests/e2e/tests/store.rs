//! The store never lies or panics (issue 9, item 4): a missing or empty store while this state
//! dir's QEMUs run is refused, naming them; a damaged one exits with a clear message and code,
//! and `--recover-store` brings back its checkpoint; on a full disk droverd starts, a guest
//! QEMU paused shows `paused` with the reason, a stop ends `stopped`, and once space is freed
//! the store works again without a restart.

use drover_e2e::{wait_for, Daemon};
use std::time::Duration;

fn store(d: &Daemon) -> std::path::PathBuf {
    d.state_dir().join("drover.redb")
}

#[test]
fn missing_empty_or_damaged_store_is_refused_clearly_and_recovered_from_its_checkpoint() {
    let mut d = Daemon::start();
    d.ok(&["vm", "create", "k", "--memory", "256M"]);
    d.ok(&["vm", "start", "k", "--wait"]);
    let pid = d.json(&["vm", "show", "k"])["pid"].as_u64();
    // A start checkpoints the store (with k running). The first start wrote one of the empty
    // store: removed, so the wait below is for the one that holds k.
    d.kill9();
    let checkpoint = d.state_dir().join("drover.redb.checkpoint");
    std::fs::remove_file(&checkpoint).expect("the first start's checkpoint");
    d.spawn();
    wait_for("the checkpoint", Duration::from_secs(20), || {
        checkpoint.is_file().then_some(())
    });
    d.kill9();
    let good = std::fs::read(store(&d)).expect("store");

    // Empty, then missing: refused, naming the running QEMU, never started empty.
    std::fs::write(store(&d), b"").unwrap();
    let (code, out) = d.start_refused(Duration::from_secs(20));
    assert_eq!(code, Some(4), "{out}");
    assert!(
        out.contains("k (pid") && out.contains("--recover-store"),
        "{out}"
    );
    assert!(!out.contains("panicked"), "{out}");
    std::fs::remove_file(store(&d)).unwrap();
    let (code, out) = d.start_refused(Duration::from_secs(20));
    assert_eq!(code, Some(4), "{out}");
    assert!(out.contains("missing"), "{out}");

    // Cut off: a clear message and exit code 3, no panic.
    std::fs::write(store(&d), &good[..good.len() / 2]).unwrap();
    let (code, out) = d.start_refused(Duration::from_secs(20));
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains("damaged") && out.contains("--recover-store"),
        "{out}"
    );
    assert!(!out.contains("panicked"), "{out}");

    // Back from the checkpoint: the same VM, re-adopted.
    d.set_extra(&["--recover-store"]);
    d.spawn();
    d.set_extra(&[]);
    let k = d.json(&["vm", "show", "k"]);
    assert_eq!(k["state"], "running", "{k}");
    assert_eq!(k["pid"].as_u64(), pid, "the same QEMU");
    assert!(std::fs::read_dir(d.state_dir())
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().contains(".damaged-")));
    d.sh("k", "true");
}

/// A tmpfs mounted on the state dir, unmounted (lazily: QEMUs may still hold files) on drop.
struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fill the filesystem at `dir` to the last block.
fn fill(dir: &std::path::Path) {
    for (name, bs) in [("fill1", "1M"), ("fill2", "4k"), ("fill3", "512")] {
        let _ = std::process::Command::new("dd")
            .args([
                "if=/dev/zero",
                &format!("of={}/{name}", dir.display()),
                &format!("bs={bs}"),
            ])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn unfill(dir: &std::path::Path) {
    for name in ["fill1", "fill2", "fill3"] {
        let _ = std::fs::remove_file(dir.join(name));
    }
}

#[test]
fn full_disk_pauses_show_stops_end_and_the_store_recovers_without_a_restart() {
    let mut d = Daemon::start();
    d.kill9();
    let dir = d.state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48M", "tmpfs"])
        .arg(&dir)
        .status()
        .expect("mount");
    assert!(ok.success(), "mounting a tmpfs state dir needs root");
    let _mount = Mount(dir.clone());
    d.spawn();
    d.ok(&[
        "vm",
        "create",
        "f",
        "--memory",
        "256M",
        "--disk",
        "size=128M,id=data",
    ]);
    d.ok(&["vm", "start", "f", "--wait"]);
    fill(&dir);

    // The guest writes to its disk: QEMU pauses it (ENOSPC); droverd says so.
    let mut writer = std::process::Command::new(drover_e2e::bin_dir().join("drover"))
        .args(["vm", "exec", "f", "--timeout", "60", "--", "sh", "-c"])
        .arg("dd if=/dev/urandom of=/dev/vda bs=1M count=100 oflag=direct")
        .env("DROVER_SOCKET", d.socket())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("drover");
    let v = wait_for("the VM to show paused", Duration::from_secs(60), || {
        let v = d.json(&["vm", "show", "f"]);
        (v["state"] == "paused").then_some(v)
    });
    assert!(
        v["paused_reason"]
            .as_str()
            .unwrap_or("")
            .contains("no space left"),
        "{v}"
    );
    let shown = d.ok(&["vm", "show", "f"]);
    assert!(shown.contains("paused (QEMU paused the guest"), "{shown}");

    // A write fails cleanly; a stop still ends with the VM stopped, not `stopping` forever.
    let out = d.drover(&["vm", "create", "g", "--memory", "128M"]);
    assert!(!out.status.success(), "a create on a full disk fails");
    let _ = d.drover(&["vm", "stop", "f", "--timeout", "2"]);
    wait_for("the VM to be stopped", Duration::from_secs(60), || {
        (d.json(&["vm", "show", "f"])["state"] == "stopped").then_some(())
    });
    let _ = writer.kill();
    let _ = writer.wait();

    // droverd starts on the full disk.
    d.kill9();
    d.spawn();
    assert_eq!(d.json(&["vm", "show", "f"])["state"], "stopped");

    // Space is back: the same droverd writes again.
    unfill(&dir);
    wait_for(
        "the store to take writes again",
        Duration::from_secs(30),
        || {
            d.drover(&["vm", "create", "g", "--memory", "128M"])
                .status
                .success()
                .then_some(())
        },
    );
    d.ok(&["vm", "start", "f", "--wait"]);
    d.sh("f", "true");
    d.ok(&["vm", "stop", "f"]);
    d.kill9();
    d.spawn();
    let names: Vec<String> = d
        .json(&["vm", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            format!(
                "{}={}",
                v["name"].as_str().unwrap(),
                v["state"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(names, ["f=stopped", "g=stopped"]);
    d.kill9();
}
