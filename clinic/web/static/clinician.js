// The clinician's patient list: who shares with me now, their newest values and how fresh
// they are. The list comes from /api/patients (every 5 s: a revoked grant drops its row);
// values update live from one subscription to every patient who consented to me.

import { ago, api, el, showError, signedIn } from "/ui/app.js";
import { LiveFeed } from "/ui/live.js";

const COLUMNS = [
  ["heart_rate"], ["spo2"], ["body_temperature", "skin_temperature"],
  ["systolic_bp", "diastolic_bp"], ["respiratory_rate"],
];
const TILE_METRICS = COLUMNS.flat();
const $ = (id) => document.getElementById(id);
const rows = new Map(); // patient -> {latest: {metric: reading}, sharing}

function fmt(r) {
  return r && r.value !== null ? `${+r.value.toFixed(1)} ${r.unit}` : "–";
}

function freshness(us) {
  if (!us) return ["no live data", "muted"];
  const s = Date.now() / 1000 - us / 1e6;
  return [ago(us), s < 30 ? "fresh" : s < 300 ? "stale" : "old"];
}

function cell(latest, metrics) {
  if (metrics[0] === "systolic_bp") {
    const [s, d] = [latest.systolic_bp, latest.diastolic_bp];
    return s || d ? `${s ? Math.round(s.value) : "–"}/${d ? Math.round(d.value) : "–"} mmHg` : "–";
  }
  return fmt(metrics.map((m) => latest[m]).find(Boolean));
}

function render() {
  const body = $("patients");
  body.replaceChildren();
  for (const [patient, row] of [...rows].sort()) {
    const newest = Math.max(0, ...Object.values(row.latest).map((r) => r.t_us));
    const [age, cls] = freshness(newest);
    const flagged = Object.values(row.latest).some((r) => r.flags && r.flags.length);
    const shared = row.sharing.metrics === "all" ? "all vital signs" : row.sharing.metrics.map((m) => m.replaceAll("_", " ")).join(", ");
    const until = row.sharing.until_us ? ` until ${new Date(row.sharing.until_us / 1000).toLocaleString()}` : "";
    body.append(el("tr", { "data-patient": patient },
      el("th", { scope: "row" }, el("a", { href: `/ui/chart.html?patient=${encodeURIComponent(patient)}` }, patient),
        row.sharing.break_glass ? el("span", { class: "badge bad" }, " emergency access") : null),
      ...COLUMNS.map((ms) => el("td", { class: "value", "data-metric": ms[0] }, cell(row.latest, ms))),
      el("td", { class: cls, "data-fresh": cls }, el("span", { "aria-hidden": "true" }, "● "), age,
        flagged ? el("span", { class: "badge warn" }, " flagged") : null),
      el("td", {}, `${shared} (${row.sharing.purpose.join(", ")})${until}`),
    ));
  }
  $("list-note").textContent = rows.size
    ? `${rows.size} patient${rows.size > 1 ? "s" : ""} share with you.`
    : "No patient shares their vital signs with you now.";
}

async function refresh() {
  const body = await api("/api/patients");
  const seen = new Set();
  for (const p of body.patients) {
    seen.add(p.patient);
    const row = rows.get(p.patient) || { latest: {} };
    for (const [m, r] of Object.entries(p.latest)) {
      if (!row.latest[m] || row.latest[m].t_us <= r.t_us) row.latest[m] = r;
    }
    row.sharing = p;
    rows.set(p.patient, row);
  }
  for (const patient of [...rows.keys()]) if (!seen.has(patient)) rows.delete(patient);
  render();
}

function live(readings) {
  for (const r of readings) {
    const row = rows.get(r.patient);
    if (!row || !TILE_METRICS.includes(r.metric)) continue;
    const had = row.latest[r.metric];
    if (!had || had.t_us <= r.t_us) row.latest[r.metric] = r;
  }
}

async function main() {
  await signedIn("clinician");
  $("open").onsubmit = (ev) => {
    ev.preventDefault();
    location.href = `/ui/chart.html?patient=${encodeURIComponent($("open-id").value.trim())}`;
  };
  await refresh();
  const feed = new LiveFeed({
    patients: null, metrics: TILE_METRICS, onReadings: live,
    onClosed: (reason) => showError($("status"), new Error(`Live updates ended: ${reason}`)),
  });
  window.vitalproofList = { rows, feed };
  await feed.start();
  setInterval(render, 1000);
  setInterval(() => refresh().catch((e) => showError($("status"), e)), 5000);
}

main().catch((e) => showError($("status"), e));
