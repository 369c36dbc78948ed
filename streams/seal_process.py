"""The sealer in its own OS process, so sealing gets the second core.

Why a process and not a thread: decoding, leaves, Arrow tables and the Parquet writer hold
the GIL often enough that a sealing thread and the worker's event loop (normalize, Faust)
shared one core. The worker hands each batch's ``vitals.clean`` records over as they came
(topic, partition, offset, value bytes: nothing per sample is built in the worker) and gets
back the manifest the child sealed; the worker then produces it, marks it produced and acks,
in the same order as before.

The child owns the :class:`~streams.sealer.Sealer` (ledger, recently sealed ids, keystore).
It is a plain ``python -m streams.seal_process`` subprocess (not ``multiprocessing``, whose
exit handler joins children) talking over one socket with ``multiprocessing.connection``'s
framing. Its life is tied to the worker's: it ignores SIGINT/SIGTERM sent to the process
group (the worker decides when it stops), leaves on EOF, and the kernel SIGKILLs it if the
worker dies (``PR_SET_PDEATHSIG``), so no orphan can seal behind a restarted worker's back.
If the child dies, :meth:`SealProcess.seal` raises :class:`SealProcessDied` and the worker
must die too (see ``streams.app``): a restarted worker recovers from the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from vitalproof import crashpoints, hashing, memory
from vitalproof.errors import VitalproofError, WireFormatError
from vitalproof.retry import Backoff, Outage, disk_full
from vitalproof.settings import RuntimeSettings
from vitalproof.wire import clean

if TYPE_CHECKING:  # the sealer (and pyarrow with it) is imported in the child only
    from streams.sealer import Pending, Sealer

#: One consumed ``vitals.clean`` record: topic, partition, offset, value bytes.
CleanRecord = tuple[str, int, int, bytes]

_PR_SET_PDEATHSIG = 1
log = logging.getLogger(__name__)


class SealProcessError(VitalproofError):
    """The child failed to seal (its traceback is the message); it has exited."""


class SealProcessDied(VitalproofError):
    """The child is gone (``returncode`` as ``subprocess`` reports it: ``-9`` for SIGKILL)."""

    def __init__(self, returncode: int | None) -> None:
        super().__init__(f"the seal process died (exit status {returncode})")
        self.returncode = returncode


@dataclass(frozen=True, slots=True)
class SealOutcome:
    """What sealing one batch gave: the manifest (exactly the bytes written to the ledger),
    or ``None`` if every record was sealed before; and the records that could not be decoded
    (index in the batch, reason), which the worker sends to the DLQ."""

    batch_id: str | None
    manifest_json: bytes | None
    rows: int
    files: int
    rejected: list[tuple[int, str]]
    seconds: float = 0.0
    """Time the child spent on it (against the time between seals: which process limits)."""
    fenced: bool = False
    """Nothing was committed: another worker claimed one of the batch's partitions since
    this worker adopted it (``streams.fence``); the worker drops the batch unacked."""


def decode_records(records: Sequence[CleanRecord]) -> tuple[list[Pending], list[tuple[int, str]]]:
    """The sealer's items for ``records``, and the undecodable ones (index, reason)."""
    from streams.sealer import Pending

    items: list[Pending] = []
    rejected: list[tuple[int, str]] = []
    for i, (topic, partition, offset, value) in enumerate(records):
        try:
            batches = clean.decode_record(value)
        except WireFormatError as err:
            rejected.append((i, str(err)))
            continue
        # A bundle's batches share its offset: the sealer covers and skips them together.
        items.extend(Pending(topic, partition, offset, b) for b in batches)
    return items, rejected


def seal_records(sealer: Sealer, records: Sequence[CleanRecord]) -> SealOutcome:
    """Decode and seal one batch of records (in the child; also usable in process)."""
    from streams.fence import Fenced

    items, rejected = decode_records(records)
    try:
        manifest = sealer.seal(items) if items else None
    except Fenced:
        return SealOutcome(None, None, 0, 0, rejected, fenced=True)
    if manifest is None:
        return SealOutcome(None, None, 0, 0, rejected)
    return SealOutcome(
        manifest.batch_id, manifest.to_json_bytes(), manifest.rows, len(manifest.files), rejected
    )


# -- the worker's side --------------------------------------------------------------------------


