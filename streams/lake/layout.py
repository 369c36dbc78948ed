"""Where the lake puts things: folder and file names, the batches folder.

Layout (Hive style)::

    <root>/patient_id=<patient>/date=<YYYY-MM-DD>/<batch_id>.parquet
    <root>/_batches/<batch_id>.json        (manifests: the sealer's commit point)
    <root>/_batches/<topic>.<partition>.index / .owner   (per partition: its newest
                                           batches, its owner's claim; streams.partition_index,
                                           streams.fence)
    <root>/patient_id=<p>/date=<d>/compacted-<id>-<n>.parquet   (merged files, see below)
    <root>/_compactions/<id>.json          (compaction records: the compactor's commit point)

Why patient first, then date: erasure, consent and access are all per patient ("Patient
keys" and "Consent before every disclosure" in docs/invariants.md), and every read is "this
patient, this time range". With the patient at the top, a reader lists one folder and prunes
by date folder before decrypting anything; erasing a patient is one key deletion (and, if
wanted, one folder deletion) that touches nobody else's files. The date is the UTC date of
``device_time``, the time a clinician asks about.

Compaction (:mod:`streams.lake.compact`) merges a patient-day's files into ``compacted-*``
files; batch ids may therefore not begin with :data:`COMPACTED_PREFIX`.

Pure and free of pyarrow: the worker (``streams.app``) needs :data:`BATCHES_DIR` for its
outbox and must not pay pyarrow's ~60 MB of RSS for a folder name.
"""

from __future__ import annotations

import re

from streams.lake.errors import LakeError

__all__ = [
    "BATCHES_DIR",
    "COMPACTED_PREFIX",
    "COMPACTIONS_DIR",
    "compacted_path",
    "file_path",
    "patient_dir",
]

#: The folder of batch manifests (and their ``.produced`` files, and the ``.leaves`` files of
#: batches sealed before the two-level tree) under the lake root.
BATCHES_DIR = "_batches"
#: The folder of compaction records under the lake root (hidden from Hive-style readers).
COMPACTIONS_DIR = "_compactions"
#: The name of every compacted file begins with this; no batch id may.
COMPACTED_PREFIX = "compacted-"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")


def _check_name(name: str, what: str) -> None:
    """Names become path segments: no separators, no dot-dot, nothing to escape."""
    if not _NAME_RE.match(name) or ".." in name:
        raise LakeError(f"{what} {name!r} is not a safe path segment ([A-Za-z0-9._@+-], <=128)")


def patient_dir(patient_id: str) -> str:
    """``patient_id=<p>``, relative to the lake root."""
    _check_name(patient_id, "patient id")
    return f"patient_id={patient_id}"


def file_path(patient_id: str, date: str, batch_id: str) -> str:
    """``patient_id=<p>/date=<d>/<batch>.parquet``, relative to the lake root."""
    _check_name(batch_id, "batch id")
    if batch_id.startswith(COMPACTED_PREFIX):
        raise LakeError(f"batch id {batch_id!r}: the prefix {COMPACTED_PREFIX!r} is reserved")
    return f"{patient_dir(patient_id)}/date={date}/{batch_id}.parquet"


def compacted_path(patient_id: str, date: str, compaction_id: str, n: int) -> str:
    """``patient_id=<p>/date=<d>/compacted-<id>-<n>.parquet``, relative to the lake root."""
    _check_name(compaction_id, "compaction id")
    name = f"{COMPACTED_PREFIX}{compaction_id}-{n:03d}.parquet"
    return f"{patient_dir(patient_id)}/date={date}/{name}"
