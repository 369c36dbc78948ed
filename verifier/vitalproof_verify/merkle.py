"""RFC 9162 Merkle trees (Certificate Transparency v2, section 2.1): bytes in, bytes out.

Modelled on sigstore-python's ``sigstore/_internal/merkle.py``: no I/O, no encodings, one
error type (:class:`~vitalproof_verify.errors.MerkleError`). The batch trees (over salted
reading leaves, at both of their levels) and the log of batch roots use this module, so a
third party can re-implement a verifier from RFC 9162 alone.

Hashing (RFC 9162 section 2.1.1) is SHA-256 with domain separation between leaves and
interior nodes, so that a leaf can never be passed off as a node (second-preimage attack)::

    MTH({})        = SHA-256()
    MTH({d(0)})    = SHA-256(0x00 || d(0))
    MTH(D[n])      = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))   k = largest 2^i < n

There is no duplication of an odd last node (unlike Bitcoin): an unpaired node is carried up
unchanged. Computing the tree level by level, pairing neighbours and promoting the odd last
node, yields exactly the RFC's left-balanced split, which is what makes the fast iterative
:func:`root` possible.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from vitalproof_verify.errors import MerkleError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MerkleTree",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root",
    "two_level_inclusion_proof",
    "two_level_root",
    "verify_consistency",
    "verify_inclusion",
    "verify_two_level_inclusion",
]

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
#: RFC 9162 section 2.1.1: the hash of an empty list is the hash of an empty string.
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256
# Hashing from a pre-fed copy of the prefix avoids building a 65-byte string per node; it is
# the single biggest win in pure-Python root computation (about 1.7x over concatenation).
_LEAF_CTX = _sha256(LEAF_PREFIX)
_NODE_CTX = _sha256(NODE_PREFIX)


def leaf_hash(data: bytes) -> bytes:
    """MTH of a one-element list (RFC 9162 section 2.1.1): SHA-256(0x00 || data)."""
    h = _LEAF_CTX.copy()
    h.update(data)
    return h.digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Interior node (RFC 9162 section 2.1.1): SHA-256(0x01 || left || right)."""
    h = _NODE_CTX.copy()
    h.update(left)
    h.update(right)
    return h.digest()


def _next_level(level: Sequence[bytes]) -> list[bytes]:
    """Hash neighbours pairwise; an odd last node moves up unchanged (no duplication)."""
    copy = _NODE_CTX.copy
    out: list[bytes] = []
    append = out.append
    it = iter(level)
    for left, right in zip(it, it, strict=False):
        h = copy()
        h.update(left + right)
        append(h.digest())
    if len(level) & 1:
        append(level[-1])
    return out


