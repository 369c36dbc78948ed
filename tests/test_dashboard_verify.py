"""The in-browser verifier (/ui/verify.html) against the Python verifier, bundle by bundle.

Real bundles: readings of three patients sealed by the real Sealer, anchored on a real Anvil
by the AnchorJob (one anchor per batch, so the log has several entries and several
transactions), exported as `vitalproof proof export` exports them (version 2: a patient path
and a batch path); then one variant per check the Python verifier makes, each tampered in one
field, and the frozen v1 bundle, genuine and tampered (version 1 is still read and checked).
For every one, the page in chromium (the Anvil URL typed in) must reach the Python verifier's
verdict and name its failing check; the Python side is its API and, for a few, its command
line. Also in the same browser: merkle.js against the published RFC 9162 vectors, and
bundle.js's leaf bytes against leaves.py's.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from anchor.job import AnchorJob
from clinic.proofs import LakeView, export_bundle
from streams.lake.keystore import LocalKeystore
from streams.sealer import Pending, Sealer
from tests.test_clinic_service import T0, _answers_metadata, serving
from tests.test_merkle import EXPECTED_CONSISTENCY_CASES, EXPECTED_INCLUSION_CASES, VECTORS
from tests.web import check_accessibility, screenshot
from vitalproof.schema import SampleBatch, Transport
from vitalproof.settings import PathSettings, Settings
from vitalproof_verify import leaves
from vitalproof_verify.bundle import load_bundle
from vitalproof_verify.cli import UnusableInput, check_file
from vitalproof_verify.errors import ProofError
from vitalproof_verify.onchain import ANCHORED_TOPIC, rpc_web3
from vitalproof_verify.verify import verify_bundle

FROZEN = Path(__file__).parent / "data" / "bundle-v1-75a88b5.json"
BATCHES = 4


@dataclass
class Anchored:
    rpc: str
    latest: dict[str, Any]  # a reading of the last batch: log entry 3 of 4, a two-step log path
    first: dict[str, Any]  # a reading of the first batch: another anchor, tx and block
    home: Path


def _seal_and_anchor(settings: Settings) -> dict[str, str]:
    """BATCHES batches of three patients' heart rate, each sealed and then anchored on its
    own; returns each batch's first reading id of patient pt-1 by batch id. pt-1 is the
    middle one of three patients (a two-step batch path) with 11 readings (an unbalanced
    subtree)."""
    kms = LocalKeystore(settings.paths.keys_dir)
    sealer = Sealer(settings.lake_dir, kms)
    # Patients are ordered by pseudonym (random per keystore): pick two others so that pt-1
    # is the middle one.
    h1 = kms.pseudonym("pt-1")
    others = [f"pt-{i}" for i in range(2, 200)]
    below = next(p for p in others if kms.pseudonym(p) < h1)
    above = next(p for p in others if kms.pseudonym(p) > h1)
    job = AnchorJob.from_settings(settings)
    try:
        for n in range(BATCHES):
            items = []
            for k, (patient, count) in enumerate([(below, 2), ("pt-1", 11), (above, 3)]):
                b = SampleBatch(
                    device_id=f"dev-{patient}-{n}",
                    patient_id=patient,
                    gateway_id="gw",
                    transport=Transport.MQTT,
                    receive_time_us=T0,
                )
                # pt-1's values 60.25.., 60.5.., 60.75.., 60.0.. by batch
                for i in range(count):
                    b.add("heart_rate", "/min", T0 + i * 1_000_000, i, 60.0 + i + (n + 1) % 4 / 4)
                b.fill_reading_ids()
                items.append(Pending(settings.kafka.topic_clean, 0, 3 * n + k, b))
            manifest = sealer.seal(items)
            assert manifest is not None
            assert manifest.patients == [kms.pseudonym(p) for p in (below, "pt-1", above)]
            job.add_manifest(manifest.to_json_bytes())
            assert job.anchor_once() is not None
    finally:
        job.close()
    table = LakeView(settings).table(["pt-1"]).to_pylist()
    firsts: dict[str, str] = {}
    for row in sorted(table, key=lambda r: r["seq"]):
        firsts.setdefault(str(row["batch_id"]), bytes(row["reading_id"]).hex())
    return firsts


def _export(settings: Settings, reading_id: str) -> dict[str, Any]:
    """The bundle as `vitalproof proof export` writes it (vitalproof/cli/main.py, cmd_proof)."""
    doc: dict[str, Any] = json.loads(export_bundle(settings, reading_id).model_dump_json(indent=2))
    return doc


@pytest.fixture(scope="module")
def anchored(tmp_path_factory: pytest.TempPathFactory, anvil_rpc_url: str) -> Anchored:
    home = tmp_path_factory.mktemp("verify-home")
    settings = Settings(paths=PathSettings(home=home)).evolve(
        chain={"kind": "anvil", "rpc_url": anvil_rpc_url}
    )
    firsts = _seal_and_anchor(settings)
    bundles = [_export(settings, rid) for rid in firsts.values()]
    bundles.sort(key=lambda b: b["log"]["leaf_index"])
    first, latest = bundles[0], bundles[-1]
    assert (latest["log"]["leaf_index"], latest["log"]["tree_size"]) == (3, 4)
    assert latest["version"] == 2 and len(latest["patient"]["path"]) == 4
    assert (latest["batch"]["patient_index"], len(latest["batch"]["path"])) == (1, 2)
    assert (
        len(latest["log"]["path"]) == 2
        and first["anchor"]["tx_hash"] != latest["anchor"]["tx_hash"]
    )
    return Anchored(anvil_rpc_url, latest, first, home)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("verify-site")
    env = os.environ | {"VITALPROOF_HOME": str(home)}
    with serving(env, home / "serve.log", _answers_metadata) as url:
        yield url


# -- the two verifiers -------------------------------------------------------------------


def python_verdict(data: bytes, rpc: str | None) -> tuple[str, str | None]:
    """(verified|rejected, failing check) from the Python verifier's API, as its CLI runs it."""
    try:
        verify_bundle(load_bundle(data), rpc_web3(rpc) if rpc else None)
    except ProofError as e:
        return "rejected", e.failure.value
    return "verified", None


