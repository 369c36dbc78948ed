// Time-series panels on uPlot (vendored at /ui/vendor): one chart per panel of metrics, the
// readings of each metric kept in time order, keyed by device and sequence number so a
// reading that arrives live and again from the lake is drawn once.
//
// What is drawn, not hidden: a gap in the data is a gap in the line (a null where two
// readings are further apart than GAP_FACTOR times the metric's usual interval, where a
// reading was invalid, and where the device's sequence numbers skipped); a flagged reading
// (implausible, clock, no sensor contact...) is a red point over the line. The worker's
// device events are markers on every panel holding readings of that device: a sequence gap
// is a shaded band up to the first reading after it, labelled "gap: N readings missing", a
// reset or a clock jump a labelled vertical line; each also in the list under the chart (a
// canvas is not read out by a screen reader). A window holding more than four readings per pixel is drawn from
// each second's lowest and highest reading (kept as readings arrive), and redraws are
// coalesced to one per animation frame per chart, at most every MIN_REDRAW_MS (longer when a
// draw takes longer), so 50 Hz motion and twenty charts stay smooth: bench/dashboard_bench.py.

export const PANELS = [
  { id: "heart_rate", title: "Heart rate", metrics: ["heart_rate"] },
  { id: "rr_interval", title: "RR intervals", metrics: ["rr_interval"] },
  { id: "spo2", title: "SpO₂", metrics: ["spo2"] },
  { id: "pulse_rate", title: "Pulse rate", metrics: ["pulse_rate"] },
  { id: "body_temperature", title: "Body temperature", metrics: ["body_temperature"] },
  { id: "skin_temperature", title: "Skin temperature", metrics: ["skin_temperature"] },
  { id: "blood_pressure", title: "Blood pressure", metrics: ["systolic_bp", "diastolic_bp", "mean_arterial_pressure"] },
  { id: "respiratory_rate", title: "Respiratory rate", metrics: ["respiratory_rate"] },
  { id: "blood_glucose", title: "Blood glucose", metrics: ["blood_glucose"] },
  { id: "body_weight", title: "Weight", metrics: ["body_weight"] },
  { id: "step_count", title: "Steps", metrics: ["step_count"] },
  { id: "motion", title: "Motion", metrics: ["accel_x", "accel_y", "accel_z"] },
];

const COLORS = ["#0b5cad", "#8a4b00", "#116329", "#6639ba"];
const FLAG_COLOR = "#a40e26";
const MARK_COLOR = "#6b3e00"; // dark amber: 4.5:1 on white for the label
const GAP_FILL = "rgba(196, 120, 0, 0.18)";
export const GAP_FACTOR = 4;
const MIN_REDRAW_MS = 100;

/**
 * The readings of one metric, in time order, each once; and per second of data its lowest
 * and highest reading, kept as readings arrive, so a window of many minutes of 50 Hz data is
 * drawn from those (two points per second) and not from every reading.
 */
export class Series {
  constructor() {
    this.t = []; // seconds
    this.v = [];
    this.flags = [];
    this.keys = new Set();
    this.devices = new Set(); // devices with readings here (their device events apply)
    this.flagged = []; // [t, v] of flagged readings, in arrival order
    this.bins = null; // per whole second: {s, lo, hi, loT, hiT, invalid}; null: rebuild
    this.binList = [];
  }

  add(tUs, value, flags, key, device) {
    if (this.keys.has(key)) return false;
    this.keys.add(key);
    if (device) this.devices.add(device);
    const t = tUs / 1e6;
    let i = this.t.length;
    if (i && this.t[i - 1] > t) {
      i = lowerBound(this.t, t); // out of order (history): insert, rebuild the bins later
      this.binList = null;
    }
    this.t.splice(i, 0, t);
    this.v.splice(i, 0, value);
    this.flags.splice(i, 0, flags);
    if (flags.length && value !== null) this.flagged.push([t, value]);
    if (this.binList) this.bin(t, value);
    return true;
  }

  bin(t, value) {
    const sec = Math.floor(t);
    let b = this.binList[this.binList.length - 1];
    if (!b || b.s !== sec) {
      b = { s: sec, lo: Infinity, hi: -Infinity, loT: t, hiT: t, invalid: false };
      this.binList.push(b);
    }
    if (value === null) b.invalid = true;
    else {
      if (value < b.lo) { b.lo = value; b.loT = t; }
      if (value > b.hi) { b.hi = value; b.hiT = t; }
    }
  }

  bins() {
    if (!this.binList) {
      this.binList = [];
      for (let i = 0; i < this.t.length; i++) this.bin(this.t[i], this.v[i]);
    }
    return this.binList;
  }

  clear() {
    this.t = []; this.v = []; this.flags = []; this.keys.clear(); this.devices.clear();
    this.flagged = []; this.binList = [];
  }

