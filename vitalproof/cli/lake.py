"""`vitalproof lake read|stats|compact`: the lake for people and scripts.

``read`` decrypts one patient's files with the local keystore and exports them through
:mod:`streams.lake.export`; ``stats`` counts the whole lake; ``compact`` merges each
patient-day's files (:mod:`streams.lake.compact`), once or, with ``--watch``, every
``--every`` seconds as its own small process. ``read`` and ``stats`` are read-only: they
never create a keystore (opening :class:`LocalKeystore` on a missing folder would mint a new
master key that decrypts nothing and then sits next to the lake as if it belonged to it).

Exit codes follow :mod:`vitalproof.cli`: 0 done, 1 failed (unknown patient, missing keys,
undecryptable file), 2 malformed input (bad time, unknown metric, parquet without ``-o``).
Errors are one ``error: ...`` line on stderr. Progress and skip counts go to stderr so
stdout carries only the export.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from streams import lake
from streams.lake import export
from streams.lake.keystore import MASTER_KEY_FILE, LocalKeystore
from streams.lake.layout import _check_name
from vitalproof.errors import UsageError
from vitalproof.settings import Settings
from vitalproof.units import Metric

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

FORMATS = ("csv", "parquet", "json", "fhir", "omh")
STATS_KEYS = (
    "readings",
    "distinct_reading_ids",
    "duplicates",
    "batches",
    "patients",
    "bytes_on_disk",
    "files",
    "unreadable_files",
)


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def parse_time(text: str, option: str) -> dt.datetime:
    """ISO 8601 -> aware UTC datetime; a time without offset is UTC (what the lake stores)."""
    try:
        t = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"{option} {text!r} is not an ISO 8601 time (e.g. 2024-11-21T14:40:00Z)"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC)


def parse_metrics(names: Sequence[str] | None) -> list[str] | None:
    """Validated metric names (``--metric`` may repeat or hold a comma list)."""
    if not names:
        return None
    known = {m.value for m in Metric}
    out: list[str] = []
    for item in names:
        for name in (n.strip() for n in item.split(",")):
            if name not in known:
                raise UsageError(f"unknown metric {name!r} (known: {', '.join(sorted(known))})")
            out.append(name)
    return out


def _keystore(settings: Settings) -> LocalKeystore | None:
    """The existing keystore, or None: reading must never create keys."""
    if not (settings.paths.keys_dir / MASTER_KEY_FILE).exists():
        return None
    return LocalKeystore(settings.paths.keys_dir)


@contextlib.contextmanager
def _sink(output: str | None) -> Iterator[BinaryIO]:
    """stdout, or a file published atomically (temp + rename) so a failure leaves nothing."""
    if output is None or output == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    final = Path(output)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            yield f
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def lake_read(
    settings: Settings,
    *,
    patient: str,
    start: str | None = None,
    end: str | None = None,
    metrics: Sequence[str] | None = None,
    fmt: str = "csv",
    output: str | None = None,
) -> int:
    """Decrypt one patient's readings in [start, end) and export them in ``fmt``.

    Formats: csv, json (JSON lines), parquet (plaintext file, needs ``-o``), fhir (one FHIR
    R4 Bundle of type collection), omh (Open mHealth data points, one per line).
    """
    try:
        lo = None if start is None else parse_time(start, "--from")
        hi = None if end is None else parse_time(end, "--to")
        if lo is not None and hi is not None and lo >= hi:
            raise UsageError(f"--from {lo.isoformat()} is not before --to {hi.isoformat()}")
        wanted = parse_metrics(metrics)
        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
        if fmt == "parquet" and (output is None or output == "-"):
            raise UsageError("--format parquet writes a file: give -o PATH")
        kms = _keystore(settings)  # it names the patient's folder (their pseudonym)
        try:
            root = lake.open_lake(settings)
            sealed = lake.sealed_batch_ids(root)
            files = []
            if kms is not None:
                files = lake.list_patient_files(root, patient, kms=kms, batches=sealed)
        except lake.LakeError as e:
            raise UsageError(str(e)) from None
    except UsageError as e:
        _error(str(e))
        return EXIT_BAD_INPUT

    if kms is None and root.files():
        _error(f"no keystore at {settings.paths.keys_dir}: cannot decrypt (check VITALPROOF_HOME)")
        return EXIT_FAILED
    if not files or kms is None:
        # The folder is the keystore's pseudonym of the id: another keystore finds nothing.
        hint = "" if kms is None else f" under keys {kms.dir} (this lake's keystore?)"
        _error(f"unknown patient {patient!r}: no files in {root}{hint}")
        return EXIT_FAILED

    table = lake.read_patient(root, patient, kms, lo, hi, wanted, batches=sealed)
    skipped = export.Skipped()
    with _sink(output) as sink:
        if fmt == "csv":
            n = export.write_csv(table, sink)
        elif fmt == "json":
            n = export.write_jsonl(table, sink)
        elif fmt == "parquet":
            n = export.write_parquet(table, sink)
        elif fmt == "fhir":
            bundle, skipped = export.fhir_bundle(table)
            sink.write(json.dumps(bundle, separators=(",", ":")).encode() + b"\n")
            n = len(bundle["entry"])
        else:
            points, skipped = export.omh_data_points(table)
            for p in points:
                sink.write(json.dumps(p, separators=(",", ":")).encode() + b"\n")
            n = len(points)
    what = {"fhir": "observations", "omh": "data points"}.get(fmt, "rows")
    where = f" to {output}" if output not in (None, "-") else ""
    source = f" from {table.num_rows} rows" if fmt in ("fhir", "omh") else ""
    print(f"{n} {what}{source} of patient {patient} ({fmt}){where}", file=sys.stderr)
    if skipped:
        print(f"skipped {skipped.describe()}", file=sys.stderr)
    if fmt == "parquet":
        print("warning: the parquet file is NOT encrypted: plaintext health data", file=sys.stderr)
    return 0


def _patients(root: lake.LakeRoot, kms: LocalKeystore) -> list[dict[str, object]]:
    """Each patient's readings and first and last device time (ISO 8601, UTC)."""

    def iso(us: int | None) -> str | None:
        if us is None:
            return None
        t = dt.datetime.fromtimestamp(us / 1e6, dt.UTC)
        return t.isoformat(timespec="seconds").replace("+00:00", "Z")

    rows = lake.patient_summaries(root, kms, batches=lake.sealed_batch_ids(root))
    return [
        {
            "patient_id": r["patient_id"],  # None: erased (the lake names them by pseudonym)
            "readings": r["readings"],
            "first": iso(r["first_us"]),
            "last": iso(r["last_us"]),
        }
        for r in rows
    ]


