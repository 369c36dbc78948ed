"""Audit checkpoints through the batches' Merkle log and anchor job.

An audit checkpoint is one more entry of the anchor package's Merkle log:
``("audit-<size>", <audit root at size>, <size>)``, the same (id, root, size) shape as a
sealed batch, so the anchor job appends it and anchors it with the batches, in the same
transaction, and :mod:`anchor` needs nothing of clinic (it is handed plain tuples by
:class:`CheckpointSource`). An anchored log head then commits to the audit log up to that
size: a record is proven disclosed by two RFC 9162 inclusion paths (record hash in the audit
tree, checkpoint in the log) and the anchor transaction, exactly like a reading, and an
operator who deletes or rewrites a record below an anchored checkpoint is caught by
:func:`check_against_log` (and by anyone holding the anchored root).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anchor.errors import AnchorError
from anchor.log import MerkleLog
from clinic.audit.log import CHECKPOINT_PREFIX, AuditCheckpoint, AuditLog
from clinic.audit.records import AuditError, AuditRecord, check_record
from vitalproof_verify import merkle
from vitalproof_verify.errors import MerkleError
from vitalproof_verify.leaves import log_leaf_hash

__all__ = [
    "AnchoredCheckpoint",
    "CheckpointSource",
    "check_against_log",
    "disclosure_proof",
    "verify_disclosure_proof",
]


class CheckpointSource:
    """What the anchor job calls before each anchor: the audit log's checkpoint, if any.

    Opens the audit log at ``path`` on first use (nothing, and no file created, while there
    is no audit log) and keeps it open, so each period reads only the new record hashes.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._log: AuditLog | None = None

    def __call__(self) -> list[tuple[str, bytes, int]]:
        if self._log is None:
            if not self.path.exists():
                return []
            self._log = AuditLog(self.path)
        cp = self._log.checkpoint()
        return [] if cp is None else [(cp.batch_id, cp.batch_root, cp.batch_size)]

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass(frozen=True, slots=True)
class AnchoredCheckpoint:
    """An audit checkpoint found in the Merkle log, and whether an anchor covers it yet."""

    log_index: int
    size: int
    anchored: bool


def _audit_entries(log: MerkleLog) -> list[tuple[int, AuditCheckpoint]]:
    out = []
    for i in range(log.size):
        e = log.entry(i)
        if e.batch_id.startswith(CHECKPOINT_PREFIX):
            out.append((i, AuditCheckpoint(e.batch_id, e.batch_root, e.batch_size)))
    return out


def check_against_log(audit: AuditLog, log: MerkleLog) -> list[AnchoredCheckpoint]:
    """Raise :class:`AuditError` unless every audit checkpoint in the Merkle log still
    matches the audit log (same root over the first ``size`` record hashes)."""
    found = []
    size = audit.size
    entries = _audit_entries(log)
    roots = audit.roots(cp.batch_size for _, cp in entries if cp.batch_size <= size)
    for index, cp in entries:
        if cp.batch_id != f"{CHECKPOINT_PREFIX}{cp.batch_size}":
            raise AuditError(f"log entry {index} ({cp.batch_id}) has size {cp.batch_size}")
        if cp.batch_size > size:
            raise AuditError(
                f"the Merkle log holds checkpoint {cp.batch_id} but the audit log has only "
                f"{size} records: records were removed",
                seq=size + 1,
            )
        if roots[cp.batch_size] != cp.batch_root:
            raise AuditError(
                f"the audit log no longer gives the root of checkpoint {cp.batch_id} "
                f"(log entry {index}): a record at or below {cp.batch_size} was changed"
            )
        anchored = log.anchor_covering(index) is not None
        found.append(AnchoredCheckpoint(index, cp.batch_size, anchored))
    return found


def disclosure_proof(audit: AuditLog, log: MerkleLog, seq: int) -> dict[str, Any]:
    """Everything needed to show that audit record ``seq`` existed when an anchor was made:
    the record, its path into the earliest anchored audit checkpoint that covers it, that
    checkpoint's path into the anchored log head, and the anchor. JSON-ready; checked by
    :func:`verify_disclosure_proof` without the database or the log."""
    rec = audit.record(seq)
    for index, cp in _audit_entries(log):
        if cp.batch_size < seq:
            continue
        head = log.anchor_covering(index)
        if head is None:
            continue
        return {
            "record": rec.to_json_dict(),
            "audit": {
                "size": cp.batch_size,
                "root": cp.batch_root.hex(),
                "path": [p.hex() for p in audit.inclusion_proof(seq, cp.batch_size)],
            },
            "log": {
                "index": index,
                "entry": cp.batch_id,
                "tree_size": head.tree_size,
                "root": head.root.hex(),
                "path": [p.hex() for p in log.inclusion_proof(index, head.tree_size)],
            },
            "anchor": dict(head.anchor),
        }
    raise AuditError("no anchored checkpoint covers this record yet", seq=seq)


def verify_disclosure_proof(doc: dict[str, Any]) -> None:
    """Raise :class:`AuditError` unless a :func:`disclosure_proof` holds together offline.

    Whether the log root is on-chain is the anchor's check
    (:func:`vitalproof_verify.onchain.check_anchor_on_chain` with ``doc["anchor"]``).
    """
    try:
        rec = AuditRecord.from_json_dict(doc["record"])
        check_record(rec)
        a, lg = doc["audit"], doc["log"]
        audit_root = bytes.fromhex(a["root"])
        merkle.verify_inclusion(
            merkle.leaf_hash(rec.leaf),
            rec.seq - 1,
            int(a["size"]),
            [bytes.fromhex(p) for p in a["path"]],
            audit_root,
        )
        if lg["entry"] != f"{CHECKPOINT_PREFIX}{a['size']}":
            raise AuditError(f"log entry {lg['entry']!r} is not the checkpoint of size {a['size']}")
        merkle.verify_inclusion(
            log_leaf_hash(lg["entry"], audit_root, int(a["size"])),
            int(lg["index"]),
            int(lg["tree_size"]),
            [bytes.fromhex(p) for p in lg["path"]],
            bytes.fromhex(lg["root"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise AuditError(f"malformed disclosure proof: {e!r}") from None
    except (MerkleError, AnchorError) as e:
        raise AuditError(f"disclosure proof does not verify: {e}", seq=None) from None
