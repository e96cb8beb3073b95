//! Imported disk images (`drover image import/list/delete`) and the thin copies VMs get of them
//! (`vm create --disk from=NAME`).
//!
//! An import copies the source — a raw or qcow2 file, with whatever its backing chain holds —
//! into a standalone qcow2 under `STATE_DIR/images/`, checked by `qemu-img` on the way, synced,
//! then recorded. The file is never opened for writing again: a VM's disk from it is a qcow2
//! overlay in the VM's own directory whose backing file it is, so VMs share its blocks and
//! write only their own. QEMU's user may read it, not write it. Deleting an image is refused
//! while a VM's disk is a copy of it.

use std::path::{Path, PathBuf};

use super::{lock, Manager};
use crate::auth::{Caller, Permission};
use crate::error::{io_ctx, HostError, Result};
use crate::hostfacts;
use drover_api::{DiskImage, ImageImportRequest};
use drover_model::{DiskConfig, DiskFormat, ElementId};
use drover_qemu::img;
use drover_store::StoreExt;

/// Imported images by name.
pub(super) const IMAGES: &str = "images";
/// The id of the disk `vm create --from-image` makes.
pub const ROOT_DISK: &str = "root";

impl Manager {
    /// Where imported images live.
    pub(super) fn images_dir(&self) -> PathBuf {
        self.s.cfg.state_dir.join("images")
    }

    /// Import `req.path` as image `req.name`.
    pub async fn image_import(
        &self,
        req: &ImageImportRequest,
        caller: &Caller,
    ) -> Result<DiskImage> {
        // A host path: an admin's business (see crate::pools).
        caller.require(Permission::Admin)?;
        let name = req.name.clone();
        if !drover_model::valid_image_name(&name) {
            return Err(HostError::Invalid(format!(
                "image name {name:?}: 1-64 characters of a-z, 0-9, '.', '_', '-'"
            )));
        }
        if !req.path.is_absolute() {
            return Err(HostError::Invalid(format!(
                "{}: give the file's absolute path",
                req.path.display()
            )));
        }
        let _one = self.s.create_lock.lock().await;
        if self.s.store.get::<DiskImage>(IMAGES, &name)?.is_some() {
            return Err(HostError::AlreadyExists(format!("image {name}")));
        }
        let image = self.import_file(&name, &req.path, None, None).await?;
        tracing::info!(image = name, bytes = image.bytes, source = %req.path.display(), "imported a disk image");
        Ok(image)
    }

