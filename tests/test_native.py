"""The Rust extension (native/) gives byte for byte what the pure-Python reference gives.

Proofs, dedupe and the anchored roots all depend on these hashes, and verifiers recompute
them with anchor/ in pure Python, so every native function is checked against the
per-sample Python definitions and against the Python fast paths it replaces (selected the
way an operator would, ``VITALPROOF_NATIVE=0`` or :func:`vitalproof.hashing.configure`),
over generated inputs, the RFC 9162
vectors and one real sealed batch. The extension must be installed here: CI builds it, and
a broken build has to fail this file rather than quietly slow the worker down.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import math
import os
import random
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.lake.keystore import LocalKeystore
from streams.sealer import Pending, Sealer
from tests import test_fast_paths as fast_paths
from tests.test_merkle import VECTORS
from vitalproof import hashing
from vitalproof.hashing import canonical_leaves, salted_leaves, salts
from vitalproof.schema import SampleBatch, Transport
from vitalproof_verify import merkle
from vitalproof_verify.errors import MerkleError
from vitalproof_verify.leaves import leaf_hash_salted, reading_id

REPO = Path(__file__).resolve().parents[1]
T0 = 1_732_147_200_000_000
i64 = st.integers(-(2**63), 2**63 - 1)
hashes = st.binary(min_size=32, max_size=32)


@pytest.fixture(scope="module")
def ext() -> ModuleType:
    mod = hashing.extension()
    assert mod is not None, "vitalproof_native is not installed: make install builds it"
    return mod


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Run the block on the pure-Python path, switched as the CLI switches it from settings."""
    hashing.configure(native=False)
    try:
        yield
    finally:
        hashing.configure(native=True)


def test_extension_is_installed_and_used(ext: ModuleType) -> None:
    assert ext.__name__ == "vitalproof_native"
    assert hashing.backend().name == "native"
    with reference_only():
        assert hashing.backend().name == "reference"
    assert hashing.backend().name == "native"


@st.composite
def columns(draw: st.DrawFn, numbers: st.SearchStrategy[int] = i64) -> SampleBatch:
    """A device's samples in runs of one metric, as series arrive (metrics may repeat)."""
    b = SampleBatch(device_id=draw(st.text(max_size=12)))
    for _ in range(draw(st.integers(0, 4))):
        metric = draw(st.one_of(st.sampled_from(["heart_rate", "spo2"]), st.text(max_size=8)))
        for _ in range(draw(st.integers(1, 6))):
            b.add(metric, "/min", draw(numbers), draw(numbers), 1.0)
    return b


def _reference_ids(b: SampleBatch) -> list[str]:
    return [
        reading_id(b.device_id, m, s, t)
        for m, s, t in zip(b.metric, b.seq, b.device_time_us, strict=True)
    ]


@settings(max_examples=300, deadline=None)
@given(columns())
def test_reading_ids_equal_reference(ext: ModuleType, b: SampleBatch) -> None:
    want = _reference_ids(b)
    assert ext.reading_ids(b.device_id, b.metric, b.seq, b.device_time_us) == want
    b.fill_reading_ids()
    assert b.reading_id == want
    with reference_only():
        b.reading_id = []
        b.fill_reading_ids()
        assert b.reading_id == want


@settings(max_examples=100, deadline=None)
@given(columns(st.one_of(st.integers(-(2**80), 2**80), st.booleans())))
def test_reading_ids_outside_i64_fall_back_to_python(ext: ModuleType, b: SampleBatch) -> None:
    """f"{True}" is "True" and Python ints have no width: such samples take the Python path."""
    b.fill_reading_ids()
    assert b.reading_id == _reference_ids(b)


def test_reading_ids_reject_unequal_columns(ext: ModuleType) -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        ext.reading_ids("d", ["heart_rate", "heart_rate"], [1, 2], [T0])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=130), st.lists(st.text(max_size=40), max_size=20))
def test_salts_equal_hmac(ext: ModuleType, key: bytes, ids: list[str]) -> None:
    """Keys longer than the SHA-256 block (64 bytes) are hashed first, as RFC 2104 says."""
    want = [hmac.new(key, rid.encode(), hashlib.sha256).digest() for rid in ids]
    assert ext.salts(key, ids) == want
    assert salts(key, ids) == want
    with reference_only():
        assert salts(key, ids) == want


def test_salts_of_unencodable_id_fail_like_python(ext: ModuleType) -> None:
    with pytest.raises(UnicodeEncodeError):
        salts(b"k" * 32, ["ok", "\udcff"])
    with reference_only(), pytest.raises(UnicodeEncodeError):
        salts(b"k" * 32, ["ok", "\udcff"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(hashes, st.binary(max_size=300)), max_size=20))
def test_salted_leaves_equal_leaf_hash_salted(
    ext: ModuleType, pairs: list[tuple[bytes, bytes]]
) -> None:
    salts, data = [s for s, _ in pairs], [d for _, d in pairs]
    want = [leaf_hash_salted(s, d) for s, d in pairs]
    assert ext.salted_leaves(salts, data) == want
    assert salted_leaves(salts, data) == want
    assert salted_leaves(salts, [bytearray(d) for d in data]) == want  # Python path
    with reference_only():
        assert salted_leaves(salts, data) == want


