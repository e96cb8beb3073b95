//! What a QEMU that runs as its own user ([`crate::qemu_user`]) is given: its directories made
//! usable, the files droverd made for it granted, and every file outside droverd's state dir
//! opened by droverd and handed over as a descriptor.

use super::Manager;
use crate::error::{io_ctx, HostError, Result};
use drover_model::{DiskConfig, DiskFormat, VmConfig};
use drover_qemu::cmdline::{ChainLayer, FdArg, KernelBoot, RunPaths};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Longest backing chain droverd follows in its own files (a loop would be a bug elsewhere).
const MAX_CHAIN: usize = 512;

/// The suffix a guest's RAM file gets while it is freed in the background.
pub(super) const FREEING_SUFFIX: &str = ".freeing";

/// Free a guest's RAM file (in /dev/shm) off the caller's path: unlinking a filled tmpfs file
/// frees every page of it (about 0.1-0.3 s per GiB here), which a restore replacing a running
/// VM waited for. The file is first renamed (instant) so its name is free for the next QEMU at
/// once and a late unlink cannot hit a new file; a droverd killed before the unlink leaves it
/// under the suffix, removed at the next start.
pub(super) fn free_ram_file(path: &Path) {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(
        "{FREEING_SUFFIX}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let doomed = PathBuf::from(name);
    match std::fs::rename(path, &doomed) {
        Ok(()) => {
            let spawned = std::thread::Builder::new().name("free-ram".into()).spawn({
                let doomed = doomed.clone();
                move || {
                    let _ = std::fs::remove_file(doomed);
                }
            });
            if spawned.is_err() {
                let _ = std::fs::remove_file(doomed);
            }
        }
        // Gone already, or not renamable: remove it here.
        Err(_) => {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Disks as QEMU opens them: chains named by droverd, and the descriptors they need.
#[derive(Default)]
pub(super) struct QemuDisks {
    /// Disk id → its chain, top first, for the disks that reach a file outside the state dir.
    pub chains: BTreeMap<String, Vec<ChainLayer>>,
    /// The descriptors, kept open until QEMU has them.
    pub fds: Vec<(OwnedFd, FdArg)>,
}

impl QemuDisks {
    /// The `-add-fd` arguments.
    pub fn args(&self) -> Vec<FdArg> {
        self.fds.iter().map(|(_, a)| a.clone()).collect()
    }

    /// The raw descriptors QEMU inherits.
    pub fn inherit(&self) -> Vec<i32> {
        self.fds.iter().map(|(fd, _)| fd.as_raw_fd()).collect()
    }
}

/// One disk's files, top first: droverd's own layers (followed through their headers) down to
/// the first file outside `state_dir`, which ends it (its header is the user's or admin's).
fn chain_files(state_dir: &Path, top: &Path) -> Result<Vec<PathBuf>> {
    let mut files = vec![top.to_path_buf()];
    let mut cur = top.to_path_buf();
    while cur.starts_with(state_dir) {
        let refs = match drover_qemu::qcow2::read(&cur) {
            Ok(r) => r,
            Err(drover_qemu::qcow2::HeaderError::NotQcow2) => break,
            Err(e) => return Err(HostError::Internal(format!("disk layer: {e}"))),
        };
        let Some(name) = refs.backing else { break };
        let next = drover_qemu::qcow2::backing_path(&cur, &name).ok_or_else(|| {
            HostError::Internal(format!(
                "disk layer {} has a backing file droverd does not write: {name}",
                cur.display()
            ))
        })?;
        if files.len() >= MAX_CHAIN {
            return Err(HostError::Internal(format!(
                "disk layer {}: backing chain longer than {MAX_CHAIN}",
                top.display()
            )));
        }
        files.push(next.clone());
        cur = next;
    }
    Ok(files)
}

impl Manager {
    /// Directories QEMU uses, made usable by its user: the state dir and `vms/`, `run/` to pass
    /// through, the VM's directories to read in, the run and RAM directories to create in.
    pub(super) fn prepare_qemu_dirs(&self, name: &str, run_dir: &Path) -> Result<()> {
        let u = &self.s.qemu_user;
        if !u.is_dedicated() {
            return Ok(());
        }
        let state = &self.s.cfg.state_dir;
        let vm_dir = self.vm_dir(name);
        let fix = |r: std::io::Result<()>, p: &Path| {
            r.map_err(|e| {
                HostError::Internal(format!(
                    "preparing {} for QEMU's user {}: {e}",
                    p.display(),
                    u.name
                ))
            })
        };
        for d in [state.clone(), state.join("vms"), state.join("run")] {
            fix(u.passage(&d, false), &d)?;
        }
        // Imported images, the backing files of thin copies: passed through, read, not written.
        let images = self.images_dir();
        if images.is_dir() {
            fix(u.passage(&images, false), &images)?;
        }
        for d in [vm_dir.join("disks"), vm_dir.join("states")] {
            std::fs::create_dir_all(&d).map_err(|e| io_ctx("creating", &d, e))?;
        }
        fix(u.passage(&vm_dir, true), &vm_dir)?;
        for d in [vm_dir.join("disks"), vm_dir.join("states")] {
            fix(u.passage(&d, true), &d)?;
        }
        for d in [run_dir.to_path_buf(), self.ram_dir()] {
            fix(u.workspace(&d), &d)?;
        }
        Ok(())
    }

    /// A directory QEMU writes a state's files in.
    pub(super) fn qemu_writes_in(&self, dir: &Path) -> Result<()> {
        self.s
            .qemu_user
            .workspace(dir)
            .map_err(|e| HostError::Internal(format!("preparing {} for QEMU: {e}", dir.display())))
    }

    /// A file droverd made that QEMU opens (writable when `write`).
    pub(super) fn grant_qemu(&self, file: &Path, write: bool) -> Result<()> {
        self.s
            .qemu_user
            .grant(file, write)
            .map_err(|e| HostError::Internal(format!("granting {} to QEMU: {e}", file.display())))
    }

    /// The console log, there and writable by QEMU (it appends to it).
    pub(super) fn prepare_console(&self, console: &Path) -> Result<()> {
        if !self.s.qemu_user.is_dedicated() {
            return Ok(());
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(console)
            .map_err(|e| io_ctx("creating", console, e))?;
        self.grant_qemu(console, true)
    }

    /// The kernel and initrd as QEMU's user can read them (copies in `run_dir` if it cannot).
    pub(super) fn qemu_boot_files(
        &self,
        kernel: Option<KernelBoot>,
        run_dir: &Path,
    ) -> Result<Option<KernelBoot>> {
        let Some(mut k) = kernel else { return Ok(None) };
        let u = &self.s.qemu_user;
        let copy = |p: &Path| {
            u.readable_copy(p, run_dir).map_err(|e| {
                HostError::Internal(format!("giving QEMU's user {} the boot file: {e}", u.name))
            })
        };
        k.kernel = copy(&k.kernel)?;
        if let Some(i) = &k.initrd {
            k.initrd = Some(copy(i)?);
        }
        Ok(Some(k))
    }

    /// How QEMU opens `disks` (each on the layer it runs on; `first_set` numbers their fd sets).
    /// droverd's own layers are granted (writable unless the disk is read-only); a disk that
    /// reaches a file outside the state dir gets its chain named and that
    /// file as descriptors: read-only always (QEMU reopens a layer read-only once a save puts an
    /// overlay on it), read-write too when the disk is writable.
    pub(super) fn qemu_disks(&self, disks: &[DiskConfig], first_set: u32) -> Result<QemuDisks> {
        let mut out = QemuDisks::default();
        if !self.s.qemu_user.is_dedicated() {
            return Ok(out);
        }
        let state = &self.s.cfg.state_dir;
        for (i, d) in disks.iter().enumerate() {
            let files = chain_files(state, &d.path)?;
            let mut chain = Vec::with_capacity(files.len());
            let mut outside = false;
            for (depth, f) in files.iter().enumerate() {
                // droverd's layers stay group-writable even below the top: QEMU reopens backing
                // layers read-write while it changes a chain (a save's blockdev-snapshot, a
                // mirror), and fails if it cannot. A pinned layer is kept from writes by QEMU
                // opening it read-only, as before; files outside the state dir get descriptors
                // of the access the disk has.
                let format = if depth + 1 == files.len() {
                    d.format
                } else {
                    DiskFormat::Qcow2
                };
                if f.starts_with(state) {
                    // An imported image is shared by its thin copies: never writable by QEMU.
                    let shared = f.starts_with(self.images_dir());
                    self.grant_qemu(f, !d.readonly && !shared)?;
                    chain.push(ChainLayer {
                        filename: f.display().to_string(),
                        format,
                    });
                    continue;
                }
                outside = true;
                let set = first_set + i as u32;
                // Read-write too for a writable disk even when a save has put overlays on the
                // file: QEMU may reopen it read-write while it changes the chain (a non-admin's
                // writable disk comes from a pool marked :rw; an admin's path is the admin's).
                for rw in [false, true] {
                    if rw && d.readonly {
                        continue;
                    }
                    let file = self.s.pools.open_for_qemu(f, rw)?;
                    out.fds.push((
                        OwnedFd::from(file),
                        FdArg {
                            fd: -1,
                            set,
                            opaque: format!("{}:{}", d.id, if rw { "rw" } else { "ro" }),
                        },
                    ));
                }
                chain.push(ChainLayer {
                    filename: format!("/dev/fdset/{set}"),
                    format,
                });
            }
            if outside {
                out.chains.insert(d.id.to_string(), chain);
            }
        }
        for (fd, arg) in out.fds.iter_mut() {
            arg.fd = fd.as_raw_fd();
        }
        Ok(out)
    }

    /// Hot-plug `d` (on its layer) into a running QEMU: with its chain named and descriptors
    /// passed over QMP when it reaches a file outside the state dir.
    pub(super) async fn hotplug_disk(
        &self,
        vmm: &impl crate::vmm::Vmm,
        d: &DiskConfig,
        port: u8,
    ) -> Result<()> {
        let mut disks = self.qemu_disks(std::slice::from_ref(d), 0)?;
        let blockdev = match disks.chains.remove(d.id.as_str()) {
            None => None,
            Some(mut chain) => {
                // QEMU picks the set: ask for a new one with the first descriptor, add the rest.
                let mut set: Option<u64> = None;
                for (fd, arg) in &disks.fds {
                    set = vmm
                        .add_fd(std::os::fd::AsFd::as_fd(fd), &arg.opaque, set)
                        .await?;
                }
                let set =
                    set.ok_or_else(|| HostError::Internal("QEMU's add-fd named no fd set".into()))?;
                if let Some(last) = chain.last_mut() {
                    last.filename = format!("/dev/fdset/{set}");
                }
                Some(drover_qemu::cmdline::chain_blockdev(
                    &drover_qemu::cmdline::disk_node(d),
                    d.readonly,
                    &chain,
                ))
            }
        };
        vmm.add_disk(d, port, blockdev).await?;
        Ok(())
    }

    /// Everything a launch of `config` gives QEMU besides its arguments: the run directory's
    /// files, the console, the disks.
    pub(super) fn prepare_qemu_launch(
        &self,
        name: &str,
        paths: &RunPaths,
        console: &Path,
        config: &VmConfig,
    ) -> Result<QemuDisks> {
        self.prepare_qemu_dirs(name, &paths.dir)?;
        self.prepare_console(console)?;
        self.qemu_disks(&config.disks, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_follow_droverds_layers_and_stop_at_the_first_outside_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let disks = state.join("vms/v/disks");
        std::fs::create_dir_all(&disks).unwrap();
        let pool = dir.path().join("pool");
        std::fs::create_dir_all(&pool).unwrap();
        let run = |args: &[&str]| {
            std::process::Command::new("qemu-img")
                .args(args)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let user = pool.join("user.qcow2");
        let evil = pool.join("evil-base.qcow2");
        if !run(&["create", "-q", "-f", "qcow2", evil.to_str().unwrap(), "1M"]) {
            return;
        }
        // `path`, a qcow2 overlay whose header names `backing` as it is written.
        let overlay = |backing: &str, path: &Path| {
            run(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                backing,
                path.to_str().unwrap(),
            ])
        };
        // The user's image names a backing file of its own: droverd must not follow it.
        assert!(overlay(evil.to_str().unwrap(), &user));
        let o1 = disks.join("d.o1.qcow2");
        let o2 = disks.join("d.o2.qcow2");
        assert!(overlay(user.to_str().unwrap(), &o1));
        assert!(overlay("d.o1.qcow2", &o2));
        assert_eq!(
            chain_files(&state, &o2).unwrap(),
            vec![o2.clone(), o1.clone(), user.clone()]
        );
        assert_eq!(chain_files(&state, &user).unwrap(), vec![user.clone()]);
        let own = disks.join("own.qcow2");
        assert!(run(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            own.to_str().unwrap(),
            "1M"
        ]));
        assert_eq!(chain_files(&state, &own).unwrap(), vec![own]);
    }
}
