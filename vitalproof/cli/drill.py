"""`vitalproof drill`: chaos drills of the whole pipeline under load, and their checks.

One drill is one run of the real path (simulated fleet -> Mosquitto -> MQTT collector ->
Kafka -> Faust worker -> encrypted lake -> anchor job -> chain, plus the clinician service)
in its own namespace, while the harness does one kind of harm to it: SIGKILL a part at
random moments and restart it, stop Kafka for a minute, fill the lake's disk, cut the
collector off from Mosquitto, or step the devices' clocks. The harness is also the
supervisor a deployment would have (systemd, Kubernetes): a pipeline process that exits by
itself is restarted, and the drill's result says so.

After each drill it waits until the pipeline has settled and checks, reading by reading
against the fleet's ground truth (:mod:`device_sims.record`): nothing lost, nothing sealed
twice, every malformed message in the DLQ with a reason, every batch in the anchor log
exactly once, every anchored head on the chain consistent with the one before (RFC 9162
consistency proof) and a sample of proof bundles verifying against the chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vitalproof.cli import processes
from vitalproof.settings import Settings

#: Every drill `vitalproof drill` knows, in the order a full run does them.
PARTS = ("collector", "worker", "anchor", "kafka", "mosquitto", "anvil", "serve")
DRILLS = (
    *(f"kill-{p}" for p in PARTS),
    "kafka-outage",
    "disk-full",
    "partition",
    "partition-kafka",
    "clock-steps",
)
#: Faults the fleet always carries, so the DLQ and dedupe checks have something to check.
BASE_FAULTS = "dup=0.01,malformed=0.005"
CLOCK_FAULTS = "skew=0.02,jump=0.01,reset=0.005"
#: Faust's default 60 s session timeout keeps a SIGKILLed worker in the consumer group for
#: a minute; a supervisor restarting it at once wants the group to notice sooner.
WORKER_ENV = {"BROKER_SESSION_TIMEOUT": "6.0", "BROKER_HEARTBEAT_INTERVAL": "1.0"}
INFRA = ("kafka", "mosquitto", "anvil")
#: Drills whose harm every part waits out by itself (vitalproof.retry): the anchor job an
#: unreachable chain, the collector an unavailable Kafka, the worker a full lake disk. A
#: part that exits by itself in one of them fails the drill (elsewhere it is a note).
WAITED_OUT = ("kill-anvil", "kafka-outage", "disk-full", "partition-kafka")


def known_drill(drill: str) -> bool:
    """One of :data:`DRILLS`, or ``kill-A+B+...``: each kill hits one of the parts at random."""
    if drill in DRILLS:
        return True
    parts = drill.removeprefix("kill-").split("+") if drill.startswith("kill-") else []
    return bool(parts) and all(p in PARTS for p in parts)


@dataclass
class DrillResult:
    """What one drill did and what the checks found (a row of docs/reliability.md)."""

    drill: str
    devices: int
    rate_hz: float
    duration_s: float
    faults: str
    namespace: str = ""
    injected: list[str] = field(default_factory=list)  # "t=12.3s SIGKILL worker", ...
    self_exits: list[str] = field(default_factory=list)  # parts that died by themselves
    messages_sent: int = 0
    messages_acked: int = 0
    readings_sent: int = 0
    readings_sealed: int = 0
    lost: int = 0
    duplicated: int = 0
    unknown_sealed: int = 0
    malformed_sent: int = 0
    dlq_missing: int = 0
    dlq_without_reason: int = 0
    batches: int = 0
    batches_not_in_log: int = 0
    log_entries_twice: int = 0
    log_root_mismatch: int = 0
    anchors_on_chain: int = 0
    heads_inconsistent: int = 0
    heads_not_on_chain: int = 0
    proofs_verified: int = 0
    proofs_failed: int = 0
    privacy_unexpected: int | None = None  # plaintext ids/values found (None: not scanned)
    settle_s: float = 0.0
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.readings_sent > 0
            and self.lost == 0
            and self.duplicated == 0
            and self.unknown_sealed == 0
            and self.dlq_missing == 0
            and self.dlq_without_reason == 0
            and self.batches > 0
            and self.batches_not_in_log == 0
            and self.log_entries_twice == 0
            and self.log_root_mismatch == 0
            and self.anchors_on_chain > 0
            and self.heads_inconsistent == 0
            and self.heads_not_on_chain == 0
            and self.proofs_verified > 0
            and self.proofs_failed == 0
            and not self.privacy_unexpected
            and not self.errors
        )

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}


# -- the parts and their supervisor -------------------------------------------------------


class Supervisor:
    """Starts the pipeline's own processes, restarts those that exit, kills on request."""

    def __init__(self, rs: Settings, t0: float, result: DrillResult) -> None:
        self.rs = rs
        self.t0 = t0
        self.result = result
        self.logs = rs.paths.home / "logs" / f"drill-{rs.namespace}"
        self.children: dict[str, processes.Child] = {}
        self.serve_port = 0
        self._killing: set[str] = set()
        self.wanted: set[str] = set()

    def now(self) -> str:
        return f"t={time.monotonic() - self.t0:.1f}s"

    def argv(self, part: str) -> tuple[str, ...]:
        if part == "worker":
            return ("worker",)
        if part == "collector":
            return ("collect",)
        if part == "anchor":
            return ("anchor", "run", "--period", f"{self.rs.chain.anchor_period_s:g}")
        if part == "serve":
            return ("serve", "--port", str(self.serve_port))
        raise ValueError(f"no process for part {part!r}")

    def start(self, part: str, rs: Settings | None = None) -> None:
        env = WORKER_ENV if part == "worker" else None
        self.children[part] = processes.start(
            rs or self.rs, *self.argv(part), log=self.logs / f"{part}.log", env=env
        )
        self.wanted.add(part)

    def kill(self, part: str) -> None:
        """SIGKILL the part's process group (no grace) and reap it."""
        import signal

        self._killing.add(part)
        child = self.children[part]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(10)
        if child.secrets_dir is not None:
            shutil.rmtree(child.secrets_dir, ignore_errors=True)

    def restart(self, part: str, rs: Settings | None = None) -> None:
        self.start(part, rs)
        self._killing.discard(part)

    async def watch(self, stop: asyncio.Event) -> None:
        """Restart a process that exited by itself (as systemd would), noting it."""
        while not stop.is_set():
            for part, child in list(self.children.items()):
                if part in self._killing or part not in self.wanted:
                    continue
                if child.poll() is not None:
                    self.result.self_exits.append(
                        f"{self.now()} {part} exited by itself ({child.returncode}): "
                        f"{_log_tail(self.logs / f'{part}.log')}"
                    )
                    await asyncio.sleep(1.0)
                    self.start(part)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    def stop_all(self) -> None:
        self.wanted.clear()
        for child in self.children.values():
            processes.stop(child, grace_s=15)


