//! A new identity pushed by the host after a clone lands, or after a resume with `--nic` /
//! `--new-identity` ([`drover_proto::IdentityUpdate`]): hostname, machine-id and NIC MAC
//! addresses (each only if given), a DHCP renew on every interface that changed (every one when
//! the hostname changed: the lease carries it), SSH host keys regenerated with a new machine-id
//! (where the guest has any: two machines must not share them), then the `restored.d` hooks with
//! the old and new values. What changed is returned, and port B tells listening apps.
//!
//! The host may send the same update again (after a reconnect, or a droverd restart that did not
//! hear the answer): the last applied token is recorded on `/run` before the hooks run, so a
//! repeat changes nothing and every hook runs at most once per update.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use drover_proto::{IdentityApplied, IdentityUpdate};

/// Where the hooks live: every executable file in it runs, in name order.
pub const HOOKS_DIR: &str = "/etc/drover/hooks/restored.d";
/// The token of the last update applied.
pub const STATE_FILE: &str = "/run/drover/identity-token";
/// Environment of each hook: the hostname before.
pub const ENV_OLD_HOSTNAME: &str = "DROVER_OLD_HOSTNAME";
/// The hostname now.
pub const ENV_NEW_HOSTNAME: &str = "DROVER_NEW_HOSTNAME";
/// The machine-id before (empty when there was none).
pub const ENV_OLD_MACHINE_ID: &str = "DROVER_OLD_MACHINE_ID";
/// The machine-id now.
pub const ENV_NEW_MACHINE_ID: &str = "DROVER_NEW_MACHINE_ID";
/// Interfaces that took a new MAC, `eth0=52:54:00:..` separated by spaces.
pub const ENV_NEW_MACS: &str = "DROVER_NEW_MACS";
/// Why (`clone of state s1 of web`).
pub const ENV_REASON: &str = "DROVER_RESTORE_REASON";
/// What changed, separated by spaces (`hostname machine-id mac:eth0 ssh-host-keys`).
pub const ENV_CHANGED: &str = "DROVER_CHANGED";
/// Longest one hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// What changing the running system takes (the kernel's hostname, an interface's address), apart
/// so the file and matching logic is tested without root.
pub trait System {
    /// sethostname(2).
    fn set_hostname(&self, name: &str) -> io::Result<()>;
    /// Give interface `ifname` the address `mac`.
    fn set_mac(&self, ifname: &str, mac: &str) -> io::Result<()>;
    /// Ask the DHCP client of `ifname` to renew its lease, or with `fresh` (a new MAC) to let
    /// it go and ask for a new one from scratch: `Ok(false)` when none runs for it (a static
    /// address is left alone).
    fn renew_dhcp(&self, ifname: &str, fresh: bool) -> io::Result<bool>;
    /// Make new SSH host keys under `root` (the old ones are already removed).
    fn make_ssh_host_keys(&self, root: &Path) -> io::Result<()>;
}

/// The guest itself.
pub struct RealSystem;

impl System for RealSystem {
    fn set_hostname(&self, name: &str) -> io::Result<()> {
        crate::seed::set_kernel_hostname(name)
    }

    fn set_mac(&self, ifname: &str, mac: &str) -> io::Result<()> {
        // virtio-net changes the address live (the driver tells QEMU through its control
        // queue, so the host's receive filter follows). An ioctl, not `ip link set`: a fork and
        // exec is slow in a guest whose TCG translation cache is cold, as a clone's is.
        match set_mac_ioctl(ifname, mac) {
            Ok(()) => Ok(()),
            Err(e) => {
                crate::log!("SIOCSIFHWADDR on {ifname} failed ({e}); trying `ip link set`");
                set_mac_ip(ifname, mac)
            }
        }
    }

