//! Harness for end-to-end tests: a real droverd on a private state dir and socket, the real
//! `drover` CLI, real QEMU guests booted from the shared default image.
//!
//! Binaries come from `DROVER_BIN_DIR` (default `target/debug`); the guest image cache is shared
//! through `DROVER_IMAGE_DIR` (default `target/drover-images`) so it is built once per checkout;
//! the static agent comes from `DROVER_AGENT_BIN` (default the release static build).
//! `scripts/test.sh` prepares all three. `DROVER_E2E_QEMU_DIR` points every droverd at another
//! QEMU installation (`--qemu-dir`; test.sh's second pass uses QEMU 10.0 from target/qemu-10).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn env_path(var: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or(default)
}

/// Directory holding `droverd` and `drover`.
pub fn bin_dir() -> PathBuf {
    env_path("DROVER_BIN_DIR", workspace().join("target/debug"))
}

/// Shared guest image cache.
pub fn image_dir() -> PathBuf {
    env_path("DROVER_IMAGE_DIR", workspace().join("target/drover-images"))
}

/// The QEMU installation every droverd of the tests runs (`droverd --qemu-dir`), from
/// `DROVER_E2E_QEMU_DIR`; `None`: the system's QEMU. `scripts/test.sh` runs the e2e tests once
/// on each.
pub fn qemu_dir() -> Option<PathBuf> {
    std::env::var_os("DROVER_E2E_QEMU_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

/// A second QEMU installation of another version, for tests across versions: from
/// `DROVER_E2E_QEMU10_DIR`, else `target/qemu-10` or `/opt/drover-qemu10` when one is there
/// (`scripts/install-deps.sh --qemu-prefix DIR` makes one). `None`: such tests skip.
pub fn qemu10_dir() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("DROVER_E2E_QEMU10_DIR").map(PathBuf::from),
        Some(workspace().join("target/qemu-10")),
        Some(PathBuf::from("/opt/drover-qemu10")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|d| d.join("usr/bin/qemu-system-x86_64").is_file())
}

/// The static agent for the image.
pub fn agent_bin() -> PathBuf {
    env_path(
        "DROVER_AGENT_BIN",
        workspace().join("target/x86_64-unknown-linux-gnu/release/drover-agent"),
    )
}

/// A running droverd with its own state dir and socket. Dropping it kills the daemon and every
/// QEMU it started.
pub struct Daemon {
    /// Private state directory (kept short: unix socket paths are limited to 107 bytes).
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    extra: Vec<String>,
    /// Where `droverd` comes from when not [`bin_dir`] (an older build, for upgrade tests).
    bin: Option<PathBuf>,
    envs: Vec<(String, String)>,
    /// `--qemu-dir`, or the system's QEMU.
    qemu: Option<PathBuf>,
}

impl Daemon {
    /// Start droverd on a fresh state dir.
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    /// Start droverd with extra flags (kept across `spawn`s), on the tests' QEMU ([`qemu_dir`]).
    pub fn start_with(extra: &[&str]) -> Daemon {
        Daemon::start_on(qemu_dir().as_deref(), extra)
    }

    /// Start droverd on the QEMU installation `qemu` (`None`: the system's), with extra flags.
    pub fn start_on(qemu: Option<&Path>, extra: &[&str]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("drv-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        Daemon::start_in(dir, extra, None, qemu)
    }

    /// Start the `droverd` of another build (in `bin`, e.g. an older release) on a fresh state
    /// dir; [`Daemon::use_bin`] switches to another one for the next [`Daemon::spawn`].
    pub fn start_from(bin: PathBuf) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("drv-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        // An older build may not know --qemu-dir: it runs on the system's QEMU.
        Daemon::start_in(dir, &[], Some(bin), None)
    }

    fn start_in(
        dir: tempfile::TempDir,
        extra: &[&str],
        bin: Option<PathBuf>,
        qemu: Option<&Path>,
    ) -> Daemon {
        let mut d = Daemon {
            dir,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            bin,
            envs: Vec::new(),
            qemu: qemu.map(Path::to_path_buf),
        };
        d.spawn();
        d
    }

    /// Run `droverd` from `bin` (None: [`bin_dir`]) from the next [`Daemon::spawn`] on.
    pub fn use_bin(&mut self, bin: Option<PathBuf>) {
        self.bin = bin;
    }

    /// Replace the extra flags used by the next [`Daemon::spawn`] (e.g. a new `--host-id`).
    pub fn set_extra(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    /// Replace the environment variables given to the next [`Daemon::spawn`] (e.g.
    /// `DROVER_TEST_CRASH_AT`).
    pub fn set_env(&mut self, envs: &[(&str, &str)]) {
        self.envs = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Wait until droverd has exited by itself (a crash point), up to `timeout`; whether it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(_))) | None => {
                    self.child = None;
                    return true;
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        false
    }

    /// Whether droverd is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Where droverd keeps guest RAM files (in /dev/shm, one directory per state dir).
    pub fn ram_dir(&self) -> PathBuf {
        use sha2::Digest;
        let key = hex::encode(
            &sha2::Sha256::digest(self.state_dir().as_os_str().as_encoded_bytes())[..6],
        );
        PathBuf::from(format!("/dev/shm/drover-{key}"))
    }

    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("d.sock")
    }

    /// The state dir.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Start (or start again) droverd on this state dir; waits until it serves.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("droverd.log"))
            .expect("log file");
        let child = self
            .droverd()
            .arg("--log")
            .arg("info,drover_host=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn droverd (run `cargo build --workspace` first)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.drover(&["host", "info"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("droverd did not come up; log:\n{}", self.log());
    }

    /// droverd's command line for this state dir, with the extra flags and environment.
    fn droverd(&self) -> Command {
        let bin = self.bin.clone().unwrap_or_else(bin_dir);
        let mut c = Command::new(bin.join("droverd"));
        c.arg("--state-dir")
            .arg(self.state_dir())
            .arg("--socket")
            .arg(self.socket())
            .arg("--image-dir")
            .arg(image_dir())
            .arg("--agent-binary")
            .arg(agent_bin())
            .args(&self.extra)
            .args(
                self.qemu
                    .iter()
                    .flat_map(|q| [std::ffi::OsStr::new("--qemu-dir"), q.as_os_str()]),
            )
            .env_remove("DROVER_QEMU_DIR")
            .envs(self.envs.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Start droverd on this state dir expecting it to refuse: returns its exit code and
    /// output once it exits (panics if it is still up after `timeout`).
    pub fn start_refused(&self, timeout: Duration) -> (Option<i32>, String) {
        let mut child = self
            .droverd()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn droverd");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                let out = child.wait_with_output().expect("droverd output");
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                return (out.status.code(), text);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("droverd started although it should have refused");
    }

    /// `kill -9` the daemon (its VMs keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("droverd.log")).unwrap_or_default()
    }

    /// The CLI pointed at this daemon.
    pub fn cli(&self) -> Cli {
        Cli {
            envs: vec![("DROVER_SOCKET".into(), self.socket().display().to_string())],
            log_file: self.dir.path().join("droverd.log"),
        }
    }

    /// Run the CLI against this daemon.
    pub fn drover(&self, args: &[&str]) -> Output {
        self.cli().drover(args)
    }

    /// Run the CLI and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.cli().ok(args)
    }

    /// Run the CLI with `--output json` and parse the answer.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        self.cli().json(args)
    }

    /// Run the CLI expecting failure with `code`; returns stderr.
    pub fn fails(&self, code: i32, args: &[&str]) -> String {
        self.cli().fails(code, args)
    }

    /// Run a shell command in the guest; returns its stdout (must exit 0).
    pub fn sh(&self, vm: &str, script: &str) -> String {
        self.cli().sh(vm, script)
    }
}

