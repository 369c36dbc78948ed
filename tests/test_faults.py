"""Fault injection: spec parsing, reproducibility, and what each fault does to the stream."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_sims.faults import (
    FAULT_KEYS,
    MALFORMED_KINDS,
    Drop,
    Event,
    FaultInjector,
    FaultSpec,
    Send,
    Storm,
    inject,
    malform,
    parse_fault_spec,
)
from device_sims.physiology import SimDevice
from device_sims.record import GroundTruthWriter, reading_ids_of, summarize, valid_reading_ids
from vitalproof.errors import WireFormatError
from vitalproof.schema import SampleBatch

US = 1_000_000
T0 = 1_732_200_000 * US
DEVICES = [f"dev-{i}" for i in range(8)]


def _messages(n_per_device: int = 30) -> list[tuple[str, bytes]]:
    """Real simulator payloads, devices interleaved, one message per device per second."""
    sims = {d: SimDevice(d, seed=11, profile="dense", start_time_us=T0) for d in DEVICES}
    out = []
    for k in range(1, n_per_device + 1):
        for d, sim in sims.items():
            b = sim.tick(T0 + k * US)
            assert b is not None
            out.append((d, b.to_json()))
    return out


# -- spec parsing ------------------------------------------------------------------------


def test_parse_full_spec_and_round_trip() -> None:
    text = "dup=0.01,reorder=0.01,drop=0.0,malformed=0.001,skew=0.0,jump=0.0,reset=0.0,storm=0.0"
    spec = parse_fault_spec(text)
    assert spec == FaultSpec(dup=0.01, reorder=0.01, malformed=0.001)
    assert parse_fault_spec(str(spec)) == spec
    assert spec.any and not FaultSpec().any


@pytest.mark.parametrize("text", [None, "", "  ", "none", "off"])
def test_empty_spec_means_no_faults(text: str | None) -> None:
    assert parse_fault_spec(text) == FaultSpec()


def test_spec_tolerates_spaces_and_partial_keys() -> None:
    assert parse_fault_spec(" dup = 0.5 , storm=1 ,") == FaultSpec(dup=0.5, storm=1.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dupp=0.1", "unknown fault 'dupp'"),
        ("dup", "'dup' needs a probability"),
        ("dup=", "'dup' needs a probability"),
        ("dup=abc", "dup='abc' is not a number"),
        ("dup=1.5", "dup=1.5 is not a probability in [0, 1]"),
        ("drop=-0.1", "drop=-0.1 is not a probability"),
        ("drop=nan", "drop=nan is not a probability"),
        ("dup=0.1,dup=0.2", "'dup' given twice"),
        ("=0.1", "unknown fault ''"),
    ],
)
def test_bad_spec_is_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_fault_spec(text)
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("fault spec: ")


# -- reproducibility ----------------------------------------------------------------------

ALL = FaultSpec(
    dup=0.1, reorder=0.1, drop=0.05, malformed=0.1, skew=0.05, jump=0.03, reset=0.05, storm=0.05
)


def _run(spec: FaultSpec, seed: int, msgs: list[tuple[str, bytes]]) -> list[Event]:
    return list(inject(msgs, spec, seed, DEVICES))


def test_same_seed_same_faults_other_seed_other_faults() -> None:
    msgs = _messages()
    a, b, c = _run(ALL, 1, msgs), _run(ALL, 1, msgs), _run(ALL, 2, msgs)
    assert a == b
    assert a != c


def test_faults_do_not_depend_on_device_interleaving() -> None:
    """Per-device RNGs: a fleet whose scheduling differs run to run still gets the same faults."""
    msgs = _messages()
    shuffled = msgs[:]
    random.Random(3).shuffle(shuffled)
    # Keep each device's own order (that is all a fleet guarantees), change the interleaving.
    per_device = {d: [m for m in msgs if m[0] == d] for d in DEVICES}
    interleaved = [per_device[d].pop(0) for d, _ in shuffled]

    def by_device(events: list[Event]) -> dict[str, list[Event]]:
        out: dict[str, list[Event]] = {}
        for e in events:
            key = e.device_ids[0] if isinstance(e, Storm) else e.device_id
            out.setdefault(key, []).append(e)
        return out

    assert by_device(_run(ALL, 5, msgs)) == by_device(_run(ALL, 5, interleaved))


def test_enabling_one_fault_does_not_move_another() -> None:
    msgs = _messages()
    dups_alone = [e for e in _run(FaultSpec(dup=0.2), 9, msgs) if isinstance(e, Send)]
    with_drop = [e for e in _run(FaultSpec(dup=0.2, drop=0.2), 9, msgs) if isinstance(e, Send)]
    dup_payloads_alone = {e.payload for e in dups_alone if e.duplicate}
    dup_payloads_with = {e.payload for e in with_drop if e.duplicate}
    assert dup_payloads_with <= dup_payloads_alone  # drop removes some, moves none


def test_no_faults_is_the_identity() -> None:
    msgs = _messages(5)
    events = _run(FaultSpec(), 0, msgs)
    assert events == [Send(d, p) for d, p in msgs]


# -- each fault ---------------------------------------------------------------------------


def test_dup_sends_the_same_bytes_twice() -> None:
    msgs = _messages(10)
    events = _run(FaultSpec(dup=1.0), 0, msgs)
    assert len(events) == 2 * len(msgs)
    for (d, p), first, second in zip(msgs, events[::2], events[1::2], strict=True):
        assert first == Send(d, p) and second == Send(d, p, duplicate=True)


def test_drop_loses_messages() -> None:
    msgs = _messages(10)
    events = _run(FaultSpec(drop=0.3), 4, msgs)
    drops = [e for e in events if isinstance(e, Drop)]
    sends = [e for e in events if isinstance(e, Send)]
    assert drops and len(drops) + len(sends) == len(msgs)


def test_reorder_swaps_with_the_next_message_of_the_same_device() -> None:
    msgs = [(d, p) for d, p in _messages(20) if d == "dev-0"]
    events = _run(FaultSpec(reorder=0.3), 3, msgs)
    sent = [e for e in events if isinstance(e, Send)]
    assert sorted(e.payload for e in sent) == sorted(p for _, p in msgs)  # nothing lost
    order = [next(i for i, (_, p) in enumerate(msgs) if p == e.payload) for e in sent]
    assert order != sorted(order)
    for e, i in zip(sent, order, strict=True):
        if e.reordered:
            assert i < len(msgs) - 1  # the held message came after a later one (or at flush)


def test_reorder_holds_until_flush_at_the_end() -> None:
    inj = FaultInjector(FaultSpec(reorder=1.0), 0)
    assert inj.apply("d", b'{"x":1}') == []
    assert inj.flush() == [Send("d", b'{"x":1}', reordered=True)]
    assert inj.flush() == []


def _rows(device: str, payload: bytes) -> list[tuple[str, int, int]]:
    b = SampleBatch.from_json(payload, device_id=device)
    return sorted(zip(b.metric, b.seq, b.device_time_us, strict=True))


def test_skew_and_jump_shift_the_device_clock_persistently() -> None:
    msgs = [(d, p) for d, p in _messages(40) if d == "dev-1"]
    events = _run(FaultSpec(skew=0.1, jump=0.05), 8, msgs)
    shifted = [e for e in events if isinstance(e, Send)]
    offsets = []
    for (d, p), e in zip(msgs, shifted, strict=True):
        orig, new = _rows(d, p), _rows(d, e.payload)
        deltas = {n[2] - o[2] for o, n in zip(orig, new, strict=True)}
        assert len(deltas) == 1  # the whole payload moves together
        assert [o[:2] for o in orig] == [n[:2] for n in new]  # seq untouched
        offsets.append(deltas.pop())
    assert len(set(offsets)) > 1
    # Persistent: once shifted, the clock never silently returns to the truth.
    first_shift = next(i for i, o in enumerate(offsets) if o != 0)
    assert all(o != 0 for o in offsets[first_shift:])
    assert any(abs(o) >= 3_600 * US for o in offsets)  # a jump of an hour or more


def test_reset_restarts_the_sequence_but_keeps_ids_unique() -> None:
    msgs = [(d, p) for d, p in _messages(40) if d == "dev-2"]
    events = _run(FaultSpec(reset=0.1), 2, msgs)
    seqs = [_rows("dev-2", e.payload) for e in events if isinstance(e, Send)]
    firsts = [min(s for _, s, _ in rows) for rows in seqs]
    assert firsts.count(0) >= 2  # power-on plus at least one reboot
    ids = [rid for e in events if isinstance(e, Send) for rid in reading_ids_of("dev-2", e.payload)]
    assert len(ids) == len(set(ids))  # time keeps the ids apart after a seq reset


def test_storm_names_a_group_including_the_sender() -> None:
    events = _run(FaultSpec(storm=0.2), 1, _messages(10))
    storms = [e for e in events if isinstance(e, Storm)]
    assert storms
    for s in storms:
        assert set(s.device_ids) <= set(DEVICES) and len(s.device_ids) >= 2
        assert len(set(s.device_ids)) == len(s.device_ids)
    # Without the fleet list, a storm affects only the sender.
    inj = FaultInjector(FaultSpec(storm=1.0), 0)
    assert isinstance(inj.apply("solo", _messages(1)[0][1])[0], Storm)


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_every_malformed_kind_is_rejected_by_the_wire_codec(kind: str) -> None:
    device, payload = _messages(3)[-1]
    rng = random.Random(kind)
    for _ in range(20):
        bad = malform(payload, kind, rng)
        assert bad != payload
        with pytest.raises(WireFormatError):
            SampleBatch.from_json(bad, device_id=device)
        assert reading_ids_of(device, bad) == []


def test_malformed_events_name_their_reason() -> None:
    events = _run(FaultSpec(malformed=0.5), 6, _messages(10))
    bad = [e for e in events if isinstance(e, Send) and e.malformed]
    assert {e.malformed for e in bad} <= set(MALFORMED_KINDS)
    assert len({e.malformed for e in bad}) >= 5


def test_counts_match_events() -> None:
    msgs = _messages()
    inj = FaultInjector(ALL, 13, DEVICES)
    events = [e for d, p in msgs for e in inj.apply(d, p)] + inj.flush()
    c = inj.counts
    assert c.drop == sum(isinstance(e, Drop) for e in events)
    assert c.storm == sum(isinstance(e, Storm) for e in events)
    assert c.dup == sum(isinstance(e, Send) and e.duplicate for e in events)
    assert c.malformed == sum(
        isinstance(e, Send) and bool(e.malformed) and not e.duplicate for e in events
    )
    assert all(isinstance(getattr(c, k), int) for k in FAULT_KEYS)


@settings(max_examples=30, deadline=None)
@given(
    probs=st.fixed_dictionaries({k: st.sampled_from([0.0, 0.05, 0.3, 1.0]) for k in FAULT_KEYS}),
    seed=st.integers(0, 2**32),
)
def test_any_spec_conserves_messages(probs: dict[str, float], seed: int) -> None:
    """Every input message is sent (maybe twice, maybe broken) or dropped, never vanishes."""
    msgs = _messages(4)
    events = _run(FaultSpec(**probs), seed, msgs)
    drops = sum(isinstance(e, Drop) for e in events)
    originals = sum(isinstance(e, Send) and not e.duplicate for e in events)
    assert drops + originals == len(msgs)
    for e in events:
        if isinstance(e, Send) and not e.malformed:
            assert reading_ids_of(e.device_id, e.payload) == valid_reading_ids(
                e.device_id, e.payload
            )


# -- ground truth file ---------------------------------------------------------------------


def test_ground_truth_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "gt.jsonl"
    msgs = _messages(10)
    events = _run(ALL, 21, msgs)
    sent_ids: set[str] = set()
    with GroundTruthWriter(path) as w:
        for e in events:
            if isinstance(e, Send):
                ids = [] if e.malformed else reading_ids_of(e.device_id, e.payload)
                sent_ids.update(ids)
                w.message(
                    e.device_id, e.payload, ids, malformed_reason=e.malformed, duplicate=e.duplicate
                )
            elif isinstance(e, Drop):
                w.drop(e.device_id, reading_ids_of(e.device_id, e.payload))
            else:
                w.storm(e.device_ids)
    s = summarize(path)
    sends = [e for e in events if isinstance(e, Send)]
    assert s.messages == len(sends)
    assert s.malformed == sum(bool(e.malformed) for e in sends)
    assert s.duplicates == sum(e.duplicate for e in sends)
    assert s.dropped_messages == sum(isinstance(e, Drop) for e in events)
    assert s.storms == sum(isinstance(e, Storm) for e in events)
    assert s.distinct_reading_ids == len(sent_ids)
    assert sum(s.malformed_by_reason.values()) == s.malformed
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    msg_lines = [x for x in lines if x["kind"] == "msg"]
    assert [x["index"] for x in msg_lines] == list(range(len(msg_lines)))
    assert all(x["reading_ids"] == [] for x in msg_lines if x["malformed"])
