// RFC 9162 (Certificate Transparency v2) section 2.1 Merkle proofs, verified in the browser with
// WebCrypto's SHA-256: bytes in, verdict out (a MerkleError, or nothing). No I/O, no encodings.
// The same algorithms, step by step, as verifier/vitalproof_verify/merkle.py, so both verifiers
// accept and refuse the same proofs. Sizes and indexes are BigInt inside: trees may have 2^64
// leaves, and JavaScript's bitwise operators stop at 32 bits.

export const HASH_SIZE = 32;

/** A proof does not verify, or its inputs cannot be a proof (the only error this module throws). */
export class MerkleError extends Error {
  constructor(message) {
    super(message);
    this.name = "MerkleError";
  }
}

async function sha256(...parts) {
  const data = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    data.set(p, at);
    at += p.length;
  }
  return new Uint8Array(await crypto.subtle.digest("SHA-256", data));
}

/** MTH of a one-element list (RFC 9162 section 2.1.1): SHA-256(0x00 || data). */
export function leafHash(data) {
  return sha256(Uint8Array.of(0), data);
}

/** Interior node (RFC 9162 section 2.1.1): SHA-256(0x01 || left || right). */
export function nodeHash(left, right) {
  return sha256(Uint8Array.of(1), left, right);
}

export function toHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function equalBytes(a, b) {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

function checkPath(proof) {
  proof.forEach((p, i) => {
    if (p.length !== HASH_SIZE) {
      throw new MerkleError(`proof element ${i} is ${p.length} bytes, expected ${HASH_SIZE}`);
    }
  });
}

/**
 * Throw MerkleError unless `proof` puts `leaf` at `index` of a `treeSize`-leaf tree under `root`.
 * RFC 9162 section 2.1.3.2, including its final `sn == 0` check: that is what rejects a valid
 * path presented with a wrong index or tree size.
 */
export async function verifyInclusion(leaf, index, treeSize, proof, root) {
  index = BigInt(index);
  treeSize = BigInt(treeSize);
  if (index < 0n || index >= treeSize) {
    throw new MerkleError(`leaf index ${index} outside tree of size ${treeSize}`);
  }
  if (leaf.length !== HASH_SIZE) {
    throw new MerkleError(`leaf hash is ${leaf.length} bytes, expected ${HASH_SIZE}`);
  }
  checkPath(proof);
  let fn = index;
  let sn = treeSize - 1n;
  let r = leaf;
  for (const p of proof) {
    if (sn === 0n) throw new MerkleError("inclusion proof is longer than the tree is deep");
    if (fn & 1n || fn === sn) {
      r = await nodeHash(p, r);
      while (fn && !(fn & 1n)) {
        fn >>= 1n;
        sn >>= 1n;
      }
    } else {
      r = await nodeHash(r, p);
    }
    fn >>= 1n;
    sn >>= 1n;
  }
  if (sn !== 0n) throw new MerkleError("inclusion proof is shorter than the tree is deep");
  if (!equalBytes(r, root)) {
    throw new MerkleError(`inclusion proof leads to root ${toHex(r)}, not ${toHex(root)}`);
  }
}

/**
 * Throw MerkleError unless the tree `newRoot` (of `newSize` leaves) extends the tree `oldRoot`.
 * RFC 9162 section 2.1.4.2 assumes 0 < first < second; the edges are decided as the
 * transparency-dev vectors expect: equal sizes need an empty proof and equal roots, and a proof
 * from size 0 is refused (every tree extends the empty one, so it would prove nothing).
 */
export async function verifyConsistency(oldSize, newSize, oldRoot, newRoot, proof) {
  oldSize = BigInt(oldSize);
  newSize = BigInt(newSize);
  if (oldSize <= 0n) throw new MerkleError(`consistency from tree size ${oldSize} proves nothing`);
  if (newSize < oldSize) {
    throw new MerkleError(`new tree size ${newSize} is smaller than old size ${oldSize}`);
  }
  if (oldSize === newSize) {
    if (proof.length) throw new MerkleError("equal tree sizes need an empty consistency proof");
    if (!equalBytes(oldRoot, newRoot)) throw new MerkleError("equal tree sizes but different roots");
    return;
  }
  if (!proof.length) throw new MerkleError("empty consistency proof");
  checkPath(proof);
  // Step 2: a power-of-two old tree is itself a node of the new tree, so the proof omits it.
  const path = (oldSize & (oldSize - 1n)) === 0n ? [oldRoot, ...proof] : [...proof];
  let fn = oldSize - 1n;
  let sn = newSize - 1n;
  while (fn & 1n) {
    fn >>= 1n;
    sn >>= 1n;
  }
  let fr = path[0];
  let sr = path[0];
  for (const c of path.slice(1)) {
    if (sn === 0n) throw new MerkleError("consistency proof is longer than the tree is deep");
    if (fn & 1n || fn === sn) {
      fr = await nodeHash(c, fr);
      sr = await nodeHash(c, sr);
      while (fn && !(fn & 1n)) {
        fn >>= 1n;
        sn >>= 1n;
      }
    } else {
      sr = await nodeHash(sr, c);
    }
    fn >>= 1n;
    sn >>= 1n;
  }
  if (sn !== 0n) throw new MerkleError("consistency proof is shorter than the tree is deep");
  if (!equalBytes(fr, oldRoot)) {
    throw new MerkleError(`consistency proof leads to old root ${toHex(fr)}, not ${toHex(oldRoot)}`);
  }
  if (!equalBytes(sr, newRoot)) {
    throw new MerkleError(`consistency proof leads to new root ${toHex(sr)}, not ${toHex(newRoot)}`);
  }
}
