"""IEEE 11073-20601 SFLOAT (medfloat16) and FLOAT (medfloat32) codecs.

Health-device characteristics carry their measurements as base-10 floats so that a reading
such as 36.5 Cel or 0.00095 kg/L travels exactly, which IEEE 754 binary floats cannot do.
Bluetooth GATT Specification Supplement (GSS) section 2.3 ("medfloat16"/"medfloat32") defers
to IEEE 11073-20601 Annex F.7/F.8:

* SFLOAT: 16 bits, a 4-bit signed exponent (high nibble) and a 12-bit signed mantissa.
* FLOAT: 32 bits, an 8-bit signed exponent (high byte) and a 24-bit signed mantissa.

value = mantissa * 10 ** exponent, both in two's complement. With exponent 0, five mantissa
values are reserved: NaN (0x07FF / 0x007FFFFF), NRes "not at this resolution"
(0x0800 / 0x00800000), +INFINITY (0x07FE / 0x007FFFFE), -INFINITY (0x0802 / 0x00800002) and
one reserved for future use (0x0801 / 0x00800001). None of them is a measurement, so the
parsers turn every one into a reading with value NaN flagged ``Quality.INVALID``; keeping
the :class:`Special` kind lets an operator still tell "sensor said NaN" from "+INF".

Decoding is exact: ``mantissa * 10**exponent`` is computed from integers and rounded once,
so (365, -1) becomes the double nearest to 36.5, not ``365 * 0.1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from enum import Enum

__all__ = [
    "FLOAT_SPECIAL",
    "SFLOAT_SPECIAL",
    "MderFloat",
    "Special",
    "decode_float",
    "decode_sfloat",
    "encode_float",
    "encode_sfloat",
    "float_from_value",
    "sfloat_from_value",
]


class Special(Enum):
    """The IEEE 11073 reserved values: a device's way of saying "no number here"."""

    NAN = "NaN"
    NRES = "NRes"
    POSITIVE_INFINITY = "+INF"
    NEGATIVE_INFINITY = "-INF"
    RESERVED = "reserved"


#: Raw 16-bit SFLOAT encodings of the special values (exponent 0).
SFLOAT_SPECIAL: dict[Special, int] = {
    Special.NAN: 0x07FF,
    Special.NRES: 0x0800,
    Special.POSITIVE_INFINITY: 0x07FE,
    Special.NEGATIVE_INFINITY: 0x0802,
    Special.RESERVED: 0x0801,
}
#: Raw 32-bit FLOAT encodings of the special values (exponent 0).
FLOAT_SPECIAL: dict[Special, int] = {
    Special.NAN: 0x007FFFFF,
    Special.NRES: 0x00800000,
    Special.POSITIVE_INFINITY: 0x007FFFFE,
    Special.NEGATIVE_INFINITY: 0x00800002,
    Special.RESERVED: 0x00800001,
}
_SFLOAT_BY_RAW = {raw: s for s, raw in SFLOAT_SPECIAL.items()}
_FLOAT_BY_RAW = {raw: s for s, raw in FLOAT_SPECIAL.items()}


@dataclass(frozen=True, slots=True)
class _Layout:
    exp_bits: int
    mant_bits: int
    specials: dict[Special, int]
    by_raw: dict[int, Special]

    @property
    def exp_min(self) -> int:
        return -(1 << (self.exp_bits - 1))

    @property
    def exp_max(self) -> int:
        return (1 << (self.exp_bits - 1)) - 1

    @property
    def mant_max(self) -> int:
        # +2^(n-1)-1 and +2^(n-1)-2 are NaN and +INF; -2^(n-1) .. -2^(n-1)+2 are NRes,
        # reserved and -INF. An encoder never emits them, whatever the exponent, so a
        # finite value can never be mistaken for a special one by a lenient decoder.
        return (1 << (self.mant_bits - 1)) - 3


_SFLOAT = _Layout(4, 12, SFLOAT_SPECIAL, _SFLOAT_BY_RAW)
_FLOAT = _Layout(8, 24, FLOAT_SPECIAL, _FLOAT_BY_RAW)


