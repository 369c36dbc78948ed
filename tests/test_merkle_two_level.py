"""The two-level batch tree (tree version 2): per-patient RFC 9162 subtrees under one RFC 9162
root, against the shared RFC 9162 vectors and as properties.

Both levels are the one-level code the vectors check (``merkle.root``, ``MerkleTree``,
``verify_inclusion``): when every subtree but the last has 2^k leaves, the two-level tree is
the one-level tree over all leaves, so its root must be the vectors' root and a leaf's two
paths, end to end, the vectors' inclusion proof. The sealer's roots are checked the same way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from anchor.log import MerkleLog
from clinic.proofs import LakeView
from streams.lake.keystore import LocalKeystore
from streams.lake.layout import BATCHES_DIR
from streams.sealer import Pending, Sealer
from tests.test_merkle import VECTORS, _b64, _load, _roots_doc
from tests.test_proof_offline import _receipt
from vitalproof import hashing
from vitalproof.manifest import BatchManifest
from vitalproof.schema import SampleBatch, Transport
from vitalproof.settings import PathSettings, Settings
from vitalproof_verify import merkle
from vitalproof_verify.bundle import ProofBundle, verify_offline
from vitalproof_verify.errors import MerkleError

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z


def _vector_leaves() -> list[bytes]:
    return [merkle.leaf_hash(bytes.fromhex(x)) for x in _roots_doc()["leaf_inputs_hex"]]


def _chunks(leaves: list[bytes], width: int) -> list[list[bytes]]:
    return [leaves[i : i + width] for i in range(0, len(leaves), width)]


def test_aligned_two_level_trees_are_the_vectors_trees() -> None:
    """For every vector tree size and every power-of-two subtree width: the two-level root is
    the vectors' root, and each leaf's lower + upper path is the one-level path (itself equal
    to the vectors' happy-path proofs, tests/test_merkle.py) and verifies on both levels."""
    leaves = _vector_leaves()
    want = _roots_doc()["root_by_tree_size_hex"]
    checked = 0
    for n in range(1, len(leaves) + 1):
        for width in (1, 2, 4, 8):
            subtrees = _chunks(leaves[:n], width)
            roots = [merkle.root(s) for s in subtrees]
            assert merkle.two_level_root(roots).hex() == want[n], (n, width)
            for s, sub in enumerate(subtrees):
                for i in range(len(sub)):
                    lower, upper = merkle.two_level_inclusion_proof(sub, roots, s, i)
                    assert lower + upper == merkle.inclusion_proof(leaves[:n], s * width + i)
                    merkle.verify_two_level_inclusion(
                        sub[i], i, len(sub), lower, roots[s], s, len(roots), upper,
                        bytes.fromhex(want[n]),
                    )  # fmt: skip
                    checked += 1
    assert checked == 4 * sum(range(1, 9))


def test_two_level_paths_are_the_happy_path_vectors() -> None:
    """Each published happy-path inclusion proof over the roots.json leaves, split at every
    power-of-two subtree width, is a lower path followed by an upper path of ours."""
    leaves = _vector_leaves()
    checked = 0
    for f in sorted((VECTORS / "inclusion").rglob("happy-path.json")):
        c = _load(f)
        n, i = c["treeSize"], c["leafIdx"]
        if n > len(leaves) or _b64(c["root"]) != merkle.root(leaves[:n]):
            continue
        proof = [_b64(p) for p in c["proof"] or []]
        for width in (1, 2, 4, 8):
            subtrees = _chunks(leaves[:n], width)
            roots = [merkle.root(s) for s in subtrees]
            lower, upper = merkle.two_level_inclusion_proof(
                subtrees[i // width], roots, i // width, i % width
            )
            assert lower + upper == proof, (f, width)
            checked += 1
    assert checked >= 4


def test_the_sealer_builds_both_levels_with_the_vector_checked_root(tmp_path: Path) -> None:
    """A real seal of two patients with four readings each: every patient root is
    ``merkle.root`` over the patient's leaves (recomputed from the lake, as proofs do), the
    batch root ``merkle.root`` over those roots, and, the subtrees being 2^2 wide, the batch
    root is the one-level RFC 9162 root over all eight leaves in order."""
    settings = Settings(paths=PathSettings(home=tmp_path))
    kms = LocalKeystore(settings.paths.keys_dir)
    items = []
    for n, patient in enumerate(["pt-b", "pt-a"]):  # arrival order is not the tree's order
        b = SampleBatch(
            device_id=f"dev-{patient}",
            patient_id=patient,
            gateway_id="gw",
            transport=Transport.MQTT,
            receive_time_us=T0,
        )
        for i in (3, 1, 2, 0):  # nor within a patient
            b.add("heart_rate", "/min", T0 + i * 1_000_000, i, 60.0 + i)
        b.fill_reading_ids()
        items.append(Pending("t.vitals.clean", 0, n, b))
    manifest = Sealer(settings.lake_dir, kms).seal(items)
    # the upper tree's order: the patients' pseudonyms (the manifest's names), sorted
    assert manifest is not None
    assert manifest.patients == sorted(kms.pseudonym(p) for p in ("pt-a", "pt-b"))
    assert manifest.patient_sizes == [4, 4] and manifest.leaves_path is None
    assert manifest.patient_roots is not None
    view = LakeView(settings)
    roots = [bytes.fromhex(r) for r in manifest.patient_roots]
    subtrees = [
        view.patient_leaves(manifest, str(kms.patient_of(h)), r)
        for h, r in zip(manifest.patients, roots, strict=True)
    ]
    for sub, r in zip(subtrees, roots, strict=True):
        assert merkle.root(sub) == hashing.merkle_root(sub) == r
    batch_root = bytes.fromhex(manifest.merkle_root)
    assert merkle.two_level_root(roots) == merkle.root(roots) == batch_root
    assert merkle.root(subtrees[0] + subtrees[1]) == batch_root
    # leaf_index is the canonical order: here, by time
    table = view.table(["pt-a"]).sort_by("leaf_index")
    assert table["seq"].to_pylist() == [0, 1, 2, 3]


def test_two_level_inputs_that_are_not_a_tree_raise_merkle_error() -> None:
    leaves = _vector_leaves()
    roots = [merkle.root(leaves[:3]), merkle.root(leaves[3:])]
    with pytest.raises(MerkleError, match="at least one subtree"):
        merkle.two_level_root([])
    with pytest.raises(MerkleError, match="subtree index 2"):
        merkle.two_level_inclusion_proof(leaves[3:], roots, 2, 0)
    with pytest.raises(MerkleError, match="not those of subtree 0"):
        merkle.two_level_inclusion_proof(leaves[3:], roots, 0, 0)
    with pytest.raises(MerkleError, match="empty"):
        merkle.two_level_inclusion_proof([], [merkle.EMPTY_ROOT], 0, 0)
    with pytest.raises(MerkleError, match="leaf index 5"):
        merkle.two_level_inclusion_proof(leaves[3:], roots, 1, 5)


# -- properties -------------------------------------------------------------------------------


def _leaf(k: int, seed: int) -> bytes:
    return merkle.leaf_hash(hashlib.sha256(f"{seed}:{k}".encode()).digest())


@st.composite
def forests(draw: st.DrawFn) -> tuple[list[list[bytes]], int, int]:
    """Subtrees of 1..40 leaves, 1..20 of them, and one leaf: (subtrees, subtree, index)."""
    sizes = draw(st.lists(st.integers(1, 40), min_size=1, max_size=20))
    seed = draw(st.integers(0, 10**6))
    subtrees, k = [], 0
    for size in sizes:
        subtrees.append([_leaf(k + j, seed) for j in range(size)])
        k += size
    s = draw(st.integers(0, len(sizes) - 1))
    return subtrees, s, draw(st.integers(0, sizes[s] - 1))


def _flip(h: bytes, byte: int, bit: int) -> bytes:
    b = bytearray(h)
    b[byte % len(b)] ^= 1 << bit
    return bytes(b)


@given(forests())
def test_every_leaf_of_a_two_level_tree_verifies(case: tuple[list[list[bytes]], int, int]) -> None:
    subtrees, s, i = case
    roots = [merkle.root(t) for t in subtrees]
    top = merkle.two_level_root(roots)
    lower, upper = merkle.two_level_inclusion_proof(subtrees[s], roots, s, i)
    merkle.verify_two_level_inclusion(
        subtrees[s][i], i, len(subtrees[s]), lower, roots[s], s, len(roots), upper, top
    )
    # each level on its own is plain RFC 9162 inclusion
    merkle.verify_inclusion(subtrees[s][i], i, len(subtrees[s]), lower, roots[s])
    merkle.verify_inclusion(roots[s], s, len(roots), upper, top)


@given(forests(), st.data())
def test_any_bit_flip_in_a_two_level_proof_fails(
    case: tuple[list[list[bytes]], int, int], data: st.DataObject
) -> None:
    subtrees, s, i = case
    roots = [merkle.root(t) for t in subtrees]
    top = merkle.two_level_root(roots)
    lower, upper = merkle.two_level_inclusion_proof(subtrees[s], roots, s, i)
    args = [subtrees[s][i], i, len(subtrees[s]), lower, roots[s], s, len(roots), upper, top]
    byte, bit = data.draw(st.integers(0, 31)), data.draw(st.integers(0, 7))
    # the leaf, the subtree root, the root, or one element of either path: one bit
    targets = [0, 4, 8] + [("lower", k) for k in range(len(lower))]
    targets += [("upper", k) for k in range(len(upper))]
    target = data.draw(st.sampled_from(targets))
    bad = list(args)
    if isinstance(target, tuple):
        level, k = target
        at = 3 if level == "lower" else 7
        path = list(bad[at])  # type: ignore[call-overload]
        path[k] = _flip(path[k], byte, bit)
        bad[at] = path
    else:
        bad[target] = _flip(bad[target], byte, bit)  # type: ignore[arg-type]
    with pytest.raises(MerkleError):
        merkle.verify_two_level_inclusion(*bad)  # type: ignore[arg-type]


@given(forests(), st.integers(0, 25))
def test_a_leaf_claimed_under_another_subtree_fails(
    case: tuple[list[list[bytes]], int, int], other: int
) -> None:
    subtrees, s, i = case
    roots = [merkle.root(t) for t in subtrees]
    top = merkle.two_level_root(roots)
    lower, upper = merkle.two_level_inclusion_proof(subtrees[s], roots, s, i)
    if other == s or other >= len(roots):
        return
    with pytest.raises(MerkleError, match="upper level"):
        merkle.verify_two_level_inclusion(
            subtrees[s][i], i, len(subtrees[s]), lower, roots[s], other, len(roots), upper, top
        )


def test_a_batch_sealed_with_tree_version_1_still_exports_a_v1_bundle(tmp_path: Path) -> None:
    """A lake from before the two-level tree: its manifest names a ``.leaves`` file and no
    patient roots. Made here from a one-patient batch (whose leaf order and root are the same
    in both versions), it must still give a version-1 bundle that verifies."""
    settings = Settings(paths=PathSettings(home=tmp_path))
    kms = LocalKeystore(settings.paths.keys_dir)
    b = SampleBatch(
        device_id="dev-1", patient_id="pt-1", gateway_id="gw", transport=Transport.MQTT,
        receive_time_us=T0,
    )  # fmt: skip
    for i in range(5):
        b.add("heart_rate", "/min", T0 + i * 1_000_000, i, 60.0 + i)
    b.fill_reading_ids()
    v2 = Sealer(settings.lake_dir, kms).seal([Pending("t.vitals.clean", 0, 0, b)])
    assert v2 is not None and v2.patient_roots is not None
    view = LakeView(settings)
    leaves = view.patient_leaves(v2, "pt-1", bytes.fromhex(v2.patient_roots[0]))
    rel = f"{BATCHES_DIR}/{v2.batch_id}.leaves"
    (settings.lake_dir / rel).write_bytes(b"".join(leaves))
    v1 = BatchManifest.model_validate(
        v2.model_dump(exclude={"patient_roots", "patient_sizes"}) | {"leaves_path": rel}
    )
    assert v1.tree_version == 1 and v1.merkle_root == merkle.root(leaves).hex()
    (settings.lake_dir / BATCHES_DIR / f"{v1.batch_id}.json").write_bytes(v1.to_json_bytes())
    with MerkleLog(settings.anchor_dir / "log") as log:
        log.append(v1.batch_id, bytes.fromhex(v1.merkle_root), v1.rows)
        log.record_anchor(1, log.root(), _receipt(log.root(), 1))
    bundle = LakeView(settings).bundle(b.reading_id[3])
    assert isinstance(bundle, ProofBundle) and bundle.version == 1
    assert bundle.batch.leaf_index == 3 and bundle.batch.batch_size == 5
    verify_offline(bundle.to_json())
