"""Streams benchmark: one worker, vitals.raw -> sealed encrypted Parquet, samples per second.

    .venv/bin/python bench/streams_bench.py [--seconds 60] [--samples 3000000] [--devices 100]
        [--per-message 120] [--batch-rows 200000] [--plot streams_bench.png]
    .venv/bin/python bench/streams_bench.py --inprocess [--samples 400000] [--profile]

End to end (default): starts a local stack (Kafka + Mosquitto on free ports, tmp home) unless
``VITALPROOF_KAFKA_BOOTSTRAP`` names a running Kafka, enrolls the devices (as of an hour
before the first generated device time, so no reading is flagged BEFORE_ENROLLMENT), pre-fills
``vitals.raw`` with pre-encoded SampleBatch JSON (1 Hz heart rate, SpO2, respiratory rate and
skin temperature; ``--per-message`` samples per Kafka message), then starts ONE worker
(``python -m vitalproof worker``, exactly as deployed) and follows the manifests it seals.
Pre-filling first means the producer does not compete with the worker for the two cores:
what is measured is the worker alone. Reported: samples/s raw -> sealed (overall from worker
start, and steady state between the first and the last manifest), worker RSS (the worker and
its seal process together: VmRSS sampled each second, and each one's VmHWM peak, from
/proc), bytes per sample on disk (Parquet alone, and with the 32-byte leaf file). The run
stops when every sample is sealed or after ``--seconds``; everything it started is stopped.
A PNG of sealed samples and RSS over time is written when matplotlib is importable (not a
dependency).

``--inprocess``: no Kafka; the worker's per-message functions (decode + normalize + dedupe +
encode for vitals.clean, then decode + seal) on the same messages, timed per stage, and with
``--profile`` under cProfile: where the per-sample Python work is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import pstats
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vitalproof.raw import RawRecord  # noqa: E402
from vitalproof.schema import CONTENT_TYPE_JSON, SampleBatch, Transport  # noqa: E402
from vitalproof.settings import (  # noqa: E402
    ChainSettings,
    DevStackSettings,
    KafkaSettings,
    MqttSettings,
    PathSettings,
    Settings,
)
from vitalproof.units import PLAUSIBLE, Metric  # noqa: E402
from vitalproof.wire import binary  # noqa: E402

US = 1_000_000
METRICS = [  # metric, unit, mean, random-walk step, resolution (as devices quantize)
    ("heart_rate", "/min", 72.0, 1.0, 1.0),
    ("spo2", "%", 97.0, 0.3, 1.0),
    ("respiratory_rate", "/min", 15.0, 0.3, 1.0),
    ("skin_temperature", "Cel", 33.5, 0.02, 0.01),
]
console = Console()
_clock = time.perf_counter  # --inprocess --cpu switches to process CPU time


# -- workload --------------------------------------------------------------------------------


@dataclass(slots=True)
class Message:
    device_id: str
    payload: bytes
    samples: int
    received_us: int
    first_us: int  # device time of the message's first sample
    content_type: str = CONTENT_TYPE_JSON


def generate(
    samples: int, devices: int, per_message: int, seed: int = 7, encoding: str = "json"
) -> list[Message]:
    """Device payloads, interleaved across devices, as a fleet would send them.

    Every device sends ``per_message`` samples per message (``per_message / 4`` seconds of
    its four 1 Hz vitals); values stay in each metric's plausible range, and device times end
    a few minutes before now, so no flag fires, provided the devices are enrolled before the
    first of them (:func:`enrolled_us`).
    """
    rng = random.Random(seed)
    secs_per_msg = max(1, per_message // len(METRICS))
    msgs_per_dev = max(1, samples // (devices * secs_per_msg * len(METRICS)))
    now = time.time_ns() // 1000
    t_start = now - (msgs_per_dev * secs_per_msg + 300) * US
    state = [[m[2] for m in METRICS] for _ in range(devices)]
    lo, hi = zip(*(PLAUSIBLE[Metric(m[0])] for m in METRICS), strict=True)
    out: list[Message] = []
    for k in range(msgs_per_dev):
        for d in range(devices):
            t0 = t_start + k * secs_per_msg * US + d * 1000
            ts = [t0 + s * US for s in range(secs_per_msg)]
            seq = list(range(k * secs_per_msg, (k + 1) * secs_per_msg))
            series = []
            for j, (metric, unit, mean, step, res) in enumerate(METRICS):
                vals: list[float | int] = []
                x = state[d][j]
                for _ in ts:
                    x += rng.gauss(0, step) + (mean - x) * 0.02
                    # within the measuring range, as a device reports (SpO2 <= 100 %)
                    q = min(max(round(round(x / res) * res, 2), lo[j]), hi[j])
                    vals.append(int(q) if res >= 1 else q)
                state[d][j] = x
                series.append({"metric": metric, "unit": unit, "t": ts, "seq": seq, "v": vals})
            doc = {"schema": 1, "device_id": f"dev-{d:05d}", "series": series}
            payload = json.dumps(doc, separators=(",", ":")).encode()
            ctype = CONTENT_TYPE_JSON
            if encoding == "binary":  # the same samples in vitalproof.wire.binary
                payload = binary.encode(SampleBatch.from_json(payload), with_device=False)
                ctype = binary.CONTENT_TYPE_BINARY
            rx = ts[-1] + 200_000
            n = secs_per_msg * len(METRICS)
            out.append(Message(f"dev-{d:05d}", payload, n, rx, ts[0], ctype))
    return out


def enrolled_us(msgs: list[Message]) -> int:
    """When to enroll the devices: an hour before the earliest device time generated.

    Real devices are enrolled before they record. Enrolled at bench start instead, every
    sample (timed up to hours earlier) would carry BEFORE_ENROLLMENT and normalize would
    take its per-sample flagging path, which real traffic does not.
    """
    return min((m.first_us for m in msgs), default=time.time_ns() // 1000) - 3600 * US


def raw_record(m: Message, gateway: str = "gw-bench") -> RawRecord:
    return RawRecord(
        device_id=m.device_id,
        payload=m.payload,
        content_type=m.content_type,
        transport=Transport.MQTT,
        gateway_id=gateway,
        received_us=m.received_us,
        source=f"devices/{m.device_id}/vitals",
    )


# -- in process ------------------------------------------------------------------------------


def run_inprocess(args: argparse.Namespace) -> None:
    """The worker's per-message work without Kafka: where the CPU goes, per stage."""
    from streams.agents.normalize import CLEAN_BUNDLE_SAMPLES, NORMALIZE_TAKE, bundle_by_patient
    from streams.dedupe import DedupeWindows
    from streams.lake.keystore import LocalKeystore
    from streams.normalize import Rejection, normalize
    from streams.seal_buffer import SealBuffer
    from streams.seal_process import CleanRecord, seal_records
    from streams.sealer import Sealer
    from vitalproof.registry import Device, DeviceStatus
    from vitalproof.wire import clean

    msgs = generate(args.samples, args.devices, args.per_message, encoding=args.raw_encoding)
    total = sum(m.samples for m in msgs)
    enrolled = enrolled_us(msgs)
    devices = {
        m.device_id: Device(m.device_id, f"pt-{m.device_id[4:]}", DeviceStatus.ACTIVE, enrolled)
        for m in msgs
    }
    raws = [raw_record(m) for m in msgs]
    tmp = Path(tempfile.mkdtemp(prefix="streams-bench-"))
    prof = cProfile.Profile() if args.profile else None
    try:
        sealer = Sealer(tmp / "lake", LocalKeystore(tmp / "keys"))
        recent = DedupeWindows()
        if prof:
            prof.enable()
        t0 = _clock()
        clean_records: list[bytes] = []
        for start in range(0, len(raws), NORMALIZE_TAKE):  # as the worker takes them
            accepted = []
            for i, r in enumerate(raws[start : start + NORMALIZE_TAKE], start):
                b = normalize(r, devices.get)
                assert not isinstance(b, Rejection), b
                accepted.append((b, f"0:{i}"))
            recent.drop_seen_many(accepted)
            batches = [b for b, _origin in accepted]
            for _patient, bundle in bundle_by_patient(batches, CLEAN_BUNDLE_SAMPLES):
                clean_records.append(clean.encode_bundle(bundle))
            recent.drain()
        t1 = _clock()
        # Cut into batches as the worker's seal buffer does (whole records, by rows), and
        # sealed by what the seal process runs.
        buffer: SealBuffer[CleanRecord] = SealBuffer(
            max_rows=args.batch_rows,
            max_records=len(clean_records) + 1,
            max_age_s=float("inf"),
            rows_of=lambda r: clean.sample_count(r[3]),
        )
        buffer.add([("clean", 0, i, v) for i, v in enumerate(clean_records)], 0.0)
        t2 = _clock()
        rows = 0
        while len(buffer):
            rows += seal_records(sealer, buffer.pop_batch()).rows
        t3 = _clock()
        if prof:
            prof.disable()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert rows == total, (rows, total)
    table = Table(title=f"in process: {total:,} samples, {len(msgs):,} messages")
    for col in ("stage", "CPU seconds" if args.cpu else "seconds", "samples/s"):
        table.add_column(col, justify="right")
    for name, dt in (
        ("normalize (decode, units, flags, ids, dedupe, encode)", t1 - t0),
        ("seal: cut batches (sample counts)", t2 - t1),
        ("seal process: decode, leaves, Parquet, manifest", t3 - t2),
        ("total", t3 - t0),
    ):
        table.add_row(name, f"{dt:.2f}", f"{total / dt:,.0f}")
    console.print(table)
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
        print(out.getvalue())


