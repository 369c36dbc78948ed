"""Verify a proof bundle: the Merkle part offline, the chain part through any JSON-RPC node."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vitalproof_verify.bundle import AnyBundle, verify_offline

if TYPE_CHECKING:  # web3 is imported only when a chain is asked
    from web3 import Web3

__all__ = ["verify_bundle"]


def verify_bundle(bundle: AnyBundle, w3: Web3 | None) -> None:
    """Raise :class:`~vitalproof_verify.errors.ProofError` naming the first check that fails.

    ``w3=None`` checks only the offline part (leaf, batch path, log path, anchored root);
    otherwise the anchor is also looked up on the chain ``w3`` is connected to.
    """
    verify_offline(bundle)
    if w3 is None:
        return
    from vitalproof_verify.onchain import check_anchor_on_chain

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
