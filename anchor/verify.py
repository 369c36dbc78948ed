"""Verify a proof bundle: the Merkle part offline, the chain part through any JSON-RPC node.

Imports nothing from ``streams`` or ``ingest``: a verifier needs this package, the bundle and
an Ethereum endpoint, nothing else.
"""

from __future__ import annotations

from web3 import Web3

from anchor.chain import check_anchor_on_chain
from anchor.proof import ProofBundle, verify_offline


def verify_bundle(bundle: ProofBundle, w3: Web3 | None) -> None:
    """Raise :class:`anchor.errors.ProofError` naming the first check that fails.

    ``w3=None`` checks only the offline part (leaf, batch path, log path, anchored root).
    """
    verify_offline(bundle)
    if w3 is None:
        return
    a = bundle.anchor
    check_anchor_on_chain(
        w3,
        chain_id=a.chain_id,
        contract=a.contract,
        tx_hash=a.tx_hash,
        block_number=a.block_number,
        block_hash=a.block_hash,
        log_index=a.log_index,
        root=bytes.fromhex(a.root.removeprefix("0x")),
        tree_size=a.tree_size,
        block_timestamp=a.block_timestamp,
    )
