"""The folder of sealed batches (manifests, ``.produced`` marks), without Arrow.

Why apart from the sealer: the worker itself only produces manifests and marks them produced
(the outbox); sealing runs in its own process (``streams.seal_process``). Keeping these few
functions here spares the worker importing pyarrow (~60 MB of RSS) for them.
"""

from __future__ import annotations

from pathlib import Path

from vitalproof.durable import write_atomic
from vitalproof.manifest import BatchManifest


def read_manifests(batches_dir: Path) -> list[BatchManifest]:
    return [
        BatchManifest.model_validate_json(p.read_bytes())
        for p in sorted(batches_dir.glob("*.json"))
    ]


def unproduced(batches_dir: Path) -> list[BatchManifest]:
    """Sealed batches whose manifest Kafka never acknowledged (the outbox). A function of
    the folder alone: the worker produces them while its seal process is still starting."""
    done = {p.stem for p in batches_dir.glob("*.produced")}
    return [m for m in read_manifests(batches_dir) if m.batch_id not in done]


def mark_produced(batches_dir: Path, batch_id: str) -> None:
    write_atomic(batches_dir / f"{batch_id}.produced", b"")
