"""Compaction records: the compactor's commit point, and what readers make of them.

A record ``_compactions/patient=<h>/<id>.json`` (``h``: the patient's pseudonym) says "these
input files of one patient-day were merged into these output files". It is written once the
outputs are complete and durable, in one atomic step (temp + fsync + rename on a local disk,
one PUT on an object store), so it either exists whole or not at all: that is the
commit. What readers see follows from it alone:

* an input named by a record is hidden, whether or not it has been deleted yet;
* an output (``compacted-<id>-<n>.parquet``) is visible only if a record names it, so the
  outputs of a compactor killed before its record are invisible (and the next run deletes
  them);
* every other file is a batch's own file, visible once its batch is sealed.

So at every instant each reading is in exactly one visible file, and nothing relies on a
rename of a data file being atomic (S3 has no rename). Once its inputs are deleted a record is
*settled*: rewritten without them (they cannot come back: a sealed batch is never sealed
again), which keeps the records to a few hundred bytes per patient-day. A record whose outputs
were themselves merged and deleted by a later compaction is deleted.

Pure metadata: no key and no Parquet here, so :mod:`streams.lake.read` and
:mod:`streams.lake.compact` both stand on it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, ValidationError

from streams.lake.errors import LakeError
from streams.lake.layout import (
    COMPACTED_PREFIX,
    COMPACTIONS_DIR,
    LEGACY_PATIENT_PREFIX,
    old_layout_error,
    patient_dir,
)

__all__ = [
    "CompactedFile",
    "CompactionRecord",
    "CompactionState",
    "load_state",
    "record_folder",
    "record_path",
]


class CompactedFile(BaseModel):
    """One output file, as the manifest describes a sealed one."""

    model_config = ConfigDict(frozen=True)

    path: str  # relative to the lake root
    rows: int
    sha256: str
    key_id: str  # the key reference (kref:<h>:v<n>), as in manifests
    bytes: int


class CompactionRecord(BaseModel):
    """What one compaction of one patient-day merged (see the module docstring)."""

    model_config = ConfigDict(frozen=True)

    version: Literal[2] = 2  # 1: the old layout's (plaintext patient id), refused
    compaction_id: str
    patient: str  # the pseudonym
    date: str
    created_at_us: int
    rows: int
    inputs: list[str]  # relative paths; emptied once they are deleted ("settled")
    outputs: list[CompactedFile]

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json().encode()


def record_folder(pseudonym: str) -> str:
    """``_compactions/patient=<h>``, relative to the lake root: one patient's records, so a
    reader of one patient lists only theirs."""
    return f"{COMPACTIONS_DIR}/{patient_dir(pseudonym)}"


def record_path(pseudonym: str, compaction_id: str) -> str:
    return f"{record_folder(pseudonym)}/{compaction_id}.json"


@dataclass(slots=True)
class CompactionState:
    """The committed records of (part of) a lake, as one reader saw them."""

    names: tuple[tuple[str, int | None], ...] = ()  # (path, mtime_ns) of every record read
    records: list[CompactionRecord] = field(default_factory=list)
    hidden: set[str] = field(default_factory=set)  # inputs of committed records
    outputs: set[str] = field(default_factory=set)  # outputs of committed records

    def visible(self, rel: str, batches: Collection[str] | None) -> bool:
        """Whether the file at ``rel`` (relative to the root) is part of the lake now.

        ``batches``: the sealed batch ids (None: every batch). Outputs of committed
        compactions hold sealed batches only, so ``batches`` does not filter them: a list of
        sealed ids taken before a compaction must not hide what it merged.
        """
        if rel in self.hidden:
            return False
        stem = rel.rsplit("/", 1)[-1].removesuffix(".parquet")
        if stem.startswith(COMPACTED_PREFIX):
            return rel in self.outputs
        return batches is None or stem in batches


def _record_infos(fs: pafs.FileSystem, base: str, pseudonym: str | None) -> list[pafs.FileInfo]:
    folder = f"{base}/{COMPACTIONS_DIR if pseudonym is None else record_folder(pseudonym)}"
    sel = pafs.FileSelector(folder, recursive=True, allow_not_found=True)
    infos = sorted(
        (
            i
            for i in fs.get_file_info(sel)
            if i.type == pafs.FileType.File
            and i.base_name.endswith(".json")
            and not i.base_name.startswith(".")
        ),
        key=lambda i: i.path,
    )
    if any(f"/{LEGACY_PATIENT_PREFIX}" in i.path for i in infos):
        raise old_layout_error(f"{base}/{COMPACTIONS_DIR}")
    return infos


def _names(infos: list[pafs.FileInfo]) -> tuple[tuple[str, int | None], ...]:
    return tuple((i.path, i.mtime_ns) for i in infos)


def record_names(
    fs: pafs.FileSystem, base: str, pseudonym: str | None
) -> tuple[tuple[str, int | None], ...]:
    """What :func:`load_state` would read now: a reader compares it before and after
    listing data files, to know no compaction committed in between."""
    return _names(_record_infos(fs, base, pseudonym))


def load_state(fs: pafs.FileSystem, base: str, pseudonym: str | None = None) -> CompactionState:
    """The committed records of one patient (by pseudonym; None: of the whole lake)."""
    infos = _record_infos(fs, base, pseudonym)
    state = CompactionState(names=_names(infos))
    for info in infos:
        try:
            with fs.open_input_stream(info.path) as f:
                record = CompactionRecord.model_validate_json(f.read())
        except FileNotFoundError:  # deleted since it was listed: superseded, nothing to see
            continue
        except (OSError, ValidationError) as e:
            raise LakeError(f"compaction record {info.path} is unreadable: {e}") from None
        state.records.append(record)
        state.hidden.update(record.inputs)
        state.outputs.update(o.path for o in record.outputs)
    return state