# -- end to end ------------------------------------------------------------------------------


@dataclass
class Trace:
    t: list[float] = field(default_factory=list)  # seconds since worker start
    rows: list[int] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)  # worker + seal process
    pss_mb: list[float] = field(default_factory=list)
    cpu_s: tuple[float, float] = (0.0, 0.0)  # worker, seal process (last sample)


def proc_memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MB, from /proc (psutil is not a dependency)."""
    rss = hwm = 0.0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return rss, hwm


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (the worker's seal process)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError), open(entry / "status") as f:
            for line in f:
                if line.startswith("PPid:"):
                    if int(line.split()[1]) == pid:
                        out.append(int(entry.name))
                    break
    return out


def proc_pss_mb(pid: int) -> float:
    """Proportional set size: shared library pages split between the processes mapping
    them, so the worker and its seal process add up to what they really hold together."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return 0.0


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


@dataclass
class TreeSample:
    """The worker and its children (the seal process) at one moment."""

    rss_mb: float
    child_rss_mb: float
    hwm_mb: float  # VmHWM of the worker
    child_hwm_mb: float  # VmHWM of its children (summed)
    pss_mb: float  # sum of Pss
    cpu_s: float
    child_cpu_s: float


def sample_tree(pid: int) -> TreeSample:
    rss, hwm = proc_memory_mb(pid)
    child_rss = child_hwm = child_cpu = 0.0
    pss = proc_pss_mb(pid)
    for child in children(pid):
        c_rss, c_hwm = proc_memory_mb(child)
        child_rss += c_rss
        child_hwm += c_hwm
        pss += proc_pss_mb(child)
        child_cpu += proc_cpu_s(child)
    return TreeSample(rss, child_rss, hwm, child_hwm, pss, proc_cpu_s(pid), child_cpu)


