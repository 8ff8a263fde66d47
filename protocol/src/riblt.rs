//! Rateless set reconciliation over entry digests (DESIGN §5.2; Yang et al.,
//! "Practical Rateless Set Reconciliation", SIGCOMM 2024).
//!
//! Each stored entry is an *element* of 16 bytes: the first 8 of its tree key
//! and the first 8 of its entry hash, so two versions of one object are two
//! elements and the key finds the object again. An element is added into an
//! endless sequence of coded symbols: always at index 0, then at indices that
//! thin out, index `i` with probability `2 / (i + 2)`. Any prefix of the
//! sequence is then an invertible Bloom lookup table, good for about
//! `prefix / 1.35` differences once the difference is large.
//!
//! A node keeps the first `capacity` symbols of its own set up to date on
//! every tree insert and remove (the `Sketch`, about `2 ln capacity` symbols
//! touched per write), so answering is a copy. To reconcile, one side takes a
//! prefix of the other's symbols, subtracts its own, and peels (`decode`): a
//! symbol left with one element (count ±1 and a checksum that matches) names
//! it, and taking it out of the other symbols it hit frees more. When every
//! symbol is empty, each side's extra elements are known; when not, the
//! symbols' counts estimate how many more symbols are needed.

/// Bytes of one coded symbol on the wire: sum, checksum, count.
pub const SYMBOL_BYTES: usize = 26;

/// One element: the first 8 bytes of the tree key, then the first 8 of the
/// entry hash, as a big-endian number (`EntryDigest::element`).
pub type Element = u128;

/// The tree key's first 8 bytes, by which an element's entry is found.
pub fn key8(e: Element) -> [u8; 8] {
    ((e >> 64) as u64).to_be_bytes()
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An element's checksum: tells a symbol holding exactly one element from one
/// holding several, and seeds the element's indices.
pub fn checksum(e: Element) -> u64 {
    splitmix((e >> 64) as u64 ^ splitmix(e as u64 ^ 0x5eed_5eed_5eed_5eed))
}

/// The indices of the symbols an element is added into, in increasing order
/// and without end: 0, then gaps drawn so that index `i` is hit with
/// probability `2 / (i + 2)`. The draw is integer and IEEE arithmetic only,
/// so every node computes the same indices.
#[derive(Debug, Clone)]
pub struct Indices {
    state: u64,
    next: u64,
}

pub fn indices(check: u64) -> Indices {
    Indices { state: check, next: 0 }
}

impl Iterator for Indices {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        let current = self.next;
        self.state = self.state.wrapping_add(1);
        let r = splitmix(self.state);
        // u in (0, 1]: P(no hit in (i, j]) = ((i + 1.5) / (j + 1.5))^2, inverted.
        let u = ((r >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64);
        let at = current as f64 + 1.5;
        let gap = at / u.sqrt() - at;
        // Rounded up by hand (`ceil` is a library call on baseline x86-64);
        // `as` saturates, so a huge gap ends the useful part of the sequence.
        let whole = gap as u64;
        let gap = whole.saturating_add(((whole as f64) < gap) as u64);
        self.next = current.saturating_add(gap.max(1));
        Some(current)
    }
}

/// The probability that an element hits symbol `i`.
pub fn density(i: usize) -> f64 {
    2.0 / (i as f64 + 2.0)
}

/// XOR of the elements added, XOR of their checksums, and how many were
/// added less how many were removed, modulo 2^16 (enough to spot ±1 and to
/// estimate; the wire carries two bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CodedSymbol {
    pub sum: u128,
    pub check: u64,
    pub count: u16,
}

impl CodedSymbol {
    /// Adds (`sign` 1) or removes (`sign` -1) an element.
    fn apply(&mut self, e: Element, check: u64, sign: i16) {
        self.sum ^= e;
        self.check ^= check;
        self.count = self.count.wrapping_add_signed(sign);
    }

    /// `self` with `other`'s elements taken out.
    pub fn minus(self, other: CodedSymbol) -> CodedSymbol {
        CodedSymbol {
            sum: self.sum ^ other.sum,
            check: self.check ^ other.check,
            count: self.count.wrapping_sub(other.count),
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == CodedSymbol::default()
    }

    /// `Some(1)` when the symbol holds one element more than the other side,
    /// `Some(-1)` one fewer, checked by the checksum.
    fn pure(&self) -> Option<i16> {
        let sign = match self.count {
            1 => 1,
            u16::MAX => -1,
            _ => return None,
        };
        (checksum(self.sum) == self.check).then_some(sign)
    }

    pub fn to_bytes(self) -> [u8; SYMBOL_BYTES] {
        let mut b = [0u8; SYMBOL_BYTES];
        b[..16].copy_from_slice(&self.sum.to_be_bytes());
        b[16..24].copy_from_slice(&self.check.to_be_bytes());
        b[24..].copy_from_slice(&self.count.to_be_bytes());
        b
    }

    pub fn from_bytes(b: [u8; SYMBOL_BYTES]) -> Self {
        Self {
            sum: u128::from_be_bytes(b[..16].try_into().expect("16 bytes")),
            check: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            count: u16::from_be_bytes(b[24..].try_into().expect("2 bytes")),
        }
    }
}

impl serde::Serialize for CodedSymbol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_bytes().serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for CodedSymbol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <[u8; SYMBOL_BYTES]>::deserialize(d).map(Self::from_bytes)
    }
}

