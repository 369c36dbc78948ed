"""Refusals and FHIR OperationOutcomes."""

from __future__ import annotations

from typing import Any

from vitalproof.errors import VitalproofError


class Refusal(VitalproofError):
    """The request is authenticated but not allowed (403); the message is why. Raised only
    after the refusal was audited."""


def outcome(code: str, diagnostics: str, severity: str = "error") -> dict[str, Any]:
    """A FHIR OperationOutcome with one issue (``code`` from the IssueType value set)."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }
