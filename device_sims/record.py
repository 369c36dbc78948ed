"""Ground truth of a simulation run, as JSON lines, and a reader that summarizes it.

Why: end-to-end checks ("every reading sent is in the lake exactly once, every malformed
message is in the dead-letter topic") need to know what was actually put on the wire,
after fault injection. The writer records each published message; reading ids are computed
from the exact bytes sent with the canonical :func:`vitalproof.schema.reading_id`, so the
file is independent of the simulator's internals.

One JSON object per line, ``kind`` first:

* ``{"kind": "msg", "index": 0, "device_id": "d1", "reading_ids": [...], "malformed": false,
  "malformed_reason": null, "duplicate": false, "bytes": 512, "digest": "…"}`` — one per
  publish, ``index`` counts publishes across the fleet in send order, ``digest`` is a
  blake2b-128 of the payload (to match what a subscriber received);
* ``{"kind": "drop", "device_id": "d1", "reading_ids": [...]}`` — a message the faults lost;
* ``{"kind": "storm", "device_ids": [...]}`` — a reconnect storm.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from vitalproof.errors import WireFormatError
from vitalproof.schema import SampleBatch
from vitalproof_verify.leaves import reading_id


def payload_digest(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


def reading_ids_of(device_id: str, payload: bytes) -> list[str]:
    """The reading ids a collector will derive from ``payload``; ``[]`` if it is invalid."""
    try:
        batch = SampleBatch.from_json(payload, device_id=device_id)
    except WireFormatError:
        return []
    batch.fill_reading_ids()
    return batch.reading_id


def valid_reading_ids(device_id: str, payload: bytes) -> list[str]:
    """:func:`reading_ids_of` without validation, for payloads known to be well formed.

    The fleet computes ids for every message it publishes; skipping the schema checks for
    payloads the simulator built (faults that break payloads are marked malformed and
    never get here) halves that cost. Ids are the same as :func:`reading_ids_of` gives.
    """
    doc = json.loads(payload)
    return [
        reading_id(device_id, s["metric"], q, t)
        for s in doc["series"]
        for q, t in zip(s["seq"], s["t"], strict=True)
    ]


class GroundTruthWriter:
    """Append-only JSON-lines writer; use as a context manager so the file is closed."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[str] = self.path.open("w", encoding="utf-8")
        self.messages = 0

    def _write(self, doc: dict[str, Any]) -> None:
        self._f.write(json.dumps(doc, separators=(",", ":")))
        self._f.write("\n")

    def message(
        self,
        device_id: str,
        payload: bytes,
        reading_ids: list[str],
        *,
        malformed_reason: str | None = None,
        duplicate: bool = False,
    ) -> int:
        """Record one publish; returns its fleet-wide message index."""
        index = self.messages
        self.messages += 1
        self._write(
            {
                "kind": "msg",
                "index": index,
                "device_id": device_id,
                "reading_ids": [] if malformed_reason else reading_ids,
                "malformed": malformed_reason is not None,
                "malformed_reason": malformed_reason,
                "duplicate": duplicate,
                "bytes": len(payload),
                "digest": payload_digest(payload),
            }
        )
        return index

    def drop(self, device_id: str, reading_ids: list[str]) -> None:
        self._write({"kind": "drop", "device_id": device_id, "reading_ids": reading_ids})

    def storm(self, device_ids: tuple[str, ...] | list[str]) -> None:
        self._write({"kind": "storm", "device_ids": list(device_ids)})

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> GroundTruthWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_records(path: Path | str) -> Iterator[dict[str, Any]]:
    """Every record of a ground-truth file, in order."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


@dataclass(frozen=True, slots=True)
class GroundTruthSummary:
    messages: int  # publishes, duplicates and malformed included
    readings: int  # reading ids carried, with repetitions (duplicates, resends)
    distinct_reading_ids: int  # what an exactly-once pipeline must end up with
    malformed: int
    duplicates: int
    dropped_messages: int
    lost_reading_ids: int  # ids only ever in dropped messages
    storms: int
    devices: int
    malformed_by_reason: dict[str, int]


def sent_reading_ids(path: Path | str) -> set[str]:
    """Distinct reading ids that were published (dropped messages excluded)."""
    return {rid for r in read_records(path) if r["kind"] == "msg" for rid in r["reading_ids"]}


def summarize(path: Path | str) -> GroundTruthSummary:
    messages = readings = malformed = duplicates = dropped = storms = 0
    sent: set[str] = set()
    dropped_ids: set[str] = set()
    devices: set[str] = set()
    reasons: dict[str, int] = {}
    for r in read_records(path):
        kind = r["kind"]
        if kind == "msg":
            messages += 1
            devices.add(r["device_id"])
            readings += len(r["reading_ids"])
            sent.update(r["reading_ids"])
            if r["malformed"]:
                malformed += 1
                reason = r["malformed_reason"]
                reasons[reason] = reasons.get(reason, 0) + 1
            if r["duplicate"]:
                duplicates += 1
        elif kind == "drop":
            dropped += 1
            dropped_ids.update(r["reading_ids"])
        elif kind == "storm":
            storms += 1
    return GroundTruthSummary(
        messages=messages,
        readings=readings,
        distinct_reading_ids=len(sent),
        malformed=malformed,
        duplicates=duplicates,
        dropped_messages=dropped,
        lost_reading_ids=len(dropped_ids - sent),
        storms=storms,
        devices=len(devices),
        malformed_by_reason=reasons,
    )
