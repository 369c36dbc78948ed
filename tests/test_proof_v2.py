"""Version-2 bundles (two-level batch tree): built from per-patient subtrees and a log, checked
by the kit, and broken every way the version-1 tests break version 1 (tests/test_proof_offline.py,
which keeps testing version 1).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anchor.bundles import build_bundle_v2
from anchor.errors import AnchorError
from anchor.log import MerkleLog
from tests.test_proof_offline import (
    OLD_BUNDLE,
    READINGS,
    _flip_hex,
    _get,
    _receipt,
    _salt,
    _set,
    check_one_character_edit,
)
from vitalproof_verify import merkle
from vitalproof_verify.bundle import (
    ProofBundle,
    ProofBundleV2,
    Reading,
    bundle_schema,
    load_bundle,
    verify_offline,
)
from vitalproof_verify.errors import ProofError, ProofFailure
from vitalproof_verify.leaves import leaf_hash_salted

SCHEMA = bundle_schema(2)
BATCH_ID = "batch-three-patients-0001"
Doc = dict[str, Any]
#: The 13 readings as three patients' subtrees of 5, 1 and 7 leaves (patients sorted).
SPLIT = [(0, 5), (5, 6), (6, 13)]


class World:
    def __init__(self, log: MerkleLog) -> None:
        self.log = log
        self.subtrees = [
            [leaf_hash_salted(_salt(r.reading_id), r.canonical_bytes()) for r in READINGS[a:b]]
            for a, b in SPLIT
        ]
        self.roots = [merkle.root(s) for s in self.subtrees]

    def bundle(self, patient: int, i: int, **change: Any) -> ProofBundleV2:
        a, _ = SPLIT[patient]
        r = READINGS[a + i]
        args: Doc = dict(
            reading=r, salt=_salt(r.reading_id), batch_id=BATCH_ID,
            patient_leaves=self.subtrees[patient], leaf_index=i, patient_roots=self.roots,
            patient_index=patient, batch_size=len(READINGS), log=self.log,
        )  # fmt: skip
        return build_bundle_v2(**(args | change))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with MerkleLog(tmp_path_factory.mktemp("log")) as log:
        w = World(log)
        for i in range(2):
            log.append(f"other-{i}", hashlib.sha256(bytes([i])).digest(), 100 + i)
        log.append(BATCH_ID, merkle.two_level_root(w.roots), len(READINGS))
        log.append("other-2", hashlib.sha256(b"2").digest(), 102)
        log.record_anchor(4, log.root(), _receipt(log.root(), 4))
        yield w


@pytest.fixture(scope="module")
def doc(world: World) -> Doc:
    d: Doc = json.loads(world.bundle(2, 3).to_json())  # leaf 3 of 7, patient 2 of 3
    return d


def _failure(d: Doc) -> ProofFailure | None:
    try:
        verify_offline(json.dumps(d).encode())
    except ProofError as e:
        return e.failure
    return None


def test_every_reading_of_every_patient_gets_a_v2_bundle_that_verifies(world: World) -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    for p, (a, b) in enumerate(SPLIT):
        for i in range(b - a):
            bundle = world.bundle(p, i)
            data = bundle.to_json()
            verify_offline(data)
            loaded = load_bundle(data)
            assert isinstance(loaded, ProofBundleV2) and loaded == bundle
            assert loaded.to_json() == data  # one serialisation per proof
            validator.validate(json.loads(data))
            assert not jsonschema.Draft202012Validator(bundle_schema(1)).is_valid(json.loads(data))
            assert (bundle.patient.leaf_index, bundle.patient.size) == (i, b - a)
            assert (bundle.batch.patient_index, bundle.batch.patient_count) == (p, 3)
            assert bundle.patient.root == world.roots[p].hex()
            assert bundle.batch.batch_size == 13 and bundle.log.leaf_index == 2


def test_v2_bundle_layout(doc: Doc) -> None:
    assert list(doc) == [
        "version", "reading", "salt", "leaf_hash", "patient", "batch", "log", "anchor",
    ]  # fmt: skip
    assert doc["version"] == 2
    assert list(doc["patient"]) == ["root", "size", "leaf_index", "path"]
    assert list(doc["batch"]) == [
        "batch_id", "batch_root", "batch_size", "patient_index", "patient_count", "path",
    ]  # fmt: skip
    assert len(doc["patient"]["path"]) == 3 and len(doc["batch"]["path"]) == 1


def test_both_versions_load_and_verify() -> None:
    old = load_bundle(OLD_BUNDLE.read_bytes())
    assert isinstance(old, ProofBundle) and old.version == 1
    verify_offline(old)


HASH_FIELDS: dict[str, ProofFailure] = {
    "salt": ProofFailure.WRONG_LEAF,
    "leaf_hash": ProofFailure.WRONG_LEAF,
    "patient.root": ProofFailure.WRONG_PATIENT_PATH,
    "patient.path": ProofFailure.WRONG_PATIENT_PATH,
    "batch.batch_root": ProofFailure.WRONG_BATCH_PATH,
    "batch.path": ProofFailure.WRONG_BATCH_PATH,
    "log.root": ProofFailure.WRONG_LOG_PATH,
    "log.path": ProofFailure.WRONG_LOG_PATH,
    "anchor.root": ProofFailure.ROOT_NOT_ON_CHAIN,
}


def test_flipping_any_bit_of_any_hash_fails_with_the_matching_reason(doc: Doc) -> None:
    assert _failure(doc) is None
    checked = 0
    for field, reason in HASH_FIELDS.items():
        value = _get(doc, field)
        slots = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for slot, hexval in slots:
            for byte in range(32):
                for bit in (0, 3, 4, 7):
                    bad = _flip_hex(hexval, byte, bit)
                    if slot is None:
                        mutated = _set(doc, field, bad)
                    else:
                        mutated = _set(doc, field, [*value[:slot], bad, *value[slot + 1 :]])
                    assert _failure(mutated) == reason, (field, slot, byte, bit)
                    checked += 1
    assert checked == (6 + 3 + 1 + 2) * 32 * 4


@pytest.mark.parametrize(
    ("field", "reason"),
    [
        ("patient.path", ProofFailure.WRONG_PATIENT_PATH),
        ("batch.path", ProofFailure.WRONG_BATCH_PATH),
    ],
)
def test_reshaped_paths_fail(doc: Doc, field: str, reason: ProofFailure) -> None:
    path: list[str] = _get(doc, field)
    variants = [path[:-1], [*path, path[-1]], [path[0], *path], []]
    variants += [[*path[:k], "00" * 32, *path[k:]] for k in range(len(path) + 1)]
    if len(path) > 1:
        variants.append(path[::-1])
    for v in variants:
        assert _failure(_set(doc, field, v)) == reason, v


def test_moving_a_sibling_between_the_levels_fails(doc: Doc) -> None:
    """The split point is not free: the patient root must be the lower path's result."""
    lower, upper = doc["patient"]["path"], doc["batch"]["path"]
    moved = _set(_set(doc, "patient.path", lower[:-1]), "batch.path", [lower[-1], *upper])
    assert _failure(moved) == ProofFailure.WRONG_PATIENT_PATH


