"""`vitalproof demo` and `vitalproof sim`: the whole path, on the local stack, end to end.

simulated fleet -> Mosquitto -> MQTT collector -> Kafka -> Faust worker (normalize, seal)
-> encrypted Parquet + manifests -> anchor job -> chain -> proof bundles -> verify.

Each demo run gets its own namespace (topic prefix, lake and anchor log), so its counts are
its own; the stack is started if needed and stopped at the end only if the demo started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vitalproof.cli import processes
from vitalproof.cli.demo_clinic import DemoClinic
from vitalproof.registry import Registry
from vitalproof.settings import Settings


@dataclass
class DemoSummary:
    chain: str
    devices: int
    duration_s: float
    messages_sent: int = 0
    messages_acked: int = 0
    readings_sent: int = 0
    faults: str = ""
    malformed_sent: int = 0
    duplicates_sent: int = 0
    readings_in_kafka: int = 0
    readings_sealed: int = 0
    missing: int = 0
    dlq: int = 0
    batches: int = 0
    anchors: int = 0
    anchor_txs: list[str] = field(default_factory=list)
    proofs_verified: int = 0
    proofs_failed: int = 0
    # The clinician service (vitalproof.cli.demo_clinic): two clinicians watching live.
    subscribers: int = 0
    readings_delivered: int = 0
    deliveries_refused: int = 0
    deliveries_unexpected: int = 0
    deliveries_missing: int = 0
    audit_records: int = 0
    audit_checkpoints_anchored: int = 0
    elapsed_s: float = 0.0
    namespace: str = ""
    next_commands: list[str] = field(default_factory=list)
    stack_started: bool = False  # the demo started the stack, so it stops it at the end
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.readings_sent > 0
            and self.missing == 0
            and self.readings_sealed >= self.readings_sent
            and self.proofs_verified >= 1
            and self.proofs_failed == 0
            and self.dlq == self.malformed_sent
            and self.subscribers > 0
            and self.deliveries_unexpected == 0
            and self.deliveries_missing == 0
            and not self.errors
        )

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}


def _enroll(settings: Settings, device_ids: list[str]) -> list[tuple[str, str]]:
    from vitalproof.devstack import set_device_credentials

    registry = Registry(settings.paths.registry_path)
    creds: list[tuple[str, str]] = []
    for device_id in device_ids:
        patient_id = "pt-" + device_id.removeprefix("dv-")
        creds.append((device_id, registry.enroll(device_id, patient_id).mqtt_password))
    set_device_credentials(settings, dict(creds))
    return creds


def run_demo(
    settings: Settings,
    *,
    devices: int = 50,
    duration_s: float = 60.0,
    chain: str = "anvil",
    json_mode: bool = False,
    faults: str = "",
    serve: bool = False,
    serve_for_s: float | None = None,
    port: int | None = None,
) -> DemoSummary:
    """The bounded run and its checks; with ``serve``, then the dashboard on 127.0.0.1 with
    the fleet still streaming, until Ctrl-C (or ``serve_for_s``)."""
    from vitalproof.devstack import StackManager, ensure_topics

    console = Console(stderr=json_mode)
    t0 = time.monotonic()
    base = settings.evolve(chain={"kind": chain})
    manager = StackManager(base)
    started_stack = not manager.status().healthy or (chain == "anvil" and not _anvil_up(manager))
    if started_stack:
        console.print(f"[bold]starting the local stack[/] (Kafka, Mosquitto, chain: {chain})")
        manager.up(chain=chain)  # type: ignore[arg-type]
    run_id = uuid.uuid4().hex[:8]
    rs = base.evolve(
        kafka={"topic_prefix": f"demo-{run_id}."},
        batching={"max_age_s": max(min(base.batching.max_age_s, 3.0), devices / 50)},
        chain={
            "anchor_period_s": min(base.chain.anchor_period_s, max(5.0, duration_s / 4)),
            "rpc_url": manager.rpc_url if chain == "anvil" else base.chain.rpc_url,
        },
    )
    summary = DemoSummary(chain=chain, devices=devices, duration_s=duration_s, faults=faults)
    summary.stack_started = started_stack
    summary.namespace = rs.namespace
    worker: subprocess.Popen[bytes] | None = None
    clinic: DemoClinic | None = None
    try:
        ensure_topics(rs, rs.kafka.pipeline_topics, rs.kafka.partitions)
        creds = _enroll(rs, [f"dv-{run_id}-{i:04d}" for i in range(devices)])
        worker = processes.start(
            rs, "worker", log=rs.paths.home / "logs" / f"worker-{rs.namespace}.log"
        )
        clinic = DemoClinic(rs, sorted({"pt-" + d.removeprefix("dv-") for d, _ in creds}))
        asyncio.run(
            _run(rs, creds, duration_s, summary, console, worker, clinic, port=port, serve=serve)
        )
        summary.elapsed_s = round(time.monotonic() - t0, 1)
        _print_summary(console, summary)
        if serve and summary.ok:
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(_serve(rs, creds, clinic, serve_for_s, console))
    finally:
        if clinic is not None:
            clinic.stop_service()
        if worker is not None:
            processes.stop(worker)
        if started_stack:
            manager.down()
    return summary


def _anvil_up(manager: Any) -> bool:
    status = manager.status()
    return bool(status.anvil and status.anvil.healthy)


async def _run(
    rs: Settings,
    creds: list[tuple[str, str]],
    duration_s: float,
    summary: DemoSummary,
    console: Console,
    worker: subprocess.Popen[bytes],
    clinic: DemoClinic,
    *,
    port: int | None = None,
    serve: bool = False,
) -> None:
    from anchor.chain import Chain
    from anchor.job import AnchorJob
    from clinic.audit import CheckpointSource
    from clinic.proofs import LakeView
    from device_sims.fleet import Fleet, FleetProgress
    from ingest.mqtt.collector import MqttCollector, MqttCredentials
    from vitalproof.devstack import collector_credentials

    chain = Chain.from_settings(rs)
    # The audit log's checkpoints are anchored with the batches (the service writes it).
    job = AnchorJob(rs, chain, checkpoints=CheckpointSource(rs.paths.audit_path))
    user, password = collector_credentials(rs)
    collector = MqttCollector(rs, MqttCredentials(user, password, rs.mqtt.tls_ca))
    stop_collector, stop_anchor = asyncio.Event(), asyncio.Event()
    collector_task = asyncio.create_task(collector.run(stop=stop_collector))
    await asyncio.wait_for(collector.subscribed.wait(), 30)
    anchor_task = asyncio.create_task(job.run(period_s=rs.chain.anchor_period_s, stop=stop_anchor))
    record = rs.paths.home / "runs" / f"{rs.namespace}.truth.jsonl"
    view = LakeView(rs)
    await clinic.start(port)

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        fleet_task = progress.add_task("fleet", total=duration_s, detail="connecting")
        seal_task = progress.add_task("sealed", total=None, detail="")

        def on_progress(p: FleetProgress) -> None:
            progress.update(
                fleet_task,
                completed=min(duration_s, p.elapsed_s) if p.phase == "running" else None,
                detail=f"{p.phase}: {p.connected}/{p.devices} connected, "
                f"{p.acked}/{p.sent} msgs acked, collector {collector.stats.acked}",
            )

        fleet = Fleet(
            creds,
            rs.mqtt.host,
            rs.mqtt.port,
            rate_hz=1.0,
            duration_s=duration_s,
            record_path=record,
            on_progress=on_progress,
            seed=random.randrange(2**31),
            faults=summary.faults or None,
        )
        report = await fleet.run()
        progress.update(
            fleet_task, completed=duration_s, detail=f"done: {report.messages_acked} acked"
        )
        summary.messages_sent = report.messages_sent
        summary.messages_acked = report.messages_acked
        summary.malformed_sent = report.malformed_sent
        summary.duplicates_sent = report.duplicates_sent
        summary.errors.extend(report.errors[:5])
        sent_ids = _ids_from_record(record)
        summary.readings_sent = len(sent_ids)

        # Wait while sealing makes progress: give up only after a minute without any (a
        # large fleet leaves a backlog that the worker seals after the fleet has stopped).
        stall_s = 60 + 3 * rs.batching.max_age_s
        stalled_at = time.monotonic() + stall_s
        sealed_rows = last_rows = 0
        progress.update(seal_task, total=len(sent_ids))
        while time.monotonic() < stalled_at:
            sealed_rows = view.sealed_rows()
            progress.update(seal_task, completed=sealed_rows, detail=f"{sealed_rows} rows")
            if sealed_rows >= len(sent_ids):
                break
            if sealed_rows > last_rows:
                last_rows, stalled_at = sealed_rows, time.monotonic() + stall_s
            if worker.poll() is not None:
                summary.errors.append(f"worker exited with {worker.returncode}")
                break
            await asyncio.sleep(0.5)
        else:
            summary.errors.append(f"sealing made no progress for {stall_s:g} s")
        stop_collector.set()
        stop_anchor.set()
        await collector_task
        try:
            receipts = await anchor_task
        finally:
            job.close()

    summary.readings_in_kafka = await _count_clean_readings(rs)
    summary.dlq = await _count_records(rs, rs.kafka.topic_dlq)
    dlq_deadline = time.monotonic() + 30
    while summary.dlq < summary.malformed_sent and time.monotonic() < dlq_deadline:
        await asyncio.sleep(1.0)  # rejections at the tail of a partition may still be coming
        summary.dlq = await _count_records(rs, rs.kafka.topic_dlq)
    sealed_ids = view.sealed_reading_ids()
    summary.readings_sealed = len(sealed_ids & sent_ids)
    summary.missing = len(sent_ids - sealed_ids)
    summary.batches = len(view.manifests())
    summary.anchors = len(receipts)
    summary.anchor_txs = [r.tx_hash for r in receipts]
    sample = random.sample(sorted(sealed_ids & sent_ids), min(5, len(sealed_ids & sent_ids)))
    verified, failures = view.export_and_verify(sample, chain.w3)
    summary.proofs_verified = verified
    summary.proofs_failed = len(failures)
    summary.errors.extend(failures[:5])
    if sample:
        summary.next_commands = next_commands(rs, view, sample[0], summary.stack_started)
    counts = await clinic.finish(view.table(), keep_serving=serve)
    summary.subscribers = counts.subscribers
    summary.readings_delivered = counts.readings_delivered
    summary.deliveries_refused = counts.deliveries_refused
    summary.deliveries_unexpected = counts.deliveries_unexpected
    summary.deliveries_missing = counts.deliveries_missing
    summary.errors.extend(counts.problems)
    summary.audit_records = counts.audit_records
    summary.audit_checkpoints_anchored = _anchored_checkpoints(rs)


async def _serve(
    rs: Settings,
    creds: list[tuple[str, str]],
    clinic: DemoClinic,
    serve_for_s: float | None,
    console: Console,
) -> None:
    """The pipeline kept running for the dashboard: the fleet streams again, the collector,
    worker and anchor job carry on, and `vitalproof serve` stays up; prints who can sign in
    where. Ends at Ctrl-C or after ``serve_for_s``."""
    from anchor.chain import Chain
    from anchor.job import AnchorJob
    from clinic.audit import CheckpointSource
    from device_sims.fleet import Fleet
    from ingest.mqtt.collector import MqttCollector, MqttCredentials
    from vitalproof.devstack import collector_credentials

    user, password = collector_credentials(rs)
    collector = MqttCollector(rs, MqttCredentials(user, password, rs.mqtt.tls_ca))
    job = AnchorJob(rs, Chain.from_settings(rs), checkpoints=CheckpointSource(rs.paths.audit_path))
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(collector.run(stop=stop)),
        asyncio.create_task(job.run(period_s=rs.chain.anchor_period_s, stop=stop)),
    ]
    await asyncio.wait_for(collector.subscribed.wait(), 30)
    forever = 365 * 24 * 3600.0
    fleet = Fleet(
        creds, rs.mqtt.host, rs.mqtt.port, rate_hz=1.0, duration_s=serve_for_s or forever,
        seed=random.randrange(2**31),
    )  # fmt: skip
    fleet_task = asyncio.create_task(fleet.run())
    patients = [sorted(c.patients)[0] for c in clinic.clinicians]
    console.print(f"\n[bold]dashboard[/] {clinic.url}/ui/  (namespace {rs.namespace})")
    for who, link in clinic.sign_in_links(patients):
        console.print(f"  [bold]{who}[/]\n    {link}", soft_wrap=True)
    console.print(f"  anyone: {clinic.url}/ui/verify.html  (JSON-RPC: {rs.chain.rpc_url or '-'})")
    console.print("[dim]the fleet streams until Ctrl-C" + (
        f" or {serve_for_s:g} s" if serve_for_s else "") + "[/]")  # fmt: skip
    try:
        await fleet_task
    finally:
        fleet_task.cancel()
        stop.set()
        await asyncio.gather(fleet_task, *tasks, return_exceptions=True)
        job.close()
        clinic.stop_service()


def next_commands(rs: Settings, view: Any, reading_id: str, stack_stopped: bool) -> list[str]:
    """What to try after the demo, exactly as it works (the demo's data stays in its
    namespace of the state folder; Anvil's chain in it too, so a stopped stack comes back
    with the demo's anchors)."""
    ns = rs.namespace
    patient = str(view.find(reading_id)["patient_id"])
    default_home = Path(".vitalproof").resolve()
    home = "" if rs.paths.home.resolve() == default_home else f"VITALPROOF_HOME={rs.paths.home} "
    script = Path(sys.executable).parent / "vitalproof"  # the demo's own installation
    if script.exists():
        near = os.path.relpath(script)
        vp = home + (str(script) if near.startswith("..") else near)
    else:
        vp = f"{home}{sys.executable} -m vitalproof"
    rpc = f" --rpc {rs.chain.rpc_url}" if rs.chain.kind == "anvil" and rs.chain.rpc_url else ""
    again = [f"{vp} stack up --chain anvil"] if rpc and stack_stopped else []
    return [
        f"{vp} lake stats --namespace {ns}",
        f"{vp} lake read --namespace {ns} --patient {patient} --format fhir -o {patient}.fhir.json",
        f"{vp} lake read --namespace {ns} --patient {patient} --format csv -o {patient}.csv",
        f"{vp} proof export --namespace {ns} --reading {reading_id} -o bundle.json",
        *again,
        f"{vp} verify bundle.json{rpc}",
    ]


def _anchored_checkpoints(rs: Settings) -> int:
    """Audit checkpoints in the anchor log that an anchor covers, after checking every one
    still matches the audit log (raises if a record was changed or removed)."""
    from anchor.log import MerkleLog
    from clinic.audit import AuditLog, check_against_log

    with (
        AuditLog(rs.paths.audit_path) as audit,
        MerkleLog(rs.anchor_dir / "log", readonly=True) as log,
    ):
        return sum(1 for cp in check_against_log(audit, log) if cp.anchored)


def _ids_from_record(path: Path) -> set[str]:
    from device_sims.record import sent_reading_ids

    return sent_reading_ids(path)


async def _count_records(rs: Settings, topic: str) -> int:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=rs.kafka.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    try:
        n = 0
        while batches := await consumer.getmany(timeout_ms=1500):
            n += sum(len(r) for r in batches.values())
        return n
    finally:
        await consumer.stop()


async def _count_clean_readings(rs: Settings) -> int:
    from aiokafka import AIOKafkaConsumer

    from vitalproof.wire.clean import decode_record

    consumer = AIOKafkaConsumer(
        rs.kafka.topic_clean,
        bootstrap_servers=rs.kafka.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    ids: set[str] = set()
    try:
        while batches := await consumer.getmany(timeout_ms=1500):
            for records in batches.values():
                for r in records:
                    for batch in decode_record(r.value or b""):
                        ids.update(batch.reading_id)
        return len(ids)
    finally:
        await consumer.stop()


def _print_summary(console: Console, s: DemoSummary) -> None:
    table = Table(
        title=f"vitalproof demo ({s.chain} chain, {s.devices} devices, {s.duration_s:g} s)"
    )
    table.add_column("stage")
    table.add_column("count", justify="right")
    for label, value in (
        ("MQTT messages sent / acked", f"{s.messages_sent} / {s.messages_acked}"),
        ("readings sent (distinct ids)", s.readings_sent),
        ("readings in Kafka (vitals.clean)", s.readings_in_kafka),
        ("readings sealed (distinct ids)", s.readings_sealed),
        ("missing", s.missing),
        ("malformed sent / DLQ records", f"{s.malformed_sent} / {s.dlq}"),
        ("batches", s.batches),
        ("anchors", s.anchors),
        ("proofs verified / failed", f"{s.proofs_verified} / {s.proofs_failed}"),
        ("clinicians watching live", s.subscribers),
        (
            "readings delivered / refused by consent",
            f"{s.readings_delivered} / {s.deliveries_refused}",
        ),
        ("deliveries not covered / missed", f"{s.deliveries_unexpected} / {s.deliveries_missing}"),
        (
            "audit records / checkpoints anchored",
            f"{s.audit_records} / {s.audit_checkpoints_anchored}",
        ),
    ):
        table.add_row(label, str(value))
    console.print(table)
    for tx in s.anchor_txs:
        console.print(f"  anchor tx {tx}")
    for err in s.errors:
        console.print(f"[red]error:[/] {err}")
    if s.next_commands:
        console.print(f"\nThe demo's data stays in namespace [bold]{s.namespace}[/]. Try next:")
        if s.chain == "embedded":
            console.print("  (its embedded chain ended with it: verify checks the bundle offline)")
        for cmd in s.next_commands:
            console.print(f"  {cmd}", soft_wrap=True, highlight=False)
    console.print("[bold green]OK[/]" if s.ok else "[bold red]FAILED[/]", f"in {s.elapsed_s} s")


async def run_sim(
    settings: Settings,
    *,
    devices: int,
    rate_hz: float,
    duration_s: float,
    faults: str,
    record: Path | None,
    accel_hz: int,
    encoding: str = "json",
) -> dict[str, Any]:
    """`vitalproof sim`: enroll N devices (if new) and run them against the broker."""
    from device_sims.fleet import Fleet

    ids = [f"sim-{i:05d}" for i in range(devices)]
    registry = Registry(settings.paths.registry_path)
    fresh = [d for d in ids if registry.get(d) is None]
    creds = dict(_enroll(settings, fresh)) if fresh else {}
    if len(creds) != len(ids):
        # Passwords are shown once; devices enrolled earlier get a fresh credential now.
        from vitalproof.devstack import set_device_credentials

        rotated = {d: uuid.uuid4().hex for d in ids if d not in creds}
        set_device_credentials(settings, rotated)
        creds |= rotated
    fleet = Fleet(
        [(d, creds[d]) for d in ids],
        settings.mqtt.host,
        settings.mqtt.port,
        rate_hz=rate_hz,
        duration_s=duration_s,
        faults=faults or None,
        record_path=record,
        accel_hz=accel_hz,
        encoding=encoding,
    )
    report = await fleet.run()
    return {k: v for k, v in asdict(report).items() if k != "errors"} | {"errors": report.errors}
