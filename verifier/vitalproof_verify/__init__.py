"""vitalproof-verify: check that one vital-sign reading was anchored, untampered and on time.

Everything a person holding one proof bundle needs, and nothing of the pipeline that made it:
the canonical bytes a leaf commits to (:mod:`~vitalproof_verify.leaves`), RFC 9162 Merkle
trees (:mod:`~vitalproof_verify.merkle`), the versioned bundle and its offline check
(:mod:`~vitalproof_verify.bundle`) and the on-chain check over any Ethereum JSON-RPC endpoint
(:mod:`~vitalproof_verify.onchain`). The command line is ``vitalproof-verify BUNDLE [--rpc URL]``.
"""

from vitalproof_verify.bundle import (
    BUNDLE_VERSION,
    AnyBundle,
    ProofBundle,
    ProofBundleV2,
    load_bundle,
    verify_offline,
)
from vitalproof_verify.errors import MerkleError, ProofError, ProofFailure, VitalproofError
from vitalproof_verify.verify import verify_bundle

__version__ = "0.1.0"

__all__ = [
    "BUNDLE_VERSION",
    "AnyBundle",
    "MerkleError",
    "ProofBundle",
    "ProofBundleV2",
    "ProofError",
    "ProofFailure",
    "VitalproofError",
    "load_bundle",
    "verify_bundle",
    "verify_offline",
]
