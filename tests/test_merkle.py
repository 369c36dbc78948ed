"""vitalproof_verify.merkle against the shared RFC 9162 vectors and an independent recursive
reference.

The vectors live outside the repo (``$VITALPROOF_SHARED/vectors/rfc9162``, default
``<repo>/../shared``). If they are missing the suite fails: a verifier that was never checked
against the published vectors must not look green.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vitalproof_verify import leaves, merkle
from vitalproof_verify.errors import MerkleError

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VITALPROOF_SHARED", REPO.parent / "shared"))
VECTORS = SHARED / "vectors" / "rfc9162"

# Counted once from the published set; a vanished or half-copied folder must not pass.
EXPECTED_INCLUSION_CASES = 98
EXPECTED_CONSISTENCY_CASES = 98


def _case_files(kind: str) -> list[Any]:
    files = sorted((VECTORS / kind).rglob("*.json"))
    if not files:
        # An empty parametrize would be skipped; a single failing case is what we want.
        return [pytest.param(None, id=f"{kind}-vectors-missing")]
    return [pytest.param(f, id=str(f.relative_to(VECTORS / kind))) for f in files]


def _b64(value: str | None) -> bytes:
    return base64.b64decode(value or "")


def _load(path: Path | None) -> dict[str, Any]:
    assert path is not None, f"RFC 9162 vectors not found under {VECTORS}"
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def test_vector_folder_is_complete() -> None:
    assert VECTORS.is_dir(), f"RFC 9162 vectors not found under {VECTORS}"
    assert len(list((VECTORS / "inclusion").rglob("*.json"))) == EXPECTED_INCLUSION_CASES
    assert len(list((VECTORS / "consistency").rglob("*.json"))) == EXPECTED_CONSISTENCY_CASES
    assert (VECTORS / "roots.json").is_file()


@pytest.mark.parametrize("path", _case_files("inclusion"))
def test_inclusion_vector(path: Path | None) -> None:
    c = _load(path)
    args = (
        _b64(c["leafHash"]),
        c["leafIdx"],
        c["treeSize"],
        [_b64(p) for p in c["proof"] or []],
        _b64(c["root"]),
    )
    if c["wantErr"]:
        with pytest.raises(MerkleError):
            merkle.verify_inclusion(*args)
    else:
        merkle.verify_inclusion(*args)


@pytest.mark.parametrize("path", _case_files("consistency"))
def test_consistency_vector(path: Path | None) -> None:
    c = _load(path)
    args = (
        c["size1"],
        c["size2"],
        _b64(c["root1"]),
        _b64(c["root2"]),
        [_b64(p) for p in c["proof"] or []],
    )
    if c["wantErr"]:
        with pytest.raises(MerkleError):
            merkle.verify_consistency(*args)
    else:
        merkle.verify_consistency(*args)


def _roots_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((VECTORS / "roots.json").read_text())
    return doc


def test_roots_json() -> None:
    doc = _roots_doc()
    assert (doc["hash"], doc["leaf_prefix"], doc["node_prefix"]) == ("sha256", "00", "01")
    leaves = [merkle.leaf_hash(bytes.fromhex(x)) for x in doc["leaf_inputs_hex"]]
    expected = doc["root_by_tree_size_hex"]
    assert len(expected) == len(leaves) + 1
    for n, want in enumerate(expected):
        assert merkle.root(leaves[:n]).hex() == want, n
        if n:
            assert merkle.MerkleTree(leaves[:n]).root().hex() == want, n
    assert merkle.root([]) == hashlib.sha256(b"").digest() == merkle.EMPTY_ROOT


def test_generated_proofs_equal_happy_path_vectors() -> None:
    """Our prover, not only our verifier, must produce what the reference implementation did."""
    leaves = [merkle.leaf_hash(bytes.fromhex(x)) for x in _roots_doc()["leaf_inputs_hex"]]
    checked = 0
    for f in sorted((VECTORS / "inclusion").rglob("happy-path.json")):
        c = _load(f)
        n, i = c["treeSize"], c["leafIdx"]
        if n <= len(leaves) and _b64(c["root"]) == merkle.root(leaves[:n]):
            assert _b64(c["leafHash"]) == leaves[i]
            want = [_b64(p) for p in c["proof"] or []]
            assert merkle.inclusion_proof(leaves[:n], i) == want, f
            checked += 1
    for f in sorted((VECTORS / "consistency").rglob("happy-path.json")):
        c = _load(f)
        m, n = c["size1"], c["size2"]
        if n <= len(leaves) and _b64(c["root2"]) == merkle.root(leaves[:n]):
            want = [_b64(p) for p in c["proof"] or []]
            assert merkle.consistency_proof(leaves[:n], m) == want, f
            checked += 1
    assert checked >= 8


# -- an independent reference: RFC 9162's recursive definitions, transcribed literally ------


def _split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_root(leaves: Sequence[bytes]) -> bytes:
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaves[0]
    k = _split(n)
    return hashlib.sha256(b"\x01" + ref_root(leaves[:k]) + ref_root(leaves[k:])).digest()


def ref_path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return [*ref_path(m, leaves[:k]), ref_root(leaves[k:])]
    return [*ref_path(m - k, leaves[k:]), ref_root(leaves[:k])]


def ref_subproof(m: int, leaves: Sequence[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [ref_root(leaves)]
    k = _split(n)
    if m <= k:
        return [*ref_subproof(m, leaves[:k], complete), ref_root(leaves[k:])]
    return [*ref_subproof(m - k, leaves[k:], False), ref_root(leaves[:k])]


def _h(a: bytes, b: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + a + b).digest()


def ref_verifies_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Walk the RFC's recursive split from the top, eating the path from its end."""
    if not 0 <= index < size or any(len(p) != 32 for p in proof):
        return False
    stack = list(proof)

    def walk(lo: int, hi: int) -> bytes | None:
        if hi - lo == 1:
            return leaf
        if not stack:
            return None
        sib, k = stack.pop(), _split(hi - lo)
        if index < lo + k:
            r = walk(lo, lo + k)
            return None if r is None else _h(r, sib)
        r = walk(lo + k, hi)
        return None if r is None else _h(sib, r)

    got = walk(0, size)
    return got is not None and not stack and got == root