def _point_at_namespaces(settings: Settings) -> None:
    """An empty namespace: say which ones hold data (a demo writes into its own)."""
    from vitalproof.cli.namespaces import list_namespaces

    others = [n for n in list_namespaces(settings) if n.namespace != settings.namespace]
    if others:
        names = ", ".join(f"{n.namespace} ({n.readings:,} readings)" for n in others[:5])
        print(
            f"namespace {settings.namespace} holds no readings; these do: {names}"
            " (read one with --namespace NS; all: vitalproof namespaces)",
            file=sys.stderr,
        )


def lake_stats(settings: Settings, *, as_json: bool = False) -> int:
    """Counts over the whole lake (this namespace): one JSON object with ``--json``."""
    try:
        root = lake.open_lake(settings)
        has_files = bool(root.files())
    except (lake.LakeError, OSError) as e:
        _error(f"cannot list the lake {settings.lake_uri}: {e}")
        return EXIT_FAILED
    kms = _keystore(settings)
    if has_files and kms is None:
        _error(f"no keystore at {settings.paths.keys_dir}: cannot decrypt (check VITALPROOF_HOME)")
        return EXIT_FAILED
    # no files and no keystore: an empty lake, counted without creating keys
    stats = (
        dict.fromkeys(STATS_KEYS, 0)
        if kms is None
        else lake.lake_stats(root, kms, batches=lake.sealed_batch_ids(root))
    )
    out = {k: stats[k] for k in STATS_KEYS}
    if as_json:
        patients = [] if kms is None else _patients(root, kms)
        doc = {**out, "lake": str(root), "namespace": settings.namespace, "by_patient": patients}
        print(json.dumps(doc, separators=(",", ":")))
    else:
        print(f"lake {root} (namespace {settings.namespace})")
        for k, v in out.items():
            print(f"  {k.replace('_', ' '):<22} {v:>14,}")
    if not out["readings"]:
        _point_at_namespaces(settings)
    if stats.get("unreadable_files"):
        print(
            f"warning: {stats['unreadable_files']} files cannot be decrypted (erased or "
            f"unknown keys); their readings are not counted",
            file=sys.stderr,
        )
    return 0