def test_wrong_indexes_and_sizes(doc: Doc) -> None:
    for i in range(7):
        if i != 3:
            got = _failure(_set(doc, "patient.leaf_index", i))
            assert got == ProofFailure.WRONG_PATIENT_PATH, i
    for p in range(3):
        if p != 2:
            assert _failure(_set(doc, "batch.patient_index", p)) == ProofFailure.WRONG_BATCH_PATH
    # sizes: the index outside the tree, or another shape of the path, fails
    assert _failure(_set(doc, "patient.size", 3)) == ProofFailure.WRONG_PATIENT_PATH
    assert _failure(_set(doc, "patient.size", 2)) == ProofFailure.WRONG_PATIENT_PATH
    assert _failure(_set(doc, "batch.patient_count", 2)) == ProofFailure.WRONG_BATCH_PATH
    assert _failure(_set(doc, "batch.patient_count", 5)) == ProofFailure.WRONG_BATCH_PATH
    # batch_size is in the log leaf: any change is caught there
    for n in (1, 12, 14, 2**63):
        assert _failure(_set(doc, "batch.batch_size", n)) == ProofFailure.WRONG_LOG_PATH
    assert _failure(_set(doc, "batch.batch_id", "other")) == ProofFailure.WRONG_LOG_PATH


def test_malformed_v2_bundles(doc: Doc) -> None:
    cases = {
        "v1 shape with version 2": _set(doc, "patient", None),
        "version 1 with v2 fields": _set(doc, "version", 1),
        "version 3": _set(doc, "version", 3),
        "extra field": _set(doc, "patient.extra", 1),
        "missing patient": {k: v for k, v in doc.items() if k != "patient"},
        "size 0": _set(doc, "patient.size", 0),
        "negative patient index": _set(doc, "batch.patient_index", -1),
        "count 0": _set(doc, "batch.patient_count", 0),
        "path too long": _set(doc, "patient.path", doc["patient"]["path"] * 22),
        "uppercase root": _set(doc, "patient.root", doc["patient"]["root"].upper()),
        "string size": _set(doc, "patient.size", "7"),
        "bool version": _set(doc, "version", True),
    }
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for name, d in cases.items():
        assert _failure(d) == ProofFailure.MALFORMED, name
        assert not validator.is_valid(d), name
    assert _failure(_set(doc, "version", 2.0)) is None  # Literal compares with ==, as in v1


