"""End to end against the transport ceiling, in one run (issue 12, item 4).

    .venv/bin/python bench/e2e_bench.py [--seconds 600] [--devices 400] [--accel-hz 200]
        [--plot docs/img/e2e_bench.png] [--json]

fleet -> Mosquitto -> ONE ``vitalproof collect`` -> Kafka ``vitals.raw`` -> ONE
``vitalproof worker`` (normalize, dedupe, seal: encrypted Parquet + manifests) ->
``vitalproof anchor run`` (embedded py-evm chain in its own process), every part started as
deployed (:mod:`vitalproof.cli.processes`), on a throwaway local stack
(:func:`streams_bench.local_stack`: Kafka + Mosquitto on free ports, tmp home).

The fleet: ``--publishers`` processes speaking MQTT v5 over raw sockets
(``collector_bench``'s CONNECT/PUBLISH/CONNACK code), one connection per enrolled device with
its own credential, QoS 1. Payloads are pre-encoded once (``collector_bench.make_payloads``:
:class:`device_sims.physiology.SimDevice`, ``--accel-hz`` triaxial accelerometer plus the
adult vitals, one message per ``--tick-s`` of device time, :mod:`vitalproof.wire.binary`),
one cycle of ``--cycle-s`` per device. Every message must carry NEW readings end to end
(dedupe would drop a repeated reading id), so each series' start time (the fixed-width i64
``t0`` of the binary format) is patched in place at publish time: the device's clock is
shifted so that the message's last sample is "now" and never before the previous message's
(a device publishes a message when its last sample is due, at its natural rate, or later if
the closed loop holds it back, and then skips ahead in device time rather than replay).
So device time tracks publish time to within one tick, which the latencies use.

Offered load: natural rate (devices x samples per device-second), held in a closed loop:
the publishers stay at most ``--backlog-rows`` samples ahead of what the lake has sealed, so
a pipeline slower than the fleet is measured at its ceiling without an ever-growing queue.

Checks, after the publishers stop (they drain their PUBACK windows first): every sample the
broker acknowledged is sealed exactly once: sealed rows == acknowledged samples, and the
32-byte leaves of all batches (deterministic per reading: per-patient HMAC salt over the
reading's canonical bytes, so a reading sealed twice gives the same leaf twice) are unique
(8-byte prefixes, bucketed to files on disk, ``numpy.unique`` per bucket); the DLQ is empty;
every batch is in the anchor log once and the last anchored head covers them all.

Latency, per batch (stated approximation): a batch's readings are taken as spread evenly
over its manifest's [first, last] device time; publish time = device time + 0..1 tick, so
publish -> sealed (manifest ``sealed_at_us``) and publish -> anchored (when the bench first
saw an anchored head covering the batch's log index; it polls each second) are upper
bounds by at most one tick plus the 1 s poll.

The transport ceiling for the same bytes, in the same run: before the pipeline starts,
``mosquitto_sub -q 1`` reads the same payloads from the same raw-socket publishers
(``collector_bench.measure_mosquitto_sub``, closed loop); after it, Kafka's own
``ProducerPerformance`` and ``ConsumerPerformance`` (the kafka-tools jar, resolved by
``mvn dependency:copy`` next to the broker's jars) with the record size and record count of
the run, acks=all, idempotence and the collectors' compression. The ceiling is the lowest of
the three in samples/s; the result is e2e / ceiling.

RSS: VmRSS of every process (publishers, Mosquitto, Kafka, collector, worker and its seal
process, anchor job, this process) sampled each second from /proc, and each one's VmHWM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import os
import pickle
import random
import re
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import collector_bench as cb  # noqa: E402
import streams_bench as sb  # noqa: E402

from vitalproof.settings import Settings  # noqa: E402
from vitalproof.wire import binary  # noqa: E402

US = 1_000_000
_I64 = struct.Struct("<q")
console = sb.console


# -- payloads whose series start times can be moved ------------------------------------------


def t0_positions(payload: bytes) -> list[int]:
    """Byte offsets of every series' i64 start time in a binary payload (layout: the module
    docstring of :mod:`vitalproof.wire.binary`)."""
    r = binary._Reader(payload)
    _magic, _version, flags = struct.unpack("<2sBB", r.take(4, "header"))
    if flags & binary.HAS_DEVICE:
        r.take(r.u8("device id length"), "device id")
    if flags & binary.HAS_TZ:
        r.take(2, "tz")
    out = []
    for _ in range(r.varint("series count")):
        r.u8("metric")
        sflags = r.u8("flags")
        if r.u8("unit") == binary.UNIT_INLINE:
            r.take(r.u8("unit length"), "unit")
        count = r.varint("count")
        out.append(r.pos)
        r.take(8, "t0")
        if sflags & binary.S_TIME_DELTAS:
            for _ in range(count - 1):
                r.zz("time delta")
        else:
            r.zz("period")
        r.zz("seq0")
        for _ in range(count - 1 if sflags & binary.S_SEQ_DELTAS else 1):
            r.zz("seq")
        r.take(count * (8 if sflags & binary.S_FLOAT64 else 4), "values")
        if sflags & binary.S_QUALITY:
            r.take(count, "quality")
    if r.pos != len(payload):
        raise ValueError("t0_positions: payload not fully walked")
    return out


def shifted(payload: bytes, positions: list[int], delta_us: int) -> bytes:
    """``payload`` with every series' start time moved by ``delta_us``."""
    out = bytearray(payload)
    for pos in positions:
        _I64.pack_into(out, pos, _I64.unpack_from(out, pos)[0] + delta_us)
    return bytes(out)


@dataclass(slots=True)
class Msg:
    payload: bytes
    samples: int
    positions: list[int]  # of each t0, within the payload
    end_us: int  # device time of the last sample, before any shift


def cycle_messages(payloads: dict[str, list], device_id: str) -> list[Msg]:
    """One device's pre-encoded cycle, with what moving it in time needs; the shift is
    checked once by decoding."""
    out = []
    for payload, n in payloads[device_id]:
        batch = binary.decode(payload, device_id=device_id)
        pos = t0_positions(payload)
        moved = binary.decode(shifted(payload, pos, 12_345), device_id=device_id)
        assert moved.device_time_us == [t + 12_345 for t in batch.device_time_us]
        out.append(Msg(payload, n, pos, max(batch.device_time_us)))
    return out


# -- the fleet (publisher processes) ----------------------------------------------------------


@dataclass(slots=True)
class _Dev:
    sock: socket.socket
    msgs: list[Msg]
    before: list[bytes]  # PUBLISH bytes before the packet id, per message
    props: bytes  # the properties (content type), between packet id and payload
    shift: int  # µs added to the cycle's device times
    k: int = 0  # next message in the cycle
    next_id: int = 1
    inflight: deque[int] = field(default_factory=deque)  # samples per unacked publish
    buf: bytes = b""


def publisher_main(config_path: str) -> None:
    """Publish each device's messages when due (natural rate), within the credit; on SIGTERM
    stop, drain the PUBACK windows, write the final counts."""
    cfg = pickle.loads(Path(config_path).read_bytes())
    sel = selectors.DefaultSelector()
    devs: list[_Dev] = []
    cycle_us, tick_us, window = cfg["cycle_us"], cfg["tick_us"], cfg["window"]
    rng = random.Random(cfg["seed"])
    now_us = time.time_ns() // 1000
    for device_id, password, msgs in cfg["devices"]:
        sock = socket.create_connection((cfg["host"], cfg["port"]))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(cb._connect_packet(f"{device_id}-e2e", device_id, password))
        window = min(cb._read_connack(sock), cfg["window"])
        topic = f"devices/{device_id}/vitals"
        before, props = [], b""
        for m in msgs:
            head, after = cb._publish_template(topic, m.payload, cfg["content_type"])
            before.append(head)
            props = after[: len(after) - len(m.payload)]
        # staggered: the first message is due within one tick from now
        shift = now_us - msgs[0].end_us + rng.randrange(tick_us)
        dev = _Dev(sock, msgs, before, props, shift)
        devs.append(dev)
        sel.register(sock, selectors.EVENT_READ, dev)
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    status = Path(cfg["status"])
    credit = Path(cfg["credit"]) if cfg["credit"] else None
    counts = {"sent": 0, "sent_samples": 0, "acked": 0, "acked_samples": 0, "late_us_max": 0}
    allowed = 1 << 62
    heap = [(d.msgs[0].end_us + d.shift, i) for i, d in enumerate(devs)]
    heapq.heapify(heap)
    next_credit = last_status = 0.0

    def write_status(**extra: object) -> None:
        status.write_text(json.dumps(counts | {"t": time.monotonic()} | extra))

    def read_acks(timeout: float) -> None:
        for key, _ in sel.select(timeout):
            d = key.data
            data = d.sock.recv(65536)
            if not data:
                raise ConnectionError("broker closed a publisher connection")
            n_acks, d.buf = cb.pubacks(d.buf + data)
            counts["acked"] += n_acks
            for _ in range(n_acks):  # the broker acks QoS 1 in order
                counts["acked_samples"] += d.inflight.popleft()

    while not stop:
        mono = time.monotonic()
        if credit is not None and mono >= next_credit:
            with contextlib.suppress(FileNotFoundError, ValueError):
                allowed = int(int(credit.read_text()) * cfg["share"])
            next_credit = mono + 0.05
        now_us = time.time_ns() // 1000
        deferred = []
        while heap and heap[0][0] <= now_us and counts["sent"] < allowed:
            _due, i = heapq.heappop(heap)
            d = devs[i]
            if len(d.inflight) >= window:
                deferred.append(i)
                continue
            m = d.msgs[d.k]
            # never before the last sample is due, never replaying device time: a late
            # message moves the device clock forward to now (a gap, not a repeat)
            late = now_us - (m.end_us + d.shift)
            counts["late_us_max"] = max(counts["late_us_max"], late)
            if late > 0:
                d.shift += late
            packet = (
                d.before[d.k]
                + d.next_id.to_bytes(2, "big")
                + d.props
                + shifted(m.payload, m.positions, d.shift)
            )
            d.sock.sendall(packet)
            d.next_id = d.next_id % 65535 + 1
            d.inflight.append(m.samples)
            counts["sent"] += 1
            counts["sent_samples"] += m.samples
            d.k += 1
            if d.k == len(d.msgs):
                d.k = 0
                d.shift += cycle_us
            heapq.heappush(heap, (d.msgs[d.k].end_us + d.shift, i))
        for i in deferred:
            heapq.heappush(heap, (now_us + 5_000, i))
        read_acks(0.005)
        if mono - last_status >= 0.25:
            write_status()
            last_status = mono
    deadline = time.monotonic() + 30
    while any(d.inflight for d in devs) and time.monotonic() < deadline:
        read_acks(0.05)
    write_status(done=True, unacked=sum(len(d.inflight) for d in devs))


