"""Readings of ``vitals.clean`` records read back from the lake, by partition and offset: the
replay of live events past Kafka's retention (:class:`clinic.fanout.Replayer`).

The sealer keeps, in every row it seals, the record the reading came from (``clean_partition``,
``clean_offset``) and the reading's place among that record's readings (``clean_index``,
docs/wire-formats.md). A batch's manifest names the offsets it covers, so the batches holding a
run of offsets are found from the manifests alone, and only those batches' files of the
patients asked for are decrypted. Sorted by (offset, index), the rows are the readings in the
order the fan-out delivered them, and :func:`clinic.live.compact` of the record and of the row
are the same dict, so the replay numbers and sends exactly what was delivered.

What the lake cannot give back is left out here and found by the caller's count: readings of
erased patients (their files cannot be decrypted any more), of batches not sealed yet, sealed
before rows kept their offsets (the columns are null then), or dropped by the sealer as copies
of a reading sealed before (a replay of the worker after a crash).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from streams import lake
from streams.lake.keystore import MASTER_KEY_FILE, LocalKeystore
from streams.lake.layout import BATCHES_DIR
from streams.ledger import read_manifests
from vitalproof.manifest import BatchManifest
from vitalproof.schema import flag_names
from vitalproof.settings import Settings

#: Patients' rows of batches kept decoded, for the next page of one replay.
CACHED = 32
#: Seconds the list of manifests is trusted before the lake is listed again (sooner when no
#: known batch covers what is asked for).
MANIFESTS_TTL_S = 5.0


@dataclass(frozen=True, slots=True)
class LakeReading:
    """One reading as the lake gives it back: where it came from and its compact form."""

    partition: int
    offset: int
    index: int
    patient_id: str
    metric: str
    body: dict[str, Any]


class LakeReplay:
    """The sealed readings of runs of ``vitals.clean`` offsets (blocking: call it from a
    thread; decrypting is the work)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._manifests: dict[str, BatchManifest] = {}
        self._listed = -MANIFESTS_TTL_S
        self._rows: OrderedDict[tuple[str, str], list[LakeReading]] = OrderedDict()
        self._lock = threading.Lock()  # replays of two requests run in two threads

    def batches(self, topic: str, partition: int, lo: int, hi: int) -> list[BatchManifest]:
        """The sealed batches whose covers meet offsets ``lo..hi`` of the partition."""

        def meeting() -> list[BatchManifest]:
            return [
                m
                for m in self._manifests.values()
                if any(
                    c.topic == topic and c.partition == partition and c.first <= hi and c.last >= lo
                    for c in m.covers
                )
            ]

        found = meeting()
        if found and time.monotonic() - self._listed < MANIFESTS_TTL_S:  # else relist
            return found
        root = lake.open_lake(self.settings)
        for m in read_manifests(root.child(BATCHES_DIR)):  # new batches since the last list
            self._manifests.setdefault(m.batch_id, m)
        self._listed = time.monotonic()
        return meeting()

    def relist(self) -> None:
        """List the manifests again at the next call (a batch may have been sealed since)."""
        self._listed = -MANIFESTS_TTL_S

    def readings(
        self, topic: str, partition: int, lo: int, hi: int, patients: Iterable[str]
    ) -> list[LakeReading]:
        """The readings of ``patients`` sealed from offsets ``lo..hi``, in delivery order."""
        if not (self.settings.paths.keys_dir / MASTER_KEY_FILE).exists():
            return []
        with self._lock:
            return self._readings_of(topic, partition, lo, hi, set(patients))

    def _readings_of(
        self, topic: str, partition: int, lo: int, hi: int, wanted: set[str]
    ) -> list[LakeReading]:
        out: list[LakeReading] = []
        for m in self.batches(topic, partition, lo, hi):
            for patient in sorted(wanted & set(m.patients)):
                out.extend(
                    r
                    for r in self._batch_rows(m, patient)
                    if r.partition == partition and lo <= r.offset <= hi
                )
        out.sort(key=lambda r: (r.offset, r.index))
        return out

    def _batch_rows(self, m: BatchManifest, patient: str) -> list[LakeReading]:
        key = (m.batch_id, patient)
        hit = self._rows.get(key)
        if hit is not None:
            self._rows.move_to_end(key)
            return hit
        table = lake.read_patient(
            lake.open_lake(self.settings),
            patient,
            LocalKeystore(self.settings.paths.keys_dir),
            m.first_device_time_us,
            m.last_device_time_us + 1,
            batches={m.batch_id},
            erased=[],  # an erased patient's files are skipped: their readings are gone
        )
        table = table.filter(pc.invert(pc.is_null(table["clean_offset"])))
        rows = _readings(table, patient)
        self._rows[key] = rows
        while len(self._rows) > CACHED:
            self._rows.popitem(last=False)
        return rows


def _readings(table: pa.Table, patient: str) -> list[LakeReading]:
    ids = lake.hex_ids(table["reading_id"]).to_pylist()
    cols = {
        name: table[name].to_pylist()
        for name in (
            "clean_partition", "clean_offset", "clean_index", "device_id", "metric", "unit",
            "value", "quality", "seq",
        )
    }  # fmt: skip
    t_us = pc.cast(table["device_time"], pa.int64()).to_pylist()
    rx_us = pc.cast(table["receive_time"], pa.int64()).to_pylist()
    out = []
    for i, rid in enumerate(ids):
        value = cols["value"][i]
        quality = cols["quality"][i]
        body = {  # clinic.live.compact of the reading, key for key
            "patient": patient,
            "device": cols["device_id"][i],
            "metric": cols["metric"][i],
            "unit": cols["unit"][i],
            "t_us": t_us[i],
            "received_us": rx_us[i],
            "seq": cols["seq"][i],
            "value": None if value is None or math.isnan(value) else value,
            "quality": quality,
            "flags": list(flag_names(quality)),
            "reading_id": rid,
        }
        out.append(
            LakeReading(
                cols["clean_partition"][i],
                cols["clean_offset"][i],
                cols["clean_index"][i],
                patient,
                body["metric"],
                body,
            )
        )
    return out
