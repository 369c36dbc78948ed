"""One audit record, its canonical bytes, and the hash chain: checkable without the database.

Everything here is pure (no I/O), so the same code checks the SQLite log
(:class:`clinic.audit.AuditLog`) and a JSON export a patient was given.

**Canonical encoding, version 1.** A record's bytes are the JSON object of all its fields
but ``hash``, plus ``"v": 1``, with sorted keys, no whitespace and ASCII only (Python's
``json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)``)::

    {"action":"read","actor":"Practitioner/dr-a","count":3,"outcome":"allowed",
     "patient_id":"p-1","prev_hash":"<64 hex>","purpose":"TREAT","reason":"consent c-7",
     "role":"clinician","seq":1,"time_us":1800000000000000,"v":1,"what":"Observation?..."}

``patient_id`` and ``purpose`` are ``null`` when absent. ``hash`` is the lowercase hex
SHA-256 of those bytes; ``prev_hash`` is the previous record's ``hash``, and the first
record's is 64 zeros (32 zero bytes). Sequence numbers start at 1 and have no gaps. JSON, as
for the Merkle log's leaves (:func:`vitalproof_verify.leaves.log_leaf_data`), so anyone can
re-implement the check with any JSON library and SHA-256.

Because ``prev_hash`` is inside the hashed bytes, editing, deleting or reordering any record
breaks the link to its successor; a truncated tail is caught by the checkpoints, whose
Merkle roots are anchored (:mod:`clinic.audit.anchoring`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from vitalproof.errors import VitalproofError

__all__ = [
    "GENESIS_HASH",
    "RECORD_VERSION",
    "ROLES",
    "AuditAction",
    "AuditEntry",
    "AuditError",
    "AuditRecord",
    "Outcome",
    "check_record",
    "check_records",
    "verify_chain",
]

RECORD_VERSION = 1
#: ``prev_hash`` of the first record: 32 zero bytes.
GENESIS_HASH = "00" * 32
#: Who may act: a clinician, the patient themself, an operator, or the service itself.
ROLES = frozenset({"clinician", "patient", "operator", "system"})
#: Bounds that keep one record small; ``what`` names a query or a stream, never data values.
MAX_TEXT = 4096


class AuditError(VitalproofError):
    """An audit record is invalid, or the chain is broken (``seq`` names the first bad one)."""

    def __init__(self, message: str, *, seq: int | None = None) -> None:
        super().__init__(message if seq is None else f"audit record {seq}: {message}")
        self.seq = seq
        self.reason = message


class AuditAction(StrEnum):
    READ = "read"
    """History read from the lake (FHIR Observation search)."""
    STREAM = "stream"
    """Readings delivered on a live stream (one record per delivery batch)."""
    PROOF = "proof"
    """A proof bundle of a reading handed out."""
    CONSENT = "consent"
    """A grant made, changed or revoked."""
    BREAK_GLASS = "break-glass"
    """Emergency access opened without consent (purpose ``BTG``)."""
    ERASURE = "erasure"
    """A patient's keys and salts destroyed."""
    SUBSCRIBE = "subscribe"
    """A live subscription opened (or refused)."""


class Outcome(StrEnum):
    ALLOWED = "allowed"
    REFUSED = "refused"


