"""The CLI as people use it: settings from the environment, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vitalproof.settings import Settings


def vp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vitalproof", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | (env or {}),
    )


def test_relative_home_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemons run in their own folders: a relative state path must not reach them."""
    monkeypatch.chdir(tmp_path)
    s = Settings(home=Path(".vitalproof"))
    assert s.home == tmp_path / ".vitalproof"
    assert s.home.is_absolute() and s.stack_dir.is_absolute()
    again = Settings(**{k.removeprefix("VITALPROOF_").lower(): v for k, v in s.to_env().items()})
    assert again == s


def test_ble_decode_prints_readings() -> None:
    out = vp("ble", "decode", "2a37", "16480304")  # contact detected, 72 /min, one RR
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    metrics = {r["metric"]: r for r in doc["readings"]}
    assert metrics["heart_rate"]["value"] == 72 and metrics["heart_rate"]["unit"] == "/min"
    assert metrics["rr_interval"]["unit"] == "ms"
    assert abs(metrics["rr_interval"]["value"] - 0x0403 * 1000 / 1024) < 1e-9


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("2a37", "1648030"), "byte"),  # odd hex digits
        (("2a37", "1048"), "truncated"),  # RR flag set, no RR bytes
        (("2aff", "00"), "2aff"),  # not a characteristic we know
    ],
)
def test_ble_decode_errors_are_one_line_exit_2(args: tuple[str, str], needle: str) -> None:
    out = vp("ble", "decode", *args)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error:")
    assert needle in out.stderr


def test_verify_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    out = vp("verify", str(tmp_path / "nope.json"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1


def test_missing_prerequisite_is_reported_in_one_line(tmp_path: Path) -> None:
    out = vp("stack", "up", env={"PATH": str(tmp_path), "VITALPROOF_HOME": str(tmp_path / "h")})
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1, out.stderr
    assert "not found" in out.stderr and "install" in out.stderr