ON_CHAIN_ONLY = ("chain_id", "contract", "tx_hash", "block_number", "block_hash", "log_index",
                 "block_timestamp")  # fmt: skip
#: What only places the paths (docs/wire-formats.md): RFC 9162 paths do not commit to a
#: tree's size, so another size that gives the leaf the same place in the split verifies.
PLACEMENT_ONLY = (("patient", "size"), ("batch", "patient_count"))


def _checked(b: Any) -> Doc:
    d: Doc = b.model_dump()
    for k in ON_CHAIN_ONLY:
        del d["anchor"][k]
    for section, k in PLACEMENT_ONLY:
        del d[section][k]
    return d


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_character_edit_fails_unless_it_changes_nothing_checked(
    doc: Doc, data: st.DataObject
) -> None:
    check_one_character_edit(doc, data, _checked, placement=True)


def test_build_bundle_v2_refuses_bad_inputs(world: World, tmp_path: Path) -> None:
    r: Reading = READINGS[6]  # leaf 0 of patient 2
    with pytest.raises(AnchorError, match="not those of subtree"):
        world.bundle(2, 0, patient_leaves=world.subtrees[1])
    with pytest.raises(AnchorError, match="not leaf 1"):
        world.bundle(2, 0, leaf_index=1)
    with pytest.raises(AnchorError, match="leaf index 7"):
        world.bundle(2, 0, leaf_index=7)
    with pytest.raises(AnchorError, match="subtree index 3"):
        world.bundle(2, 0, patient_index=3)
    with pytest.raises(AnchorError, match="another root or size"):
        world.bundle(2, 0, batch_size=12)
    with pytest.raises(AnchorError, match="another root or size"):
        world.bundle(2, 0, patient_roots=world.roots[:2] + [world.roots[2]] * 2)
    with pytest.raises(AnchorError, match="not leaf 0"):
        world.bundle(2, 0, salt=_salt("someone else"))
    with pytest.raises(AnchorError, match="not in the log"):
        world.bundle(2, 0, batch_id="unknown")
    with MerkleLog(tmp_path / "unanchored") as fresh:
        fresh.append(BATCH_ID, merkle.two_level_root(world.roots), 13)
        with pytest.raises(AnchorError, match="not anchored"):
            world.bundle(2, 0, log=fresh)
    assert world.bundle(2, 0, reading=r.model_dump()) == world.bundle(2, 0)


def test_a_single_patient_batch_has_an_empty_batch_path(tmp_path: Path) -> None:
    leaves = [leaf_hash_salted(_salt(r.reading_id), r.canonical_bytes()) for r in READINGS[:1]]
    with MerkleLog(tmp_path / "log") as log:
        log.append("solo", leaves[0], 1)  # one patient of one reading: root = that leaf
        log.record_anchor(1, log.root(), _receipt(log.root(), 1))
        r = READINGS[0]
        bundle = build_bundle_v2(
            reading=r, salt=_salt(r.reading_id), batch_id="solo", patient_leaves=leaves,
            leaf_index=0, patient_roots=leaves, patient_index=0, batch_size=1, log=log,
        )  # fmt: skip
    assert bundle.patient.path == [] and bundle.batch.path == [] and bundle.log.path == []
    assert bundle.patient.root == bundle.batch.batch_root == bundle.leaf_hash
    verify_offline(bundle.to_json())
