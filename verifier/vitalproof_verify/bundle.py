"""Proof bundles: one reading, its Merkle paths and the transaction that anchored them.

A bundle must stand alone (docs/invariants.md, "Proofs stand alone"): with only the bundle and
any Ethereum JSON-RPC endpoint, anyone can check that the reading was anchored, in which
transaction, block and time. This module is the offline half of that check and the bundle's
models; the on-chain half is :func:`vitalproof_verify.onchain.check_anchor_on_chain`, applied
to ``bundle.anchor``.

Two versions are read and checked (docs/wire-formats.md, "Proof bundle"). Version 2 is what
batches sealed since the two-level batch tree carry; version 1 bundles, handed out before,
verify as they always did. The chain of commitments a verifier walks, version 2::

    reading fields ─canonical JSON─▶ SHA-256(0x00 || salt || canonical)   = leaf_hash
    leaf_hash ─patient.path─▶ patient.root     (RFC 9162 inclusion, patient.size leaves)
    patient.root ─batch.path─▶ batch.batch_root (RFC 9162 inclusion, batch.patient_count
                                                 leaves: the patients' roots, sorted by id)
    (batch_id, batch_root, batch_size) ─log leaf─▶ ─log.path─▶ log.root
    (log.tree_size, log.root) == (anchor.tree_size, anchor.root)  ─▶ on-chain event

Version 1 has one batch level: ``leaf_hash ─batch.path─▶ batch.batch_root`` over all the
batch's readings (``batch.leaf_index`` of ``batch.batch_size``).

Encodings (schemas ``vitalproof_verify/schemas/proof-bundle-v{1,2}.json``): Merkle values are
64 lowercase hex digits; values that come from Ethereum (``anchor.*`` hashes and the root as
the contract stores it) are 0x-prefixed lowercase hex, as JSON-RPC returns them. One spelling
per value, so the same proof always serialises to the same bytes.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Sequence
from importlib import resources
from typing import Annotated, Any, Final, Literal, TypeAlias, cast

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from vitalproof_verify import merkle
from vitalproof_verify.errors import MerkleError, ProofError, ProofFailure
from vitalproof_verify.leaves import canonical_reading_bytes, leaf_hash_salted, log_leaf_hash

__all__ = [
    "BUNDLE_VERSION",
    "BUNDLE_VERSIONS",
    "MAX_BUNDLE_BYTES",
    "AnchorRef",
    "AnyBundle",
    "BatchProof",
    "BatchProofV2",
    "LogProof",
    "PatientProof",
    "ProofBundle",
    "ProofBundleV2",
    "Reading",
    "bundle_schema",
    "load_bundle",
    "verify_offline",
]

#: The version bundles are built in; every one of :data:`BUNDLE_VERSIONS` is verified.
BUNDLE_VERSION: Final = 2
BUNDLE_VERSIONS: Final = (1, 2)
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


class Reading(_Strict):
    """One reading as a leaf commits to it: exactly the arguments of
    :func:`vitalproof_verify.leaves.canonical_reading_bytes`.

    Transport metadata (gateway, receive time, clock estimate) is not part of a reading's
    identity: a retransmission through another gateway is the same reading.
    """

    reading_id: str
    device_id: str
    patient_id: str
    metric: str
    value: float | None  # None when the device sent a special value (Quality.INVALID)
    unit: str
    device_time_us: int
    seq: int
    quality: int

    def canonical_bytes(self) -> bytes:
        return canonical_reading_bytes(**self.model_dump())


class BatchProof(_Strict):
    """Version 1: the reading's leaf among all the batch's readings."""

    batch_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    batch_root: Hex32
    batch_size: Size64
    leaf_index: UInt64
    path: HashPath


class PatientProof(_Strict):
    """Version 2: the reading's leaf in its patient's subtree of the batch.

    ``leaf_index`` is the reading's place among the patient's readings of the batch in the
    canonical order (metric, device time, device id, seq); ``root`` is the subtree's RFC 9162
    root, which is itself leaf ``batch.patient_index`` of the batch tree.
    """

    root: Hex32
    size: Size64
    leaf_index: UInt64
    path: HashPath


class BatchProofV2(_Strict):
    """Version 2: the patient's subtree root among the batch's patients' roots.

    ``batch_size`` is the batch's number of readings (what the log leaf commits to, as in
    version 1); ``patient_count`` the number of leaves of the upper tree.
    """

    batch_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    batch_root: Hex32
    batch_size: Size64
    patient_index: UInt64
    patient_count: Size64
    path: HashPath


class LogProof(_Strict):
    leaf_index: UInt64
    tree_size: Size64
    root: Hex32
    path: HashPath


class AnchorRef(_Strict):
    """Where the log head is on-chain: the arguments of ``check_anchor_on_chain``.

    The one reference to an anchor: bundles cite it, the log's anchors.jsonl stores it (with
    the transaction's gas beside it), the anchor job returns it.
    """

    chain_id: Annotated[int, Field(ge=1)]
    contract: Address
    tx_hash: EthHash
    block_number: UInt64
    block_hash: EthHash
    log_index: UInt64
    tree_size: Size64
    root: EthHash
    block_timestamp: UInt64


class ProofBundle(_Strict):
    """A version-1 bundle (one-level batch trees, sealed before tree version 2)."""

    version: Literal[1]
    reading: Reading
    salt: Hex32
    leaf_hash: Hex32
    batch: BatchProof
    log: LogProof
    anchor: AnchorRef

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode() + b"\n"


class ProofBundleV2(_Strict):
    """A version-2 bundle: the reading's two-level path through a batch (tree version 2)."""

    version: Literal[2]
    reading: Reading
    salt: Hex32
    leaf_hash: Hex32
    patient: PatientProof
    batch: BatchProofV2
    log: LogProof
    anchor: AnchorRef

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode() + b"\n"


