"""Proof bundles: one reading, its two Merkle paths and the transaction that anchored them.

A bundle must stand alone (ARCHITECTURE invariant 4): with only the bundle and any Ethereum
JSON-RPC endpoint, anyone can check that the reading was anchored, in which transaction,
block and time. This module is the offline half of that check; the on-chain half lives in
:func:`anchor.chain.check_anchor_on_chain` and is applied to ``bundle.anchor``.

The chain of commitments a verifier walks::

    reading fields ─canonical JSON─▶ SHA-256(0x00 || salt || canonical)   = leaf_hash
    leaf_hash ─batch.path─▶ batch.batch_root            (RFC 9162 inclusion, batch_size leaves)
    (batch_id, batch_root, batch_size) ─anchor.log leaf─▶ ─log.path─▶ log.root
    (log.tree_size, log.root) == (anchor.tree_size, anchor.root)  ─▶ on-chain event

Encodings (schema ``anchor/schemas/proof-bundle-v1.json``): Merkle values are 64 lowercase
hex digits; values that come from Ethereum (``anchor.*`` hashes and the root as the contract
stores it) are 0x-prefixed lowercase hex, as JSON-RPC returns them. One spelling per value,
so the same proof always serialises to the same bytes.

Only ``vitalproof.schema``, ``vitalproof.errors`` and ``anchor.*`` are imported: a verifier
needs nothing of the pipeline.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from anchor import merkle
from anchor.errors import AnchorError, MerkleError, ProofError, ProofFailure
from anchor.log import MerkleLog, log_leaf_hash
from vitalproof.schema import Reading, canonical_reading_bytes

__all__ = [
    "BUNDLE_VERSION",
    "MAX_BUNDLE_BYTES",
    "AnchorRef",
    "BatchProof",
    "LogProof",
    "ProofBundle",
    "ReadingFields",
    "build_bundle",
    "load_bundle",
    "verify_offline",
]

BUNDLE_VERSION: Final = 1
#: A real bundle is a few kilobytes; anything this large is not one, and is refused unread.
MAX_BUNDLE_BYTES = 1 << 20
#: Deeper than any tree with 2^64 leaves: a longer path is an attack or a bug.
MAX_PATH_LENGTH = 64
_UINT64_MAX = 2**64 - 1

Hex32 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
EthHash = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-f]{64}$")]
Address = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-fA-F]{40}$")]
UInt64 = Annotated[int, Field(ge=0, le=_UINT64_MAX)]
Size64 = Annotated[int, Field(ge=1, le=_UINT64_MAX)]
HashPath = Annotated[list[Hex32], Field(max_length=MAX_PATH_LENGTH)]


class _Strict(BaseModel):
    # strict: "17" is not 17 and true is not 1; a verifier that coerces would accept bundles
    # the schema rejects. extra=forbid: an unknown field is a different format, not a comment.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class ReadingFields(_Strict):
    """Exactly the arguments of :func:`vitalproof.schema.canonical_reading_bytes`."""

    reading_id: str
    device_id: str
    patient_id: str
    metric: str
    value: float | None
    unit: str
    device_time_us: int
    seq: int
    quality: int

    @classmethod
    def of(cls, reading: Reading) -> ReadingFields:
        return cls(
            reading_id=reading.reading_id,
            device_id=reading.device_id,
            patient_id=reading.patient_id,
            metric=reading.metric.value,
            value=reading.value,
            unit=reading.unit,
            device_time_us=reading.device_time_us,
            seq=reading.seq,
            quality=reading.quality,
        )

    def canonical_bytes(self) -> bytes:
        return canonical_reading_bytes(**self.model_dump())


class BatchProof(_Strict):
    batch_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    batch_root: Hex32
    batch_size: Size64
    leaf_index: UInt64
    path: HashPath


class LogProof(_Strict):
    leaf_index: UInt64
    tree_size: Size64
    root: Hex32
    path: HashPath


class AnchorRef(_Strict):
    """Where the log head is on-chain: the arguments of ``check_anchor_on_chain``."""

    chain_id: Annotated[int, Field(ge=1)]
    contract: Address
    tx_hash: EthHash
    block_number: UInt64
    block_hash: EthHash
    log_index: UInt64
    tree_size: Size64
    root: EthHash
    block_timestamp: UInt64

    @classmethod
    def from_receipt(cls, receipt: Mapping[str, Any]) -> AnchorRef:
        """From ``AnchorReceipt.to_json_dict()`` (as stored in anchors.jsonl); extras dropped."""
        try:
            return cls.model_validate({k: receipt[k] for k in cls.model_fields})
        except (KeyError, ValidationError) as e:
            raise AnchorError(f"anchor record lacks what a bundle needs: {e}") from None


class ProofBundle(_Strict):
    version: Literal[1]
    reading: ReadingFields
    salt: Hex32
    leaf_hash: Hex32
    batch: BatchProof
    log: LogProof
    anchor: AnchorRef

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode() + b"\n"


def _first_error(e: ValidationError) -> str:
    errors = e.errors(include_url=False)
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "bundle"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def load_bundle(data: bytes | str) -> ProofBundle:
    """Parse and validate a bundle; anything that is not a version-1 bundle is MALFORMED."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise ProofError(ProofFailure.MALFORMED, f"bundle larger than {MAX_BUNDLE_BYTES} bytes")
    try:
        return ProofBundle.model_validate_json(data)
    except ValidationError as e:
        raise ProofError(ProofFailure.MALFORMED, _first_error(e)) from None