def read_manifests(batches_dir: Path, seen: dict[str, dict[str, Any]]) -> None:
    """Load the manifests not seen yet (the manifest is written last: it is complete)."""
    for p in batches_dir.glob("*.json"):
        if p.name not in seen:
            with contextlib.suppress(OSError, ValueError):
                seen[p.name] = json.loads(p.read_bytes())


@contextlib.contextmanager
def local_stack(home: Path) -> Iterator[Settings]:
    """Settings on a running Kafka: the one VITALPROOF_* names, or a fresh stack of ours."""
    if os.environ.get("VITALPROOF_KAFKA_BOOTSTRAP"):
        yield Settings().evolve(paths={"home": home})
        return
    from pydantic import SecretStr

    from vitalproof.devstack import StackManager
    from vitalproof.devstack.procs import free_ports

    kafka_port, controller_port, mqtt_port, anvil_port = free_ports(4)
    settings = Settings(
        paths=PathSettings(home=home),
        kafka=KafkaSettings(bootstrap=f"127.0.0.1:{kafka_port}"),
        devstack=DevStackSettings(kafka_controller_port=controller_port, anvil_port=anvil_port),
        mqtt=MqttSettings(
            host="127.0.0.1",
            port=mqtt_port,
            collector_password=SecretStr("bench-collector-password"),
        ),
        chain=ChainSettings(kind="embedded"),
    )
    manager = StackManager(settings)
    console.print(f"starting Kafka on {settings.kafka.bootstrap} (home {home})")
    try:
        status = manager.up(chain="embedded")
        deadline = time.monotonic() + 30
        while not status.healthy and time.monotonic() < deadline:
            time.sleep(0.5)
            status = manager.status()
        if not status.healthy:
            raise SystemExit(f"stack not healthy:\n{status.to_json()}")
        yield settings
    finally:
        manager.down()


