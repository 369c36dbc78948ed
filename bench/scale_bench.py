"""Scale-out benchmark: 1, 2 and 3 workers in one consumer group, samples/s and CPU per sample.

    .venv/bin/python bench/scale_bench.py [--workers 1,2,3] [--samples 1500000]
        [--partitions 6] [--devices 120] [--per-message 120] [--batch-rows 100000]

For each worker count: a namespace of its own (topics, lake) on one local stack (or the Kafka
``VITALPROOF_KAFKA_BOOTSTRAP`` names), ``vitals.raw`` pre-filled with the same workload as
``bench/streams_bench.py`` (so the producer does not compete with the workers), then that many
``vitalproof worker`` processes started at once, and the run followed until every sample is
sealed. Reported per count: samples/s raw -> sealed (from the first worker's start, and
steady state between the first and the last manifest), the CPU seconds of all workers and
their seal processes together per million samples sealed, and batches.

On a machine with 2 cores, more workers cannot be faster; the point is that the group stays
correct and the cost per sample does not grow with the number of workers (each worker pays
its own Faust, polls and rebalances: that is the overhead measured).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _streams_bench() -> ModuleType:
    """The single-worker bench's workload, stack and /proc helpers (one module, no copy)."""
    spec = importlib.util.spec_from_file_location("streams_bench", ROOT / "bench/streams_bench.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


sb = _streams_bench()
console = sb.console


def run_one(args: argparse.Namespace, base: Any, n: int) -> dict[str, float]:
    from vitalproof.cli import processes
    from vitalproof.devstack import ensure_topics
    from vitalproof.registry import Registry

    settings = base.evolve(
        kafka={"topic_prefix": f"scale{os.getpid()}w{n}.", "partitions": args.partitions},
        batching={
            "max_rows": args.batch_rows,
            "max_messages": max(1000, args.batch_rows // args.per_message + 1),
            "max_age_s": args.batch_age,
        },
    )
    msgs = sb.generate(args.samples, args.devices, args.per_message, encoding="json")
    total = sum(m.samples for m in msgs)
    registry = Registry(settings.paths.registry_path)
    enrolled = sb.enrolled_us(msgs)
    for d in sorted({m.device_id for m in msgs}):
        if registry.lookup(d) is None:  # one registry for the home: the same fleet each run
            registry.enroll(d, f"pt-{d[4:]}", enrolled_us=enrolled)
    ensure_topics(settings, settings.kafka.pipeline_topics, args.partitions)
    asyncio.run(sb.prefill(settings, msgs))
    del msgs
    console.print(f"[bold]{n} worker(s)[/bold]: {total:,} samples in {settings.kafka.topic_raw}")

    batches_dir = settings.lake_dir / "_batches"
    seen: dict[str, dict[str, Any]] = {}
    logs = [settings.paths.home / f"scale-w{n}-{i}.log" for i in range(n)]
    t0 = time.monotonic()
    procs = [processes.start(settings, "worker", log=log) for log in logs]
    cpu = [0.0] * n
    rows = 0
    try:
        while rows < total and time.monotonic() - t0 < args.seconds:
            time.sleep(0.5)
            sb.read_manifests(batches_dir, seen)
            rows = sum(int(m["rows"]) for m in seen.values())
            for i, p in enumerate(procs):
                if p.poll() is not None:
                    raise SystemExit(f"worker {i} exited ({p.returncode}); see {logs[i]}")
                tree = sb.sample_tree(p.pid)
                cpu[i] = tree.cpu_s + tree.child_cpu_s  # cumulative: the last sample counts
    finally:
        for p in procs:
            processes.stop(p)
    elapsed = time.monotonic() - t0
    sealed_at = sorted(int(m["sealed_at_us"]) for m in seen.values())
    steady_s = (sealed_at[-1] - sealed_at[0]) / 1e6 if len(sealed_at) > 1 else 0.0
    first_rows = min(
        (int(m["rows"]) for m in seen.values() if int(m["sealed_at_us"]) == sealed_at[0]),
        default=0,
    )
    console.print(f"  sealed {rows:,} of {total:,} in {elapsed:.1f} s, CPU {sum(cpu):.1f} s")
    return {
        "workers": n,
        "sealed": rows,
        "total": total,
        "seconds": elapsed,
        "overall": rows / elapsed,
        "steady": (rows - first_rows) / steady_s if steady_s else 0.0,
        "cpu_s": sum(cpu),
        "cpu_per_m": sum(cpu) / max(rows, 1) * 1e6,
        "batches": len(seen),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", default="1,2,3", help="worker counts to run, in order")
    ap.add_argument("--samples", type=int, default=1_500_000, help="samples per run")
    ap.add_argument("--partitions", type=int, default=6, help="partitions of every topic")
    ap.add_argument("--devices", type=int, default=120, help="devices (one patient each)")
    ap.add_argument("--per-message", type=int, default=120, help="samples per Kafka message")
    ap.add_argument("--batch-rows", type=int, default=100_000, help="worker batch_max_rows")
    ap.add_argument("--batch-age", type=float, default=5.0, help="worker batch_max_age_s")
    ap.add_argument("--seconds", type=float, default=300.0, help="give up on a run after this")
    args = ap.parse_args()
    counts = [int(c) for c in args.workers.split(",")]

    home = Path(tempfile.mkdtemp(prefix="scale-bench-home-"))
    results = []
    try:
        with sb.local_stack(home) as base:
            for n in counts:
                results.append(run_one(args, base, n))
    finally:
        shutil.rmtree(home, ignore_errors=True)

    table = Table(
        title=f"{args.samples:,} samples, {args.partitions} partitions, {os.cpu_count()} cores"
    )
    for col in (
        "workers",
        "sealed",
        "wall s",
        "samples/s overall",
        "samples/s steady",
        "CPU s",
        "CPU s / M samples",
        "batches",
    ):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            f"{r['workers']}",
            f"{r['sealed']:,}/{r['total']:,}",
            f"{r['seconds']:.1f}",
            f"{r['overall']:,.0f}",
            f"{r['steady']:,.0f}",
            f"{r['cpu_s']:.1f}",
            f"{r['cpu_per_m']:.1f}",
            f"{r['batches']}",
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
