//! The rateless mode of a session (DESIGN §5.2; `riblt`).
//!
//! Instead of walking the trees, the initiator sends the counts of its first
//! coded symbols (`Sketch`, 512 bytes). The peer estimates the difference
//! from them and answers with about 1.65 of its symbols per differing entry;
//! the initiator subtracts its own and peels. The decoded elements name
//! entries by tree key: its own it reads locally, the peer's it asks for
//! (`Resolve`), and comparing the two gives what to pull and to push. That
//! is two round trips for most differences, three when the first answer was
//! short, then the transfer.
//!
//! The tree walk takes over when the difference is more than the kept
//! symbols can decode (a node joining empty), when the peer's set changes
//! under every answer, or when it keeps no symbols (it refuses the sketch,
//! or answers with none).
//!
//! Counts travel modulo 2^16: a one-sided difference past 32,767 entries
//! wraps symbol 0's count and spoils the estimate, which costs a round trip
//! or the walk, never a wrong result (the checksums decide what decodes).

use std::collections::{BTreeSet, VecDeque};

use super::SessionError;
use crate::merkle::{MAX_SYMBOLS, MerkleTree, key_of};
use crate::riblt::{self, CodedSymbol, key8};
use crate::wire::{EntrySummary, Request, Response};

/// Symbol counts an opening `Sketch` carries (2 bytes each); the estimate
/// from 256 is within about ±20 %.
pub const SKETCH_COUNTS: usize = 256;
/// Most counts a `Sketch` may carry.
pub const MAX_SKETCH_COUNTS: usize = 4096;
/// Most keys one `Resolve` asks for.
pub const MAX_RESOLVE: usize = 16_384;
/// Symbols asked for per estimated difference: decoding needs about 1.35
/// to 1.6; the rest covers the estimate's error.
const PER_DIFFERENCE: f64 = 1.65;
/// Symbols asked for on top (small differences need relatively more).
const SLACK: usize = 16;
/// Most symbol answers before the session gives up and walks the trees.
const SYMBOL_ANSWERS: u32 = 4;

/// The refusal of a node that keeps no coded symbols: the asker walks the
/// trees instead (any other refusal fails the session, as in a walk).
pub const NO_SYMBOLS: &str = "this node keeps no coded symbols";

/// Symbols to ask for to decode a difference of about `estimate` entries.
pub fn symbols_for(estimate: u64) -> usize {
    (estimate as f64 * PER_DIFFERENCE).ceil().min(u32::MAX as f64) as usize + SLACK
}

/// The symbol counts of `tree`'s first `n` symbols, as a `Sketch` carries them.
pub fn sketch_counts(tree: &MerkleTree, n: usize) -> Option<Vec<[u8; 2]>> {
    let symbols = tree.sketch()?.symbols();
    Some(
        symbols[..n.min(symbols.len())]
            .iter()
            .map(|s| s.count.to_be_bytes())
            .collect(),
    )
}

/// The responder's answer to a `Sketch` or `Symbols` request.
pub fn symbols_answer(tree: &MerkleTree, req: &Request) -> Result<Response, String> {
    let symbols = tree.sketch().ok_or(NO_SYMBOLS)?.symbols();
    let zero = symbols.first().copied().unwrap_or_default();
    let (from, estimate, to) = match req {
        Request::Sketch { counts, .. } => {
            // Their counts less ours: the difference's counts, as the
            // initiator will see them.
            let diff: Vec<i16> = counts
                .iter()
                .zip(symbols)
                .map(|(c, mine)| u16::from_be_bytes(*c).wrapping_sub(mine.count) as i16)
                .collect();
            let estimate = riblt::estimate_from_counts(&diff);
            let want = symbols_for(estimate);
            // Past what our symbols decode: none, the initiator walks the trees.
            (0, estimate, if want > symbols.len() { 0 } else { want })
        }
        Request::Symbols { from, count, .. } => {
            // Past our capacity: none (the asker walks the trees), at the
            // index it asked for.
            let at = (*from as usize).min(symbols.len());
            let to = at.saturating_add(*count as usize).min(symbols.len());
            return Ok(Response::Symbols {
                from: *from,
                zero,
                estimate: 0,
                symbols: symbols[at..to].to_vec(),
            });
        }
        _ => return Err("not a symbols request".into()),
    };
    Ok(Response::Symbols {
        from: from as u32,
        zero,
        estimate,
        symbols: symbols[from..to].to_vec(),
    })
}

