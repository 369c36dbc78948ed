"""From a device's MQTT publish to a clinician's screen: latency through the whole pipeline
with many clinicians connected at once.

    .venv/bin/python bench/clinic_latency_bench.py [--devices 100] [--rate 1] [--accel-hz 0]
        [--subscribers 1000] [--seconds 60] [--json]

Starts its own stack (Kafka, Mosquitto on free ports, tmp home), a worker, an MQTT collector
and `vitalproof serve`, exactly as deployed, each its own process; grants each of
``--subscribers`` clinicians all vital signs of one patient (round robin over the devices'
patients), subscribes each to "every patient who consented to me" and connects it over
WebSocket from this process; then runs the fleet (`vitalproof sim`, its own process). The
latency of a reading is its arrival on a subscriber's socket minus the moment the collector
received the device's MQTT publish (its receive time stamp; the broker is on the same host, so
that is the publish plus well under a millisecond); beside it, the same from the sample's own
device time, which adds the device's batching (a 1 Hz message carries the last second).
Reported: p50, p90, p99 and max over every delivery after a warm-up, deliveries per second,
and how many subscribers got nothing. The last line of stdout is one JSON object.
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
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streams_bench import local_stack

from clinic.auth import DevIssuer
from clinic.consent import ALL_VITALS
from clinic.consent_store import ConsentStore
from clinic.service.context import clinic_dir
from vitalproof.cli import processes
from vitalproof.devstack import ensure_topics
from vitalproof.devstack.procs import free_ports
from vitalproof.settings import Settings

console = Console(stderr=True)
WARMUP_S = 5.0


async def wait_fanout_ready(client: httpx.AsyncClient, url: str, log: Path) -> None:
    """Until the service at ``url`` says its fan-out reads Kafka (90 s at most)."""
    deadline = time.monotonic() + 90
    while True:
        try:
            if (await client.get(url + "/status")).json()["fanout"] == "ready":
                return
        except (httpx.TransportError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the service never got ready: see {log}")
        await asyncio.sleep(0.3)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    home = settings.paths.home
    ensure_topics(settings, settings.kafka.pipeline_topics, settings.kafka.partitions)
    patients = [f"pt-sim-{i:05d}" for i in range(args.devices)]  # what `sim` enrolls
    issuer = DevIssuer(clinic_dir(settings))
    clinicians = [f"Practitioner/bench-{c:04d}" for c in range(args.subscribers)]
    with ConsentStore(settings.paths.consent_path) as store:
        for c, who in enumerate(clinicians):
            store.grant(
                patient_id=patients[c % len(patients)],
                grantee=who,
                metrics=frozenset({ALL_VITALS}),
                purpose="TREAT",
                actor="bench",
            )
    logs = home / "logs"
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    procs = [
        processes.start(settings, "worker", log=logs / "worker.log"),
        processes.start(settings, "collect", log=logs / "collect.log"),
        processes.start(settings, "serve", "--port", str(port), log=logs / "serve.log"),
    ]
    latencies: list[float] = []  # from the collector's receipt of the publish
    since_sample: list[float] = []  # from the sample's device time (includes device batching)
    received = [0] * len(clinicians)
    measuring = {"from_us": 0}
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            await wait_fanout_ready(client, url, logs / "serve.log")
            tokens = [issuer.issue(who, "clinician", ["user/Observation.rs"]) for who in clinicians]
            subs = []
            with console.status(f"subscribing {len(clinicians)} clinicians"):
                for token in tokens:
                    r = await client.post(
                        url + "/fhir/Subscription",
                        json={"patients": None, "metrics": None},
                        headers={"Authorization": f"Bearer {token}"},
                    )
                    r.raise_for_status()
                    subs.append(r.json()["id"])

        async def watch(k: int) -> None:
            uri = url.replace("http", "ws", 1) + f"/stream/ws/{subs[k]}?access_token={tokens[k]}"
            async with websockets.connect(uri, max_size=None, open_timeout=60) as ws:
                async for text in ws:
                    now_us = time.time() * 1e6
                    for entry in json.loads(text)["entry"][1:]:
                        received[k] += 1
                        reading = entry["resource"]
                        t_us = reading["t_us"]
                        if t_us >= measuring["from_us"]:
                            since_sample.append((now_us - t_us) / 1000.0)
                            latencies.append((now_us - reading["received_us"]) / 1000.0)

        with console.status("connecting the subscribers"):
            watchers = [asyncio.create_task(watch(k)) for k in range(len(clinicians))]
            await asyncio.sleep(2.0 + len(clinicians) / 500)
        measuring["from_us"] = int((time.time() + WARMUP_S) * 1e6)
        sim = processes.start(
            settings, "sim", "--devices", str(args.devices), "--rate", str(args.rate),
            "--duration", str(args.seconds), "--accel-hz", str(args.accel_hz),
            log=logs / "sim.log",
        )  # fmt: skip
        started = time.monotonic()
        with console.status(f"fleet running for {args.seconds:g} s"):
            await asyncio.to_thread(sim.wait)
        fleet_s = time.monotonic() - started
        await asyncio.sleep(5.0)  # the tail through the pipeline
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        async with httpx.AsyncClient(timeout=30) as client:
            status = (await client.get(url + "/status")).json()
    finally:
        for p in procs:
            processes.stop(p)
    deliveries = sum(received)
    return {
        "devices": args.devices,
        "subscribers": len(clinicians),
        "fleet_seconds": round(fleet_s, 1),
        "deliveries": deliveries,
        "deliveries_per_s": round(deliveries / max(fleet_s, 1e-9)),
        "service_delivered": status.get("readings_delivered"),
        "latency_ms_p50": round(percentile(latencies, 0.50), 1),
        "latency_ms_p90": round(percentile(latencies, 0.90), 1),
        "latency_ms_p99": round(percentile(latencies, 0.99), 1),
        "latency_ms_max": round(max(latencies, default=float("nan")), 1),
        "since_sample_ms_p50": round(percentile(since_sample, 0.50), 1),
        "since_sample_ms_p99": round(percentile(since_sample, 0.99), 1),
        "measured_deliveries": len(latencies),
        "subscribers_that_got_nothing": sum(1 for n in received if n == 0),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=100, help="simulated devices (one patient each)")
    p.add_argument("--rate", type=float, default=1.0, help="messages per device per second")
    p.add_argument("--accel-hz", type=int, default=0, help="accelerometer rate of each device")
    p.add_argument("--subscribers", type=int, default=1000, help="clinicians connected at once")
    p.add_argument("--seconds", type=float, default=60.0, help="how long the fleet runs")
    p.add_argument("--json", action="store_true", help="only the JSON line on stdout")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="vp-latency-") as tmp, local_stack(Path(tmp)) as s:
        out = asyncio.run(run(s, args))
    table = Table(title="device publish -> clinician's WebSocket")
    table.add_column("measure")
    table.add_column("result", justify="right")
    for key, value in out.items():
        table.add_row(key.replace("_", " "), f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