/// The `drover` CLI aimed at one daemon (by environment), with that daemon's log for failures.
#[derive(Clone, Debug)]
pub struct Cli {
    /// Environment for every call (`DROVER_SOCKET`, or `DROVER_REMOTE` + `DROVER_CONFIG_DIR`).
    pub envs: Vec<(String, String)>,
    /// The daemon's log, shown when a call fails.
    pub log_file: PathBuf,
}

impl Cli {
    /// Run the CLI.
    pub fn drover(&self, args: &[&str]) -> Output {
        Command::new(bin_dir().join("drover"))
            .args(args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .expect("run drover")
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Run the CLI and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.drover(args);
        assert!(
            out.status.success(),
            "drover {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndaemon log tail:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 30)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run the CLI with `--output json` and parse the answer.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--output", "json"];
        a.extend_from_slice(args);
        let out = self.ok(&a);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("drover {args:?}: bad JSON ({e}): {out}"))
    }

    /// Run the CLI expecting failure with `code`; returns stderr.
    pub fn fails(&self, code: i32, args: &[&str]) -> String {
        let out = self.drover(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "drover {args:?}: expected exit {code}; stdout: {} stderr: {stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }

    /// Run a shell command in the guest; returns its stdout (must exit 0).
    pub fn sh(&self, vm: &str, script: &str) -> String {
        self.ok(&["vm", "exec", vm, "--", "sh", "-c", script])
    }
}

/// Several droverd's, each in its own network namespace (`scripts/netns-hosts.sh`), as a set
/// of its own so tests can run side by side. Dropping it stops them and removes everything.
pub struct Fleet {
    /// Set name (namespaces `drover-<set>I`, remotes `<set>I`).
    pub set: String,
    net: String,
    n: usize,
    /// State dirs and the remotes file live here.
    pub dir: tempfile::TempDir,
    extra_env: Vec<(String, String)>,
    /// The script that brings it up and down (`netns-hosts.sh`, or `cluster.sh`).
    script: &'static str,
}

impl Fleet {
    /// A whole cluster (`scripts/cluster.sh up n`): a 3-member etcd, `n` hosts joined to it
    /// and 2 controllers, registered as the CLI's default cluster in this fleet's config dir
    /// (see [`Fleet::cli`]). Returns `None` (skip) without root, iproute2 or etcd.
    pub fn cluster(set: &str, net: &str, n: usize) -> Option<Fleet> {
        if Command::new("etcd").arg("--version").output().is_err() {
            eprintln!("skipped: needs etcd (scripts/install-deps.sh installs etcd-server)");
            return None;
        }
        Fleet::start("scripts/cluster.sh", set, net, n, &[])
    }

    /// Start `n` hosts of set `set` on subnet `net` (like `10.81.0`), with extra droverd
    /// environment. Returns `None` (the test should skip) without root or iproute2.
    pub fn up(set: &str, net: &str, n: usize, env: &[(&str, &str)]) -> Option<Fleet> {
        Fleet::start("scripts/netns-hosts.sh", set, net, n, env)
    }

    fn start(
        script: &'static str,
        set: &str,
        net: &str,
        n: usize,
        env: &[(&str, &str)],
    ) -> Option<Fleet> {
        if !nix::unistd::geteuid().is_root() || Command::new("ip").arg("-V").output().is_err() {
            eprintln!("skipped: needs root and iproute2");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("drv-f-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let f = Fleet {
            set: set.into(),
            net: net.into(),
            n,
            dir,
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            script,
        };
        // Leftovers of an earlier, killed run of the same set.
        let _ = f.script(&["down"]);
        let out = f.script(&["up", &n.to_string()]);
        assert!(
            out.status.success(),
            "{script} up {n}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(f)
    }

    /// Run the fleet's script (`netns-hosts.sh` or `cluster.sh`) with `args`, on this fleet.
    pub fn script(&self, args: &[&str]) -> Output {
        Command::new(workspace().join(self.script))
            .args(args)
            .env("DROVER_BIN_DIR", bin_dir())
            .env("DROVER_NETNS_ROOT", self.dir.path())
            .env("DROVER_CONFIG_DIR", self.dir.path().join("cfg"))
            .env("DROVER_IMAGE_DIR", image_dir())
            .env("DROVER_AGENT_BIN", agent_bin())
            .env("DROVER_NETNS_SET", &self.set)
            .env("DROVER_NETNS_NET", &self.net)
            .env(
                "DROVER_QEMU_DIR",
                qemu_dir().map(PathBuf::into_os_string).unwrap_or_default(),
            )
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .expect("run the fleet's script")
    }

    /// The CLI with this fleet's config dir and no remote: for the cluster commands (`drover
    /// service ...`, `drover host list`), which reach etcd.
    pub fn cli(&self) -> Cli {
        Cli {
            envs: vec![(
                "DROVER_CONFIG_DIR".into(),
                self.dir.path().join("cfg").display().to_string(),
            )],
            log_file: self
                .dir
                .path()
                .join(format!("drover-{}-cluster/ctl-1.log", self.set)),
        }
    }

    /// Remote name of host `i` (1-based).
    pub fn remote(&self, i: usize) -> String {
        format!("{}{i}", self.set)
    }

    /// State dir of host `i`.
    pub fn state_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("drover-{}{i}", self.set))
    }

    /// The CLI aimed at host `i` (over HTTPS, as a remote).
    pub fn host(&self, i: usize) -> Cli {
        Cli {
            envs: vec![
                (
                    "DROVER_CONFIG_DIR".into(),
                    self.dir.path().join("cfg").display().to_string(),
                ),
                ("DROVER_REMOTE".into(), self.remote(i)),
            ],
            log_file: self.state_dir(i).join("droverd.log"),
        }
    }

    /// `kill -9` host `i`'s droverd (its VMs keep running).
    pub fn kill9(&self, i: usize) {
        let pid =
            std::fs::read_to_string(self.state_dir(i).join("droverd.pid")).unwrap_or_default();
        if let Ok(pid) = pid.trim().parse::<i32>() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            wait_for("droverd to die", Duration::from_secs(10), || {
                (!Path::new(&format!("/proc/{pid}")).exists()
                    || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .map(|s| s.contains(") Z "))
                        .unwrap_or(true))
                .then_some(())
            });
        }
    }

    /// Start droverd's that are not running (after `kill9`), re-registering them.
    pub fn restart(&self) {
        let out = self.script(&["up", &self.n.to_string()]);
        assert!(
            out.status.success(),
            "netns-hosts up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Names of the VMs host `i` has.
    pub fn vms(&self, i: usize) -> Vec<(String, String)> {
        self.host(i)
            .json(&["vm", "list"])
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| {
                        (
                            v["name"].as_str().unwrap_or_default().to_string(),
                            v["state"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The veth of host `i` (root side): down cuts it off the network.
    pub fn veth(&self, i: usize) -> String {
        format!("drv-{}{i}", self.set)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.script(&["down", "--purge"]);
    }
}

/// Last `n` lines.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Pids of processes whose command line mentions `needle`.
pub fn pids_mentioning(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(needle) && pid != std::process::id() as i32 {
                out.push(pid);
            }
        }
    }
    out
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // Leave no QEMU behind, whatever the test did.
        for pid in pids_mentioning(&self.state_dir().display().to_string()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }

        // Nor their memory files, which droverd keeps in /dev/shm under a hash of the state dir.
        let _ = std::fs::remove_dir_all(self.ram_dir());
    }
}

/// Run `qemu-img ARGS` (the system's), panicking with its message if it fails.
pub fn qemu_img(args: &[&std::ffi::OsStr]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The bytes a qcow2 image holds at `offset..offset + len` of its virtual disk, read on the host
/// (with `-U`: a running QEMU may hold its lock).
pub fn image_bytes(image: &Path, offset: usize, len: usize) -> Vec<u8> {
    let raw = image.with_extension("read.raw");
    qemu_img(&[
        "convert".as_ref(),
        "-U".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        image.as_os_str(),
        raw.as_os_str(),
    ]);
    let bytes = std::fs::read(&raw).expect("the raw copy");
    let _ = std::fs::remove_file(&raw);
    bytes[offset..offset + len].to_vec()
}

/// A free TCP port on loopback (free when asked; tests bind it at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Poll `f` until it returns `Some`, or panic after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// GET / from 127.0.0.1:port; `None` until something answers with a 200 and a body.
pub fn http_get(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.contains("200").then_some(out)
}
