"""The `vitalproof` command. The only place that prints for people and exits.

Every subcommand imports its stage lazily, so `vitalproof verify` stays fast and needs nothing
from streams or ingest, and a missing optional part only matters to the command that uses it.
Errors: one line on stderr saying what and where, exit 1 (2 for malformed input or usage).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vitalproof import crashpoints, hashing
from vitalproof.cli import audit, consent, drill, patients, privacy
from vitalproof.errors import ConfigError, UsageError, VitalproofError
from vitalproof.settings import Settings

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

Handler = Callable[[argparse.Namespace, Settings], int]


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, separators=(",", ":"), default=str))


# -- stack --------------------------------------------------------------------------------


def cmd_stack(args: argparse.Namespace, settings: Settings) -> int:
    from vitalproof.devstack import StackManager, kafka, seaweedfs

    if args.action == "fetch":
        libs = kafka.resolve_libs(settings)
        print(f"kafka jars: {libs}")
        if args.s3:
            started = time.monotonic()
            weed = seaweedfs.build_weed()
            print(f"seaweedfs weed: {weed} ({time.monotonic() - started:.0f} s)")
        return 0
    manager = StackManager(settings)
    if args.action == "up":
        status = manager.up(chain=args.chain or settings.chain.kind, s3=args.s3)
    elif args.action == "down":
        manager.down()
        status = manager.status()
    else:
        status = manager.status()
    if args.json:
        print(status.to_json(indent=None))
    else:
        for part in status.parts.values():
            state = "healthy" if part.healthy else ("running" if part.running else "stopped")
            print(f"{part.name:<10} {state:<8} {part.address:<24} pid {part.pid or '-'}")
        if not status.parts:
            print("stack: nothing running")
        if args.action == "up" and args.s3:
            print(
                f"lake on S3: VITALPROOF_LAKE={seaweedfs.lake_uri(settings)} "
                f"VITALPROOF_S3_ENDPOINT={seaweedfs.endpoint(settings)} (keys in "
                f"{settings.secrets_dir})"
            )
    return 0 if args.action == "down" or status.healthy else EXIT_FAILED


# -- topics -------------------------------------------------------------------------------


def cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    """Create the namespace's topics up front, replicated as the settings say: on a cluster
    nothing may be auto-created with the broker's defaults (docs/deploy.md)."""
    from vitalproof.devstack import ensure_topics

    k = settings.kafka
    names = [*k.pipeline_topics, k.topic_dedupe]
    ensure_topics(settings, names, k.partitions, timeout_s=args.timeout, compacted=[k.topic_dedupe])
    for name in names:
        print(
            f"{name}: {k.partitions} partitions, replication factor {k.replication_factor}, "
            f"min.insync.replicas {k.min_insync_replicas}"
        )
    return 0


# -- devices ------------------------------------------------------------------------------


def cmd_devices(args: argparse.Namespace, settings: Settings) -> int:
    from vitalproof.devstack import mosquitto
    from vitalproof.registry import Registry

    registry = Registry(settings.paths.registry_path)
    if args.action == "enroll":
        enrollment = registry.enroll(args.device_id, args.patient_id)
        mosquitto.set_device_credentials(settings, {args.device_id: enrollment.mqtt_password})
        out = {
            "device_id": args.device_id,
            "patient_id": args.patient_id,
            "mqtt_username": args.device_id,
            "mqtt_password": enrollment.mqtt_password,
            "mqtt_topic": f"devices/{args.device_id}/vitals",
        }
        if args.json:
            _print_json(out)
        else:
            for k, v in out.items():
                print(f"{k}: {v}")
            print("(the password is shown once; the broker keeps only its hash)")
        return 0
    if args.action == "retire":
        device = registry.retire(args.device_id)
        mosquitto.remove_device(settings, args.device_id)
        print(f"retired {device.device_id}")
        return 0
    devices = registry.list()
    if args.json:
        _print_json([d.__dict__ | {"status": d.status.value} for d in devices])
    else:
        for d in devices:
            print(f"{d.device_id}\t{d.patient_id}\t{d.status.value}")
    return 0


