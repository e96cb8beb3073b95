//! The paused moment of a save, over the backend seam ([`Vmm`]): pause, move every disk onto
//! its new overlay, take the device state (and the memory, as the save's [`Memory`] says), then
//! resume whatever happened, so a failed save never leaves the guest paused. Its rules are
//! tested against the fake VMM in `tests` below; the files around it (overlays, the state's
//! directory, its manifest) are the caller's.

use crate::error::{HostError, Result};
use crate::vmm::Vmm;
use drover_qemu::qmp::QmpError;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a background snapshot may take to reach its device state.
const DEVICE_STATE_TIMEOUT: Duration = Duration::from_secs(120);

/// One disk's move onto a new layer.
#[derive(Debug, Clone)]
pub(in crate::manager) struct DiskMove {
    /// The block node the guest writes to now.
    pub node: String,
    /// The overlay made for it (already created, naming `node`'s file as its backing).
    pub overlay: PathBuf,
    /// The node the overlay opens as.
    pub new_node: String,
}

/// How the memory is taken while the guest is paused.
#[derive(Debug, Clone, Copy)]
pub(in crate::manager) enum Memory<'a> {
    /// A background snapshot into a receiving QEMU at `uri`; the guest runs on once its device
    /// state is taken (`keeps_run_state`: this QEMU leaves it paused then, Drover resumes it).
    Stream { uri: &'a str, keeps_run_state: bool },
    /// The device state without the shared RAM into `devices`, then the RAM file copied by
    /// the caller's `copy_ram`, still paused.
    Copy { devices: &'a Path },
    /// Device state and RAM into `devices` with `mapped-ram`.
    Mapped { devices: &'a Path },
    /// Device state and RAM in QEMU's migration stream into `devices`.
    Whole { devices: &'a Path },
}

/// What the paused moment did.
#[derive(Debug)]
pub(in crate::manager) struct Paused {
    /// Whether the state was taken.
    pub saved: Result<()>,
    /// How many disks (the first ones, in order) the guest now writes on their overlays: even
    /// after a failure, those overlays are the disks' tops.
    pub moved: usize,
    /// Whether the guest runs again.
    pub resumed: std::result::Result<(), QmpError>,
    /// From the pause to the resume.
    pub paused_ms: u64,
}

/// Pause `vmm`, move `disks` onto their overlays (calling `moved_to(i)` as disk `i` moves, so
/// the caller tracks the node its guest device writes to), take the memory as `memory` says
/// (`copy_ram` only for [`Memory::Copy`]), and resume the guest unless it already runs.
pub(in crate::manager) async fn paused_capture<V, F>(
    vmm: &V,
    disks: &[DiskMove],
    memory: Memory<'_>,
    mut moved_to: impl FnMut(usize),
    copy_ram: impl FnOnce() -> F,
) -> Paused
where
    V: Vmm,
    F: Future<Output = Result<()>>,
{
    let t0 = Instant::now();
    let mut moved = 0;
    let saved = async {
        vmm.pause().await?;
        for (i, d) in disks.iter().enumerate() {
            vmm.snapshot_disk(&d.node, &d.overlay, &d.new_node).await?;
            moved_to(i);
            moved = i + 1;
        }
        crate::crashpoint::hit("save-disks-moved");
        match memory {
            Memory::Stream {
                uri,
                keeps_run_state,
            } => {
                vmm.background_snapshot(uri).await?;
                vmm.wait_device_state(keeps_run_state, DEVICE_STATE_TIMEOUT)
                    .await?;
            }
            Memory::Copy { devices } => {
                vmm.save_state(devices, true).await?;
                copy_ram().await?;
            }
            Memory::Mapped { devices } => vmm.save_state_mapped(devices).await?,
            Memory::Whole { devices } => vmm.save_state(devices, false).await?,
        }
        Ok::<_, HostError>(())
    }
    .await;
    // Resume whatever happened; a guest that runs already (QEMU < 9.0 restarts it after a
    // background snapshot's device state, a failed pause never stopped it) is left alone.
    let resumed = match vmm.status().await {
        Ok(s) if s == "running" => Ok(()),
        _ => vmm.cont().await,
    };
    Paused {
        saved,
        moved,
        resumed,
        paused_ms: t0.elapsed().as_millis() as u64,
    }
}

#[cfg(test)]
mod tests {
    //! The rules of a save's paused moment, against the fake VMM: the guest is paused for the
    //! device state and runs again afterwards whatever failed; the disks moved before a failure
    //! are reported, so the running VM's layers stay known.

    use super::*;
    use crate::vmm::fake::{test_config, FakeVmm};
    use drover_qemu::cmdline::disk_node;

    /// A running VM with disks `vda` and `vdb`, and their moves onto layer `s1`.
    fn vm() -> (FakeVmm, Vec<DiskMove>) {
        let cfg = test_config(256 << 20, &["vda", "vdb"]);
        let moves = cfg
            .disks
            .iter()
            .map(|d| DiskMove {
                node: disk_node(d),
                overlay: format!("/d/{}.s1.qcow2", d.id).into(),
                new_node: format!("{}-s1", d.id),
            })
            .collect();
        (FakeVmm::running(&cfg, 1), moves)
    }

    async fn no_copy() -> Result<()> {
        Ok(())
    }

    const DEVICES: &str = "/s/devices.bin";

    /// Device state and RAM in one stream into `DEVICES`.
    fn whole() -> Memory<'static> {
        Memory::Whole {
            devices: Path::new(DEVICES),
        }
    }

    #[tokio::test]
    async fn a_save_pauses_moves_every_disk_then_resumes() {
        let (vmm, moves) = vm();
        let mut seen = Vec::new();
        let p = paused_capture(&vmm, &moves, whole(), |i| seen.push(i), no_copy).await;
        assert!(p.saved.is_ok() && p.resumed.is_ok(), "{p:?}");
        assert_eq!((p.moved, seen), (2, vec![0, 1]));
        assert_eq!(
            vmm.calls(),
            [
                "stop",
                "blockdev-snapshot disk-vda",
                "blockdev-snapshot disk-vdb",
                "migrate devices.bin",
                "query-status",
                "cont"
            ]
        );
        assert_eq!(vmm.status().await.unwrap(), "running");
        // The guest writes to the overlays; the layers below stay.
        let b = vmm.backends();
        for n in ["disk-vda", "vda-s1", "disk-vdb", "vdb-s1"] {
            assert!(b.iter().any(|x| x == n), "{n} in {b:?}");
        }
    }

    #[tokio::test]
    async fn a_failed_disk_move_resumes_and_reports_the_disks_moved() {
        let (vmm, moves) = vm();
        vmm.fail("blockdev-snapshot", 2);
        let p = paused_capture(&vmm, &moves, whole(), |_| {}, no_copy).await;
        assert!(p.saved.is_err());
        // vda writes on its overlay now: the caller records it as vda's top.
        assert_eq!(p.moved, 1);
        assert!(p.resumed.is_ok());
        assert!(!vmm.calls().iter().any(|c| c.starts_with("migrate")));
        assert_eq!(vmm.status().await.unwrap(), "running");
    }

    #[tokio::test]
    async fn a_failed_device_state_resumes_the_guest() {
        for memory in [
            whole(),
            Memory::Mapped {
                devices: Path::new(DEVICES),
            },
            Memory::Copy {
                devices: Path::new(DEVICES),
            },
        ] {
            let (vmm, moves) = vm();
            vmm.fail("migrate", 1);
            vmm.fail("migrate-mapped", 1);
            let p = paused_capture(&vmm, &moves, memory, |_| {}, no_copy).await;
            assert!(p.saved.is_err(), "{memory:?}");
            assert_eq!(p.moved, 2);
            assert!(p.resumed.is_ok());
            assert_eq!(vmm.status().await.unwrap(), "running", "{memory:?}");
        }
    }

    #[tokio::test]
    async fn a_failed_ram_copy_resumes_the_guest_and_the_copy_runs_paused() {
        let (vmm, moves) = vm();
        let copy = Memory::Copy {
            devices: Path::new(DEVICES),
        };
        let copied = || async {
            // The RAM file is copied while the vCPUs are stopped, after the device state.
            assert_eq!(vmm.status().await.unwrap(), "paused");
            assert!(vmm.calls().iter().any(|c| c == "migrate devices.bin"));
            Err(HostError::Internal("disk full".into()))
        };
        let p = paused_capture(&vmm, &moves, copy, |_| {}, copied).await;
        assert!(matches!(p.saved, Err(HostError::Internal(_))));
        assert!(p.resumed.is_ok());
        assert_eq!(vmm.status().await.unwrap(), "running");
    }

    #[tokio::test]
    async fn a_stream_resumes_only_a_guest_qemu_left_paused() {
        for (keeps, conts) in [(true, 1), (false, 0)] {
            let (vmm, moves) = vm();
            let stream = Memory::Stream {
                uri: "unix:/r.sock",
                keeps_run_state: keeps,
            };
            let p = paused_capture(&vmm, &moves, stream, |_| {}, no_copy).await;
            assert!(p.saved.is_ok() && p.resumed.is_ok(), "{p:?}");
            // A second `cont` after QEMU < 9.0 restarted the guest is not needed; QEMU >= 9.0
            // leaves it paused and only Drover's `cont` runs it again.
            let n = vmm.calls().iter().filter(|c| *c == "cont").count();
            assert_eq!(n, conts, "keeps_run_state {keeps}: {:?}", vmm.calls());
            assert_eq!(vmm.status().await.unwrap(), "running");
        }
    }

    #[tokio::test]
    async fn a_failed_pause_takes_nothing_and_leaves_the_guest_running() {
        let (vmm, moves) = vm();
        vmm.fail("stop", 1);
        let p = paused_capture(&vmm, &moves, whole(), |_| {}, no_copy).await;
        assert!(p.saved.is_err() && p.resumed.is_ok());
        assert_eq!(p.moved, 0);
        assert_eq!(vmm.calls(), ["stop", "query-status"]);
    }

    #[tokio::test]
    async fn a_guest_that_cannot_be_resumed_is_reported() {
        let (vmm, moves) = vm();
        vmm.fail("cont", 1);
        let p = paused_capture(&vmm, &moves, whole(), |_| {}, no_copy).await;
        // The state was taken, but the caller must not answer "saved" for a paused guest.
        assert!(p.saved.is_ok() && p.resumed.is_err());
    }
}
