"""The on-chain half of verification: is an anchor (still) on a chain, as a bundle says?

Given only a JSON-RPC endpoint (any node of the chain: the anchorer's own is not needed) and
the fields a bundle's ``anchor`` section carries, :func:`check_anchor_on_chain` reads the
transaction's receipt and its block and decides, naming the failed check with a
:class:`~vitalproof_verify.errors.ProofFailure`. It needs no ABI: the ``Anchored`` event is
matched on its topic and its two words decoded by position.
"""

from __future__ import annotations

from typing import Any

from eth_abi.abi import decode as abi_decode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import BlockNotFound, TransactionNotFound

from vitalproof_verify.errors import ProofError, ProofFailure

__all__ = [
    "ANCHORED_SIGNATURE",
    "ANCHORED_TOPIC",
    "as_bytes",
    "check_anchor_on_chain",
    "parse_anchored",
    "rpc_web3",
    "to_hex",
]

ANCHORED_SIGNATURE = "Anchored(bytes32,uint64,uint64)"
ANCHORED_TOPIC = keccak(text=ANCHORED_SIGNATURE)
"""topic0 of the Anchored event; verifiers match logs on it without needing the ABI."""


def rpc_web3(url: str, *, timeout_s: float = 30.0) -> Web3:
    """A Web3 on a plain HTTP JSON-RPC endpoint: all a verifier needs."""
    return Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": timeout_s}))


def as_bytes(value: str | bytes) -> bytes:
    """Raw bytes of a 0x hex string (or bytes, unchanged)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    return bytes(HexBytes(value))


def to_hex(value: bytes | str) -> str:
    return "0x" + as_bytes(value).hex()


def parse_anchored(log: Any, contract: str) -> tuple[bytes, int, int] | None:
    """(root, tree_size, timestamp) if ``log`` is an Anchored event from ``contract``."""
    topics = log["topics"]
    if to_checksum_address(log["address"]) != to_checksum_address(contract):
        return None
    if len(topics) != 2 or bytes(topics[0]) != ANCHORED_TOPIC:
        return None
    try:
        size, ts = abi_decode(["uint64", "uint64"], bytes(log["data"]))
    except Exception:
        return None
    return bytes(topics[1]), int(size), int(ts)


def check_anchor_on_chain(
    w3: Web3,
    *,
    chain_id: int,
    contract: str,
    tx_hash: str | bytes,
    block_number: int,
    block_hash: str | bytes,
    log_index: int,
    root: bytes,
    tree_size: int,
    block_timestamp: int | None = None,
) -> None:
    """Check, against any JSON-RPC endpoint, that an anchor is (still) on the canonical chain.

    Order matters: a wrong chain explains every later mismatch, and a reorg explains a
    missing log, so each failure is reported under the most basic check that fails.
    ``block_timestamp``, when given, must equal the timestamp in the event (which the
    contract takes from the block), so the time a bundle claims is the chain's.
    """
    actual_chain = int(w3.eth.chain_id)
    if actual_chain != chain_id:
        raise ProofError(
            ProofFailure.WRONG_CHAIN, f"endpoint is chain {actual_chain}, bundle names {chain_id}"
        )
    want_block_hash = as_bytes(block_hash)
    try:
        receipt = w3.eth.get_transaction_receipt(HexBytes(as_bytes(tx_hash)))
    except TransactionNotFound:
        raise ProofError(
            ProofFailure.REORGED_OUT, f"no receipt for transaction {to_hex(tx_hash)}"
        ) from None
    try:
        block = w3.eth.get_block(block_number)
    except BlockNotFound:
        raise ProofError(
            ProofFailure.REORGED_OUT, f"block {block_number} does not exist on this chain"
        ) from None
    if bytes(block["hash"]) != want_block_hash:
        raise ProofError(
            ProofFailure.REORGED_OUT,
            f"block {block_number} is now {to_hex(block['hash'])}, bundle names "
            f"{to_hex(want_block_hash)}",
        )
    if bytes(receipt["blockHash"]) != want_block_hash or receipt["blockNumber"] != block_number:
        raise ProofError(
            ProofFailure.REORGED_OUT,
            f"transaction is in block {receipt['blockNumber']} {to_hex(receipt['blockHash'])},"
            f" bundle names {block_number} {to_hex(want_block_hash)}",
        )
    if receipt["status"] != 1:
        raise ProofError(ProofFailure.ROOT_NOT_ON_CHAIN, "the anchor transaction reverted")
    for log in receipt["logs"]:
        if log["logIndex"] != log_index:
            continue
        parsed = parse_anchored(log, contract)
        if parsed is None:
            break
        got_root, got_size, got_ts = parsed
        if got_root != bytes(root) or got_size != tree_size:
            raise ProofError(
                ProofFailure.ROOT_NOT_ON_CHAIN,
                f"log {log_index} anchors root {to_hex(got_root)} size {got_size}, bundle names "
                f"{to_hex(root)} size {tree_size}",
            )
        if block_timestamp is not None and got_ts != block_timestamp:
            raise ProofError(
                ProofFailure.ROOT_NOT_ON_CHAIN,
                f"anchored at time {got_ts}, bundle claims {block_timestamp}",
            )
        return
    raise ProofError(
        ProofFailure.ROOT_NOT_ON_CHAIN,
        f"no Anchored event from {contract} at log index {log_index} of {to_hex(tx_hash)}",
    )
