//! Any bytes given to a node's SWIM state machine as a membership packet:
//! refused or taken, never a panic, and the member table stays within its
//! limits.
#![no_main]
use libfuzzer_sys::fuzz_target;
use syncnode_protocol::membership::{MAX_ADDRS, MemberId, Membership, MembershipConfig};

fuzz_target!(|data: &[u8]| {
    let me = MemberId {
        peer: "fuzzed".into(),
        addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
        region: "r".into(),
        bump: 1,
    };
    let mut m = Membership::new(me, MembershipConfig::default(), 7);
    let _ = m.handle_packet(0, data);
    m.tick(10_000);
    for v in m.members() {
        assert!(v.id.addrs.len() <= MAX_ADDRS);
    }
});