def ref_verifies_consistency(
    m: int, n: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    if m <= 0 or n < m or any(len(p) != 32 for p in proof):
        return False
    if m == n:
        return not proof and old_root == new_root
    stack = list(proof)

    def walk(m: int, size: int, complete: bool) -> tuple[bytes, bytes] | None:
        if m == size:
            if complete:
                return old_root, old_root
            if not stack:
                return None
            x = stack.pop()
            return x, x
        if not stack:
            return None
        sib, k = stack.pop(), _split(size)
        if m <= k:
            r = walk(m, k, complete)
            return None if r is None else (r[0], _h(r[1], sib))
        r = walk(m - k, size - k, False)
        return None if r is None else (_h(sib, r[0]), _h(sib, r[1]))

    got = walk(m, n, True)
    return got is not None and not stack and got == (old_root, new_root)


def _inclusion_ok(*args: Any) -> bool:
    try:
        merkle.verify_inclusion(*args)
    except MerkleError:
        return False
    return True


def _consistency_ok(*args: Any) -> bool:
    try:
        merkle.verify_consistency(*args)
    except MerkleError:
        return False
    return True


def _leaves(n: int, seed: int = 0) -> list[bytes]:
    return [merkle.leaf_hash(f"{seed}:{i}".encode()) for i in range(n)]


def _flip(data: bytes, byte: int, bit: int) -> bytes:
    b = bytearray(data)
    b[byte] ^= 1 << bit
    return bytes(b)


# -- properties -----------------------------------------------------------------------------


def test_root_matches_reference_for_every_small_size() -> None:
    for n in range(0, 130):
        leaves = _leaves(n, seed=n)
        assert merkle.root(leaves) == ref_root(leaves), n


@given(st.lists(st.binary(min_size=32, max_size=32), min_size=0, max_size=300))
def test_root_matches_reference(leaves: list[bytes]) -> None:
    assert merkle.root(leaves) == ref_root(leaves)


def test_every_proof_of_small_trees_matches_reference() -> None:
    for n in range(1, 40):
        leaves = _leaves(n, seed=n)
        tree = merkle.MerkleTree(leaves)
        r = tree.root()
        for i in range(n):
            path = tree.inclusion_proof(i)
            assert path == ref_path(i, leaves), (n, i)
            merkle.verify_inclusion(leaves[i], i, n, path, r)
        for m in range(1, n + 1):
            proof = tree.consistency_proof(m)
            assert proof == ref_subproof(m, leaves, True), (m, n)
            merkle.verify_consistency(m, n, ref_root(leaves[:m]), r, proof)


@st.composite
def tree_and_index(draw: st.DrawFn) -> tuple[list[bytes], int]:
    n = draw(st.integers(min_value=1, max_value=600))
    return _leaves(n, seed=draw(st.integers(0, 1000))), draw(st.integers(0, n - 1))


@given(tree_and_index())
def test_inclusion_proofs_verify(case: tuple[list[bytes], int]) -> None:
    leaves, i = case
    path = merkle.inclusion_proof(leaves, i)
    assert path == ref_path(i, leaves)
    merkle.verify_inclusion(leaves[i], i, len(leaves), path, merkle.root(leaves))


@given(tree_and_index(), st.data())
def test_inclusion_fails_when_any_proof_bit_changes(
    case: tuple[list[bytes], int], data: st.DataObject
) -> None:
    leaves, i = case
    n, r = len(leaves), merkle.root(leaves)
    path = merkle.inclusion_proof(leaves, i)
    byte, bit = data.draw(st.integers(0, 31)), data.draw(st.integers(0, 7))
    with pytest.raises(MerkleError):
        merkle.verify_inclusion(_flip(leaves[i], byte, bit), i, n, path, r)
    with pytest.raises(MerkleError):
        merkle.verify_inclusion(leaves[i], i, n, path, _flip(r, byte, bit))
    if path:
        k = data.draw(st.integers(0, len(path) - 1))
        bad = [*path[:k], _flip(path[k], byte, bit), *path[k + 1 :]]
        with pytest.raises(MerkleError):
            merkle.verify_inclusion(leaves[i], i, n, bad, r)
        with pytest.raises(MerkleError):
            merkle.verify_inclusion(leaves[i], i, n, path[:k] + path[k + 1 :], r)
    with pytest.raises(MerkleError):
        merkle.verify_inclusion(leaves[i], i, n, [*path, r], r)


@given(tree_and_index(), st.integers(-5, 1300), st.integers(-5, 1300))
def test_inclusion_with_other_index_or_size_agrees_with_reference(
    case: tuple[list[bytes], int], other_index: int, other_size: int
) -> None:
    """A different index always fails. A different size fails unless the leaf's place in the
    RFC split is identical (tree size is not hashed into a path: RFC 9162 leaves binding it to
    the signed tree head), so the implementation must agree with the reference exactly."""
    leaves, i = case
    n, r = len(leaves), merkle.root(leaves)
    path = merkle.inclusion_proof(leaves, i)
    if other_index != i:
        assert not _inclusion_ok(leaves[i], other_index, n, path, r)
    assume(other_size != n)
    got = _inclusion_ok(leaves[i], i, other_size, path, r)
    assert got == ref_verifies_inclusion(leaves[i], i, other_size, path, r)


@st.composite
def tree_and_old_size(draw: st.DrawFn) -> tuple[list[bytes], int]:
    n = draw(st.integers(min_value=1, max_value=600))
    return _leaves(n, seed=draw(st.integers(0, 1000))), draw(st.integers(1, n))


@given(tree_and_old_size())
def test_consistency_proofs_verify(case: tuple[list[bytes], int]) -> None:
    leaves, m = case
    proof = merkle.consistency_proof(leaves, m)
    assert proof == ref_subproof(m, leaves, True)
    merkle.verify_consistency(m, len(leaves), merkle.root(leaves[:m]), merkle.root(leaves), proof)


@given(tree_and_old_size(), st.data())
def test_consistency_fails_when_mutated(case: tuple[list[bytes], int], data: st.DataObject) -> None:
    leaves, m = case
    n = len(leaves)
    old, new = merkle.root(leaves[:m]), merkle.root(leaves)
    proof = merkle.consistency_proof(leaves, m)
    byte, bit = data.draw(st.integers(0, 31)), data.draw(st.integers(0, 7))
    with pytest.raises(MerkleError):
        merkle.verify_consistency(m, n, _flip(old, byte, bit), new, proof)
    with pytest.raises(MerkleError):
        merkle.verify_consistency(m, n, old, _flip(new, byte, bit), proof)
    if m < n:
        with pytest.raises(MerkleError):
            merkle.verify_consistency(m, n, new, old, proof)
    if proof:
        k = data.draw(st.integers(0, len(proof) - 1))
        bad = [*proof[:k], _flip(proof[k], byte, bit), *proof[k + 1 :]]
        with pytest.raises(MerkleError):
            merkle.verify_consistency(m, n, old, new, bad)
        with pytest.raises(MerkleError):
            merkle.verify_consistency(m, n, old, new, proof[:k] + proof[k + 1 :])
    with pytest.raises(MerkleError):
        merkle.verify_consistency(m, n, old, new, [*proof, new])


@given(tree_and_old_size(), st.integers(-3, 1300), st.integers(-3, 1300))
def test_consistency_with_other_sizes_agrees_with_reference(
    case: tuple[list[bytes], int], m2: int, n2: int
) -> None:
    leaves, m = case
    n = len(leaves)
    old, new = merkle.root(leaves[:m]), merkle.root(leaves)
    proof = merkle.consistency_proof(leaves, m)
    assume((m2, n2) != (m, n))
    for sizes in ((m2, n), (m, n2), (m2, n2)):
        got = _consistency_ok(*sizes, old, new, proof)
        assert got == ref_verifies_consistency(*sizes, old, new, proof), sizes


def test_tampered_prefix_is_not_consistent() -> None:
    leaves = _leaves(37)
    for m in range(1, 37):
        forged = list(leaves)
        forged[m - 1] = merkle.leaf_hash(b"rewritten")
        proof = merkle.consistency_proof(forged, m)
        with pytest.raises(MerkleError):
            merkle.verify_consistency(m, 37, merkle.root(leaves[:m]), merkle.root(forged), proof)


# -- edges and input checks -----------------------------------------------------------------


def test_salted_leaf_is_prefix_salt_canonical() -> None:
    salt = bytes(range(32))
    assert leaves.leaf_hash_salted(salt, b"{}") == hashlib.sha256(b"\x00" + salt + b"{}").digest()
    assert leaves.leaf_hash_salted(salt, b"{}") == merkle.leaf_hash(salt + b"{}")
    for bad in (b"", bytes(16), bytes(33)):
        with pytest.raises(MerkleError):
            leaves.leaf_hash_salted(bad, b"{}")


def test_node_and_leaf_hashes_are_domain_separated() -> None:
    a, b = merkle.leaf_hash(b"a"), merkle.leaf_hash(b"b")
    assert merkle.node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()
    assert merkle.leaf_hash(a + b) != merkle.node_hash(a, b)


def test_bad_inputs_raise_merkle_error() -> None:
    leaves = _leaves(5)
    with pytest.raises(MerkleError):
        merkle.root([*leaves, b"short"])
    for i in (-1, 5):
        with pytest.raises(MerkleError):
            merkle.inclusion_proof(leaves, i)
    for m in (0, 6, -1):
        with pytest.raises(MerkleError):
            merkle.consistency_proof(leaves, m)
    with pytest.raises(MerkleError):
        merkle.inclusion_proof([], 0)


@settings(max_examples=20)
@given(st.integers(min_value=1, max_value=5000))
def test_tree_object_matches_functions_on_larger_trees(n: int) -> None:
    leaves = _leaves(n)
    tree = merkle.MerkleTree(leaves)
    assert tree.root() == merkle.root(leaves)
    for i in {0, n // 3, n - 1}:
        merkle.verify_inclusion(leaves[i], i, n, tree.inclusion_proof(i), tree.root())
    for m in {1, n // 2 or 1, n}:
        merkle.verify_consistency(
            m, n, merkle.root(leaves[:m]), tree.root(), tree.consistency_proof(m)
        )