    /// Copy `src` into the images dir as image `name` (with `boot`'s files beside it when
    /// given) and record it, replacing a record of that name. The caller holds the create lock
    /// and has checked that no VM uses an image it replaces.
    async fn import_file(
        &self,
        name: &str,
        src: &Path,
        boot: Option<&drover_api::ImageBoot>,
        build_key: Option<String>,
    ) -> Result<DiskImage> {
        let dir = self.images_dir();
        std::fs::create_dir_all(&dir).map_err(|e| io_ctx("creating", &dir, e))?;
        let file = dir.join(format!("{name}.qcow2"));
        let part = dir.join(format!(".{name}.qcow2.part"));
        // A leftover of an import cut short: never recorded, so ours to replace.
        let _ = std::fs::remove_file(&part);
        let src = src.to_path_buf();
        let (s2, p2, f2) = (src.clone(), part.clone(), file.clone());
        let info = tokio::task::spawn_blocking(move || -> Result<img::ImageInfo> {
            let src = s2;
            let info = img::inspect(&src)?;
            img::convert_to_qcow2(&src, info.format, &p2)?;
            // What was written must read back as a whole qcow2 of the same size.
            let made = img::inspect(&p2)?;
            if made.virtual_size != info.virtual_size {
                return Err(HostError::Internal(format!(
                    "the copy of {} has {} bytes, the source {}",
                    src.display(),
                    made.virtual_size,
                    info.virtual_size
                )));
            }
            sync_file(&p2)?;
            std::fs::rename(&p2, &f2).map_err(|e| io_ctx("moving into place", &f2, e))?;
            Ok(info)
        })
        .await
        .map_err(|e| HostError::Internal(e.to_string()))?;
        let info = match info {
            Ok(i) => i,
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                return Err(e);
            }
        };
        let boot = match boot {
            Some(b) => Some(self.copy_boot_files(name, b)?),
            None => None,
        };
        sync_file(&dir)?;
        let bytes = std::fs::metadata(&file)
            .map_err(|e| io_ctx("reading", &file, e))?
            .len();
        let image = DiskImage {
            name: name.to_string(),
            file: file.clone(),
            virtual_size: info.virtual_size,
            bytes,
            source: src.display().to_string(),
            source_format: info.format.to_string(),
            imported_at_ms: hostfacts::now_ms(),
            used_by: Vec::new(),
            boot,
            build_key,
        };
        if let Err(e) = self
            .s
            .store
            .apply(vec![drover_store::put(IMAGES, name, &image)?])
        {
            let _ = std::fs::remove_file(&file);
            return Err(e.into());
        }
        Ok(image)
    }

    /// Copies of a built image's kernel and initrd beside its disk (`NAME.vmlinux`,
    /// `NAME.initrd`): a later build replaces its cache, not what VMs boot from.
    fn copy_boot_files(
        &self,
        name: &str,
        b: &drover_api::ImageBoot,
    ) -> Result<drover_api::ImageBoot> {
        let dir = self.images_dir();
        let copy = |from: &Path, ext: &str| -> Result<PathBuf> {
            let to = dir.join(format!("{name}.{ext}"));
            let part = dir.join(format!(".{name}.{ext}.part"));
            std::fs::copy(from, &part).map_err(|e| io_ctx("copying", from, e))?;
            sync_file(&part)?;
            std::fs::rename(&part, &to).map_err(|e| io_ctx("moving into place", &to, e))?;
            Ok(to)
        };
        Ok(drover_api::ImageBoot {
            kernel: copy(&b.kernel, "vmlinux")?,
            initrd: copy(&b.initrd, "initrd")?,
            cmdline: b.cmdline.clone(),
        })
    }

    /// Record a distribution image just built (`drover image build --distro NAME`) as the
    /// image `NAME`: kept when its build key is unchanged, refreshed when it changed and no VM
    /// uses it; otherwise kept with a note saying why.
    pub(crate) async fn import_built(
        &self,
        name: &str,
        disk: &Path,
        boot: &drover_api::ImageBoot,
        build_key: &str,
    ) -> Result<(DiskImage, Option<String>)> {
        let _one = self.s.create_lock.lock().await;
        if let Some(old) = self.s.store.get::<DiskImage>(IMAGES, name)? {
            let intact = old.file.is_file()
                && old
                    .boot
                    .as_ref()
                    .is_some_and(|b| b.kernel.is_file() && b.initrd.is_file());
            if old.build_key.as_deref() == Some(build_key) && intact {
                return Ok((self.image_get(name)?, None));
            }
            let users = self.image_users(name);
            if !users.is_empty() {
                let note = format!(
                    "image {name} was left at its earlier build: VM(s) {} use it. Delete them (or recreate them from the new build after `drover image delete {name}`) and build again to refresh it",
                    users.join(", ")
                );
                let mut old = old;
                old.used_by = users;
                return Ok((old, Some(note)));
            }
        }
        let image = self
            .import_file(name, disk, Some(boot), Some(build_key.to_string()))
            .await?;
        tracing::info!(
            image = name,
            bytes = image.bytes,
            "imported a built distribution image"
        );
        Ok((image, None))
    }

    /// Imported images, with the VMs using each.
    pub fn images(&self) -> Result<Vec<DiskImage>> {
        let mut list: Vec<DiskImage> = self
            .s
            .store
            .list::<DiskImage>(IMAGES)?
            .into_iter()
            .map(|(_, i)| i)
            .collect();
        for i in &mut list {
            i.used_by = self.image_users(&i.name);
        }
        Ok(list)
    }

    /// One imported image.
    pub fn image_get(&self, name: &str) -> Result<DiskImage> {
        let mut i = self
            .s
            .store
            .get::<DiskImage>(IMAGES, name)?
            .ok_or_else(|| HostError::Missing(no_image(name)))?;
        i.used_by = self.image_users(name);
        Ok(i)
    }

    /// Delete an imported image no VM uses.
    pub async fn image_delete(&self, name: &str, caller: &Caller) -> Result<DiskImage> {
        caller.require(Permission::Admin)?;
        // Creates take this lock too: no VM gets a copy while the image goes.
        let _one = self.s.create_lock.lock().await;
        let image = self.image_get(name)?;
        if !image.used_by.is_empty() {
            return Err(HostError::Conflict(format!(
                "image {name} is the base of VM(s) {}: their disks read it; delete those VMs first",
                image.used_by.join(", ")
            )));
        }
        self.s.store.apply(vec![drover_store::Write::Delete {
            table: IMAGES.to_string(),
            key: name.to_string(),
        }])?;
        let _ = std::fs::remove_file(&image.file);
        if let Some(b) = &image.boot {
            let _ = std::fs::remove_file(&b.kernel);
            let _ = std::fs::remove_file(&b.initrd);
        }
        tracing::info!(image = name, "deleted a disk image");
        Ok(image)
    }

    /// `spec` with its `from_image` made plain: the image's thin copy as the first disk (id
    /// `root`), and the image's kernel, initrd and command line when it records them and the
    /// spec names no boot of its own. Returns the boot taken from the image: its files are
    /// droverd's own, so the image-pool rule for boot paths does not apply to them.
    pub(super) fn expand_from_image(
        &self,
        mut spec: drover_model::VmSpec,
    ) -> Result<(drover_model::VmSpec, Option<drover_api::ImageBoot>)> {
        let Some(name) = spec.from_image.take() else {
            return Ok((spec, None));
        };
        let image = self
            .s
            .store
            .get::<DiskImage>(IMAGES, &name)?
            .ok_or_else(|| HostError::Invalid(no_image(&name)))?;
        if spec
            .disks
            .iter()
            .any(|d| d.id.as_deref() == Some(ROOT_DISK))
        {
            return Err(HostError::Invalid(format!(
                "--from-image {name} makes the disk `{ROOT_DISK}`; give your disk with that id another id"
            )));
        }
        spec.disks.insert(
            0,
            drover_model::DiskSpec {
                id: Some(ROOT_DISK.to_string()),
                size: None,
                image: None,
                from: Some(name),
                readonly: false,
            },
        );
        let b = &mut spec.boot;
        let taken = match image.boot {
            Some(ib) if b.kernel.is_none() && b.disk.is_none() => {
                b.kernel = Some(ib.kernel.clone());
                b.initrd.get_or_insert_with(|| ib.initrd.clone());
                b.cmdline.get_or_insert_with(|| ib.cmdline.clone());
                Some(ib)
            }
            _ => None,
        };
        Ok((spec, taken))
    }

    /// VMs with a disk that is a thin copy of image `name`, in any config they keep.
    fn image_users(&self, name: &str) -> Vec<String> {
        let vms = lock(&self.s.vms).clone();
        let mut users: Vec<String> = vms
            .iter()
            .filter(|(_, slot)| {
                let info = lock(&slot.info);
                std::iter::once(&info.config)
                    .chain(info.running_config.iter())
                    .chain(info.next_config.iter())
                    .flat_map(|c| c.disks.iter())
                    .any(|d| d.base.as_deref() == Some(name))
            })
            .map(|(n, _)| n.clone())
            .collect();
        users.sort();
        users
    }

    /// A new disk for VM dir `vm_dir`: a thin copy of image `name`, `size` bytes (default and
    /// least: the image's size).
    pub(super) async fn disk_from_image(
        &self,
        vm_dir: &Path,
        id: &ElementId,
        name: &str,
        size: Option<u64>,
        readonly: bool,
    ) -> Result<DiskConfig> {
        let image = self
            .s
            .store
            .get::<DiskImage>(IMAGES, name)?
            .ok_or_else(|| HostError::Invalid(no_image(name)))?;
        let size = size.unwrap_or(image.virtual_size);
        if size < image.virtual_size {
            return Err(HostError::Invalid(format!(
                "disk {id}: {} is smaller than image {name} ({}); a copy can only grow",
                drover_model::format_size(size),
                drover_model::format_size(image.virtual_size)
            )));
        }
        let path = vm_dir.join("disks").join(format!("{id}.qcow2"));
        // A stale file from an earlier failed create of the same name: replace it.
        let _ = std::fs::remove_file(&path);
        let (p, base) = (path.clone(), image.file.clone());
        tokio::task::spawn_blocking(move || img::create_overlay(&p, &base, size))
            .await
            .map_err(|e| HostError::Internal(e.to_string()))??;
        Ok(DiskConfig {
            id: id.clone(),
            path,
            format: DiskFormat::Qcow2,
            size,
            readonly,
            owned: true,
            base: Some(name.to_string()),
            index: 0,
            slot: None,
            addr: None,
        })
    }
}

