//! A new identity pushed by the host after a clone lands ([`drover_proto::IdentityUpdate`]):
//! hostname, machine-id and NIC MAC addresses, then the `restored.d` hooks with the old and new
//! values.
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
/// Longest one hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// What changing the running system takes (the kernel's hostname, an interface's address), apart
/// so the file and matching logic is tested without root.
pub trait System {
    /// sethostname(2).
    fn set_hostname(&self, name: &str) -> io::Result<()>;
    /// Give interface `ifname` the address `mac`.
    fn set_mac(&self, ifname: &str, mac: &str) -> io::Result<()>;
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
    let mut out = IdentityApplied {
        hostname: u.hostname.clone(),
        ..Default::default()
    };
    if read_trimmed(&paths.state) == u.token {
        out.already = true;
        return out;
    }
    let etc = paths.root.join("etc");
    let old_hostname = read_trimmed(&etc.join("hostname"));
    let old_machine_id = read_trimmed(&etc.join("machine-id"));
    let mut err = |what: &str, e: io::Error| out_err(&mut out.errors, what, e);
    if let Err(e) = sys.set_hostname(&u.hostname) {
        err("setting the hostname", e);
    }
    if let Err(e) = crate::seed::write_atomic(
        &etc.join("hostname"),
        format!("{}\n", u.hostname).as_bytes(),
        0o644,
    ) {
        err("writing /etc/hostname", e);
    }
    let hosts = fs::read_to_string(etc.join("hosts")).unwrap_or_default();
    if let Err(e) = crate::seed::write_atomic(
        &etc.join("hosts"),
        crate::seed::hosts_with(&hosts, &u.hostname).as_bytes(),
        0o644,
    ) {
        err("writing /etc/hosts", e);
    }
    let id = format!("{}\n", u.machine_id);
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
    let mut macs = Vec::new();
    for n in &u.nics {
        match interface_with(&paths.sys_net, &n.old_mac) {
            Some(ifname) => match sys.set_mac(&ifname, &n.mac) {
                Ok(()) => macs.push(format!("{ifname}={}", n.mac)),
                Err(e) => err(&format!("setting {ifname}'s address"), e),
            },
            None => err(
                &format!("NIC {}", n.old_mac),
                io::Error::other("no interface has this address"),
            ),
        }
    }
    out.nics = macs;
    // Recorded before the hooks: a repeat of this update never runs them twice.
    if let Some(dir) = paths.state.parent() {
        let _ = fs::create_dir_all(dir);
    }
    if let Err(e) = crate::seed::write_atomic(&paths.state, u.token.as_bytes(), 0o644) {
        out_err(&mut out.errors, "recording the update", e);
    }
    let env = [
        (ENV_OLD_HOSTNAME, old_hostname),
        (ENV_NEW_HOSTNAME, u.hostname.clone()),
        (ENV_OLD_MACHINE_ID, old_machine_id),
        (ENV_NEW_MACHINE_ID, u.machine_id.clone()),
        (ENV_NEW_MACS, out.nics.join(" ")),
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
    crate::log!(
        "new identity: hostname {}, machine-id {}, nics [{}], {} hook(s), {} error(s) ({})",
        u.hostname,
        u.machine_id,
        out.nics.join(" "),
        out.hooks.len(),
        out.errors.len(),
        u.reason
    );
    out
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

    #[derive(Default)]
    struct Fake {
        hostname: Mutex<Option<String>>,
        macs: Mutex<Vec<(String, String)>>,
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
    }

    fn update(token: &str) -> IdentityUpdate {
        IdentityUpdate {
            token: token.into(),
            hostname: "web-2".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
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
        let root = d.path().join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/hostname"), "web\n").unwrap();
        fs::write(
            root.join("etc/machine-id"),
            "ffffffffffffffffffffffffffffffff\n",
        )
        .unwrap();
        let sys_net = d.path().join("net");
        for (n, mac) in [("lo", "00:00:00:00:00:00"), ("eth0", "52:54:00:00:00:02")] {
            fs::create_dir_all(sys_net.join(n)).unwrap();
            fs::write(sys_net.join(n).join("address"), format!("{mac}\n")).unwrap();
        }
        let hooks = d.path().join("hooks");
        fs::create_dir_all(&hooks).unwrap();
        let log = d.path().join("hook.log");
        let hook = hooks.join("10-log");
        fs::write(
            &hook,
            format!(
                "#!/bin/sh\necho \"$DROVER_OLD_HOSTNAME>$DROVER_NEW_HOSTNAME $DROVER_OLD_MACHINE_ID>$DROVER_NEW_MACHINE_ID $DROVER_NEW_MACS\" >>{}\n",
                log.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
        let paths = Paths {
            root: root.clone(),
            sys_net,
            hooks,
            state: d.path().join("run/identity-token"),
        };
        let sys = Fake::default();
        let a = apply(&update("t1"), &paths, &sys);
        assert!(!a.already);
        assert_eq!(a.nics, vec!["eth0=52:54:00:aa:bb:cc"]);
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
            "web>web-2 ffffffffffffffffffffffffffffffff>0123456789abcdef0123456789abcdef eth0=52:54:00:aa:bb:cc\n"
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
}
