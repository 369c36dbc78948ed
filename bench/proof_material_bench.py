"""Proof material per sample: what a sealed lake keeps beside its Parquet files to build proofs.

    .venv/bin/python bench/proof_material_bench.py [--patients 20] [--seconds 600] [--window 2]

Seals ``--seconds`` of ``--patients`` patients' vitals through the real :class:`Sealer` (real
keystore, encrypted files, manifests) in seal windows of ``--window`` seconds of data: 1 Hz
heart rate, SpO2 and RR interval, body temperature every minute, 50 Hz motion (three axes)
one minute in ten. Then counts, per sample:

* ``proof_bytes_per_sample``: the proof material. Tree version 1 keeps every reading's
  32-byte leaf (``_batches/<batch>.leaves``); version 2 keeps each patient's subtree root and
  size in the manifest (the bytes ``patient_roots`` and ``patient_sizes`` add to it);
* ``proof_disk_bytes_per_sample``: the same as the filesystem allocates it (a ``.leaves``
  file takes whole blocks; version 2's roots sit in the manifest, which exists anyway);
* ``manifest_bytes_per_sample`` and ``lake_bytes_per_sample`` for scale.

The code measured is whichever ``streams.sealer`` is imported: run it once with
``PYTHONPATH`` at a commit before the two-level tree and once after (docs/benchmarks.md).
Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from streams.lake.keystore import LocalKeystore
from streams.lake.layout import BATCHES_DIR
from streams.sealer import Pending, Sealer
from vitalproof.schema import SampleBatch, Transport

T0 = 1_732_147_200_000_000  # 2024-11-21T00:00:00Z
US = 1_000_000
MOTION_HZ = 50


def _batch(patient: int, start_s: int, window: int, seq: list[int]) -> SampleBatch:
    """One device's ``window`` seconds from ``start_s``: the sample mix of the module doc."""
    b = SampleBatch(
        device_id=f"dev-{patient:03d}",
        patient_id=f"pt-{patient:03d}",
        gateway_id="gw-1",
        transport=Transport.MQTT,
        receive_time_us=T0 + (start_s + window) * US,
    )

    def add(metric: str, unit: str, t_us: int, value: float) -> None:
        b.add(metric, unit, t_us, seq[0], value)
        seq[0] += 1

    for s in range(start_s, start_s + window):
        t = T0 + s * US
        add("heart_rate", "/min", t, float(60 + (s + patient) % 25))
        add("spo2", "%", t, float(95 + (s // 7 + patient) % 5))
        add("rr_interval", "ms", t, float(800 + (s * 37 + patient) % 200))
        if s % 60 == 0:
            add("body_temperature", "Cel", t, 36.5 + ((s // 60 + patient) % 9) / 100)
        if (s // 60) % 10 == 0:  # motion one minute in ten
            for k in range(MOTION_HZ):
                tk = t + k * US // MOTION_HZ
                phase = 2 * math.pi * (k / MOTION_HZ + patient / 7)
                add("accel_x", "m/s2", tk, round(math.sin(phase), 3))
                add("accel_y", "m/s2", tk, round(math.cos(phase), 3))
                add("accel_z", "m/s2", tk, round(9.81 + 0.1 * math.sin(3 * phase), 3))
    b.fill_reading_ids()
    return b


def _file_bytes(paths: list[Path]) -> tuple[int, int]:
    """(bytes, bytes allocated on disk) of ``paths``."""
    return sum(p.stat().st_size for p in paths), sum(p.stat().st_blocks * 512 for p in paths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=20, help="patients, one device each")
    ap.add_argument("--seconds", type=int, default=600, help="seconds of data per patient")
    ap.add_argument("--window", type=int, default=2, help="seconds of data per sealed batch")
    ap.add_argument("--dir", type=Path, default=None, help="where the lake goes (default: tmp)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "lake"
        sealer = Sealer(root, LocalKeystore(Path(tmp) / "keys"))
        seqs = [[0] for _ in range(args.patients)]
        offset, samples, t0 = 0, 0, time.perf_counter()
        for start in range(0, args.seconds, args.window):
            items = []
            for p in range(args.patients):
                b = _batch(p, start, min(args.window, args.seconds - start), seqs[p])
                samples += len(b)
                items.append(Pending("bench.vitals.clean", 0, offset, b))
                offset += 1
            sealer.seal(items)
        seal_s = time.perf_counter() - t0

        batches = root / BATCHES_DIR
        manifests = sorted(batches.glob("*.json"))
        leaves = sorted(batches.glob("*.leaves"))
        lake_files = sorted(p for p in root.rglob("*.parquet"))
        manifest_bytes, manifest_disk = _file_bytes(manifests)
        leaves_bytes, leaves_disk = _file_bytes(leaves)
        lake_bytes, _ = _file_bytes(lake_files)
        roots_bytes = 0  # what the version-2 fields add to the manifests
        for m in manifests:
            doc = json.loads(m.read_bytes())
            if "patient_roots" in doc:
                rest = {k: v for k, v in doc.items() if k not in ("patient_roots", "patient_sizes")}
                roots_bytes += m.stat().st_size - len(json.dumps(rest, separators=(",", ":")))
        proof = leaves_bytes + roots_bytes
        result = {
            "tree": 1 if leaves else 2,
            "patients": args.patients,
            "seconds": args.seconds,
            "window_s": args.window,
            "samples": samples,
            "batches": len(manifests),
            "proof_bytes_per_sample": round(proof / samples, 3),
            "proof_disk_bytes_per_sample": round((leaves_disk + roots_bytes) / samples, 3),
            "manifest_bytes_per_sample": round(manifest_bytes / samples, 3),
            "manifest_disk_bytes_per_sample": round(manifest_disk / samples, 3),
            "lake_bytes_per_sample": round(lake_bytes / samples, 3),
            "seal_samples_per_s": round(samples / seal_s),
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