impl Manager {
    /// Install the agent's package into a stopped disk offline (`drover image inject-agent`):
    /// an imported image no VM uses, or a disk file no running VM uses and no saved state of a
    /// VM is layered on. The result is written beside the target and renamed over it, so the
    /// target is whole, old or new, at every moment. See [`drover_image::inject`].
    pub async fn image_inject_agent(
        &self,
        req: &drover_api::InjectAgentRequest,
        caller: &Caller,
    ) -> Result<drover_api::AgentInjected> {
        // A host path, root's tools: an admin's business, as an import is.
        caller.require(Permission::Admin)?;
        let target = req.target.as_str();
        let image = if target.starts_with('/') {
            None
        } else {
            Some(
                self.s
                    .store
                    .get::<DiskImage>(IMAGES, target)?
                    .ok_or_else(|| {
                        HostError::Invalid(format!(
                            "{target}: no image of that name (`drover image list`); give an image's name or a disk file's absolute path"
                        ))
                    })?,
            )
        };
        // An image's VMs get their copies under this lock: none is made while it changes.
        let _one = match image {
            Some(_) => Some(self.s.create_lock.lock().await),
            None => None,
        };
        // dpkg runs the disk's own /bin/sh as root (chrooted, which is no boundary for root)
        // with the host's /dev: a disk a guest has written could take the host. Such disks are
        // refused whatever the caller says; for the rest the caller must vouch, except for
        // images droverd built itself from Debian's packages.
        let built_here = image.as_ref().is_some_and(|i| i.build_key.is_some());
        if !built_here && !req.trusted {
            return Err(HostError::Invalid(format!(
                "{target}: injecting mounts the disk on this host and runs its own programs (dpkg's maintainer scripts) as root; pass --trusted if you vouch for it (an image you built or got from its distribution), never for a disk a guest has written"
            )));
        }
        if image.is_none() {
            let path = Path::new(target);
            if let Some(vm) = self.vm_with_disk(path) {
                return Err(HostError::Conflict(format!(
                    "{target} is a disk of VM {vm}: its guest has written it, and injecting would run what the guest put there as root on this host. Install the agent from inside the VM instead (`drover vm cp` the .deb in and `dpkg -i` it)"
                )));
            }
        }
        let file = match &image {
            Some(i) => {
                let users = self.image_users(&i.name);
                if !users.is_empty() {
                    return Err(HostError::Conflict(format!(
                        "image {} is the base of VM(s) {}: their disks read it, so it is not changed. Inject into a file copy and import that (`drover image import NAME FILE`), or delete those VMs first",
                        i.name,
                        users.join(", ")
                    )));
                }
                i.file.clone()
            }
            None => {
                let path = PathBuf::from(target);
                self.check_disk_free(&path)?;
                path
            }
        };
        let info = {
            let f = file.clone();
            tokio::task::spawn_blocking(move || img::inspect(&f))
                .await
                .map_err(|e| HostError::Internal(e.to_string()))??
        };
        let agent = self.agent_binary()?;
        let scratch = self.s.cfg.state_dir.join("tmp");
        std::fs::create_dir_all(&scratch).map_err(|e| io_ctx("creating", &scratch, e))?;
        let part = file.with_file_name(format!(
            ".{}.inject.part",
            file.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        let _ = std::fs::remove_file(&part);
        let (src, out) = (file.clone(), part.clone());
        let format = info.format.to_string();
        let done = tokio::task::spawn_blocking(move || {
            drover_image::inject::inject_agent(&src, &format, &agent, &out, &scratch)
        })
        .await
        .map_err(|e| HostError::Internal(e.to_string()))?;
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                return Err(HostError::Invalid(format!(
                    "injecting the agent into {}: {e}",
                    file.display()
                )));
            }
        };
        // A VM may have started on the file meanwhile: check again before it changes.
        if image.is_none() {
            if let Err(e) = self.check_disk_free(&file) {
                let _ = std::fs::remove_file(&part);
                return Err(e);
            }
        }
        if let Ok(md) = std::fs::metadata(&file) {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            let _ = std::fs::set_permissions(&part, std::fs::Permissions::from_mode(md.mode()));
            let _ = std::os::unix::fs::chown(&part, Some(md.uid()), Some(md.gid()));
        }
        std::fs::rename(&part, &file).map_err(|e| io_ctx("moving into place", &file, e))?;
        if let Some(d) = file.parent() {
            sync_file(d)?;
        }
        let bytes = std::fs::metadata(&file)
            .map_err(|e| io_ctx("reading", &file, e))?
            .len();
        if let Some(mut i) = image.clone() {
            i.bytes = bytes;
            i.source_format = "qcow2".into();
            self.s
                .store
                .apply(vec![drover_store::put(IMAGES, &i.name, &i)?])?;
        }
        tracing::info!(target = %file.display(), version = done.version, "installed the agent package offline");
        Ok(drover_api::AgentInjected {
            target: req.target.clone(),
            file,
            version: done.version,
            replaced: done.replaced,
            partition: done.partition,
            bytes,
        })
    }

