//! Any bytes given to the message decoder: an error or a message that
//! re-encodes to an equal message, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use syncnode_protocol::wire::{DEFAULT_MAX_FRAME, Envelope};

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::decode(data, DEFAULT_MAX_FRAME) {
        let again = Envelope::decode(&env.encode(), DEFAULT_MAX_FRAME).expect("re-encoded message decodes");
        assert_eq!(again, env);
    }
});
