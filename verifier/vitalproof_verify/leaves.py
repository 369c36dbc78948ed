"""What a Merkle leaf commits to: a reading's id and canonical bytes, its salt's use, and the
log leaf of a sealed batch.

These are the definitions every other implementation must agree with byte for byte (the
sealer's native and vectorised paths are held equal to them by tests/test_native.py and
tests/test_fast_paths.py). Two kinds of leaf exist:

* a **reading leaf** in a batch tree: ``SHA-256(0x00 || salt || canonical_reading_bytes)``,
  where the salt is a 32-byte HMAC-SHA-256 output kept off-chain, so a published leaf or path
  cannot be reversed by enumerating the few values a vital sign can take (invariant "no health
  data on-chain", docs/invariants.md);
* a **log leaf** in the append-only log of batches: ``SHA-256(0x00 || entry)``, where the
  entry is the canonical JSON of ``{batch_id, batch_root, batch_size, v}``.

Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import math

from vitalproof_verify.errors import MerkleError
from vitalproof_verify.merkle import HASH_SIZE, leaf_hash

__all__ = [
    "LOG_ENTRY_VERSION",
    "MAX_BATCH_ID_LENGTH",
    "SALT_SIZE",
    "canonical_reading_bytes",
    "check_log_entry",
    "leaf_hash_salted",
    "log_leaf_data",
    "log_leaf_hash",
    "reading_id",
]

#: Salts are HMAC-SHA-256 outputs: fixed length, so ``salt || canonical`` splits one way only.
SALT_SIZE = 32
LOG_ENTRY_VERSION = 1
MAX_BATCH_ID_LENGTH = 256
_UINT64_MAX = 2**64 - 1  # the contract stores tree sizes as uint64

_LEAF_CTX = hashlib.sha256(b"\x00")


def reading_id(device_id: str, metric: str, seq: int, device_time_us: int) -> str:
    """Deterministic id of a reading: the same sample always gets the same id.

    It covers the device's own sequence number *and* time, so a sequence that restarts after
    a reboot does not collide with the readings before it, while a retransmission (same seq,
    same time) does, which is what deduplication needs.
    """
    material = f"{device_id}\x1f{metric}\x1f{seq}\x1f{device_time_us}".encode()
    return hashlib.blake2b(material, digest_size=16).hexdigest()


def canonical_reading_bytes(
    *,
    reading_id: str,
    device_id: str,
    patient_id: str,
    metric: str,
    value: float | None,
    unit: str,
    device_time_us: int,
    seq: int,
    quality: int,
) -> bytes:
    """Canonical JSON of what a reading *is*: sorted keys, no spaces, shortest float form.

    Transport metadata (gateway, receive time) is left out on purpose: a retransmission via
    another gateway is the same reading and must hash the same.
    """
    v: float | None = None if value is None or math.isnan(value) else float(value)
    doc = {
        "device_id": device_id,
        "device_time_us": int(device_time_us),
        "metric": metric,
        "patient_id": patient_id,
        "quality": int(quality),
        "reading_id": reading_id,
        "seq": int(seq),
        "unit": unit,
        "value": v,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def leaf_hash_salted(salt: bytes, canonical: bytes) -> bytes:
    """Leaf hash of a salted reading: SHA-256(0x00 || salt || canonical).

    Vitals have so little entropy (a heart rate is one of ~200 integers) that an unsalted
    leaf could be reversed by enumeration; the salt makes a published leaf or path useless
    without the off-chain salt. The salt is an HMAC-SHA-256 output and always exactly
    :data:`SALT_SIZE` bytes, so the leaf data ``salt || canonical`` has one and only one
    reading; no length prefix is needed. Any other length is refused rather than hashed,
    because accepting it would make that unambiguity a convention instead of a fact.
    """
    if len(salt) != SALT_SIZE:
        raise MerkleError(f"salt must be {SALT_SIZE} bytes, got {len(salt)}")
    h = _LEAF_CTX.copy()
    h.update(salt)
    h.update(canonical)
    return h.digest()


def check_log_entry(batch_id: object, batch_root: object, batch_size: object) -> None:
    """Raise :class:`MerkleError` unless the three make a valid log entry."""
    if not isinstance(batch_id, str) or not batch_id:
        raise MerkleError(f"batch_id must be a non-empty string, got {batch_id!r}")
    if len(batch_id) > MAX_BATCH_ID_LENGTH:
        raise MerkleError(f"batch_id longer than {MAX_BATCH_ID_LENGTH} characters")
    if not isinstance(batch_root, bytes) or len(batch_root) != HASH_SIZE:
        raise MerkleError(f"batch_root must be {HASH_SIZE} bytes")
    if (
        not isinstance(batch_size, int)
        or isinstance(batch_size, bool)
        or not 0 < batch_size <= _UINT64_MAX
    ):
        raise MerkleError(f"batch_size must be a positive 64-bit integer, got {batch_size!r}")


def log_leaf_data(batch_id: str, batch_root: bytes, batch_size: int) -> bytes:
    """The exact bytes a log leaf commits to (version 1).

    The canonical JSON of the batch entry, sorted keys, no whitespace, ASCII only, the root
    as 64 lowercase hex digits::

        {"batch_id":"<id>","batch_root":"<64 hex>","batch_size":<n>,"v":1}

    ``batch_size`` is in the leaf on purpose: an RFC 9162 inclusion path does not commit to
    the tree size, so a path into a batch can verify for more than one claimed size; the log
    leaf pins it. JSON (not a binary struct) keeps the format inspectable and
    re-implementable with any JSON library, and matches how reading leaves are canonicalised.
    """
    check_log_entry(batch_id, batch_root, batch_size)
    doc = {
        "batch_id": batch_id,
        "batch_root": batch_root.hex(),
        "batch_size": batch_size,
        "v": LOG_ENTRY_VERSION,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def log_leaf_hash(batch_id: str, batch_root: bytes, batch_size: int) -> bytes:
    """RFC 9162 leaf hash of a batch entry; what a verifier recomputes from a proof bundle."""
    return leaf_hash(log_leaf_data(batch_id, batch_root, batch_size))