/// Checks a rateless request against the limits.
pub fn check(req: &Request) -> Result<(), String> {
    match req {
        Request::Sketch { counts, .. } if counts.len() <= MAX_SKETCH_COUNTS => Ok(()),
        Request::Symbols { count, .. } if *count as usize <= MAX_SYMBOLS => Ok(()),
        Request::Resolve { keys, .. } if keys.len() <= MAX_RESOLVE => Ok(()),
        _ => Err(format!(
            "a sketch carries at most {MAX_SKETCH_COUNTS} counts, a symbols request asks for at most {MAX_SYMBOLS}, a resolve for at most {MAX_RESOLVE} keys"
        )),
    }
}

/// What the rateless mode wants next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    Send(Request),
    /// Our entries under these keys, for `on_local`.
    LocalKeys(Vec<[u8; 8]>),
    /// Decoded and resolved: compare the peer's entries with ours (none to read).
    Compare(Vec<EntrySummary>),
    /// Walk the trees instead.
    Fallback,
    Waiting,
}

#[derive(Debug)]
enum Phase {
    Open,
    /// Ask for symbols `from..to`.
    Ask {
        from: usize,
        to: usize,
    },
    AwaitSymbols {
        from: usize,
        count: usize,
    },
    /// Decoded: resolve the peer's keys, then read ours.
    Resolve {
        theirs: VecDeque<[u8; 8]>,
        asked: Option<Vec<[u8; 8]>>,
        ours: Vec<[u8; 8]>,
        found: Vec<EntrySummary>,
    },
    ReadLocal {
        found: Vec<EntrySummary>,
    },
    Fallback,
}

#[derive(Debug)]
pub(super) struct Rateless {
    session: u64,
    /// The peer's symbols received, from index 0.
    remote: Vec<CodedSymbol>,
    answers: u32,
    phase: Phase,
    /// Symbols received in all (for the session's progress).
    pub(super) received: u64,
}

impl Rateless {
    pub(super) fn new(session: u64) -> Self {
        Self {
            session,
            remote: Vec::new(),
            answers: 0,
            phase: Phase::Open,
            received: 0,
        }
    }

    /// Still waiting for the answer to the opening `Sketch`.
    pub(super) fn opening(&self) -> bool {
        matches!(self.phase, Phase::AwaitSymbols { from: 0, .. }) && self.answers == 0
    }

    pub(super) fn next(&mut self, local: &MerkleTree) -> Next {
        let session = self.session;
        match &mut self.phase {
            Phase::Open => match sketch_counts(local, SKETCH_COUNTS) {
                Some(counts) => {
                    self.phase = Phase::AwaitSymbols {
                        from: 0,
                        count: usize::MAX,
                    };
                    Next::Send(Request::Sketch { session, counts })
                }
                None => Next::Fallback,
            },
            Phase::Ask { from, to } => {
                let (from, count) = (*from, *to - *from);
                self.phase = Phase::AwaitSymbols { from, count };
                Next::Send(Request::Symbols {
                    session,
                    from: from as u32,
                    count: count as u32,
                })
            }
            Phase::AwaitSymbols { .. } | Phase::Resolve { asked: Some(_), .. } => Next::Waiting,
            Phase::Resolve {
                theirs,
                asked,
                ours,
                found,
            } => {
                if !theirs.is_empty() {
                    let n = theirs.len().min(MAX_RESOLVE);
                    let keys: Vec<[u8; 8]> = theirs.drain(..n).collect();
                    *asked = Some(keys.clone());
                    return Next::Send(Request::Resolve { session, keys });
                }
                let found = std::mem::take(found);
                if ours.is_empty() {
                    self.phase = Phase::Fallback;
                    return Next::Compare(found);
                }
                let keys = std::mem::take(ours);
                self.phase = Phase::ReadLocal { found };
                Next::LocalKeys(keys)
            }
            Phase::ReadLocal { .. } => Next::Waiting,
            Phase::Fallback => Next::Fallback,
        }
    }

    /// The peer's entries found, once our own were read (`LocalKeys`).
    pub(super) fn take_found(&mut self) -> Vec<EntrySummary> {
        match std::mem::replace(&mut self.phase, Phase::Fallback) {
            Phase::ReadLocal { found } => found,
            _ => Vec::new(),
        }
    }

