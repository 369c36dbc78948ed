"""The pipeline's health figures, computed from what the sources read (pure: no I/O).

Why pure: every rule here (what a consumer's lag is, how a rate is measured, what of a DLQ
reason may be shown to anyone who can reach ``/metrics``) is decided once and tested without
Kafka; :mod:`clinic.health.sources` only reads offsets and files.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from vitalproof.raw import H_DLQ_REASON, H_DLQ_STAGE

#: Seconds a rate is measured over (the change of a counter between two samples that far apart).
RATE_WINDOW_S = 5.0
#: Seconds of rate history kept for the operator page's chart.
HISTORY_S = 600.0
#: Distinct DLQ reasons counted apart; past that they are counted as "other reasons", so a
#: flood of odd rejections cannot grow the metrics without bound.
MAX_REASONS = 50
#: Longest reason shown (after redaction).
MAX_REASON_CHARS = 80

#: The counters whose rates the page charts: records in on each topic, sealed records (what
#: the sealer acknowledged on vitals.clean) and sealed readings (the manifests' rows).
SERIES = ("raw_in", "clean_in", "sealed_records", "sealed_readings")


# -- consumer lag ---------------------------------------------------------------------------


def partition_lag(end: int, begin: int, committed: int | None, *, from_start: bool) -> int:
    """Records a consumer group has still to read on one partition.

    A committed offset is the next record the group reads. A group that never committed on a
    partition reads it from its first retained record if it starts at the earliest offset
    (the worker, the anchor job), or from the end if it starts at the latest (the service's
    fan-out: a live view has nothing to catch up)."""
    if committed is None or committed < 0:
        return end - begin if from_start else 0
    return max(0, end - max(committed, begin))


def group_lag(
    end: Mapping[int, int],
    begin: Mapping[int, int],
    committed: Mapping[int, int],
    *,
    from_start: bool,
) -> int:
    """:func:`partition_lag` summed over a topic's partitions (keyed by partition number)."""
    return sum(
        partition_lag(e, begin.get(p, 0), committed.get(p), from_start=from_start)
        for p, e in end.items()
    )


# -- rates ----------------------------------------------------------------------------------


@dataclass
class Throughput:
    """Rates of monotone counters, measured over :data:`RATE_WINDOW_S` from the samples the
    service takes itself, and their history over :data:`HISTORY_S`.

    A counter that is unknown in a sample (Kafka unreachable) has no rate there: a gap in the
    chart, not a zero. One that went down (a topic recreated) restarts its measure."""

    window_s: float = RATE_WINDOW_S
    keep_s: float = HISTORY_S
    _samples: deque[tuple[float, dict[str, int | None]]] = field(default_factory=deque)
    history: deque[tuple[float, dict[str, float | None]]] = field(default_factory=deque)

    def add(self, t: float, counters: Mapping[str, int | None]) -> dict[str, float | None]:
        """Take a sample at ``t`` (seconds); the rates per second it gives."""
        sample = dict(counters)
        self._samples.append((t, sample))
        while len(self._samples) > 1 and self._samples[1][0] <= t - self.window_s:
            self._samples.popleft()
        rates = {name: self._rate(name, t, value) for name, value in sample.items()}
        self.history.append((t, rates))
        while self.history and self.history[0][0] < t - self.keep_s:
            self.history.popleft()
        return rates

    def _rate(self, name: str, t: float, value: int | None) -> float | None:
        """The change since the earliest sample in the window after the counter last went
        down (newest first: a decrease is where a recreated topic started again)."""
        if value is None:
            return None
        base: tuple[float, int] | None = None
        later = value
        for t0, earlier in reversed(self._samples):
            v0 = earlier.get(name)
            if t0 >= t or v0 is None:
                continue
            if v0 > later:
                break
            base, later = (t0, v0), v0
        if base is None:
            return None
        return (value - base[1]) / (t - base[0])

    def latest(self) -> dict[str, float | None]:
        return dict(self.history[-1][1]) if self.history else {}

    def columns(self, names: tuple[str, ...] = SERIES) -> dict[str, list[float | None]]:
        """The history as columns (``t`` in seconds, then one per series), as uPlot takes it."""
        out: dict[str, list[float | None]] = {"t": [round(t, 3) for t, _ in self.history]}
        for name in names:
            out[name] = [rounded(r.get(name)) for _, r in self.history]
        return out


def rounded(x: float | None) -> float | None:
    """A figure as shown (three decimals), or None."""
    return None if x is None else round(x, 3)