    fn renew_dhcp(&self, ifname: &str, fresh: bool) -> io::Result<bool> {
        // busybox udhcpc (Drover's image): SIGUSR1 renews; SIGUSR2 releases first. A renew
        // under a new MAC is one unicast request whose loss udhcpc would retry only hours
        // later; released, SIGUSR1 starts a discovery, which it retries every few seconds.
        if !fresh {
            if signal_udhcpc(ifname, libc::SIGUSR1)?.is_some() {
                return Ok(true);
            }
        } else if let Some(pid) = signal_udhcpc(ifname, libc::SIGUSR2)? {
            // Linux delivers pending standard signals lowest number first: sent together, the
            // renew (SIGUSR1) would be taken before the release. It goes once udhcpc has taken
            // the release, from a thread of its own: the lease comes later anyway, and on a
            // clone's cold TCG cache that wait was most of the time a new identity took.
            let ifname = ifname.to_string();
            std::thread::spawn(move || {
                wait_delivered(Path::new("/proc"), pid, libc::SIGUSR2, RELEASE_WAIT);
                match signal_udhcpc(&ifname, libc::SIGUSR1) {
                    Ok(Some(_)) => {}
                    Ok(None) => crate::log!("renewing {ifname}'s lease: udhcpc has gone"),
                    Err(e) => crate::log!("renewing {ifname}'s lease: {e}"),
                }
            });
            return Ok(true);
        }
        // systemd-networkd (Debian guests).
        if Path::new("/run/systemd/netif").is_dir() {
            return run_quiet("networkctl", &["renew", ifname]).map(|()| true);
        }
        Ok(false)
    }

    fn make_ssh_host_keys(&self, root: &Path) -> io::Result<()> {
        if root == Path::new("/") {
            run_quiet("ssh-keygen", &["-A"])
        } else {
            let r = root.to_string_lossy().into_owned();
            run_quiet("ssh-keygen", &["-A", "-f", &r])
        }
    }
}

/// Parse `52:54:00:12:34:56` (checked by the decoder already).
fn mac_bytes(mac: &str) -> io::Result<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for b in out.iter_mut() {
        let p = parts.next().ok_or_else(|| io::Error::other("short MAC"))?;
        *b = u8::from_str_radix(p, 16).map_err(|_| io::Error::other("bad MAC"))?;
    }
    Ok(out)
}

fn set_mac_ioctl(ifname: &str, mac: &str) -> io::Result<()> {
    let bytes = mac_bytes(mac)?;
    if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ {
        return Err(io::Error::other("bad interface name"));
    }
    // SAFETY: a plain socket call; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: writing the sockaddr member of the request's union, which SIOCSIFHWADDR reads.
    unsafe {
        req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (d, s) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(bytes) {
            *d = s as libc::c_char;
        }
    }
    // SAFETY: fd is our socket and req a valid ifreq that outlives the call.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCSIFHWADDR as _, &req) };
    let err = io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    if rc == 0 {
        Ok(())
    } else {
        Err(err)
    }
}