    pub(super) fn on_response(&mut self, resp: Response, local: &MerkleTree) -> Result<(), SessionError> {
        let bad = |m: String| Err(SessionError::Protocol(m));
        match (&mut self.phase, resp) {
            (
                &mut Phase::AwaitSymbols { from, count },
                Response::Symbols {
                    from: got_from,
                    zero,
                    estimate,
                    symbols,
                },
            ) => {
                if got_from as usize != from || symbols.len() > count || symbols.len() > MAX_SYMBOLS {
                    return bad(format!(
                        "symbols {got_from}+{} answer a request for {from}+{count}",
                        symbols.len()
                    ));
                }
                self.answers += 1;
                self.received += symbols.len() as u64;
                if symbols.is_empty() {
                    // Past what the peer's symbols decode (estimate), or past its capacity.
                    let _ = estimate;
                    self.phase = Phase::Fallback;
                    return Ok(());
                }
                if from == 0 {
                    self.remote = symbols;
                } else if self.remote.first() != Some(&zero) {
                    // The peer's set changed since its first answer: what we
                    // hold no longer fits with what comes. Start over.
                    self.remote.clear();
                    self.phase = Phase::Ask {
                        from: 0,
                        to: from + symbols.len(),
                    };
                    return self.give_up_after_too_many();
                } else {
                    self.remote.extend(symbols);
                }
                self.decode(local);
                Ok(())
            }
            (Phase::Resolve { asked, found, .. }, Response::Resolved { entries, mut deferred }) => {
                let Some(keys) = asked.take() else {
                    return bad("a resolve answer nobody asked for".into());
                };
                // Entries are not checked against the keys (a peer that lies
                // about its entries can only make us pull or push in vain, as
                // with the lists of a tree walk); deferred keys are.
                // Deferred keys were asked for, each once, and fewer than
                // asked: the keys left shrink every round.
                let wanted: BTreeSet<[u8; 8]> = keys.iter().copied().collect();
                deferred.sort_unstable();
                deferred.dedup();
                if deferred.iter().any(|k| !wanted.contains(k)) || deferred.len() >= keys.len() {
                    return bad("a resolve answer deferred keys not asked for, or every key".into());
                }
                found.extend(entries);
                if let Phase::Resolve { theirs, .. } = &mut self.phase {
                    for k in deferred.into_iter().rev() {
                        theirs.push_front(k);
                    }
                }
                Ok(())
            }
            (phase, r) => bad(format!("{r:?} while the rateless session was at {phase:?}")),
        }
    }

    fn give_up_after_too_many(&mut self) -> Result<(), SessionError> {
        if self.answers >= SYMBOL_ANSWERS {
            self.phase = Phase::Fallback;
        }
        Ok(())
    }

    /// Decodes what we hold; asks for more, resolves, or falls back.
    fn decode(&mut self, local: &MerkleTree) {
        let Some(sketch) = local.sketch() else {
            self.phase = Phase::Fallback;
            return;
        };
        let capacity = sketch.capacity();
        let have = self.remote.len().min(capacity);
        match riblt::decode(&sketch.symbols()[..have], &self.remote[..have]) {
            Ok(diff) => {
                let keys = |els: Vec<riblt::Element>| -> Vec<[u8; 8]> {
                    let set: BTreeSet<[u8; 8]> = els.into_iter().map(key8).collect();
                    set.into_iter().collect()
                };
                self.phase = Phase::Resolve {
                    theirs: keys(diff.remote_only).into(),
                    asked: None,
                    ours: keys(diff.local_only),
                    found: Vec::new(),
                };
            }
            Err(estimate) => {
                let to = symbols_for(estimate).max(have + have / 4 + SLACK);
                if have >= capacity || to > capacity && symbols_for(estimate) > capacity {
                    self.phase = Phase::Fallback;
                    return;
                }
                self.phase = Phase::Ask {
                    from: have,
                    to: to.min(capacity),
                };
                let _ = self.give_up_after_too_many();
            }
        }
    }
}

/// The first 8 bytes of an id's tree key.
pub fn key8_of(id: &str) -> [u8; 8] {
    key_of(id)[..8].try_into().expect("8 bytes")
}
