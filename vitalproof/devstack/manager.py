"""``stack up / status / down``: the local stack as one object.

All state lives under ``settings.paths.stack_dir`` (one folder per part: generated config,
``state.json`` with pid/start time/address, logs, data), so ``up`` and ``down`` can run in
different processes and a second ``up`` recognises what is already running.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from vitalproof.devstack import anvil, kafka, mosquitto, procs, seaweedfs
from vitalproof.errors import StackError
from vitalproof.settings import Settings

PartName = Literal["kafka", "mosquitto", "anvil", "seaweedfs"]
LocalChain = Literal["embedded", "anvil", "rpc"]


@dataclass(frozen=True)
class _Part:
    """How the manager drives one part; the modules hold the part-specific knowledge."""

    name: PartName
    state_path: Callable[[Settings], Path]
    log_path: Callable[[Settings], Path]
    address: Callable[[Settings], str]
    check: Callable[[Settings], object]
    start: Callable[[Settings], procs.ProcState]
    healthy: Callable[[Settings], bool]
    stop_timeout: float


def _kafka_healthy(settings: Settings) -> bool:
    try:
        return kafka.metadata_ok(settings.kafka.bootstrap, timeout_s=5.0)
    except Exception:
        return False


PARTS: dict[PartName, _Part] = {
    "mosquitto": _Part(
        "mosquitto",
        mosquitto.state_path,
        mosquitto.log_path,
        lambda s: f"{s.mqtt.host}:{s.mqtt.port}",
        lambda _settings: mosquitto.check_prerequisites(),
        mosquitto.start,
        mosquitto.healthy,
        mosquitto.STOP_TIMEOUT_S,
    ),
    "kafka": _Part(
        "kafka",
        kafka.state_path,
        kafka.log_path,
        lambda s: s.kafka.bootstrap,
        kafka.check_prerequisites,
        kafka.start,
        _kafka_healthy,
        kafka.STOP_TIMEOUT_S,
    ),
    "anvil": _Part(
        "anvil",
        anvil.state_path,
        anvil.log_path,
        lambda s: f"127.0.0.1:{s.devstack.anvil_port}",
        lambda _settings: anvil.find_anvil(),
        anvil.start,
        anvil.healthy,
        anvil.STOP_TIMEOUT_S,
    ),
    "seaweedfs": _Part(
        "seaweedfs",
        seaweedfs.state_path,
        seaweedfs.log_path,
        lambda s: f"127.0.0.1:{s.devstack.s3_port}",
        lambda _settings: seaweedfs.find_weed(),
        seaweedfs.start,
        seaweedfs.healthy,
        seaweedfs.STOP_TIMEOUT_S,
    ),
}


@dataclass
class PartStatus:
    """One daemon as ``stack status`` reports it."""

    name: str
    address: str
    pid: int | None = None
    running: bool = False
    healthy: bool = False
    log: str | None = None


@dataclass
class StackStatus:
    """The whole stack; ``to_json()`` is what ``stack status --json`` prints."""

    stack_dir: str
    parts: dict[str, PartStatus] = field(default_factory=dict)

    @property
    def kafka(self) -> PartStatus | None:
        return self.parts.get("kafka")

    @property
    def mosquitto(self) -> PartStatus | None:
        return self.parts.get("mosquitto")

    @property
    def anvil(self) -> PartStatus | None:
        return self.parts.get("anvil")

    @property
    def seaweedfs(self) -> PartStatus | None:
        return self.parts.get("seaweedfs")

    @property
    def healthy(self) -> bool:
        """Every reported part runs and answers."""
        return bool(self.parts) and all(p.running and p.healthy for p in self.parts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "stack_dir": self.stack_dir,
            "healthy": self.healthy,
            "parts": {k: asdict(v) for k, v in self.parts.items()},
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


class StackManager:
    """Start, inspect and stop Kafka, Mosquitto, (for ``chain='anvil'``) Anvil and (with
    ``s3=True``) SeaweedFS."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def stack_dir(self) -> Path:
        return self.settings.paths.stack_dir

    @property
    def rpc_url(self) -> str:
        """Anvil's JSON-RPC URL (meaningful once ``up(chain='anvil')`` ran)."""
        return anvil.rpc_url(self.settings)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One up/down at a time per stack folder (two terminals, parallel test workers)."""
        self.stack_dir.mkdir(parents=True, exist_ok=True)
        with (self.stack_dir / ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _wanted(self, chain: LocalChain, s3: bool) -> list[PartName]:
        names: list[PartName] = ["mosquitto", "kafka"]
        if chain == "anvil":
            names.append("anvil")
        if s3:
            names.append("seaweedfs")
        return names

    def _live_state(self, part: _Part) -> procs.ProcState | None:
        """The recorded process if it still runs; a stale record is deleted."""
        path = part.state_path(self.settings)
        state = procs.ProcState.load(path)
        if state is None:
            path.unlink(missing_ok=True)
            return None
        if not state.alive():
            path.unlink(missing_ok=True)
            return None
        return state

    def up(self, chain: LocalChain | None = None, *, s3: bool = False) -> StackStatus:
        """Start what is not running yet and return once every part answers.

        Idempotent: parts whose recorded pid is alive are left alone (and waited for, in
        case another ``up`` is still starting them). Prerequisites are all checked before
        anything starts; if a part fails, parts started by this call are stopped again.
        """
        chain = chain or self.settings.chain.kind
        wanted = self._wanted(chain, s3)
        with self._lock():
            to_start: list[_Part] = []
            for name in wanted:
                part = PARTS[name]
                state = self._live_state(part)
                if state is None:
                    to_start.append(part)
                elif not self._wait_healthy(part, timeout=10.0):
                    raise StackError(
                        f"{name} (pid {state.pid}) runs but does not answer on "
                        f"{part.address(self.settings)}; see {state.log} or run `stack down`"
                    )
            for part in to_start:
                part.check(self.settings)
            started: list[_Part] = []
            try:
                for part in to_start:
                    part.start(self.settings)
                    started.append(part)
            except BaseException:
                for part in reversed(started):
                    self._stop(part)
                raise
        return self.status()

    def _wait_healthy(self, part: _Part, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if part.healthy(self.settings):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    def _stop(self, part: _Part) -> None:
        state = self._live_state(part)
        if state is not None:
            procs.terminate(state.pid, timeout=part.stop_timeout)
        part.state_path(self.settings).unlink(missing_ok=True)

    def start(self, name: PartName) -> PartStatus:
        """Start one part on its own (e.g. only Anvil for chain tests); no-op if it runs."""
        part = PARTS[name]
        with self._lock():
            if self._live_state(part) is None:
                part.check(self.settings)
                part.start(self.settings)
        return self._part_status(name)

    def stop(self, name: PartName) -> None:
        """Stop one part (e.g. Anvil at the end of the tests that needed it)."""
        with self._lock():
            self._stop(PARTS[name])

    def kill(self, name: PartName) -> int | None:
        """SIGKILL one part's process group, as a crash would (the chaos drills): no flush,
        no clean shutdown. Returns the pid killed (None if it was not running); the state
        record is removed so :meth:`start` brings it back on its data."""
        with self._lock():
            part = PARTS[name]
            state = self._live_state(part)
            if state is None:
                return None
            procs.kill_group(state.pid)
            part.state_path(self.settings).unlink(missing_ok=True)
            return state.pid

    def down(self) -> None:
        """Stop every part this stack folder records, process groups included.

        SIGTERM first (Kafka and Mosquitto flush their logs and persistence), SIGKILL after
        the part's timeout. Data, config and credentials stay for the next ``up``.
        """
        with self._lock():
            errors: list[str] = []
            order: tuple[PartName, ...] = ("seaweedfs", "anvil", "kafka", "mosquitto")
            for name in order:
                try:
                    self._stop(PARTS[name])
                except StackError as exc:
                    errors.append(f"{name}: {exc}")
            if errors:
                raise StackError("; ".join(errors))

    def status(self) -> StackStatus:
        """What runs and answers now; Anvil only if recorded or selected by settings."""
        report = StackStatus(stack_dir=str(self.stack_dir))
        order: tuple[PartName, ...] = ("mosquitto", "kafka", "anvil", "seaweedfs")
        for name in order:
            part = PARTS[name]
            state = self._live_state(part)
            if name == "anvil" and state is None and self.settings.chain.kind != "anvil":
                continue
            if name == "seaweedfs" and state is None:  # only when `up --s3` started it
                continue
            report.parts[name] = self._part_status(name, state)
        return report

    def _part_status(self, name: PartName, state: procs.ProcState | None = None) -> PartStatus:
        part = PARTS[name]
        if state is None:
            state = self._live_state(part)
        running = state is not None
        return PartStatus(
            name=name,
            address=state.address if state else part.address(self.settings),
            pid=state.pid if state else None,
            running=running,
            healthy=running and part.healthy(self.settings),
            log=str(part.log_path(self.settings)),
        )