def _log_tail(path: Path, chars: int = 300) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-3:])[-chars:]


# -- a pausable TCP proxy: the network partition ------------------------------------------


class PausableProxy:
    """127.0.0.1:port -> target, whose link can be cut: while partitioned no byte passes
    either way (connections stay open, as with packets dropped on the wire); healing resets
    the connections that were cut, as TCP would after its retransmissions gave up."""

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.partitioned = asyncio.Event()
        self.connections = 0
        self.bytes_passed = 0
        """What went through: a proxy nobody used would make the drill prove nothing."""
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        self.connections += 1

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    while self.partitioned.is_set():  # hold the bytes: dropped on the wire
                        await asyncio.sleep(0.05)
                        if dst.is_closing():
                            return
                    dst.write(data)
                    self.bytes_passed += len(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def cut(self) -> None:
        self.partitioned.set()

    def heal(self) -> None:
        for w in list(self._writers):
            with contextlib.suppress(OSError, RuntimeError):
                w.transport.abort()
        self._writers.clear()
        self.partitioned.clear()

    async def close(self) -> None:
        self.heal()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


# -- the lake's own small disk ------------------------------------------------------------


class LakeDisk:
    """The lake folder on its own tmpfs, whose size can be cut to what is used (disk full)
    and given back; at the end the lake is copied back onto the ordinary disk."""

    def __init__(self, path: Path, size_mb: int = 512) -> None:
        self.path = path
        self.size_mb = size_mb

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m", "tmpfs", str(self.path)],
            check=True,
            capture_output=True,
        )

    def fill(self) -> int:
        """Shrink the filesystem to what it holds now (plus one page): the next write fails
        with ENOSPC. Returns the bytes in use."""
        used = shutil.disk_usage(self.path).used
        size_k = used // 1024 + 8
        subprocess.run(
            ["mount", "-o", f"remount,size={size_k}k", str(self.path)],
            check=True,
            capture_output=True,
        )
        return used

    def free(self) -> None:
        subprocess.run(
            ["mount", "-o", f"remount,size={self.size_mb}m", str(self.path)],
            check=True,
            capture_output=True,
        )

    def unmount_keeping_data(self) -> None:
        keep = self.path.with_name(self.path.name + ".keep")
        shutil.copytree(self.path, keep, symlinks=True)
        subprocess.run(["umount", "-l", str(self.path)], check=True, capture_output=True)
        self.path.rmdir()
        keep.rename(self.path)


