"""Coverage-guided fuzzing (atheris, libFuzzer) of every reader of outside bytes.

    .venv/bin/python bench/fuzz.py TARGET [--runs 1000000] [--max-len 4096]
    .venv/bin/python bench/fuzz.py all --runs 1000000      # every target, one after the other

Targets: ``gatt`` (the GATT characteristic parsers), ``binary`` (the binary device payload),
``json`` (the JSON device payload), ``clean`` (vitals.clean records), ``mqtt`` (the
hand-written MQTT v5 PUBLISH reader), ``bundle`` (proof-bundle loading and the offline check),
``consent`` (FHIR Consent import). Each is seeded with valid inputs built by the code that
writes them (and the frozen v1 bundle). The rule checked: a reader either returns or raises
the project's root error (:class:`vitalproof.errors.VitalproofError`) with its reason;
anything else (another exception, a hang past ``-timeout``, a crash) is a finding, written
by libFuzzer as ``crash-*``/``timeout-*`` into ``--artifacts`` and reported with exit 1.
The last line of stdout is one JSON object per target: runs, seconds, execs/s, findings.
``tests/test_fuzz_smoke.py`` runs each target briefly in CI; the 1M-input runs are in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("gatt", "binary", "json", "clean", "mqtt", "bundle", "consent")


def _target(name: str) -> tuple[Callable[[bytes], None], list[bytes]]:
    """The function under test and its seeds (imported under atheris' instrumentation)."""
    from vitalproof.errors import VitalproofError
    from vitalproof.schema import CONTENT_TYPE_JSON, SampleBatch, Transport

    def sample(pipeline: bool = True) -> SampleBatch:
        """A batch as a device sends it, or (``pipeline``) as the pipeline carries it."""
        b = SampleBatch(device_id="dev-1")
        t0 = 1_800_000_000_000_000
        for i in range(6):
            b.add("heart_rate", "/min", t0 + i * 1_000_000, i, 60.0 + i)
            b.add("spo2", "%", t0 + i * 1_000_000, 100 + i, 97.0)
        if pipeline:
            b.patient_id, b.transport, b.receive_time_us = "pt-1", Transport.MQTT, t0
        return b

    if name == "gatt":
        from ingest.gatt.decode import decode
        from ingest.gatt.parsers import PARSERS

        uuids = sorted(PARSERS)

        def gatt(data: bytes) -> None:
            if data:
                decode(f"{uuids[data[0] % len(uuids)]:04x}", data[1:])

        seeds = [bytes([k]) + bytes(n) for k in range(len(uuids)) for n in (1, 2, 4, 9, 17)]
        seeds.append(bytes([uuids.index(0x2A37)]) + bytes.fromhex("1048030403"))
        return _guard(gatt, VitalproofError), seeds
    if name == "binary":
        from vitalproof.wire import binary

        return _guard(lambda d: binary.decode(d, device_id="dev-1"), VitalproofError), [
            binary.encode(sample(pipeline=False)),
            binary.encode(sample(pipeline=False), float32=True),
        ]
    if name == "json":
        from vitalproof.wire.codecs import decode_samples

        return _guard(lambda d: decode_samples(CONTENT_TYPE_JSON, d, "dev-1"), VitalproofError), [
            sample(pipeline=False).to_json(),
            b'{"schema": 1, "series": []}',
        ]
    if name == "clean":
        from vitalproof.wire import clean

        batch = sample()
        batch.fill_reading_ids()
        return _guard(clean.decode_record, VitalproofError), [
            clean.encode_bundle([batch]),
            clean.encode_bundle([batch, batch]),
        ]
    if name == "mqtt":
        from ingest.mqtt.client import decode_publish_v5

        topic = b"devices/dev-1/vitals"
        ctype = b"application/vnd.vitalproof.samples+json;v=1"
        props = b"\x03" + len(ctype).to_bytes(2, "big") + ctype
        body = len(topic).to_bytes(2, "big") + topic + b"\x00\x07" + bytes([len(props)]) + props
        return _guard(decode_publish_v5, VitalproofError), [body + b'{"schema":1}', body]
    if name == "bundle":
        from vitalproof_verify.bundle import load_bundle, verify_offline

        def check(data: bytes) -> None:
            verify_offline(load_bundle(data))

        frozen = (REPO / "tests" / "data" / "bundle-v1-75a88b5.json").read_bytes()
        return _guard(check, VitalproofError), [frozen]
    if name == "consent":
        from clinic.consent import ConsentStatus, Grant
        from clinic.fhir_consent import consent_to_fhir, grant_from_fhir

        grant = Grant(
            grant_id="g-1", version=1, patient_id="pt-1", grantee="Practitioner/dr-a",
            metrics=frozenset({"heart_rate"}), purpose="TREAT", start_us=0, end_us=None,
            status=ConsentStatus.ACTIVE, recorded_us=0, recorded_by="Patient/pt-1",
        )  # fmt: skip
        return _guard(grant_from_fhir, VitalproofError), [
            json.dumps(consent_to_fhir(grant)).encode()
        ]
    raise SystemExit(f"unknown target {name!r} (one of {', '.join(TARGETS)})")


def _guard(fn: Callable[[bytes], object], allowed: type[Exception]) -> Callable[[bytes], None]:
    def run(data: bytes) -> None:
        # A clear, specific refusal is what every reader must do with bad bytes.
        with contextlib.suppress(allowed):
            fn(data)

    return run


def fuzz_in_process(name: str, runs: int, max_len: int, corpus: Path, artifacts: Path) -> None:
    """Run by the child (``--child``): libFuzzer exits the process when done."""
    import atheris

    with atheris.instrument_imports():
        target, seeds = _target(name)
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(seed)
    artifacts.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.argv[0],
        str(corpus),
        f"-runs={runs}",
        f"-max_len={max_len}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={artifacts}/{name}-",
        "-print_final_stats=1",
    ]
    atheris.Setup(argv, target)
    atheris.Fuzz()


def run_target(name: str, runs: int, max_len: int, artifacts: Path) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, __file__, name, "--child", "--runs", str(runs),
             "--max-len", str(max_len), "--corpus", str(Path(tmp) / "corpus"),
             "--artifacts", str(artifacts)],
            capture_output=True,
            text=True,
        )  # fmt: skip
        seconds = time.monotonic() - started
    findings = sorted(p.name for p in artifacts.glob(f"{name}-*"))
    out: dict[str, object] = {
        "target": name,
        "runs": runs,
        "seconds": round(seconds, 1),
        "execs_per_s": round(runs / seconds) if seconds else None,
        "findings": findings,
        "ok": proc.returncode == 0 and not findings,
    }
    if not out["ok"]:
        out["log_tail"] = proc.stderr[-2000:]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", choices=[*TARGETS, "all"], help="what to fuzz")
    p.add_argument("--runs", type=int, default=1_000_000, help="inputs to try per target")
    p.add_argument("--max-len", type=int, default=4096, help="longest input, bytes")
    p.add_argument(
        "--artifacts", type=Path, default=Path("fuzz-findings"), help="where findings go"
    )
    p.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        fuzz_in_process(args.target, args.runs, args.max_len, args.corpus, args.artifacts)
        return 0
    names = TARGETS if args.target == "all" else (args.target,)
    results = []
    for name in names:
        result = run_target(name, args.runs, args.max_len, args.artifacts.resolve())
        results.append(result)
        print(json.dumps(result), file=sys.stderr)
    print(json.dumps(results))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