/// Send `sig` to the udhcpc serving `ifname`; its pid, or `None` if none runs.
///
/// udhcpc forks into the background once it has a lease: a guest saved or cloned in that instant
/// holds both, the parent about to exit. Signal the newest, and look again if it has gone.
fn signal_udhcpc(ifname: &str, sig: i32) -> io::Result<Option<i32>> {
    let mut tries = 0;
    while let Some(pid) = udhcpc_for(Path::new("/proc"), ifname) {
        // SAFETY: a signal to a process found by its command line; a stale pid at worst gets a
        // signal it ignores, or has gone (ESRCH).
        if unsafe { libc::kill(pid, sig) } == 0 {
            return Ok(Some(pid));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) || tries >= 5 {
            return Err(e);
        }
        tries += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    if tries > 0 {
        return Err(io::Error::other(format!(
            "udhcpc for {ifname} exited while it was asked to renew"
        )));
    }
    Ok(None)
}

/// Longest wait for udhcpc to take a release before it is asked to renew: it takes it in a
/// millisecond or two when it runs, 0.1-0.4 s on a clone's cold TCG cache on a busy host; one
/// that has not run by then is asked anyway.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// Wait (up to `max`) until signal `sig` is no longer pending for process `pid` under `proc`:
/// its handler has run. Returns whether it was seen delivered.
fn wait_delivered(proc: &Path, pid: i32, sig: i32, max: Duration) -> bool {
    let status = proc.join(pid.to_string()).join("status");
    let start = std::time::Instant::now();
    loop {
        match fs::read_to_string(&status) {
            Ok(s) if !signal_pending(&s, sig) => return true,
            Ok(_) => {}
            // Gone: nothing is pending any more; the caller's next signal finds out.
            Err(_) => return true,
        }
        if start.elapsed() >= max {
            return false;
        }
        // Not tighter: on one vCPU this loop takes turns with the udhcpc it waits for.
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Whether `/proc/PID/status` text shows signal `sig` pending, to the thread or the process.
fn signal_pending(status: &str, sig: i32) -> bool {
    let Some(bit) = u32::try_from(sig - 1).ok().filter(|b| *b < 64) else {
        return false;
    };
    status.lines().any(|l| {
        let mask = l
            .strip_prefix("SigPnd:")
            .or_else(|| l.strip_prefix("ShdPnd:"));
        mask.and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .is_some_and(|m| m & (1u64 << bit) != 0)
    })
}

/// The pid of a `udhcpc ... -i IFNAME` under `proc`.
fn udhcpc_for(proc: &Path, ifname: &str) -> Option<i32> {
    let mut pids: Vec<i32> = fs::read_dir(proc)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    // The newest: a udhcpc that just forked into the background is the higher pid.
    pids.sort();
    pids.into_iter().rev().find(|pid| {
        // Bounded: a command line longer than this is not one of ours.
        let Ok(raw) = fs::read(proc.join(pid.to_string()).join("cmdline")) else {
            return false;
        };
        let raw = &raw[..raw.len().min(4096)];
        let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
        let is_udhcpc = args
            .first()
            .is_some_and(|a| a.rsplit(|b| *b == b'/').next() == Some(b"udhcpc"));
        is_udhcpc
            && args
                .windows(2)
                .any(|w| (w[0] == b"-i" || w[0] == b"--interface") && w[1] == ifname.as_bytes())
    })
}

fn run_quiet(prog: &str, args: &[&str]) -> io::Result<()> {
    let mut cmd = Command::new(prog);
    cmd.args(args);
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", crate::exec::DEFAULT_PATH);
    }
    let out = cmd.output()?;
    if out.status.success() {
        Ok(())
    } else {
        let mut e = String::from_utf8_lossy(&out.stderr).trim().to_string();
        e.truncate(500);
        Err(io::Error::other(format!("{prog} {}: {e}", args.join(" "))))
    }
}

/// The SSH host keys (private halves) under `etc/ssh` of `root`.
fn ssh_host_keys(root: &Path) -> Vec<PathBuf> {
    let mut keys: Vec<PathBuf> = fs::read_dir(root.join("etc/ssh"))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("ssh_host_") && n.ends_with("_key"))
                })
                .collect()
        })
        .unwrap_or_default();
    keys.sort();
    keys
}

fn set_mac_ip(ifname: &str, mac: &str) -> io::Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["link", "set", "dev", ifname, "address", mac]);
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", crate::exec::DEFAULT_PATH);
    }
    let out = cmd.output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip link set {ifname} address {mac}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Where an update is applied: `/` and the guest's paths outside tests.
pub struct Paths {
    /// Root of the guest's files (`/etc/hostname`, `/etc/machine-id`, ...).
    pub root: PathBuf,
    /// `/sys/class/net`.
    pub sys_net: PathBuf,
    /// The hooks directory.
    pub hooks: PathBuf,
    /// The record of the last applied token.
    pub state: PathBuf,
}

impl Paths {
    /// The guest's real paths.
    pub fn guest() -> Self {
        Paths {
            root: PathBuf::from("/"),
            sys_net: PathBuf::from("/sys/class/net"),
            hooks: PathBuf::from(HOOKS_DIR),
            state: PathBuf::from(STATE_FILE),
        }
    }
}

/// Interfaces under `sys_net` whose address is `mac`.
fn interface_with(sys_net: &Path, mac: &str) -> Option<String> {
    let mut names: Vec<String> = fs::read_dir(sys_net)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.into_iter().find(|n| {
        fs::read_to_string(sys_net.join(n).join("address"))
            .is_ok_and(|a| a.trim().eq_ignore_ascii_case(mac))
    })
}