# -- one drill ----------------------------------------------------------------------------


@dataclass
class DrillPlan:
    """How hard to push: fleet size and rate, how long, how many kills."""

    devices: int = 200
    rate_hz: float = 0.5
    duration_s: float = 60.0
    kills: int = 3
    outage_s: float = 60.0
    hold_s: float = 20.0
    proofs: int = 20
    settle_timeout_s: float = 180.0
    seed: int | None = None
    privacy: bool = True  # run the privacy scan of the drill's namespace after its checks
    serve: bool = True  # run the clinician service too (always when a drill kills it)


def run_drill(
    base: Settings, drill: str, plan: DrillPlan, log: Callable[[str], None]
) -> DrillResult:
    """Run ``drill`` on the stack of ``base`` (which must be up, with Anvil) and check it."""
    if not known_drill(drill):
        raise ValueError(f"unknown drill {drill!r} (known: {', '.join(DRILLS)})")
    from vitalproof.cli.demo import _enroll
    from vitalproof.devstack import StackManager, ensure_topics

    run_id = uuid.uuid4().hex[:8]
    manager = StackManager(base)
    rs = base.evolve(
        kafka={"topic_prefix": f"drill-{run_id}."},
        gateway={"id": f"gw-drill-{run_id}"},
        # one collector, subscribing plainly: the setting under which a broker crash loses
        # nothing (see MqttSettings.share_group)
        mqtt={"share_group": ""},
        batching={"max_age_s": 2.0},
        chain={"kind": "anvil", "rpc_url": manager.rpc_url, "anchor_period_s": 4.0},
    )
    faults = BASE_FAULTS + ("," + CLOCK_FAULTS if drill == "clock-steps" else "")
    result = DrillResult(drill, plan.devices, plan.rate_hz, plan.duration_s, faults, rs.namespace)
    rng = random.Random(plan.seed if plan.seed is not None else random.randrange(2**31))
    t0 = time.monotonic()
    sup = Supervisor(rs, t0, result)
    (sup.serve_port,) = _free_ports(1)
    disk = LakeDisk(rs.lake_dir) if drill == "disk-full" else None
    try:
        ensure_topics(rs, rs.kafka.pipeline_topics, rs.kafka.partitions)
        creds = _enroll(rs, [f"dv-{run_id}-{i:04d}" for i in range(plan.devices)])
        if disk is not None:
            disk.mount()
        if drill == "partition-kafka":
            # A second listener, advertised as the proxy's port: the collector's clients
            # reconnect to the proxy after bootstrap, so the proxy stays in their path.
            listener, advertised = _free_ports(2)
            manager = StackManager(
                base.evolve(
                    devstack={
                        "kafka_proxied_port": listener,
                        "kafka_proxied_advertised_port": advertised,
                    }
                )
            )
            manager.stop("kafka")
            manager.start("kafka")
            result.notes.append(
                f"Kafka restarted with a listener on {listener} advertised as {advertised}"
            )
        elif "mosquitto" in drill and not base.devstack.mqtt_autosave_changes:
            # Mosquitto kept to what it acknowledged: saving after every change (a setting,
            # as it costs throughput); the base config comes back after the drill.
            manager = StackManager(base.evolve(devstack={"mqtt_autosave_changes": 1}))
            manager.stop("mosquitto")
            manager.start("mosquitto")
            result.notes.append("Mosquitto restarted with mqtt_autosave_changes=1 for the drill")
        asyncio.run(_drive(rs, drill, plan, rng, sup, manager, disk, creds, result, log))
        if drill in WAITED_OUT and result.self_exits:
            result.errors.append(
                f"{len(result.self_exits)} parts exited by themselves instead of waiting: "
                f"{result.self_exits[0]}"[:500]
            )
    except Exception as exc:  # the drill's own failure is a finding, not a crash of the CLI
        result.errors.append(f"{type(exc).__name__}: {exc}"[:500])
    finally:
        sup.stop_all()
        if manager.settings is not base:  # the broker's own config back
            with contextlib.suppress(Exception):
                manager.stop("kafka" if drill == "partition-kafka" else "mosquitto")
            manager = StackManager(base)
        for part in INFRA:  # a drill never leaves the stack down
            with contextlib.suppress(Exception):
                manager.start(part)  # type: ignore[arg-type]
        if disk is not None:
            with contextlib.suppress(Exception):
                disk.free()
                disk.unmount_keeping_data()
    result.elapsed_s = round(time.monotonic() - t0, 1)
    return result