# -- pipeline processes -------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    import faust

    from streams.app import create_app

    app = create_app(settings)
    worker = faust.Worker(app, loglevel=args.loglevel)
    worker.execute_from_commandline()
    return 0


def _with_gateway_id(settings: Settings, gateway_id: str | None) -> Settings:
    """``settings`` naming this collector ``gateway_id`` (None: as they are)."""
    if gateway_id is None:
        return settings
    from pydantic import ValidationError

    try:
        return settings.evolve(gateway={"id": gateway_id})
    except ValidationError:
        raise UsageError(
            f"--gateway-id {gateway_id!r}: 1-64 letters, digits, '.', '_', '-' "
            "(starting with a letter or digit)"
        ) from None


def cmd_collect(args: argparse.Namespace, settings: Settings) -> int:
    settings = _with_gateway_id(settings, args.gateway_id)
    if args.leave and (args.duration is not None or args.max_messages is not None):
        raise UsageError("--leave runs until the session is drained: no --duration/--max-messages")
    if args.leave and args.transport == "ble":
        raise UsageError("--leave retires an MQTT collector; a BLE gateway has no broker session")
    if args.transport == "ble":
        return _collect_ble(args, settings)
    from ingest.mqtt.collector import CollectorError, MqttCollector, MqttCredentials

    secret = settings.mqtt.collector_password
    if secret is None:
        raise ConfigError(
            "no MQTT password for the collector: set VITALPROOF_MQTT_COLLECTOR_PASSWORD or "
            f"put it in {settings.secrets_dir / 'VITALPROOF_MQTT_COLLECTOR_PASSWORD'} "
            "(`vitalproof stack up` writes one for the local broker)"
        )
    credentials = MqttCredentials(
        settings.mqtt.collector_user, secret.get_secret_value(), settings.mqtt.tls_ca
    )
    collector = MqttCollector(settings, credentials)
    stats = asyncio.run(
        collector.run(duration_s=args.duration, max_messages=args.max_messages, leave=args.leave)
    )
    print(
        f"received {stats.received}, forwarded {stats.forwarded}, acked {stats.acked}",
        file=sys.stderr,
    )
    if args.leave and not collector.left:
        raise CollectorError(f"{collector.client_id} did not leave: its session is kept")
    if args.leave:
        print(f"{collector.client_id} left the share group; its session is ended", file=sys.stderr)
    return 0


def _collect_ble(args: argparse.Namespace, settings: Settings) -> int:
    from bleak.exc import BleakError

    from ingest.ble import BleCollector

    allow: dict[str, str] | None = None
    if args.allow:
        allow = {}
        for item in args.allow:
            address, _, device_id = item.partition("=")
            if not device_id:
                print(f"error: --allow {item!r}: expected ADDRESS=DEVICE_ID", file=sys.stderr)
                return EXIT_BAD_INPUT
            allow[address] = device_id
    collector = BleCollector(settings, allow_list=allow)
    try:
        stats = asyncio.run(collector.run(duration_s=args.duration))
    except (BleakError, OSError) as e:
        print(f"error: BLE adapter unavailable: {e}".splitlines()[0], file=sys.stderr)
        return EXIT_FAILED
    print(
        f"notifications {stats.notifications}, readings {stats.readings}, "
        f"produced {stats.produced}, dlq {stats.produced_dlq}, evicted {stats.evicted}",
        file=sys.stderr,
    )
    return 0


def cmd_anchor(args: argparse.Namespace, settings: Settings) -> int:
    from anchor.job import AnchorJob
    from clinic.audit import CheckpointSource

    # the audit log's roots are anchored with the batches (nothing while there is none)
    checkpoints = CheckpointSource(settings.paths.audit_path)
    try:
        # Once: an unreachable node is an error; running, it is waited for (with backoff).
        job = (
            AnchorJob.from_settings(settings, checkpoints=checkpoints)
            if args.once
            else AnchorJob.connect(settings, checkpoints=checkpoints)
        )
    except BaseException:
        checkpoints.close()
        raise
    try:
        if args.once:
            job.poll_manifests()
            receipt = job.anchor_once()
            _print_json(receipt.to_json_dict() if receipt else None)
            return 0
        period = args.period or settings.chain.anchor_period_s
        # One leader among however many candidates run (anchor.leader: a Kafka lease).
        asyncio.run(job.lead(period_s=period, duration_s=args.duration))
        return 0
    finally:
        job.close()
        checkpoints.close()


