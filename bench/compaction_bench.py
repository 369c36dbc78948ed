"""Compaction benchmark: a realistic hour of vitals sealed at a 2 s window, then compacted.

    .venv/bin/python bench/compaction_bench.py [--patients 100] [--minutes 60] [--window 2]
                                               [--dir /tmp/compactbench] [--keep]

What each of ``--patients`` patients (one wearable each) sends: heart rate and SpO2 at 1 Hz
(integers), one RR interval per heartbeat (integer ms), skin temperature once a minute
(0.01 Cel), and, one minute in ten (a different minute per patient), 50 Hz motion on three
axes (accel_x/y/z, 0.001 g: a 2 Hz gait plus noise). That is ~65,000 samples per patient-hour,
83 % of them motion. Every ``--window`` seconds the window's readings go through the real
sealer (:class:`streams.sealer.Sealer`: salts, leaves, one encrypted file per patient, the
leaf file and the manifest, every file fsync'd), as the seal process would with
``VITALPROOF_BATCH_MAX_AGE_S=2``; no Kafka is needed for that. Then one
:func:`streams.lake.compact.compact_lake` run on one core (the process is pinned to CPU 0).

Reported (the last line is one JSON object): bytes per sample of the lake before and after,
everything stored under the lake root after (lake, manifests, proof material, compaction
records) in total and by part, files before and after, compaction samples/s, and the
encryption overhead: the compacted files' rows encoded again without encryption (time and
bytes), the same way ``bench/lake_bench.py`` measures it for the sealer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from streams import lake
from streams.lake.compact import compact_lake
from streams.lake.keystore import LocalKeystore
from streams.lake.records import load_state
from streams.sealer import Pending, Sealer
from vitalproof.schema import SampleBatch, Transport

T0 = 1_800_000_000_000_000  # 2027-01-15T08:00:00Z: the hour stays within one UTC day
US = 1_000_000
MOTION_HZ = 50


class Patient:
    """One wearable's state: slowly drifting vitals, the time of its next heartbeat."""

    def __init__(self, n: int, rng: random.Random) -> None:
        self.n = n
        self.rng = rng
        self.hr = rng.uniform(58, 85)
        self.spo2 = rng.uniform(95, 99)
        self.temp = rng.uniform(32.5, 34.5)
        self.next_beat_us = T0 + rng.randrange(1_000_000)
        self.seq = 0
        self.motion_minute = n % 10

    def window(self, start_us: int, seconds: int) -> SampleBatch:
        rng = self.rng
        b = SampleBatch(
            device_id=f"watch-{self.n:04d}",
            patient_id=f"pt-{self.n:04d}",
            gateway_id=f"gw-{self.n % 4}",
            transport=Transport.MQTT,
            receive_time_us=start_us + seconds * US + rng.randrange(200_000),
            tz_offset_min=60,
        )

        def add(metric: str, unit: str, t: int, value: float) -> None:
            b.add(metric, unit, t, self.seq, value)
            self.seq += 1

        end_us = start_us + seconds * US
        for s in range(seconds):
            t = start_us + s * US
            self.hr += rng.gauss(0, 0.6) + (72 - self.hr) * 0.01
            self.spo2 += rng.gauss(0, 0.15) + (97.5 - self.spo2) * 0.02
            add("heart_rate", "/min", t, float(round(self.hr)))
            add("spo2", "%", t, float(min(100, round(self.spo2))))
            if (t - T0) // US % 60 == 0:
                self.temp += rng.gauss(0, 0.03)
                add("skin_temperature", "Cel", t, round(self.temp, 2))
        while self.next_beat_us < end_us:
            rr = 60_000 / self.hr + rng.gauss(0, 25)
            add("rr_interval", "ms", self.next_beat_us, float(round(rr)))
            self.next_beat_us += int(rr * 1000)
        minute = (start_us - T0) // (60 * US)
        if minute % 10 == self.motion_minute:
            step = US // MOTION_HZ
            for i in range(seconds * MOTION_HZ):
                t = start_us + i * step
                phase = 2 * math.pi * 2.0 * (t - T0) / US
                for axis, (amp, bias) in (("x", (0.3, 0.0)), ("y", (0.2, 0.0)), ("z", (0.4, 1.0))):
                    g = bias + amp * math.sin(phase + len(axis)) + rng.gauss(0, 0.02)
                    add(f"accel_{axis}", "[g]", t, round(g, 3))
        b.fill_reading_ids()
        return b


