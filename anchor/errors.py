"""Errors of the anchor package (the log, the contract, transactions).

A bundle that fails a check raises the proof kit's
:class:`~vitalproof_verify.errors.ProofError` instead: verifying is the kit's job.
"""

from __future__ import annotations

from vitalproof.errors import VitalproofError


class AnchorError(VitalproofError):
    """Anchoring failed (log, contract or transaction)."""