def _check_leaves(leaf_hashes: Sequence[bytes]) -> None:
    # A short leaf would give a root no verifier could reproduce, discovered only when a
    # proof fails months later. map(len) runs in C: a few percent of the hashing time.
    if not leaf_hashes or set(map(len, leaf_hashes)) == {HASH_SIZE}:
        return
    for i, h in enumerate(leaf_hashes):
        if len(h) != HASH_SIZE:
            raise MerkleError(f"leaf hash {i} is {len(h)} bytes, expected {HASH_SIZE}")


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH(D[n]) over already-hashed leaves (RFC 9162 section 2.1.1).

    Level by level rather than by the RFC's recursion: one tight loop per level, no Python
    call per node, and memory that halves as it climbs. Leaf hashes must be 32 bytes; a wrong
    length anywhere would silently produce a root no verifier could reproduce.
    """
    n = len(leaf_hashes)
    if n == 0:
        return EMPTY_ROOT
    _check_leaves(leaf_hashes)
    level: Sequence[bytes] = leaf_hashes
    while len(level) > 1:
        level = _next_level(level)
    return bytes(level[0])


class MerkleTree:
    """Every level of one tree, kept so that many proofs cost O(log n) each, not O(n).

    Sealing a batch produces one proof per reading; recomputing the tree for each would make
    that quadratic. Level ``k`` node ``j`` covers leaves ``[j*2^k, min((j+1)*2^k, n))``, and
    its hash is the RFC's MTH of exactly that range (odd nodes are promoted, not duplicated).
    """

    __slots__ = ("_levels",)

    def __init__(self, leaf_hashes: Sequence[bytes]) -> None:
        _check_leaves(leaf_hashes)
        levels: list[list[bytes]] = [list(leaf_hashes)]
        while len(levels[-1]) > 1:
            levels.append(_next_level(levels[-1]))
        self._levels = levels

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def root(self) -> bytes:
        return self._levels[-1][0] if self.size else EMPTY_ROOT

    def inclusion_proof(self, index: int) -> list[bytes]:
        """PATH(m, D[n]) of RFC 9162 section 2.1.3.1, leaf first, root last."""
        n = self.size
        if not 0 <= index < n:
            raise MerkleError(f"leaf index {index} outside tree of size {n}")
        path: list[bytes] = []
        for level in self._levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                path.append(level[sibling])
            index >>= 1
        return path

    def _range_hash(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for the ranges SUBPROOF visits, all of which are level nodes.

        RFC 9162's recursion only ever splits at powers of two from the left edge, so every
        range it names starts at a multiple of 2^k and either spans 2^k leaves or ends at n.
        """
        width = end - start
        k = (width - 1).bit_length()
        if start % (1 << k) or not (width == 1 << k or end == self.size):
            raise MerkleError(f"range [{start}, {end}) is not a node of the tree")
        return self._levels[k][start >> k]

    def consistency_proof(self, old_size: int) -> list[bytes]:
        """PROOF(m, D[n]) of RFC 9162 section 2.1.4.1.

        Only ``0 < old_size <= n`` is meaningful: a proof from the empty tree proves nothing
        (any tree extends it) and verifiers reject it, so it is refused here too.
        """
        n = self.size
        if not 0 < old_size <= n:
            raise MerkleError(f"no consistency proof from size {old_size} to size {n}")
        proof: list[bytes] = []
        # SUBPROOF(m, D[start:end], b), unrolled: the recursion is a walk down one edge.
        start, end, m, complete = 0, n, old_size, True
        while True:
            if m == end - start:
                if not complete:
                    proof.append(self._range_hash(start, end))
                break
            k = 1 << ((end - start - 1).bit_length() - 1)
            if m <= k:
                proof.append(self._range_hash(start + k, end))
                end = start + k
            else:
                proof.append(self._range_hash(start, start + k))
                start, m, complete = start + k, m - k, False
        proof.reverse()
        return proof


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """Audit path for one leaf (RFC 9162 section 2.1.3.1). For many, use :class:`MerkleTree`."""
    return MerkleTree(leaf_hashes).inclusion_proof(index)


