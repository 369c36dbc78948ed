"""Errors of the anchor package: one type per kind of failure a verifier must name."""

from __future__ import annotations

from enum import StrEnum

from vitalproof.errors import VitalproofError


class AnchorError(VitalproofError):
    """Anchoring failed (log, contract or transaction)."""


class MerkleError(AnchorError):
    """A Merkle inclusion or consistency proof does not verify (RFC 9162 section 2.1)."""


class ProofFailure(StrEnum):
    """Which check of a proof bundle failed; stable strings, printed by `vitalproof verify`."""

    MALFORMED = "malformed bundle"
    WRONG_LEAF = "wrong leaf"
    WRONG_BATCH_PATH = "wrong batch path"
    WRONG_LOG_PATH = "wrong log path"
    ROOT_NOT_ON_CHAIN = "root not on chain"
    REORGED_OUT = "transaction reorged out"
    WRONG_CHAIN = "wrong chain"


class ProofError(AnchorError):
    """A proof bundle failed one named check."""

    def __init__(self, failure: ProofFailure, detail: str) -> None:
        super().__init__(f"{failure.value}: {detail}")
        self.failure = failure
        self.detail = detail