async def prefill(settings: Settings, msgs: list[Message]) -> float:
    """Produce every message to vitals.raw (acks=all and the codec, as the collector does);
    seconds taken."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap,
        acks="all",
        linger_ms=20,
        max_batch_size=1 << 20,
        max_request_size=8 << 20,
        compression_type=settings.kafka.compression_type,  # as the collectors send it
    )
    await producer.start()
    t0 = _clock()
    try:
        pending: list[asyncio.Future[object]] = []
        for m in msgs:
            headers = raw_record(m, settings.gateway.id).headers()
            fut = await producer.send(
                settings.kafka.topic_raw, m.payload, key=m.device_id.encode(), headers=headers
            )
            pending.append(fut)
            if len(pending) >= 2000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return _clock() - t0


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    from vitalproof.cli import processes

    return processes.start(settings, "worker", log=log)


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    from vitalproof.cli import processes

    processes.stop(proc)


def run_e2e(args: argparse.Namespace) -> None:
    from vitalproof.devstack import ensure_topics
    from vitalproof.registry import Registry

    home = Path(tempfile.mkdtemp(prefix="streams-bench-home-"))
    try:
        with local_stack(home) as base:
            settings = base.evolve(
                kafka={"topic_prefix": f"bench{os.getpid()}."},
                batching={
                    "max_rows": args.batch_rows,
                    "max_messages": max(1000, args.batch_rows // args.per_message + 1),
                    "max_age_s": args.batch_age,
                },
            )
            measure(args, settings, Registry(settings.paths.registry_path), ensure_topics)
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
        else:
            console.print(f"kept {home}")


def measure(args: argparse.Namespace, settings: Settings, registry: object, ensure: Any) -> None:
    from vitalproof.registry import Registry

    assert isinstance(registry, Registry)
    t = _clock()
    msgs = generate(args.samples, args.devices, args.per_message, encoding=args.raw_encoding)
    total = sum(m.samples for m in msgs)
    raw_bytes = sum(len(m.payload) for m in msgs)
    console.print(
        f"generated {len(msgs):,} messages, {total:,} samples "
        f"({raw_bytes / total:.1f} B/sample of {args.raw_encoding}) in {_clock() - t:.1f} s"
    )
    enrolled = enrolled_us(msgs)
    for d in sorted({m.device_id for m in msgs}):
        registry.enroll(d, f"pt-{d[4:]}", enrolled_us=enrolled)
    topics = settings.kafka.pipeline_topics
    ensure(settings, topics, settings.kafka.partitions)
    took = asyncio.run(prefill(settings, msgs))
    console.print(
        f"pre-filled {settings.kafka.topic_raw} in {took:.1f} s ({total / took:,.0f} samples/s)"
    )
    del msgs

    batches_dir = settings.lake_dir / "_batches"
    log = settings.paths.home / "worker.log"
    trace = Trace()
    seen: dict[str, dict[str, Any]] = {}
    hwm = (0.0, 0.0)  # peak VmHWM of the worker, of the seal process
    proc = start_worker(settings, log)
    t0 = time.monotonic()
    try:
        while True:
            time.sleep(1.0)
            elapsed = time.monotonic() - t0
            read_manifests(batches_dir, seen)
            rows = sum(int(m["rows"]) for m in seen.values())
            tree = sample_tree(proc.pid)
            rss = tree.rss_mb + tree.child_rss_mb
            hwm = (max(hwm[0], tree.hwm_mb), max(hwm[1], tree.child_hwm_mb))
            trace.t.append(elapsed)
            trace.rows.append(rows)
            trace.rss_mb.append(rss)
            trace.pss_mb.append(tree.pss_mb)
            trace.cpu_s = (tree.cpu_s, tree.child_cpu_s)
            if int(elapsed) % 10 == 0:
                console.print(
                    f"  {elapsed:6.0f} s  sealed {rows:>11,}  "
                    f"({rows / max(elapsed, 1e-9):,.0f}/s)  RSS {rss:,.0f} MB "
                    f"(worker {tree.rss_mb:,.0f} + seal {tree.child_rss_mb:,.0f}), "
                    f"PSS {tree.pss_mb:,.0f} MB, CPU s {tree.cpu_s:.0f} + {tree.child_cpu_s:.0f}"
                )
            if proc.poll() is not None:
                console.print(f"[red]worker exited ({proc.returncode}); see {log}[/red]")
                break
            if rows >= total or elapsed >= args.seconds:
                break
    finally:
        stop_worker(proc)
    report(args, settings, seen, trace, total, hwm, log)


def report(
    args: argparse.Namespace,
    settings: Settings,
    manifests: dict[str, dict[str, Any]],
    trace: Trace,
    total: int,
    hwm: tuple[float, float],
    log: Path,
) -> None:
    ms = sorted(manifests.values(), key=lambda m: int(m["sealed_at_us"]))
    rows = sum(int(m["rows"]) for m in ms)
    parquet = sum(int(f["bytes"]) for m in ms for f in m["files"])
    nfiles = sum(len(m["files"]) for m in ms)
    elapsed = trace.t[-1] if trace.t else 0.0
    # time at which the last sealed count was reached (the run may idle at the end)
    done_at = next((t for t, r in zip(trace.t, trace.rows, strict=True) if r >= rows), elapsed)
    steady = 0.0
    if len(ms) >= 2:
        span = (int(ms[-1]["sealed_at_us"]) - int(ms[0]["sealed_at_us"])) / US
        steady = (rows - int(ms[0]["rows"])) / span if span > 0 else 0.0
    table = Table(title="streams bench: one worker, vitals.raw -> sealed encrypted Parquet")
    table.add_column("measure")
    table.add_column("result", justify="right")
    table.add_column("target", justify="right")
    table.add_row("samples pre-filled / sealed", f"{total:,} / {rows:,}", "all")
    table.add_row("run time (worker start -> last seal)", f"{done_at:.1f} s", "")
    table.add_row("batches / files", f"{len(ms):,} / {nfiles:,}", "")
    table.add_row("samples/s, overall (incl. start)", f"{rows / max(done_at, 1e-9):,.0f}", "")
    table.add_row("samples/s, steady (first -> last seal)", f"{steady:,.0f}", ">= 200,000")
    table.add_row(
        "RSS worker + seal process, max sampled (peaks: worker / seal process, VmHWM)",
        f"{max(trace.rss_mb or [0]):,.0f} MB ({hwm[0]:,.0f} / {hwm[1]:,.0f} MB)",
        "<= 512 MB",
    )
    table.add_row(
        "PSS worker + seal process, max sampled", f"{max(trace.pss_mb or [0]):,.0f} MB", ""
    )
    table.add_row(
        "CPU s worker / seal process (per s of run)",
        f"{trace.cpu_s[0]:.0f} / {trace.cpu_s[1]:.0f} "
        f"({trace.cpu_s[0] / max(elapsed, 1e-9):.2f} / {trace.cpu_s[1] / max(elapsed, 1e-9):.2f})",
        "",
    )
    if rows:
        table.add_row("bytes/sample, Parquet", f"{parquet / rows:.2f}", "<= 10")
        table.add_row(
            "bytes/sample, Parquet + leaf file", f"{(parquet + 32 * rows) / rows:.2f}", ""
        )
        table.add_row("rows per file (mean)", f"{rows / max(nfiles, 1):,.0f}", "")
    console.print(table)
    if rows < total:
        console.print(f"[yellow]{total - rows:,} samples not sealed within the run[/yellow]")
    summary = {
        "samples": total,
        "sealed": rows,
        "seconds": round(done_at, 1),
        "overall_samples_per_s": round(rows / max(done_at, 1e-9)),
        "steady_samples_per_s": round(steady),
        "rss_max_mb": round(max(trace.rss_mb or [0])),
        "vm_hwm_mb": [round(hwm[0]), round(hwm[1])],
        "pss_max_mb": round(max(trace.pss_mb or [0])),
        "cpu_s_worker": round(trace.cpu_s[0], 1),
        "cpu_s_seal_process": round(trace.cpu_s[1], 1),
        "parquet_bytes_per_sample": round(parquet / rows, 2) if rows else None,
        "batches": len(ms),
        "files": nfiles,
    }
    print(json.dumps(summary))
    if args.plot:
        plot(trace, Path(args.plot))


def plot(trace: Trace, path: Path) -> None:
    """Throughput (per 10 s) and RSS over the run, each against its target line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("matplotlib not installed (pip install -e .[dev]): no plot")
        return
    rate_t, rate = [], []
    for i, t in enumerate(trace.t):
        j = next(k for k, u in enumerate(trace.t) if u >= t - 10.0)
        if t - trace.t[j] >= 5.0:
            rate_t.append(t)
            rate.append((trace.rows[i] - trace.rows[j]) / (t - trace.t[j]) / 1000)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    top.plot(rate_t, rate, color="tab:blue", label="raw -> sealed, last 10 s")
    top.axhline(200, color="gray", linestyle="--", label="target 200,000/s")
    top.set_ylabel("thousand samples/s")
    top.set_ylim(bottom=0)
    top.legend(loc="lower right")
    bottom.plot(trace.t, trace.rss_mb, color="tab:red", label="worker + seal process RSS")
    bottom.axhline(512, color="gray", linestyle="--", label="target 512 MB")
    bottom.set_ylabel("MB")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("seconds since worker start")
    bottom.legend(loc="lower right")
    fig.suptitle("one worker, vitals.raw -> sealed encrypted Parquet")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    console.print(f"plot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="stop the worker after this")
    ap.add_argument("--samples", type=int, default=3_000_000, help="samples to pre-fill")
    ap.add_argument("--devices", type=int, default=100, help="devices (one patient each)")
    ap.add_argument("--per-message", type=int, default=120, help="samples per Kafka message")
    ap.add_argument(
        "--raw-encoding",
        choices=("json", "binary"),
        default="json",
        help="device payloads on vitals.raw: SampleBatch JSON or vitalproof.wire.binary",
    )
    ap.add_argument(
        "--batch-rows",
        type=int,
        default=200_000,
        help="worker batch_max_rows (400,000 took the worker past 512 MB RSS)",
    )
    ap.add_argument("--batch-age", type=float, default=10.0, help="worker batch_max_age_s")
    ap.add_argument("--plot", default="", help="write a PNG here (needs matplotlib)")
    ap.add_argument("--keep", action="store_true", help="keep the tmp home (lake, logs)")
    ap.add_argument("--inprocess", action="store_true", help="no Kafka: per-stage CPU only")
    ap.add_argument("--profile", action="store_true", help="with --inprocess: cProfile")
    ap.add_argument("--cpu", action="store_true", help="with --inprocess: CPU, not wall time")
    ap.add_argument("--top", type=int, default=25, help="profile lines to print")
    args = ap.parse_args()
    if args.inprocess:
        global _clock
        if args.cpu:
            _clock = time.process_time  # robust when other work shares the cores
        run_inprocess(args)
    else:
        run_e2e(args)


if __name__ == "__main__":
    main()
