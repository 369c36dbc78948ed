"""Building proof bundles: the prover's side, which needs the anchor log.

The bundle's format and its check are the proof kit's (:mod:`vitalproof_verify.bundle`); what
needs the log of this deployment (which batch is where, which head anchored it) lives here.
A bundle is verified before it is handed out. :func:`build_bundle_v2` builds the bundles of
batches with the two-level tree (every batch sealed now); :func:`build_bundle` those of
batches sealed before it, which kept every leaf.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from pydantic import ValidationError

from anchor.errors import AnchorError
from anchor.log import MerkleLog
from vitalproof_verify import merkle
from vitalproof_verify.bundle import (
    AnchorRef,
    BatchProof,
    BatchProofV2,
    LogProof,
    PatientProof,
    ProofBundle,
    ProofBundleV2,
    Reading,
    verify_offline,
)
from vitalproof_verify.errors import MerkleError, ProofError
from vitalproof_verify.leaves import leaf_hash_salted

__all__ = ["anchor_ref", "build_bundle", "build_bundle_v2"]


def anchor_ref(record: Mapping[str, Any]) -> AnchorRef:
    """The :class:`AnchorRef` of an anchored head as stored in the log (anchors.jsonl, the
    receipt's JSON with its gas beside it); extra fields are dropped."""
    try:
        return AnchorRef.model_validate({k: record[k] for k in AnchorRef.model_fields})
    except (KeyError, ValidationError) as e:
        raise AnchorError(f"anchor record lacks what a bundle needs: {e}") from None


def build_bundle(
    *,
    reading: Reading | Mapping[str, Any],
    salt: bytes,
    batch_id: str,
    batch: merkle.MerkleTree | Sequence[bytes],
    leaf_index: int,
    log: MerkleLog,
    anchor: AnchorRef | None = None,
) -> ProofBundle:
    """Assemble the version-1 bundle for one reading of a sealed, logged and anchored batch
    of tree version 1 (one tree over every leaf).

    ``batch`` is the batch's tree (or its leaf hashes; pass a
    :class:`~vitalproof_verify.merkle.MerkleTree` when building many bundles from one
    batch). ``anchor`` defaults to the earliest anchored head that covers the batch. The
    result is verified before it is returned: a prover must never hand out a bundle that
    fails, whatever the inputs were.
    """
    fields = reading if isinstance(reading, Reading) else Reading.model_validate(dict(reading))
    try:
        tree = batch if isinstance(batch, merkle.MerkleTree) else merkle.MerkleTree(batch)
        leaf = leaf_hash_salted(salt, fields.canonical_bytes())
        batch_path = tree.inclusion_proof(leaf_index)
    except MerkleError as e:
        raise AnchorError(str(e)) from None
    log_index, anchor = _logged(log, batch_id, tree.root(), tree.size, anchor)
    entry = log.entry(log_index)
    bundle = ProofBundle(
        version=1,
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
        log=_log_proof(log, log_index, anchor),
        anchor=anchor,
    )
    return _verified(bundle)


def build_bundle_v2(
    *,
    reading: Reading | Mapping[str, Any],
    salt: bytes,
    batch_id: str,
    patient_leaves: Sequence[bytes],
    leaf_index: int,
    patient_roots: Sequence[bytes],
    patient_index: int,
    batch_size: int,
    log: MerkleLog,
    anchor: AnchorRef | None = None,
) -> ProofBundleV2:
    """Assemble the version-2 bundle for one reading of a batch of tree version 2.

    ``patient_leaves`` are the reading's patient's leaves of the batch in canonical order
    (recomputed from their rows), ``patient_roots`` every patient's subtree root in the
    batch's order, ``batch_size`` the batch's readings (the log leaf's). The leaves must
    rebuild ``patient_roots[patient_index]`` and the roots the logged batch root, or nothing
    is built. ``anchor`` and the final check as in :func:`build_bundle`.
    """
    fields = reading if isinstance(reading, Reading) else Reading.model_validate(dict(reading))
    try:
        leaf = leaf_hash_salted(salt, fields.canonical_bytes())
        patient_path, batch_path = merkle.two_level_inclusion_proof(
            patient_leaves, patient_roots, patient_index, leaf_index
        )
        batch_root = merkle.two_level_root(patient_roots)
    except MerkleError as e:
        raise AnchorError(f"batch {batch_id!r}: {e}") from None
    if leaf != patient_leaves[leaf_index]:
        raise AnchorError(f"the reading is not leaf {leaf_index} of its patient's subtree")
    log_index, anchor = _logged(log, batch_id, batch_root, batch_size, anchor)
    bundle = ProofBundleV2(
        version=2,
        reading=fields,
        salt=salt.hex(),
        leaf_hash=leaf.hex(),
        patient=PatientProof(
            root=patient_roots[patient_index].hex(),
            size=len(patient_leaves),
            leaf_index=leaf_index,
            path=[p.hex() for p in patient_path],
        ),
        batch=BatchProofV2(
            batch_id=batch_id,
            batch_root=batch_root.hex(),
            batch_size=batch_size,
            patient_index=patient_index,
            patient_count=len(patient_roots),
            path=[p.hex() for p in batch_path],
        ),
        log=_log_proof(log, log_index, anchor),
        anchor=anchor,
    )
    return _verified(bundle)


def _logged(
    log: MerkleLog, batch_id: str, root: bytes, size: int, anchor: AnchorRef | None
) -> tuple[int, AnchorRef]:
    """The batch's index in the log (whose entry must be ``root`` and ``size``) and the
    anchor that covers it (the earliest, unless one is given)."""
    log_index = log.index_of(batch_id)
    if log_index is None:
        raise AnchorError(f"batch {batch_id!r} is not in the log")
    entry = log.entry(log_index)
    if (entry.batch_root, entry.batch_size) != (root, size):
        raise AnchorError(f"batch {batch_id!r} in the log has another root or size")
    if anchor is None:
        head = log.anchor_covering(log_index)
        if head is None:
            raise AnchorError(f"batch {batch_id!r} (log index {log_index}) is not anchored yet")
        anchor = anchor_ref(head.anchor)
    if anchor.tree_size <= log_index:
        raise AnchorError(f"anchor of size {anchor.tree_size} does not cover index {log_index}")
    return log_index, anchor


def _log_proof(log: MerkleLog, log_index: int, anchor: AnchorRef) -> LogProof:
    return LogProof(
        leaf_index=log_index,
        tree_size=anchor.tree_size,
        root=log.root(anchor.tree_size).hex(),
        path=[p.hex() for p in log.inclusion_proof(log_index, anchor.tree_size)],
    )


_B = TypeVar("_B", ProofBundle, ProofBundleV2)


def _verified(bundle: _B) -> _B:
    """A prover must never hand out a bundle that fails, whatever the inputs were."""
    try:
        verify_offline(bundle)
    except ProofError as e:
        raise AnchorError(f"refusing to build a bundle that does not verify: {e}") from e
    return bundle