@dataclass(frozen=True, slots=True)
class MderFloat:
    """A decoded 11073 float: ``mantissa * 10**exponent``, or a :class:`Special`.

    For a special value ``mantissa`` and ``exponent`` are 0 and carry no meaning.
    """

    mantissa: int
    exponent: int
    special: Special | None = None

    @classmethod
    def of(cls, special: Special) -> MderFloat:
        return cls(0, 0, special)

    @property
    def is_special(self) -> bool:
        return self.special is not None

    @property
    def value(self) -> float:
        """The number, or NaN for any special value (NRes and +/-INF included)."""
        return self.scaled(0)

    def scaled(self, shift: int) -> float:
        """``mantissa * 10**(exponent + shift)`` rounded once; NaN for special values.

        Unit changes by powers of ten (kg/L -> mg/dL is ``shift=5``) go through here so
        that they stay exact instead of multiplying an already rounded double.
        """
        if self.special is not None:
            return math.nan
        e = self.exponent + shift
        if e >= 0:
            return float(self.mantissa * 10**e)
        return self.mantissa / 10**-e


def _decode(raw: int, layout: _Layout) -> MderFloat:
    total = layout.exp_bits + layout.mant_bits
    if not 0 <= raw < (1 << total):
        raise ValueError(f"raw value {raw:#x} does not fit in {total} bits")
    special = layout.by_raw.get(raw)
    if special is not None:
        return MderFloat.of(special)
    mant = raw & ((1 << layout.mant_bits) - 1)
    if mant >= 1 << (layout.mant_bits - 1):
        mant -= 1 << layout.mant_bits
    exp = raw >> layout.mant_bits
    if exp >= 1 << (layout.exp_bits - 1):
        exp -= 1 << layout.exp_bits
    return MderFloat(mant, exp)


def _encode(x: MderFloat, layout: _Layout) -> int:
    if x.special is not None:
        return layout.specials[x.special]
    if not layout.exp_min <= x.exponent <= layout.exp_max:
        raise ValueError(f"exponent {x.exponent} out of range")
    if abs(x.mantissa) > layout.mant_max:
        raise ValueError(f"mantissa {x.mantissa} out of range (|m| <= {layout.mant_max})")
    mant = x.mantissa & ((1 << layout.mant_bits) - 1)
    exp = x.exponent & ((1 << layout.exp_bits) - 1)
    return (exp << layout.mant_bits) | mant


def _from_value(value: float, layout: _Layout, exponent: int | None) -> MderFloat:
    if math.isnan(value):
        return MderFloat.of(Special.NAN)
    if math.isinf(value):
        return MderFloat.of(Special.POSITIVE_INFINITY if value > 0 else Special.NEGATIVE_INFINITY)
    d = Decimal(repr(float(value)))
    exps = range(layout.exp_min, layout.exp_max + 1) if exponent is None else (exponent,)
    for e in exps:
        m = int(d.scaleb(-e).to_integral_value(rounding=ROUND_HALF_EVEN))
        if abs(m) <= layout.mant_max:
            if m == 0:
                return MderFloat(0, 0 if exponent is None else e)
            if exponent is None:
                while m % 10 == 0 and e < layout.exp_max:
                    m, e = m // 10, e + 1
            return _check(MderFloat(m, e), layout)
    raise ValueError(f"{value!r} does not fit this 11073 float")


def _check(x: MderFloat, layout: _Layout) -> MderFloat:
    _encode(x, layout)
    return x


def decode_sfloat(raw: int) -> MderFloat:
    """Decode a raw 16-bit SFLOAT (already read little-endian from the PDU)."""
    return _decode(raw, _SFLOAT)


def decode_float(raw: int) -> MderFloat:
    """Decode a raw 32-bit FLOAT (already read little-endian from the PDU)."""
    return _decode(raw, _FLOAT)


def encode_sfloat(x: MderFloat) -> int:
    """The raw 16-bit SFLOAT of ``x``; ValueError when it does not fit."""
    return _encode(x, _SFLOAT)


def encode_float(x: MderFloat) -> int:
    """The raw 32-bit FLOAT of ``x``; ValueError when it does not fit."""
    return _encode(x, _FLOAT)


def sfloat_from_value(value: float, *, exponent: int | None = None) -> MderFloat:
    """The SFLOAT closest to ``value`` (its shortest decimal form), NaN/INF mapped to specials.

    Without ``exponent`` the smallest exponent whose mantissa fits is used (most precision),
    then trailing zeros are moved into the exponent, so 72.0 is (72, 0) and 36.5 is (365, -1).
    """
    return _from_value(value, _SFLOAT, exponent)


def float_from_value(value: float, *, exponent: int | None = None) -> MderFloat:
    """As :func:`sfloat_from_value`, for the 32-bit FLOAT."""
    return _from_value(value, _FLOAT, exponent)
