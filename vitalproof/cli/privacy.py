"""Privacy scans: is any patient id, device id or sample value readable where it must not be?

Invariant 3 says the chain sees only Merkle roots and tree sizes, and the lake is encrypted.
This module checks both the way an outsider would, after a real run:

* **the chain**, over JSON-RPC: the calldata of every transaction of every block, every event
  log (data and topics), and the contract storage (``anvil_dumpState``: every slot of every
  account, and the code; ``eth_getStorageAt`` of the first slots where that call is missing);
* **the disk**: every file under the state folder (SQLite databases and their journals
  included) and every file and folder *name*, except the exempt folders below.

What is searched for comes from the run itself (decrypted from the lake with the keystore):
each patient id and device id as ASCII (all of them), and a sample of them as UTF-16LE/BE and
as hex text; each sampled series' values as JSON/CSV text and as float64/float32 bytes of two
consecutive values (little and big endian: how a columnar or row store lays them out), and
single float64 values with a non-trivial mantissa. Short patterns (a lone float32, "72.0")
are left out: they would match random ciphertext by chance.

Exempt, each for its reason (:data:`EXEMPT`): the keystore (keys and salts are what it is
for), the device registry (enrolment maps devices to patients), the clinician side's consent
store and audit log (who may see whom, who saw whom: they name patients by design), Kafka's
log segments and Mosquitto's persistence (the raw and clean topics carry plaintext payloads
by design: those disks must be encrypted and the topics ACL'd), secrets, process logs and the
simulator's ground truth. :data:`KNOWN_FINDINGS` lists what the scan would accept as found
and why: nothing any more. The lake's folders, manifests and compaction records name
patients by pseudonym (a keyed HMAC, :meth:`streams.lake.keystore.Kms.pseudonym`) and files'
keys by reference, so a patient id at rest outside the exempt stores is a finding.

:func:`enumeration_attack` repeats the dictionary attack of tests/test_anchoring.py on real
leaves: for sampled sealed readings, every plausible value at nearby device times, hashed the
way an unsalted leaf would be, must match none of the batch's leaves.
"""

from __future__ import annotations

import base64
import gzip
import itertools
import json
import math
import random
import re
import struct
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vitalproof.settings import Settings

#: Paths under the state folder that are not scanned, and why (docs/reliability.md repeats it).
EXEMPT: dict[str, str] = {
    "keys": "the keystore: patient keys and salts are on disk by design (a KMS in production)",
    "registry.sqlite3": "the device registry: enrolment maps device ids to patient ids",
    "clinic": "consent store, audit log and token issuer key: they name patients by design",
    "stack/kafka": "Kafka's log segments: vitals.raw/clean hold plaintext payloads by design",
    "stack/mosquitto": "Mosquitto's persistence, passwords and ACL: device ids are its users",
    "secrets": "secrets handed to processes",
    "run": "per-process secret folders",
    "logs": "process logs (operators' diagnostics, not data at rest of the pipeline)",
    "runs": "the simulator's ground truth (test artefact: the ids and digests it sent)",
}

#: What the scan finds and reports as known rather than hidden: ``(where, kind)`` pairs.
#: Empty: the lake's patient folders and manifests carried plaintext patient ids until
#: they were pseudonymised (docs/reliability.md, "Privacy scan").
KNOWN_FINDINGS: dict[tuple[str, str], str] = {}

_TOKEN = re.compile(rb"[A-Za-z0-9_.:+-]{3,}")


@dataclass(frozen=True, slots=True)
class Needle:
    kind: str  # patient_id | device_id | value
    label: str  # what it stands for, readable
    encoding: str
    pattern: bytes


@dataclass(frozen=True, slots=True)
class Finding:
    where: str  # chain-calldata | chain-log | chain-storage | lake-file | lake-path | ...
    location: str  # tx hash, slot, file path
    kind: str
    label: str
    encoding: str

    @property
    def known(self) -> bool:
        return (self.where, self.kind) in KNOWN_FINDINGS


