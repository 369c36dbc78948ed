"""The folder of sealed batches (manifests, ``.produced`` marks), without Arrow.

Why apart from the sealer: the worker itself only produces manifests and marks them produced
(the outbox); sealing runs in its own process (``streams.seal_process``). Keeping these few
functions here spares the worker importing pyarrow (~60 MB of RSS) for them when the lake is
a local folder; a lake on S3 is handed in as a :class:`Folder`
(``streams.lake.storage.LakeRoot``, which needs pyarrow.fs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from vitalproof.durable import write_atomic
from vitalproof.manifest import BatchManifest


class Folder(Protocol):
    """The batches folder on any storage (``streams.lake.storage.LakeRoot`` is one)."""

    def names(self, suffix: str) -> list[str]: ...

    def read(self, rel: str) -> bytes | None: ...

    def write(self, rel: str, data: bytes) -> None: ...


def _names(batches_dir: Path | Folder, suffix: str) -> list[str]:
    if isinstance(batches_dir, Path):
        return sorted(p.name for p in batches_dir.glob(f"*{suffix}"))
    return batches_dir.names(suffix)


def _read(batches_dir: Path | Folder, name: str) -> bytes:
    if isinstance(batches_dir, Path):
        return (batches_dir / name).read_bytes()
    data = batches_dir.read(name)
    if data is None:
        raise FileNotFoundError(f"{batches_dir}/{name}")
    return data


def read_manifests(batches_dir: Path | Folder) -> list[BatchManifest]:
    return [
        BatchManifest.model_validate_json(_read(batches_dir, name))
        for name in _names(batches_dir, ".json")
    ]


def unproduced(batches_dir: Path | Folder) -> list[BatchManifest]:
    """Sealed batches whose manifest Kafka never acknowledged (the outbox). A function of
    the folder alone: the worker produces them while its seal process is still starting."""
    done = {name.removesuffix(".produced") for name in _names(batches_dir, ".produced")}
    return [m for m in read_manifests(batches_dir) if m.batch_id not in done]


def mark_produced(batches_dir: Path | Folder, batch_id: str) -> None:
    if isinstance(batches_dir, Path):
        write_atomic(batches_dir / f"{batch_id}.produced", b"")
    else:
        batches_dir.write(f"{batch_id}.produced", b"")