    /// Refuse a disk file that a running VM uses, or that a VM's saved states are layered on
    /// (writing it would change what they restore).
    /// A VM whose config (any of them) has `path` as a disk.
    fn vm_with_disk(&self, path: &Path) -> Option<String> {
        let vms = lock(&self.s.vms).clone();
        vms.into_iter()
            .find_map(|(name, slot)| has_disk(&lock(&slot.info), path).then_some(name))
    }

    fn check_disk_free(&self, path: &Path) -> Result<()> {
        if !path.is_absolute() {
            return Err(HostError::Invalid(format!(
                "{}: give the file's absolute path",
                path.display()
            )));
        }
        let vms = lock(&self.s.vms).clone();
        for (name, slot) in vms {
            let (state, uses) = {
                let info = lock(&slot.info);
                (info.state, has_disk(&info, path))
            };
            let layered = self
                .all_layers(&name)?
                .into_values()
                .flat_map(|l| l.tops.into_iter())
                .any(|(origin, top)| origin == path && top != origin);
            if layered {
                return Err(HostError::Conflict(format!(
                    "VM {name}'s saved states are layered on {}: changing it would change what they restore. Delete the VM (its latest data is written back) or its states first",
                    path.display()
                )));
            }
            if uses && !matches!(state, drover_api::VmState::Stopped) {
                return Err(HostError::Conflict(format!(
                    "VM {name} is {state:?} with {} as a disk; stop it first",
                    path.display()
                )));
            }
        }
        Ok(())
    }
}

