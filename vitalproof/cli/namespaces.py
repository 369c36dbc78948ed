"""Namespaces: every run of the pipeline (the demo's, a test's, a deployment's) keeps its
topics, lake and anchor log under one name, its topic prefix. ``--namespace NS`` points the
commands that read pipeline data at one; ``vitalproof namespaces`` lists those holding data.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from vitalproof.errors import UsageError
from vitalproof.registry import is_valid_id
from vitalproof.settings import Settings

DEFAULT = "default"
HELP = "the namespace to read (a run's topic prefix without the dot; `vitalproof namespaces`)"


def add_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", metavar="NS", help=HELP)


def with_namespace(settings: Settings, namespace: str | None) -> Settings:
    """``settings`` for namespace ``namespace`` (None: as they are)."""
    if namespace is None:
        return settings
    if namespace != DEFAULT and not is_valid_id(namespace):
        raise UsageError(f"--namespace {namespace!r}: letters, digits, '-', '_', '.' only")
    prefix = "" if namespace == DEFAULT else f"{namespace}."
    return settings.evolve(kafka={"topic_prefix": prefix})


@dataclass(frozen=True)
class NamespaceSummary:
    namespace: str
    batches: int
    readings: int
    patients: int
    newest: float  # modification time of its newest manifest (seconds since the epoch)


def list_namespaces(settings: Settings) -> list[NamespaceSummary]:
    """Namespaces with sealed batches in this home, newest first (from the manifests: no
    key is needed and nothing is decrypted)."""
    from streams.lake.storage import open_lake_base
    from vitalproof.manifest import BatchManifest

    base = open_lake_base(settings)  # <home>/lake, or VITALPROOF_LAKE's folder or S3 prefix
    out = []
    for namespace in base.folders():
        batches = base.child(f"{namespace}/_batches")
        manifests = batches.names(".json")
        if not manifests:
            continue
        rows, patients, newest = 0, set(), 0.0
        for name in manifests:
            try:
                m = BatchManifest.model_validate_json(batches.read(name) or b"")
            except ValueError:
                continue
            rows += m.rows
            patients.update(m.patients)
            mtime = batches.fs.get_file_info(batches.path(name)).mtime
            newest = max(newest, mtime.timestamp() if mtime else 0.0)
        out.append(NamespaceSummary(namespace, len(manifests), rows, len(patients), newest))
    return sorted(out, key=lambda n: -n.newest)


def cmd_namespaces(args: argparse.Namespace, settings: Settings) -> int:
    import datetime as dt

    found = list_namespaces(settings)
    if args.json:
        print(json.dumps([asdict(n) for n in found], separators=(",", ":")))
        return 0
    if not found:
        print(f"no namespace holds sealed data under {settings.lake_base}")
        return 0
    for n in found:
        when = dt.datetime.fromtimestamp(n.newest, dt.UTC).isoformat(timespec="seconds")
        print(
            f"{n.namespace:<24} {n.readings:>10,} readings {n.patients:>5} patients "
            f"{n.batches:>5} batches, newest {when.replace('+00:00', 'Z')}"
        )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ns = sub.add_parser("namespaces", help="the namespaces holding data, newest first")
    ns.add_argument("--json", action="store_true", help="as one JSON list")
    ns.set_defaults(handler=cmd_namespaces)
