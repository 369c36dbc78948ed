"""Starting and stopping our own pipeline processes (the demo, the tests, the benchmarks).

Each runs ``python -m vitalproof ...`` in its own session with the settings as
``VITALPROOF_*`` variables, exactly as an operator would start it, so stopping the process
group stops everything it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from vitalproof.settings import Settings


def start(
    settings: Settings,
    *args: str,
    log: Path,
    env: Mapping[str, str] | None = None,
    drop_env: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    """``vitalproof ARGS`` with ``settings``; output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    environ = {k: v for k, v in os.environ.items() if k not in drop_env}
    environ |= settings.to_env() | dict(env or {})
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "vitalproof", *args],
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], *, grace_s: float = 20.0) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there after ``grace_s``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
