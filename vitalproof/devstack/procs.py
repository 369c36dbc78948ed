"""Spawn, watch and stop the local stack's daemons.

The three parts (Kafka, Mosquitto, Anvil) are ordinary processes started by ``stack up``
and stopped by ``stack down``, which may run in *different* Python processes. So the only
shared truth is a small JSON state file per part, and everything here works from a pid
read back from disk:

* a pid file can be stale (machine rebooted, process killed): a pid is only "ours" if it
  is alive, not a zombie and has the same kernel start time we recorded when we spawned it,
  which protects against pid reuse;
* daemons are started in their own session (process group == pid) so stopping kills the
  whole group, including children such as the real ``anvil`` behind the npm wrapper;
* when the daemon is our own child (tests start and stop in one process) it is reaped, so
  a stopped part does not linger as a zombie.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from vitalproof.durable import write_atomic
from vitalproof.errors import PrerequisiteMissing, StackError

HOST = "127.0.0.1"

# Popen objects of daemons started by this Python process, keyed by pid. Kept so that
# stopping can reap them (no zombies) and so Popen does not warn about a live child on GC.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def require_program(name: str, how_to_install: str) -> str:
    """Absolute path of ``name`` on PATH, or :class:`PrerequisiteMissing` saying how to get it."""
    found = shutil.which(name)
    if found is None:
        raise PrerequisiteMissing(name, how_to_install)
    return found


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct TCP ports that are free now, chosen BELOW the ephemeral range.

    A port from ``bind(0)`` lies in the kernel's ephemeral range, where any outgoing
    connection (a Kafka client, a probe) may take it in the seconds before the daemon binds
    it; ports below that range are only ever taken by an explicit bind.
    """
    low, high = _ephemeral_range()
    lo, hi = (10_000, low - 1) if low > 12_000 else (high + 1, 65_535)
    rng = random.SystemRandom()
    chosen: list[int] = []
    held: list[socket.socket] = []
    try:
        for _ in range(2000):
            if len(chosen) == count:
                break
            port = rng.randint(lo, hi)
            if port in chosen:
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                continue
            held.append(sock)
            chosen.append(port)
    finally:
        for sock in held:
            sock.close()
    if len(chosen) < count:
        raise StackError(f"could not find {count} free ports in {lo}-{hi}")
    return chosen


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``."""
    host, _, port = address.rpartition(":")
    return host or HOST, int(port)


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` of a log file, for error messages; empty if there is none."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) from /proc/<pid>/stat, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` (stable identity across pid reuse), None if unavailable."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def pid_alive(pid: int, started: int | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when given, started at ``started``."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)
        return False
    stat = _proc_stat(pid)
    if stat is None:
        if Path("/proc/self/stat").exists():
            return False
        try:  # no procfs: best effort
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state, ticks = stat
    if state in ("Z", "X"):
        return False
    return started is None or ticks == started


@dataclass
class ProcState:
    """What ``up`` remembers about a daemon it started: enough for another process to stop it."""

    pid: int
    started: int | None
    address: str
    argv: list[str]
    log: str

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(asdict(self), indent=2).encode())

    @classmethod
    def load(cls, path: Path) -> ProcState | None:
        """The saved state, or None when there is none or it is unreadable (treated as stale)."""
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None

    def alive(self) -> bool:
        return pid_alive(self.pid, self.started)


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a daemon in its own session with stdout+stderr appended to ``log_path``.

    A new session means the daemon survives the ``stack up`` process and that stopping can
    signal its whole process group.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(cwd) if cwd else None,
            env=full_env,
            start_new_session=True,
            close_fds=True,
        )
    _CHILDREN[proc.pid] = proc
    return proc


def run_checked(argv: Sequence[str], *, what: str, timeout: float, cwd: Path | None = None) -> str:
    """Run a short helper command; on failure raise StackError with its output."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(cwd) if cwd else None,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"{what} did not finish within {timeout:.0f} s") from exc
    if done.returncode != 0:
        out = "\n".join((done.stdout + done.stderr).strip().splitlines()[-30:])
        raise StackError(f"{what} failed (exit {done.returncode}):\n{out}")
    return done.stdout