class Fleet:
    """The publisher processes; totals from their status files."""

    def __init__(
        self,
        settings: Settings,
        devices: list[tuple[str, str]],
        cycles: dict[str, list[Msg]],
        n: int,
        workdir: Path,
        *,
        tick_us: int,
        cycle_us: int,
        window: int,
        credit: Path | None,
        initial_credit: int,
    ) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.status: list[Path] = []
        self.credit = credit
        self.grant(initial_credit)  # before they start: no file would mean no limit
        for k in range(n):
            status = workdir / f"fleet-{k}.json"
            cfg = {
                "host": settings.mqtt.host,
                "port": settings.mqtt.port,
                "content_type": binary.CONTENT_TYPE_BINARY,
                "status": str(status),
                "credit": str(credit) if credit else None,
                "share": 1 / n,
                "tick_us": tick_us,
                "cycle_us": cycle_us,
                "window": window,
                "seed": k,
                "devices": [(d, pw, cycles[d]) for d, pw in devices[k::n]],
            }
            path = workdir / f"fleet-{k}.pickle"
            path.write_bytes(pickle.dumps(cfg))
            self.status.append(status)
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--publisher", str(path)],
                    stderr=(workdir / f"fleet-{k}.log").open("wb"),
                )
            )

    def grant(self, messages: int) -> None:
        if self.credit is not None:
            tmp = self.credit.with_suffix(".tmp")
            tmp.write_text(str(messages))
            tmp.replace(self.credit)

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.status:
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                for k, v in json.loads(s.read_text()).items():
                    if k == "late_us_max":
                        out[k] = max(out.get(k, 0), int(v))
                    elif k != "t":
                        out[k] = out.get(k, 0) + int(v)
        return out

    def check(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"publisher {p.pid} exited with {p.returncode}")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# -- following the lake and the anchor log ---------------------------------------------------


class Uniques:
    """8-byte prefixes of every sealed leaf, in 16 bucket files: duplicates counted at the
    end with bounded memory (one bucket at a time)."""

    def __init__(self, folder: Path) -> None:
        import numpy as np

        self.np = np
        folder.mkdir(parents=True, exist_ok=True)
        self.files = [(folder / f"b{i:x}.u64").open("ab") for i in range(16)]
        self.leaves = 0

    def add(self, leaves_file: Path) -> None:
        np = self.np
        data = np.frombuffer(leaves_file.read_bytes(), dtype=np.uint8).reshape(-1, 32)
        self.leaves += len(data)
        prefix = data[:, :8].copy().view(">u8").ravel()
        bucket = data[:, 0] >> 4
        for b in range(16):
            prefix[bucket == b].tofile(self.files[b])

    def duplicates(self) -> int:
        np = self.np
        dup = 0
        for f in self.files:
            f.close()
            arr = np.fromfile(f.name, dtype=">u8")
            dup += len(arr) - len(np.unique(arr))
        return dup


