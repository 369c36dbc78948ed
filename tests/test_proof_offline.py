"""vitalproof_verify.bundle: bundles from a real batch tree and log, and every way of breaking them.

The on-chain half (``anchor.chain.check_anchor_on_chain``) is tested elsewhere; here the
anchor section only has to agree with the log.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anchor.bundles import anchor_ref, build_bundle
from anchor.errors import AnchorError
from anchor.log import MerkleLog
from vitalproof.units import Metric
from vitalproof_verify import merkle
from vitalproof_verify.bundle import (
    ProofBundle,
    Reading,
    bundle_schema,
    load_bundle,
    verify_offline,
)
from vitalproof_verify.errors import ProofError, ProofFailure
from vitalproof_verify.leaves import leaf_hash_salted, reading_id

REPO = Path(__file__).resolve().parents[1]
SCHEMA = bundle_schema()
SALT_KEY = hashlib.sha256(b"test patient salt key").digest()

Doc = dict[str, Any]


def _salt(rid: str) -> bytes:
    return hmac.new(SALT_KEY, rid.encode(), hashlib.sha256).digest()


def _readings() -> list[Reading]:
    metrics = [
        (Metric.HEART_RATE, "/min", 72.0),
        (Metric.SPO2, "%", 97.5),
        (Metric.BODY_TEMPERATURE, "Cel", 36.85),
        (Metric.STEP_COUNT, "{steps}", 1204.0),
        (Metric.RR_INTERVAL, "ms", None),
    ]
    out = []
    for i in range(13):
        metric, unit, value = metrics[i % len(metrics)]
        t = 1_732_200_000_000_000 + i * 1_000_000
        out.append(
            Reading(
                reading_id=reading_id("dev-1", metric.value, i, t),
                device_id="dev-1",
                patient_id="patient-alpha",
                metric=metric.value,
                value=value,
                unit=unit,
                device_time_us=t,
                seq=i,
                quality=4 if i == 3 else 0,
            )
        )
    return out


READINGS = _readings()
BATCH_ID = "batch-patient-alpha-0001"


def _receipt(root: bytes, size: int) -> Doc:
    """Shaped like anchor.chain.AnchorReceipt.to_json_dict(), gas_used included."""
    return {
        "chain_id": 31337,
        "contract": "0x5FbDB2315678afecb367f032d93F642f64180aa3",
        "tx_hash": "0x" + hashlib.sha256(b"tx").hexdigest(),
        "block_number": 12,
        "block_hash": "0x" + hashlib.sha256(b"block").hexdigest(),
        "log_index": 0,
        "root": "0x" + root.hex(),
        "tree_size": size,
        "block_timestamp": 1_732_200_100,
        "gas_used": 48_213,
    }


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MerkleLog, merkle.MerkleTree]]:
    leaves = [leaf_hash_salted(_salt(r.reading_id), r.canonical_bytes()) for r in READINGS]
    tree = merkle.MerkleTree(leaves)
    with MerkleLog(tmp_path_factory.mktemp("log")) as log:
        for i in range(2):
            log.append(f"other-{i}", hashlib.sha256(bytes([i])).digest(), 100 + i)
        log.append(BATCH_ID, tree.root(), tree.size)
        for i in range(2, 4):
            log.append(f"other-{i}", hashlib.sha256(bytes([i])).digest(), 100 + i)
        log.record_anchor(5, log.root(), _receipt(log.root(), 5))
        log.append("later", hashlib.sha256(b"later").digest(), 9)  # not anchored yet
        yield log, tree


def _bundle(world: tuple[MerkleLog, merkle.MerkleTree], i: int) -> ProofBundle:
    log, tree = world
    r = READINGS[i]
    return build_bundle(
        reading=r, salt=_salt(r.reading_id), batch_id=BATCH_ID, batch=tree, leaf_index=i, log=log
    )


@pytest.fixture(scope="module")
def doc(world: tuple[MerkleLog, merkle.MerkleTree]) -> Doc:
    d: Doc = json.loads(_bundle(world, 5).to_json())
    return d


def _failure(d: Doc) -> ProofFailure | None:
    try:
        verify_offline(json.dumps(d).encode())
    except ProofError as e:
        return e.failure
    return None


# -- happy paths ------------------------------------------------------------------------------


def test_every_reading_of_the_batch_gets_a_bundle_that_verifies(
    world: tuple[MerkleLog, merkle.MerkleTree],
) -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for i in range(len(READINGS)):
        bundle = _bundle(world, i)
        verify_offline(bundle)
        data = bundle.to_json()
        verify_offline(data)
        verify_offline(data.decode())
        assert load_bundle(data) == bundle
        assert load_bundle(data).to_json() == data  # one serialisation per proof
        validator.validate(json.loads(data))
        assert bundle.reading.canonical_bytes() == READINGS[i].canonical_bytes()
        assert bundle.batch.leaf_index == i
        assert bundle.log.leaf_index == 2
        assert bundle.log.tree_size == bundle.anchor.tree_size == 5


def test_bundle_contents_are_what_the_verifier_recomputes(doc: Doc) -> None:
    r = READINGS[5]
    assert doc["version"] == 1
    assert set(doc["reading"]) == {
        "reading_id", "device_id", "patient_id", "metric", "value", "unit",
        "device_time_us", "seq", "quality",
    }  # fmt: skip
    canonical = json.dumps(doc["reading"], sort_keys=True, separators=(",", ":")).encode()
    assert canonical == r.canonical_bytes()
    leaf = hashlib.sha256(b"\x00" + bytes.fromhex(doc["salt"]) + canonical).hexdigest()
    assert doc["leaf_hash"] == leaf
    assert "gas_used" not in doc["anchor"]


def test_single_leaf_batch_and_single_entry_log(tmp_path: Path) -> None:
    r = READINGS[0]
    leaf = leaf_hash_salted(_salt(r.reading_id), r.canonical_bytes())
    with MerkleLog(tmp_path / "log") as log:
        log.append("solo", leaf, 1)
        log.record_anchor(1, log.root(), _receipt(log.root(), 1))
        bundle = build_bundle(
            reading=r, salt=_salt(r.reading_id), batch_id="solo", batch=[leaf], leaf_index=0,
            log=log,
        )  # fmt: skip
    assert bundle.batch.path == [] and bundle.log.path == []
    verify_offline(bundle.to_json())


def test_reading_may_be_given_as_model_fields_or_mapping(
    world: tuple[MerkleLog, merkle.MerkleTree],
) -> None:
    log, tree = world
    r = READINGS[3]
    common: Doc = {"salt": _salt(r.reading_id), "batch_id": BATCH_ID, "batch": tree,
                   "leaf_index": 3, "log": log}  # fmt: skip
    a = build_bundle(reading=r, **common)
    assert build_bundle(reading=r.model_dump(), **common) == a
    with pytest.raises(ValueError):
        build_bundle(reading={**r.model_dump(), "gateway_id": "gw"}, **common)


def test_model_export_validates_against_the_json_schema(doc: Doc) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)


# -- every byte of every hash ----------------------------------------------------------------


HASH_FIELDS: dict[str, ProofFailure] = {
    "salt": ProofFailure.WRONG_LEAF,
    "leaf_hash": ProofFailure.WRONG_LEAF,
    "batch.batch_root": ProofFailure.WRONG_BATCH_PATH,
    "batch.path": ProofFailure.WRONG_BATCH_PATH,
    "log.root": ProofFailure.WRONG_LOG_PATH,
    "log.path": ProofFailure.WRONG_LOG_PATH,
    "anchor.root": ProofFailure.ROOT_NOT_ON_CHAIN,
}


def _get(d: Doc, dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        node = node[part]
    return node


def _set(d: Doc, dotted: str, value: Any) -> Doc:
    out = copy.deepcopy(d)
    *parents, last = dotted.split(".")
    node = out
    for part in parents:
        node = node[part]
    node[last] = value
    return out


def _flip_hex(value: str, byte: int, bit: int) -> str:
    prefix = "0x" if value.startswith("0x") else ""
    raw = bytearray(bytes.fromhex(value.removeprefix("0x")))
    raw[byte] ^= 1 << bit
    return prefix + raw.hex()


def test_flipping_any_bit_of_any_hash_fails_with_the_matching_reason(doc: Doc) -> None:
    assert _failure(doc) is None
    assert len(doc["batch"]["path"]) == 4 and len(doc["log"]["path"]) == 3
    checked = 0
    for field, reason in HASH_FIELDS.items():
        value = _get(doc, field)
        slots = (
            [(i, v) for i, v in enumerate(value)] if isinstance(value, list) else [(None, value)]
        )
        for slot, hexval in slots:
            for byte in range(32):
                for bit in (0, 3, 4, 7):  # both nibbles of every byte
                    bad = _flip_hex(hexval, byte, bit)
                    if slot is None:
                        mutated = _set(doc, field, bad)
                    else:
                        mutated = _set(doc, field, [*value[:slot], bad, *value[slot + 1 :]])
                    assert _failure(mutated) == reason, (field, slot, byte, bit)
                    checked += 1
    assert checked == (5 + 4 + 3) * 32 * 4


@pytest.mark.parametrize(
    ("field", "reason"),
    [("batch.path", ProofFailure.WRONG_BATCH_PATH), ("log.path", ProofFailure.WRONG_LOG_PATH)],
)
def test_reshaped_paths_fail(doc: Doc, field: str, reason: ProofFailure) -> None:
    path: list[str] = _get(doc, field)
    variants = [path[:-1], path[1:], [*path, path[-1]], [path[0], *path], path[::-1], []]
    variants += [path[:k] + path[k + 1 :] for k in range(len(path))]
    variants += [[*path[:k], "00" * 32, *path[k:]] for k in range(len(path) + 1)]
    for v in variants:
        assert v != path
        assert _failure(_set(doc, field, v)) == reason, v


# -- every reading value ---------------------------------------------------------------------


def _string_mutations(s: str) -> Iterator[str]:
    for i, ch in enumerate(s):
        yield s[:i] + ("X" if ch != "X" else "Y") + s[i + 1 :]
    yield s + " "
    yield s[:-1]
    yield ""


def test_changing_any_reading_value_is_a_wrong_leaf(doc: Doc) -> None:
    reading = doc["reading"]
    mutations: list[tuple[str, Any]] = []
    for key in ("reading_id", "device_id", "patient_id", "metric", "unit"):
        mutations += [(key, m) for m in _string_mutations(reading[key])]
    for key in ("device_time_us", "seq", "quality"):
        mutations += [(key, reading[key] + d) for d in (1, -1, 1 << 20, -reading[key])]
    v = reading["value"]
    assert v is not None
    mutations += [("value", x) for x in (v + 1e-9, -v, 0.0, None, v * 10, v + 0.5)]
    for key, value in mutations:
        if value == reading[key] and type(value) is type(reading[key]):
            continue
        assert _failure(_set(doc, f"reading.{key}", value)) == ProofFailure.WRONG_LEAF, (
            key,
            value,
        )


def test_an_integral_value_written_as_a_json_integer_is_the_same_reading(doc: Doc) -> None:
    """JSON has one number type: 72 and 72.0 are the same value and the same canonical bytes."""
    assert doc["reading"]["value"] == 72.0
    assert _failure(_set(doc, "reading.value", 72)) is None


# -- sizes, indices and ids ------------------------------------------------------------------


def test_wrong_batch_index_fails(doc: Doc) -> None:
    n = doc["batch"]["batch_size"]
    for idx in [*range(0, n + 3), 2**64 - 1]:
        if idx != doc["batch"]["leaf_index"]:
            got = _failure(_set(doc, "batch.leaf_index", idx))
            assert got == ProofFailure.WRONG_BATCH_PATH, idx


def test_wrong_batch_size_never_verifies(doc: Doc) -> None:
    """A path does not commit to its tree size; the log leaf (which contains it) does."""
    n = doc["batch"]["batch_size"]
    seen = set()
    for size in range(1, 4 * n):
        if size != n:
            got = _failure(_set(doc, "batch.batch_size", size))
            assert got in (ProofFailure.WRONG_BATCH_PATH, ProofFailure.WRONG_LOG_PATH), size
            seen.add(got)
    assert seen == {ProofFailure.WRONG_BATCH_PATH, ProofFailure.WRONG_LOG_PATH}


def test_other_batch_id_is_a_wrong_log_path(doc: Doc) -> None:
    for bid in _string_mutations(doc["batch"]["batch_id"]):
        if bid:
            assert _failure(_set(doc, "batch.batch_id", bid)) == ProofFailure.WRONG_LOG_PATH


def test_wrong_log_index_fails(doc: Doc) -> None:
    for idx in range(0, 8):
        if idx != doc["log"]["leaf_index"]:
            assert _failure(_set(doc, "log.leaf_index", idx)) == ProofFailure.WRONG_LOG_PATH


def test_wrong_log_size_never_verifies(doc: Doc) -> None:
    for size in range(1, 20):
        if size != doc["log"]["tree_size"]:
            got = _failure(_set(doc, "log.tree_size", size))
            assert got in (ProofFailure.WRONG_LOG_PATH, ProofFailure.ROOT_NOT_ON_CHAIN), size


def test_anchor_for_another_head_is_root_not_on_chain(
    doc: Doc, world: tuple[MerkleLog, merkle.MerkleTree]
) -> None:
    log, _ = world
    for size in (1, 2, 4, 6, 100):
        if size != doc["anchor"]["tree_size"]:
            got = _failure(_set(doc, "anchor.tree_size", size))
            assert got == ProofFailure.ROOT_NOT_ON_CHAIN
    # A genuine head of the same log, but not the one the log path leads to.
    other = _set(_set(doc, "anchor.tree_size", 6), "anchor.root", "0x" + log.root(6).hex())
    assert _failure(other) == ProofFailure.ROOT_NOT_ON_CHAIN


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("anchor.chain_id", 1),
        ("anchor.contract", "0x" + "11" * 20),
        ("anchor.tx_hash", "0x" + "22" * 32),
        ("anchor.block_number", 99),
        ("anchor.block_hash", "0x" + "33" * 32),
        ("anchor.log_index", 3),
        ("anchor.block_timestamp", 0),
    ],
)
def test_transaction_fields_are_left_to_the_chain_check(doc: Doc, field: str, value: Any) -> None:
    """Offline, nothing vouches for where the transaction is: check_anchor_on_chain does."""
    assert _get(doc, field) != value
    assert _failure(_set(doc, field, value)) is None


# -- malformed input -------------------------------------------------------------------------


def _malformed(doc: Doc) -> Iterator[tuple[str, bytes]]:
    def dump(d: Any) -> bytes:
        return json.dumps(d).encode()

    def without(dotted: str) -> Doc:
        out = copy.deepcopy(doc)
        *parents, last = dotted.split(".")
        node = out
        for p in parents:
            node = node[p]
        del node[last]
        return out

    edits: dict[str, Callable[[], Any]] = {
        "version 2": lambda: _set(doc, "version", 2),
        "version string": lambda: _set(doc, "version", "1"),
        "salt uppercase": lambda: _set(doc, "salt", doc["salt"].upper()),
        "salt short": lambda: _set(doc, "salt", doc["salt"][:-2]),
        "salt odd length": lambda: _set(doc, "salt", doc["salt"][:-1]),
        "salt non-hex": lambda: _set(doc, "salt", "g" + doc["salt"][1:]),
        "salt 0x": lambda: _set(doc, "salt", "0x" + doc["salt"][2:]),
        "leaf null": lambda: _set(doc, "leaf_hash", None),
        "path element short": lambda: _set(doc, "batch.path", [doc["batch"]["path"][0][:62]]),
        "path not list": lambda: _set(doc, "batch.path", doc["batch"]["path"][0]),
        "path too long": lambda: _set(doc, "log.path", ["00" * 32] * 65),
        "anchor root without 0x": lambda: _set(doc, "anchor.root", doc["anchor"]["root"][2:]),
        "tx hash uppercase": lambda: _set(doc, "anchor.tx_hash", doc["anchor"]["tx_hash"].upper()),
        "contract short": lambda: _set(doc, "anchor.contract", "0x1234"),
        "negative index": lambda: _set(doc, "batch.leaf_index", -1),
        "index too big": lambda: _set(doc, "batch.leaf_index", 2**64),
        "zero batch size": lambda: _set(doc, "batch.batch_size", 0),
        "zero tree size": lambda: _set(doc, "log.tree_size", 0),
        "chain id zero": lambda: _set(doc, "anchor.chain_id", 0),
        "bool index": lambda: _set(doc, "log.leaf_index", True),
        "string index": lambda: _set(doc, "log.leaf_index", "2"),
        "float seq": lambda: _set(doc, "reading.seq", 5.5),
        "string value": lambda: _set(doc, "reading.value", "72"),
        "empty batch id": lambda: _set(doc, "batch.batch_id", ""),
        "extra top field": lambda: {**doc, "note": "hi"},
        "extra reading field": lambda: _set(doc, "reading.gateway_id", "gw-1"),
        "missing reading field": lambda: without("reading.unit"),
        "missing anchor": lambda: without("anchor"),
        "missing block hash": lambda: without("anchor.block_hash"),
        "not an object": lambda: [doc],
    }
    for name, make in edits.items():
        yield name, dump(make())
    text = dump(doc)
    yield "NaN value", dump(_set(doc, "reading.value", float("nan")))
    yield "Infinity value", dump(_set(doc, "reading.value", float("inf")))
    yield "truncated", text[:-1]
    yield "empty", b""
    yield "not utf-8", b"\xff" + text
    yield "not json", b"proof"
    yield "huge", b" " * (1 << 20) + text


def test_malformed_bundles_are_named_malformed(doc: Doc) -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    cases = list(_malformed(doc))
    assert b'"value": NaN' in dict(cases)["NaN value"]
    for name, data in cases:
        with pytest.raises(ProofError) as e1:
            load_bundle(data)
        assert e1.value.failure is ProofFailure.MALFORMED, name
        with pytest.raises(ProofError) as e2:
            verify_offline(data)
        assert e2.value.failure is ProofFailure.MALFORMED, name
        try:
            parsed = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            continue
        if name not in (
            "NaN value",
            "Infinity value",
            "huge",
        ):  # JSON Schema has no NaN; size is not its job
            assert not validator.is_valid(parsed), f"schema accepts {name}"


def test_bundle_built_without_validation_is_malformed(doc: Doc) -> None:
    good = load_bundle(json.dumps(doc))
    bad = good.model_copy(update={"salt": "zz"})  # model_copy skips validation
    with pytest.raises(ProofError) as e:
        verify_offline(bad)
    assert e.value.failure is ProofFailure.MALFORMED


# -- any single-character edit of the serialised bundle ----------------------------------------

ON_CHAIN_ONLY = ("chain_id", "contract", "tx_hash", "block_number", "block_hash", "log_index",
                 "block_timestamp")  # fmt: skip


def _checked(b: ProofBundle) -> Doc:
    d = b.model_dump()
    for k in ON_CHAIN_ONLY:
        del d["anchor"][k]
    return d


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_character_edit_fails_unless_it_changes_nothing_checked(
    doc: Doc, data: st.DataObject
) -> None:
    check_one_character_edit(doc, data, _checked)


def check_one_character_edit(
    doc: Doc,
    data: st.DataObject,
    checked: Callable[[Any], Doc],
    *,
    placement: bool = False,
) -> None:
    """One character of the bundle's JSON replaced: it no longer loads (MALFORMED), or it
    verifies offline exactly when nothing ``checked`` keeps has changed, and a failure is
    never MALFORMED. ``placement``: fields that only place a path (left out of ``checked``)
    may make it fail without changing anything checked, as long as the bundle changed."""
    text = json.dumps(doc, indent=1)
    original = load_bundle(text)
    pos = data.draw(st.integers(0, len(text) - 1))
    ch = data.draw(st.sampled_from('0123456789abcdefABCDEFx" ,:.-{}[]eEnul\n'))
    mutated = text[:pos] + ch + text[pos + 1 :]
    try:
        candidate = load_bundle(mutated)
    except ProofError as e:
        assert e.failure is ProofFailure.MALFORMED
        return
    unchanged = checked(candidate) == checked(original)
    try:
        verify_offline(candidate)
    except ProofError as e:
        assert not unchanged or (placement and candidate != original), (pos, ch, e)
        assert e.failure is not ProofFailure.MALFORMED
        return
    assert unchanged, (pos, ch)


# -- the prover refuses what would not verify --------------------------------------------------


def test_build_bundle_refuses_bad_inputs(
    world: tuple[MerkleLog, merkle.MerkleTree], tmp_path: Path
) -> None:
    log, tree = world
    r = READINGS[1]
    args: Doc = dict(reading=r, salt=_salt(r.reading_id), batch_id=BATCH_ID, batch=tree,
                     leaf_index=1, log=log)  # fmt: skip
    with pytest.raises(AnchorError, match="does not verify"):
        build_bundle(**{**args, "salt": _salt("someone else")})
    with pytest.raises(AnchorError, match="does not verify"):
        build_bundle(**{**args, "leaf_index": 2})
    with pytest.raises(AnchorError):
        build_bundle(**{**args, "leaf_index": 13})
    with pytest.raises(AnchorError):
        build_bundle(**{**args, "salt": b"short"})
    with pytest.raises(AnchorError, match="not in the log"):
        build_bundle(**{**args, "batch_id": "unknown"})
    with pytest.raises(AnchorError, match="another root or size"):
        build_bundle(**{**args, "batch": tree.inclusion_proof(0)[:1] * 2})
    with MerkleLog(tmp_path / "unanchored") as fresh:
        fresh.append(BATCH_ID, tree.root(), tree.size)
        with pytest.raises(AnchorError, match="not anchored"):
            build_bundle(**{**args, "log": fresh})
    stale = anchor_ref(_receipt(log.root(2), 2))
    with pytest.raises(AnchorError, match="does not cover"):
        build_bundle(**{**args, "anchor": stale})
    with pytest.raises(AnchorError, match="lacks"):
        anchor_ref({"chain_id": 1})


def test_the_verify_kit_loads_nothing_of_the_pipeline() -> None:
    """Importing the whole kit (its command line and on-chain check included) loads no room of
    the pipeline and none of its heavy dependencies (make lint checks the imports as written;
    this checks what really loads)."""
    pipeline = ("vitalproof", "streams", "ingest", "anchor", "clinic", "device_sims")
    heavy = ("pyarrow", "faust", "aiokafka", "pydantic_settings", "eth_tester", "eth", "numpy")
    code = (
        "import sys, vitalproof_verify, vitalproof_verify.cli, vitalproof_verify.onchain\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {pipeline + heavy!r})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


#: A bundle the code before the layout change (75a88b5) exported from its demo (synthetic
#: patient and device ids): bundles already handed out must keep verifying.
OLD_BUNDLE = Path(__file__).parent / "data" / "bundle-v1-75a88b5.json"


def test_a_version_1_bundle_from_before_the_layout_change_still_verifies() -> None:
    data = OLD_BUNDLE.read_bytes()
    bundle = load_bundle(data)
    assert bundle.version == 1
    verify_offline(bundle)
    doc = json.loads(data)
    doc["reading"]["value"] = doc["reading"]["value"] + 1
    with pytest.raises(ProofError) as err:
        verify_offline(json.dumps(doc))
    assert err.value.failure is ProofFailure.WRONG_LEAF