def cmd_sim(args: argparse.Namespace, settings: Settings) -> int:
    from vitalproof.cli.demo import run_sim

    report = asyncio.run(
        run_sim(
            settings,
            devices=args.devices,
            rate_hz=args.rate,
            duration_s=args.duration,
            faults=args.faults,
            record=args.record,
            accel_hz=args.accel_hz,
            encoding=args.encoding,
        )
    )
    _print_json(report)
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from vitalproof.cli.demo import run_demo

    summary = run_demo(
        settings,
        devices=args.devices,
        duration_s=args.duration,
        chain=args.chain,
        json_mode=args.json,
        faults=args.faults,
        serve=args.serve,
        serve_for_s=args.serve_for,
        port=args.port,
    )
    if args.json:
        _print_json(summary.to_json_dict())
    return 0 if summary.ok else EXIT_FAILED


# -- proofs -------------------------------------------------------------------------------


def cmd_proof(args: argparse.Namespace, settings: Settings) -> int:
    from clinic.proofs import export_bundle

    bundle = export_bundle(settings, args.reading)
    text = bundle.model_dump_json(indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text)
    return 0


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    """The proof kit's check (``vitalproof-verify`` says the same), with the local chain as
    the default endpoint when the settings name one."""
    from vitalproof_verify.cli import UnusableInput, check_file

    rpc = args.rpc or settings.chain.rpc_url
    if rpc is None and settings.chain.kind == "anvil":
        from vitalproof.devstack import anvil

        rpc = anvil.rpc_url(settings)
    try:
        verdict = check_file(args.bundle, rpc)
    except UnusableInput as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(verdict.line(), file=sys.stdout if verdict.ok else sys.stderr)
    return 0 if verdict.ok else EXIT_FAILED


# -- lake ---------------------------------------------------------------------------------


def cmd_lake(args: argparse.Namespace, settings: Settings) -> int:
    from vitalproof.cli.lake import lake_compact, lake_read, lake_stats

    if args.action == "stats":
        return lake_stats(settings, as_json=args.json)
    if args.action == "compact":
        return lake_compact(
            settings,
            patient=args.patient,
            before=args.before,
            settle_s=args.settle,
            watch=args.watch,
            every_s=args.every,
            as_json=args.json,
        )
    return lake_read(
        settings,
        patient=args.patient,
        start=args.start,
        end=args.end,
        metrics=args.metric,
        fmt=args.format,
        output=args.output,
    )


# -- ble ----------------------------------------------------------------------------------


