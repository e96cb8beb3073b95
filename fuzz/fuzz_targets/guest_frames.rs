//! The host's parser of guest-channel bytes: whatever a guest writes, the decoder never panics,
//! never holds more than one frame's worth, and every frame it accepts re-encodes.
#![no_main]

use drover_proto::{encode, Decoder, HEADER_LEN, MAX_FRAME_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut d = Decoder::new();
    // Feed in uneven chunks, as a socket would deliver them.
    for chunk in data.chunks(1 + data.first().copied().unwrap_or(7) as usize) {
        d.push(chunk);
        while let Some(r) = d.next_frame() {
            if let Ok(frame) = r {
                assert!(encode(&frame).is_ok());
            }
        }
        assert!(d.buffered() <= HEADER_LEN + MAX_FRAME_LEN);
    }
});
