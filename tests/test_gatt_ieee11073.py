"""IEEE 11073-20601 SFLOAT/FLOAT: vectors written from Annex F, specials, round trips."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vitalproof.wire.ieee11073 import (
    FLOAT_SPECIAL,
    SFLOAT_SPECIAL,
    MderFloat,
    Special,
    decode_float,
    decode_sfloat,
    encode_float,
    encode_sfloat,
    float_from_value,
    sfloat_from_value,
)


@pytest.mark.parametrize(
    ("raw", "mantissa", "exponent", "value"),
    [
        (0x0000, 0, 0, 0.0),
        (0x0048, 72, 0, 72.0),
        (0xF16D, 365, -1, 36.5),  # exponent 0xF = -1, mantissa 0x16D = 365
        (0xFFFF, -1, -1, -0.1),
        (0x0FFF, -1, 0, -1.0),
        (0xB05F, 95, -5, 0.00095),  # glucose 95 mg/dL in kg/L
        (0x1001, 1, 1, 10.0),
        (0x77FD, 2045, 7, 2045e7),
        (0x8803, -2045, -8, -2045e-8),
        (0x17FF, 2047, 1, 20470.0),  # reserved mantissa, but exponent 1: a number
    ],
)
def test_sfloat_vectors(raw: int, mantissa: int, exponent: int, value: float) -> None:
    x = decode_sfloat(raw)
    assert (x.mantissa, x.exponent, x.special) == (mantissa, exponent, None)
    assert x.value == value


@pytest.mark.parametrize(
    ("raw", "mantissa", "exponent", "value"),
    [
        (0x00000000, 0, 0, 0.0),
        (0xFF00016D, 365, -1, 36.5),
        (0xFE000E41, 3649, -2, 36.49),
        (0x00FFFFFF, -1, 0, -1.0),
        (0x027FFFFD, 8388605, 2, 838860500.0),
        (0x80000001, 1, -128, 1e-128),
    ],
)
def test_float_vectors(raw: int, mantissa: int, exponent: int, value: float) -> None:
    x = decode_float(raw)
    assert (x.mantissa, x.exponent, x.special) == (mantissa, exponent, None)
    assert x.value == value


SPECIALS = [
    (0x07FF, 0x007FFFFF, Special.NAN),
    (0x0800, 0x00800000, Special.NRES),
    (0x07FE, 0x007FFFFE, Special.POSITIVE_INFINITY),
    (0x0802, 0x00800002, Special.NEGATIVE_INFINITY),
    (0x0801, 0x00800001, Special.RESERVED),
]


@pytest.mark.parametrize(("s16", "s32", "special"), SPECIALS)
def test_specials_are_never_numbers(s16: int, s32: int, special: Special) -> None:
    for x in (decode_sfloat(s16), decode_float(s32)):
        assert x.special is special
        assert x.is_special
        assert math.isnan(x.value)
        assert math.isnan(x.scaled(5))
    assert encode_sfloat(MderFloat.of(special)) == s16 == SFLOAT_SPECIAL[special]
    assert encode_float(MderFloat.of(special)) == s32 == FLOAT_SPECIAL[special]


def test_from_value_picks_canonical_forms() -> None:
    assert sfloat_from_value(72.0) == MderFloat(72, 0)
    assert sfloat_from_value(36.5) == MderFloat(365, -1)
    assert sfloat_from_value(0.0) == MderFloat(0, 0)
    assert sfloat_from_value(98.25) == MderFloat(982, -1)  # 4 digits: rounded half-even
    assert sfloat_from_value(1234.5) == MderFloat(1234, 0)
    assert sfloat_from_value(36.5, exponent=-1) == MderFloat(365, -1)
    assert sfloat_from_value(36.5, exponent=0) == MderFloat(36, 0)  # half-even
    assert float_from_value(36.49) == MderFloat(3649, -2)
    assert sfloat_from_value(math.nan).special is Special.NAN
    assert sfloat_from_value(math.inf).special is Special.POSITIVE_INFINITY
    assert float_from_value(-math.inf).special is Special.NEGATIVE_INFINITY
    with pytest.raises(ValueError):
        sfloat_from_value(1e30)


def test_encoder_refuses_reserved_and_out_of_range_mantissas() -> None:
    for m in (2046, 2047, -2046, -2047, -2048):
        with pytest.raises(ValueError):
            encode_sfloat(MderFloat(m, 0))
    with pytest.raises(ValueError):
        encode_sfloat(MderFloat(1, 8))
    with pytest.raises(ValueError):
        encode_float(MderFloat(8388606, 0))


@given(st.integers(0, 0xFFFF))
def test_every_sfloat_decodes(raw: int) -> None:
    x = decode_sfloat(raw)
    if x.special is None:
        assert -2048 <= x.mantissa <= 2047 and -8 <= x.exponent <= 7
        assert not math.isnan(x.value)
    else:
        assert raw in SFLOAT_SPECIAL.values()


@given(st.integers(-2045, 2045), st.integers(-8, 7))
def test_sfloat_round_trip(m: int, e: int) -> None:
    x = MderFloat(m, e)
    raw = encode_sfloat(x)
    assert 0 <= raw <= 0xFFFF
    assert decode_sfloat(raw) == x


@given(st.integers(-(2**23 - 3), 2**23 - 3), st.integers(-128, 127))
def test_float_round_trip(m: int, e: int) -> None:
    x = MderFloat(m, e)
    raw = encode_float(x)
    assert 0 <= raw <= 0xFFFFFFFF
    assert decode_float(raw) == x


@given(st.floats(min_value=-2045e7, max_value=2045e7, allow_nan=False))
def test_sfloat_from_value_is_close(v: float) -> None:
    x = sfloat_from_value(v)
    got = decode_sfloat(encode_sfloat(x)).value
    # 11073 SFLOAT keeps ~3.3 significant digits; the rounding error is half a step.
    assert abs(got - v) <= 0.5 * 10.0**x.exponent * (1 + 1e-9) + 1e-8
