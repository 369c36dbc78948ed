"""The lake: sealed batches as encrypted Parquet, one file per (batch, patient, UTC date).

The package's rooms:

* :mod:`~streams.lake.layout`: folder and file names, :data:`~streams.lake.layout.BATCHES_DIR`
  (pure, no pyarrow);
* :mod:`~streams.lake.storage`: local folder or object store (``pyarrow.fs``);
* :mod:`~streams.lake.table`: the Arrow schema, building, sorting and splitting rows;
* :mod:`~streams.lake.keystore`: per-patient keys, the :class:`~streams.lake.keystore.Kms`
  interface and the local keystore;
* :mod:`~streams.lake.crypto`: Parquet modular encryption through that interface;
* :mod:`~streams.lake.write`: sealing a batch's files; :mod:`~streams.lake.read`: reading,
  listing and counting them;
* :mod:`~streams.lake.compact`: merging a patient-day's files, committed by the records of
  :mod:`~streams.lake.records`;
* :mod:`~streams.lake.export`: plaintext exports (CSV, JSON lines, Parquet, FHIR, Open mHealth).

The names below are the lake's front: ``from streams import lake`` then ``lake.read_patient``,
``lake.write_batch``... They are resolved on first use (PEP 562 ``__getattr__``), not at
import, so that importing a light room such as :mod:`streams.lake.layout` (the worker does,
for the batches folder) does not load pyarrow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streams.lake.compact import CompactionBusy, CompactReport, compact_lake
    from streams.lake.crypto import KmsBridge
    from streams.lake.errors import LakeError, LakeKeyUnavailable, LakeSpansDates
    from streams.lake.read import (
        LakeFileVanished,
        lake_stats,
        list_patient_files,
        merged_reading_ids,
        patient_summaries,
        read_patient,
        read_reading_ids,
        sealed_batch_ids,
    )
    from streams.lake.storage import LakeRoot, open_lake, resolve_fs
    from streams.lake.table import (
        FILE_SCHEMA,
        SCHEMA,
        build_table,
        derive_reading_ids,
        hex_ids,
        table_from_batches,
    )
    from streams.lake.write import (
        WrittenFile,
        encode_parquet,
        write_batch,
        write_patient_file,
        write_patient_files,
    )

#: Front name -> the module of the package that defines it.
_FRONT = {
    "CompactReport": "compact",
    "CompactionBusy": "compact",
    "compact_lake": "compact",
    "KmsBridge": "crypto",
    "LakeError": "errors",
    "LakeKeyUnavailable": "errors",
    "LakeSpansDates": "errors",
    "LakeFileVanished": "read",
    "lake_stats": "read",
    "list_patient_files": "read",
    "merged_reading_ids": "read",
    "patient_summaries": "read",
    "read_patient": "read",
    "read_reading_ids": "read",
    "sealed_batch_ids": "read",
    "LakeRoot": "storage",
    "open_lake": "storage",
    "resolve_fs": "storage",
    "FILE_SCHEMA": "table",
    "SCHEMA": "table",
    "build_table": "table",
    "derive_reading_ids": "table",
    "hex_ids": "table",
    "table_from_batches": "table",
    "WrittenFile": "write",
    "encode_parquet": "write",
    "write_batch": "write",
    "write_patient_file": "write",
    "write_patient_files": "write",
}

__all__ = [
    "FILE_SCHEMA",
    "SCHEMA",
    "CompactReport",
    "CompactionBusy",
    "KmsBridge",
    "LakeError",
    "LakeFileVanished",
    "LakeKeyUnavailable",
    "LakeRoot",
    "LakeSpansDates",
    "WrittenFile",
    "build_table",
    "compact_lake",
    "derive_reading_ids",
    "encode_parquet",
    "hex_ids",
    "lake_stats",
    "list_patient_files",
    "merged_reading_ids",
    "open_lake",
    "patient_summaries",
    "read_patient",
    "read_reading_ids",
    "resolve_fs",
    "sealed_batch_ids",
    "table_from_batches",
    "write_batch",
    "write_patient_file",
    "write_patient_files",
]


if not TYPE_CHECKING:  # type checkers see the imports above; unknown names stay errors

    def __getattr__(name: str) -> object:
        module = _FRONT.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value  # resolved once
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})