/// Whether any of the VM's configs (booted, running, next) has `path` as a disk.
fn has_disk(info: &drover_api::VmInfo, path: &Path) -> bool {
    std::iter::once(&info.config)
        .chain(info.running_config.iter())
        .chain(info.next_config.iter())
        .flat_map(|c| c.disks.iter())
        .any(|d| d.path == path)
}

/// fsync a file or directory.
fn sync_file(p: &Path) -> Result<()> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_ctx("syncing", p, e))
}

fn no_image(name: &str) -> String {
    format!("no image named {name} (see `drover image list`; add one with `drover image import {name} FILE`)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_model::VmSpec;

    fn built(dir: &Path, tag: &str) -> (PathBuf, drover_api::ImageBoot) {
        let disk = dir.join(format!("disk-{tag}.qcow2"));
        img::create_qcow2(&disk, 16 << 20).unwrap();
        let (kernel, initrd) = (dir.join(format!("k-{tag}")), dir.join(format!("i-{tag}")));
        std::fs::write(&kernel, format!("kernel {tag}")).unwrap();
        std::fs::write(&initrd, format!("initrd {tag}")).unwrap();
        let boot = drover_api::ImageBoot {
            kernel,
            initrd,
            cmdline: format!("console=ttyS0 root=LABEL=x {tag}"),
        };
        (disk, boot)
    }

    /// Injecting runs the disk's own programs as root on the host: a VM's disk (written by its
    /// guest) is refused even when vouched for, and anything droverd did not build needs the
    /// caller to vouch for it. Both refusals come before anything is read or changed.
    #[tokio::test]
    async fn injecting_into_a_guest_written_or_unvouched_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = super::super::guest::tests::manager(dir.path()).await;
        let admin = Caller {
            name: "root".into(),
            role: Some(crate::auth::Role::Admin),
            uid: Some(0),
        };
        let file = dir.path().join("vendor.qcow2");
        img::create_qcow2(&file, 16 << 20).unwrap();
        let before = std::fs::read(&file).unwrap();
        let req = |target: &Path, trusted| drover_api::InjectAgentRequest {
            target: target.display().to_string(),
            trusted,
        };
        let e = m
            .image_inject_agent(&req(&file, false), &admin)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, HostError::Invalid(m) if m.contains("--trusted")),
            "{e}"
        );
        let mut spec = VmSpec::named("g");
        spec.memory = "64M".into();
        spec.disks
            .push(format!("image={},id=data", file.display()).parse().unwrap());
        m.create(spec, &admin).await.unwrap();
        let e = m
            .image_inject_agent(&req(&file, true), &admin)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, HostError::Conflict(m) if m.contains("disk of VM g")),
            "{e}"
        );
        assert_eq!(std::fs::read(&file).unwrap(), before, "nothing written");
    }

    /// A built image is imported once per build key with its boot files copied beside it; a VM
    /// from it gets a thin root disk and that boot (even for a non-admin, who could not name
    /// those paths); a changed build refreshes the image only while no VM uses it.
    #[tokio::test]
    async fn built_images_boot_vms_from_image_and_refresh_only_when_unused() {
        let dir = tempfile::tempdir().unwrap();
        let m = super::super::guest::tests::manager(dir.path()).await;
        let (disk, boot) = built(dir.path(), "a");
        let (first, note) = m.import_built("deb", &disk, &boot, "key-a").await.unwrap();
        assert_eq!(note, None);
        let b = first.boot.clone().unwrap();
        assert!(b.kernel.starts_with(m.images_dir()), "{b:?}");
        assert_eq!(std::fs::read_to_string(&b.kernel).unwrap(), "kernel a");
        // The same build again: nothing redone.
        let (again, _) = m.import_built("deb", &disk, &boot, "key-a").await.unwrap();
        assert_eq!(again.imported_at_ms, first.imported_at_ms);

        let mut spec = VmSpec::named("v1");
        spec.memory = "64M".into();
        spec.disks.push("size=8M,id=data".parse().unwrap());
        spec.from_image = Some("deb".into());
        let operator = Caller {
            name: "op".into(),
            role: Some(crate::auth::Role::Operator),
            uid: Some(1000),
        };
        let v = m.create(spec.clone(), &operator).await.unwrap();
        let d0 = &v.config.disks[0];
        assert_eq!(
            (d0.id.as_str(), d0.base.as_deref(), d0.owned),
            ("root", Some("deb"), true)
        );
        assert_eq!(v.config.disks[1].id.as_str(), "data");
        let shown = serde_json::to_string(&v.config.boot).unwrap();
        assert!(shown.contains(&b.kernel.display().to_string()), "{shown}");
        assert!(shown.contains("root=LABEL=x a"), "{shown}");
        // A disk of the user's own named root cannot sit beside it.
        let mut clash = spec.clone();
        clash.name = "v2".into();
        clash.disks = vec!["size=8M,id=root".parse().unwrap()];
        assert!(matches!(
            m.create(clash, &operator).await,
            Err(HostError::Invalid(_))
        ));
        let mut nothing = spec.clone();
        nothing.name = "v3".into();
        nothing.from_image = Some("nope".into());
        assert!(matches!(
            m.create(nothing, &operator).await,
            Err(HostError::Invalid(_))
        ));

        // A new build while v1 uses the image: kept, and said why.
        let (disk_b, boot_b) = built(dir.path(), "b");
        let (kept, note) = m
            .import_built("deb", &disk_b, &boot_b, "key-b")
            .await
            .unwrap();
        assert_eq!(kept.build_key.as_deref(), Some("key-a"));
        assert!(note.is_some_and(|n| n.contains("v1")));
        assert_eq!(std::fs::read_to_string(&b.kernel).unwrap(), "kernel a");
        // Once nothing uses it, the new build replaces it.
        m.delete("v1", false, false, &crate::auth::Caller::daemon())
            .await
            .unwrap();
        let (fresh, note) = m
            .import_built("deb", &disk_b, &boot_b, "key-b")
            .await
            .unwrap();
        assert_eq!((fresh.build_key.as_deref(), note), (Some("key-b"), None));
        assert_eq!(std::fs::read_to_string(&b.kernel).unwrap(), "kernel b");
        m.image_delete("deb", &Caller::daemon()).await.unwrap();
        assert!(!b.kernel.exists() && !b.initrd.exists());
    }
}