def _free_ports(n: int) -> list[int]:
    from vitalproof.devstack.procs import free_ports

    return free_ports(n)


async def _drive(
    rs: Settings,
    drill: str,
    plan: DrillPlan,
    rng: random.Random,
    sup: Supervisor,
    manager: Any,
    disk: LakeDisk | None,
    creds: list[tuple[str, str]],
    result: DrillResult,
    log: Callable[[str], None],
) -> None:
    from device_sims.fleet import Fleet

    proxy: PausableProxy | None = None
    collector_rs = rs
    if drill == "partition":
        proxy = PausableProxy(rs.mqtt.host, rs.mqtt.port)
        await proxy.start()
        collector_rs = rs.evolve(mqtt={"host": "127.0.0.1", "port": proxy.port})
    elif drill == "partition-kafka":
        ds = manager.settings.devstack
        host, _ = rs.kafka.bootstrap.rsplit(":", 1)
        proxy = PausableProxy(host, ds.kafka_proxied_port, ds.kafka_proxied_advertised_port)
        await proxy.start()
        collector_rs = rs.evolve(kafka={"bootstrap": f"{host}:{proxy.port}"})
        # The point of the second listener: after bootstrap, clients are sent back to it.
        advertised = await _advertised_brokers(collector_rs.kafka.bootstrap)
        result.notes.append(f"Kafka advertises {advertised} to the collector's clients")
        if advertised != [f"{host}:{proxy.port}"]:
            raise RuntimeError(f"Kafka advertises {advertised}, not the proxy's port {proxy.port}")
    sup.start("worker")
    sup.start("collector", collector_rs)
    sup.start("anchor")
    if plan.serve or "serve" in drill:
        sup.start("serve")
        await _wait_serve(sup, 90)
    record = rs.paths.home / "runs" / f"{rs.namespace}.truth.jsonl"
    stop_watch = asyncio.Event()
    watch = asyncio.create_task(sup.watch(stop_watch))
    fleet = Fleet(
        creds,
        rs.mqtt.host,
        rs.mqtt.port,
        rate_hz=plan.rate_hz,
        duration_s=plan.duration_s,
        record_path=record,
        seed=rng.randrange(2**31),
        faults=result.faults,
    )
    harm = asyncio.create_task(_harm(rs, drill, plan, rng, sup, manager, disk, proxy, result, log))
    log(f"{drill}: fleet of {plan.devices} at {plan.rate_hz:g} Hz for {plan.duration_s:g} s")
    report = await fleet.run()
    await harm
    result.messages_sent = report.messages_sent
    result.messages_acked = report.messages_acked
    result.malformed_sent = report.malformed_sent
    if report.unacked:
        result.notes.append(f"{report.unacked} publishes never acked by Mosquitto")
    result.notes.extend(f"fleet: {e}" for e in report.errors[:3])
    log(f"{drill}: fleet done ({report.messages_acked}/{report.messages_sent} acked); settling")
    t_settle = time.monotonic()
    try:
        await _settle(rs, record, sup, plan.settle_timeout_s, result)
    finally:
        result.settle_s = round(time.monotonic() - t_settle, 1)
        stop_watch.set()
        await watch
        if proxy is not None:
            await proxy.close()
            result.notes.append(
                f"the proxy carried {proxy.connections} connections, {proxy.bytes_passed} bytes"
            )
            if not proxy.bytes_passed:
                result.errors.append("nothing went through the proxy: the partition cut nothing")
    if "serve" in sup.children:
        status = await asyncio.to_thread(_serve_status, sup.serve_port)
        if status.get("fanout") != "ready":
            result.errors.append(f"the clinician service is not ready after the drill: {status}")
    sup.stop_all()
    await asyncio.to_thread(end_collector_session, rs)
    await asyncio.to_thread(check, rs, record, result, plan.proofs, rng)
    if plan.privacy:
        await asyncio.to_thread(check_privacy, rs, result, rng)


