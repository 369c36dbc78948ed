"""Crash points: a hard, kill -9 style death at a named step boundary, for crash tests.

``VITALPROOF_CRASH_AT=<name>`` (the setting ``runtime.crash_at``) makes the first call to
``crashpoint(<name>)`` kill the process with SIGKILL (nothing flushed, no ``finally``, no
atexit: exactly what ``kill -9`` does); ``<name>:<n>`` kills it at the n-th call instead. The
process's entry point arms it once (:func:`arm`: the CLI's ``main`` and the seal process's);
unarmed, every call is a no-op that costs one string comparison.

``<name>:<n>:stop`` freezes instead: the process stops its whole process group with SIGSTOP
(a worker and its seal process, as a stopped VM or a long GC pause would) at that exact
step, and goes on where it was once a SIGCONT reaches the group (the fencing drill,
``tests/test_fencing.py``).

Before dying the process writes ``vitalproof crashpoint <name> (<n>)`` to stderr (one
unbuffered ``write``), so a test can tell a crash point it reached from any other death.
"""

from __future__ import annotations

import os
import signal
import threading

ENV_VAR = "VITALPROOF_CRASH_AT"
#: The exit status a shell reports for a process killed by SIGKILL (128 + 9).
CRASH_EXIT_CODE = 128 + signal.SIGKILL
MARKER = "vitalproof crashpoint"


def parse_spec(spec: str) -> tuple[str, int]:
    """``"after_files"`` -> ``("after_files", 1)``, ``"after_files:3"`` -> ``(..., 3)``
    (a trailing ``:stop`` is :func:`arm`'s)."""
    name, sep, nth = spec.strip().removesuffix(":stop").partition(":")
    if not sep:
        return name, 1
    n = int(nth)
    if n < 1:
        raise ValueError(f"{ENV_VAR}={spec!r}: the occurrence must be >= 1")
    return name, n


_target, _nth = "", 1
_stop = False
_seen = 0
_lock = threading.Lock()  # a process may hit crash points from more than one thread


def arm(spec: str | None) -> None:
    """Crash at the point ``spec`` names (``NAME`` or ``NAME:N``); ``None`` or "": never."""
    global _target, _nth, _seen, _stop
    _target, _nth = parse_spec(spec or "")
    _stop = (spec or "").strip().endswith(":stop")
    _seen = 0


def crashpoint(name: str) -> None:
    """Die like ``kill -9`` if the armed spec names this point (and occurrence)."""
    global _seen, _target
    if name != _target:
        return
    with _lock:
        _seen += 1
        if _seen < _nth:
            return
        if _stop:
            _target = ""  # once: the drill resumes the process and watches what it does
            os.write(2, f"{MARKER} {name} ({_seen}) stop\n".encode())
            os.killpg(os.getpgrp(), signal.SIGSTOP)  # returns once SIGCONT came
            return
        os.write(2, f"{MARKER} {name} ({_seen})\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