def consistency_proof(leaf_hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """Proof that the first ``old_size`` leaves are a prefix of the tree (RFC 9162 2.1.4.1)."""
    return MerkleTree(leaf_hashes).consistency_proof(old_size)


def _check_path(proof: Sequence[bytes]) -> None:
    for i, p in enumerate(proof):
        if len(p) != HASH_SIZE:
            raise MerkleError(f"proof element {i} is {len(p)} bytes, expected {HASH_SIZE}")


def _mismatch(computed: bytes, expected: bytes) -> bool:
    # Constant time is not needed for public data, but it costs nothing and ends the debate.
    return not hmac.compare_digest(computed, expected)


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Raise :class:`MerkleError` unless ``proof`` puts ``leaf_hash`` at ``index`` under ``root``.

    The algorithm of RFC 9162 section 2.1.3.2, step by step, including its final ``sn == 0``
    check: that is what rejects a valid path presented with a wrong index or tree size.
    """
    if not 0 <= index < tree_size:
        raise MerkleError(f"leaf index {index} outside tree of size {tree_size}")
    if len(leaf_hash) != HASH_SIZE:
        raise MerkleError(f"leaf hash is {len(leaf_hash)} bytes, expected {HASH_SIZE}")
    _check_path(proof)
    fn, sn = index, tree_size - 1
    r = leaf_hash
    for p in proof:
        if sn == 0:
            raise MerkleError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise MerkleError("inclusion proof is shorter than the tree is deep")
    if _mismatch(r, root):
        raise MerkleError(f"inclusion proof leads to root {r.hex()}, not {root.hex()}")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Raise :class:`MerkleError` unless the tree ``new_root`` extends the tree ``old_root``.

    RFC 9162 section 2.1.4.2 assumes ``0 < first < second``; the edges are decided as the
    transparency-dev test vectors expect: equal sizes need an empty proof and equal roots,
    and a proof from size 0 is rejected because it could not prove anything (every tree
    extends the empty one), so accepting it would only hide a caller's mistake.
    """
    if old_size <= 0:
        raise MerkleError(f"consistency from tree size {old_size} proves nothing")
    if new_size < old_size:
        raise MerkleError(f"new tree size {new_size} is smaller than old size {old_size}")
    if old_size == new_size:
        if proof:
            raise MerkleError("equal tree sizes need an empty consistency proof")
        if _mismatch(old_root, new_root):
            raise MerkleError("equal tree sizes but different roots")
        return
    if not proof:
        raise MerkleError("empty consistency proof")
    _check_path(proof)
    path = list(proof)
    # Step 2: a power-of-two old tree is itself a node of the new tree, so the proof omits it.
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise MerkleError("consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise MerkleError("consistency proof is shorter than the tree is deep")
    if _mismatch(fr, old_root):
        raise MerkleError(f"consistency proof leads to old root {fr.hex()}, not {old_root.hex()}")
    if _mismatch(sr, new_root):
        raise MerkleError(f"consistency proof leads to new root {sr.hex()}, not {new_root.hex()}")


# -- two levels: a tree of subtree roots ------------------------------------------------
#
# A batch (tree version 2, docs/wire-formats.md) is two levels of plain RFC 9162 trees: each
# patient's salted leaves make one subtree, and the batch root is MTH over the subtrees'
# roots, taken as the upper tree's leaf hashes (in the order the caller fixes: patients
# sorted). Nothing here is new hashing; the functions below only compose :func:`root`,
# :class:`MerkleTree` and :func:`verify_inclusion`, which the RFC 9162 vectors check. Why two
# levels: a proof for one patient needs only that patient's leaves (recomputed from their
# rows) and the other patients' roots (32 bytes each), so nothing per reading is stored.
# Should every subtree but the last have 2^k leaves, the upper tree *is* the one-level
# RFC 9162 tree over all leaves (tests/test_merkle.py checks that against the vectors).


def two_level_root(subtree_roots: Sequence[bytes]) -> bytes:
    """The root over subtree roots (RFC 9162 section 2.1.1 MTH, the roots as leaf hashes)."""
    if not subtree_roots:
        raise MerkleError("a two-level tree needs at least one subtree")
    return root(subtree_roots)


def two_level_inclusion_proof(
    subtree_leaves: Sequence[bytes],
    subtree_roots: Sequence[bytes],
    subtree_index: int,
    leaf_index: int,
) -> tuple[list[bytes], list[bytes]]:
    """The two RFC 9162 audit paths (section 2.1.3.1) of one leaf: within its subtree, then
    of the subtree's root among ``subtree_roots``.

    Only the leaf's own subtree is needed in full; ``subtree_leaves`` must hash to
    ``subtree_roots[subtree_index]``, or the paths would prove nothing.
    """
    if not 0 <= subtree_index < len(subtree_roots):
        raise MerkleError(f"subtree index {subtree_index} outside {len(subtree_roots)} subtrees")
    lower = MerkleTree(subtree_leaves)
    if lower.size == 0:
        raise MerkleError(f"subtree {subtree_index} is empty")
    if _mismatch(lower.root(), subtree_roots[subtree_index]):
        raise MerkleError(f"the leaves given are not those of subtree {subtree_index}")
    return lower.inclusion_proof(leaf_index), MerkleTree(subtree_roots).inclusion_proof(
        subtree_index
    )


def verify_two_level_inclusion(
    leaf_hash: bytes,
    leaf_index: int,
    subtree_size: int,
    subtree_path: Sequence[bytes],
    subtree_root: bytes,
    subtree_index: int,
    subtree_count: int,
    upper_path: Sequence[bytes],
    root: bytes,
) -> None:
    """Raise :class:`MerkleError` unless ``leaf_hash`` is leaf ``leaf_index`` of a subtree
    with root ``subtree_root``, itself leaf ``subtree_index`` of the tree ``root``: two
    :func:`verify_inclusion` calls, lower level first (its message says which failed)."""
    try:
        verify_inclusion(leaf_hash, leaf_index, subtree_size, subtree_path, subtree_root)
    except MerkleError as e:
        raise MerkleError(f"subtree level: {e}") from None
    try:
        verify_inclusion(subtree_root, subtree_index, subtree_count, upper_path, root)
    except MerkleError as e:
        raise MerkleError(f"upper level: {e}") from None