@dataclass
class ScanReport:
    namespace: str
    patients: int = 0
    devices: int = 0
    needles: int = 0
    chain_txs: int = 0
    chain_logs: int = 0
    chain_storage_slots: int = 0
    chain_bytes: int = 0
    files_scanned: int = 0
    bytes_scanned: int = 0
    exempt: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    enumeration_candidates: int = 0
    enumeration_matches: int = 0
    enumeration_control_ok: bool = False

    @property
    def unexpected(self) -> list[Finding]:
        return [f for f in self.findings if not f.known]

    @property
    def ok(self) -> bool:
        return (
            not self.unexpected
            and self.needles > 0
            and self.enumeration_matches == 0
            and self.enumeration_control_ok
        )

    def summary(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["findings"] = _group(self.findings)
        return doc | {"unexpected": len(self.unexpected), "ok": self.ok}


def _group(findings: list[Finding]) -> list[dict[str, Any]]:
    """Findings counted by (where, kind, encoding), with one example location each."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for f in findings:
        g = groups.setdefault(
            (f.where, f.kind, f.encoding),
            {"where": f.where, "kind": f.kind, "encoding": f.encoding, "count": 0,
             "example": f"{f.location}: {f.label}", "known": f.known},
        )  # fmt: skip
        g["count"] += 1
    return list(groups.values())


# -- what to look for ---------------------------------------------------------------------


def _id_patterns(value: str) -> Iterator[tuple[str, bytes]]:
    yield "ascii", value.encode()
    yield "utf-16le", value.encode("utf-16-le")
    yield "utf-16be", value.encode("utf-16-be")
    yield "hex", value.encode().hex().encode()
    yield "HEX", value.encode().hex().upper().encode()
    yield "base64", base64.b64encode(value.encode()).rstrip(b"=")[:-1]


def _distinctive(v: float) -> bool:
    """A float whose 8 bytes are not mostly zeros (72.0 is; 36.8421 is not)."""
    return math.isfinite(v) and struct.pack("<d", v)[:4] != b"\0\0\0\0"


def _value_patterns(a: float, b: float) -> Iterator[tuple[str, bytes]]:
    # A pair counts only with enough non-zero bytes: (0.0, 0.0) is in every EVM word.
    for enc, fmt, min_nonzero in (
        ("float64le pair", "<2d", 6),
        ("float64be pair", ">2d", 6),
        ("float32le pair", "<2f", 5),
        ("float32be pair", ">2f", 5),
    ):
        packed = struct.pack(fmt, a, b)
        if sum(1 for x in packed if x) >= min_nonzero:
            yield enc, packed
    if a or b:
        yield "json pair", f"{a!r},{b!r}".encode()
        yield "json pair (space)", f"{a!r}, {b!r}".encode()
    for v in (a, b):
        if _distinctive(v):
            yield "float64le", struct.pack("<d", v)
            yield "float64be", struct.pack(">d", v)
            if len(repr(v)) >= 6:
                yield "text", repr(v).encode()


def needles_from_rows(
    rows: list[dict[str, Any]], *, sample: int = 20, rng: random.Random | None = None
) -> tuple[list[Needle], set[str], set[str]]:
    """Needles from decrypted lake rows; also every patient id and device id (for the
    tokenising ASCII pass, which checks all of them)."""
    rng = rng or random.Random(0)
    patients = {str(r["patient_id"]) for r in rows}
    devices = {str(r["device_id"]) for r in rows}
    needles: list[Needle] = []
    for kind, ids in (("patient_id", patients), ("device_id", devices)):
        for value in rng.sample(sorted(ids), min(sample, len(ids))):
            needles.extend(Needle(kind, value, enc, pat) for enc, pat in _id_patterns(value))
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        v = r["value"]
        if v is None or not math.isfinite(v):
            continue
        series.setdefault((str(r["device_id"]), str(r["metric"])), []).append(
            (int(r["seq"]), float(v))
        )
    keys = rng.sample(sorted(series), min(3 * sample, len(series)))
    seen: set[bytes] = set()
    for key in keys:
        points = sorted(series[key])
        for (_, a), (_, b) in list(itertools.pairwise(points))[:3]:
            for enc, pat in _value_patterns(a, b):
                if pat not in seen:
                    seen.add(pat)
                    needles.append(Needle("value", f"{key[1]} {a!r},{b!r}", enc, pat))
    return needles, patients, devices


def _scan_blob(
    blob: bytes, where: str, location: str, needles: list[Needle], ids: dict[bytes, str]
) -> list[Finding]:
    found = [
        Finding(where, location, n.kind, n.label, n.encoding) for n in needles if n.pattern in blob
    ]
    ascii_hits = {n.label for n in needles if n.encoding == "ascii" and n.pattern in blob}
    for token in set(_TOKEN.findall(blob)):
        for part in {token, *re.split(rb"[=:+]", token)}:
            kind = ids.get(part)
            if kind is not None and part.decode() not in ascii_hits:
                ascii_hits.add(part.decode())
                found.append(Finding(where, location, kind, part.decode(), "ascii"))
    return found


# -- the chain ----------------------------------------------------------------------------


def _rpc(url: str, method: str, params: list[Any]) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        reply = json.load(r)
    if "error" in reply:
        raise RuntimeError(f"{method}: {reply['error'].get('message', reply['error'])}")
    return reply["result"]


def _hexbytes(h: str | None) -> bytes:
    if not h:
        return b""
    h = h.removeprefix("0x")
    return bytes.fromhex(h if len(h) % 2 == 0 else "0" + h)


def chain_blobs(rpc_url: str, report: ScanReport) -> Iterator[tuple[str, str, bytes]]:
    """``(where, location, bytes)`` of everything the chain holds that a run could write."""
    latest = int(_rpc(rpc_url, "eth_blockNumber", []), 16)
    for number in range(latest + 1):
        block = _rpc(rpc_url, "eth_getBlockByNumber", [hex(number), True])
        yield "chain-block", f"block {number} extraData", _hexbytes(block.get("extraData"))
        for tx in block["transactions"]:
            report.chain_txs += 1
            yield "chain-calldata", str(tx["hash"]), _hexbytes(tx.get("input"))
    for log in _rpc(rpc_url, "eth_getLogs", [{"fromBlock": "0x0", "toBlock": "latest"}]):
        report.chain_logs += 1
        blob = _hexbytes(log["data"]) + b"".join(_hexbytes(t) for t in log["topics"])
        yield "chain-log", f"{log['transactionHash']} log {int(log['logIndex'], 16)}", blob
    try:
        dump = _hexbytes(_rpc(rpc_url, "anvil_dumpState", []))
    except (RuntimeError, OSError):
        dump = b""
    if dump:
        state = json.loads(gzip.decompress(dump) if dump[:2] == b"\x1f\x8b" else dump)
        for address, account in state.get("accounts", {}).items():
            storage = account.get("storage") or {}
            report.chain_storage_slots += len(storage)
            blob = b"".join(_hexbytes(k) + _hexbytes(v) for k, v in storage.items())
            yield "chain-storage", f"{address} ({len(storage)} slots)", blob
            yield "chain-code", address, _hexbytes(account.get("code"))
    else:  # no dump: the first slots of every contract a transaction created
        for number in range(latest + 1):
            block = _rpc(rpc_url, "eth_getBlockByNumber", [hex(number), True])
            for tx in block["transactions"]:
                if tx.get("to"):
                    continue
                receipt = _rpc(rpc_url, "eth_getTransactionReceipt", [tx["hash"]])
                address = receipt["contractAddress"]
                slots = [
                    _hexbytes(_rpc(rpc_url, "eth_getStorageAt", [address, hex(i), "latest"]))
                    for i in range(64)
                ]
                report.chain_storage_slots += len(slots)
                yield "chain-storage", f"{address} (slots 0-63)", b"".join(slots)


# -- the disk -----------------------------------------------------------------------------


def _exempt(rel: Path) -> bool:
    text = rel.as_posix()
    return any(text == e or text.startswith(e + "/") for e in EXEMPT)


#: Folders of the state folder that hold one subfolder per namespace.
PER_NAMESPACE = ("lake", "anchor", "faust")


def disk_blobs(
    home: Path, lake_dir: Path, report: ScanReport, namespace: str | None = None
) -> Iterator[tuple[str, str, bytes]]:
    """Every file (content and name) under ``home`` that is not exempt; with ``namespace``,
    of the per-namespace folders only that namespace's (the others hold other runs' data,
    whose ids the scan does not look for)."""
    for path in sorted(home.rglob("*")):
        rel = path.relative_to(home)
        if _exempt(rel) or path.is_symlink():
            continue
        parts = rel.parts
        if namespace and len(parts) >= 2 and parts[0] in PER_NAMESPACE and parts[1] != namespace:
            continue
        in_lake = path.is_relative_to(lake_dir)
        kind = "lake" if in_lake else "state"
        yield f"{kind}-path", rel.as_posix(), rel.as_posix().encode()
        if not path.is_file():
            continue
        data = path.read_bytes()
        report.files_scanned += 1
        report.bytes_scanned += len(data)
        where = f"{kind}-manifest" if in_lake and path.suffix == ".json" else f"{kind}-file"
        yield where, rel.as_posix(), data


# -- the scan -----------------------------------------------------------------------------


def scan(
    settings: Settings,
    *,
    rpc_url: str | None,
    sample: int = 20,
    enumerate_readings: int = 3,
    rng: random.Random | None = None,
    only_namespace: bool = False,
) -> ScanReport:
    """Scan the chain at ``rpc_url`` and the state folder of ``settings`` for the namespace's
    own patient ids, device ids and sample values; then the enumeration attack."""
    from clinic.proofs import LakeView

    rng = rng or random.Random(0)
    report = ScanReport(settings.namespace, exempt=dict(EXEMPT))
    view = LakeView(settings)
    rows = view.table().to_pylist()
    if not rows:
        raise ValueError(f"namespace {settings.namespace}: the lake holds no readings to look for")
    needles, patients, devices = needles_from_rows(rows, sample=sample, rng=rng)
    report.patients, report.devices, report.needles = len(patients), len(devices), len(needles)
    ids = {p.encode(): "patient_id" for p in patients} | {d.encode(): "device_id" for d in devices}
    blobs: Iterable[tuple[str, str, bytes]] = disk_blobs(
        settings.paths.home,
        settings.lake_dir,
        report,
        settings.namespace if only_namespace else None,
    )
    for where, location, blob in blobs:
        report.findings.extend(_scan_blob(blob, where, location, needles, ids))
    if rpc_url:
        for where, location, blob in chain_blobs(rpc_url, report):
            report.chain_bytes += len(blob)
            report.findings.extend(_scan_blob(blob, where, location, needles, ids))
    enumeration_attack(view, rows, report, enumerate_readings, rng)
    return report


def enumeration_attack(
    view: Any, rows: list[dict[str, Any]], report: ScanReport, n: int, rng: random.Random
) -> None:
    """For ``n`` sampled sealed readings: an attacker who knows all of a reading but its
    value and exact second tries every plausible value (the metric's range, at the
    resolution of the device) at device times within 2 s, hashing the way an unsalted leaf
    would be. None may match a leaf of the batch. The control: the reading's own salted leaf
    is in the batch."""
    import hashlib

    from streams.lake.layout import BATCHES_DIR
    from vitalproof.manifest import BatchManifest
    from vitalproof_verify.leaves import canonical_reading_bytes, leaf_hash_salted, reading_id

    picks = rng.sample(rows, min(n, len(rows)))
    control = True
    for row in picks:
        rid = str(row["reading_id"]) if isinstance(row["reading_id"], str) else None
        if rid is None:
            rid = bytes(row["reading_id"]).hex()
        bundle = view.bundle(rid, row | {"reading_id": rid})
        m = BatchManifest.model_validate_json(
            view._file(f"{BATCHES_DIR}/{bundle.batch.batch_id}.json")
        )
        if m.leaves_path is not None:  # tree version 1: every leaf kept beside the lake
            raw = view._file(m.leaves_path)
            leaves = {raw[i : i + 32] for i in range(0, len(raw), 32)}
        else:  # version 2: the patient roots on disk, and the leaves a bundle reveals
            patient = str(row["patient_id"])
            roots = [bytes.fromhex(r) for r in m.patient_roots or []]
            mine = roots[m.patients.index(view.kms.pseudonym(patient))]
            leaves = set(roots) | set(view.patient_leaves(m, patient, mine))
        reading = bundle.reading
        control &= leaf_hash_salted(bytes.fromhex(bundle.salt), reading.canonical_bytes()) in leaves
        fields = reading.model_dump()
        true_value = fields["value"]
        if true_value is None:
            continue
        lo, hi = max(0.0, true_value - 60), true_value + 60
        step = 0.1 if true_value != round(true_value) else 1.0
        values = {round(lo + i * step, 6) for i in range(int((hi - lo) / step) + 1)}
        values.add(true_value)
        for dt in range(-2, 3):
            t = fields["device_time_us"] + dt * 1_000_000
            rid_t = reading_id(fields["device_id"], fields["metric"], fields["seq"], t)
            guess = fields | {"device_time_us": t, "reading_id": rid_t}
            for v in values:
                candidate = canonical_reading_bytes(**(guess | {"value": v}))
                report.enumeration_candidates += 1
                if hashlib.sha256(b"\x00" + candidate).digest() in leaves:
                    report.enumeration_matches += 1
    report.enumeration_control_ok = control and bool(picks)


# -- the command line ---------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    p = sub.add_parser("privacy", help="scan the chain and the state folder for plaintext PHI")
    psub = p.add_subparsers(dest="action", required=True)
    sc = psub.add_parser("scan", help="one namespace's ids and values, on chain and at rest")
    sc.add_argument("--namespace", required=True, help="e.g. the demo's (demo-1a2b3c4d)")
    sc.add_argument("--rpc", help="JSON-RPC endpoint of the chain (default: the settings')")
    sc.add_argument("--sample", type=int, default=20, help="ids and series sampled per kind")
    p.set_defaults(handler=cmd_privacy)


def cmd_privacy(args: Any, settings: Settings) -> int:
    import sys

    rs = settings.evolve(kafka={"topic_prefix": f"{args.namespace}."})
    if not rs.lake_dir.is_dir():
        print(f"error: no lake for namespace {args.namespace!r} at {rs.lake_dir}", file=sys.stderr)
        return 2
    rpc = args.rpc or settings.chain.rpc_url
    report = scan(rs, rpc_url=rpc, sample=args.sample, only_namespace=True)
    print(json.dumps(report.summary(), indent=2, default=str))
    if not rpc:
        print("warning: no --rpc given: the chain was not scanned", file=sys.stderr)
    return 0 if report.ok else 1
