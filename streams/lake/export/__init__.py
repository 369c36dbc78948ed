"""Exports of decrypted lake rows: CSV, JSON lines, plain Parquet, FHIR R4 and Open mHealth.

Every function here is pure: it takes an Arrow table with the lake's :data:`streams.lake.SCHEMA`
(what :func:`streams.lake.read_patient` returns) and writes to a binary sink or returns
documents. Reading and decrypting the lake is the caller's business (``vitalproof.cli.lake``),
so these functions are testable without a keystore and usable from notebooks.

**Every output of this package is plaintext health data.** The lake is encrypted per patient
for a reason; whoever exports takes over the duty to protect the result.

Tabular formats (CSV, JSON lines, Parquet) are in :mod:`~streams.lake.export.plain`, the
standard ones in :mod:`~streams.lake.export.fhir` and :mod:`~streams.lake.export.omh` (Open
mHealth), which share :mod:`~streams.lake.export.rows`' per-reading view of the table. The
names below are the exports' front: ``from streams.lake import export`` then
``export.write_csv``, ``export.fhir_bundle``...
"""

from __future__ import annotations

from streams.lake.export.fhir import FHIR_BP, FHIR_MAP, FhirCode, fhir_bundle, fhir_observations
from streams.lake.export.omh import OMH_BP, OMH_MAP, OmhMapping, omh_data_points
from streams.lake.export.plain import (
    EXPORT_COLUMNS,
    plain_table,
    write_csv,
    write_jsonl,
    write_parquet,
)
from streams.lake.export.rows import Skipped, quality_names

__all__ = [
    "EXPORT_COLUMNS",
    "FHIR_BP",
    "FHIR_MAP",
    "OMH_BP",
    "OMH_MAP",
    "FhirCode",
    "OmhMapping",
    "Skipped",
    "fhir_bundle",
    "fhir_observations",
    "omh_data_points",
    "plain_table",
    "quality_names",
    "write_csv",
    "write_jsonl",
    "write_parquet",
]