def wait_ready(
    name: str,
    probe: Callable[[], bool],
    *,
    pid: int,
    log_path: Path,
    timeout: float,
    interval: float = 0.2,
) -> float:
    """Poll ``probe`` until it answers True; returns the seconds it took.

    Fails fast (StackError with the log tail) if the process dies, and after ``timeout``.
    """
    t0 = time.monotonic()
    while True:
        if not pid_alive(pid):
            raise StackError(
                f"{name} exited during startup; last lines of {log_path}:\n{log_tail(log_path)}"
            )
        try:
            if probe():
                return time.monotonic() - t0
        except Exception:  # a probe failing just means "not yet"
            pass
        if time.monotonic() - t0 > timeout:
            raise StackError(
                f"{name} did not become ready within {timeout:.0f} s; "
                f"last lines of {log_path}:\n{log_tail(log_path)}"
            )
        time.sleep(interval)


def start_daemon(
    name: str,
    argv: Sequence[str],
    *,
    log_path: Path,
    state_path: Path,
    address: str,
    ready: Callable[[], bool],
    cwd: Path | None = None,
    timeout: float,
    interval: float = 0.2,
    stop_timeout: float = 5.0,
    state_log: Path | None = None,
    failure_log: Path | None = None,
) -> ProcState:
    """Spawn a part of the stack, record it in ``state_path`` before waiting (so a ``down``
    from another process finds it even while it starts), and wait until ``ready`` answers.

    A part that dies or never gets ready is stopped and forgotten, and the StackError says
    so with the tail of ``failure_log`` (the part's own log, when it is not its stdout).
    ``state_log``: the log ``status`` points at, when it is not the stdout log.
    """
    proc = spawn(argv, log_path=log_path, cwd=cwd)
    state = ProcState(
        pid=proc.pid,
        started=start_time(proc.pid),
        address=address,
        argv=list(argv),
        log=str(state_log or log_path),
    )
    state.save(state_path)
    try:
        wait_ready(name, ready, pid=proc.pid, log_path=log_path, timeout=timeout, interval=interval)
    except BaseException as exc:
        terminate(proc.pid, timeout=stop_timeout)
        state_path.unlink(missing_ok=True)
        extra = log_tail(failure_log, 25) if failure_log and isinstance(exc, StackError) else ""
        if extra:
            raise StackError(f"{exc}\n{extra}") from None
        raise
    return state


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _reap(pid: int) -> None:
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def kill_group(pid: int, *, timeout: float = 10.0) -> None:
    """SIGKILL ``pid``'s process group at once (no SIGTERM first) and reap it: a crash."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        _reap(pid)
        return
    if pgid == pid and pgid != os.getpgrp():
        _signal_group(pgid, signal.SIGKILL)
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    _reap(pid)
    if pid_alive(pid):
        raise StackError(f"process {pid} survived SIGKILL")


def terminate(pid: int, *, timeout: float = 15.0) -> None:
    """Stop ``pid`` and its process group: SIGTERM, wait ``timeout``, then SIGKILL.

    The caller must have checked that the pid is ours (:meth:`ProcState.alive`); the daemon
    leads its own group because :func:`spawn` started it in a new session.
    """
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        _reap(pid)
        return
    # Only signal the group if the daemon leads it; never our own group.
    use_group = pgid == pid and pgid != os.getpgrp()

    def send(sig: signal.Signals) -> None:
        if use_group:
            _signal_group(pgid, sig)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    send(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        send(signal.SIGKILL)
        kill_deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < kill_deadline:
            time.sleep(0.05)
    _reap(pid)
    if use_group and _group_alive(pgid):
        # Children that outlived the leader (e.g. the native anvil behind the npm wrapper).
        _signal_group(pgid, signal.SIGKILL)
        group_deadline = time.monotonic() + 5
        while _group_alive(pgid) and time.monotonic() < group_deadline:
            time.sleep(0.05)
    if pid_alive(pid):
        raise StackError(f"process {pid} survived SIGKILL")