def du(root: Path, pattern: str = "*") -> tuple[int, int]:
    """(files, bytes) of regular files under ``root`` matching ``pattern``."""
    files = [p for p in root.rglob(pattern) if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def seal_all(work: Path, patients: int, minutes: int, window_s: int) -> tuple[int, float]:
    """Seal ``minutes`` of every patient's readings, one batch per window; (samples, s)."""
    rng = random.Random(16)
    fleet = [Patient(n, rng) for n in range(patients)]
    sealer = Sealer(work / "lake", LocalKeystore(work / "keys"))
    offsets = [0] * 4
    samples = 0
    seal_s = 0.0
    windows = minutes * 60 // window_s
    for w in range(windows):
        start = T0 + w * window_s * US
        pend = []
        for p in fleet:
            part = p.n % 4
            pend.append(Pending("vitals.clean", part, offsets[part], p.window(start, window_s)))
            offsets[part] += 1
        samples += sum(len(x.batch) for x in pend)
        t = time.perf_counter()
        manifest = sealer.seal(pend)
        seal_s += time.perf_counter() - t
        assert manifest is not None
        if (w + 1) % max(1, windows // 10) == 0:
            print(f"  sealed {w + 1}/{windows} windows, {samples:,} samples", file=sys.stderr)
    return samples, seal_s


def encryption_overhead(root: Path, kms: LocalKeystore) -> dict[str, float]:
    """Encode each patient's compacted rows again, with and without encryption.

    CPU time, plain and encrypted alternately per patient, the best of 5 for each: on a
    shared machine a pass over every patient at once measured mostly the neighbours.
    """
    state = load_state(pa.fs.LocalFileSystem(), str(root))
    pseudonyms = {r.patient for r in state.records}  # records name patients by pseudonym
    patients = sorted(str(kms.patient_of(h)) for h in pseudonyms)
    plain_s = enc_s = 0.0
    plain_b = enc_b = 0
    for p in patients:
        t = lake.read_patient(root, p, kms)
        key = kms.current_key_id(p)
        best_plain = best_enc = float("inf")
        for _ in range(5):
            c = time.process_time()
            plain_n = len(lake.encode_parquet(t, kms=None))
            best_plain = min(best_plain, time.process_time() - c)
            c = time.process_time()
            enc_n = len(lake.encode_parquet(t, kms=kms, key_id=key))
            best_enc = min(best_enc, time.process_time() - c)
        plain_s += best_plain
        enc_s += best_enc
        plain_b += plain_n
        enc_b += enc_n
    return {
        "encryption_overhead_pct": round(100 * (enc_s - plain_s) / plain_s, 1),
        "encryption_bytes_overhead_pct": round(100 * (enc_b - plain_b) / plain_b, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=100, help="wearers, one device each")
    ap.add_argument("--minutes", type=int, default=60, help="minutes of data to seal")
    ap.add_argument("--window", type=int, default=2, help="seal window, seconds")
    ap.add_argument(
        "--dir", type=Path, help="work folder (default: a temporary one; /dev/shm: no disk)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})  # one core, as the target says
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    work = args.dir or Path(tempfile.mkdtemp(prefix="compactbench-"))
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    root = work / "lake"
    try:
        samples, seal_s = seal_all(work, args.patients, args.minutes, args.window)
        files_before, lake_before = du(root, "*.parquet")
        _, stored_before = du(root)
        kms = LocalKeystore(work / "keys")
        cpu0 = time.process_time()
        report = compact_lake(root, kms)
        cpu_s = time.process_time() - cpu0
        files_after, lake_after = du(root, "*.parquet")
        _, stored = du(root)
        _, manifests = du(root / "_batches", "*.json")
        _, leaves = du(root / "_batches", "*.leaves")
        _, batches_dir = du(root / "_batches")
        _, records = du(root / "_compactions")
        assert report.rows == samples, (report.rows, samples)
        stats = lake.lake_stats(root, kms, batches=lake.sealed_batch_ids(root))
        assert stats["readings"] == samples and stats["duplicates"] == 0
        out = {
            "patients": args.patients,
            "minutes": args.minutes,
            "window_s": args.window,
            "samples": samples,
            "seal_samples_per_s": round(samples / seal_s),
            "files_before": files_before,
            "files_after": files_after,
            "lake_bytes_per_sample_before": round(lake_before / samples, 2),
            "lake_bytes_per_sample_after": round(lake_after / samples, 2),
            "stored_bytes_per_sample_before": round(stored_before / samples, 2),
            "stored_bytes_per_sample_after": round(stored / samples, 2),
            "manifest_bytes_per_sample": round(manifests / samples, 2),
            "leaves_bytes_per_sample": round(leaves / samples, 2),
            "other_batches_dir_bytes_per_sample": round(
                (batches_dir - manifests - leaves) / samples, 2
            ),
            "compaction_record_bytes_per_sample": round(records / samples, 3),
            "compaction_seconds": round(report.seconds, 2),
            "compaction_samples_per_s": round(samples / report.seconds),
            "compaction_cpu_seconds": round(cpu_s, 2),
            "compaction_samples_per_cpu_s": round(samples / cpu_s),
            **encryption_overhead(root, kms),
        }
        print(json.dumps(out))
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