def test_salted_leaves_reject_unequal_columns(ext: ModuleType) -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        ext.salted_leaves([b"s" * 32], [])


@settings(max_examples=200, deadline=None)
@given(st.lists(hashes, max_size=70))
def test_root_and_levels_equal_anchor_merkle(ext: ModuleType, leaves: list[bytes]) -> None:
    assert ext.merkle_root(leaves) == merkle.root(leaves)
    levels = ext.merkle_levels(leaves)
    if leaves:
        tree = merkle.MerkleTree(leaves)
        assert levels == [b"".join(level) for level in tree._levels]
        assert levels[-1] == tree.root()


@pytest.mark.parametrize("n", [1, 2, 3, 1023, 1024, 1025, 4097])
def test_root_equal_anchor_merkle_at_power_of_two_edges(ext: ModuleType, n: int) -> None:
    leaves = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(n)]
    assert ext.merkle_root(leaves) == merkle.root(leaves)


def test_root_refuses_short_leaf(ext: ModuleType) -> None:
    with pytest.raises(ValueError, match="leaf hash 1 is 31 bytes, expected 32"):
        ext.merkle_root([b"a" * 32, b"b" * 31])


def test_rfc9162_roots_through_native(ext: ModuleType) -> None:
    doc = json.loads((VECTORS / "roots.json").read_text())
    leaves = [merkle.leaf_hash(bytes.fromhex(x)) for x in doc["leaf_inputs_hex"]]
    expected = doc["root_by_tree_size_hex"]
    assert len(expected) == len(leaves) + 1 == 9
    for n, want in enumerate(expected):
        assert ext.merkle_root(leaves[:n]).hex() == want, n
        assert ext.merkle_levels(leaves[:n])[-1].hex() == (want if n else ""), n


def test_rfc9162_proof_vectors_name_the_native_roots(ext: ModuleType) -> None:
    """Every published happy path over the shared leaves names the root computed natively."""
    leaves = [
        merkle.leaf_hash(bytes.fromhex(x))
        for x in json.loads((VECTORS / "roots.json").read_text())["leaf_inputs_hex"]
    ]
    checked = 0
    for f in sorted((VECTORS / "inclusion").rglob("happy-path.json")):
        c = json.loads(f.read_text())
        n, i = c["treeSize"], c["leafIdx"]
        assert base64.b64decode(c["leafHash"]) == leaves[i], f
        root = ext.merkle_root(leaves[:n])
        assert base64.b64decode(c["root"]) == root, f
        proof = [base64.b64decode(p) for p in c["proof"] or []]
        merkle.verify_inclusion(leaves[i], i, n, proof, root)
        checked += 1
    for f in sorted((VECTORS / "consistency").rglob("happy-path.json")):
        c = json.loads(f.read_text())
        m, n = c["size1"], c["size2"]
        assert base64.b64decode(c["root1"]) == ext.merkle_root(leaves[:m]), f
        assert base64.b64decode(c["root2"]) == ext.merkle_root(leaves[:n]), f
        checked += 1
    assert checked >= 8


def _items(n_patients: int, per_device: int) -> list[Pending]:
    items = []
    for k in range(n_patients * 2):
        b = SampleBatch(
            device_id=f"dev-{k}",
            patient_id=f"pt-{k % n_patients}",
            gateway_id="gw",
            transport=Transport.MQTT,
            receive_time_us=T0,
        )
        for i in range(per_device):
            b.add("heart_rate", "/min", T0 + i * 10**6, i, float(60 + i % 40), i % 3)
            b.add("spo2", "%", T0 + i * 10**6, i, float(90 + i % 10))
        b.fill_reading_ids()
        items.append(Pending("t.vitals.clean", 0, k, b))
    return items


def test_sealed_batch_is_identical_with_and_without_native(ext: ModuleType, tmp_path: Path) -> None:
    """One real seal (keystore, encrypted files, patient roots, manifest) on each path: same
    roots."""
    kms = LocalKeystore(tmp_path / "keys")
    fast = Sealer(tmp_path / "lake-native", kms).seal(_items(3, 500))
    with reference_only():
        slow = Sealer(tmp_path / "lake-python", kms).seal(_items(3, 500))
    assert fast is not None and slow is not None
    assert fast.rows == slow.rows == 6000  # 6 devices, 500 x 2 metrics
    assert fast.merkle_root == slow.merkle_root
    assert fast.patient_roots == slow.patient_roots and fast.patient_roots is not None
    assert fast.patient_sizes == slow.patient_sizes == [2000, 2000, 2000]
    assert merkle.root([bytes.fromhex(r) for r in fast.patient_roots]).hex() == fast.merkle_root


