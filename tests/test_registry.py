"""Enrollment time: now by default, or back-dated, never in the future."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vitalproof.errors import RegistryError
from vitalproof.registry import Registry


def test_enrollment_time_defaults_to_now(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry.sqlite")
    before = time.time_ns() // 1000
    device = registry.enroll("dev-1", "pat-1").device
    assert before <= device.enrolled_us <= time.time_ns() // 1000
    assert registry.get("dev-1") == device


def test_enrollment_time_can_be_back_dated_not_future_dated(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry.sqlite")
    past = time.time_ns() // 1000 - 7200 * 10**6
    device = registry.enroll("dev-1", "pat-1", enrolled_us=past).device
    assert device.enrolled_us == past
    assert registry.lookup("dev-1") == device
    with pytest.raises(RegistryError, match="future"):
        registry.enroll("dev-2", "pat-2", enrolled_us=time.time_ns() // 1000 + 3600 * 10**6)
    assert registry.get("dev-2") is None
