"""Metrics, their canonical UCUM units, and the few linear conversions devices need.

Every metric is stored in exactly one canonical UCUM unit so that researchers never have to
guess; devices may report in any unit listed in :data:`CONVERSIONS`, and normalization
converts (and flags the reading as converted). The table is hand-written because it is small
and domain-specific: a general UCUM engine would add a large dependency for six factors.
"""

from __future__ import annotations

from enum import StrEnum

from vitalproof.errors import UnitError


class Metric(StrEnum):
    """Canonical metric names (snake_case, stable: they appear in files and proofs)."""

    HEART_RATE = "heart_rate"
    RR_INTERVAL = "rr_interval"
    SPO2 = "spo2"
    PULSE_RATE = "pulse_rate"
    PULSE_AMPLITUDE_INDEX = "pulse_amplitude_index"
    BODY_TEMPERATURE = "body_temperature"
    SKIN_TEMPERATURE = "skin_temperature"
    SYSTOLIC_BP = "systolic_bp"
    DIASTOLIC_BP = "diastolic_bp"
    MEAN_ARTERIAL_PRESSURE = "mean_arterial_pressure"
    BODY_WEIGHT = "body_weight"
    BODY_HEIGHT = "body_height"
    BMI = "bmi"
    BLOOD_GLUCOSE = "blood_glucose"
    STEP_COUNT = "step_count"
    RESPIRATORY_RATE = "respiratory_rate"
    ENERGY_EXPENDED = "energy_expended"
    ACCEL_X = "accel_x"
    ACCEL_Y = "accel_y"
    ACCEL_Z = "accel_z"
    PPG = "ppg"
    BATTERY_LEVEL = "battery_level"


CANONICAL_UNIT: dict[Metric, str] = {
    Metric.HEART_RATE: "/min",
    Metric.RR_INTERVAL: "ms",
    Metric.SPO2: "%",
    Metric.PULSE_RATE: "/min",
    Metric.PULSE_AMPLITUDE_INDEX: "%",
    Metric.BODY_TEMPERATURE: "Cel",
    Metric.SKIN_TEMPERATURE: "Cel",
    Metric.SYSTOLIC_BP: "mm[Hg]",
    Metric.DIASTOLIC_BP: "mm[Hg]",
    Metric.MEAN_ARTERIAL_PRESSURE: "mm[Hg]",
    Metric.BODY_WEIGHT: "kg",
    Metric.BODY_HEIGHT: "m",
    Metric.BMI: "kg/m2",
    Metric.BLOOD_GLUCOSE: "mg/dL",
    Metric.STEP_COUNT: "{steps}",
    Metric.RESPIRATORY_RATE: "/min",
    Metric.ENERGY_EXPENDED: "kJ",
    Metric.ACCEL_X: "m/s2",
    Metric.ACCEL_Y: "m/s2",
    Metric.ACCEL_Z: "m/s2",
    Metric.PPG: "1",
    Metric.BATTERY_LEVEL: "%",
}

# Glucose: 1 mmol/L = 18.016 mg/dL (molar mass of glucose 180.16 g/mol).
_MMOL_TO_MG_DL = 18.016

#: (from unit, to unit) -> (scale, offset): canonical = value * scale + offset.
CONVERSIONS: dict[tuple[str, str], tuple[float, float]] = {
    ("[degF]", "Cel"): (5.0 / 9.0, -32.0 * 5.0 / 9.0),
    ("kPa", "mm[Hg]"): (1000.0 / 133.322387415, 0.0),
    ("[lb_av]", "kg"): (0.45359237, 0.0),
    ("g", "kg"): (0.001, 0.0),
    ("[in_i]", "m"): (0.0254, 0.0),
    ("cm", "m"): (0.01, 0.0),
    ("mmol/L", "mg/dL"): (_MMOL_TO_MG_DL, 0.0),
    ("[g]", "m/s2"): (9.80665, 0.0),
    ("s", "ms"): (1000.0, 0.0),
    ("kcal", "kJ"): (4.184, 0.0),
    ("{beats}/min", "/min"): (1.0, 0.0),
}


def conversion_for(metric: Metric, unit: str) -> tuple[float, float] | None:
    """The (scale, offset) that brings ``unit`` to the metric's canonical unit.

    ``None`` means the unit already is canonical. Raises :class:`UnitError` otherwise.
    """
    canonical = CANONICAL_UNIT[metric]
    if unit == canonical:
        return None
    try:
        return CONVERSIONS[(unit, canonical)]
    except KeyError:
        raise UnitError(
            f"unit {unit!r} is not valid for {metric.value} (expected {canonical!r})"
        ) from None


#: Per-metric plausibility ranges in canonical units. Outside: flagged, never dropped.
PLAUSIBLE: dict[Metric, tuple[float, float]] = {
    Metric.HEART_RATE: (20.0, 300.0),
    Metric.RR_INTERVAL: (200.0, 3000.0),
    Metric.SPO2: (50.0, 100.0),
    Metric.PULSE_RATE: (20.0, 300.0),
    Metric.PULSE_AMPLITUDE_INDEX: (0.0, 100.0),
    Metric.BODY_TEMPERATURE: (25.0, 45.0),
    Metric.SKIN_TEMPERATURE: (15.0, 45.0),
    Metric.SYSTOLIC_BP: (50.0, 300.0),
    Metric.DIASTOLIC_BP: (20.0, 200.0),
    Metric.MEAN_ARTERIAL_PRESSURE: (30.0, 250.0),
    Metric.BODY_WEIGHT: (0.3, 650.0),
    Metric.BODY_HEIGHT: (0.2, 2.8),
    Metric.BMI: (5.0, 150.0),
    Metric.BLOOD_GLUCOSE: (10.0, 1000.0),
    Metric.STEP_COUNT: (0.0, 100_000.0),
    Metric.RESPIRATORY_RATE: (2.0, 80.0),
    Metric.ENERGY_EXPENDED: (0.0, 100_000.0),
    Metric.ACCEL_X: (-160.0, 160.0),
    Metric.ACCEL_Y: (-160.0, 160.0),
    Metric.ACCEL_Z: (-160.0, 160.0),
    Metric.PPG: (-1e9, 1e9),
    Metric.BATTERY_LEVEL: (0.0, 100.0),
}