@dataclass
class Lake:
    """Manifests and anchors as they appear."""

    settings: Settings
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen_at: dict[str, float] = field(default_factory=dict)  # batch id -> wall s first seen
    anchored_at: dict[int, float] = field(default_factory=dict)  # tree size -> wall s
    heads: list[int] = field(default_factory=list)
    log_index: dict[str, int] = field(default_factory=dict)
    rows: int = 0

    def poll(self, uniques: Uniques) -> None:
        batches = self.settings.lake_dir / "_batches"
        everything = dict(self.manifests)
        sb.read_manifests(batches, everything)
        new = {k: v for k, v in everything.items() if k not in self.manifests}
        now = time.time()
        for name, m in sorted(new.items(), key=lambda kv: int(kv[1]["sealed_at_us"])):
            self.manifests[name] = m
            self.seen_at[m["batch_id"]] = now
            self.rows += int(m["rows"])
            uniques.add(self.settings.lake_dir / m["leaves_path"])
        self._poll_anchors(now)

    def _poll_anchors(self, now: float) -> None:
        log_dir = self.settings.anchor_dir / "log"
        with contextlib.suppress(FileNotFoundError):
            for line in (log_dir / "anchors.jsonl").read_bytes().splitlines():
                with contextlib.suppress(ValueError, KeyError):
                    size = int(json.loads(line)["tree_size"])
                    if size not in self.anchored_at:
                        self.anchored_at[size] = now
                        self.heads.append(size)
        if len(self.log_index) < len(self.manifests):
            with contextlib.suppress(FileNotFoundError):
                lines = (log_dir / "entries.jsonl").read_bytes().splitlines()
                for i, line in enumerate(lines):
                    with contextlib.suppress(ValueError, KeyError):
                        self.log_index.setdefault(json.loads(line)["batch_id"], i)

    def anchored(self) -> int:
        """Batches covered by an anchored head."""
        top = max(self.heads, default=0)
        return sum(
            1 for m in self.manifests.values() if self.log_index.get(m["batch_id"], top) < top
        )

    def anchor_time(self, batch_id: str) -> float | None:
        i = self.log_index.get(batch_id)
        if i is None:
            return None
        times = [t for size, t in self.anchored_at.items() if size > i]
        return min(times) if times else None


# -- RSS of every process ----------------------------------------------------------------------


class Memory:
    """VmRSS (max of the per-second samples), VmHWM and CPU seconds of each process."""

    def __init__(self) -> None:
        self.max_rss: dict[str, float] = {}
        self.hwm: dict[str, float] = {}
        self.cpu_s: dict[str, float] = {}

    def _one(self, name: str, pid: int) -> None:
        rss, hwm = sb.proc_memory_mb(pid)
        if rss:
            self.max_rss[name] = max(self.max_rss.get(name, 0.0), rss)
            self.hwm[name] = max(self.hwm.get(name, 0.0), hwm)
            self.cpu_s[name] = max(self.cpu_s.get(name, 0.0), sb.proc_cpu_s(pid))

    def sample(self, procs: dict[str, int], with_children: set[str]) -> None:
        for name, pid in procs.items():
            self._one(name, pid)
            if name in with_children:  # the worker's seal process
                for j, child in enumerate(sb.children(pid)):
                    self._one(f"{name} child {j}", child)


# -- Kafka's own perf tools --------------------------------------------------------------------


def tools_classpath(settings: Settings) -> str:
    """The broker's jars plus kafka-tools (ProducerPerformance, ConsumerPerformance), which
    the stack's pom does not need; fetched once by Maven next to them."""
    from vitalproof.devstack import kafka

    libs = kafka.libs_dir(settings)
    tools = libs.parent / "tools"
    if not any(tools.glob("kafka-tools-*.jar")):
        subprocess.run(
            [
                "mvn",
                "-q",
                "-B",
                "dependency:copy",
                f"-Dartifact=org.apache.kafka:kafka-tools:{kafka.KAFKA_VERSION}",
                f"-DoutputDirectory={tools}",
            ],
            check=True,
            cwd=libs.parent,
        )
    return f"{tools}/*:{libs}/*"