class SealProcess:
    """The worker's handle on the child.

    Requests are pipelined: :meth:`submit` hands a batch over and returns, :meth:`outcome`
    gives the outcomes back in submission order (the child seals one batch at a time, in
    order). With a second batch already handed over, the child starts on it the moment it
    finishes the first instead of waiting for the worker's event loop, which a normalize
    take keeps busy for a few hundred milliseconds at a time. One submitter and one
    collector at a time; the two may overlap (they use the socket's two directions).
    """

    def __init__(self, lake_dir: Path | str, keys_dir: Path) -> None:
        self.lake_dir = lake_dir
        self.keys_dir = keys_dir
        self._conn: Connection | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Spawn the child (from the event loop's thread: ``PR_SET_PDEATHSIG`` follows the
        thread that forked). It loads the ledger while the caller goes on; see :meth:`ready`."""
        ours, theirs = Pipe(duplex=True)
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "streams.seal_process",
                    str(theirs.fileno()),
                    str(os.getpid()),
                    str(self.lake_dir),
                    str(self.keys_dir),
                ],
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        self._conn = ours

    async def ready(self) -> None:
        """Until the child has rebuilt its ledger and recent ids."""
        reply = await asyncio.to_thread(self._recv)
        if reply != ("ready", None):
            raise SealProcessError(f"unexpected first message from the seal process: {reply!r}")

    async def adopt(
        self,
        partitions: Sequence[tuple[str, int]],
        claims: dict[tuple[str, int], str] | None = None,
    ) -> None:
        """Have the child rebuild its memory of ``partitions`` (just assigned to this worker)
        from the lake before it seals anything more. No reply: requests are handled in
        order, so every batch submitted later is sealed with that memory. ``claims``: this
        worker's lake claims of them (``streams.fence``), which the child checks before it
        writes each manifest (``None``: no check, a lone worker)."""
        await asyncio.to_thread(self._send_message, ("adopt", list(partitions), claims))

    async def seal(self, records: list[CleanRecord]) -> SealOutcome:
        """Seal ``records`` in the child and wait for the outcome (nothing else in flight)."""
        await self.submit(records)
        return await self.outcome()

    async def submit(self, records: list[CleanRecord]) -> None:
        """Hand one batch to the child. In a thread: pickling bytes and writing them to the
        socket (which blocks while the child is still busy with the batch before) keep the
        event loop, and the GIL, free."""
        await asyncio.to_thread(self._send, records)

    async def outcome(self) -> SealOutcome:
        """The outcome of the oldest batch submitted and not yet collected."""
        reply = await asyncio.to_thread(self._recv)
        if not isinstance(reply, SealOutcome):
            raise SealProcessError(f"unexpected reply from the seal process: {reply!r}")
        return reply

    def _send(self, records: list[CleanRecord]) -> None:
        self._send_message(records)

    def _send_message(self, message: object) -> None:
        conn = self._require_conn()
        try:
            conn.send(message)
        except OSError:
            raise self._died() from None

    def _recv(self) -> object:
        conn = self._require_conn()
        try:
            kind, body = conn.recv()
        except (EOFError, OSError):
            raise self._died() from None
        if kind == "error":
            self._died()  # reap it: it exits after reporting
            raise SealProcessError(str(body))
        if kind == "sealed":
            return body
        return (kind, body)

    def _require_conn(self) -> Connection:
        if self._conn is None:
            raise SealProcessError("the seal process was not started")
        return self._conn

    def _died(self) -> SealProcessDied:
        code = None
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self._proc.wait(timeout=5)
        return SealProcessDied(code)

    def close(self) -> None:
        """Stop the child now. Safe at any moment: a seal cut short is never acked, and a
        restarted worker finds its files (if any) either committed or ignored."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def exit_like(returncode: int | None) -> NoReturn:
    """End this process the way the child ended: by the same signal (a crash point's SIGKILL
    in the child reads, from outside, as the worker's), else with its status (1 if none).
    No cleanup on the way out: whatever was not acked is redelivered to the next worker."""
    logging.shutdown()
    if returncode is not None and returncode < 0:
        sig = -returncode
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(returncode if returncode is not None and returncode > 0 else 1)


# -- the child's side ---------------------------------------------------------------------------


