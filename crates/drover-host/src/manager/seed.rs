//! The NoCloud seed disk made at `vm create` (see `drover_image::seed`).

use std::path::Path;

use drover_model::{DiskConfig, DiskFormat, ElementId, NicConfig, SeedSpec};

use crate::error::HostError;

/// Writes `vm_dir/disks/<id>.qcow2` for `seed` and returns it as the VM's last disk (read-only,
/// owned by Drover). The id is `seed`, or `cidata` if a disk is already called that. qcow2, not
/// the raw FAT image, because saved states pin a qcow2 layer of every disk.
pub(super) fn make_disk(
    vm_name: &str,
    seed: &SeedSpec,
    vm_dir: &Path,
    nics: &[NicConfig],
    disks: &[DiskConfig],
) -> Result<DiskConfig, HostError> {
    let taken = |id: &str| disks.iter().any(|d| d.id.as_str() == id);
    let id = ["seed", "cidata"]
        .into_iter()
        .find(|id| !taken(id))
        .ok_or_else(|| {
            HostError::Invalid(
                "disks named both `seed` and `cidata`: rename one, or pass --no-seed".into(),
            )
        })?;
    let macs: Vec<String> = nics.iter().map(|n| n.mac.to_string()).collect();
    // A new id per create: cloud-init runs its once-per-instance steps for a new VM.
    let instance_id = format!("{vm_name}-{:016x}", rand::random::<u64>());
    let files = drover_image::seed::generate(&drover_image::seed::SeedInput {
        instance_id: &instance_id,
        hostname: vm_name,
        ssh_keys: &seed.ssh_keys,
        user_data: seed.user_data.as_deref(),
        macs: &macs,
    })
    .map_err(|e| HostError::Invalid(format!("seed: {e}")))?;
    let image =
        drover_image::seed::write_fat(&files).map_err(|e| HostError::Internal(e.to_string()))?;
    let raw = vm_dir.join("disks").join(format!("{id}.fat.tmp"));
    let path = vm_dir.join("disks").join(format!("{id}.qcow2"));
    // Stale files from an earlier failed create of the same name: replace them.
    let _ = std::fs::remove_file(&path);
    std::fs::write(&raw, &image)
        .map_err(|e| HostError::Internal(format!("writing {}: {e}", raw.display())))?;
    let converted = drover_qemu::img::convert_raw_to_qcow2(&raw, &path);
    let _ = std::fs::remove_file(&raw);
    converted?;
    std::fs::File::open(&path)
        .and_then(|f| f.sync_all())
        .map_err(|e| HostError::Internal(format!("syncing {}: {e}", path.display())))?;
    Ok(DiskConfig {
        id: ElementId::new(id)?,
        path,
        format: DiskFormat::Qcow2,
        size: image.len() as u64,
        readonly: true,
        owned: true,
        base: None,
        index: disks.len() as u32,
        slot: None,
        addr: None,
    })
}