fn read_trimmed(p: &Path) -> String {
    // Bounded: these are one-line files, and a huge one is not ours.
    fs::read(p)
        .map(|b| {
            String::from_utf8_lossy(&b[..b.len().min(256)])
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// Apply `u` (checked by the decoder) under `paths` through `sys`; see the module docs.
pub fn apply(u: &IdentityUpdate, paths: &Paths, sys: &dyn System) -> IdentityApplied {
    let etc = paths.root.join("etc");
    let old_hostname = read_trimmed(&etc.join("hostname"));
    let mut out = IdentityApplied {
        hostname: u.hostname.clone().unwrap_or_else(|| old_hostname.clone()),
        ..Default::default()
    };
    if read_trimmed(&paths.state) == u.token {
        out.already = true;
        return out;
    }
    let old_machine_id = read_trimmed(&etc.join("machine-id"));
    // Where the time goes, for the log: a clone's guest runs each step on a cold TCG cache.
    let started = std::time::Instant::now();
    let mut lap = {
        let mut last = started;
        move || {
            let now = std::time::Instant::now();
            let ms = now.duration_since(last).as_millis();
            last = now;
            ms
        }
    };
    let mut errors = Vec::new();
    let mut err = |what: &str, e: io::Error| out_err(&mut errors, what, e);
    if let Some(hostname) = &u.hostname {
        if let Err(e) = sys.set_hostname(hostname) {
            err("setting the hostname", e);
        }
        if let Err(e) = crate::seed::write_atomic(
            &etc.join("hostname"),
            format!("{hostname}\n").as_bytes(),
            0o644,
        ) {
            err("writing /etc/hostname", e);
        }
        let hosts = fs::read_to_string(etc.join("hosts")).unwrap_or_default();
        if let Err(e) = crate::seed::write_atomic(
            &etc.join("hosts"),
            crate::seed::hosts_with(&hosts, hostname).as_bytes(),
            0o644,
        ) {
            err("writing /etc/hosts", e);
        }
        if *hostname != old_hostname {
            out.changed.push("hostname".into());
        }
    }
    if let Some(machine_id) = &u.machine_id {
        let id = format!("{machine_id}\n");
        if let Err(e) = crate::seed::write_atomic(&etc.join("machine-id"), id.as_bytes(), 0o444) {
            err("writing /etc/machine-id", e);
        }
        // D-Bus keeps its own copy where it is not a link to /etc/machine-id.
        let dbus = paths.root.join("var/lib/dbus/machine-id");
        if fs::symlink_metadata(&dbus).is_ok_and(|m| m.is_file()) {
            if let Err(e) = crate::seed::write_atomic(&dbus, id.as_bytes(), 0o444) {
                err("writing /var/lib/dbus/machine-id", e);
            }
        }
        if *machine_id != old_machine_id {
            out.changed.push("machine-id".into());
        }
        // A new machine must not prove itself with the old one's host keys.
        let keys = ssh_host_keys(&paths.root);
        if !keys.is_empty() {
            for k in &keys {
                let _ = fs::remove_file(k);
                // `ssh_host_ed25519_key` has no extension: this is `..._key.pub`.
                let _ = fs::remove_file(k.with_extension("pub"));
            }
            match sys.make_ssh_host_keys(&paths.root) {
                Ok(()) => {
                    out.ssh_keys = ssh_host_keys(&paths.root)
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect();
                    out.changed.push("ssh-host-keys".into());
                }
                Err(e) => err("regenerating the SSH host keys", e),
            }
        }
    }
    let names_ms = lap();
    let mut macs = Vec::new();
    let mut changed_ifs = Vec::new();
    for n in &u.nics {
        match interface_with(&paths.sys_net, &n.old_mac) {
            Some(ifname) => match sys.set_mac(&ifname, &n.mac) {
                Ok(()) => {
                    macs.push(format!("{ifname}={}", n.mac));
                    out.changed.push(format!("mac:{ifname}"));
                    changed_ifs.push(ifname);
                }
                Err(e) => err(&format!("setting {ifname}'s address"), e),
            },
            None if interface_with(&paths.sys_net, &n.mac).is_some() => {
                // Already has it (a clone's QEMU started with it, or an update resent).
            }
            None => err(
                &format!("NIC {}", n.old_mac),
                io::Error::other("no interface has this address"),
            ),
        }
    }
    out.nics = macs;
    let nics_ms = lap();
    // A new address needs a new lease; a new hostname is announced in one.
    let renew: Vec<String> = if out.changed.iter().any(|c| c == "hostname") {
        interfaces(&paths.sys_net)
    } else {
        changed_ifs.clone()
    };
    for ifname in renew {
        match sys.renew_dhcp(&ifname, changed_ifs.contains(&ifname)) {
            Ok(true) => out.renewed.push(ifname),
            Ok(false) => {}
            Err(e) => err(&format!("renewing {ifname}'s DHCP lease"), e),
        }
    }
    out.errors = errors;
    let dhcp_ms = lap();
    // Recorded before the hooks: a repeat of this update never runs them twice.
    if let Some(dir) = paths.state.parent() {
        let _ = fs::create_dir_all(dir);
    }
    if let Err(e) = crate::seed::write_atomic(&paths.state, u.token.as_bytes(), 0o644) {
        out_err(&mut out.errors, "recording the update", e);
    }
    let env = [
        (ENV_OLD_HOSTNAME, old_hostname),
        (ENV_NEW_HOSTNAME, out.hostname.clone()),
        (ENV_OLD_MACHINE_ID, old_machine_id.clone()),
        (
            ENV_NEW_MACHINE_ID,
            u.machine_id.clone().unwrap_or(old_machine_id),
        ),
        (ENV_NEW_MACS, out.nics.join(" ")),
        (ENV_CHANGED, out.changed.join(" ")),
        (ENV_REASON, u.reason.clone()),
    ];
    out.hooks = crate::migration::run_hooks_with(&paths.hooks, &env, HOOK_TIMEOUT)
        .into_iter()
        .map(|h| match (h.exit_code, h.timed_out) {
            (_, true) => format!("{}:timed out", h.name),
            (Some(c), _) => format!("{}:{c}", h.name),
            (None, _) => format!("{}:{}", h.name, h.error.unwrap_or_default()),
        })
        .collect();
    let hooks_ms = lap();
    crate::log!(
        "new identity: changed [{}], hostname {}, nics [{}], renewed [{}], {} hook(s), {} error(s) ({}; {} ms: names {names_ms}, NICs {nics_ms}, DHCP {dhcp_ms}, hooks {hooks_ms})",
        out.changed.join(" "),
        out.hostname,
        out.nics.join(" "),
        out.renewed.join(" "),
        out.hooks.len(),
        out.errors.len(),
        u.reason,
        started.elapsed().as_millis()
    );
    out
}

/// What listening apps are told: what changed, with the old and new values.
pub fn restored_notice(u: &IdentityUpdate, a: &IdentityApplied, old: &Before) -> serde_json::Value {
    serde_json::json!({
        "changed": a.changed,
        "hostname": { "old": old.hostname, "new": a.hostname },
        "machine_id": { "old": old.machine_id, "new": u.machine_id.clone().unwrap_or_else(|| old.machine_id.clone()) },
        "nics": a.nics,
        "renewed": a.renewed,
        "reason": u.reason,
    })
}

/// Hostname and machine-id before an update, for the [`restored_notice`].
#[derive(Debug, Clone, Default)]
pub struct Before {
    /// `/etc/hostname`.
    pub hostname: String,
    /// `/etc/machine-id`.
    pub machine_id: String,
}

impl Before {
    /// Read them under `paths`.
    pub fn read(paths: &Paths) -> Self {
        let etc = paths.root.join("etc");
        Before {
            hostname: read_trimmed(&etc.join("hostname")),
            machine_id: read_trimmed(&etc.join("machine-id")),
        }
    }
}

/// Every interface under `sys_net` but loopback, in name order.
fn interfaces(sys_net: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(sys_net)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "lo")
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn out_err(errors: &mut Vec<String>, what: &str, e: io::Error) {
    let mut m = format!("{what}: {e}");
    m.truncate(1000);
    errors.push(m);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;
    use drover_proto::NicIdentity;
    use std::os::unix::fs::PermissionsExt as _;
    use std::sync::Mutex;

    #[test]
    fn a_pending_signal_is_read_from_either_mask() {
        let status = |sig: &str, shd: &str| {
            format!("Name:\tudhcpc\nSigQ:\t1/7581\nSigPnd:\t{sig}\nShdPnd:\t{shd}\nSigBlk:\t0000000000000000\n")
        };
        // SIGUSR2 is 12: bit 11, 0x800.
        assert!(signal_pending(
            &status("0000000000000000", "0000000000000800"),
            libc::SIGUSR2
        ));
        assert!(signal_pending(
            &status("0000000000000800", "0000000000000000"),
            libc::SIGUSR2
        ));
        assert!(!signal_pending(
            &status("0000000000000200", "0000000000000000"),
            libc::SIGUSR2
        ));
        assert!(signal_pending(
            &status("0000000000000200", "0000000000000000"),
            libc::SIGUSR1
        ));
        assert!(!signal_pending("garbage", libc::SIGUSR2));
    }

    #[test]
    fn a_real_signal_is_seen_pending_until_it_is_taken() {
        let d = TempDir::new("sigwait");
        let p = d.path().join("4242");
        fs::create_dir_all(&p).unwrap();
        fs::write(p.join("status"), "ShdPnd:\t0000000000000800\n").unwrap();
        let t = std::time::Instant::now();
        assert!(!wait_delivered(
            d.path(),
            4242,
            libc::SIGUSR2,
            Duration::from_millis(30)
        ));
        assert!(t.elapsed() >= Duration::from_millis(30));
        fs::write(p.join("status"), "ShdPnd:\t0000000000000000\n").unwrap();
        assert!(wait_delivered(
            d.path(),
            4242,
            libc::SIGUSR2,
            Duration::from_secs(5)
        ));
        // This process: a signal it blocks stays pending, then is taken once unblocked.
        // SAFETY: blocking and unblocking SIGUSR2 for this thread only, around a signal to it.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::signal(libc::SIGUSR2, libc::SIG_IGN);
        }
        let me = std::process::id() as i32;
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
        unsafe { libc::syscall(libc::SYS_tgkill, me, tid, libc::SIGUSR2) };
        let thread_status = fs::read_to_string(format!("/proc/{me}/task/{tid}/status")).unwrap();
        assert!(
            signal_pending(&thread_status, libc::SIGUSR2),
            "{thread_status}"
        );
    }

    #[derive(Default)]
    struct Fake {
        hostname: Mutex<Option<String>>,
        macs: Mutex<Vec<(String, String)>>,
        renewed: Mutex<Vec<String>>,
        keygens: Mutex<u32>,
    }

    impl System for Fake {
        fn set_hostname(&self, name: &str) -> io::Result<()> {
            *self.hostname.lock().unwrap() = Some(name.into());
            Ok(())
        }
        fn set_mac(&self, ifname: &str, mac: &str) -> io::Result<()> {
            self.macs.lock().unwrap().push((ifname.into(), mac.into()));
            Ok(())
        }
        fn renew_dhcp(&self, ifname: &str, fresh: bool) -> io::Result<bool> {
            let tag = if fresh { "+" } else { "" };
            self.renewed.lock().unwrap().push(format!("{tag}{ifname}"));
            Ok(ifname != "eth9")
        }
        fn make_ssh_host_keys(&self, root: &Path) -> io::Result<()> {
            *self.keygens.lock().unwrap() += 1;
            fs::write(root.join("etc/ssh/ssh_host_ed25519_key"), "NEW")?;
            fs::write(root.join("etc/ssh/ssh_host_ed25519_key.pub"), "NEW.pub")
        }
    }

    fn update(token: &str) -> IdentityUpdate {
        IdentityUpdate {
            token: token.into(),
            hostname: Some("web-2".into()),
            machine_id: Some("0123456789abcdef0123456789abcdef".into()),
            nics: vec![
                NicIdentity {
                    old_mac: "52:54:00:00:00:02".into(),
                    mac: "52:54:00:aa:bb:cc".into(),
                },
                NicIdentity {
                    old_mac: "52:54:00:00:00:09".into(),
                    mac: "52:54:00:aa:bb:dd".into(),
                },
            ],
            reason: "clone of state s1 of web".into(),
        }
    }

    #[test]
    fn macs_parse_to_their_bytes() {
        assert_eq!(
            mac_bytes("52:54:00:ab:cd:0f").unwrap(),
            [0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]
        );
        assert!(mac_bytes("52:54:00:ab:cd").is_err());
        assert!(mac_bytes("52:54:00:ab:cd:zz").is_err());
    }

    #[test]
    fn applies_names_and_addresses_and_runs_the_hooks_once_per_token() {
        let d = TempDir::new("identity");
        let paths = guest(&d, &[("eth0", "52:54:00:00:00:02")], false);
        let root = paths.root.clone();
        let hooks = d.path().join("hooks");
        fs::create_dir_all(&hooks).unwrap();
        let log = d.path().join("hook.log");
        let hook = hooks.join("10-log");
        fs::write(
            &hook,
            format!(
                "#!/bin/sh\necho \"$DROVER_OLD_HOSTNAME>$DROVER_NEW_HOSTNAME $DROVER_OLD_MACHINE_ID>$DROVER_NEW_MACHINE_ID $DROVER_NEW_MACS [$DROVER_CHANGED]\" >>{}\n",
                log.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
        let sys = Fake::default();
        let a = apply(&update("t1"), &paths, &sys);
        assert!(!a.already);
        assert_eq!(a.nics, vec!["eth0=52:54:00:aa:bb:cc"]);
        assert_eq!(a.changed, vec!["hostname", "machine-id", "mac:eth0"]);
        // A new hostname is announced in a new lease on every interface.
        assert_eq!(a.renewed, vec!["eth0"]);
        assert!(a.ssh_keys.is_empty(), "this guest has no SSH host keys");
        assert_eq!(
            a.errors.len(),
            1,
            "the second NIC is not there: {:?}",
            a.errors
        );
        assert!(a.errors[0].contains("52:54:00:00:00:09"));
        assert_eq!(a.hooks, vec!["10-log:0"]);
        assert_eq!(sys.hostname.lock().unwrap().as_deref(), Some("web-2"));
        assert_eq!(
            fs::read_to_string(root.join("etc/machine-id")).unwrap(),
            "0123456789abcdef0123456789abcdef\n"
        );
        assert_eq!(
            fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "web-2\n"
        );
        assert!(fs::read_to_string(root.join("etc/hosts"))
            .unwrap()
            .contains("127.0.1.1\tweb-2"));
        assert_eq!(
            fs::read_to_string(&log).unwrap(),
            "web>web-2 ffffffffffffffffffffffffffffffff>0123456789abcdef0123456789abcdef eth0=52:54:00:aa:bb:cc [hostname machine-id mac:eth0]\n"
        );
        // The same update again (a resend): nothing changes, no hook runs.
        let again = apply(&update("t1"), &paths, &sys);
        assert!(again.already);
        assert!(again.hooks.is_empty());
        assert_eq!(sys.macs.lock().unwrap().len(), 1);
        assert_eq!(fs::read_to_string(&log).unwrap().lines().count(), 1);
        // A new update (the clone cloned again) applies and runs them again.
        let next = apply(&update("t2"), &paths, &sys);
        assert!(!next.already);
        assert_eq!(fs::read_to_string(&log).unwrap().lines().count(), 2);
    }

    const TWO_NICS: &[(&str, &str)] =
        &[("eth0", "52:54:00:00:00:02"), ("eth1", "52:54:00:00:00:09")];

    /// A guest (hostname web) with these interfaces besides lo, and SSH host keys if `ssh`.
    fn guest(d: &TempDir, nics: &[(&str, &str)], ssh: bool) -> Paths {
        let root = d.path().join("root");
        fs::create_dir_all(root.join("etc/ssh")).unwrap();
        fs::write(root.join("etc/hostname"), "web\n").unwrap();
        fs::write(
            root.join("etc/machine-id"),
            "ffffffffffffffffffffffffffffffff\n",
        )
        .unwrap();
        let keys: &[&str] = if ssh {
            &["ssh_host_ed25519_key", "ssh_host_rsa_key"]
        } else {
            &[]
        };
        for k in keys {
            fs::write(root.join("etc/ssh").join(k), "OLD").unwrap();
            fs::write(root.join("etc/ssh").join(format!("{k}.pub")), "OLD.pub").unwrap();
        }
        let sys_net = d.path().join("net");
        for (n, mac) in [("lo", "00:00:00:00:00:00")].iter().chain(nics) {
            fs::create_dir_all(sys_net.join(n)).unwrap();
            fs::write(sys_net.join(n).join("address"), format!("{mac}\n")).unwrap();
        }
        Paths {
            root,
            sys_net,
            hooks: d.path().join("hooks"),
            state: d.path().join("run/identity-token"),
        }
    }

    #[test]
    fn new_macs_alone_keep_the_name_and_renew_only_the_changed_interface() {
        let d = TempDir::new("identity-macs");
        let paths = guest(&d, TWO_NICS, true);
        let sys = Fake::default();
        let u = IdentityUpdate {
            token: "r1".into(),
            hostname: None,
            machine_id: None,
            nics: vec![NicIdentity {
                old_mac: "52:54:00:00:00:09".into(),
                mac: "52:54:00:aa:bb:dd".into(),
            }],
            reason: "resume of state s3".into(),
        };
        let before = Before::read(&paths);
        let a = apply(&u, &paths, &sys);
        assert!(a.errors.is_empty(), "{:?}", a.errors);
        assert_eq!(a.hostname, "web", "kept");
        assert_eq!(a.changed, vec!["mac:eth1"]);
        // A new MAC: a new lease from scratch.
        assert_eq!(*sys.renewed.lock().unwrap(), vec!["+eth1"]);
        assert_eq!(a.renewed, vec!["eth1"]);
        assert!(sys.hostname.lock().unwrap().is_none());
        assert_eq!(
            *sys.keygens.lock().unwrap(),
            0,
            "keys stay with the machine-id"
        );
        assert_eq!(
            fs::read_to_string(paths.root.join("etc/machine-id")).unwrap(),
            "ffffffffffffffffffffffffffffffff\n"
        );
        let n = restored_notice(&u, &a, &before);
        assert_eq!(n["changed"], serde_json::json!(["mac:eth1"]));
        assert_eq!(n["hostname"]["old"], "web");
        assert_eq!(n["hostname"]["new"], "web");
        assert_eq!(n["machine_id"]["new"], "ffffffffffffffffffffffffffffffff");
    }

    #[test]
    fn a_new_machine_id_replaces_the_ssh_host_keys() {
        let d = TempDir::new("identity-ssh");
        let paths = guest(&d, TWO_NICS, true);
        let sys = Fake::default();
        let mut u = update("k1");
        u.nics.clear();
        let before = Before::read(&paths);
        let a = apply(&u, &paths, &sys);
        assert_eq!(*sys.keygens.lock().unwrap(), 1);
        let ssh = paths.root.join("etc/ssh");
        assert_eq!(
            fs::read_to_string(ssh.join("ssh_host_ed25519_key")).unwrap(),
            "NEW"
        );
        assert!(!ssh.join("ssh_host_rsa_key").exists(), "old keys removed");
        assert!(
            !ssh.join("ssh_host_rsa_key.pub").exists(),
            "old keys removed"
        );
        assert_eq!(a.ssh_keys.len(), 1, "{:?}", a.ssh_keys);
        assert_eq!(a.changed, vec!["hostname", "machine-id", "ssh-host-keys"]);
        // The hostname changed: every interface but lo renews.
        assert_eq!(*sys.renewed.lock().unwrap(), vec!["eth0", "eth1"]);
        let n = restored_notice(&u, &a, &before);
        assert_eq!(n["hostname"]["old"], "web");
        assert_eq!(n["hostname"]["new"], "web-2");
        assert_eq!(n["machine_id"]["new"], "0123456789abcdef0123456789abcdef");
    }

    #[test]
    fn the_dhcp_client_is_found_by_its_interface() {
        let d = TempDir::new("identity-proc");
        let proc = d.path();
        for (pid, args) in [
            ("12", &["udhcpc", "-b", "-s", "/x", "-i", "eth1"][..]),
            // Forked into the background with its lease: the parent (10) is exiting.
            ("10", &["udhcpc", "-b", "-s", "/x", "-i", "eth1"][..]),
            ("7", &["/sbin/udhcpc", "-i", "eth0"][..]),
            ("3", &["sh", "-c", "udhcpc -i eth0"][..]),
            ("self", &["udhcpc", "-i", "eth0"][..]),
        ] {
            fs::create_dir_all(proc.join(pid)).unwrap();
            let mut raw = args.join("\0");
            raw.push('\0');
            fs::write(proc.join(pid).join("cmdline"), raw).unwrap();
        }
        assert_eq!(udhcpc_for(proc, "eth0"), Some(7));
        assert_eq!(udhcpc_for(proc, "eth1"), Some(12));
        assert_eq!(udhcpc_for(proc, "eth2"), None);
    }
}