/// The first `capacity` coded symbols of a set, kept up to date.
#[derive(Clone, PartialEq, Eq)]
pub struct Sketch {
    symbols: Vec<CodedSymbol>,
}

impl std::fmt::Debug for Sketch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sketch").field("capacity", &self.symbols.len()).finish()
    }
}

impl Sketch {
    pub fn new(capacity: usize) -> Self {
        Self {
            symbols: vec![CodedSymbol::default(); capacity],
        }
    }

    pub fn from_symbols(symbols: Vec<CodedSymbol>) -> Self {
        Self { symbols }
    }

    pub fn add(&mut self, e: Element) {
        self.apply(e, 1);
    }

    pub fn remove(&mut self, e: Element) {
        self.apply(e, -1);
    }

    fn apply(&mut self, e: Element, sign: i16) {
        let check = checksum(e);
        let n = self.symbols.len() as u64;
        for i in indices(check).take_while(|&i| i < n) {
            self.symbols[i as usize].apply(e, check, sign);
        }
    }

    pub fn symbols(&self) -> &[CodedSymbol] {
        &self.symbols
    }

    pub fn capacity(&self) -> usize {
        self.symbols.len()
    }
}

/// What a finished decode found: the elements only the local side has, and
/// those only the remote side has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Difference {
    pub local_only: Vec<Element>,
    pub remote_only: Vec<Element>,
}

/// Peels `local - remote` (same indices, equal length). `Err` carries an
/// estimate of the whole difference's size when these symbols are too few
/// (or inconsistent: a set that changed between two batches of symbols).
pub fn decode(local: &[CodedSymbol], remote: &[CodedSymbol]) -> Result<Difference, u64> {
    let mut d: Vec<CodedSymbol> = local.iter().zip(remote).map(|(l, r)| l.minus(*r)).collect();
    let n = d.len();
    let mut out = Difference::default();
    let mut pure: Vec<usize> = (0..n).filter(|&i| d[i].pure().is_some()).collect();
    // Each true element clears the symbol it was found in; more peels than
    // symbols means the symbols are not what they claim.
    let mut budget = n;
    while let Some(i) = pure.pop() {
        let Some(sign) = d[i].pure() else { continue };
        if budget == 0 {
            break;
        }
        budget -= 1;
        let (e, check) = (d[i].sum, d[i].check);
        match sign {
            1 => out.local_only.push(e),
            _ => out.remote_only.push(e),
        }
        for j in indices(check).take_while(|&j| j < n as u64) {
            let s = &mut d[j as usize];
            s.apply(e, check, -sign);
            if s.pure().is_some() {
                pure.push(j as usize);
            }
        }
    }
    if d.iter().all(CodedSymbol::is_zero) {
        return Ok(out);
    }
    let decoded = (out.local_only.len() + out.remote_only.len()) as u64;
    Err(decoded + estimate(&d))
}

/// Estimates how many elements the difference symbols `d` hold.
pub fn estimate(d: &[CodedSymbol]) -> u64 {
    let counts: Vec<i16> = d.iter().map(|s| s.count as i16).collect();
    let nonzero = d.iter().any(|s| !s.is_zero()) as u64;
    estimate_from_counts(&counts).max(nonzero)
}