def cmd_ble(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.gatt.decode import ble_decode_cli

    code, text = ble_decode_cli(args.uuid, args.hex)
    print(text, file=sys.stdout if code == 0 else sys.stderr)
    return code


# -- parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitalproof",
        description="Wearable vital signs, sealed and anchored so anyone can check them.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stack", help="the local Kafka, Mosquitto and chain")
    s.add_argument(
        "action",
        choices=["up", "down", "status", "fetch"],
        help="up: start what is not running; down: stop all; status; fetch: Kafka's jars",
    )
    s.add_argument(
        "--chain", choices=["embedded", "anvil"], help="with up: also start Anvil (anvil)"
    )
    s.add_argument(
        "--s3",
        action="store_true",
        help="with up: also start SeaweedFS (the lake on S3); with fetch: build its weed",
    )
    s.add_argument("--json", action="store_true", help="status as one JSON object")
    s.set_defaults(handler=cmd_stack)

    t = sub.add_parser("topics", help="create the namespace's Kafka topics, replicated")
    tsub = t.add_subparsers(dest="action", required=True)
    tc = tsub.add_parser("create", help="create the missing ones; existing ones are kept")
    tc.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for leaders (default 60)"
    )
    t.set_defaults(handler=cmd_topics)

    d = sub.add_parser("devices", help="enroll, list and retire devices")
    dsub = d.add_subparsers(dest="action", required=True)
    e = dsub.add_parser("enroll", help="register a device for a patient; prints its password")
    e.add_argument("device_id", help="the device's id (its MQTT login)")
    e.add_argument("patient_id", help="the patient its readings belong to")
    e.add_argument("--json", action="store_true", help="the credential as one JSON object")
    r = dsub.add_parser("retire", help="stop accepting a device's data; its login is removed")
    r.add_argument("device_id", help="the device to retire")
    ls = dsub.add_parser("list", help="every enrolled device, its patient and status")
    ls.add_argument("--json", action="store_true", help="as JSON lines")
    d.set_defaults(handler=cmd_devices)

    w = sub.add_parser("worker", help="run the Faust worker (normalize, seal)")
    w.add_argument("--loglevel", default="warning", help="Faust's log level (default warning)")
    w.set_defaults(handler=cmd_worker)

    c = sub.add_parser("collect", help="run a collector (MQTT by default, or a BLE gateway)")
    c.add_argument(
        "transport", nargs="?", choices=["mqtt", "ble"], default="mqtt", help="default mqtt"
    )
    c.add_argument(
        "--allow", action="append", metavar="ADDRESS=DEVICE_ID", help="BLE allow-list entry"
    )
    c.add_argument(
        "--gateway-id",
        metavar="ID",
        help="this collector's name (VITALPROOF_GATEWAY_ID): its MQTT client id is "
        "vitalproof-collector-ID; give each collector its own, the same across restarts",
    )
    c.add_argument(
        "--leave",
        action="store_true",
        help="retire this collector (MQTT): forward what its session holds, then end it",
    )
    c.add_argument("--duration", type=float, help="stop after this many seconds")
    c.add_argument("--max-messages", type=int, help="stop after this many acked messages")
    c.set_defaults(handler=cmd_collect)

    a = sub.add_parser("anchor", help="anchor the batch log on chain")
    asub = a.add_subparsers(dest="action", required=True)
    ar = asub.add_parser("run", help="append new batches to the log and anchor its head")
    ar.add_argument("--period", type=float, help="seconds between anchors")
    ar.add_argument("--duration", type=float, help="stop after this many seconds")
    ar.add_argument("--once", action="store_true", help="anchor what is new, then exit")
    a.set_defaults(handler=cmd_anchor)

    sm = sub.add_parser("sim", help="run a simulated device fleet over MQTT")
    sm.add_argument("--devices", type=int, default=10, help="simulated devices (default 10)")
    sm.add_argument("--rate", type=float, default=1.0, help="messages per device per second")
    sm.add_argument("--duration", type=float, default=10.0, help="seconds to run (default 10)")
    sm.add_argument("--faults", default="", help="e.g. dup=0.01,reorder=0.01,malformed=0.001")
    sm.add_argument("--record", type=Path, help="write the ground truth as JSON lines")
    sm.add_argument("--accel-hz", type=int, default=0, help="accelerometer sample rate")
    sm.add_argument(
        "--encoding", choices=["json", "binary"], default="json", help="payload encoding"
    )
    sm.set_defaults(handler=cmd_sim)

    dm = sub.add_parser("demo", help="fleet -> collectors -> Kafka -> Faust -> lake -> chain")
    dm.add_argument("--devices", type=int, default=50, help="simulated devices (default 50)")
    dm.add_argument(
        "--duration", type=float, default=60.0, help="seconds the fleet runs (default 60)"
    )
    dm.add_argument(
        "--chain",
        choices=["embedded", "anvil"],
        default="anvil",
        help="anvil (default): the local stack's, whose chain persists in the state folder;"
        " embedded: py-evm in this process, ending with it",
    )
    dm.add_argument("--json", action="store_true", help="last line of stdout: the summary")
    dm.add_argument(
        "--faults", default="", help="fleet faults, e.g. dup=0.01,reorder=0.01,malformed=0.001"
    )
    dm.add_argument(
        "--serve",
        action="store_true",
        help="afterwards keep the fleet streaming and the dashboard up on 127.0.0.1, and print"
        " sign-in links for two clinicians, two patients and an operator (Ctrl-C stops)",
    )
    dm.add_argument(
        "--serve-for", type=float, default=None, help="with --serve: stop after this many seconds"
    )
    dm.add_argument(
        "--port",
        type=int,
        default=None,
        help="with --serve: the dashboard's port (default: a free one)",
    )
    dm.set_defaults(handler=cmd_demo)

    pr = sub.add_parser("proof", help="proof bundles")
    prsub = pr.add_subparsers(dest="action", required=True)
    pe = prsub.add_parser("export", help="write the proof bundle of one sealed reading")
    pe.add_argument("--reading", required=True, help="reading id")
    pe.add_argument("-o", "--output", help="file to write (default: stdout)")
    pr.set_defaults(handler=cmd_proof)

    v = sub.add_parser("verify", help="verify a proof bundle")
    v.add_argument("bundle", help="a proof bundle (JSON) file")
    v.add_argument("--rpc", help="any Ethereum JSON-RPC endpoint")
    v.set_defaults(handler=cmd_verify)

    lk = sub.add_parser("lake", help="read, count and compact the sealed, encrypted lake")
    lksub = lk.add_subparsers(dest="action", required=True)
    lr = lksub.add_parser("read", help="decrypt and export one patient's readings")
    lr.add_argument("--patient", required=True, help="whose readings")
    lr.add_argument("--from", dest="start", help="ISO 8601 time (UTC if no offset)")
    lr.add_argument("--to", dest="end", help="ISO 8601 time, exclusive")
    lr.add_argument("--metric", action="append", help="repeat for several metrics")
    lr.add_argument(
        "--format",
        choices=["csv", "parquet", "json", "fhir", "omh"],
        default="csv",
        help="csv (default), json lines, plain parquet, a FHIR Bundle, Open mHealth",
    )
    lr.add_argument("-o", "--output", help="file to write (default: stdout; parquet needs -o)")
    lst = lksub.add_parser("stats", help="readings, duplicates, batches, patients, bytes")
    lst.add_argument("--json", action="store_true", help="as one JSON object")
    lc = lksub.add_parser(
        "compact", help="merge each patient-day's files into few (crash-safe, online)"
    )
    lc.add_argument("--patient", help="only this patient's files (default: every patient)")
    lc.add_argument("--before", metavar="DATE", help="only UTC days before DATE (YYYY-MM-DD)")
    lc.add_argument(
        "--settle",
        type=float,
        metavar="SECONDS",
        help="only files written at least this long ago (default 0; with --watch 300)",
    )
    lc.add_argument(
        "--watch", action="store_true", help="keep running: a round every --every seconds"
    )
    lc.add_argument(
        "--every", type=float, default=600.0, metavar="SECONDS",
        help="seconds between rounds with --watch (default 600)",
    )  # fmt: skip
    lc.add_argument("--json", action="store_true", help="one JSON object per round")
    lk.set_defaults(handler=cmd_lake)

    consent.add_parser(sub)
    drill.add_parser(sub)
    privacy.add_parser(sub)
    audit.add_parser(sub)
    patients.add_parser(sub)

    b = sub.add_parser("ble", help="BLE tools")
    bsub = b.add_subparsers(dest="action", required=True)
    bd = bsub.add_parser("decode", help="decode one captured GATT characteristic value")
    bd.add_argument("uuid", help="2a37, 0x2A37 or the 128-bit form")
    bd.add_argument("hex", help="the value's bytes in hex")
    b.set_defaults(handler=cmd_ble)

    from vitalproof.cli import namespaces, serve

    serve.register(sub)
    namespaces.register(sub)
    for parser in (pe, lr, lst, lc):
        namespaces.add_option(parser)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        from vitalproof.cli.namespaces import with_namespace

        settings = with_namespace(Settings(), getattr(args, "namespace", None))
        crashpoints.arm(settings.runtime.crash_at)
        hashing.configure(native=settings.runtime.native)
        handler: Handler = args.handler
        return handler(args, settings)
    except UsageError as e:
        print(f"error: {e.diagnostics()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except VitalproofError as e:
        # The first line says what failed; any further lines (why, what to do) follow it.
        print(f"error: {e.diagnostics()}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` that stopped reading: end quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
