"""Merkle and proof benchmark: how fast batches seal and bundles verify, on one core.

    .venv/bin/python bench/merkle_bench.py [--leaves 1000000] [--repeat 5] [--bundles 2000]

Reported:

* ``root()`` over ``--leaves`` precomputed leaf hashes, leaves/s (best and median of
  ``--repeat`` runs): the cost of sealing a batch once its leaves exist. The target is at
  least 1,000,000 leaves/s per core.
* salted leaf hashing (``leaf_hash_salted`` over real canonical reading bytes), leaves/s:
  the other half of sealing.
* ``MerkleTree`` (all levels kept) build time and inclusion proofs/s: the bundle prover.
* the same three with the Rust extension (``vitalproof_native``, native/) that the worker
  uses when it is installed: ``merkle_root``, ``salted_leaves`` (one call per column) and
  ``merkle_levels`` (every level, as ``MerkleTree`` keeps them). anchor/ itself stays pure
  Python: it is what verifiers run.
* ``verify_offline`` per bundle, µs, for a validated model and from JSON bytes (parsing
  included), with a 4,096-reading batch in a 1,000-batch log (12- and 10-element paths).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from anchor.bundles import build_bundle
from anchor.log import MerkleLog
from vitalproof import hashing
from vitalproof.units import Metric
from vitalproof_verify import merkle
from vitalproof_verify.bundle import ProofBundle, Reading, verify_offline
from vitalproof_verify.leaves import leaf_hash_salted, reading_id

T = TypeVar("T")
T0 = 1_732_147_200_000_000  # 2024-11-21T00:00:00Z, microseconds
SALT_KEY = hashlib.sha256(b"bench salt key").digest()
console = Console()


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _timed(fn: Callable[[], T]) -> tuple[float, T]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _readings(n: int) -> list[Reading]:
    return [
        Reading(
            reading_id=reading_id("dev-0001", "heart_rate", i, T0 + i * 1_000_000),
            device_id="dev-0001",
            patient_id="pt-0001",
            metric=Metric.HEART_RATE.value,
            value=float(60 + i % 40),
            unit="/min",
            device_time_us=T0 + i * 1_000_000,
            seq=i,
            quality=0,
        )
        for i in range(n)
    ]


def _salt(rid: str) -> bytes:
    return hmac.new(SALT_KEY, rid.encode(), hashlib.sha256).digest()


def bench_root(
    n: int, repeat: int, root: Callable[[Sequence[bytes]], bytes] = merkle.root
) -> tuple[float, float]:
    leaves = [hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(n)]
    times = []
    with _progress() as p:
        task = p.add_task(f"root() over {n:,} leaves", total=repeat)
        for _ in range(repeat):
            dt, _ = _timed(lambda: root(leaves))
            times.append(dt)
            p.advance(task)
    return n / min(times), n / statistics.median(times)


def _salted_inputs(n: int) -> tuple[list[bytes], list[bytes]]:
    return [_salt(str(i)) for i in range(n)], [r.canonical_bytes() for r in _readings(n)]


def bench_salted(n: int) -> float:
    salts, canon = _salted_inputs(n)
    dt, _ = _timed(lambda: [leaf_hash_salted(s, c) for s, c in zip(salts, canon, strict=True)])
    return n / dt


def bench_native(ext: ModuleType, n: int, repeat: int) -> tuple[float, float, float, float]:
    """root leaves/s (best, median), salted leaves/s, all-levels build seconds."""
    best, median = bench_root(n, repeat, ext.merkle_root)
    salts, canon = _salted_inputs(min(n, 200_000))
    salted_s = min(_timed(lambda: ext.salted_leaves(salts, canon))[0] for _ in range(3))
    leaves = [hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(n)]
    levels_s, _ = _timed(lambda: ext.merkle_levels(leaves))
    return best, median, len(salts) / salted_s, levels_s


def bench_tree(n: int) -> tuple[float, float]:
    leaves = [hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(n)]
    build_s, tree = _timed(lambda: merkle.MerkleTree(leaves))
    k = min(n, 200_000)
    proof_s, _ = _timed(lambda: [tree.inclusion_proof(i) for i in range(0, n, max(1, n // k))])
    return build_s, k / proof_s


def bench_verify(bundles: int) -> tuple[float, float, int, int]:
    batch = _readings(4096)
    leaves = [leaf_hash_salted(_salt(r.reading_id), r.canonical_bytes()) for r in batch]
    tree = merkle.MerkleTree(leaves)
    with tempfile.TemporaryDirectory() as d, MerkleLog(d) as log:
        with _progress() as p:
            task = p.add_task("filling a 1,000-batch log", total=1000)
            for i in range(1000):
                if i == 617:
                    log.append("bench-batch", tree.root(), tree.size)
                else:
                    log.append(f"b-{i}", hashlib.sha256(i.to_bytes(4, "big")).digest(), 4096)
                p.advance(task)
        head = log.root()
        log.record_anchor(
            log.size,
            head,
            {
                "chain_id": 31337,
                "contract": "0x5FbDB2315678afecb367f032d93F642f64180aa3",
                "tx_hash": "0x" + "ab" * 32,
                "block_number": 1,
                "block_hash": "0x" + "cd" * 32,
                "log_index": 0,
                "root": "0x" + head.hex(),
                "tree_size": log.size,
                "block_timestamp": T0 // 1_000_000,
            },
        )
        built: list[ProofBundle] = []
        with _progress() as p:
            task = p.add_task("building bundles", total=bundles)
            for j in range(bundles):
                i = (j * 2654435761) % len(batch)
                r = batch[i]
                built.append(
                    build_bundle(
                        reading=r,
                        salt=_salt(r.reading_id),
                        batch_id="bench-batch",
                        batch=tree,
                        leaf_index=i,
                        log=log,
                    )
                )
                p.advance(task)
    raw = [b.to_json() for b in built]

    def verify_all(items: list[ProofBundle] | list[bytes]) -> None:
        for item in items:
            verify_offline(item)

    model_s = min(_timed(lambda: verify_all(built))[0] for _ in range(3))
    json_s = min(_timed(lambda: verify_all(raw))[0] for _ in range(3))
    return 1e6 * model_s / bundles, 1e6 * json_s / bundles, len(built[0].batch.path), len(raw[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--leaves", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--bundles", type=int, default=2000)
    args = ap.parse_args()

    best, median = bench_root(args.leaves, args.repeat)
    salted = bench_salted(min(args.leaves, 200_000))
    build_s, proofs = bench_tree(args.leaves)
    per_model, per_json, depth, size = bench_verify(args.bundles)
    ext = hashing.extension()
    fast = bench_native(ext, args.leaves, args.repeat) if ext is not None else None

    table = Table(title="vitalproof_verify.merkle / vitalproof_verify.bundle, one core")
    table.add_column("measure")
    table.add_column("result", justify="right")
    table.add_row(f"root() over {args.leaves:,} leaf hashes, best", f"{best:,.0f} leaves/s")
    table.add_row(f"root() over {args.leaves:,} leaf hashes, median", f"{median:,.0f} leaves/s")
    table.add_row("leaf_hash_salted over canonical readings", f"{salted:,.0f} leaves/s")
    table.add_row(f"MerkleTree build, {args.leaves:,} leaves", f"{build_s:.2f} s")
    table.add_row("MerkleTree.inclusion_proof", f"{proofs:,.0f} proofs/s")
    if fast is None:
        table.add_row("vitalproof_native (Rust)", "not installed")
    else:
        n_best, n_median, n_salted, n_levels = fast
        table.add_row(f"native merkle_root over {args.leaves:,}, best", f"{n_best:,.0f} leaves/s")
        table.add_row(
            f"native merkle_root over {args.leaves:,}, median", f"{n_median:,.0f} leaves/s"
        )
        table.add_row("native salted_leaves over canonical readings", f"{n_salted:,.0f} leaves/s")
        table.add_row(f"native merkle_levels, {args.leaves:,} leaves", f"{n_levels:.2f} s")
    table.add_row(f"verify_offline, validated bundle (batch path {depth})", f"{per_model:,.1f} µs")
    table.add_row(f"verify_offline from JSON ({size:,} bytes)", f"{per_json:,.1f} µs")
    console.print(table)
    verdict = "meets" if best >= 1_000_000 else "MISSES"
    console.print(f"root(): {verdict} the 1,000,000 leaves/s per core target")


if __name__ == "__main__":
    main()
