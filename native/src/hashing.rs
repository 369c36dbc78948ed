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

/// One run of samples of one metric in one unit: the JSON of both (quotes included, as
/// `json.dumps` spells them) and the samples it spans.
pub struct Run<'a> {
    pub metric_json: &'a str,
    pub unit_json: &'a str,
    pub start: usize,
    pub stop: usize,
}

/// The columns of one normalized batch of one device and patient, as the canonical document
/// `vitalproof.schema.canonical_reading_bytes` needs them.
pub struct Readings<'a> {
    pub device_json: &'a str,
    pub patient_json: &'a str,
    pub runs: &'a [Run<'a>],
    pub times: &'a [i64],
    pub quality: &'a [i64],
    pub ids: &'a [&'a str],
    pub seqs: &'a [i64],
    /// `None` for a missing value (NaN or None in Python): JSON `null`.
    pub values: &'a [Option<f64>],
}

/// `float.__repr__` of a finite float, appended to `out`.
///
/// The digits are Ryu's: the shortest string that reads back as the same double, the one
/// closest to it, an exact tie rounded to even; that is what Python's repr takes from David
/// Gay's `dtoa` mode 0 (Rust's own `{:e}` rounds such ties up, and would spell
/// -214304185590892.625 with a final 3 where Python writes 2). The layout is Python's
/// `format_float_short` for the 'r' code: with value = 0.DIGITS x 10^decpt, fixed notation
/// when decpt is in (-4, 16], with ".0" when integral, else `d[.ddd]e+XX` with a signed
/// exponent of at least two digits.
pub fn py_float_repr(x: f64, out: &mut Vec<u8>) {
    if x == 0.0 {
        out.extend_from_slice(if x.is_sign_negative() { b"-0.0" } else { b"0.0" });
        return;
    }
    let mut buf = ryu::Buffer::new();
    let text = buf.format_finite(x).as_bytes(); // e.g. "-72.25", "1e16", "1.5e-7", "0.001"
    let (text, negative) = match text.split_first() {
        Some((b'-', rest)) => (rest, true),
        _ => (text, false),
    };
    let (mantissa, exp10) = match text.iter().position(|&b| b == b'e' || b == b'E') {
        Some(e) => {
            let exp = std::str::from_utf8(&text[e + 1..]).expect("ryu writes ASCII");
            (&text[..e], exp.parse::<i32>().expect("ryu writes an integer exponent"))
        }
        None => (text, 0),
    };
    let int_len = mantissa.iter().position(|&b| b == b'.').unwrap_or(mantissa.len());
    let mut digits: Vec<u8> = mantissa.iter().copied().filter(|&b| b != b'.').collect();
    let mut decpt = int_len as i32 + exp10;
    let leading = digits.iter().take_while(|&&d| d == b'0').count();
    digits.drain(..leading);
    decpt -= leading as i32;
    while digits.last() == Some(&b'0') {
        digits.pop();
    }
    if negative {
        out.push(b'-');
    }
    if decpt > -4 && decpt <= 16 {
        if decpt <= 0 {
            out.extend_from_slice(b"0.");
            out.extend(std::iter::repeat_n(b'0', decpt.unsigned_abs() as usize));
            out.extend_from_slice(&digits);
        } else {
            let point = decpt as usize;
            if point >= digits.len() {
                out.extend_from_slice(&digits);
                out.extend(std::iter::repeat_n(b'0', point - digits.len()));
                out.extend_from_slice(b".0");
            } else {
                out.extend_from_slice(&digits[..point]);
                out.push(b'.');
                out.extend_from_slice(&digits[point..]);
            }
        }
    } else {
        let exp = decpt - 1;
        out.push(digits[0]);
        if digits.len() > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        out.push(b'e');
        out.push(if exp < 0 { b'-' } else { b'+' });
        let e = exp.unsigned_abs();
        if e < 10 {
            out.push(b'0');
        }
        out.extend_from_slice(itoa::Buffer::new().format(e).as_bytes());
    }
}

/// The canonical JSON of every reading (what `canonical_reading_bytes` gives: keys sorted,
/// no spaces) hashed as an RFC 9162 salted leaf, SHA-256(0x00 || salt || canonical), without
/// ever holding more than one document. Callers check that the runs tile the columns.
pub fn canonical_leaves(salts: &[&[u8]], r: &Readings<'_>) -> Vec<Hash> {
    let prefixed = Sha256::new_with_prefix([LEAF_PREFIX]);
    let mut out = Vec::with_capacity(r.times.len());
    let mut doc: Vec<u8> = Vec::with_capacity(256);
    let mut num = itoa::Buffer::new();
    for run in r.runs {
        for i in run.start..run.stop {
            doc.clear();
            doc.extend_from_slice(b"{\"device_id\":");
            doc.extend_from_slice(r.device_json.as_bytes());
            doc.extend_from_slice(b",\"device_time_us\":");
            doc.extend_from_slice(num.format(r.times[i]).as_bytes());
            doc.extend_from_slice(b",\"metric\":");
            doc.extend_from_slice(run.metric_json.as_bytes());
            doc.extend_from_slice(b",\"patient_id\":");
            doc.extend_from_slice(r.patient_json.as_bytes());
            doc.extend_from_slice(b",\"quality\":");
            doc.extend_from_slice(num.format(r.quality[i]).as_bytes());
            doc.extend_from_slice(b",\"reading_id\":\"");
            doc.extend_from_slice(r.ids[i].as_bytes());
            doc.extend_from_slice(b"\",\"seq\":");
            doc.extend_from_slice(num.format(r.seqs[i]).as_bytes());
            doc.extend_from_slice(b",\"unit\":");
            doc.extend_from_slice(run.unit_json.as_bytes());
            doc.extend_from_slice(b",\"value\":");
            match r.values[i] {
                Some(v) => py_float_repr(v, &mut doc),
                None => doc.extend_from_slice(b"null"),
            }
            doc.push(b'}');
            let mut h = prefixed.clone();
            h.update(salts[i]);
            h.update(&doc);
            out.push(h.finalize().into());
        }
    }
    out
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


    fn repr(x: f64) -> String {
        let mut out = Vec::new();
        py_float_repr(x, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn float_repr_layout_matches_python() {
        // python3 -c 'print([repr(x) for x in (...)])'
        let cases: [(f64, &str); 18] = [
            (-214304185590892.62, "-214304185590892.62"), // an exact tie: rounded to even
            (616966740653887.2, "616966740653887.2"),
            (72.0, "72.0"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (33.57, "33.57"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e16, "1.2345e+16"),
            (123456789012345.6, "123456789012345.6"),
            (2e16 + 8.0, "2.000000000000001e+16"),
            (1e100, "1e+100"),
            (-2.5e-300, "-2.5e-300"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
        ];
        for (x, want) in cases {
            assert_eq!(repr(x), want, "{x:e}");
        }
    }

    const KNOWN_ID: &str = "7942843642bd33c93deeb9e25ba1e99a";
}