def kafka_perf(settings: Settings, records: int, size: int) -> dict[str, float]:
    """ProducerPerformance then ConsumerPerformance of ``records`` x ``size`` B on a topic
    of their own with the collectors' producer settings; records/s and MB/s of each."""
    from vitalproof.devstack import ensure_topics

    cp = tools_classpath(settings)
    topic = f"{settings.kafka.topic_prefix}perf"
    ensure_topics(settings, [topic], settings.kafka.partitions)
    prod = subprocess.run(
        [
            "java",
            "-Xmx512m",
            "-cp",
            cp,
            "org.apache.kafka.tools.ProducerPerformance",
            "--topic",
            topic,
            "--num-records",
            str(records),
            "--record-size",
            str(size),
            "--throughput",
            "-1",
            "--producer-props",
            f"bootstrap.servers={settings.kafka.bootstrap}",
            "acks=all",
            "enable.idempotence=true",
            "linger.ms=5",
            "batch.size=1048576",
            f"compression.type={settings.kafka.compression_type or 'none'}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    last = [ln for ln in prod.stdout.splitlines() if "records sent" in ln][-1]
    m = re.search(r"records sent, ([\d.]+) records/sec \(([\d.]+) MB/sec\)", last)
    assert m, last
    cons = subprocess.run(
        [
            "java",
            "-Xmx512m",
            "-cp",
            cp,
            "org.apache.kafka.tools.ConsumerPerformance",
            "--bootstrap-server",
            settings.kafka.bootstrap,
            "--topic",
            topic,
            "--messages",
            str(records),
            "--timeout",
            "120000",
            "--hide-header",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    # start.time, end.time, MB, MB.sec, nMsg, nMsg.sec, rebalance ms, fetch ms, fetch MB.sec,
    # fetch nMsg.sec
    fields = [f.strip() for f in cons.stdout.strip().splitlines()[-1].split(",")]
    return {
        "producer_records_per_s": float(m.group(1)),
        "producer_mb_per_s": float(m.group(2)),
        "consumer_records": float(fields[4]),
        "consumer_records_per_s": float(fields[9]),  # fetch time only (not the group join)
        "consumer_records_per_s_incl_join": float(fields[5]),
        "consumer_mb_per_s": float(fields[8]),
    }


# -- the run ------------------------------------------------------------------------------------


def wait_connected(log: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"collector exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        if log.exists() and "collector connected" in log.read_text(errors="replace"):
            time.sleep(2.0)  # the SUBSCRIBE went out with the connect: give it its SUBACK
            return
        time.sleep(0.2)
    raise SystemExit(f"collector did not connect within {timeout:g} s")


def percentile(points: list[tuple[float, float]], q: float) -> float:
    """Weighted percentile of (value, weight) points."""
    if not points:
        return float("nan")
    pts = sorted(points)
    total = sum(w for _, w in pts)
    acc = 0.0
    for v, w in pts:
        acc += w
        if acc >= q * total:
            return v
    return pts[-1][0]


def spread(m: dict[str, Any], end: float, k: int = 16) -> list[tuple[float, float]]:
    """The batch's rows as ``k`` points over its device-time span: (end - device time, rows/k)."""
    lo, hi = int(m["first_device_time_us"]) / US, int(m["last_device_time_us"]) / US
    w = int(m["rows"]) / k
    return [(end - (lo + (hi - lo) * (i + 0.5) / k), w) for i in range(k)]


def stack_pids(settings: Settings) -> dict[str, int]:
    from vitalproof.devstack import StackManager

    status = StackManager(settings).status()
    return {n: p.pid for n, p in status.parts.items() if p.pid}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vitalproof.cli import processes
    from vitalproof.cli.demo import _count_records
    from vitalproof.devstack import ensure_topics, set_device_credentials
    from vitalproof.registry import Registry

    home = Path(tempfile.mkdtemp(prefix="e2e-bench-home-"))
    work = home / "bench"
    work.mkdir()
    load0 = os.getloadavg()
    started = time.monotonic()
    try:
        with sb.local_stack(home) as base:
            tag = uuid.uuid4().hex[:6]
            settings = base.evolve(
                kafka={"topic_prefix": f"e2e{tag}."},
                gateway={"id": f"gw-e2e-{tag}"},
                mqtt={"share_group": f"e2e-{tag}"},
                batching={
                    "max_rows": args.batch_rows,
                    "max_messages": max(1000, args.batch_rows // 100),
                    "max_age_s": args.batch_age,
                },
                chain={"kind": "embedded", "anchor_period_s": args.anchor_period},
            )
            ensure_topics(settings, settings.kafka.pipeline_topics, settings.kafka.partitions)
            registry = Registry(settings.paths.registry_path)
            enrolled = time.time_ns() // 1000 - 3600 * US  # before any device time we send
            devices = [
                (
                    f"e2e-{tag}-{i:04d}",
                    registry.enroll(
                        f"e2e-{tag}-{i:04d}", f"pt-{tag}-{i:04d}", enrolled_us=enrolled
                    ).mqtt_password,
                )
                for i in range(args.devices)
            ]
            set_device_credentials(settings, dict(devices))
            t = time.monotonic()
            payloads = cb.make_payloads(devices, args.cycle_s, args.tick_s, args.accel_hz)
            cycles = {d: cycle_messages(payloads, d) for d, _ in devices}
            all_msgs = [m for ms in cycles.values() for m in ms]
            per_msg = statistics.fmean(m.samples for m in all_msgs)
            msg_bytes = statistics.fmean(len(m.payload) for m in all_msgs)
            console.print(
                f"{args.devices} devices, {per_msg:.1f} samples / {msg_bytes:.0f} B per message,"
                f" natural rate {args.devices * per_msg / args.tick_s:,.0f} samples/s "
                f"(payloads in {time.monotonic() - t:.1f} s)"
            )

            # 1. The pipeline
            logs = home / "logs"
            collector = processes.start(
                settings, "-v", "collect", "--gateway-id", settings.gateway.id,
                log=logs / "collector.log",
            )  # fmt: skip
            worker = processes.start(settings, "worker", log=logs / "worker.log")
            anchor = processes.start(
                settings, "anchor", "run", "--period", str(args.anchor_period),
                log=logs / "anchor.log",
            )  # fmt: skip
            children = {"collector": collector, "worker": worker, "anchor": anchor}
            lake = Lake(settings)
            uniques = Uniques(work / "leaves")
            memory = Memory()
            trace: list[tuple[float, int, int]] = []  # t, sealed rows, acked samples
            fleet: Fleet | None = None
            try:
                wait_connected(logs / "collector.log", collector)
                credit = work / "credit" if args.backlog_rows else None
                fleet = Fleet(
                    settings,
                    devices,
                    cycles,
                    args.publishers,
                    work,
                    tick_us=round(args.tick_s * US),
                    cycle_us=args.cycle_s * US,
                    window=args.inflight,
                    credit=credit,
                    initial_credit=int(args.backlog_rows / per_msg),
                )
                pids = stack_pids(settings) | {n: p.pid for n, p in children.items()}
                pids |= {f"publisher {i}": p.pid for i, p in enumerate(fleet.procs)}
                pids["bench"] = os.getpid()
                t0 = time.time()
                publishing_until = t0 + args.seconds
                stopped_at = None
                stall_deadline = None
                last_rows = -1
                while True:
                    time.sleep(1.0)
                    now = time.time()
                    lake.poll(uniques)
                    fleet.grant(int((lake.rows + args.backlog_rows) / per_msg))
                    totals = fleet.totals()
                    memory.sample(pids, {"worker", "anchor", "collector"})
                    trace.append((now - t0, lake.rows, totals.get("acked_samples", 0)))
                    for name, p in children.items():
                        if p.poll() is not None:
                            raise SystemExit(f"{name} exited ({p.returncode}); see {logs}")
                    if int(now - t0) % 10 == 0:
                        console.print(
                            f"  {now - t0:5.0f} s  acked {totals.get('acked_samples', 0):>11,}"
                            f"  sealed {lake.rows:>11,}  batches {len(lake.manifests)}"
                            f"  anchored {lake.anchored()}  load {os.getloadavg()[0]:.1f}"
                        )
                    if stopped_at is None:
                        fleet.check()
                        if now >= publishing_until:
                            fleet.stop()
                            stopped_at = now - t0
                            stall_deadline = now + 90
                        continue
                    totals = fleet.totals()
                    done = lake.rows >= totals.get("acked_samples", 0)
                    if done and lake.anchored() == len(lake.manifests):
                        break
                    if lake.rows != last_rows:
                        last_rows, stall_deadline = lake.rows, now + 90
                    assert stall_deadline is not None
                    if now > stall_deadline:
                        console.print("[red]no progress for 90 s after the fleet stopped[/red]")
                        break
            finally:
                if fleet is not None:
                    fleet.stop()
                for p in (collector, worker, anchor):
                    processes.stop(p)
            end_t = time.time() - t0
            totals = fleet.totals()
            duplicates = uniques.duplicates()
            dlq = asyncio.run(_count_records(settings, settings.kafka.topic_dlq))
            # The collector's persistent session would queue the ceiling phase's messages:
            # end it (it is drained: everything published was sealed).
            leave = processes.start(
                settings, "collect", "--gateway-id", settings.gateway.id, "--leave",
                log=logs / "collector-leave.log",
            )  # fmt: skip
            try:
                leave.wait(120)
            finally:
                processes.stop(leave)

            # 2. MQTT ceiling: the same payloads, the same publishers, mosquitto_sub reading
            def pubs() -> cb.Publishers:
                return cb.Publishers(
                    settings, devices, payloads, args.publishers, 20, work, 0, 5000
                )

            with console.status("MQTT ceiling: raw publishers -> mosquitto_sub"):
                sub_rate, _ = cb.measure_mosquitto_sub(settings, pubs, 3.0, args.ceiling_window)
            console.print(f"mosquitto_sub: {sub_rate:,.0f} msg/s")

            # 3. Kafka's ceiling for the run's record size, and its record count (at least
            # --perf-records: a few thousand records measure the JVM's start, not Kafka)
            records = max(totals.get("acked", 0), args.perf_records)
            with console.status("Kafka ceiling: ProducerPerformance, ConsumerPerformance"):
                perf = kafka_perf(settings, records, round(msg_bytes))
            perf["records"] = records
            load1 = os.getloadavg()
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
        else:
            console.print(f"kept {home}")
    return summarize(
        args, lake, memory, trace, totals, duplicates, dlq, perf, sub_rate, per_msg, msg_bytes,
        stopped_at or end_t, end_t, load0, load1, time.monotonic() - started, t0,
    )  # fmt: skip


def summarize(
    args: argparse.Namespace,
    lake: Lake,
    memory: Memory,
    trace: list[tuple[float, int, int]],
    totals: dict[str, int],
    duplicates: int,
    dlq: int,
    perf: dict[str, float],
    sub_rate: float,
    per_msg: float,
    msg_bytes: float,
    stopped_at: float,
    end_t: float,
    load0: tuple[float, ...],
    load1: tuple[float, ...],
    wall: float,
    fleet_t0: float,
) -> dict[str, Any]:
    from rich.table import Table

    acked = totals.get("acked_samples", 0)
    sealed = lake.rows
    # steady: the sealed-rows slope from 20 % of the publishing time to its end
    a = next((p for p in trace if p[0] >= 0.2 * stopped_at), trace[0])
    b = next((p for p in trace if p[0] >= stopped_at), trace[-1])
    steady = (b[1] - a[1]) / max(b[0] - a[0], 1e-9)
    ms = sorted(lake.manifests.values(), key=lambda m: int(m["sealed_at_us"]))
    sealed_pts: list[tuple[float, float]] = []
    anchored_pts: list[tuple[float, float]] = []
    per_batch: list[tuple[float, float, float | None]] = []  # sealed at, p50 seal, p50 anchor
    tick = args.tick_s
    for m in ms:
        s_at = int(m["sealed_at_us"]) / US
        pts = spread(m, s_at)
        sealed_pts += pts
        an = lake.anchor_time(m["batch_id"])
        apts = spread(m, an) if an is not None else []
        anchored_pts += apts
        per_batch.append((s_at, percentile(pts, 0.5), percentile(apts, 0.5) if apts else None))
    ceiling_msgs = min(sub_rate, perf["producer_records_per_s"], perf["consumer_records_per_s"])
    ceiling = ceiling_msgs * per_msg
    ratio = steady / ceiling if ceiling else 0.0
    rss_max = max(memory.max_rss.values(), default=0.0)
    figures = {
        "seconds_publishing": round(stopped_at, 1),
        "devices": args.devices,
        "samples_per_message": round(per_msg, 1),
        "bytes_per_message": round(msg_bytes),
        "published_acked_messages": totals.get("acked", 0),
        "published_acked_samples": acked,
        "unacked_at_stop": totals.get("unacked", 0),
        "sealed_rows": sealed,
        "lost": max(acked - sealed, 0),
        "duplicates": duplicates,
        "extra_rows": max(sealed - acked, 0),
        "dlq_records": dlq,
        "batches": len(ms),
        "batches_anchored": lake.anchored(),
        "anchors": len(lake.heads),
        "e2e_samples_per_s_steady": round(steady),
        "e2e_samples_per_s_overall": round(acked / max(end_t, 1e-9)),
        "mqtt_ceiling_msgs_per_s": round(sub_rate),
        "kafka": {k: round(v, 1) for k, v in perf.items()},
        "ceiling_samples_per_s": round(ceiling),
        "ratio": round(ratio, 4),
        "latency_publish_sealed_s": {
            "p50": round(percentile(sealed_pts, 0.5), 2),
            "p99": round(percentile(sealed_pts, 0.99), 2),
        },
        "latency_publish_anchored_s": {
            "p50": round(percentile(anchored_pts, 0.5), 2),
            "p99": round(percentile(anchored_pts, 0.99), 2),
        },
        "publisher_late_max_s": round(totals.get("late_us_max", 0) / US, 2),
        "rss_max_mb": {k: round(v) for k, v in sorted(memory.max_rss.items())},
        "vm_hwm_mb": {k: round(v) for k, v in sorted(memory.hwm.items())},
        "cpu_s": {k: round(v, 1) for k, v in sorted(memory.cpu_s.items())},
        "load_average_start_end": [round(load0[0], 1), round(load1[0], 1)],
        "wall_s": round(wall, 1),
    }
    table = Table(title=f"end to end, {stopped_at:.0f} s of fleet, {args.devices} devices")
    for col in ("measure", "result", "target"):
        table.add_column(col, justify="right" if col != "measure" else "left")
    table.add_row(
        "published (acked) / sealed samples",
        f"{acked:,} / {sealed:,}",
        "equal",
    )
    table.add_row(
        "lost / sealed twice / DLQ", f"{figures['lost']:,} / {duplicates:,} / {dlq:,}", "0 / 0 / 0"
    )
    table.add_row(
        "batches / anchored / anchors", f"{len(ms)} / {lake.anchored()} / {len(lake.heads)}", ""
    )
    table.add_row("e2e samples/s (steady)", f"{steady:,.0f}", ">= 200,000")
    table.add_row(
        "e2e samples/s (all published / run time)", f"{acked / max(end_t, 1e-9):,.0f}", ""
    )
    table.add_row(
        "ceiling: mosquitto_sub / Kafka produce / consume (msg/s)",
        f"{sub_rate:,.0f} / {perf['producer_records_per_s']:,.0f} / "
        f"{perf['consumer_records_per_s']:,.0f}",
        "",
    )
    table.add_row("ceiling (samples/s, lowest)", f"{ceiling:,.0f}", "")
    table.add_row("e2e / ceiling", f"{ratio:.4f}", ">= 0.5")
    table.add_row(
        "publish -> sealed p50 / p99 (s, per batch)",
        f"{figures['latency_publish_sealed_s']['p50']} / "
        f"{figures['latency_publish_sealed_s']['p99']}",
        "",
    )
    table.add_row(
        "publish -> anchored p50 / p99 (s, per batch)",
        f"{figures['latency_publish_anchored_s']['p50']} / "
        f"{figures['latency_publish_anchored_s']['p99']}",
        "",
    )
    for name, v in sorted(memory.max_rss.items()):
        table.add_row(
            f"{name}: RSS max (VmHWM), CPU s",
            f"{v:,.0f} MB ({memory.hwm[name]:,.0f}), {memory.cpu_s[name]:,.0f}",
            "<= 512 MB",
        )
    table.add_row("max RSS of any process", f"{rss_max:,.0f} MB", "<= 512 MB")
    table.add_row("load average start -> end", f"{load0[0]:.1f} -> {load1[0]:.1f}", "")
    sb.console.print(table)
    if args.plot:
        plot(trace, per_batch, Path(args.plot), tick, fleet_t0)
    return figures


def plot(
    trace: list[tuple[float, int, int]],
    per_batch: list[tuple[float, float, float | None]],
    path: Path,
    tick: float,
    fleet_t0: float,
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("matplotlib not installed: no plot")
        return
    ts = [p[0] for p in trace]

    def rate(col: int) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for i, t in enumerate(ts):
            j = next(k for k, u in enumerate(ts) if u >= t - 10.0)
            if t - ts[j] >= 5.0:
                xs.append(t)
                ys.append((trace[i][col] - trace[j][col]) / (t - ts[j]) / 1000)
        return xs, ys

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    top.plot(*rate(2), color="tab:gray", label="published (acked), last 10 s")
    top.plot(*rate(1), color="tab:blue", label="sealed, last 10 s")
    top.axhline(200, color="gray", linestyle="--", label="target 200,000/s")
    top.set_ylabel("thousand samples/s")
    top.set_ylim(bottom=0)
    top.legend(loc="lower right", fontsize=8)
    if per_batch:
        base = fleet_t0
        bx = [b[0] - base for b in per_batch]
        bottom.plot(bx, [b[1] for b in per_batch], ".", ms=3, label="publish -> sealed (batch p50)")
        ax = [(b[0] - base, b[2]) for b in per_batch if b[2] is not None]
        bottom.plot(
            [a[0] for a in ax], [a[1] for a in ax], ".", ms=3, label="publish -> anchored (p50)"
        )
    bottom.set_ylabel(f"seconds (+0..{tick:g} s)")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("seconds since the fleet started")
    bottom.legend(loc="upper left", fontsize=8)
    fig.suptitle("fleet -> MQTT -> collector -> Kafka -> worker -> lake -> anchor")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    console.print(f"plot: {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--publisher", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=600.0, help="seconds the fleet publishes")
    ap.add_argument("--devices", type=int, default=400, help="devices, one patient each")
    ap.add_argument("--accel-hz", type=int, default=200, help="accelerometer rate per device")
    ap.add_argument("--tick-s", type=float, default=1.0, help="device time per message")
    ap.add_argument("--cycle-s", type=int, default=10, help="pre-encoded device seconds")
    ap.add_argument("--publishers", type=int, default=2, help="publisher processes")
    ap.add_argument("--inflight", type=int, default=10, help="PUBACK window per device")
    ap.add_argument(
        "--backlog-rows",
        type=int,
        default=600_000,
        help="closed loop: publish at most this many samples ahead of the sealed ones (0: "
        "natural rate only)",
    )
    ap.add_argument("--batch-rows", type=int, default=200_000, help="worker batch_max_rows")
    ap.add_argument("--batch-age", type=float, default=5.0, help="worker batch_max_age_s")
    ap.add_argument("--anchor-period", type=float, default=10.0, help="seconds between anchors")
    ap.add_argument("--ceiling-window", type=float, default=10.0, help="mosquitto_sub window")
    ap.add_argument(
        "--perf-records", type=int, default=100_000, help="Kafka perf tools: at least this many"
    )
    ap.add_argument("--plot", default="", help="write a PNG here (needs matplotlib)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the tmp home")
    args = ap.parse_args()
    if args.publisher:
        publisher_main(args.publisher)
        return 0
    figures = run(args)
    if args.json:
        print(json.dumps(figures))
    ok = figures["lost"] == 0 and figures["duplicates"] == 0 and figures["extra_rows"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