async def _advertised_brokers(bootstrap: str) -> list[str]:
    """The broker addresses Kafka's metadata gives a client that bootstrapped at ``bootstrap``."""
    from aiokafka import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        return sorted(f"{b.host}:{b.port}" for b in client.cluster.brokers())
    finally:
        await client.close()


async def _harm(
    rs: Settings,
    drill: str,
    plan: DrillPlan,
    rng: random.Random,
    sup: Supervisor,
    manager: Any,
    disk: LakeDisk | None,
    proxy: PausableProxy | None,
    result: DrillResult,
    log: Callable[[str], None],
) -> None:
    """The drill's harm, at random moments inside the fleet's run."""

    def note(what: str) -> None:
        result.injected.append(f"{sup.now()} {what}")
        log(f"{drill}: {sup.now()} {what}")

    span = plan.duration_s
    if drill.startswith("kill-"):
        parts = drill.removeprefix("kill-").split("+")
        # Kill moments spread over the run: one in each of `kills` equal slices.
        slices = [span * i / plan.kills for i in range(plan.kills + 1)]
        start = time.monotonic()
        for lo, hi in itertools.pairwise(slices):
            at = rng.uniform(lo + 0.15 * (hi - lo), hi - 0.3 * (hi - lo))
            await asyncio.sleep(max(0.0, at - (time.monotonic() - start)))
            down_s = rng.uniform(0.5, 3.0)
            part = rng.choice(parts)
            if part in INFRA:
                pid = await asyncio.to_thread(manager.kill, part)
                note(f"SIGKILL {part} (pid {pid}), restart after {down_s:.1f} s")
                await asyncio.sleep(down_s)
                await asyncio.to_thread(manager.start, part)
            else:
                pid = sup.children[part].pid
                sup.kill(part)
                note(f"SIGKILL {part} (pid {pid}), restart after {down_s:.1f} s")
                await asyncio.sleep(down_s)
                sup.restart(part)
    elif drill == "kafka-outage":
        await asyncio.sleep(rng.uniform(0.1, 0.25) * span)
        await asyncio.to_thread(manager.stop, "kafka")  # a clean stop: SIGTERM, then gone
        note(f"Kafka stopped for {plan.outage_s:g} s")
        await asyncio.sleep(plan.outage_s)
        await asyncio.to_thread(manager.start, "kafka")
        note("Kafka started again")
    elif drill == "disk-full" and disk is not None:
        await asyncio.sleep(rng.uniform(0.2, 0.35) * span)
        used = await asyncio.to_thread(disk.fill)
        note(f"lake disk full (tmpfs cut to {used // 1024} KiB in use) for {plan.hold_s:g} s")
        await asyncio.sleep(plan.hold_s)
        # While full: nothing a reader sees may be a partial batch.
        partial = await asyncio.to_thread(_partial_batches, rs)
        if partial:
            result.errors.append(f"while the disk was full, readers saw partial batches: {partial}")
        await asyncio.to_thread(disk.free)
        note("lake disk space back")
        if not _enospc_reported(sup):
            result.errors.append("no process reported the full disk (ENOSPC) in its log")
    elif drill in ("partition", "partition-kafka") and proxy is not None:
        other = "Mosquitto" if drill == "partition" else "Kafka"
        for _ in range(2):
            await asyncio.sleep(rng.uniform(0.1, 0.2) * span)
            proxy.cut()
            note(f"network partition collector <-> {other} for {plan.hold_s:g} s")
            await asyncio.sleep(plan.hold_s)
            proxy.heal()
            note("partition healed")
    elif drill == "clock-steps":
        note(f"device clocks step and drift ({CLOCK_FAULTS})")


def end_collector_session(rs: Settings) -> None:
    """End the drill's collector session on the broker (clean start, expiry 0): otherwise
    its plain subscription outlives the drill and Mosquitto queues every later message of
    every device for it, saving that queue at each change."""
    import paho.mqtt.client as mqtt

    from vitalproof.devstack import collector_credentials

    user, password = collector_credentials(rs)
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"vitalproof-collector-{rs.gateway.id}",
        protocol=mqtt.MQTTv5,
    )
    client.username_pw_set(user, password)
    client.connect(rs.mqtt.host, rs.mqtt.port, clean_start=True)  # expiry 0 by default
    client.loop_start()
    try:
        time.sleep(0.5)
    finally:
        client.disconnect()
        client.loop_stop()