  /**
   * [xs, ys] of what lies in [min, max] (and one reading either side, so the line enters the
   * view), with a null wherever the line must break (see GAP_FACTOR). Above ``budget``
   * readings the per-second lowest and highest are drawn instead.
   */
  withGaps(min = -Infinity, max = Infinity, budget = Infinity, breaks = []) {
    const { t, v } = this;
    const i0 = Math.max(0, lowerBound(t, min) - 1);
    const i1 = Math.min(t.length, lowerBound(t, max) + 1);
    const step = t.length > 2 ? medianStep(t) : 1;
    const xs = [], ys = [];
    // a device event between two readings (after the first, at or before the second)
    const breaksIn = (a, b) => {
      let k = lowerBound(breaks, a);
      while (k < breaks.length && breaks[k] <= a) k++;
      return k < breaks.length && breaks[k] > a && breaks[k] <= b ? breaks[k] : null;
    };
    if (i1 - i0 <= budget) {
      for (let i = i0; i < i1; i++) {
        if (i > i0) {
          const brk = breaks.length ? breaksIn(t[i - 1], t[i]) : null;
          if (t[i] - t[i - 1] > GAP_FACTOR * step) { xs.push((t[i] + t[i - 1]) / 2); ys.push(null); }
          else if (brk !== null) { xs.push(brk === t[i] ? (t[i] + t[i - 1]) / 2 : brk); ys.push(null); }
        }
        xs.push(t[i]); ys.push(v[i]);
      }
      return [xs, ys];
    }
    const bins = this.bins();
    const gap = GAP_FACTOR * Math.max(step, 1);
    let prev = null;
    for (let k = Math.max(0, lowerBinBound(bins, min) - 1); k < bins.length && bins[k].s <= max; k++) {
      const b = bins[k];
      if (prev && (b.s - prev.s > gap || (breaks.length && breaksIn(prev.s + 0.999, b.s + 0.999) !== null))) {
        xs.push((b.s + prev.s + 0.999) / 2); ys.push(null);
      }
      if (b.lo !== Infinity) {
        const pair = b.loT <= b.hiT ? [[b.loT, b.lo], [b.hiT, b.hi]] : [[b.hiT, b.hi], [b.loT, b.lo]];
        for (const [x, y] of pair) if (!xs.length || x > xs[xs.length - 1]) { xs.push(x); ys.push(y); }
      }
      if (b.invalid) { xs.push(b.s + 0.999); ys.push(null); }
      prev = b;
    }
    return [xs, ys];
  }

  gaps(breaks = []) {
    const [, ys] = this.withGaps(-Infinity, Infinity, Infinity, breaks);
    return ys.filter((y) => y === null).length;
  }

  /** The time of the last reading before ``t`` (seconds), or null. */
  before(t) {
    const i = lowerBound(this.t, t) - 1;
    return i >= 0 ? this.t[i] : null;
  }
}

