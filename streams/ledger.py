"""The folder of sealed batches (manifests, ``.produced`` marks), without Arrow.

Why apart from the sealer: the worker itself only produces manifests and marks them produced
(the outbox); sealing runs in its own process (``streams.seal_process``). Keeping these few
functions here spares the worker importing pyarrow (~60 MB of RSS) for them.
"""

from __future__ import annotations

import os
from pathlib import Path

from vitalproof.manifest import BatchManifest

BATCHES_DIR = "_batches"


def write_atomic(path: Path, data: bytes) -> None:
    """temp file, fsync, rename, fsync the folder: the file is either whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
