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

    def exists(self, rel: str) -> bool: ...

    def write(self, rel: str, data: bytes) -> None: ...


class LocalFolder:
    """A local batches folder as a :class:`Folder`, without pyarrow."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    def names(self, suffix: str) -> list[str]:
        return sorted(p.name for p in self.path.glob(f"*{suffix}"))

    def read(self, rel: str) -> bytes | None:
        try:
            return (self.path / rel).read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, rel: str) -> bool:
        return (self.path / rel).exists()

    def write(self, rel: str, data: bytes) -> None:
        write_atomic(self.path / rel, data)


def folder(batches_dir: Path | Folder) -> Folder:
    """``batches_dir`` as a :class:`Folder`: the one place a local path is told apart."""
    return LocalFolder(batches_dir) if isinstance(batches_dir, Path) else batches_dir


def _read(batches_dir: Path | Folder, name: str) -> bytes:
    data = folder(batches_dir).read(name)
    if data is None:
        raise FileNotFoundError(f"{batches_dir}/{name}")
    return data


def read_manifests(batches_dir: Path | Folder) -> list[BatchManifest]:
    return [
        BatchManifest.model_validate_json(_read(batches_dir, name))
        for name in folder(batches_dir).names(".json")
    ]


def unproduced(batches_dir: Path | Folder) -> list[BatchManifest]:
    """Sealed batches whose manifest Kafka never acknowledged (the outbox). A function of
    the folder alone: the worker produces them while its seal process is still starting."""
    done = {name.removesuffix(".produced") for name in folder(batches_dir).names(".produced")}
    return [m for m in read_manifests(batches_dir) if m.batch_id not in done]


def mark_produced(batches_dir: Path | Folder, batch_id: str) -> None:
    folder(batches_dir).write(f"{batch_id}.produced", b"")
