"""The thinning of chart history (clinic.service.clinician_routes.thin): a chart of hours of
50 Hz data gets at most about ``points`` rows, each bucket's lowest and highest value, and
every flagged reading, whatever thinning would have dropped; an invalid reading (a gap)
survives too."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from clinic.service.clinician_routes import thin
from streams import lake


def table(values: list[float | None], flagged: set[int]) -> pa.Table:
    n = len(values)
    return pa.table(
        {
            "device_time": pa.array([1_000_000 * i for i in range(n)], pa.int64()).cast(
                pa.timestamp("us", tz="UTC")
            ),
            "value": pa.array(values, pa.float64()),
            "quality": pa.array([2 if i in flagged else 0 for i in range(n)], pa.int32()),
        }
    )


def test_few_rows_come_back_whole_and_in_time_order() -> None:
    t = table([3.0, 1.0, 2.0], set()).take([2, 0, 1])
    out = thin(t, 100)
    assert out["value"].to_pylist() == [3.0, 1.0, 2.0]


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False)), min_size=1, max_size=3000
    ),
    points=st.integers(10, 400),
    data=st.data(),
)
def test_thinning_keeps_extremes_and_every_flag_within_the_budget(
    values: list[float | None], points: int, data: st.DataObject
) -> None:
    flagged = set(data.draw(st.lists(st.integers(0, len(values) - 1), max_size=20)))
    out = thin(table(values, flagged), points)
    kept_t = out["device_time"].cast(pa.int64()).to_pylist()
    assert kept_t == sorted(kept_t)
    assert out.num_rows <= points + len(flagged)
    kept = {t // 1_000_000 for t in kept_t}
    assert flagged <= kept
    numbers = [v for v in values if v is not None]
    if numbers:
        kept_values = [v for v in out["value"].to_pylist() if v is not None]
        assert max(numbers) in kept_values and min(numbers) in kept_values
    if None in values:
        assert None in out["value"].to_pylist()  # an invalid reading stays a gap


def test_the_lake_schema_has_the_columns_thinning_reads() -> None:
    names = set(lake.SCHEMA.names)
    assert {"device_time", "value", "quality", "seq", "device_id", "unit"} <= names
