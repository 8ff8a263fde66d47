//! A byte stream cut at fuzzer-chosen points: the frame decoder never panics
//! and never holds more than one maximal frame.
#![no_main]
use libfuzzer_sys::fuzz_target;
use syncnode_protocol::wire::{Envelope, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else { return };
    let mut d = FrameDecoder::new(1024);
    for chunk in rest.chunks(cut as usize + 1) {
        match d.push(chunk) {
            Ok(frames) => {
                for f in frames {
                    assert!(f.len() <= 1024);
                    let _ = Envelope::decode(&f, 1024);
                }
            }
            Err(_) => return,
        }
        assert!(d.pending() <= 1024 + 4 + chunk.len());
    }
});