def _tie_to_parent(parent_pid: int) -> None:
    """Be SIGKILLed by the kernel when the worker dies; leave now if it is already gone."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)
    # Signals to the process group (Ctrl-C, the stop of the worker) are the worker's to
    # handle; the child follows through EOF or PDEATHSIG.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def serve(
    conn: Connection, lake_dir: Path | str, keys_dir: Path, backoff: Backoff | None = None
) -> int:
    """Answer seal requests until EOF; an error is reported, then the child exits, except
    a full lake disk, which is waited out (:func:`seal_waiting_for_space`).

    ``lake_dir``: a folder, or an ``s3://`` URI reached as the environment's settings say
    (the worker's environment and secrets folder are this child's).
    """
    backoff = backoff or Backoff()
    from streams.lake.keystore import LocalKeystore
    from streams.lake.storage import open_uri
    from streams.sealer import Sealer
    from vitalproof.settings import LakeSettings, Settings

    try:
        root = (
            open_uri(LakeSettings.from_env(Settings().secrets_dir), lake_dir)
            if isinstance(lake_dir, str)
            else lake_dir
        )
        # Partitions are adopted as the worker is assigned them (see SealProcess.adopt).
        sealer = Sealer(root, LocalKeystore(keys_dir), adopt_all=False)
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return 1
    import pyarrow as pa

    pool = pa.default_memory_pool()
    tokens: dict[tuple[str, int], str] = {}  # this worker's lake claims (streams.fence)
    conn.send(("ready", None))
    while True:
        try:
            records = conn.recv()
        except EOFError:
            return 0
        if isinstance(records, tuple) and records[0] == "adopt":
            try:
                _fence(sealer, tokens, records[2])
                sealer.adopt(records[1])
            except Exception:
                conn.send(("error", traceback.format_exc()))
                return 1
            continue
        started = time.monotonic()
        try:
            outcome = seal_waiting_for_space(sealer, records, lake_dir, backoff)
        except Exception:
            conn.send(("error", traceback.format_exc()))
            return 1
        # Each batch builds its objects and tables afresh: hand the allocators' free pages
        # back instead of letting the peak of the largest batch stay resident.
        del records
        pool.release_unused()
        memory.trim()
        conn.send(("sealed", dataclasses.replace(outcome, seconds=time.monotonic() - started)))


def _fence(
    sealer: Sealer,
    tokens: dict[tuple[str, int], str],
    claims: dict[tuple[str, int], str] | None,
) -> None:
    """From now on check the lake claims of a batch's partitions before each manifest
    (``streams.fence``): ``tokens``, this worker's newest claim of each partition adopted."""
    if claims is None:
        return
    from streams.fence import check_claims

    tokens.update(claims)
    batches_dir = sealer.batches_dir
    sealer.fence = lambda covers: check_claims(
        batches_dir, tokens, sorted({(c.topic, c.partition) for c in covers})
    )


def seal_waiting_for_space(
    sealer: Sealer,
    records: Sequence[CleanRecord],
    lake_dir: Path | str,
    backoff: Backoff,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> SealOutcome:
    """:func:`seal_records`, tried again with backoff while the lake's disk is full.

    Why waiting is safe: the sealer changes nothing it remembers before the manifest, the
    commit point, is written, and what it wrote before (files without a manifest) no reader
    sees and the retry rewrites under the same names; the worker waits for this outcome, so
    the batch's offsets stay uncommitted and nothing after it is acked either. One line when
    the disk fills (what, which path, free bytes), one when the batch got sealed after all.
    """

    def policy(exc: BaseException) -> str | None:
        reason = disk_full(exc)
        if reason is None:
            return None
        free = ""
        if isinstance(lake_dir, Path):
            with contextlib.suppress(OSError):
                free = f", {shutil.disk_usage(lake_dir).free} bytes free"
        return f"cannot seal a batch: {reason}{free}; the batch waits, nothing is acked"

    outage = Outage("lake disk", str(lake_dir), policy, backoff=backoff, logger=log)
    while True:
        try:
            outcome = seal_records(sealer, records)
        except OSError as exc:
            sleep(outage.failed(exc))  # raises what is not a full disk
            continue
        outage.succeeded()
        return outcome


def main(argv: Sequence[str]) -> int:
    fd, parent_pid, lake_dir, keys_dir = argv
    _tie_to_parent(int(parent_pid))
    # The worker's environment is this child's: the same runtime switches, applied here once.
    runtime = RuntimeSettings.from_env()
    crashpoints.arm(runtime.crash_at)
    hashing.configure(native=runtime.native)
    # Its stderr is the worker's (its log): what it says names it.
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s seal-process %(name)s: %(message)s",
    )
    lake: Path | str = lake_dir if "://" in lake_dir else Path(lake_dir)
    return serve(Connection(int(fd)), lake, Path(keys_dir), Backoff.from_settings(runtime))


if __name__ == "__main__":
    # Run the imported module, not this ``__main__`` copy: what the child pickles must name
    # ``streams.seal_process.SealOutcome``, which the worker can unpickle.
    from streams.seal_process import main as _main

    sys.exit(_main(sys.argv[1:]))
