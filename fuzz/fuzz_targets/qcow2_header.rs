//! Image files in pools are users' files: droverd reads their qcow2 header before QEMU sees
//! them, and must never panic on what it finds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(refs) = drover_qemu::qcow2::parse(data) {
        if let Some(b) = refs.backing {
            let _ = drover_qemu::qcow2::backing_path(std::path::Path::new("/pool/x.qcow2"), &b);
        }
    }
});
