"""The optional Rust extension (native/, module ``vitalproof_native``) for the seal path's hashes.

Reading ids, leaf salts, salted leaves and the batch root cost the worker about 2.4 µs per
sample in Python (6 µs under cProfile), one Python-level hash call each; the extension does
them over whole columns with the GIL released, in about 1 µs (native/README.md). It is
an accelerator, never a definition: the pure-Python functions stay the reference (anchor/ is
what verifiers run and never imports this), and tests/test_native.py holds the two
byte-identical. Without the extension everything still works, only slower, so its absence is
said once per process (a warning line) instead of failing; CI asserts it is installed.
``VITALPROOF_NATIVE=0`` forces the reference path, for A/B benchmarks.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType

log = logging.getLogger(__name__)
MODULE = "vitalproof_native"


@functools.cache
def ext() -> ModuleType | None:
    """The extension module, or ``None`` (warned about once) when it cannot be used."""
    if os.environ.get("VITALPROOF_NATIVE", "1") == "0":
        log.warning("%s disabled by VITALPROOF_NATIVE=0: hashing in pure Python", MODULE)
        return None
    try:
        return importlib.import_module(MODULE)
    except ImportError as e:
        log.warning(
            "%s is not importable (%s): hashing falls back to the slower pure-Python "
            "reference (make install builds it)",
            MODULE,
            e,
        )
        return None
