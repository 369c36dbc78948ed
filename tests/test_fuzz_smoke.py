"""A short coverage-guided fuzz of every reader of outside bytes (bench/fuzz.py, atheris):
each must return or raise the project's root error, nothing else, on a few thousand inputs
grown from valid seeds. The long runs (docs/benchmarks.md) are not CI's to make."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("gatt", "binary", "json", "clean", "mqtt", "bundle", "consent")

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("target", TARGETS)
def test_the_reader_survives_a_short_fuzz(target: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fuzz.py"), target, "--runs", "2000",
         "--artifacts", str(tmp_path / "findings")],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )  # fmt: skip
    (result,) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"], result.get("log_tail")
    assert result["runs"] == 2000 and result["findings"] == []
