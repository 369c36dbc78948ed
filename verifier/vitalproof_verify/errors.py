"""The root of every error vitalproof raises on purpose, and the verifier's own errors.

The root lives here, in the lowest layer, so that the proof kit (which imports nothing of the
pipeline) and the pipeline above it share one: ``except VitalproofError`` catches both.
Modelled on sigstore-python: library code raises, only command-line entry points exit, and
every error can explain itself to a person through :meth:`VitalproofError.diagnostics`.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["MerkleError", "ProofError", "ProofFailure", "VerifyError", "VitalproofError"]


class VitalproofError(Exception):
    """Base of every error vitalproof raises deliberately."""

    def diagnostics(self) -> str:
        """A human explanation: what went wrong and, where known, what to do about it.

        May span several lines; the first says what failed, the others why or what to do.
        """
        return str(self)


class VerifyError(VitalproofError):
    """A check of the proof kit failed."""


class MerkleError(VerifyError):
    """A Merkle inclusion or consistency proof does not verify (RFC 9162 section 2.1), or a
    tree cannot be built from what was given."""


class ProofFailure(StrEnum):
    """Which check of a proof bundle failed; stable strings, printed by both verifiers."""

    MALFORMED = "malformed bundle"
    WRONG_LEAF = "wrong leaf"
    WRONG_PATIENT_PATH = "wrong patient path"  # bundle version 2 only
    WRONG_BATCH_PATH = "wrong batch path"
    WRONG_LOG_PATH = "wrong log path"
    ROOT_NOT_ON_CHAIN = "root not on chain"
    REORGED_OUT = "transaction reorged out"
    WRONG_CHAIN = "wrong chain"


class ProofError(VerifyError):
    """A proof bundle failed one named check."""

    def __init__(self, failure: ProofFailure, detail: str) -> None:
        super().__init__(f"{failure.value}: {detail}")
        self.failure = failure
        self.detail = detail
