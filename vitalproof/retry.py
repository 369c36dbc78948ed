"""Waiting out an unreachable dependency: bounded exponential backoff, one log line per change.

Why here (the core): the MQTT collector waits for Kafka, the anchor job for the chain, the
seal process for lake disk space, and all three want the same behaviour instead of exiting
and leaning on a supervisor (docs/reliability.md, "self_exits"): pause 1 s, 2 s, 4 s ... up
to 30 s between tries (``VITALPROOF_RETRY_MIN_S`` / ``VITALPROOF_RETRY_MAX_S``), say once
that the dependency is away (what, where) and once that it is back, never once per try or
per message, and report the state for status output.

Which errors are worth waiting for is the caller's decision, made by an *error policy*: a
callable that gets the exception and returns a short reason to wait (it is transient) or
``None`` (it is not: re-raise it), the shape of quix-streams' ``on_processing_error``
callbacks. :func:`disk_full` is the lake's; the collector and the anchor job bring theirs.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vitalproof.settings import RuntimeSettings

__all__ = [
    "Backoff",
    "ErrorPolicy",
    "Outage",
    "RepeatFilter",
    "disk_full",
]

#: ``exception -> reason to wait and retry`` (transient) or ``None`` (re-raise it).
ErrorPolicy = Callable[[BaseException], str | None]


@dataclass
class Backoff:
    """Bounded exponential backoff: ``min_s``, then doubled each failure, at most ``max_s``.

    Pure: no clock, no sleep; :meth:`failed` returns how long to wait before the next try
    and :meth:`succeeded` starts again from ``min_s``. ``jitter`` (0..1) shortens each pause
    by up to that fraction, drawn from ``rand`` (so that many clients cut off together do
    not all come back in the same instant); 0 by default, which keeps the pauses exact.
    """

    min_s: float = 1.0
    max_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.0
    rand: Callable[[], float] = field(default=lambda: 0.0, repr=False)
    failures: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.min_s <= self.max_s:
            raise ValueError(f"backoff needs 0 < min_s <= max_s (got {self.min_s}, {self.max_s})")
        if self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("backoff needs factor >= 1 and 0 <= jitter <= 1")

    @classmethod
    def from_settings(cls, runtime: RuntimeSettings, *, factor: float = 2.0) -> Backoff:
        """``VITALPROOF_RETRY_MIN_S`` .. ``VITALPROOF_RETRY_MAX_S`` (a max below the min is
        raised to it: a setting of one alone never makes the pair invalid)."""
        lo = runtime.retry_min_s
        return cls(min_s=lo, max_s=max(lo, runtime.retry_max_s), factor=factor)

    def peek(self) -> float:
        """The pause the next :meth:`failed` would return (without jitter)."""
        # Stepwise, not min_s * factor**n: n grows without bound while a dependency is
        # away, and a power would overflow; 64 steps reach max_s from any sane min_s.
        delay = self.min_s
        for _ in range(min(self.failures, 64)):
            delay = min(delay * self.factor, self.max_s)
            if delay >= self.max_s:
                break
        return delay

    def failed(self) -> float:
        """One more failed try; the seconds to wait before the next one."""
        delay = self.peek()
        self.failures += 1
        return delay * (1.0 - self.jitter * self.rand())

    def succeeded(self) -> None:
        self.failures = 0


@dataclass
class Outage:
    """The state of one dependency (``what`` at ``where``) as its users see it, logged on
    change only: the first failure ("... unreachable ...; retrying with backoff") and the
    recovery ("... reachable again after N tries, T s"), and kept for status output.

    ``policy`` decides what is an outage at all (see :data:`ErrorPolicy`); an error it
    declines is re-raised by :meth:`failed`.
    """

    what: str
    where: str
    policy: ErrorPolicy
    backoff: Backoff = field(default_factory=Backoff)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger(__name__))
    clock: Callable[[], float] = time.monotonic
    since: float | None = None
    """Monotonic time of the first failure of the current outage; ``None`` while up."""
    reason: str = ""
    tries: int = 0
    outages: int = 0
    """Outages seen (each counted once, however many tries it took)."""

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> float:
        """Record a failed try with ``exc``; the seconds to wait before the next one. Raises
        ``exc`` again if the policy says it is not worth waiting for."""
        reason = self.policy(exc)
        if reason is None:
            raise exc
        delay = self.backoff.failed()
        self.tries += 1
        if self.since is None:
            self.since = self.clock()
            self.outages += 1
            self.reason = reason
            self.logger.warning(
                "%s %s: %s; retrying with backoff (%.3g s, at most %.3g s apart)",
                self.what,
                self.where,
                reason,
                delay,
                self.backoff.max_s,
            )
        else:
            self.reason = reason
            self.logger.debug("%s %s still failing (%s); next try in %.3g s", self.what,
                              self.where, reason, delay)  # fmt: skip
        return delay

    def succeeded(self) -> None:
        """A try worked: the outage, if any, is over (logged once)."""
        if self.since is not None:
            self.logger.warning(
                "%s %s: back after %d tries, %.1f s",
                self.what,
                self.where,
                self.tries,
                self.clock() - self.since,
            )
        self.since = None
        self.reason = ""
        self.tries = 0
        self.backoff.succeeded()

    def status(self) -> dict[str, object]:
        """For status output: ``{"state": "ok"|"waiting", ...}``."""
        if self.since is None:
            return {"state": "ok", "where": self.where, "outages": self.outages}
        return {
            "state": "waiting",
            "where": self.where,
            "reason": self.reason,
            "tries": self.tries,
            "down_s": round(self.clock() - self.since, 1),
            "outages": self.outages,
        }


class RepeatFilter(logging.Filter):
    """Lets the first record of each message template through, then at most one per
    ``every_s`` (saying how many it held back): for a library that logs every failed
    attempt. aiokafka's producer logs "Unable connect to node" thousands of times a second
    while its broker is down (183,000 lines in one minute of the kafka-outage drill);
    the outage itself is one line of :class:`Outage`."""

    def __init__(self, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self._last: dict[tuple[str, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        now = self.clock()
        seen = self._last.get(key)
        if seen is not None and now - seen[0] < self.every_s:
            self._last[key] = (seen[0], seen[1] + 1)
            return False
        held = 0 if seen is None else seen[1]
        self._last[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like it in the last {self.every_s:g} s)"
        return True


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def disk_full(exc: BaseException) -> str | None:
    """The lake's policy: wait for space on ENOSPC/EDQUOT (also pyarrow's, whose OSError
    carries the errno in its text only), re-raise anything else."""
    if not isinstance(exc, OSError):
        return None
    text = str(exc)
    if exc.errno in _DISK_FULL or "No space left on device" in text or "[errno 28]" in text:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"disk full{where} ([Errno 28] No space left on device)"
    return None
