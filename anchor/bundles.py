"""Building proof bundles: the prover's side, which needs the anchor log.

The bundle's format and its check are the proof kit's (:mod:`vitalproof_verify.bundle`); what
needs the log of this deployment (which batch is where, which head anchored it) lives here.
A bundle is verified before it is handed out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from anchor.errors import AnchorError
from anchor.log import MerkleLog
from vitalproof_verify import merkle
from vitalproof_verify.bundle import (
    BUNDLE_VERSION,
    AnchorRef,
    BatchProof,
    LogProof,
    ProofBundle,
    Reading,
    verify_offline,
)
from vitalproof_verify.errors import MerkleError, ProofError
from vitalproof_verify.leaves import leaf_hash_salted

__all__ = ["anchor_ref", "build_bundle"]


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
    """Assemble the bundle for one reading of a sealed, logged and anchored batch.

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
        anchor = anchor_ref(head.anchor)
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