def _text(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        raise AuditError(f"{name} must be a non-empty string, got {value!r}")
    if len(value) > MAX_TEXT:
        raise AuditError(f"{name} is longer than {MAX_TEXT} characters")


def _int(name: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise AuditError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _hex32(name: str, value: object) -> None:
    if not isinstance(value, str) or len(value) != 64 or value.strip("0123456789abcdef"):
        raise AuditError(f"{name} must be 64 lowercase hex digits, got {value!r}")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """What a caller records; the log adds ``seq``, ``time_us`` and the hashes."""

    actor: str
    role: str
    patient_id: str | None
    action: AuditAction
    what: str
    purpose: str | None
    outcome: Outcome
    reason: str
    count: int = 0

    def __post_init__(self) -> None:
        _text("actor", self.actor)
        if self.role not in ROLES:
            raise AuditError(f"role must be one of {sorted(ROLES)}, got {self.role!r}")
        _text("patient_id", self.patient_id, optional=True)
        # StrEnum(value) accepts the enum itself and its string; anything else is refused
        try:
            object.__setattr__(self, "action", AuditAction(self.action))
            object.__setattr__(self, "outcome", Outcome(self.outcome))
        except ValueError as e:
            raise AuditError(str(e)) from None
        _text("what", self.what)
        _text("purpose", self.purpose, optional=True)
        _text("reason", self.reason)
        _int("count", self.count, minimum=0)
        if self.outcome is Outcome.REFUSED and self.count:
            raise AuditError(f"a refusal discloses nothing: count must be 0, got {self.count}")


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One stored record: an :class:`AuditEntry` plus its place in the chain."""

    seq: int
    time_us: int
    actor: str
    role: str
    patient_id: str | None
    action: AuditAction
    what: str
    purpose: str | None
    outcome: Outcome
    reason: str
    count: int
    prev_hash: str
    hash: str

    @classmethod
    def seal(cls, entry: AuditEntry, *, seq: int, time_us: int, prev_hash: str) -> AuditRecord:
        """The record that follows ``prev_hash`` at ``seq``, with its hash computed."""
        _int("seq", seq, minimum=1)
        _int("time_us", time_us, minimum=0)
        _hex32("prev_hash", prev_hash)
        fields = {f: getattr(entry, f) for f in AuditEntry.__dataclass_fields__}
        doc = _canonical_doc(seq=seq, time_us=time_us, prev_hash=prev_hash, **fields)
        return cls(seq=seq, time_us=time_us, prev_hash=prev_hash, hash=_sha256(doc), **fields)

    def canonical_doc(self) -> dict[str, Any]:
        """The fields the hash covers (all but ``hash``, plus the version ``v``)."""
        return _canonical_doc(**{f: getattr(self, f) for f in _CHAINED_FIELDS})

    def canonical_bytes(self) -> bytes:
        return _encode(self.canonical_doc())

    def computed_hash(self) -> str:
        """The hash these fields should have; differs from :attr:`hash` if one was edited."""
        return _sha256(self.canonical_doc())

    def to_json_dict(self) -> dict[str, Any]:
        """Every field, ``hash`` included: what ``vitalproof audit list --json`` prints and
        what :meth:`from_json_dict` reads back for checking."""
        doc = self.canonical_doc()
        del doc["v"]
        doc["hash"] = self.hash
        return doc

    @classmethod
    def from_json_dict(cls, doc: Mapping[str, Any]) -> AuditRecord:
        """Read a record (e.g. from an export); fields are validated, the hash is not
        (that is :func:`verify_chain`'s or :func:`check_records`' job)."""
        try:
            entry = AuditEntry(
                actor=doc["actor"],
                role=doc["role"],
                patient_id=doc["patient_id"],
                action=doc["action"],
                what=doc["what"],
                purpose=doc["purpose"],
                outcome=doc["outcome"],
                reason=doc["reason"],
                count=doc["count"],
            )
            seq, time_us = doc["seq"], doc["time_us"]
            prev_hash, hash_ = doc["prev_hash"], doc["hash"]
        except KeyError as e:
            raise AuditError(f"field {e.args[0]!r} missing", seq=_seq_of(doc)) from None
        except TypeError as e:
            raise AuditError(f"not a record: {e}", seq=_seq_of(doc)) from None
        except AuditError as e:
            raise AuditError(e.reason, seq=_seq_of(doc)) from None
        _int("seq", seq, minimum=1)
        _int("time_us", time_us, minimum=0)
        _hex32("prev_hash", prev_hash)
        _hex32("hash", hash_)
        fields = {f: getattr(entry, f) for f in AuditEntry.__dataclass_fields__}
        return cls(seq=seq, time_us=time_us, prev_hash=prev_hash, hash=hash_, **fields)

    @property
    def leaf(self) -> bytes:
        """The record's hash as bytes: the data of its leaf in the audit Merkle tree."""
        return bytes.fromhex(self.hash)


#: The fields the hash covers, in declaration order (everything but ``hash``).
_CHAINED_FIELDS = tuple(f for f in AuditRecord.__dataclass_fields__ if f != "hash")


def _seq_of(doc: object) -> int | None:
    seq = doc.get("seq") if isinstance(doc, Mapping) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def _canonical_doc(**fields: Any) -> dict[str, Any]:
    doc = {k: (v.value if isinstance(v, StrEnum) else v) for k, v in fields.items()}
    doc["v"] = RECORD_VERSION
    return doc


def _encode(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _sha256(doc: Mapping[str, Any]) -> str:
    return hashlib.sha256(_encode(doc)).hexdigest()


def check_record(rec: AuditRecord) -> None:
    """Raise :class:`AuditError` naming ``rec.seq`` unless its hash matches its fields."""
    if rec.computed_hash() != rec.hash:
        raise AuditError(
            f"hash {rec.hash} does not match its fields (they hash to {rec.computed_hash()}): "
            "the record was edited",
            seq=rec.seq,
        )


def verify_chain(
    records: Iterable[AuditRecord], *, first_seq: int = 1, prev_hash: str = GENESIS_HASH
) -> tuple[int, str]:
    """Check a contiguous run of records; return ``(count, last hash)``.

    ``first_seq`` and ``prev_hash`` say where the run starts (the defaults: the whole log),
    so a log can be checked from a checkpoint onwards. Raises :class:`AuditError` with the
    first bad ``seq``: a record out of place (deleted, inserted, reordered), one whose fields
    do not give its hash (edited), or one that does not link to its predecessor.
    """
    expected, n = first_seq, 0
    for rec in records:
        if rec.seq != expected:
            missing = "missing" if rec.seq > expected else "out of order"
            raise AuditError(
                f"{missing}: found record {rec.seq} where {expected} should be", seq=expected
            )
        check_record(rec)
        if rec.prev_hash != prev_hash:
            raise AuditError(
                f"prev_hash {rec.prev_hash} is not the previous record's hash {prev_hash}: "
                "the chain was cut or spliced here",
                seq=rec.seq,
            )
        prev_hash, expected, n = rec.hash, expected + 1, n + 1
    return n, prev_hash


def check_records(records: Iterable[AuditRecord]) -> tuple[int, int]:
    """Check an export that may be a subset (say, one patient's records): every record's
    hash against its fields, and the link of every record whose predecessor is present.

    Returns ``(records checked, links checked)``. A subset cannot prove that nothing is
    missing between its records; the audit Merkle root (anchored) does that.
    """
    by_seq: dict[int, AuditRecord] = {}
    for rec in records:
        if rec.seq in by_seq:
            raise AuditError("appears twice", seq=rec.seq)
        check_record(rec)
        by_seq[rec.seq] = rec
    links = 0
    for seq in sorted(by_seq):
        rec = by_seq[seq]
        before = by_seq.get(seq - 1)
        expected = GENESIS_HASH if seq == 1 else (before.hash if before else None)
        if expected is None:
            continue
        if rec.prev_hash != expected:
            raise AuditError(
                f"prev_hash {rec.prev_hash} is not record {seq - 1}'s hash {expected}", seq=seq
            )
        links += 1
    return len(by_seq), links
