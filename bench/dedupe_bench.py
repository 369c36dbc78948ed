"""Dedupe memory benchmark: drop_seen ids/s and bytes held per id, old (set of hex strings)
against new (packed digest runs), for 1M and 10M ids.

    .venv/bin/python bench/dedupe_bench.py [--ids 1000000 10000000] [--per-message 120]
        [--old-rev 063a6a7] [--dup-rate 0.0]

Each message is a SampleBatch of ``--per-message`` fresh random ids (``--dup-rate`` of them
repeat an id already held), received at 200,000 ids/s, so 10M ids span one minute; the
budget is set above the count, so nothing is evicted. Two passes per implementation and
size: one timed (only ``drop_seen`` inside the clock; generating the batches is not), one
under tracemalloc for the bytes still held once the inputs are freed (numpy reports its
buffers to tracemalloc) and the largest transient allocation above what is held (packing
the recent ids and merging runs; for the old set, its resizes). The old implementation is
the module as it was at ``--old-rev``, read with ``git show``.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
import tracemalloc
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streams import dedupe as new_dedupe  # noqa: E402
from vitalproof.schema import SampleBatch  # noqa: E402

RATE = 200_000  # ids per second of receive time
CHUNK = 200_000  # ids generated per step, outside the clock


def old_module(rev: str) -> types.ModuleType:
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:streams/dedupe.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType("old_dedupe")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:streams/dedupe.py", "exec"), module.__dict__)
    return module


def messages(total: int, per_message: int, dup_rate: float) -> Iterator[list[SampleBatch]]:
    """Chunks of batches; a duplicate repeats an id of the previous chunk."""
    done, previous = 0, [os.urandom(16).hex()]
    while done < total:
        n = min(CHUNK, total - done)
        hexed = os.urandom(16 * n).hex()
        ids = [hexed[i : i + 32] for i in range(0, 32 * n, 32)]
        if dup_rate:
            step = max(1, round(1 / dup_rate))
            for i in range(0, n, step):
                ids[i] = previous[i % len(previous)]
        chunk = []
        for start in range(0, n, per_message):
            part = ids[start : start + per_message]
            received = (done + start) * 1_000_000 // RATE + 1_800_000_000_000_000
            chunk.append(
                SampleBatch(
                    "dev-b",
                    device_time_us=[received] * len(part),
                    value=[0.0] * len(part),
                    reading_id=part,
                    receive_time_us=received,
                )
            )
        yield chunk
        previous, done = ids, done + n


def run(make: Any, total: int, args: argparse.Namespace, traced: bool) -> dict[str, float]:
    gc.collect()
    if traced:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0] if traced else 0
    d = make()
    spent, n_msg, transient = 0.0, 0, 0
    for chunk in messages(total, args.per_message, args.dup_rate):
        if traced:
            tracemalloc.reset_peak()
        t = time.perf_counter()
        for b in chunk:
            d.drop_seen(b, f"0:{n_msg}")
            n_msg += 1
        d.drain()
        spent += time.perf_counter() - t
        if traced:  # above what is held after the chunk: packing and merging runs
            current, peak = tracemalloc.get_traced_memory()
            transient = max(transient, peak - current)
        del chunk
    gc.collect()
    out = {"ids/s": total / spent, "held": float(len(d)), "dropped": float(d.dropped)}
    if traced:
        current = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        out["B/id"] = (current - base) / max(1, len(d))
        out["transient MB"] = transient / 1e6
    del d
    gc.collect()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ids", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--per-message", type=int, default=120)
    p.add_argument("--old-rev", default="063a6a7")
    p.add_argument("--dup-rate", type=float, default=0.0)
    p.add_argument("--only", choices=["old", "new"], default=None)
    args = p.parse_args()
    old = old_module(args.old_rev)
    impls = {
        "old": lambda: old.DedupeWindows(retain=50),
    }
    print(f"load average before: {os.getloadavg()}; {args.per_message} ids per message")
    head = ("impl", "ids", "drop_seen ids/s", "B/id held", "max transient MB")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (4, 11, 16, 10, 17), strict=True)))
    for total in args.ids:
        impls["new"] = lambda n=total: new_dedupe.DedupeWindows(retain=50, max_ids=n)
        for name, factory in impls.items():
            if args.only and name != args.only:
                continue
            timed = run(factory, total, args, traced=False)
            mem = run(factory, total, args, traced=True)
            assert timed["held"] + timed["dropped"] == total, timed
            print(
                f"{name:>4} {total:>11,} {timed['ids/s']:>16,.0f} {mem['B/id']:>10.1f} "
                f"{mem['transient MB']:>17.1f}",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