def cli_verdict(data: bytes, rpc: str, tmp_path: Path) -> tuple[str, str | None]:
    """The same from `vitalproof verify FILE --rpc URL`: its exit code and its one line."""
    path = tmp_path / "bundle.json"
    path.write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-m", "vitalproof", "verify", str(path), "--rpc", rpc],
        env=os.environ | {"VITALPROOF_HOME": str(tmp_path / "cli-home")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode == 0:
        assert done.stdout.startswith("OK "), done.stdout
        return "verified", None
    assert done.returncode == 1, done.stderr
    m = re.match(rf"FAILED {re.escape(str(path))}: ([a-z ]+): ", done.stderr)
    assert m, done.stderr
    return "rejected", m.group(1)


def choose(page: Page, data: bytes) -> None:
    page.get_by_label("Proof bundle (JSON file)").set_input_files(
        files=[{"name": "bundle.json", "mimeType": "application/json", "buffer": data}]
    )


def page_verdict(page: Page, rpc: str | None) -> tuple[str, str | None]:
    """Press Verify; the page's verdict and failing check, with the check list consistent."""
    page.get_by_label("Ethereum JSON-RPC URL").fill(rpc or "")
    page.get_by_role("button", name="Verify").click()
    status = page.get_by_role("status")
    expect(status).to_have_attribute("data-verdict", re.compile("^(verified|rejected|undecided)$"))
    verdict = status.get_attribute("data-verdict")
    failure = status.get_attribute("data-failure")
    states = page.locator("#checks li").evaluate_all(
        "rows => rows.map(r => [r.dataset.check, r.dataset.state, r.dataset.failure || null])"
    )
    assert verdict != "undecided", status.text_content()
    failed = [s for s in states if s[1] == "fail"]
    if verdict == "verified":
        assert not failed, states
        chain = [s[1] for s in states if s[0] in ("chain", "tx", "event")]
        assert chain == (["pass"] * 3 if rpc else ["not-run"] * 3), states
    else:
        # One failing check, everything before it passed, nothing after it ran.
        assert [s[2] for s in failed] == [failure], states
        at = states.index(failed[0])
        assert {s[1] for s in states[:at]} <= {"pass"}, states
        assert {s[1] for s in states[at + 1 :]} <= {"not-run"}, states
        assert failure is not None and failure in (status.text_content() or "")
    return str(verdict), failure


def open_verify(page: Page, site: str) -> None:
    page.goto(site + "/ui/verify.html")
    expect(page.get_by_role("heading", name="Verify a reading")).to_be_visible()


# -- tampering, one check at a time ----------------------------------------------------


def _flip(hex_value: str) -> str:
    """The same hash with its last digit changed (0x prefix kept)."""
    last = "0" if hex_value[-1] != "0" else "1"
    return hex_value[:-1] + last


def _set(section: str, key: str, value: Callable[[Any], Any]) -> Callable[[dict[str, Any]], Any]:
    def change(b: dict[str, Any]) -> None:
        part = b if section == "" else b[section]
        part[key] = value(part[key])

    return change


def _add(section: str, key: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    return lambda b: (b if section == "" else b[section]).__setitem__(key, value)


def _drop(section: str, key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda b: (b if section == "" else b[section]).pop(key)


@dataclass(frozen=True)
class OnText:
    """A change to the bundle's JSON text rather than to its fields."""

    change: Callable[[str], str]


def _text(old: str, new: str) -> OnText:
    def change(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)

    return OnText(change)


def _reordered(text: str) -> str:
    return json.dumps(dict(reversed(json.loads(text).items())))


RANDOM_HASH = "0x" + "ab" * 32
Change = bytes | OnText | Callable[[dict[str, Any]], Any] | None

#: id -> (a change to the exported bundle: its fields, its JSON text or all its bytes; the
#: Python verifier's failing check, None when it verifies).
CASES: dict[str, tuple[Change, str | None]] = {
    "genuine": (None, None),
    "value-written-as-an-integer": (_text('"value": 60.0', '"value": 60'), None),
    "reordered-and-reindented": (OnText(_reordered), None),
    "changed-value": (_set("reading", "value", lambda v: v + 1), "wrong leaf"),
    "changed-seq": (_set("reading", "seq", lambda v: v + 1), "wrong leaf"),
    "changed-patient": (_set("reading", "patient_id", lambda v: "pt-2"), "wrong leaf"),
    "value-null": (_set("reading", "value", lambda v: None), "wrong leaf"),
    "changed-salt": (_set("", "salt", _flip), "wrong leaf"),
    "changed-leaf-hash": (_set("", "leaf_hash", _flip), "wrong leaf"),
    "changed-leaf-index": (_set("patient", "leaf_index", lambda i: i ^ 1), "wrong patient path"),
    "leaf-index-outside-subtree": (
        _set("patient", "leaf_index", lambda i: 11),
        "wrong patient path",
    ),
    "wrong-sibling-in-patient-path": (
        _set("patient", "path", lambda p: [_flip(p[0]), *p[1:]]),
        "wrong patient path",
    ),
    "patient-path-one-short": (_set("patient", "path", lambda p: p[:-1]), "wrong patient path"),
    "patient-path-one-long": (_set("patient", "path", lambda p: [*p, p[0]]), "wrong patient path"),
    "wrong-patient-root": (_set("patient", "root", _flip), "wrong patient path"),
    "smaller-subtree": (_set("patient", "size", lambda n: 3), "wrong patient path"),
    "changed-patient-index": (_set("batch", "patient_index", lambda i: i ^ 1), "wrong batch path"),
    "patient-index-outside-batch": (
        _set("batch", "patient_index", lambda i: 3),
        "wrong batch path",
    ),
    "wrong-sibling-in-batch-path": (
        _set("batch", "path", lambda p: [_flip(p[0]), *p[1:]]),
        "wrong batch path",
    ),
    "batch-path-one-short": (_set("batch", "path", lambda p: p[:-1]), "wrong batch path"),
    "batch-path-one-long": (_set("batch", "path", lambda p: [*p, p[0]]), "wrong batch path"),
    "wrong-batch-root": (_set("batch", "batch_root", _flip), "wrong batch path"),
    "fewer-patients": (_set("batch", "patient_count", lambda n: 1), "wrong batch path"),
    "changed-batch-id": (_set("batch", "batch_id", lambda v: v + "x"), "wrong log path"),
    "changed-batch-size": (_set("batch", "batch_size", lambda n: n + 1), "wrong log path"),
    "changed-log-index": (_set("log", "leaf_index", lambda i: i - 1), "wrong log path"),
    "wrong-sibling-in-log-path": (
        _set("log", "path", lambda p: [p[0], _flip(p[1])]),
        "wrong log path",
    ),
    "wrong-log-root": (_set("log", "root", _flip), "wrong log path"),
    "changed-log-size": (_set("log", "tree_size", lambda n: n + 1), "wrong log path"),
    "wrong-anchored-root": (_set("anchor", "root", _flip), "root not on chain"),
    "wrong-anchored-size": (_set("anchor", "tree_size", lambda n: n + 1), "root not on chain"),
    "bundle-for-another-chain": (_set("anchor", "chain_id", lambda c: c + 1), "wrong chain"),
    "unknown-tx-hash": (
        _set("anchor", "tx_hash", lambda h: RANDOM_HASH),
        "transaction reorged out",
    ),
    "block-that-does-not-exist": (
        _set("anchor", "block_number", lambda n: 10**9),
        "transaction reorged out",
    ),
    "wrong-block-hash": (_set("anchor", "block_hash", _flip), "transaction reorged out"),
    "wrong-contract": (
        _set("anchor", "contract", lambda a: "0x" + "11" * 20),
        "root not on chain",
    ),
    "wrong-log-index": (_set("anchor", "log_index", lambda i: i + 1), "root not on chain"),
    "wrong-block-timestamp": (
        _set("anchor", "block_timestamp", lambda t: t + 1),
        "root not on chain",
    ),
    "contract-in-another-case": (_set("anchor", "contract", str.lower), None),
    # malformed: not a bundle at all, or a field the schema refuses
    "not-json": (b"{this is not json", "malformed bundle"),
    "empty-file": (b"", "malformed bundle"),
    "not-utf8": (b'{"version": 1, "x": "\xff"}', "malformed bundle"),
    "json-array": (b"[]", "malformed bundle"),
    "byte-order-mark": (OnText(lambda t: "\ufeff" + t), "malformed bundle"),
    "missing-salt": (_drop("", "salt"), "malformed bundle"),
    "missing-anchor-block-hash": (_drop("anchor", "block_hash"), "malformed bundle"),
    "extra-field": (_add("reading", "gateway_id", "gw"), "malformed bundle"),
    "version-1-with-v2-fields": (_set("", "version", lambda v: 1), "malformed bundle"),
    "version-3": (_set("", "version", lambda v: 3), "malformed bundle"),
    "version-2-without-patient-path": (_drop("", "patient"), "malformed bundle"),
    "seq-as-string": (_set("reading", "seq", str), "malformed bundle"),
    "seq-as-float": (_text('"seq": 0,', '"seq": 0.0,'), "malformed bundle"),
    "quality-as-boolean": (_set("reading", "quality", lambda q: False), "malformed bundle"),
    "value-infinite": (_text('"value": 60.0', '"value": 1e400'), "malformed bundle"),
    "lone-surrogate": (_text('"unit": "/min"', '"unit": "\\ud800"'), "malformed bundle"),
    "uppercase-leaf-hash": (_set("", "leaf_hash", str.upper), "malformed bundle"),
    "tx-hash-without-0x": (_set("anchor", "tx_hash", lambda h: h[2:]), "malformed bundle"),
    "path-too-long": (_set("batch", "path", lambda p: p * 33), "malformed bundle"),
    "negative-leaf-index": (_set("patient", "leaf_index", lambda i: -1), "malformed bundle"),
    "subtree-size-zero": (_set("patient", "size", lambda n: 0), "malformed bundle"),
    "leaf-index-beyond-uint64": (_set("log", "leaf_index", lambda i: 2**64), "malformed bundle"),
    "chain-id-zero": (_set("anchor", "chain_id", lambda c: 0), "malformed bundle"),
    "empty-batch-id": (_set("batch", "batch_id", lambda v: ""), "malformed bundle"),
    "larger-than-1-mib": (OnText(lambda t: t + " " * (1 << 20)), "malformed bundle"),
}
#: Version 1 (the frozen bundle, checked offline: its chain is not this Anvil): the same
#: checks as before version 2, in the same order.
V1_CASES: dict[str, tuple[Change, str | None]] = {
    "v1-genuine": (None, None),
    "v1-changed-value": (_set("reading", "value", lambda v: v + 1), "wrong leaf"),
    "v1-changed-salt": (_set("", "salt", _flip), "wrong leaf"),
    "v1-changed-leaf-index": (_set("batch", "leaf_index", lambda i: i ^ 1), "wrong batch path"),
    "v1-wrong-sibling-in-batch-path": (
        _set("batch", "path", lambda p: [_flip(p[0]), *p[1:]]),
        "wrong batch path",
    ),
    "v1-wrong-batch-root": (_set("batch", "batch_root", _flip), "wrong batch path"),
    "v1-changed-batch-size": (_set("batch", "batch_size", lambda n: n + 1), "wrong log path"),
    "v1-wrong-log-root": (_set("log", "root", _flip), "wrong log path"),
    "v1-wrong-anchored-root": (_set("anchor", "root", _flip), "root not on chain"),
    "v1-with-a-patient-path": (
        _add("", "patient", {"root": "00" * 32, "size": 1, "leaf_index": 0, "path": []}),
        "malformed bundle",
    ),
    "v1-relabelled-version-2": (_set("", "version", lambda v: 2), "malformed bundle"),
}
#: Cases also run through `vitalproof verify` (the command line).
CLI_CASES = {"genuine", "changed-value", "unknown-tx-hash", "not-json"}


def tampered(base: dict[str, Any], change: Change) -> bytes:
    """The bundle's JSON, as exported, with ``change`` applied."""
    if isinstance(change, bytes):
        return change
    if isinstance(change, OnText):
        return change.change(json.dumps(base, indent=2)).encode()
    doc = json.loads(json.dumps(base))  # a deep copy
    if change is not None:
        change(doc)
    return json.dumps(doc, indent=2).encode()


@pytest.mark.parametrize("case", list(CASES))
def test_the_page_and_the_python_verifier_agree(
    case: str, anchored: Anchored, site: str, page: Page, tmp_path: Path
) -> None:
    change, expected = CASES[case]
    data = tampered(anchored.latest, change)
    python = python_verdict(data, anchored.rpc)
    assert python == ("verified" if expected is None else "rejected", expected)
    if case in CLI_CASES:
        assert cli_verdict(data, anchored.rpc, tmp_path) == python
    open_verify(page, site)
    choose(page, data)
    assert page_verdict(page, anchored.rpc) == python


@pytest.mark.parametrize("case", list(V1_CASES))
def test_the_page_and_the_python_verifier_agree_on_version_1(
    case: str, site: str, page: Page
) -> None:
    change, expected = V1_CASES[case]
    data = tampered(json.loads(FROZEN.read_text()), change)
    python = python_verdict(data, None)
    assert python == ("verified" if expected is None else "rejected", expected)
    open_verify(page, site)
    choose(page, data)
    assert page_verdict(page, None) == python
    if expected is None or expected != "malformed bundle":
        checks = page.locator("#checks li").evaluate_all("rows => rows.map(r => r.dataset.check)")
        assert "patient" not in checks, checks  # version 1 has no patient path


def test_a_real_transaction_and_block_of_another_anchor_are_refused(
    anchored: Anchored, site: str, page: Page
) -> None:
    """Hashes that exist on the chain, but are not this bundle's: another anchor's tx, block."""
    other = anchored.first["anchor"]
    open_verify(page, site)
    for key in ("tx_hash", "block_number", "block_hash"):
        data = tampered(anchored.latest, _set("anchor", key, lambda _, k=key: other[k]))
        python = python_verdict(data, anchored.rpc)
        assert python == ("rejected", "transaction reorged out"), key
        choose(page, data)
        assert page_verdict(page, anchored.rpc) == python, key
    data = json.dumps(anchored.first).encode()  # and that anchor's own bundle verifies
    assert python_verdict(data, anchored.rpc) == ("verified", None)
    choose(page, data)
    assert page_verdict(page, anchored.rpc) == ("verified", None)


def test_the_frozen_v1_bundle_offline_and_against_another_chain(
    anchored: Anchored, site: str, page: Page
) -> None:
    """Without an RPC the Python verifier checks the Merkle part only and says it verified; with
    this Anvil (not the chain the bundle names) it says wrong chain. So does the page."""
    data = FROZEN.read_bytes()
    open_verify(page, site)
    choose(page, data)
    assert python_verdict(data, None) == page_verdict(page, None) == ("verified", None)
    expect(page.get_by_role("status")).to_contain_text("offline only")
    assert python_verdict(data, anchored.rpc) == ("rejected", "wrong chain")
    assert page_verdict(page, anchored.rpc) == ("rejected", "wrong chain")


def test_an_endpoint_that_is_not_json_rpc_decides_nothing(
    anchored: Anchored, site: str, page: Page, tmp_path: Path
) -> None:
    """A URL that answers, but not JSON-RPC: the Python verifier cannot use it (the CLI's exit
    code 2, nothing decided), and the page says so instead of a verdict."""
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(anchored.latest))
    with pytest.raises(UnusableInput, match="cannot reach the JSON-RPC endpoint"):
        check_file(path, site + "/not-an-rpc")
    open_verify(page, site)
    choose(page, path.read_bytes())
    page.get_by_label("Ethereum JSON-RPC URL").fill(site + "/not-an-rpc")
    page.get_by_role("button", name="Verify").click()
    status = page.get_by_role("status")
    expect(status).to_have_attribute("data-verdict", "undecided")
    expect(status).to_contain_text("cannot reach the JSON-RPC endpoint")
    expect(page.locator('#checks li[data-state="fail"]')).to_have_count(0)


def test_dropped_bundle_verifies_accessibly_and_the_url_is_remembered(
    anchored: Anchored, site: str, page: Page, tmp_path: Path
) -> None:
    open_verify(page, site)
    check_accessibility(page)
    text = json.dumps(anchored.latest, indent=2)
    transfer = page.evaluate_handle(
        """text => {
            const dt = new DataTransfer();
            dt.items.add(new File([text], "bundle.json", {type: "application/json"}));
            return dt;
        }""",
        text,
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    assert page_verdict(page, anchored.rpc) == ("verified", None)
    expect(page.get_by_role("status")).to_contain_text(
        f"on chain {anchored.latest['anchor']['chain_id']}"
    )
    check_accessibility(page)
    screenshot(page, "verify", tmp_path)

    page.reload()
    expect(page.get_by_label("Ethereum JSON-RPC URL")).to_have_value(anchored.rpc)
    choose(page, tampered(anchored.latest, _set("reading", "value", lambda v: v + 1)))
    page.get_by_role("button", name="Verify").click()
    status = page.get_by_role("status")
    expect(status).to_have_attribute("data-failure", "wrong leaf")
    expect(page.locator('#checks li[data-state="fail"]')).to_contain_text("hash to")
    # after the leaf: patient, batch, log, head and the three chain checks
    expect(page.locator('#checks li[data-state="not-run"]')).to_have_count(7)
    check_accessibility(page)
    screenshot(page, "verify-rejected", tmp_path)


# -- the modules, against their references, in the browser ---------------------------------


def _b64hex(value: str | None) -> str:
    return base64.b64decode(value or "").hex()


def test_merkle_js_passes_the_rfc9162_vectors(site: str, page: Page) -> None:
    cases = []
    for kind in ("inclusion", "consistency"):
        for f in sorted((VECTORS / kind).rglob("*.json")):
            c = json.loads(f.read_text())
            hashes = {k: _b64hex(c[k]) for k in ("leafHash", "root", "root1", "root2") if k in c}
            # Sizes as text: 2^64 - 1 is among them, beyond what a JavaScript number holds.
            sizes = {k: str(c[k]) for k in ("leafIdx", "treeSize", "size1", "size2") if k in c}
            proof = [_b64hex(p) for p in c["proof"] or []]
            name = str(f.relative_to(VECTORS))
            cases.append({"kind": kind, "name": name, **c, **hashes, **sizes, "proof": proof})
    assert len(cases) == EXPECTED_INCLUSION_CASES + EXPECTED_CONSISTENCY_CASES
    roots = json.loads((VECTORS / "roots.json").read_text())
    open_verify(page, site)
    results = page.evaluate(
        """async ([cases, roots]) => {
            const m = await import("/ui/merkle.js");
            const hex = (h) => Uint8Array.from(h.match(/../g) || [], (b) => parseInt(b, 16));
            const out = [];
            for (const c of cases) {
                let error = null;
                try {
                    if (c.kind === "inclusion") {
                        await m.verifyInclusion(
                            hex(c.leafHash), BigInt(c.leafIdx), BigInt(c.treeSize),
                            c.proof.map(hex), hex(c.root));
                    } else {
                        await m.verifyConsistency(
                            BigInt(c.size1), BigInt(c.size2), hex(c.root1), hex(c.root2),
                            c.proof.map(hex));
                    }
                } catch (e) {
                    error = e instanceof m.MerkleError ? "MerkleError" : String(e);
                }
                out.push([c.name, c.wantErr, error]);
            }
            const leaf = await m.leafHash(hex(roots.leaf_inputs_hex[0]));
            const two = await m.nodeHash(leaf, await m.leafHash(hex(roots.leaf_inputs_hex[1])));
            out.push(["roots.json sizes 1 and 2", false, m.toHex(leaf) + m.toHex(two)]);
            return out;
        }""",
        [cases, roots],
    )
    *vectors, (_, _, root_hexes) = results
    wrong = [(name, want, got) for name, want, got in vectors if (got == "MerkleError") != want]
    assert not wrong, wrong
    assert {got for _, want, got in vectors if want} == {"MerkleError"}  # the one error type
    assert root_hexes == "".join(roots["root_by_tree_size_hex"][1:3])


def _awkward_readings() -> list[dict[str, Any]]:
    """Readings whose canonical bytes a naive JSON.stringify would get wrong: Python's float
    forms, non-ASCII and control characters, integers beyond 2^53, a null value."""
    rng = random.Random(9162)
    values: list[float | None] = [
        None, 0.0, -0.0, 1.0, 58.0, 0.1, 36.6, 1e-4, 1e-5, 1.5e-7, 123456.789, 1e15, 1e16,
        9007199254740993.0, 1.7976931348623157e308, 5e-324, -2.5e-300, 12345678901234567890.0,
    ]  # fmt: skip
    values += [rng.uniform(-1e3, 1e3) for _ in range(60)]
    values += [rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30) for _ in range(60)]
    texts = ["/min", "°C", 'a"b\\c', "tab\there\nnl\x00\x1f\x7f", "mmHg 血圧 😀", "é", "\u2028"]
    return [
        {
            "reading_id": f"r{i}",
            "device_id": texts[i % len(texts)],
            "patient_id": "pt-é",
            "metric": texts[(i + 3) % len(texts)],
            "value": v,
            "unit": texts[(i + 1) % len(texts)],
            "device_time_us": T0 + i * 3**40,
            "seq": i - 3,
            "quality": i % 3,
        }
        for i, v in enumerate(values)
    ]


def test_bundle_js_computes_the_leaf_bytes_of_leaves_py(site: str, page: Page) -> None:
    readings = _awkward_readings()
    want = [leaves.canonical_reading_bytes(**r).hex() for r in readings]
    batch = ('batch-é"\\', bytes(range(32)), 2**64 - 1)
    want_log = leaves.log_leaf_data(*batch).hex()
    open_verify(page, site)
    got = page.evaluate(
        """async ([texts, batch]) => {
            const b = await import("/ui/bundle.js");
            const m = await import("/ui/merkle.js");
            const readings = texts.map((t) => b.parseJson(t));  // as the page reads a bundle
            const log = b.logLeafData(batch[0], b.fromHex(batch[1]), b.parseJson(batch[2]));
            return [readings.map((r) => m.toHex(b.canonicalReading(r))), m.toHex(log)];
        }""",
        [[json.dumps(r) for r in readings], [batch[0], batch[1].hex(), str(batch[2])]],
    )
    mismatches = [
        (r, bytes.fromhex(w), bytes.fromhex(g))
        for r, w, g in zip(readings, want, got[0], strict=True)
        if w != g
    ]
    assert not mismatches, mismatches[:3]
    assert got[1] == want_log


def test_the_anchored_topic_is_the_python_verifiers(site: str, page: Page) -> None:
    open_verify(page, site)
    topic = page.evaluate("async () => (await import('/ui/rpc.js')).ANCHORED_TOPIC")
    assert topic == "0x" + ANCHORED_TOPIC.hex()
