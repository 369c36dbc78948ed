"""Starting and stopping our own pipeline processes (the demo, the tests, the benchmarks).

Each runs ``python -m vitalproof ...`` in its own session with the settings as
``VITALPROOF_*`` variables (secrets as files), exactly as an operator would start it, so
stopping the process group stops everything it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

from vitalproof.settings import Settings


class Child(subprocess.Popen[bytes]):
    """A started ``vitalproof`` process and the folder holding the secrets it was handed."""

    secrets_dir: Path | None = None


def start(
    settings: Settings,
    *args: str,
    log: Path,
    env: Mapping[str, str] | None = None,
    drop_env: tuple[str, ...] = (),
) -> Child:
    """``vitalproof ARGS`` with ``settings``; output appended to ``log``.

    Settings travel as ``VITALPROOF_*`` variables, secrets as files in a private folder
    (:meth:`Settings.child_env`) that :func:`stop` removes.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    secrets_dir = settings.paths.home / "run" / f"secrets-{uuid.uuid4().hex[:12]}"
    environ = {k: v for k, v in os.environ.items() if k not in drop_env}
    environ |= settings.child_env(secrets_dir) | dict(env or {})
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        child = Child(
            [sys.executable, "-m", "vitalproof", *args],
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    child.secrets_dir = secrets_dir
    return child


def stop(proc: subprocess.Popen[bytes], *, grace_s: float = 20.0) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there after ``grace_s``; then
    remove the secrets folder it was started with."""
    try:
        _stop(proc, grace_s)
    finally:
        folder = getattr(proc, "secrets_dir", None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes], grace_s: float) -> None:
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