def test_missing_extension_falls_back_with_one_warning() -> None:
    """A process where the module cannot be imported: same ids and salts, one warning line."""
    script = """
import logging, sys
sys.modules["vitalproof_native"] = None  # what an uninstalled or broken build looks like
logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
from vitalproof.hashing import salts
from vitalproof.schema import SampleBatch
from vitalproof_verify.leaves import reading_id
b = SampleBatch(device_id="dev-1")
b.add("heart_rate", "/min", 1732147200000000, 17, 72.0)
b.fill_reading_ids()
b.fill_reading_ids()
assert b.reading_id == [reading_id("dev-1", "heart_rate", 17, 1732147200000000)]
print(salts(b"k" * 32, b.reading_id)[0].hex())
"""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    rid = reading_id("dev-1", "heart_rate", 17, T0)
    assert out.stdout.strip() == hmac.new(b"k" * 32, rid.encode(), hashlib.sha256).hexdigest()
    warnings = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1, out.stderr
    assert warnings[0].startswith("WARNING vitalproof.hashing: vitalproof_native is not importable")
    assert "pure-Python reference" in warnings[0]


def _reference_leaves(b: SampleBatch, salts: list[bytes]) -> list[bytes]:
    """The definition: leaf_hash_salted(salt, canonical_reading_bytes(reading)) per reading."""
    canonical = fast_paths.reference_canonical(b)
    return [leaf_hash_salted(s, c) for s, c in zip(salts, canonical, strict=True)]


def _salts(n: int) -> list[bytes]:
    return [hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(n)]


@settings(max_examples=400, deadline=None)
@given(fast_paths.batches())
def test_canonical_leaves_equal_reference(ext: ModuleType, b: SampleBatch) -> None:
    """Any device, patient, metric, unit and id text (escapes fall back to Python), any
    64-bit numbers, NaN as null: the native leaves are the definition's, byte for byte."""
    salts = _salts(len(b))
    want = _reference_leaves(b, salts)
    assert canonical_leaves(salts, b) == want
    with reference_only():
        assert canonical_leaves(salts, b) == want


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=8))
def test_canonical_leaves_spell_floats_as_python_repr(ext: ModuleType, vals: list[float]) -> None:
    b = _one_series(vals)
    assert canonical_leaves(_salts(len(b)), b) == _reference_leaves(b, _salts(len(b)))


def test_canonical_leaves_spell_random_doubles_as_python_repr(ext: ModuleType) -> None:
    """200,000 doubles drawn uniformly over bit patterns (every exponent, subnormals), 50,000
    with few significant bits (exact ties, rounded to even), and the layout edges of
    ``float.__repr__``: one digit spelled differently would break every proof."""
    rng = random.Random(9162)
    vals = [
        struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0] for _ in range(200_000)
    ]
    vals = [v for v in vals if math.isfinite(v)]
    # few significant bits: where exact ties between two shortest spellings live
    vals += [rng.randint(-(2**40), 2**40) / 2 ** rng.randint(0, 30) for _ in range(50_000)]
    vals += [0.0, -0.0, 1e-4, 1e-5, 9.999999999999999e-5, 1e15, 1e16, 9999999999999998.0]
    vals += [1e16 - 2, 2e16 + 8, 5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308]
    vals += [0.1 * k for k in range(-2000, 2000)] + [k / 100 for k in range(3000, 4500)]
    b = _one_series(vals)
    salts = _salts(len(b))
    got = canonical_leaves(salts, b)
    with reference_only():
        want = canonical_leaves(salts, b)
    bad = [v for v, g, w in zip(vals, got, want, strict=True) if g != w]
    assert not bad, f"{len(bad)} values spelled unlike repr(), e.g. {bad[:5]}"


def test_canonical_leaves_refuse_infinity_like_json(ext: ModuleType) -> None:
    b = _one_series([1.0, math.inf])
    with pytest.raises(ValueError, match="not JSON compliant"):
        canonical_leaves(_salts(2), b)
    with reference_only(), pytest.raises(ValueError, match="not JSON compliant"):
        canonical_leaves(_salts(2), b)


def test_canonical_leaves_check_their_inputs(ext: ModuleType) -> None:
    b = _one_series([1.0, 2.0])
    device, patient, runs = b.canonical_parts()
    cols = (b.device_time_us, b.quality, b.reading_id, b.seq, b.value)
    with pytest.raises(ValueError, match="equal lengths"):
        ext.canonical_leaves(_salts(1), device, patient, runs, *cols)
    with pytest.raises(ValueError, match="tile"):
        ext.canonical_leaves(_salts(2), device, patient, [(*runs[0][:2], 1, 2)], *cols)
    with pytest.raises(ValueError, match="cover 1 of 2"):
        ext.canonical_leaves(_salts(2), device, patient, [(*runs[0][:2], 0, 1)], *cols)
    with pytest.raises(MerkleError, match="32 bytes"):
        canonical_leaves([b"short", b"salt"], b)


def _one_series(vals: list[float]) -> SampleBatch:
    b = SampleBatch(device_id="dev-1", patient_id="pt-1")
    for i, v in enumerate(vals):
        b.add("skin_temperature", "Cel", T0 + i, i, v)
    b.fill_reading_ids()
    return b
