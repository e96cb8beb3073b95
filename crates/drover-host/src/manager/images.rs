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
        let dir = self.images_dir();
        std::fs::create_dir_all(&dir).map_err(|e| io_ctx("creating", &dir, e))?;
        let file = dir.join(format!("{name}.qcow2"));
        let part = dir.join(format!(".{name}.qcow2.part"));
        // A leftover of an import cut short: never recorded, so ours to replace.
        let _ = std::fs::remove_file(&part);
        let src = req.path.clone();
        let (p2, f2) = (part.clone(), file.clone());
        let info = tokio::task::spawn_blocking(move || -> Result<img::ImageInfo> {
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
            std::fs::File::open(&p2)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_ctx("syncing", &p2, e))?;
            std::fs::rename(&p2, &f2).map_err(|e| io_ctx("moving into place", &f2, e))?;
            if let Some(d) = f2.parent() {
                std::fs::File::open(d)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| io_ctx("syncing", d, e))?;
            }
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
        let bytes = std::fs::metadata(&file)
            .map_err(|e| io_ctx("reading", &file, e))?
            .len();
        let image = DiskImage {
            name: name.clone(),
            file: file.clone(),
            virtual_size: info.virtual_size,
            bytes,
            source: req.path.display().to_string(),
            source_format: info.format.to_string(),
            imported_at_ms: hostfacts::now_ms(),
            used_by: Vec::new(),
        };
        if let Err(e) = self
            .s
            .store
            .apply(vec![drover_store::put(IMAGES, &name, &image)?])
        {
            let _ = std::fs::remove_file(&file);
            return Err(e.into());
        }
        tracing::info!(image = name, bytes, source = %req.path.display(), "imported a disk image");
        Ok(image)
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
        tracing::info!(image = name, "deleted a disk image");
        Ok(image)
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

fn no_image(name: &str) -> String {
    format!("no image named {name} (see `drover image list`; add one with `drover image import {name} FILE`)")
}