# -- DLQ reasons ----------------------------------------------------------------------------

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_INDEX = re.compile(r"\[\d+\]")
_NAMED = re.compile(r"\b(device|got|from)\s+(?!id\b)(?!…)\S+", re.IGNORECASE)
_DIGITS = re.compile(r"\S*\d\S*")
_ELLIPSES = re.compile(r"…(?:[\s,.;:]*…)+")
_STAGE = re.compile(r"^[a-z][a-z0-9_-]{0,15}$")
UNSPECIFIED = "unspecified"
OTHER_REASONS = "other reasons"


def reason_kind(reason: str) -> str:
    """A DLQ reason with what names or quotes the record taken out: a kind of rejection, the
    same for every record rejected the same way.

    Reasons are free text written where records are rejected (``unknown device dev-7``,
    ``series[0][3]: value 'x' is not a number``, ``... got 6e``): they may quote a device id,
    a value or the payload's bytes, which must not reach a metric's label. Quoted text, the
    word after ``device``/``got``/``from``, and every token holding a digit become ``…``."""
    text = _QUOTED.sub("…", reason)
    text = _INDEX.sub("[…]", text)
    text = _NAMED.sub(lambda m: f"{m.group(1)} …", text)
    text = _DIGITS.sub("…", text)
    text = _ELLIPSES.sub("…", " ".join(text.split()))
    if len(text) > MAX_REASON_CHARS:
        text = text[: MAX_REASON_CHARS - 1].rstrip() + "…"
    return text or UNSPECIFIED


def stage_kind(stage: str) -> str:
    """The DLQ stage header (``normalize``, ``seal``, ``ble``), or ``other`` if it is not one
    short lowercase word."""
    return stage if _STAGE.match(stage) else "other"


@dataclass
class DlqTally:
    """DLQ records counted by (stage, reason kind)."""

    max_reasons: int = MAX_REASONS
    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, headers: Mapping[str, bytes]) -> None:
        stage = stage_kind(_text(headers.get(H_DLQ_STAGE)))
        reason = _text(headers.get(H_DLQ_REASON))
        key = (stage, reason_kind(reason) if reason else UNSPECIFIED)
        if key not in self.counts and len(self.counts) >= self.max_reasons:
            key = (stage, OTHER_REASONS)
        self.counts[key] = self.counts.get(key, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def rows(self) -> list[tuple[str, str, int]]:
        """``(stage, reason, records)``, most records first."""
        return sorted(((s, r, n) for (s, r), n in self.counts.items()), key=lambda x: -x[2])


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8", "replace") if raw else ""


# -- what the sources read ------------------------------------------------------------------


@dataclass(frozen=True)
class Consumer:
    """A consumer group of the pipeline on one topic, and where it starts without a commit."""

    name: str  # normalize | seal | anchor | fanout
    group: str
    topic: str
    from_start: bool


@dataclass(frozen=True)
class Offsets:
    """One topic's partitions: the next offset to be written, and the first one retained."""

    end: dict[int, int]
    begin: dict[int, int]

    @property
    def records(self) -> int:
        """Records ever written (the sum of end offsets: no transactional producer writes
        these topics, so every offset is one record)."""
        return sum(self.end.values())


@dataclass(frozen=True)
class Lag:
    consumer: Consumer
    records: int


@dataclass(frozen=True)
class KafkaFigures:
    """Records written per topic (by topic name), and each consumer's lag."""

    records: dict[str, int]
    lag: list[Lag]

    def consumed(self, name: str) -> int | None:
        """Records of its topic the consumer ``name`` has done with (written less its lag)."""
        for lag in self.lag:
            if lag.consumer.name == name:
                return self.records.get(lag.consumer.topic, 0) - lag.records
        return None


def kafka_figures(
    topics: Mapping[str, Offsets],
    commits: Mapping[str, Mapping[tuple[str, int], int]],
    consumers: list[Consumer],
) -> KafkaFigures:
    """The figures from the topics' offsets and each group's commits (``(topic, partition)
    -> offset``); a topic that does not exist yet is left out."""
    lags = []
    for c in consumers:
        offsets = topics.get(c.topic)
        if offsets is None:
            continue
        committed = {p: o for (t, p), o in commits.get(c.group, {}).items() if t == c.topic}
        lags.append(
            Lag(c, group_lag(offsets.end, offsets.begin, committed, from_start=c.from_start))
        )
    return KafkaFigures({name: o.records for name, o in topics.items()}, lags)


@dataclass(frozen=True)
class Sealed:
    """What the lake's manifests (the sealer's commit point) say was sealed."""

    readings: int = 0
    batches: int = 0
    last_sealed_us: int | None = None


@dataclass(frozen=True)
class LastAnchor:
    """The last log head put on-chain, as the anchor job recorded its receipt."""

    tx_hash: str
    block_number: int
    block_time: float  # the block's timestamp, seconds since the epoch
    tree_size: int
    chain_id: int
    anchors: int  # heads anchored so far

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.block_time)
