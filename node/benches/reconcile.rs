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
//!
//! Then the real-network line: three `syncnode run` processes on loopback
//! (embedded SQLite), `BENCH_NET_N` items (default 10^5) replicated to all,
//! one node partitioned off while 1 % of the ids change on both sides
//! (overwrites, new ids, deletes), and the time from the heal to equal roots
//! on all three. `BENCH_NET_N=0` skips it.

mod support;

use negentropy::{Id, Negentropy, NegentropyStorageVector};
use std::time::{Duration, Instant};
use syncnode_protocol::memory::MemoryStore;
use syncnode_protocol::riblt::SYMBOL_BYTES;
use syncnode_protocol::session::{Progress, Session, Step};
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

/// A whole session from `a` against `b`, run as `MemoryStore::reconcile_with`
/// runs it, with its CPU split in two: the rounds (each `Round`'s request,
/// answer and handling, and the local entry lists they ask for) and the
/// transfer (`Fetch`, `Push` and the local items they carry). `observe`
/// (the byte counting) is in neither.
fn timed_session(
    a: &mut MemoryStore,
    b: &mut MemoryStore,
    mut s: Session,
    mut observe: impl FnMut(&Request, &Response),
) -> (Progress, Duration, Duration) {
    let (mut rounds, mut transfer) = (Duration::ZERO, Duration::ZERO);
    loop {
        let t = Instant::now();
        let step = s.next_step(&a.tree);
        let step_time = t.elapsed();
        match step {
            Step::NeedLocalItems(ids) => {
                let items = ids.iter().filter_map(|id| a.items.get(id).cloned()).collect();
                s.on_local_items(items);
                transfer += t.elapsed();
            }
            Step::NeedLocalEntries(paths) => {
                let local = paths.iter().map(|p| (p.clone(), a.entries_under(p))).collect();
                s.on_local_entries(local);
                rounds += t.elapsed();
            }
            Step::NeedLocalKeys(keys) => {
                s.on_local_keyed(a.entries_by_keys(&keys).concat());
                rounds += t.elapsed();
            }
            Step::Send(req) => {
                let round = reconciling(&req);
                // The copy is for `observe`: a node moves the request into
                // its encoder, so copying it is not the protocol's cost.
                let copy = req.clone();
                let t = Instant::now();
                let resp = b.answer(req);
                let mut spent = step_time + t.elapsed();
                observe(&copy, &resp);
                let t = Instant::now();
                if let Some(items) = s.on_response(resp, &a.tree).expect("in-memory peers agree") {
                    for it in items {
                        a.put(it);
                    }
                }
                spent += t.elapsed();
                match round {
                    true => rounds += spent,
                    false => transfer += spent,
                }
            }
            Step::Waiting => unreachable!("each step is answered in turn"),
            Step::Done => return (s.progress(), rounds, transfer + t.elapsed()),
        }
    }
}

/// Whether a request is reconciliation proper (finding what differs), not
/// the transfer after it.
fn reconciling(req: &Request) -> bool {
    matches!(
        req,
        Request::Round { .. } | Request::Sketch { .. } | Request::Symbols { .. } | Request::Resolve { .. }
    )
}

fn main() {
    protocol_lines();
    let net_n = support::env_usize("BENCH_NET_N", 100_000);
    if net_n > 0 {
        support::runtime()
            .block_on(network_line(net_n))
            .expect("real-network bench");
    }
}

/// Writes `ids` to `node` through the batch API, 1000 per call.
async fn load(
    node: &syncnode::process::NodeProcess,
    ids: impl Iterator<Item = String>,
    tag: &str,
) -> anyhow::Result<()> {
    let ids: Vec<String> = ids.collect();
    for chunk in ids.chunks(1000) {
        let put: Vec<serde_json::Value> = chunk
            .iter()
            .map(|id| serde_json::json!({"id": id, "content": {"tag": tag, "pad": "x".repeat(200)}}))
            .collect();
        node.api
            .ok_json(node.api.post_json("/v1/batch", &serde_json::json!({"put": put})).await)
            .await?;
    }
    Ok(())
}

