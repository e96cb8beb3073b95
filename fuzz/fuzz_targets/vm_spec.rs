//! VM specs arrive from API clients: TOML or JSON bodies must parse and validate without panics.
#![no_main]

use drover_model::VmSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(spec) = VmSpec::from_toml(text) {
            let _ = spec.validate();
        }
    }
});
