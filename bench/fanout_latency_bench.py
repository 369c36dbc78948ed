"""Fan-out latency at rising rates: from the produce of a clean reading to ``vitals.clean`` to
its arrival on a clinician's WebSocket, through the real Kafka and `vitalproof serve`.

    .venv/bin/python bench/fanout_latency_bench.py [--rates 1000,5000,20000] [--seconds 15]
        [--subscribers 20] [--patients 100] [--per-bundle 20] [--no-compression] [--json]

Starts its own Kafka (free ports, tmp home) and the service as deployed (its own process);
grants each of ``--subscribers`` clinicians all vital signs of ``--patients / --subscribers``
patients (every patient is some clinician's), subscribes each to "every patient who
consented to me" and connects it over WebSocket from this process. Then, for each rate, this
process produces clean bundles of ``--per-bundle`` readings (patients round robin, keyed by
patient as the worker does) at that many readings per second for ``--seconds``; each
bundle's receive time is the moment it is handed to the producer, so a reading's latency is
its arrival on a socket minus that: the producer's batching, Kafka's commit (acks=all), the
service's poll, consent check and numbering, its JSON and the socket. No worker, no MQTT:
this isolates the fan-out (bench/clinic_latency_bench.py measures from the device's MQTT
publish). Everything shares the 2 cores: Kafka, the service, the producer, the sockets.
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import websockets
from aiokafka import AIOKafkaProducer
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clinic_latency_bench import percentile, wait_fanout_ready
from streams_bench import local_stack

from clinic.auth import DevIssuer
from clinic.consent import ALL_VITALS
from clinic.consent_store import ConsentStore
from clinic.service.context import clinic_dir
from vitalproof.cli import processes
from vitalproof.devstack import ensure_topics
from vitalproof.devstack.procs import free_ports
from vitalproof.schema import SampleBatch, Transport
from vitalproof.settings import Settings
from vitalproof.wire import clean

console = Console(stderr=True)
WARMUP_S = 2.0


def bundle(patient: str, k: int, n: int, now_us: int) -> bytes:
    b = SampleBatch(
        device_id=f"dev-{patient}", patient_id=patient, gateway_id="bench",
        transport=Transport.MQTT, receive_time_us=now_us,
    )  # fmt: skip
    for i in range(n):
        b.add("heart_rate", "/min", now_us - (n - i) * 1000, k * n + i, 60.0 + i % 9)
    b.fill_reading_ids()
    return clean.encode_bundle([b])


async def produce_at(
    settings: Settings, patients: list[str], rate: int, seconds: float, per_bundle: int
) -> tuple[int, float]:
    """Produce ``rate`` readings/s for ``seconds``, paced every 10 ms; (readings, seconds)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all", linger_ms=2)
    await producer.start()
    sent = k = 0
    started = time.monotonic()
    try:
        while (elapsed := time.monotonic() - started) < seconds:
            due = int(elapsed * rate) - sent
            for _ in range(max(0, due) // per_bundle):
                patient = patients[k % len(patients)]
                value = bundle(patient, k, per_bundle, int(time.time() * 1e6))
                await producer.send(settings.kafka.topic_clean, value, key=patient.encode())
                sent += per_bundle
                k += 1
            await asyncio.sleep(0.01)
        await producer.flush()
    finally:
        await producer.stop()
    return sent, time.monotonic() - started


async def run(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    home = settings.paths.home
    ensure_topics(settings, settings.kafka.pipeline_topics, settings.kafka.partitions)
    patients = [f"pt-{i:04d}" for i in range(args.patients)]
    clinicians = [f"Practitioner/bench-{c:03d}" for c in range(args.subscribers)]
    issuer = DevIssuer(clinic_dir(settings))
    with ConsentStore(settings.paths.consent_path) as store:
        for i, patient in enumerate(patients):
            store.grant(
                patient_id=patient, grantee=clinicians[i % len(clinicians)],
                metrics=frozenset({ALL_VITALS}), purpose="TREAT", actor="bench",
            )  # fmt: skip
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    log = home / "logs" / "serve.log"
    serve = processes.start(settings, "serve", "--port", str(port), log=log)
    arrivals: list[list[float]] = []  # per rate: latency of each delivery, ms
    received = [0]
    results: list[dict[str, Any]] = []
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            await wait_fanout_ready(client, url, log)
            tokens = [issuer.issue(who, "clinician", ["user/Observation.rs"]) for who in clinicians]
            subs = []
            for token in tokens:
                r = await client.post(
                    url + "/fhir/Subscription",
                    json={"patients": None, "metrics": None},
                    headers={"Authorization": f"Bearer {token}"},
                )
                r.raise_for_status()
                subs.append(r.json()["id"])
        measuring = {"from_us": 2**63}

        async def watch(k: int) -> None:
            uri = url.replace("http", "ws", 1) + f"/stream/ws/{subs[k]}?access_token={tokens[k]}"
            compression = None if args.no_compression else "deflate"
            async with websockets.connect(
                uri, max_size=None, open_timeout=60, compression=compression
            ) as ws:
                async for text in ws:
                    now_us = time.time() * 1e6
                    for entry in json.loads(text)["entry"][1:]:
                        received[0] += 1
                        rx = entry["resource"]["received_us"]
                        if rx >= measuring["from_us"] and arrivals:
                            arrivals[-1].append((now_us - rx) / 1000.0)

        watchers = [asyncio.create_task(watch(k)) for k in range(len(clinicians))]
        await asyncio.sleep(2.0)
        for rate in args.rates:
            arrivals.append([])
            measuring["from_us"] = int((time.time() + WARMUP_S) * 1e6)
            before = received[0]
            with console.status(f"{rate:,} readings/s for {args.seconds:g} s"):
                sent, took = await produce_at(
                    settings, patients, rate, args.seconds, args.per_bundle
                )
                await asyncio.sleep(3.0)  # the tail (what is later counts as not arrived)
            lat = arrivals[-1]
            results.append(
                {
                    "rate_asked": rate,
                    "readings_per_s_produced": round(sent / took),
                    "deliveries": received[0] - before,
                    "not_arrived_3s_after": sent - (received[0] - before),
                    "latency_ms_p50": round(percentile(lat, 0.50), 1),
                    "latency_ms_p90": round(percentile(lat, 0.90), 1),
                    "latency_ms_p99": round(percentile(lat, 0.99), 1),
                    "latency_ms_max": round(max(lat, default=float("nan")), 1),
                }
            )
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    finally:
        processes.stop(serve)
    return {
        "subscribers": len(clinicians),
        "patients": len(patients),
        "compression": not args.no_compression,
        "runs": results,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="1000,5000,20000", help="readings/s, comma-separated")
    p.add_argument("--seconds", type=float, default=15.0, help="how long each rate runs")
    p.add_argument("--subscribers", type=int, default=20, help="clinicians connected at once")
    p.add_argument("--patients", type=int, default=100)
    p.add_argument("--per-bundle", type=int, default=20, help="readings per clean record")
    p.add_argument(
        "--no-compression", action="store_true", help="no permessage-deflate on the sockets"
    )
    p.add_argument("--json", action="store_true", help="only the JSON line on stdout")
    args = p.parse_args()
    try:
        args.rates = [int(r) for r in args.rates.split(",")]
    except ValueError:
        p.error(f"--rates {args.rates}: integers, comma-separated")
    if args.subscribers < 1 or args.patients < args.subscribers:
        p.error("--subscribers: at least 1, and no more than --patients")
    with tempfile.TemporaryDirectory(prefix="vp-fanout-") as tmp, local_stack(Path(tmp)) as s:
        out = asyncio.run(run(s, args))
    if not args.json:
        table = Table(title="produce to vitals.clean -> clinician's WebSocket")
        for col in out["runs"][0]:
            table.add_column(col.replace("_", " "), justify="right")
        for r in out["runs"]:
            table.add_row(*(f"{v:,}" if isinstance(v, int) else str(v) for v in r.values()))
        console.print(table)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
