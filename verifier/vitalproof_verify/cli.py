"""``vitalproof-verify BUNDLE [--rpc URL]``: the proof kit's command line.

The only place in the kit that prints or exits. ``vitalproof verify`` (the pipeline's command)
runs :func:`check_file` too, so both say the same thing about the same bundle.

Exit codes: 0 verified, 1 a check failed (the line names which), 2 the file or the endpoint
could not be used (nothing was decided).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from vitalproof_verify.bundle import load_bundle
from vitalproof_verify.errors import ProofError, VitalproofError
from vitalproof_verify.verify import verify_bundle

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNUSABLE = 2


class UnusableInput(VitalproofError):
    """The bundle file cannot be read or the RPC endpoint cannot be reached."""


@dataclass(frozen=True)
class Verdict:
    """What one check of one bundle decided; ``failure`` names the first check that failed."""

    path: str
    ok: bool
    onchain: bool
    failure: str | None = None
    detail: str | None = None
    reading_id: str | None = None
    batch_id: str | None = None
    tx_hash: str | None = None
    block_number: int | None = None
    chain_id: int | None = None

    def line(self) -> str:
        if not self.ok:
            return f"FAILED {self.path}: {self.failure}: {self.detail}"
        where = f"on chain {self.chain_id}" if self.onchain else "offline only (no --rpc)"
        return (
            f"OK {self.path}: reading {self.reading_id} is in batch {self.batch_id}, anchored "
            f"in tx {self.tx_hash} (block {self.block_number}), checked {where}"
        )


def check_file(path: str | Path, rpc: str | None = None, *, timeout_s: float = 30.0) -> Verdict:
    """Verify the bundle in ``path``, against the chain at ``rpc`` when given.

    Raises :class:`UnusableInput` when nothing could be decided (unreadable file, endpoint
    down); a bundle that fails a check is a verdict, not an exception.
    """
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UnusableInput(f"cannot read {name}: {e.strerror}") from None
    try:
        bundle = load_bundle(data)
        w3 = None
        if rpc:
            from vitalproof_verify.onchain import rpc_web3

            w3 = rpc_web3(rpc, timeout_s=timeout_s)
            _reachable(w3, rpc)
        verify_bundle(bundle, w3)
    except ProofError as e:
        return Verdict(name, False, bool(rpc), e.failure.value, e.detail)
    return Verdict(
        name,
        True,
        bool(rpc),
        reading_id=bundle.reading.reading_id,
        batch_id=bundle.batch.batch_id,
        tx_hash=bundle.anchor.tx_hash,
        block_number=bundle.anchor.block_number,
        chain_id=bundle.anchor.chain_id,
    )


def _reachable(w3: object, rpc: str) -> None:
    try:
        _ = w3.eth.chain_id  # type: ignore[attr-defined]
    except Exception as e:  # requests, aiohttp or JSON-RPC errors: all mean "cannot ask"
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UnusableInput(f"cannot reach the JSON-RPC endpoint {rpc}: {first}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitalproof-verify",
        description="Check a vitalproof proof bundle: the reading's Merkle paths offline, and "
        "with --rpc that the anchoring transaction is on the chain.",
    )
    p.add_argument("bundle", help="the proof bundle (JSON, version 1 or 2)")
    p.add_argument("--rpc", help="any Ethereum JSON-RPC endpoint of the bundle's chain")
    p.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the endpoint")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        verdict = check_file(args.bundle, args.rpc, timeout_s=args.timeout)
    except UnusableInput as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNUSABLE
    if args.json:
        print(json.dumps(asdict(verdict), separators=(",", ":")))
    else:
        print(verdict.line(), file=sys.stdout if verdict.ok else sys.stderr)
    return EXIT_OK if verdict.ok else EXIT_FAILED