function lowerBinBound(bins, x) {
  let lo = 0, hi = bins.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (bins[mid].s < x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

function lowerBound(a, x) {
  let lo = 0, hi = a.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (a[mid] < x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

function medianStep(t) {
  const n = Math.min(t.length - 1, 200);
  const d = [];
  for (let i = t.length - n; i < t.length; i++) d.push(t[i] - t[i - 1]);
  d.sort((a, b) => a - b);
  return Math.max(d[d.length >> 1], 1e-3);
}

/** One chart of a panel's metrics. */
export class Panel {
  constructor(spec, host, { onZoom } = {}) {
    this.spec = spec;
    this.series = Object.fromEntries(spec.metrics.map((m) => [m, new Series()]));
    this.marks = new Map(); // key -> device event {event, device, t_us, label, ...}
    this.units = {};
    this.range = null; // [min, max] seconds, or null: follow live
    this.windowS = 900; // the live window: the last 15 minutes
    this.dirty = false;
    this.lastDraw = 0;
    this.drawMs = 0;
    this.onZoom = onZoom || (() => {});
    this.box = host;
    this.plot = null;
    this.programmatic = false;
  }

  add(metric, r) {
    const s = this.series[metric];
    if (!s) return;
    if (r.unit) this.units[metric] = r.unit;
    // device, sequence number and time: a device that restarted counts from 0 again
    if (s.add(r.t_us, r.value, r.flags || [], `${r.device}:${r.seq}:${r.t_us}`, r.device)) this.touch();
  }

  /** A device event; drawn once this panel holds readings of its device. */
  addMark(m) {
    if (this.marks.has(m.key)) return;
    this.marks.set(m.key, m);
    this.touch();
  }

  /** The device events that concern this panel (its readings' devices), in time order. */
  shownMarks() {
    const devices = new Set(Object.values(this.series).flatMap((s) => [...s.devices]));
    return [...this.marks.values()].filter((m) => devices.has(m.device)).sort((a, b) => a.t_us - b.t_us);
  }

  /** Where a series' line breaks for device events (seconds, sorted). */
  breaksOf(s) {
    return [...this.marks.values()].filter((m) => s.devices.has(m.device))
      .map((m) => m.t_us / 1e6).sort((a, b) => a - b);
  }

  clear() {
    for (const s of Object.values(this.series)) s.clear();
    this.marks.clear();
    this.touch();
  }

  points() {
    return Object.values(this.series).reduce((n, s) => n + s.t.length, 0);
  }

  flagged() {
    return Object.values(this.series).reduce((n, s) => n + s.flagged.length, 0);
  }

  touch() {
    if (this.dirty) return;
    this.dirty = true;
    const every = Math.max(MIN_REDRAW_MS, 5 * this.drawMs); // at most a fifth of the time drawing
    const wait = Math.max(0, every - (performance.now() - this.lastDraw));
    setTimeout(() => requestAnimationFrame(() => this.draw()), wait);
  }

  data([min, max]) {
    const budget = 4 * this.width(); // more than four readings per pixel: per-second extremes
    const tables = this.spec.metrics.map((m) => {
      const s = this.series[m];
      return s.withGaps(min, max, budget, this.marks.size ? this.breaksOf(s) : []);
    });
    // Flagged readings of every metric, as one overlay series of points.
    const flagged = this.spec.metrics.flatMap((m) => this.series[m].flagged)
      .filter(([x]) => x >= min && x <= max).sort((a, b) => a[0] - b[0]);
    tables.push([flagged.map((f) => f[0]), flagged.map((f) => f[1])]);
    const modes = tables.map(() => 1); // nulls kept as gaps; alignment holes spanned
    return window.uPlot.join(tables, modes);
  }

  liveWindow(windowS) {
    const now = Date.now() / 1000;
    return [now - windowS, now];
  }

  draw() {
    this.dirty = false;
    if (!this.box.clientWidth) return; // hidden (no readings yet): drawn once shown
    const began = performance.now();
    this.lastDraw = performance.now();
    const [min, max] = this.range || this.liveWindow(this.windowS);
    const data = this.data([min, max]);
    if (!this.plot) {
      this.plot = new window.uPlot(this.options(), data, this.box);
    } else {
      if (Math.abs(this.plot.width - this.width()) > 2) this.plot.setSize({ width: this.width(), height: 200 });
      this.plot.setData(data, false);
    }
    this.programmatic = true;
    this.plot.setScale("x", { min, max });
    this.programmatic = false;
    this.drawMs = performance.now() - began;
  }

  width() {
    return Math.max(320, this.box.clientWidth - 8);
  }

  /** Device events over the plot: a band for a gap (from the reading before it), a line
   * for each, and its label. */
  drawMarks(u) {
    const marks = this.shownMarks();
    if (!marks.length) return;
    const { ctx } = u;
    const { left, top, width, height } = u.bbox;
    const dpr = window.devicePixelRatio || 1;
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top, width, height);
    ctx.clip();
    ctx.font = `${Math.round(11 * dpr)}px system-ui, sans-serif`;
    ctx.textBaseline = "top";
    ctx.textAlign = "left"; // uPlot leaves its axes' alignment behind
    let row = 0;
    for (const m of marks) {
      const t = m.t_us / 1e6;
      const x = u.valToPos(t, "x", true);
      if (x < left - 1 || x > left + width + 1) continue;
      if (m.event === "gap") {
        const starts = Object.values(this.series).map((s) => s.before(t)).filter((v) => v !== null);
        const x0 = starts.length ? u.valToPos(Math.max(...starts), "x", true) : x - 2 * dpr;
        ctx.fillStyle = GAP_FILL;
        ctx.fillRect(Math.min(x0, x - 2 * dpr), top, Math.max(2 * dpr, x - x0), height);
      }
      ctx.strokeStyle = MARK_COLOR;
      ctx.lineWidth = dpr;
      ctx.setLineDash(m.event === "gap" ? [] : [4 * dpr, 3 * dpr]);
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, top + height);
      ctx.stroke();
      ctx.fillStyle = MARK_COLOR;
      const w = ctx.measureText(m.label).width;
      const tx = x + 3 * dpr + w > left + width ? x - 3 * dpr - w : x + 3 * dpr; // stay inside
      ctx.fillText(m.label, tx, top + 2 * dpr + (row % 3) * 13 * dpr);
      row += 1;
    }
    ctx.restore();
  }

  options() {
    const unitOf = (m) => this.units[m] || "";
    const series = [
      {},
      ...this.spec.metrics.map((m, i) => ({
        label: this.spec.metrics.length > 1 ? m.replaceAll("_", " ") : this.spec.title,
        stroke: COLORS[i % COLORS.length],
        width: 1.5,
        spanGaps: false, // a null is a gap in the line (uPlot draws points when sparse)
        value: (u, v) => (v == null ? "–" : `${+v.toFixed(2)} ${unitOf(m)}`),
      })),
      {
        label: "flagged",
        stroke: FLAG_COLOR,
        fill: FLAG_COLOR,
        paths: () => null,
        points: { show: true, size: 7, fill: FLAG_COLOR, stroke: FLAG_COLOR },
      },
    ];
    return {
      width: this.width(),
      height: 200,
      series,
      scales: { x: { time: true } },
      cursor: { drag: { x: true, y: false } },
      legend: { live: true },
      hooks: {
        draw: [(u) => this.drawMarks(u)],
        setScale: [
          (u, key) => {
            if (key !== "x" || this.programmatic) return;
            this.onZoom(u.scales.x.min, u.scales.x.max);
          },
        ],
      },
    };
  }
}