async fn sync_bytes(node: &syncnode::process::NodeProcess) -> anyhow::Result<u64> {
    let text = node.api.get("/metrics").await?.text();
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("syncnode_sync_sent_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

async fn network_line(n: usize) -> anyhow::Result<()> {
    use syncnode::process::{NodeProcess, converge, loopback_args};
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_syncnode"));
    let tmp = tempfile::tempdir()?;
    let args = |boot: &[&NodeProcess]| loopback_args("bench", boot);
    let n1 = NodeProcess::spawn(bin, &tmp.path().join("n1"), args(&[])).await?;
    let n2 = NodeProcess::spawn(bin, &tmp.path().join("n2"), args(&[&n1])).await?;
    let n3 = NodeProcess::spawn(bin, &tmp.path().join("n3"), args(&[&n1, &n2])).await?;
    let all = [&n1, &n2, &n3];
    let start = Instant::now();
    load(&n1, (0..n).map(|i| format!("item.{i:07}")), "base").await?;
    let loaded = start.elapsed();
    converge(&all, std::time::Duration::from_secs(1800)).await?;
    println!(
        "bench=reconcile metric=net_load_http_{n} value={:.2} unit=s",
        loaded.as_secs_f64()
    );
    println!(
        "bench=reconcile metric=net_initial_replication_{n} value={:.2} unit=s",
        start.elapsed().as_secs_f64()
    );
    n1.block(&n3, true).await?;
    n2.block(&n3, true).await?;
    // 1 % of the ids differ: half changed on each side (overwrites, new ids, deletes).
    let d = n / 100;
    load(&n1, (0..d / 4).map(|k| format!("item.{:07}", k * 97 % n)), "side-a").await?;
    load(
        &n3,
        (0..d / 4).map(|k| format!("item.{:07}", (k * 89 + 13) % n)),
        "side-b",
    )
    .await?;
    load(&n1, (0..d / 8).map(|k| format!("new.a.{k}")), "side-a").await?;
    load(&n3, (0..d / 8).map(|k| format!("new.b.{k}")), "side-b").await?;
    let dels: Vec<serde_json::Value> = (0..d / 4)
        .map(|k| format!("item.{:07}", (k * 61 + 7) % n).into())
        .collect();
    for (node, part) in [(&n1, &dels[..dels.len() / 2]), (&n3, &dels[dels.len() / 2..])] {
        node.api
            .ok_json(
                node.api
                    .post_json("/v1/batch", &serde_json::json!({"delete": part}))
                    .await,
            )
            .await?;
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let mut before = 0;
    for node in all {
        before += sync_bytes(node).await?;
    }
    n1.block(&n3, false).await?;
    n2.block(&n3, false).await?;
    let t = converge(&all, std::time::Duration::from_secs(600)).await?;
    let mut after = 0;
    for node in all {
        after += sync_bytes(node).await?;
    }
    println!(
        "bench=reconcile metric=net_heal_to_equal_roots_n{n}_d{d} value={:.2} unit=s",
        t.as_secs_f64()
    );
    println!(
        "bench=reconcile metric=net_heal_bytes_n{n}_d{d} value={} unit=B",
        after.saturating_sub(before)
    );
    Ok(())
}

fn protocol_lines() {
    let sizes: Vec<usize> = std::env::var("BENCH_N")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![100_000, 1_000_000]);
    // One session first, so the first measured one does not pay for warming
    // the allocator and caches.
    let (mut a, mut b) = MemoryStore::diverged_pair(4, 10_000, &[(1, 7), (2, 77)]);
    let (mut ra, mut rb) = (a.clone(), b.clone());
    a.reconcile_with(&mut b, |_, _| {});
    ra.reconcile_rateless(&mut rb, |_, _| {});
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

            // The rateless mode on copies of the same stores (DESIGN §5.2).
            let (mut ra, mut rb) = (a.clone(), b.clone());
            let session = Session::rateless(1, ra.tree.depth());
            let (mut r_bytes, mut r_rounds) = (0usize, 0u64);
            let (rp, r_time, _) = timed_session(&mut ra, &mut rb, session, |req, resp| {
                if reconciling(req) {
                    r_bytes += size(Body::Request(req.clone())) + size(Body::Response(resp.clone()));
                    r_rounds += 1;
                }
            });
            assert_eq!(
                ra.tree.root_hash(),
                rb.tree.root_hash(),
                "n={n} d={d} reconciled rateless"
            );
            drop((ra, rb));
            // The goal: twice the rateless IBLT's bound, 1.35 coded symbols
            // of `SYMBOL_BYTES` per element of the set difference.
            let goal = 2.0 * 1.35 * differing as f64 * SYMBOL_BYTES as f64;
            println!("bench=reconcile metric=set_difference_n{n}_d{d} value={differing} unit=entries");
            println!(
                "bench=reconcile metric=rateless_bytes_n{n}_d{d} value={r_bytes} unit=B baseline={neg_bytes} ratio={:.2}",
                r_bytes as f64 / neg_bytes as f64
            );
            println!(
                "bench=reconcile metric=rateless_bytes_of_goal_n{n}_d{d} value={r_bytes} unit=B baseline={goal:.0} ratio={:.2}",
                r_bytes as f64 / goal
            );
            println!(
                "bench=reconcile metric=rateless_round_trips_n{n}_d{d} value={r_rounds} unit=rt baseline={neg_rt} ratio={:.2} walked={}",
                r_rounds as f64 / neg_rt as f64,
                rp.walked
            );
            println!(
                "bench=reconcile metric=rateless_cpu_ms_n{n}_d{d} value={:.1} unit=ms baseline={neg_ms:.1} ratio={:.2}",
                r_time.as_secs_f64() * 1000.0,
                r_time.as_secs_f64() * 1000.0 / neg_ms
            );

            // syncnode's session walking the trees. Reconciliation (the
            // rounds) is what negentropy does; the transfer of the differing
            // items' metadata (Fetch/Push) comes on top for both, in bytes
            // and in CPU.
            let (mut bytes, mut transfer, mut rounds) = (0usize, 0usize, 0u64);
            let start = Instant::now();
            let session = Session::new(1, a.tree.depth());
            let (p, round_time, transfer_time) = timed_session(&mut a, &mut b, session, |req, resp| {
                let full = |b: Body| Envelope::new("c", b).encode().len();
                let largest = full(Body::Request(req.clone())).max(full(Body::Response(resp.clone())));
                assert!(
                    largest <= DEFAULT_MAX_FRAME,
                    "a {largest}-byte message would exceed the frame limit"
                );
                let n = size(Body::Request(req.clone())) + size(Body::Response(resp.clone()));
                match reconciling(req) {
                    true => {
                        bytes += n;
                        rounds += 1;
                    }
                    false => transfer += n,
                }
            });
            let total_ms = start.elapsed().as_secs_f64() * 1000.0;
            let ms = round_time.as_secs_f64() * 1000.0;
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
            println!(
                "bench=reconcile metric=transfer_cpu_ms_n{n}_d{d} value={:.1} unit=ms",
                transfer_time.as_secs_f64() * 1000.0
            );
            println!("bench=reconcile metric=session_wall_ms_n{n}_d{d} value={total_ms:.1} unit=ms");
            println!("bench=reconcile metric=naive_bytes_n{n}_d{d} value={naive_bytes} unit=B");
            println!("bench=reconcile metric=transfer_bytes_n{n}_d{d} value={transfer} unit=B");
        }
    }
}
