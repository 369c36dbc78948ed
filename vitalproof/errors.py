"""The errors every part of the pipeline shares, under the one root.

The root, :class:`VitalproofError`, is defined in the proof kit (the lowest layer, so that
the kit and the pipeline share it) and re-exported here, where the pipeline looks for it.
Modelled on sigstore-python: library code raises, only the CLI prints and exits, and every
error can explain itself to a person through :meth:`VitalproofError.diagnostics`.
"""

from __future__ import annotations

from vitalproof_verify.errors import VitalproofError

__all__ = [
    "ConfigError",
    "PrerequisiteMissing",
    "RegistryError",
    "StackError",
    "UnitError",
    "UsageError",
    "VitalproofError",
    "WireFormatError",
]


class ConfigError(VitalproofError):
    """A setting is missing or invalid."""


class PrerequisiteMissing(VitalproofError):
    """A program the local stack needs is not installed."""

    def __init__(self, program: str, how_to_install: str) -> None:
        super().__init__(f"{program} not found: {how_to_install}")
        self.program = program
        self.how_to_install = how_to_install


class StackError(VitalproofError):
    """A part of the local stack failed to start, stop or answer."""


class WireFormatError(VitalproofError):
    """A payload does not follow the wire schema it claims.

    ``offset`` is the byte (binary formats) or character (JSON) where decoding stopped,
    when known, so an operator can find the fault in a capture.
    """

    def __init__(self, message: str, *, offset: int | None = None) -> None:
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{message}{where}")
        self.reason = message
        self.offset = offset


class RegistryError(VitalproofError):
    """A device is unknown, retired, or enrolled twice."""


class UnitError(VitalproofError, ValueError):
    """A unit that is neither canonical for the metric nor convertible to it."""


class UsageError(VitalproofError):
    """Malformed input on the command line (a time, a metric, a missing option): exit 2."""
