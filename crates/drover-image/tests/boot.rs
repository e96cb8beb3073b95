//! Builds the image and boots it under QEMU (TCG) with PLATFORM.md's command line.
//!
//! Needs `DROVER_AGENT_BIN` (any static x86-64 binary will do: the image does not depend on the
//! agent's behaviour) and `qemu-system-x86_64`; without them the test prints why and passes.
//! The first build downloads the kernel package (~70 MB). Set `DROVER_IMAGE_CACHE` to a directory
//! to keep the cache between runs (default: a temporary directory).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_image::{build, default_cmdline, load, ImageSpec, Progress, READY_MARKER};

/// Kills QEMU when the test ends, however it ends.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn boot(kernel: &Path, initrd: &Path, dir: &Path, extra_cmdline: &str) -> Qemu {
    let sock = |n: &str| dir.join(n).display().to_string();
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-M",
            "q35",
            "-bios",
            "/usr/share/qemu/qboot.rom",
        ])
        .args([
            "-smp",
            "1",
            "-m",
            "512",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", dir.join("console.log").display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("{} {extra_cmdline}", default_cmdline()))
        .args(["-device", "virtio-serial-pci,id=vser0"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=req,path={},server=on,wait=off",
            sock("req.sock")
        ))
        .args([
            "-device",
            "virtserialport,bus=vser0.0,chardev=req,name=org.drover.req",
        ])
        .arg("-chardev")
        .arg(format!(
            "socket,id=evt,path={},server=on,wait=off",
            sock("evt.sock")
        ))
        .args([
            "-device",
            "virtserialport,bus=vser0.0,chardev=evt,name=org.drover.evt",
        ])
        .args([
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock("qmp.sock")))
        .stdin(Stdio::null())
        .spawn()
        .expect("start qemu-system-x86_64");
    Qemu(child)
}

/// Waits until `pred` holds for the console log, or `limit` passes; returns the log.
fn wait_console(
    path: &Path,
    limit: Duration,
    qemu: &mut Qemu,
    pred: impl Fn(&str) -> bool,
) -> (bool, String) {
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if pred(&log) {
            return (true, log);
        }
        if start.elapsed() > limit {
            return (false, log);
        }
        if let Ok(Some(status)) = qemu.0.try_wait() {
            panic!("QEMU exited early ({status}); console:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn image_builds_and_boots_to_ready() {
    let Some(agent) = std::env::var_os("DROVER_AGENT_BIN").map(PathBuf::from) else {
        eprintln!("SKIPPED: set DROVER_AGENT_BIN to a static x86-64 binary to build and boot the guest image");
        return;
    };
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: qemu-system-x86_64 not found (apt-get install qemu-system-x86)");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache = std::env::var_os("DROVER_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().join("cache"));

    let spec = ImageSpec::new(&cache, &agent);
    let started = Instant::now();
    let mut steps = Vec::new();
    let img = build(&spec, &mut |p| {
        eprintln!("[{:>6.2}s] {p:?}", started.elapsed().as_secs_f64());
        steps.push(p);
    })
    .unwrap_or_else(|e| panic!("build failed: {e}"));
    eprintln!(
        "build: {:?}; image {}",
        started.elapsed(),
        img.dir.display()
    );
    assert!(std::fs::read(&img.kernel)
        .expect("read vmlinux")
        .starts_with(b"\x7fELF"));
    assert_eq!(
        std::fs::metadata(&img.initrd).expect("stat initrd").len(),
        img.manifest.initrd_bytes
    );
    for m in ["virtio_console", "virtio_net", "virtio_pci", "virtio_blk"] {
        assert!(
            img.manifest.modules.iter().any(|x| x == m),
            "{m} not in {:?}",
            img.manifest.modules
        );
    }

    // Same inputs again: the cached image, no work.
    let t = Instant::now();
    let mut again = Vec::new();
    let img2 = build(&spec, &mut |p| again.push(p)).expect("cached build");
    assert_eq!(img2.dir, img.dir);
    assert!(
        again.iter().any(|p| matches!(p, Progress::UpToDate { .. })),
        "{again:?}"
    );
    eprintln!("cached build: {:?}", t.elapsed());
    assert_eq!(
        load(&cache).expect("load").map(|i| i.dir),
        Some(img.dir.clone())
    );

    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).expect("run dir");
    let console = run.join("console.log");
    let t = Instant::now();
    let mut qemu = boot(&img.kernel, &img.initrd, &run, "drover.hostname=boot-test");
    let (ready, log) = wait_console(&console, Duration::from_secs(30), &mut qemu, |l| {
        l.contains(READY_MARKER)
    });
    assert!(ready, "no {READY_MARKER} within 30 s; console:\n{log}");
    eprintln!("QEMU start -> {READY_MARKER}: {:?}", t.elapsed());

    // /init's summary line, printed just before the marker.
    let summary = log
        .lines()
        .find(|l| l.starts_with("drover-init: hostname"))
        .unwrap_or_default();
    assert!(summary.contains("hostname boot-test;"), "{log}");
    assert!(
        summary.contains("org.drover.req") && summary.contains("org.drover.evt"),
        "port links missing:\n{log}"
    );
    assert!(summary.contains("nics: eth0"), "{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("drover-init: insmod")),
        "a module failed to load:\n{log}"
    );

    // Give the agent a moment; a real agent should keep running, a stand-in binary may not.
    std::thread::sleep(Duration::from_secs(2));
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    if log.contains("drover-agent exited") {
        eprintln!(
            "note: the agent binary exited and was restarted by /init (fine for a stand-in agent)"
        );
    }
    eprintln!("console:\n{log}");
}
