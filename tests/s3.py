"""Helpers for tests whose lake is on the session's SeaweedFS (fixtures in conftest.py)."""

from __future__ import annotations

import uuid

from vitalproof.settings import LakeSettings


def s3_lake(server: LakeSettings) -> LakeSettings:
    """``server``'s lake group with a prefix of its own (``s3://bucket/lake/<random>``), so a
    test that walks every namespace of the lake (erasure, `namespaces`) sees only its own."""
    return server.model_copy(update={"root": f"{server.root}/{uuid.uuid4().hex[:12]}"})