def parse_date(text: str) -> str:
    """``--before``: a UTC date, ``YYYY-MM-DD``."""
    try:
        return dt.date.fromisoformat(text.strip()).isoformat()
    except ValueError:
        raise UsageError(f"--before {text!r} is not a date (YYYY-MM-DD, UTC)") from None


def _compact_line(report: lake.CompactReport) -> str:
    if not report.groups:
        return "nothing to compact"
    return (
        f"compacted {report.groups} patient-days: {report.files_in:,} files -> "
        f"{report.files_out:,} ({report.rows:,} rows, {report.bytes_in:,} -> "
        f"{report.bytes_out:,} bytes) in {report.seconds:.2f} s"
    )


def lake_compact(
    settings: Settings,
    *,
    patient: str | None = None,
    before: str | None = None,
    settle_s: float | None = None,
    watch: bool = False,
    every_s: float = 600.0,
    as_json: bool = False,
    rounds: int | None = None,
) -> int:
    """Merge each patient-day's files; with ``watch``, again every ``every_s`` seconds.

    Once: every sealed file counts (``settle_s`` 0) unless ``--settle`` says otherwise;
    watching, only files older than ``settle_s`` (default 300 s), so the sealer's newest
    files are merged in a few large steps. SIGTERM or SIGINT end the loop between rounds
    (a round killed mid-way is finished by the next run: the compaction is crash-safe).
    ``rounds``: stop after that many (tests).
    """
    if every_s <= 0:
        _error(f"--every {every_s:g}: must be > 0 seconds")
        return EXIT_BAD_INPUT
    if settle_s is not None and settle_s < 0:
        _error(f"--settle {settle_s:g}: must be >= 0 seconds")
        return EXIT_BAD_INPUT
    try:
        day = None if before is None else parse_date(before)
        if patient is not None:
            _check_name(patient, "patient id")
    except (UsageError, lake.LakeError) as e:
        _error(str(e))
        return EXIT_BAD_INPUT
    settle = settle_s if settle_s is not None else (300.0 if watch else 0.0)
    _flag = [False]

    def _stop(_sig: int, _frame: object) -> None:
        _flag[0] = True

    if not watch:
        return _compact_rounds(settings, patient, day, settle, False, every_s, as_json, 1, _flag)
    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _compact_rounds(
            settings, patient, day, settle, True, every_s, as_json, rounds, _flag
        )
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _compact_rounds(
    settings: Settings,
    patient: str | None,
    day: str | None,
    settle: float,
    watch: bool,
    every_s: float,
    as_json: bool,
    rounds: int | None,
    stopped: list[bool],
) -> int:
    """The rounds of :func:`lake_compact` (``stopped[0]``: a signal asked to stop)."""
    root = settings.lake_dir
    done = 0
    while True:
        kms = _keystore(settings)
        if kms is None:
            if not watch:
                _error(f"no keystore at {settings.paths.keys_dir}: nothing sealed to compact")
                return EXIT_FAILED
            report = lake.CompactReport()
        else:
            try:
                report = lake.compact_lake(
                    root, kms, patient_id=patient, before=day, settle_s=settle
                )
            except lake.CompactionBusy as e:
                if not watch:
                    raise
                print(f"{e}; next round in {every_s:g} s", file=sys.stderr)
                report = lake.CompactReport()
        if as_json:
            print(json.dumps(report.to_json_dict(), separators=(",", ":")), flush=True)
        else:
            print(_compact_line(report), file=sys.stderr if watch else sys.stdout, flush=True)
        done += 1
        if not watch or stopped[0] or (rounds is not None and done >= rounds):
            return 0
        deadline = time.monotonic() + every_s
        while not stopped[0] and time.monotonic() < deadline:
            time.sleep(min(0.2, every_s))
        if stopped[0]:
            return 0
