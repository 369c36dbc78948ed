"""Where the lake puts things: folder and file names, the batches folder.

Layout (Hive style)::

    <root>/patient=<pseudonym>/date=<YYYY-MM-DD>/<batch_id>.parquet
    <root>/_batches/<batch_id>.json        (manifests: the sealer's commit point)
    <root>/_batches/<topic>.<partition>.index / .owner   (per partition: its newest
                                           batches, its owner's claim; streams.partition_index,
                                           streams.fence)
    <root>/patient=<h>/date=<d>/compacted-<id>-<n>.parquet   (merged files, see below)
    <root>/_compactions/patient=<h>/<id>.json   (compaction records: the compactor's commit)

``<pseudonym>`` (``h``) is :meth:`~streams.lake.keystore.Kms.pseudonym` of the patient id: a
keyed HMAC, the same name the keystore files the patient's keys under. No folder, file name
or manifest of the lake holds a patient id (the privacy scan checks it); the rows inside the
encrypted files do. Lakes of the first layout (``patient_id=<id>/`` folders, plaintext ids)
are refused with :func:`old_layout_error`, not read.

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
    "LEGACY_PATIENT_PREFIX",
    "PATIENT_PREFIX",
    "compacted_path",
    "file_path",
    "old_layout_error",
    "patient_dir",
    "pseudonym_of",
]

#: The folder of batch manifests (and their ``.produced`` files, and the ``.leaves`` files of
#: batches sealed before the two-level tree) under the lake root.
BATCHES_DIR = "_batches"
#: The folder of compaction records under the lake root (hidden from Hive-style readers).
COMPACTIONS_DIR = "_compactions"
#: The name of every compacted file begins with this; no batch id may.
COMPACTED_PREFIX = "compacted-"

#: The patient folder's prefix: ``patient=<pseudonym>`` (never the id).
PATIENT_PREFIX = "patient="
#: The first layout's patient folders, ``patient_id=<id>``: recognised only to refuse them.
LEGACY_PATIENT_PREFIX = "patient_id="

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")


def _check_name(name: str, what: str) -> None:
    """Names become path segments: no separators, no dot-dot, nothing to escape."""
    if not _NAME_RE.match(name) or ".." in name:
        raise LakeError(f"{what} {name!r} is not a safe path segment ([A-Za-z0-9._@+-], <=128)")


def patient_dir(pseudonym: str) -> str:
    """``patient=<pseudonym>``, relative to the lake root (``pseudonym``: ``Kms.pseudonym``)."""
    _check_name(pseudonym, "patient pseudonym")
    return f"{PATIENT_PREFIX}{pseudonym}"


def file_path(pseudonym: str, date: str, batch_id: str) -> str:
    """``patient=<h>/date=<d>/<batch>.parquet``, relative to the lake root."""
    _check_name(batch_id, "batch id")
    if batch_id.startswith(COMPACTED_PREFIX):
        raise LakeError(f"batch id {batch_id!r}: the prefix {COMPACTED_PREFIX!r} is reserved")
    return f"{patient_dir(pseudonym)}/date={date}/{batch_id}.parquet"


def compacted_path(pseudonym: str, date: str, compaction_id: str, n: int) -> str:
    """``patient=<h>/date=<d>/compacted-<id>-<n>.parquet``, relative to the lake root."""
    _check_name(compaction_id, "compaction id")
    name = f"{COMPACTED_PREFIX}{compaction_id}-{n:03d}.parquet"
    return f"{patient_dir(pseudonym)}/date={date}/{name}"


_PSEUDONYM_RE = re.compile(r"(?:^|/)" + re.escape(PATIENT_PREFIX) + r"([^/]+)/")


def pseudonym_of(path: str) -> str | None:
    """The patient pseudonym of a lake path (``.../patient=<h>/...``), None when it has none."""
    m = _PSEUDONYM_RE.search(path)
    return m.group(1) if m else None


def old_layout_error(where: str) -> LakeError:
    """The one error for a lake of the first layout (``patient_id=<id>/``, plaintext ids)."""
    return LakeError(
        f"{where} holds {LEGACY_PATIENT_PREFIX}<id>/ folders: a lake of the old layout, with "
        f"plaintext patient ids, which this version does not read; seal into a new lake or "
        f"namespace (docs/architecture.md, 'Lake layout')"
    )
