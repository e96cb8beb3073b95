//! The NoCloud seed disk made at `vm create` (see `drover_image::seed`).

use std::path::Path;

use drover_model::{DiskConfig, DiskFormat, ElementId, NicConfig, SeedSpec};

use crate::error::HostError;

/// Writes `vm_dir/disks/<id>.img` for `seed` and returns it as the VM's last disk (read-only,
/// owned by Drover). The id is `seed`, or `cidata` if a disk is already called that.
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
    let path = vm_dir.join("disks").join(format!("{id}.img"));
    std::fs::write(&path, &image)
        .and_then(|()| std::fs::File::open(&path).and_then(|f| f.sync_all()))
        .map_err(|e| HostError::Internal(format!("writing {}: {e}", path.display())))?;
    Ok(DiskConfig {
        id: ElementId::new(id)?,
        path,
        format: DiskFormat::Raw,
        size: image.len() as u64,
        readonly: true,
        owned: true,
        index: disks.len() as u32,
        slot: None,
    })
}
