//! Reconciliation cost (`cargo bench -p syncnode --bench reconcile`): two
//! stores of n items that differ in d ids (missing, newer and deleted, on both
//! sides), reconciled with syncnode's anti-entropy session, side by side with
//! the `negentropy` crate on the same sets (each stored version as one
//! element: its version as timestamp, its entry hash as id) and with a naive
//! exchange (one side sends every `(id, version)`, the other answers with what
//! differs). `bytes` counts the reconciliation rounds; `transfer_bytes` the
//! Fetch/Push of the differing items' metadata, contents excluded;
//! `round_trips` the rounds (negentropy's figure), `transfer_round_trips` the
//! Fetch/Push exchanges after them. The stores are the protocol crate's
//! in-memory stores: bytes and round trips are the protocol's, whatever the
//! storage below it. `BENCH_N` overrides the sizes (comma-separated).

use negentropy::{Id, Negentropy, NegentropyStorageVector};
use std::time::Instant;
use syncnode_protocol::memory::MemoryStore;
use syncnode_protocol::wire::{Body, DEFAULT_MAX_FRAME, Envelope, Request, Response, WireItem};

/// Encoded size of a message with item contents left out.
fn size(body: Body) -> usize {
    let strip = |items: &mut Vec<WireItem>| items.iter_mut().for_each(|i| i.content.clear());
    let body = match body {
        Body::Request(Request::Push { session, mut items }) => {
            strip(&mut items);
            Body::Request(Request::Push { session, items })
        }
        Body::Response(Response::Fetch { mut items, deferred }) => {
            strip(&mut items);
            Body::Response(Response::Fetch { items, deferred })
        }
        other => other,
    };
    Envelope::new("c", body).encode().len()
}

fn negentropy_storage(s: &MemoryStore) -> NegentropyStorageVector {
    let mut v = NegentropyStorageVector::new();
    for it in s.items.values() {
        v.insert(it.entry.version, Id::from_byte_array(it.entry.digest().hash))
            .unwrap();
    }
    v.seal().unwrap();
    v
}

fn main() {
    let sizes: Vec<usize> = std::env::var("BENCH_N")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![100_000, 1_000_000]);
    for n in sizes {
        for d in [1usize, 100, 10_000] {
            let diffs: Vec<(u8, usize)> = (0..d).map(|k| ((k % 6) as u8, (k * 7919) % n)).collect();
            let (mut a, mut b) = MemoryStore::diverged_pair(4, n, &diffs);

            // negentropy on the same sets.
            let (sa, sb) = (negentropy_storage(&a), negentropy_storage(&b));
            let start = Instant::now();
            let mut client = Negentropy::borrowed(&sa, 0).unwrap();
            let mut relay = Negentropy::borrowed(&sb, 0).unwrap();
            let mut msg = client.initiate().unwrap();
            let (mut neg_bytes, mut neg_rt, mut differing) = (0usize, 0u64, 0usize);
            loop {
                neg_bytes += msg.len();
                let reply = relay.reconcile(&msg).unwrap();
                neg_bytes += reply.len();
                neg_rt += 1;
                let (mut have, mut need) = (Vec::new(), Vec::new());
                let next = client.reconcile_with_ids(&reply, &mut have, &mut need).unwrap();
                differing += have.len() + need.len();
                match next {
                    Some(m) => msg = m,
                    None => break,
                }
            }
            let neg_ms = start.elapsed().as_secs_f64() * 1000.0;

            // The naive exchange: every (id, version) one way, the differences back.
            let all: Vec<(&str, u64)> = a
                .items
                .values()
                .map(|i| (i.entry.id.as_str(), i.entry.version))
                .collect();
            let naive_bytes = postcard::to_stdvec(&all).unwrap().len() + differing * 16;

            // syncnode's session.
            let start = Instant::now();
            // Reconciliation (the rounds) is what negentropy does; the transfer of
            // the differing items' metadata (Fetch/Push) comes on top for both.
            let (mut bytes, mut transfer, mut rounds) = (0usize, 0usize, 0u64);
            let p = a.reconcile_with(&mut b, |req, resp| {
                let full = |b: Body| Envelope::new("c", b).encode().len();
                let largest = full(Body::Request(req.clone())).max(full(Body::Response(resp.clone())));
                assert!(
                    largest <= DEFAULT_MAX_FRAME,
                    "a {largest}-byte message would exceed the frame limit"
                );
                let n = size(Body::Request(req.clone())) + size(Body::Response(resp.clone()));
                match req {
                    Request::Round { .. } => {
                        bytes += n;
                        rounds += 1;
                    }
                    _ => transfer += n,
                }
            });
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            assert_eq!(a.tree.root_hash(), b.tree.root_hash(), "n={n} d={d} reconciled");
            println!(
                "bench=reconcile metric=bytes_n{n}_d{d} value={bytes} unit=B baseline={neg_bytes} ratio={:.2}",
                bytes as f64 / neg_bytes as f64
            );
            println!(
                "bench=reconcile metric=round_trips_n{n}_d{d} value={rounds} unit=rt baseline={neg_rt} ratio={:.2}",
                rounds as f64 / neg_rt as f64
            );
            println!(
                "bench=reconcile metric=transfer_round_trips_n{n}_d{d} value={} unit=rt",
                p.round_trips - rounds
            );
            println!(
                "bench=reconcile metric=cpu_ms_n{n}_d{d} value={ms:.1} unit=ms baseline={neg_ms:.1} ratio={:.2}",
                ms / neg_ms
            );
            println!("bench=reconcile metric=naive_bytes_n{n}_d{d} value={naive_bytes} unit=B");
            println!("bench=reconcile metric=transfer_bytes_n{n}_d{d} value={transfer} unit=B");
        }
    }
}
