"""The publishers of bench/collector_bench.py and bench/e2e_bench.py count the broker's
PUBACKs from raw bytes; a miscount would make every throughput they report wrong."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

BENCH = Path(__file__).resolve().parent.parent / "bench" / "collector_bench.py"


@pytest.fixture(scope="module")
def cb() -> ModuleType:
    spec = importlib.util.spec_from_file_location("collector_bench", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _varint(len(body)) + body


packets = st.lists(
    st.tuples(
        st.sampled_from([0x40, 0xD0, 0x30, 0xE0]),  # PUBACK, PINGRESP, PUBLISH, DISCONNECT
        st.binary(max_size=300),
    ),
    max_size=20,
)


@given(packets, st.data())
def test_pubacks_are_counted_across_any_split_of_the_stream(
    cb: ModuleType, pkts: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(_packet(k, b) for k, b in pkts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    total, rest = 0, b""
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        n, rest = cb.pubacks(rest + stream[a:b])
        total += n
    assert total == sum(1 for k, _ in pkts if k == 0x40)
    assert rest == b""


def test_a_packet_cut_in_its_length_bytes_waits_for_the_rest(cb: ModuleType) -> None:
    whole = _packet(0x40, b"\x00" * 200)  # remaining length takes two bytes
    assert cb.pubacks(whole[:2]) == (0, whole[:2])
    assert cb.pubacks(whole) == (1, b"")
