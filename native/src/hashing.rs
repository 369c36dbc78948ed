//! The hashes of the seal path over whole columns, in plain Rust (no Python types here).
//!
//! Every function is the batch form of a pure-Python reference that stays authoritative:
//! `vitalproof.schema.reading_id`, `streams.keystore.salts_for`,
//! `anchor.merkle.leaf_hash_salted` and `anchor.merkle.root`. Outputs must be byte-identical
//! to those (tests/test_native.py checks it with hypothesis and the RFC 9162 vectors).

use blake2::Blake2b;
use blake2::digest::consts::U16;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

pub const HASH_SIZE: usize = 32;
type Hash = [u8; HASH_SIZE];
type HmacSha256 = Hmac<Sha256>;
/// BLAKE2b with a 16-byte output *parameter* (what `hashlib.blake2b(digest_size=16)` is), not
/// a truncated 64-byte digest: the output length is mixed into the initial state.
type Blake2b128 = Blake2b<U16>;

const LEAF_PREFIX: u8 = 0x00;
const NODE_PREFIX: u8 = 0x01;
const UNIT_SEP: u8 = 0x1f;

/// Lower-case hex of a 16-byte id: the 32 ASCII characters Python's `hexdigest()` gives.
fn hex16(digest: &[u8]) -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    for (i, b) in digest.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0x0f)];
    }
    out
}

/// `blake2b(f"{device}\x1f{metric}\x1f{seq}\x1f{time_us}", digest_size=16).hexdigest()` per
/// sample. The material is built in one reused buffer; its device/metric prefix is rewritten
/// only when the metric changes, which is once per series.
pub fn reading_ids(device: &str, metrics: &[&str], seqs: &[i64], times: &[i64]) -> Vec<[u8; 32]> {
    let mut out = Vec::with_capacity(seqs.len());
    let mut material: Vec<u8> = Vec::with_capacity(device.len() + 64);
    let mut prefix_len = 0;
    let mut current: Option<&str> = None;
    let mut num = itoa::Buffer::new();
    for ((&metric, &seq), &t) in metrics.iter().zip(seqs).zip(times) {
        if current != Some(metric) {
            material.clear();
            material.extend_from_slice(device.as_bytes());
            material.push(UNIT_SEP);
            material.extend_from_slice(metric.as_bytes());
            material.push(UNIT_SEP);
            prefix_len = material.len();
            current = Some(metric);
        }
        material.truncate(prefix_len);
        material.extend_from_slice(num.format(seq).as_bytes());
        material.push(UNIT_SEP);
        material.extend_from_slice(num.format(t).as_bytes());
        out.push(hex16(&Blake2b128::digest(&material)));
    }
    out
}

/// HMAC-SHA256(key, message) per message, the keyed inner/outer states computed once.
pub fn hmac_sha256_each(key: &[u8], messages: &[&[u8]]) -> Vec<Hash> {
    // HMAC accepts keys of any length (RFC 2104 hashes long ones): this cannot fail.
    let keyed = <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    messages
        .iter()
        .map(|m| {
            let mut mac = keyed.clone();
            mac.update(m);
            mac.finalize().into_bytes().into()
        })
        .collect()
}

/// RFC 9162 leaf hash of salted data, SHA-256(0x00 || salt || data), per pair.
pub fn salted_leaves(salts: &[&[u8]], data: &[&[u8]]) -> Vec<Hash> {
    let prefixed = Sha256::new_with_prefix([LEAF_PREFIX]);
    salts
        .iter()
        .zip(data)
        .map(|(salt, d)| {
            let mut h = prefixed.clone();
            h.update(salt);
            h.update(d);
            h.finalize().into()
        })
        .collect()
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new_with_prefix([NODE_PREFIX]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Replace `level` by the level above it: neighbours hashed pairwise, an odd last node
/// promoted unchanged (RFC 9162 never duplicates it). In place, so a root needs one buffer.
fn climb(level: &mut Vec<Hash>) {
    let n = level.len();
    for i in 0..n / 2 {
        level[i] = node_hash(&level[2 * i], &level[2 * i + 1]);
    }
    if n % 2 == 1 {
        level[n / 2] = level[n - 1];
    }
    level.truncate(n.div_ceil(2));
}

/// MTH(D[n]) of RFC 9162 section 2.1.1 over leaf hashes; SHA-256 of nothing for no leaves.
pub fn root(mut level: Vec<Hash>) -> Hash {
    if level.is_empty() {
        return Sha256::digest([]).into();
    }
    while level.len() > 1 {
        climb(&mut level);
    }
    level[0]
}

/// Every level of the tree, leaves first and the root last (what a prover keeps).
pub fn levels(leaves: Vec<Hash>) -> Vec<Vec<Hash>> {
    let mut out = vec![leaves];
    while out.last().is_some_and(|l| l.len() > 1) {
        let mut next = out.last().cloned().unwrap_or_default();
        climb(&mut next);
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn rfc9162_roots_of_the_shared_leaf_inputs() {
        // The first three sizes of /work/shared/vectors/rfc9162/roots.json.
        let inputs = [unhex(""), unhex("00"), unhex("10")];
        let leaves: Vec<Hash> = inputs
            .iter()
            .map(|d| {
                Sha256::new_with_prefix([LEAF_PREFIX])
                    .chain_update(d)
                    .finalize()
                    .into()
            })
            .collect();
        let want = [
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        ];
        for (n, w) in want.iter().enumerate() {
            assert_eq!(root(leaves[..n].to_vec()).to_vec(), unhex(w), "size {n}");
        }
    }

    #[test]
    fn levels_end_in_the_root() {
        let leaves: Vec<Hash> = (0u8..5).map(|i| [i; 32]).collect();
        let lv = levels(leaves.clone());
        assert_eq!(lv.iter().map(Vec::len).collect::<Vec<_>>(), [5, 3, 2, 1]);
        assert_eq!(lv[3][0], root(leaves));
        assert_eq!(lv[1][2], [4; 32]); // the odd node is promoted, not duplicated
    }

    #[test]
    fn reading_id_known_answer() {
        // python3 -c 'import hashlib;
        //   print(hashlib.blake2b(b"dev-1\x1fheart_rate\x1f17\x1f-5", digest_size=16).hexdigest())'
        let got = reading_ids("dev-1", &["heart_rate"], &[17], &[-5]);
        assert_eq!(std::str::from_utf8(&got[0]).unwrap(), KNOWN_ID);
    }

    const KNOWN_ID: &str = "7942843642bd33c93deeb9e25ba1e99a";
}