AnyBundle: TypeAlias = ProofBundle | ProofBundleV2


class _Version(BaseModel):
    """Only a bundle's version, to pick the model that validates the whole bundle."""

    model_config = ConfigDict(extra="ignore")
    version: Any = None


def _first_error(e: ValidationError) -> str:
    errors = e.errors(include_url=False)
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "bundle"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def _is_version_2(data: bytes | str) -> bool:
    # Literal[2] compares with ==, as Literal[1] does (2.0 is 2, true is not); anything else,
    # unreadable JSON included, is validated as version 1 and refused with version 1's words.
    try:
        v = _Version.model_validate_json(data).version
    except ValidationError:
        return False
    return not isinstance(v, bool) and isinstance(v, int | float) and v == 2


def load_bundle(data: bytes | str) -> AnyBundle:
    """Parse and validate a bundle of either version; anything else is MALFORMED."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise ProofError(ProofFailure.MALFORMED, f"bundle larger than {MAX_BUNDLE_BYTES} bytes")
    model: type[ProofBundle] | type[ProofBundleV2] = (
        ProofBundleV2 if _is_version_2(data) else ProofBundle
    )
    try:
        return model.model_validate_json(data)
    except ValidationError as e:
        raise ProofError(ProofFailure.MALFORMED, _first_error(e)) from None


def _hashes(values: Sequence[str]) -> list[bytes]:
    return [bytes.fromhex(v.removeprefix("0x")) for v in values]


def verify_offline(bundle: AnyBundle | bytes | str) -> None:
    """Every check that needs no chain, in order; raise :class:`ProofError` at the first failure.

    Order is part of the contract: each failure is reported at the earliest link that
    breaks, so "wrong leaf" means the reading, salt or leaf hash was altered, and a batch
    path that is fine but sits in the wrong log is a log-path failure. Version 2 checks the
    patient path (``wrong patient path``) before the batch path. Caveat the verifier should
    know: an RFC 9162 path does not commit to the tree size. In version 1 an altered
    ``batch.batch_size`` may pass the batch path and is caught by the log leaf (which
    contains it) instead, and an altered ``log.tree_size`` by the comparison with the
    anchor. In version 2 ``patient.size`` and ``batch.patient_count`` only place the paths:
    another size that gives the leaf the same place in the RFC split still verifies, and
    what is proven is unchanged (this leaf is in the anchored batch); an altered index never
    verifies. docs/wire-formats.md says why that is enough.
    """
    b = bundle if isinstance(bundle, ProofBundle | ProofBundleV2) else load_bundle(bundle)
    try:
        salt, claimed_leaf, batch_root, log_root, anchor_root = _hashes(
            [b.salt, b.leaf_hash, b.batch.batch_root, b.log.root, b.anchor.root]
        )
        batch_path, log_path = _hashes(b.batch.path), _hashes(b.log.path)
        canonical = b.reading.canonical_bytes()
        leaf = leaf_hash_salted(salt, canonical)
        log_leaf = log_leaf_hash(b.batch.batch_id, batch_root, b.batch.batch_size)
        if isinstance(b, ProofBundleV2):
            (patient_root,) = _hashes([b.patient.root])
            patient_path = _hashes(b.patient.path)
    except (ValueError, TypeError, MerkleError) as e:
        # Only reachable for a bundle built without validation (model_construct).
        raise ProofError(ProofFailure.MALFORMED, str(e)) from None

    if not hmac.compare_digest(leaf, claimed_leaf):
        raise ProofError(
            ProofFailure.WRONG_LEAF,
            f"reading and salt hash to {leaf.hex()}, bundle claims {claimed_leaf.hex()}",
        )
    if isinstance(b, ProofBundleV2):
        try:
            merkle.verify_inclusion(
                leaf, b.patient.leaf_index, b.patient.size, patient_path, patient_root
            )
        except MerkleError as e:
            raise ProofError(
                ProofFailure.WRONG_PATIENT_PATH,
                f"leaf not in the patient's subtree of batch {b.batch.batch_id!r}: {e}",
            ) from None
        try:
            merkle.verify_inclusion(
                patient_root, b.batch.patient_index, b.batch.patient_count, batch_path, batch_root
            )
        except MerkleError as e:
            raise ProofError(
                ProofFailure.WRONG_BATCH_PATH,
                f"patient's subtree not in batch {b.batch.batch_id!r}: {e}",
            ) from None
    else:
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


def bundle_schema(version: int = 1) -> dict[str, Any]:
    """The JSON Schema of bundles of ``version`` (draft 2020-12), for other implementations."""
    if version not in BUNDLE_VERSIONS:
        raise ValueError(f"no bundle version {version} (known: {BUNDLE_VERSIONS})")
    name = f"schemas/proof-bundle-v{version}.json"
    text = resources.files(__package__).joinpath(name).read_text()
    return cast(dict[str, Any], json.loads(text))
