"""Seeded, pure generators of plausible wearable vital signs.

Why a physiological model at all: downstream code (plausibility flags, deduplication, the
Parquet lake, proofs) should be exercised with data that *looks* like real wearables, with
the regularities that matter: a resting heart rate that dips at night, exercise bouts that
raise heart rate, breathing and step cadence together, RR intervals that agree with the
heart rate, blood-pressure spot checks every few minutes and a high-rate accelerometer.

Design decisions, and why:

* **Device time is simulated in whole-second blocks.** Each block ``[k s, k+1 s)`` after the
  device's start is generated from a ``random.Random`` (one per device) in device-time order,
  and :meth:`SimDevice.tick` only hands out what is due. The output stream therefore does not
  depend on *when* or *how often* the caller ticks: any tick schedule yields the same
  samples, sequence numbers and values for a given ``(seed, profile, start_time_us)``.
* **One sequence counter per device, shared across metrics.** Like the record index of a
  device's flash log, ``seq`` increases by one per sample in device-time order (ties broken
  by metric order). That makes ``seq`` alone unique per device until a reboot resets it, so
  ``(metric, seq, t)`` and hence :func:`vitalproof.schema.reading_id` are unique per device.
* **Values are rounded like real devices report them** (integer bpm, ms, %, mmHg), so tests
  see the same value distributions a collector would.

Nothing in this module performs I/O or reads the wall clock.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from vitalproof.schema import SampleBatch
from vitalproof.units import CANONICAL_UNIT, Metric

US = 1_000_000
_DAY_S = 86_400
G = 9.80665  # standard gravity, m/s2


@dataclass(frozen=True, slots=True)
class Profile:
    """The physiology and reporting behaviour of one kind of wearer and device."""

    name: str = "adult"
    resting_hr: float = 62.0  # bpm at daytime rest
    max_hr: float = 180.0
    night_hr_drop: float = 8.0  # bpm lower in the middle of the night
    hrv_sdnn_ms: float = 45.0  # beat-to-beat variability (SDNN, ms) at rest
    bouts_per_hour: float = 1.5  # activity bouts started per waking hour
    bout_minutes: float = 8.0  # mean bout duration
    spo2_baseline: float = 97.5
    spo2_dips_per_hour: float = 0.5
    skin_temp_c: float = 33.5
    systolic: float = 118.0
    diastolic: float = 76.0
    resp_rate: float = 14.0
    tz_offset_min: int = 60
    # Reporting intervals in seconds (0 = metric not reported).
    hr_every_s: int = 1
    rr_enabled: bool = True
    spo2_every_s: int = 5
    skin_temp_every_s: int = 30
    resp_every_s: int = 15
    steps_every_s: int = 10
    bp_every_s: int = 300  # blood-pressure spot check period


PROFILES: dict[str, Profile] = {
    "adult": Profile(),
    "athlete": Profile(
        name="athlete",
        resting_hr=48.0,
        max_hr=190.0,
        hrv_sdnn_ms=70.0,
        bouts_per_hour=2.5,
        bout_minutes=15.0,
        systolic=112.0,
        diastolic=70.0,
        resp_rate=12.0,
    ),
    "elderly": Profile(
        name="elderly",
        resting_hr=72.0,
        max_hr=140.0,
        night_hr_drop=5.0,
        hrv_sdnn_ms=25.0,
        bouts_per_hour=0.6,
        bout_minutes=6.0,
        spo2_baseline=96.0,
        spo2_dips_per_hour=2.0,
        skin_temp_c=32.8,
        systolic=138.0,
        diastolic=84.0,
        resp_rate=16.0,
    ),
    # Every metric at least every few seconds: short test runs still see all of them.
    "dense": Profile(
        name="dense",
        spo2_every_s=1,
        skin_temp_every_s=2,
        resp_every_s=2,
        steps_every_s=1,
        bp_every_s=2,
        bouts_per_hour=30.0,
    ),
}


def get_profile(profile: str | Profile) -> Profile:
    """Look a profile up by name; a clear error names the known ones."""
    if isinstance(profile, Profile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown profile {profile!r} (known: {known})") from None


def circadian(local_s: float) -> float:
    """0 at 04:00 local (the nadir), 1 at 16:00; a smooth cosine in between."""
    hours = (local_s % _DAY_S) / 3600.0
    return 0.5 - 0.5 * math.cos(2 * math.pi * (hours - 4.0) / 24.0)


def is_asleep(local_s: float) -> bool:
    hours = (local_s % _DAY_S) / 3600.0
    return hours >= 23.0 or hours < 7.0


def _clip(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


@dataclass(slots=True)
class _State:
    """Slowly varying physiological state, advanced once per simulated second."""

    hr: float
    intensity: float = 0.0  # 0 rest .. 1 maximal effort, current
    bout_intensity: float = 0.0  # target while a bout lasts
    bout_left_s: float = 0.0
    hr_walk: float = 0.0  # slow random walk added to the baseline
    skin_walk: float = 0.0
    spo2_dip_left_s: float = 0.0
    spo2_dip_depth: float = 0.0
    resp_phase: float = 0.0
    step_acc: float = 0.0  # fractional steps carried between seconds
    steps_since_report: int = 0
    next_beat_us: int = 0  # absolute device time of the next heartbeat
    next_rr: int = 0  # RR interval (ms) ending with that beat; 0 before the first beat
    gait_phase: float = 0.0


_METRIC_ORDER = {m.value: i for i, m in enumerate(Metric)}
_UNIT = {m.value: u for m, u in CANONICAL_UNIT.items()}


class SimDevice:
    """A simulated wearable: call :meth:`tick` with the device clock, get new samples.

    ``seed`` fixes everything random about the device; ``start_time_us`` is the device
    clock (µs since the epoch, UTC) at power-on. ``accel_hz`` > 0 adds a triaxial
    accelerometer (``accel_x/y/z``, m/s2) at that rate.
    """

    def __init__(
        self,
        device_id: str,
        seed: int,
        profile: str | Profile = "adult",
        start_time_us: int = 0,
        accel_hz: int = 0,
    ) -> None:
        if accel_hz < 0 or accel_hz > 1000:
            raise ValueError(f"accel_hz={accel_hz} out of range 0..1000")
        self.device_id = device_id
        self.profile = get_profile(profile)
        self.start_time_us = int(start_time_us)
        self.accel_hz = int(accel_hz)
        # A string seed is hashed with SHA-512 by random.Random: stable across processes.
        self._rng = random.Random(f"{seed}/{device_id}")
        p = self.profile
        self._state = _State(hr=p.resting_hr, next_beat_us=self.start_time_us)
        self._state.resp_phase = self._rng.random()
        # Spot checks start at a random phase so a fleet does not measure in lockstep.
        self._bp_offset_s = self._rng.randrange(p.bp_every_s) if p.bp_every_s else 0
        self._seq = 0
        self._block = 0  # index of the next whole-second block to generate
        self._pending: list[tuple[int, int, str, float]] = []  # (t, order, metric, value)
        self._emitted_until_us = self.start_time_us - 1

    @property
    def next_seq(self) -> int:
        """The sequence number the next generated sample will get."""
        return self._seq

    def tick(self, now_us: int) -> SampleBatch | None:
        """Samples with device time in ``(last tick, now_us]``, or ``None`` if there are none.

        Time never runs backwards for the simulation: a ``now_us`` earlier than a previous
        one returns ``None``. (Clock faults are applied downstream, see ``faults.py``.)
        """
        if now_us <= self._emitted_until_us:
            return None
        while self.start_time_us + self._block * US <= now_us:
            self._generate_block(self._block)
            self._block += 1
        due = [s for s in self._pending if s[0] <= now_us]
        if len(due) == len(self._pending):
            self._pending = []
        else:
            self._pending = [s for s in self._pending if s[0] > now_us]
        self._emitted_until_us = now_us
        if not due:
            return None
        # Columns are filled directly: this runs for every sample of every device.
        return SampleBatch(
            device_id=self.device_id,
            metric=[s[2] for s in due],
            unit=[_UNIT[s[2]] for s in due],
            device_time_us=[s[0] for s in due],
            seq=[s[1] for s in due],
            value=[s[3] for s in due],
            quality=[0] * len(due),
            tz_offset_min=self.profile.tz_offset_min,
        )

    # -- simulation --------------------------------------------------------------------

    def _generate_block(self, k: int) -> None:
        """Advance the physiology by one second and queue that second's samples."""
        p, st, rng = self.profile, self._state, self._rng
        t0 = self.start_time_us + k * US
        local_s = t0 / US + p.tz_offset_min * 60
        circ = circadian(local_s)
        asleep = is_asleep(local_s)

        # Activity: bouts start at random while awake, intensity ramps with ~20 s lag.
        if st.bout_left_s > 0:
            st.bout_left_s -= 1
        elif not asleep and rng.random() < p.bouts_per_hour / 3600.0:
            st.bout_left_s = rng.expovariate(1.0 / (p.bout_minutes * 60.0))
            st.bout_intensity = rng.uniform(0.25, 0.85)
        target = st.bout_intensity if st.bout_left_s > 0 else 0.0
        st.intensity += (target - st.intensity) / 20.0

        # Heart rate: circadian baseline + activity + slow walk, first-order lag (~15 s).
        st.hr_walk = _clip(st.hr_walk + rng.gauss(0.0, 0.3), -6.0, 6.0)
        baseline = p.resting_hr - p.night_hr_drop * (1.0 - circ)
        hr_target = baseline + st.intensity * (p.max_hr - p.resting_hr) + st.hr_walk
        st.hr += (hr_target - st.hr) / 15.0 + rng.gauss(0.0, 0.4)
        st.hr = _clip(st.hr, 35.0, p.max_hr + 5.0)

        resp = p.resp_rate * (0.9 + 0.2 * circ) + 14.0 * st.intensity + rng.gauss(0.0, 0.3)
        resp = _clip(resp, 6.0, 45.0)

        out: list[tuple[int, str, float]] = []
        if p.hr_every_s and k % p.hr_every_s == 0:
            out.append((t0, Metric.HEART_RATE.value, float(round(st.hr))))

        if p.rr_enabled:
            # Each beat's RR interval = 60000/HR, with respiratory sinus arrhythmia (RSA)
            # that shrinks with effort, and Gaussian beat-to-beat noise. A beat is reported
            # at the time it occurs, carrying the interval that ended with it.
            hrv = p.hrv_sdnn_ms * (1.0 - 0.8 * st.intensity)
            while st.next_beat_us < t0 + US:
                if st.next_rr > 0:
                    out.append((st.next_beat_us, Metric.RR_INTERVAL.value, float(st.next_rr)))
                st.resp_phase = (st.resp_phase + resp / st.hr) % 1.0
                rsa = 0.6 * hrv * math.sin(2 * math.pi * st.resp_phase)
                rr = 60000.0 / st.hr + rsa + rng.gauss(0.0, 0.5 * hrv)
                rr_ms = round(_clip(rr, 60000.0 / (p.max_hr + 10.0), 60000.0 / 30.0))
                st.next_beat_us += rr_ms * 1000
                st.next_rr = rr_ms

        if p.spo2_every_s and k % p.spo2_every_s == 0:
            if st.spo2_dip_left_s <= 0 and rng.random() < (
                p.spo2_dips_per_hour * p.spo2_every_s / 3600.0 * (2.0 if asleep else 1.0)
            ):
                st.spo2_dip_left_s = rng.uniform(10.0, 60.0)
                st.spo2_dip_depth = rng.uniform(3.0, 8.0)
            dip = st.spo2_dip_depth if st.spo2_dip_left_s > 0 else 0.0
            spo2 = _clip(p.spo2_baseline + rng.gauss(0.0, 0.6) - dip, 95.0 - dip, 99.0)
            out.append((t0, Metric.SPO2.value, float(round(spo2))))
        if st.spo2_dip_left_s > 0:
            st.spo2_dip_left_s -= 1

        # Skin temperature: slow mean-reverting walk, warmer at night (distal vasodilation),
        # cooler during effort (sweating).
        st.skin_walk += -st.skin_walk / 1800.0 + rng.gauss(0.0, 0.01)
        if p.skin_temp_every_s and k % p.skin_temp_every_s == 0:
            skin = p.skin_temp_c + 0.6 * (1.0 - circ) - 1.0 * st.intensity + st.skin_walk
            out.append((t0, Metric.SKIN_TEMPERATURE.value, round(_clip(skin, 28.0, 37.5), 2)))

        if p.resp_every_s and k % p.resp_every_s == 0:
            out.append((t0, Metric.RESPIRATORY_RATE.value, round(resp, 1)))

        cadence = 0.0  # steps per second
        if st.intensity > 0.05:
            cadence = 1.3 + 1.5 * st.intensity
        elif not asleep and rng.random() < 0.02:
            cadence = rng.uniform(0.5, 1.5)  # a few steps across the room
        st.step_acc += cadence
        whole = int(st.step_acc)
        st.step_acc -= whole
        st.steps_since_report += whole
        if p.steps_every_s and k % p.steps_every_s == 0:
            # Steps counted since the previous report (an interval count, not a total).
            out.append((t0, Metric.STEP_COUNT.value, float(st.steps_since_report)))
            st.steps_since_report = 0

        if p.bp_every_s and (k - self._bp_offset_s) % p.bp_every_s == 0:
            sys_ = p.systolic - 10.0 * (1.0 - circ) + 30.0 * st.intensity + rng.gauss(0, 4)
            dia = p.diastolic - 6.0 * (1.0 - circ) + 5.0 * st.intensity + rng.gauss(0, 3)
            sys_, dia = round(_clip(sys_, 85.0, 200.0)), round(_clip(dia, 45.0, 120.0))
            dia = min(dia, sys_ - 20)
            mean = round(dia + (sys_ - dia) / 3.0, 1)
            out.append((t0, Metric.SYSTOLIC_BP.value, float(sys_)))
            out.append((t0, Metric.DIASTOLIC_BP.value, float(dia)))
            out.append((t0, Metric.MEAN_ARTERIAL_PRESSURE.value, mean))

        if self.accel_hz:
            self._accel(k, t0, cadence, out)

        out.sort(key=lambda s: (s[0], _METRIC_ORDER[s[1]]))
        for t, metric, value in out:
            self._pending.append((t, self._seq, metric, value))
            self._seq += 1

    def _accel(self, k: int, t0: int, cadence: float, out: list[tuple[int, str, float]]) -> None:
        """Gravity on a slowly tilting wrist, plus gait oscillation at step cadence."""
        st, rng, hz = self._state, self._rng, self.accel_hz
        amp = 4.0 * st.intensity + (1.0 if cadence > 0 else 0.0)
        tilt = 0.3 * math.sin(2 * math.pi * ((k % 600) / 600.0)) + rng.gauss(0.0, 0.02)
        for i in range(hz):
            t = t0 + i * US // hz
            st.gait_phase = (st.gait_phase + cadence / hz) % 1.0
            swing = amp * math.sin(2 * math.pi * st.gait_phase)
            ax = G * math.sin(tilt) + 0.6 * swing + rng.gauss(0.0, 0.05)
            ay = 0.3 * swing + rng.gauss(0.0, 0.05)
            az = G * math.cos(tilt) + swing + rng.gauss(0.0, 0.05)
            out.append((t, Metric.ACCEL_X.value, round(ax, 3)))
            out.append((t, Metric.ACCEL_Y.value, round(ay, 3)))
            out.append((t, Metric.ACCEL_Z.value, round(az, 3)))
