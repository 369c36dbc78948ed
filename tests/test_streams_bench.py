"""The streams benchmark's workload looks like real traffic: nothing in it gets flagged.

Enrolled at bench start, devices whose generated times begin hours earlier had every sample
flagged BEFORE_ENROLLMENT, and normalize was measured on its per-sample flagging path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from streams.normalize import Rejection, normalize
from vitalproof.registry import Registry

BENCH = Path(__file__).resolve().parent.parent / "bench" / "streams_bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("streams_bench", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("encoding", ["json", "binary"])
def test_generated_samples_normalize_unflagged_when_enrolled_as_the_bench_does(
    bench: ModuleType, tmp_path: Path, encoding: str
) -> None:
    msgs = bench.generate(4_000, 5, 120, encoding=encoding)
    registry = Registry(tmp_path / "registry.sqlite")
    enrolled = bench.enrolled_us(msgs)
    assert enrolled < min(m.first_us for m in msgs)
    for d in sorted({m.device_id for m in msgs}):
        registry.enroll(d, f"pt-{d[4:]}", enrolled_us=enrolled)
    for m in msgs:
        out = normalize(bench.raw_record(m), registry.lookup)
        assert not isinstance(out, Rejection), out
        assert len(out) == m.samples
        assert min(out.device_time_us) == m.first_us
        assert not any(out.quality), m.device_id
