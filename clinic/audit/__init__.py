"""The audit log of every disclosure: who saw which patient's data, when, why, and whether
they were allowed (issue 10, item 4).

Every history read, live delivery batch, proof, subscription, consent change, break-glass
access and erasure (and every refusal of one) is an :class:`AuditRecord`, appended to an
:class:`AuditLog` that is append-only and hash-chained (:mod:`clinic.audit.records` defines
the canonical bytes, checkable without the database), exportable as FHIR ``AuditEvent``
(:mod:`clinic.audit.fhir`), and whose Merkle roots go through the batches' log and anchor
job (:mod:`clinic.audit.anchoring`).

Use::

    with AuditLog(settings.paths.audit_path) as audit:
        audit.append(actor="Practitioner/dr-a", role="clinician", patient_id="p-1",
                     action=AuditAction.READ, what="Observation?patient=p-1&date=ge2026-01-01",
                     purpose="TREAT", outcome=Outcome.ALLOWED, reason="consent c-7", count=120)
"""

from clinic.audit.anchoring import (
    AnchoredCheckpoint,
    CheckpointSource,
    check_against_log,
    disclosure_proof,
    verify_disclosure_proof,
)
from clinic.audit.fhir import to_fhir_audit_event, to_fhir_bundle
from clinic.audit.log import AuditCheckpoint, AuditHead, AuditLog, checkpoint_id
from clinic.audit.records import (
    GENESIS_HASH,
    ROLES,
    AuditAction,
    AuditEntry,
    AuditError,
    AuditRecord,
    Outcome,
    check_record,
    check_records,
    verify_chain,
)

__all__ = [
    "GENESIS_HASH",
    "ROLES",
    "AnchoredCheckpoint",
    "AuditAction",
    "AuditCheckpoint",
    "AuditEntry",
    "AuditError",
    "AuditHead",
    "AuditLog",
    "AuditRecord",
    "CheckpointSource",
    "Outcome",
    "check_against_log",
    "check_record",
    "check_records",
    "checkpoint_id",
    "disclosure_proof",
    "to_fhir_audit_event",
    "to_fhir_bundle",
    "verify_chain",
    "verify_disclosure_proof",
]
