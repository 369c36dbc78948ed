"""MQTT collector throughput with the batched binary encoding, and Mosquitto's own ceiling.

What it does (bounded, about two minutes):

1. Starts a throwaway local stack (Kafka + Mosquitto, tmp home, free ports) with
   :class:`StackManager`, or reuses a running one when ``VITALPROOF_BENCH_REUSE=1`` (then the
   usual ``VITALPROOF_*`` variables name it).
2. Enrolls ``--devices`` devices and pre-generates their payloads with the simulator
   (:class:`device_sims.physiology.SimDevice`, 50 Hz triaxial accelerometer, one message per
   ``--tick-s`` of device time), encoded with :mod:`vitalproof.wire.binary`.
3. Phase "mosquitto_sub": ``--publishers`` publisher processes publish while
   ``mosquitto_sub -q 1 -t 'devices/#'`` (the collector account; it prints 2 bytes per
   message to a pipe that is only counted) reads the same stream: the broker's ceiling on
   this machine with this publisher.
4. Phase "collector": the same publishers, and ONE :class:`ingest.mqtt.collector.MqttCollector`
   (this process) forwarding to Kafka ``vitals.raw``; its acked count (PUBACK only after
   Kafka acked) over a fixed window gives messages/s; samples/s = messages/s x the mean
   samples per message, which is checked by decoding records read back from ``vitals.raw``.

The offered load is a closed loop by default: the publishers stay at most ``--backlog``
messages ahead of what the phase's subscriber consumed, so each phase measures its
subscriber's ceiling. Open loop (``--backlog 0 --rate R``) offers R messages/s whatever
happens; above a subscriber's ceiling, mosquitto then accepts messages it has to queue (and
past its per-session queue bound, drop), and spends its one core doing so.

Why a raw-socket publisher instead of :class:`device_sims.fleet.Fleet`: the fleet simulates
physiology and computes reading ids per sample, a few thousand messages/s per core, which
cannot offer 20,000 messages/s on two cores that also run the broker, Kafka and the
collector. The publisher here speaks MQTT v5 itself (CONNECT with each device's own
credential, QoS 1 PUBLISH with the content type property, PUBACK window = the broker's
Receive Maximum) and sends payloads built beforehand, cycling through them: repeated reading
ids do not matter to a collector, which never parses payloads.

Run: ``.venv/bin/python bench/collector_bench.py [--devices 100] [--window 15] [--json]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pickle
import secrets
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydantic import SecretStr  # noqa: E402

from device_sims.physiology import SimDevice  # noqa: E402
from vitalproof.settings import (  # noqa: E402
    DevStackSettings,
    KafkaSettings,
    MqttSettings,
    PathSettings,
    Settings,
)
from vitalproof.wire import binary  # noqa: E402

T0 = 1_732_200_000_000_000
# How often the measuring process rewrites the publishers' credit (closed loop): a file
# rename in the collector's own process, so not too often; 5,000 messages of backlog last
# about 80 ms at 60,000 msg/s.
GRANT_EVERY_S = 0.02


# -- a minimal MQTT v5 QoS 1 publisher (runs in its own process) ------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_str(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _connect_packet(client_id: str, user: str, password: str) -> bytes:
    variable = _mqtt_str("MQTT") + bytes([5, 0x02 | 0x80 | 0x40]) + (60).to_bytes(2, "big")
    variable += b"\x00"  # no properties
    body = variable + _mqtt_str(client_id) + _mqtt_str(user) + _mqtt_str(password)
    return b"\x10" + _varint(len(body)) + body


def _publish_template(topic: str, payload: bytes, content_type: str) -> tuple[bytes, bytes]:
    """(bytes before the packet id, bytes after it) of a QoS 1 PUBLISH."""
    props = b"\x03" + _mqtt_str(content_type)
    after = _varint(len(props)) + props + payload
    head = _mqtt_str(topic)
    remaining = len(head) + 2 + len(after)
    return b"\x32" + _varint(remaining) + head, after


class _Conn:
    __slots__ = ("buf", "inflight", "next_id", "sock", "templates", "turn", "window")

    def __init__(self, sock: socket.socket, templates: list[tuple[bytes, bytes]], window: int):
        self.sock, self.templates, self.window = sock, templates, window
        self.inflight = 0
        self.next_id = 1
        self.turn = 0
        self.buf = b""


def _read_connack(sock: socket.socket) -> int:
    """Receive Maximum from the CONNACK (65535 when absent); raises if refused."""
    data = b""
    while len(data) < 2 or len(data) < 2 + data[1]:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("broker closed the connection before CONNACK")
        data += chunk
    if data[0] != 0x20 or data[3] != 0:
        raise ConnectionError(f"CONNACK refused: {data[:4].hex()}")
    props, i, end = data[4:], 0, 0
    # properties: varint length, then id/value pairs; only Receive Maximum (0x21) matters.
    length, shift = 0, 0
    while True:
        b = props[i]
        i += 1
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    end = i + length
    while i < end:
        pid = props[i]
        i += 1
        if pid == 0x21:
            return int.from_bytes(props[i : i + 2], "big")
        if pid in (0x24, 0x25, 0x28, 0x29, 0x2A):  # byte
            i += 1
        elif pid in (0x13, 0x22):  # two-byte integer
            i += 2
        elif pid in (0x11, 0x27):  # four-byte integer
            i += 4
        elif pid == 0x26:  # user property: two strings
            for _ in range(2):
                i += 2 + int.from_bytes(props[i : i + 2], "big")
        else:  # strings and binary data
            i += 2 + int.from_bytes(props[i : i + 2], "big")
    return 65535


def publisher_main(config_path: str) -> None:
    """Flood the broker with QoS 1 publishes until SIGTERM; print acked counts as JSON."""
    cfg = pickle.loads(Path(config_path).read_bytes())
    host, port = cfg["host"], cfg["port"]
    sel = selectors.DefaultSelector()
    conns: list[_Conn] = []
    for device_id, password, payloads in cfg["devices"]:
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(_connect_packet(f"{device_id}-bench", device_id, password))
        window = min(_read_connack(sock), cfg["window"])
        topic = f"devices/{device_id}/vitals"
        templates = [_publish_template(topic, p, cfg["content_type"]) for p in payloads]
        conn = _Conn(sock, templates, window)
        conns.append(conn)
        sel.register(sock, selectors.EVENT_READ, conn)
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    acked = 0
    status = Path(cfg["status"])
    last_status = time.monotonic()

    # Offered load: at most cfg["rate"] messages/s from this process (0: no cap), and, when
    # cfg["credit"] names a file, no more than this process's share of the total the
    # measuring process allows there (what its subscriber consumed plus a bounded backlog).
    # Unpaced, the publishers offer several times what the broker can forward, and mosquitto
    # spends its one core accepting messages it then drops for the subscriber (its queue per
    # session is bounded): that measures an overloaded broker, not the subscriber.
    rate = float(cfg["rate"])
    credit = Path(cfg["credit"]) if cfg["credit"] else None
    allowed = 1 << 62
    next_credit = 0.0
    sent = 0
    t0 = time.monotonic()

    def fill(c: _Conn, limit: int) -> int:
        free = min(c.window - c.inflight, limit)
        if free <= 0:
            return 0
        parts = []
        n_t = len(c.templates)
        for _ in range(free):
            before, after = c.templates[c.turn]
            c.turn = (c.turn + 1) % n_t
            parts.append(before + c.next_id.to_bytes(2, "big") + after)
            c.next_id = c.next_id % 65535 + 1
        c.sock.sendall(b"".join(parts))  # blocking: a packet is never half written
        c.inflight += free
        return free

    first = 0
    while not stop:
        now = time.monotonic()
        if credit is not None and now >= next_credit:
            with contextlib.suppress(FileNotFoundError, ValueError):
                allowed = int(int(credit.read_text()) * cfg["share"])
            next_credit = now + 0.01
        budget = min(int(rate * (now - t0)) if rate else 1 << 62, allowed) - sent
        # Round robin from a moving start, so no connection is always served last.
        for k in range(len(conns)):
            if budget <= 0:
                break
            n = fill(conns[(first + k) % len(conns)], budget)
            sent += n
            budget -= n
        first = (first + 1) % len(conns)
        for key, _ in sel.select(0.002 if rate or credit else 0.5):
            c = key.data
            data = c.sock.recv(65536)  # readable: does not block
            if not data:
                raise ConnectionError("broker closed a publisher connection")
            n_acks, c.buf = pubacks(c.buf + data)
            c.inflight -= n_acks
            acked += n_acks
        now = time.monotonic()
        if now - last_status >= 0.25:
            status.write_text(json.dumps({"acked": acked, "t": now}))
            last_status = now
    status.write_text(json.dumps({"acked": acked, "t": time.monotonic()}))


def pubacks(buf: bytes) -> tuple[int, bytes]:
    """How many whole PUBACK packets ``buf`` holds, and the bytes after its last whole packet
    (a packet split across reads stays for the next call). The broker sends publishers
    nothing else that counts; other packets are stepped over by their remaining length."""
    acks = 0
    i, n = 0, len(buf)
    while i + 2 <= n:
        rl, j, shift = 0, i + 1, 0
        while j < n:
            b = buf[j]
            j += 1
            rl |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        else:
            break
        if j + rl > n:
            break
        if buf[i] & 0xF0 == 0x40:  # PUBACK: the broker acks QoS 1 in order
            acks += 1
        i = j + rl
    return acks, buf[i:]


# -- the benchmark --------------------------------------------------------------------------


def make_payloads(
    devices: list[tuple[str, str]], seconds: int, tick_s: float, accel_hz: int = 50
) -> dict[str, list]:
    """Per device: binary payloads of ``seconds`` of device time, one per ``tick_s``."""
    out: dict[str, list] = {}
    step = round(tick_s * 1e6)
    for device_id, _ in devices:
        sim = SimDevice(device_id, 1, "adult", T0, accel_hz=accel_hz)
        msgs = []
        for k in range(1, round(seconds / tick_s) + 1):
            batch = sim.tick(T0 + k * step - 1)
            if batch is not None:
                msgs.append((binary.encode(batch, with_device=False), len(batch)))
        out[device_id] = msgs
    return out


class Publishers:
    """``n`` publisher processes, devices split among them; acked totals via status files."""

    def __init__(
        self,
        settings: Settings,
        devices: list[tuple[str, str]],
        payloads: dict,
        n: int,
        window: int,
        workdir: Path,
        rate: float,
        backlog: int,
    ) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.status: list[Path] = []
        run = uuid.uuid4().hex[:6]
        self.backlog = backlog
        self.credit = workdir / f"credit{run}" if backlog else None
        self.grant(0)
        for k in range(n):
            mine = devices[k::n]
            status = workdir / f"pub{run}-{k}.json"
            cfg = {
                "host": settings.mqtt.host,
                "port": settings.mqtt.port,
                "window": window,
                "rate": rate / n,
                "credit": str(self.credit) if self.credit else None,
                "share": 1 / n,
                "content_type": binary.CONTENT_TYPE_BINARY,
                "status": str(status),
                "devices": [(d, pw, [p for p, _ in payloads[d]]) for d, pw in mine],
            }
            path = workdir / f"pub{k}.pickle"
            path.write_bytes(pickle.dumps(cfg))
            self.status.append(status)
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--publisher", str(path)],
                    stderr=(workdir / f"pub{k}.log").open("wb"),
                )
            )

    def grant(self, consumed: int) -> None:
        """Allow the publishers ``consumed`` + backlog messages in all (closed loop)."""
        if self.credit is not None:
            tmp = self.credit.with_suffix(".tmp")
            tmp.write_text(str(consumed + self.backlog))
            tmp.replace(self.credit)

    def acked(self) -> int:
        total = 0
        for s in self.status:
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                total += json.loads(s.read_text())["acked"]
        return total

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
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def measure_mosquitto_sub(
    settings: Settings, pubs_factory: Callable[[], Publishers], warmup: float, window: float
) -> tuple[float, float]:
    """(messages/s mosquitto_sub read, messages/s the publishers got acked) over the window."""
    from vitalproof.devstack import collector_credentials

    user, password = collector_credentials(settings)
    exe = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
    sub = subprocess.Popen(
        [
            exe,
            "-V",
            "5",
            "-q",
            "1",
            "-t",
            "devices/#",
            "-u",
            user,
            "-P",
            password,
            "-h",
            settings.mqtt.host,
            "-p",
            str(settings.mqtt.port),
            "-F",
            "x",
        ],
        stdout=subprocess.PIPE,
    )
    count = 0
    lock = threading.Lock()
    done = threading.Event()

    def reader() -> None:
        nonlocal count
        assert sub.stdout is not None
        while chunk := os.read(sub.stdout.fileno(), 1 << 16):
            with lock:
                count += chunk.count(b"\n")

    def granter() -> None:
        while not done.wait(GRANT_EVERY_S):
            pubs.grant(count)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    time.sleep(1.0)  # subscribed
    pubs = pubs_factory()
    threading.Thread(target=granter, daemon=True).start()
    try:
        time.sleep(warmup)
        pubs.check()
        with lock:
            c0 = count
        a0, t0 = pubs.acked(), time.monotonic()
        time.sleep(window)
        with lock:
            c1 = count
        a1, t1 = pubs.acked(), time.monotonic()
        pubs.check()
    finally:
        done.set()
        pubs.stop()
        sub.terminate()
        sub.wait(10)
        thread.join(5)
    return (c1 - c0) / (t1 - t0), (a1 - a0) / (t1 - t0)


async def measure_collector(
    settings: Settings,
    pubs_factory: Callable[[], Publishers],
    warmup: float,
    window: float,
    profile: Path | None = None,
) -> tuple[float, float, dict[str, float]]:
    """(collector acked messages/s, publisher acked messages/s, collector stats)."""
    from ingest.mqtt.collector import MqttCollector, MqttCredentials
    from vitalproof.devstack import collector_credentials

    user, password = collector_credentials(settings)
    collector = MqttCollector(settings, MqttCredentials(user, password))
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop=stop))
    await asyncio.wait_for(collector.subscribed.wait(), 30)
    pubs = pubs_factory()

    async def grant() -> None:
        while True:
            pubs.grant(collector.stats.acked)
            await asyncio.sleep(GRANT_EVERY_S)

    granting = asyncio.create_task(grant())
    try:
        await asyncio.sleep(warmup)
        pubs.check()
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:  # the collector runs on this thread: all of it is seen
            profiler.enable()
        c0, a0, t0 = collector.stats.acked, pubs.acked(), time.monotonic()
        cpu0 = time.process_time()
        await asyncio.sleep(window)
        c1, a1, t1 = collector.stats.acked, pubs.acked(), time.monotonic()
        cpu1 = time.process_time()
        if profiler is not None and profile is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        pubs.check()
    finally:
        granting.cancel()
        pubs.stop()
        stop.set()
        await asyncio.wait_for(task, 60)
    stats = {
        "received": collector.stats.received,
        "forwarded": collector.stats.forwarded,
        "acked": collector.stats.acked,
        "produce_errors": collector.stats.produce_errors,
        # CPU of this process (the collector, and the bench's credit writes) per message:
        # steadier than messages/s on a machine others share.
        "cpu_us_per_msg": round((cpu1 - cpu0) * 1e6 / max(c1 - c0, 1), 1),
        "cpu_share": round((cpu1 - cpu0) / (t1 - t0), 2),
    }
    return (c1 - c0) / (t1 - t0), (a1 - a0) / (t1 - t0), stats


async def check_raw(settings: Settings, n: int) -> tuple[int, float]:
    """Decode ``n`` records of vitals.raw: (records decoded, mean samples per record)."""
    from aiokafka import AIOKafkaConsumer

    from vitalproof.raw import RawRecord
    from vitalproof.wire.codecs import decode_samples

    consumer = AIOKafkaConsumer(
        settings.kafka.topic_raw,
        bootstrap_servers=settings.kafka.bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await consumer.start()
    sizes: list[int] = []
    try:
        while len(sizes) < n and (got := await consumer.getmany(timeout_ms=3000, max_records=n)):
            for records in got.values():
                for r in records:
                    raw = RawRecord.from_kafka(r.value or b"", r.headers)
                    sizes.append(len(decode_samples(raw.content_type, raw.payload, raw.device_id)))
    finally:
        await consumer.stop()
    return len(sizes), statistics.fmean(sizes) if sizes else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--publisher", help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--publishers", type=int, default=2, help="publisher processes")
    ap.add_argument("--tick-s", type=float, default=0.2, help="device time per message")
    ap.add_argument("--window", type=float, default=15.0, help="measured seconds per phase")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument(
        "--rate",
        type=float,
        default=0,
        help="offered messages/s at most, all publishers together (0: no cap)",
    )
    ap.add_argument(
        "--backlog",
        type=int,
        default=5_000,
        help="closed loop: publish at most this many messages ahead of what the subscriber "
        "consumed, so each phase finds its subscriber's ceiling without overflowing "
        "mosquitto's queue (0: open loop, --rate alone)",
    )
    ap.add_argument("--inflight", type=int, default=20, help="PUBACK window per device")
    ap.add_argument(
        "--broker-inflight",
        type=int,
        default=1000,
        help="max_inflight_messages for the bench's own broker (0: the stack's default, 20)",
    )
    ap.add_argument(
        "--profile",
        type=Path,
        help="cProfile the collector's measured window into this file (slows it down)",
    )
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args()
    if args.publisher:
        publisher_main(args.publisher)
        return 0

    from rich.console import Console
    from rich.table import Table

    from vitalproof.devstack import StackManager, ensure_topics, mosquitto, set_device_credentials
    from vitalproof.devstack.procs import free_ports
    from vitalproof.registry import Registry

    console = Console(stderr=True)
    started = time.monotonic()
    reuse = os.environ.get("VITALPROOF_BENCH_REUSE") == "1"
    tmp = Path(tempfile.mkdtemp(prefix="vp-collector-bench-"))
    manager: StackManager | None = None
    if reuse:
        base = Settings()
    else:
        kafka_port, controller_port, mqtt_port = free_ports(3)
        base = Settings(
            paths=PathSettings(home=tmp / "home"),
            kafka=KafkaSettings(bootstrap=f"127.0.0.1:{kafka_port}", topic_prefix=""),
            devstack=DevStackSettings(kafka_controller_port=controller_port),
            mqtt=MqttSettings(
                host="127.0.0.1",
                port=mqtt_port,
                collector_password=SecretStr(secrets.token_urlsafe(18)),
            ),
        )
        manager = StackManager(base)
    tag = uuid.uuid4().hex[:8]
    settings = base.evolve(
        kafka={"topic_prefix": f"bench{tag}."},
        gateway={"id": f"gw-bench-{tag}"},
        mqtt={"share_group": f"bench-{tag}"},
    )
    try:
        if manager is not None:
            with console.status("starting Kafka + Mosquitto"):
                manager.up(chain="embedded")
            if args.broker_inflight:
                # What vitalproof/stack/mosquitto.py does not set yet (see docs/benchmarks.md):
                # mosquitto sends any client at most max_inflight_messages (default 20)
                # unacked messages, whatever Receive Maximum the client asks for. Applied by
                # the SIGHUP that enrolling the devices sends below.
                with mosquitto.config_path(base).open("a") as f:
                    f.write(f"max_inflight_messages {args.broker_inflight}\n")
        ensure_topics(settings, [settings.kafka.topic_raw], settings.kafka.partitions)
        registry = Registry(settings.paths.registry_path)
        devices = [
            (f"bench-{tag}-{i}", registry.enroll(f"bench-{tag}-{i}", f"pat-{i}").mqtt_password)
            for i in range(args.devices)
        ]
        set_device_credentials(settings, dict(devices))
        with console.status("generating payloads"):
            payloads = make_payloads(devices, 10, args.tick_s)
        all_msgs = [m for msgs in payloads.values() for m in msgs]
        mean_samples = statistics.fmean(n for _, n in all_msgs)
        mean_bytes = statistics.fmean(len(p) for p, _ in all_msgs)

        def pubs_factory() -> Publishers:
            return Publishers(
                settings,
                devices,
                payloads,
                args.publishers,
                args.inflight,
                tmp,
                args.rate,
                args.backlog,
            )

        with console.status("phase 1: mosquitto_sub reading the stream"):
            sub_rate, sub_pub_rate = measure_mosquitto_sub(
                settings, pubs_factory, args.warmup, args.window
            )
        with console.status("phase 2: one collector -> Kafka"):
            col_rate, col_pub_rate, stats = asyncio.run(
                measure_collector(settings, pubs_factory, args.warmup, args.window, args.profile)
            )
            decoded, raw_mean = asyncio.run(check_raw(settings, 2000))
    finally:
        if manager is not None:
            with console.status("stopping the stack"):
                manager.down()
        shutil.rmtree(tmp, ignore_errors=True)

    figures = {
        "devices": args.devices,
        "publishers": args.publishers,
        "offered_msgs_per_s_cap": args.rate or None,
        "backlog": args.backlog or None,
        "payload_bytes_mean": round(mean_bytes, 1),
        "samples_per_message": round(mean_samples, 2),
        "mosquitto_sub_msgs_per_s": round(sub_rate),
        "publish_acked_msgs_per_s_phase1": round(sub_pub_rate),
        "collector_msgs_per_s": round(col_rate),
        "collector_samples_per_s": round(col_rate * mean_samples),
        "publish_acked_msgs_per_s_phase2": round(col_pub_rate),
        "collector_over_mosquitto_sub": round(col_rate / sub_rate, 3) if sub_rate else None,
        "raw_records_decoded": decoded,
        "raw_samples_per_record": round(raw_mean, 2),
        "collector_stats": stats,
        "wall_s": round(time.monotonic() - started, 1),
    }
    table = Table(title=f"collector vs broker, {args.window:g} s windows, binary encoding")
    table.add_column("measure")
    table.add_column("result", justify="right")
    table.add_column("target", justify="right")
    table.add_row(
        "offered load",
        (f"at most {args.rate:,.0f} msg/s" if args.rate else "no rate cap")
        + (f", <= {args.backlog:,} ahead of the subscriber" if args.backlog else ""),
        "",
    )
    table.add_row("payload (mean)", f"{mean_bytes:,.0f} B, {mean_samples:.1f} samples", "")
    table.add_row("mosquitto_sub read (broker ceiling)", f"{sub_rate:,.0f} msg/s", "")
    table.add_row("collector acked to Kafka", f"{col_rate:,.0f} msg/s", ">= 20,000")
    table.add_row("collector samples", f"{col_rate * mean_samples:,.0f} samples/s", ">= 200,000")
    table.add_row(
        "collector CPU per message (CPU share)",
        f"{stats['cpu_us_per_msg']:.1f} µs ({stats['cpu_share']:.2f} core)",
        "",
    )
    table.add_row("collector / mosquitto_sub", f"{figures['collector_over_mosquitto_sub']}", "")
    table.add_row(
        "publishers acked (phase 1 / 2)", f"{sub_pub_rate:,.0f} / {col_pub_rate:,.0f} msg/s", ""
    )
    table.add_row("vitals.raw records decoded", f"{decoded:,} ({raw_mean:.1f} samples each)", "")
    table.add_row("wall time", f"{figures['wall_s']} s", "< 180 s")
    Console().print(table)
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
