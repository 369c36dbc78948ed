"""Every consent change is an audit record, whoever makes it (the API, the CLI, erasure)."""

from __future__ import annotations

from clinic.audit import AuditAction, AuditLog, AuditRecord, Outcome
from clinic.consent import Grant


def record_consent_change(
    audit: AuditLog, *, actor: str, role: str, grant: Grant, change: str
) -> AuditRecord:
    """``change``: granted, changed, revoked (the grant is the version it produced)."""
    return audit.append(
        actor=actor,
        role=role,
        patient_id=grant.patient_id,
        action=AuditAction.CONSENT,
        what=f"{change} {grant.grant_id} v{grant.version}: {grant.grantee}, "
        f"{grant.describe_metrics()}, {grant.purpose}",
        purpose=grant.purpose,
        outcome=Outcome.ALLOWED,
        reason=change,
    )