/// Estimates the size of a difference from the counts of its first symbols
/// (local less remote, modulo 2^16). Symbol `i`'s count is a sum of ±1 over
/// the `k` elements that hit it, so `c_i^2` has mean `k·ρ(1-ρ) + Δ²ρ²` (`ρ`
/// the density, `Δ` symbol 0's count: every element hits symbol 0), and
/// each symbol gives an estimate of `k`. They are averaged by inverse
/// variance (about `2k² + k/ρ(1-ρ)`), which needs `k`: a few rounds settle it.
pub fn estimate_from_counts(counts: &[i16]) -> u64 {
    let Some(&first) = counts.first() else { return 0 };
    let delta = first as f64;
    let each: Vec<(f64, f64)> = counts
        .iter()
        .enumerate()
        .skip(1)
        .map(|(i, &c)| {
            let rho = density(i);
            let v = rho * (1.0 - rho);
            let c = c as f64;
            ((c * c - delta * delta * rho * rho) / v, v)
        })
        .collect();
    let mut k = delta.abs().max(1.0);
    for _ in 0..4 {
        let (mut num, mut den) = (0.0, 0.0);
        for &(ki, v) in &each {
            let w = 1.0 / (2.0 * k * k + k / v);
            num += w * ki;
            den += w;
        }
        if den == 0.0 {
            break;
        }
        k = (num / den).max(delta.abs()).max(0.5);
    }
    k.round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn el(i: u64) -> Element {
        // Spread like SHA-256 output.
        ((splitmix(i) as u128) << 64) | splitmix(i ^ 0xabcdef) as u128
    }

    fn sketch(capacity: usize, items: impl Iterator<Item = u64>) -> Sketch {
        let mut s = Sketch::new(capacity);
        for i in items {
            s.add(el(i));
        }
        s
    }

    #[test]
    fn an_element_hits_index_i_about_two_in_i_plus_two_times() {
        let n = 20_000u64;
        let mut hits = [0u64; 64];
        for i in 0..n {
            for j in indices(checksum(el(i))).take_while(|&j| j < 64) {
                hits[j as usize] += 1;
            }
        }
        assert_eq!(hits[0], n);
        for (i, &h) in hits.iter().enumerate().skip(1) {
            let expected = density(i) * n as f64;
            assert!(
                (h as f64 - expected).abs() < 5.0 * expected.sqrt() + 10.0,
                "index {i}: {h} hits, expected {expected:.0}"
            );
        }
    }

    #[test]
    fn symbols_survive_the_wire_and_removing_undoes_adding() {
        let mut s = sketch(1024, 0..500);
        for x in s.symbols() {
            assert_eq!(CodedSymbol::from_bytes(x.to_bytes()), *x);
            assert_eq!(postcard::to_stdvec(x).unwrap().len(), SYMBOL_BYTES);
        }
        for i in 0..500 {
            s.remove(el(i));
        }
        assert!(s.symbols().iter().all(CodedSymbol::is_zero));
    }

    #[test]
    fn a_prefix_of_about_one_and_a_half_times_the_difference_decodes() {
        for d in [1u64, 10, 100, 1_000, 10_000] {
            // 20 000 shared; d/2 only local, d/2 only remote (at least one).
            let cap = 65_536;
            let only_local = d.div_ceil(2);
            let local = sketch(cap, (0..20_000).chain(1_000_000..1_000_000 + only_local));
            let remote = sketch(cap, (0..20_000).chain(2_000_000..2_000_000 + d - only_local));
            let mut needed = None;
            for n in (1..=cap).filter(|n| n.is_power_of_two() || n % 256 == 0) {
                if let Ok(diff) = decode(&local.symbols()[..n], &remote.symbols()[..n]) {
                    assert_eq!(diff.local_only.len() as u64, only_local);
                    assert_eq!(diff.remote_only.len() as u64, d - only_local);
                    let mut want: Vec<Element> = (1_000_000..1_000_000 + only_local).map(el).collect();
                    let mut got = diff.local_only.clone();
                    want.sort();
                    got.sort();
                    assert_eq!(got, want);
                    needed = Some(n);
                    break;
                }
            }
            let n = needed.expect("decodes within capacity");
            assert!(n as f64 <= 2.0 * d as f64 + 256.0, "d={d} needed {n} symbols");
        }
    }

    #[test]
    fn too_few_symbols_give_an_estimate_near_the_difference() {
        for d in [500u64, 5_000, 40_000] {
            let local = sketch(256, (0..10_000).chain(1_000_000..1_000_000 + d / 2));
            let remote = sketch(256, (0..10_000).chain(2_000_000..2_000_000 + d - d / 2));
            let e = decode(&local.symbols()[..64], &remote.symbols()[..64]).expect_err("too few");
            let ratio = e as f64 / d as f64;
            assert!((0.5..2.0).contains(&ratio), "d={d}: estimate {e}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn decoding_finds_exactly_the_difference_or_says_it_cannot(
            shared in 0u64..500, a in 0u64..60, b in 0u64..60, n in 1usize..200
        ) {
            let local = sketch(n, (0..shared).chain(10_000..10_000 + a));
            let remote = sketch(n, (0..shared).chain(20_000..20_000 + b));
            if let Ok(diff) = decode(local.symbols(), remote.symbols()) {
                let mut l = diff.local_only.clone();
                l.sort();
                let mut want: Vec<Element> = (10_000..10_000 + a).map(el).collect();
                want.sort();
                prop_assert_eq!(l, want);
                prop_assert_eq!(diff.remote_only.len() as u64, b);
            }
        }

        #[test]
        fn arbitrary_symbols_never_panic_or_loop(raw in proptest::collection::vec(any::<(u128, u64, u16)>(), 0..300)) {
            let remote: Vec<CodedSymbol> = raw.iter().map(|&(sum, check, count)| CodedSymbol { sum, check, count }).collect();
            let local = vec![CodedSymbol::default(); remote.len()];
            let _ = decode(&local, &remote);
        }
    }
}