def _enospc_reported(sup: Supervisor) -> bool:
    needles = ("No space left on device", "ENOSPC", "Errno 28")
    for part in ("worker",):
        text = (sup.logs / f"{part}.log").read_text(errors="replace")
        if any(n in text for n in needles):
            return True
    return False


def _partial_batches(rs: Settings) -> list[str]:
    """Sealed batches (those with a manifest) whose files are missing or differ."""
    import hashlib

    from clinic.proofs import LakeView

    bad: list[str] = []
    for m in LakeView(rs).manifests():
        for f in m.files:
            path = rs.lake_dir / f.path
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != f.sha256:
                bad.append(f"{m.batch_id}:{f.path}")
    return bad


def _serve_status(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=3) as r:
            body: dict[str, Any] = json.load(r)
            return body
    except (OSError, ValueError):
        return {}


async def _wait_serve(sup: Supervisor, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while (await asyncio.to_thread(_serve_status, sup.serve_port)).get("fanout") != "ready":
        if time.monotonic() > deadline:
            raise RuntimeError(f"vitalproof serve not ready in {within_s:g} s")
        await asyncio.sleep(0.5)


async def _settle(
    rs: Settings, record: Path, sup: Supervisor, within_s: float, result: DrillResult
) -> None:
    """Until every sent reading is sealed and the anchor log's head is on-chain, giving up
    after ``within_s`` without progress."""
    from device_sims.record import sent_reading_ids

    sent = sent_reading_ids(record)
    deadline = time.monotonic() + within_s
    best = -1
    while time.monotonic() < deadline:
        sealed, anchored = await asyncio.to_thread(_progress, rs)
        done = len(sent & sealed)
        if done == len(sent) and anchored:
            return
        if done > best:
            best, deadline = done, time.monotonic() + within_s
        await asyncio.sleep(2.0)
    result.notes.append(f"did not settle within {within_s:g} s of no progress")


def _progress(rs: Settings) -> tuple[set[str], bool]:
    """Sealed reading ids; True if every manifest is in the anchor log, anchored."""
    from anchor.log import MerkleLog
    from clinic.proofs import LakeView

    view = LakeView(rs)
    sealed = view.sealed_reading_ids()
    manifests = {m.batch_id for m in view.manifests()}
    log_dir = rs.anchor_dir / "log"
    if not log_dir.exists():
        return sealed, False
    with MerkleLog(log_dir, readonly=True) as mlog:
        in_log = {mlog.entry(i).batch_id for i in range(mlog.size)}
        head = mlog.last_anchored()
        anchored = head is not None and head.tree_size == mlog.size
    return sealed, anchored and manifests <= in_log


# -- the checks ---------------------------------------------------------------------------


def check(
    rs: Settings, record: Path, result: DrillResult, proofs: int, rng: random.Random
) -> DrillResult:
    """Reading by reading against the ground truth; fills the counts of ``result``."""
    check_readings(rs, record, result)
    check_anchors(rs, result)
    check_proofs(rs, result, proofs, rng)
    return result


def check_privacy(rs: Settings, result: DrillResult, rng: random.Random) -> None:
    """The privacy scan of the drill's namespace (chain and state folder)."""
    from vitalproof.cli.privacy import scan

    report = scan(rs, rpc_url=rs.chain.rpc_url, rng=rng, only_namespace=True)
    result.privacy_unexpected = len(report.unexpected)
    if not report.ok:
        result.errors.append(
            f"privacy scan: {len(report.unexpected)} unexpected findings, enumeration matches "
            f"{report.enumeration_matches}, e.g. {report.unexpected[:1]}"
        )


def check_readings(rs: Settings, record: Path, result: DrillResult) -> None:
    """Lost, sealed twice, never sent; malformed messages in the DLQ with a reason."""
    from clinic.proofs import LakeView
    from device_sims.record import payload_digest, read_records, sent_reading_ids
    from streams import lake

    sent = sent_reading_ids(record)
    view = LakeView(rs)
    table = view.table()
    sealed = Counter(lake.hex_ids(table["reading_id"]).to_pylist())
    result.readings_sent = len(sent)
    result.readings_sealed = len(sent & set(sealed))
    result.lost = len(sent - set(sealed))
    result.duplicated = sum(1 for n in sealed.values() if n > 1)
    result.unknown_sealed = len(set(sealed) - sent)
    result.batches = len(view.manifests())

    malformed = {r["digest"] for r in read_records(record) if r["kind"] == "msg" and r["malformed"]}
    dlq = asyncio.run(_read_topic(rs, rs.kafka.topic_dlq))
    digests = {payload_digest(v) for v, _ in dlq}
    result.dlq_missing = len(malformed - digests)
    result.dlq_without_reason = sum(1 for _, h in dlq if not h.get("dlq-reason"))


def check_anchors(rs: Settings, result: DrillResult) -> None:
    """Every manifest once in the log with its root; every head on-chain and consistent."""
    from web3 import Web3

    from anchor.chain import load_artifact
    from anchor.log import MerkleLog
    from clinic.proofs import LakeView
    from vitalproof_verify import merkle

    manifests = {m.batch_id: m for m in LakeView(rs).manifests()}
    with MerkleLog(rs.anchor_dir / "log", readonly=True) as mlog:
        entries = [mlog.entry(i) for i in range(mlog.size)]
        counts = Counter(e.batch_id for e in entries)
        result.log_entries_twice = sum(1 for n in counts.values() if n > 1)
        result.batches_not_in_log = len(set(manifests) - set(counts))
        result.log_root_mismatch = sum(
            1
            for e in entries
            if e.batch_id in manifests and e.batch_root.hex() != manifests[e.batch_id].merkle_root
        )
        heads = mlog.anchored_heads()
        w3 = Web3(Web3.HTTPProvider(rs.chain.rpc_url))
        contract_files = sorted(rs.anchor_dir.glob("contract-*.json"))
        if not contract_files:
            result.errors.append("no contract recorded: nothing was anchored")
            return
        address = json.loads(contract_files[-1].read_text())["address"]
        events = w3.eth.contract(address=address, abi=load_artifact()["abi"]).events.Anchored
        onchain = [
            (int(ev["args"]["treeSize"]), bytes(ev["args"]["root"]))
            for ev in events.get_logs(from_block=0)
        ]
        result.anchors_on_chain = len(onchain)
        on = set(onchain)
        result.heads_not_on_chain = sum(1 for h in heads if (h.tree_size, h.root) not in on)
        for (old_size, old_root), (new_size, new_root) in itertools.pairwise(onchain):
            try:
                if new_size < old_size:
                    raise ValueError("tree shrank")
                proof = mlog.consistency_proof(old_size, new_size)
                merkle.verify_consistency(old_size, new_size, old_root, new_root, proof)
                if mlog.root(new_size) != new_root:
                    raise ValueError("root differs from the log's")
            except Exception as exc:
                result.heads_inconsistent += 1
                if result.heads_inconsistent <= 3:
                    result.errors.append(f"anchor {old_size}->{new_size} inconsistent: {exc}")


def check_proofs(rs: Settings, result: DrillResult, n: int, rng: random.Random) -> None:
    """Export and verify ``n`` random sealed readings' bundles against the chain."""
    from web3 import Web3

    from clinic.proofs import LakeView
    from streams import lake

    view = LakeView(rs)
    ids = sorted(set(lake.hex_ids(view.table()["reading_id"]).to_pylist()))
    sample = rng.sample(ids, min(n, len(ids)))
    verified, failures = view.export_and_verify(sample, Web3(Web3.HTTPProvider(rs.chain.rpc_url)))
    result.proofs_verified = verified
    result.proofs_failed = len(failures)
    result.errors.extend(failures[:3])


async def _read_topic(rs: Settings, topic: str) -> list[tuple[bytes, dict[str, bytes]]]:
    """Every record of ``topic`` from the start to its current end (value, headers)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=rs.kafka.bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    out: list[tuple[bytes, dict[str, bytes]]] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(rs.kafka.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + 60
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not read {topic} to its end within 60 s")
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out.extend((r.value or b"", dict(r.headers)) for r in records)
    finally:
        await consumer.stop()
    return out


# -- the whole run ------------------------------------------------------------------------


def run_drills(
    settings: Settings, drills: list[str], plan: DrillPlan, log: Callable[[str], None]
) -> list[DrillResult]:
    """Each drill in turn on the local stack (started if it is not up, then stopped)."""
    from vitalproof.devstack import StackManager

    base = settings.evolve(chain={"kind": "anvil"})
    manager = StackManager(base)
    status = manager.status()
    started = not status.healthy or not (status.anvil and status.anvil.healthy)
    if started:
        log("starting the local stack (Kafka, Mosquitto, Anvil)")
        manager.up(chain="anvil")
    results: list[DrillResult] = []
    try:
        for drill in drills:
            r = run_drill(base, drill, plan, log)
            log(f"{drill}: {'PASS' if r.ok else 'FAIL'} {summary_line(r)}")
            results.append(r)
    finally:
        if started:
            manager.down()
    return results


def summary_line(r: DrillResult) -> str:
    return (
        f"sent {r.readings_sent} sealed {r.readings_sealed} lost {r.lost} dup {r.duplicated} "
        f"dlq-missing {r.dlq_missing} batches {r.batches} anchors {r.anchors_on_chain} "
        f"proofs {r.proofs_verified}/{r.proofs_verified + r.proofs_failed} "
        f"self-exits {len(r.self_exits)} "
        f"({r.elapsed_s:g} s){' errors: ' + '; '.join(r.errors) if r.errors else ''}"
    )


def markdown_table(results: list[DrillResult]) -> str:
    """The table docs/reliability.md carries."""
    head = (
        "| drill | load held | faults injected | sent | sealed | lost | duplicated | "
        "DLQ missing | batches / anchors | proofs | verdict |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---|---|---|\n"
    )
    rows = []
    for r in results:
        injected = "; ".join(i.split(" ", 1)[1] if " " in i else i for i in r.injected) or "-"
        rows.append(
            f"| {r.drill} | {r.devices} devices x {r.rate_hz:g} msg/s for {r.duration_s:g} s "
            f"(fleet faults {r.faults}) | {injected} | {r.readings_sent} | {r.readings_sealed} "
            f"| {r.lost} | {r.duplicated} | {r.dlq_missing} | {r.batches} / "
            f"{r.anchors_on_chain} | {r.proofs_verified}/{r.proofs_verified + r.proofs_failed}"
            f" | {'PASS' if r.ok else 'FAIL'} |"
        )
    return head + "\n".join(rows) + "\n"


# -- the command line ---------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    d = sub.add_parser("drill", help="chaos drills of the whole pipeline under load")
    d.add_argument(
        "drills",
        nargs="*",
        metavar="DRILL",
        help=f"which (default: all): {', '.join(DRILLS)}; or kill-A+B+...: each kill hits"
        " one of the parts at random",
    )
    d.add_argument("--devices", type=int, default=200, help="simulated devices (default 200)")
    d.add_argument("--rate", type=float, default=0.5, help="messages per device per second")
    d.add_argument("--duration", type=float, default=60.0, help="seconds of load per drill")
    d.add_argument("--kills", type=int, default=3, help="SIGKILLs per kill drill (default 3)")
    d.add_argument("--outage", type=float, default=60.0, help="seconds Kafka stays stopped")
    d.add_argument("--hold", type=float, default=20.0, help="seconds a full disk/partition lasts")
    d.add_argument("--seed", type=int, help="random seed (kill moments, fleet)")
    d.add_argument("--no-privacy", action="store_true", help="skip the privacy scan per drill")
    d.add_argument("-o", "--output", type=Path, help="write the results as JSON here")
    d.set_defaults(handler=cmd_drill)


def cmd_drill(args: Any, settings: Settings) -> int:
    import sys

    unknown = [d for d in args.drills if not known_drill(d)]
    if unknown:
        print(f"error: unknown drill {unknown[0]!r} (known: {', '.join(DRILLS)})", file=sys.stderr)
        return 2
    plan = DrillPlan(
        devices=args.devices,
        rate_hz=args.rate,
        duration_s=args.duration,
        kills=args.kills,
        outage_s=args.outage,
        hold_s=args.hold,
        seed=args.seed,
        privacy=not args.no_privacy,
    )

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results = run_drills(settings, list(args.drills) or list(DRILLS), plan, log)
    doc = {"plan": asdict(plan), "results": [r.to_json_dict() for r in results]}
    if args.output:
        args.output.write_text(json.dumps(doc, indent=2) + "\n")
    print(markdown_table(results))
    return 0 if results and all(r.ok for r in results) else 1