def _hashes(values: Sequence[str]) -> list[bytes]:
    return [bytes.fromhex(v.removeprefix("0x")) for v in values]


def verify_offline(bundle: ProofBundle | bytes | str) -> None:
    """Every check that needs no chain, in order; raise :class:`ProofError` at the first failure.

    Order is part of the contract: each failure is reported at the earliest link that
    breaks, so "wrong leaf" means the reading, salt or leaf hash was altered, and a batch
    path that is fine but sits in the wrong log is a log-path failure. Caveat the verifier
    should know: an RFC 9162 path does not commit to the tree size, so an altered
    ``batch.batch_size`` may pass the batch path and is caught by the log leaf (which
    contains it) instead, and an altered ``log.tree_size`` by the comparison with the anchor.
    """
    b = bundle if isinstance(bundle, ProofBundle) else load_bundle(bundle)
    try:
        salt, claimed_leaf, batch_root, log_root, anchor_root = _hashes(
            [b.salt, b.leaf_hash, b.batch.batch_root, b.log.root, b.anchor.root]
        )
        batch_path, log_path = _hashes(b.batch.path), _hashes(b.log.path)
        canonical = b.reading.canonical_bytes()
        leaf = merkle.leaf_hash_salted(salt, canonical)
        log_leaf = log_leaf_hash(b.batch.batch_id, batch_root, b.batch.batch_size)
    except (ValueError, TypeError, AnchorError) as e:
        # Only reachable for a bundle built without validation (model_construct).
        raise ProofError(ProofFailure.MALFORMED, str(e)) from None

    if not hmac.compare_digest(leaf, claimed_leaf):
        raise ProofError(
            ProofFailure.WRONG_LEAF,
            f"reading and salt hash to {leaf.hex()}, bundle claims {claimed_leaf.hex()}",
        )
    try:
        merkle.verify_inclusion(
            leaf, b.batch.leaf_index, b.batch.batch_size, batch_path, batch_root
        )
    except MerkleError as e:
        raise ProofError(
            ProofFailure.WRONG_BATCH_PATH, f"leaf not in batch {b.batch.batch_id!r}: {e}"
        ) from None
    try:
        merkle.verify_inclusion(log_leaf, b.log.leaf_index, b.log.tree_size, log_path, log_root)
    except MerkleError as e:
        raise ProofError(
            ProofFailure.WRONG_LOG_PATH, f"batch {b.batch.batch_id!r} not in the log: {e}"
        ) from None
    if b.log.tree_size != b.anchor.tree_size or not hmac.compare_digest(log_root, anchor_root):
        raise ProofError(
            ProofFailure.ROOT_NOT_ON_CHAIN,
            f"log head (size {b.log.tree_size}, root {log_root.hex()}) is not the anchored "
            f"head (size {b.anchor.tree_size}, root {anchor_root.hex()})",
        )


def build_bundle(
    *,
    reading: Reading | ReadingFields | Mapping[str, Any],
    salt: bytes,
    batch_id: str,
    batch: merkle.MerkleTree | Sequence[bytes],
    leaf_index: int,
    log: MerkleLog,
    anchor: AnchorRef | None = None,
) -> ProofBundle:
    """Assemble the bundle for one reading of a sealed, logged and anchored batch.

    ``batch`` is the batch's tree (or its leaf hashes; pass a :class:`~anchor.merkle.MerkleTree`
    when building many bundles from one batch). ``anchor`` defaults to the earliest anchored
    head that covers the batch. The result is verified before it is returned: a prover must
    never hand out a bundle that fails, whatever the inputs were.
    """
    if isinstance(reading, Reading):
        fields = ReadingFields.of(reading)
    elif isinstance(reading, ReadingFields):
        fields = reading
    else:
        fields = ReadingFields.model_validate(dict(reading))
    tree = batch if isinstance(batch, merkle.MerkleTree) else merkle.MerkleTree(batch)
    leaf = merkle.leaf_hash_salted(salt, fields.canonical_bytes())
    batch_path = tree.inclusion_proof(leaf_index)  # MerkleError (an AnchorError) if outside
    log_index = log.index_of(batch_id)
    if log_index is None:
        raise AnchorError(f"batch {batch_id!r} is not in the log")
    entry = log.entry(log_index)
    if (entry.batch_root, entry.batch_size) != (tree.root(), tree.size):
        raise AnchorError(f"batch {batch_id!r} in the log has another root or size")
    if anchor is None:
        head = log.anchor_covering(log_index)
        if head is None:
            raise AnchorError(f"batch {batch_id!r} (log index {log_index}) is not anchored yet")
        anchor = AnchorRef.from_receipt(head.anchor)
    if anchor.tree_size <= log_index:
        raise AnchorError(f"anchor of size {anchor.tree_size} does not cover index {log_index}")
    bundle = ProofBundle(
        version=BUNDLE_VERSION,
        reading=fields,
        salt=salt.hex(),
        leaf_hash=leaf.hex(),
        batch=BatchProof(
            batch_id=batch_id,
            batch_root=entry.batch_root.hex(),
            batch_size=entry.batch_size,
            leaf_index=leaf_index,
            path=[p.hex() for p in batch_path],
        ),
        log=LogProof(
            leaf_index=log_index,
            tree_size=anchor.tree_size,
            root=log.root(anchor.tree_size).hex(),
            path=[p.hex() for p in log.inclusion_proof(log_index, anchor.tree_size)],
        ),
        anchor=anchor,
    )
    try:
        verify_offline(bundle)
    except ProofError as e:
        raise AnchorError(f"refusing to build a bundle that does not verify: {e}") from e
    return bundle
