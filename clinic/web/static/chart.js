// One patient's page for a clinician: live charts of what the patient shares with them, the
// lake's history on demand, and break-glass when nothing is shared.

import { api, el, showError, signedIn } from "/ui/app.js";
import { PANELS, Panel } from "/ui/charts.js";
import { LiveFeed } from "/ui/live.js";

const $ = (id) => document.getElementById(id);
const patient = new URLSearchParams(location.search).get("patient") || "";
const state = { panels: new Map(), feed: null, loadedFromS: null, sharing: null, metrics: [] };
window.vitalproofChart = state; // for the browser tests and for debugging

function panelsFor(metrics) {
  const all = metrics === "all";
  return PANELS.filter((p) => all || p.metrics.some((m) => metrics.includes(m)));
}

function metricList(panels) {
  return panels.flatMap((p) => p.metrics);
}

function buildCharts(panels) {
  const host = $("charts");
  host.replaceChildren();
  state.panels.clear();
  for (const spec of panels) {
    const plot = el("div", { class: "plot" });
    const marks = el("ul", { class: "marks", "data-marks": spec.id, "aria-label": `${spec.title}: device events`, hidden: true });
    const box = el("figure", { class: "chart", "data-panel": spec.id, "aria-label": `${spec.title} chart` },
      el("h3", {}, spec.title, el("span", { class: "muted", "data-count": spec.id }, "")), plot, marks);
    host.append(box);
    const p = new Panel(spec, plot, { onZoom: (min, max) => zoomed(min, max) });
    state.panels.set(spec.id, p);
  }
}

function panelOf(metric) {
  for (const p of state.panels.values()) if (p.spec.metrics.includes(metric)) return p;
  return null;
}

function addReadings(readings) {
  for (const r of readings) {
    const p = panelOf(r.metric);
    if (p) p.add(r.metric, r);
  }
  updateCounts();
}

/** Device events (gaps, resets, clock jumps): every panel keeps them, and draws those of
 * the devices it holds readings of. */
function addDeviceEvents(events) {
  for (const m of events) for (const p of state.panels.values()) p.addMark(m);
  updateCounts();
}

const clock = (us) => new Date(us / 1000).toLocaleTimeString();

/** The list under a chart of the device events drawn on it (the newest 20), in words. */
function listMarks(id, p) {
  const list = document.querySelector(`[data-marks="${id}"]`);
  if (!list) return;
  const shown = p.shownMarks().slice(-20);
  const seen = shown.map((m) => m.key).join("|");
  if (list.dataset.seen === seen) return;
  list.dataset.seen = seen;
  list.replaceChildren(...shown.map((m) =>
    el("li", { "data-kind": m.event }, `${clock(m.t_us)} · ${m.device} · ${m.label}`)));
  list.hidden = !shown.length;
}

/** Counts per chart; a chart with no readings is hidden and named in one line instead. */
function updateCounts() {
  const empty = [];
  for (const [id, p] of state.panels) {
    const n = p.points(), f = p.flagged();
    const label = document.querySelector(`[data-count="${id}"]`);
    if (label) label.textContent = `${n} readings${f ? `, ${f} flagged` : ""}`;
    listMarks(id, p);
    const figure = document.querySelector(`[data-panel="${id}"]`);
    if (figure) {
      const wasHidden = figure.hidden;
      figure.hidden = n === 0;
      if (wasHidden && n) p.touch();
    }
    if (!n) empty.push(p.spec.title);
  }
  $("empty-note").textContent = empty.length
    ? `Shared with you, no readings in what is loaded: ${empty.join(", ")}.`
    : "";
}

/** Sealed readings from the lake for [startS, endS), merged into the charts. */
async function loadHistory(startS, endS) {
  const metrics = state.metrics.join(",");
  const q = `metric=${metrics}&start=${Math.floor(startS * 1e6)}&end=${Math.ceil(endS * 1e6)}`;
  const body = await api(`/api/patients/${encodeURIComponent(patient)}/history?${q}`);
  for (const [metric, s] of Object.entries(body.series)) {
    const p = panelOf(metric);
    if (!p) continue;
    for (let i = 0; i < s.t_us.length; i++) {
      p.add(metric, { t_us: s.t_us[i], value: s.value[i], flags: s.flags[i], device: s.device[i], seq: s.seq[i], unit: s.unit });
    }
  }
  addDeviceEvents(body.device_events || []);
}

async function ensureHistory(minS) {
  if (state.loadedFromS === null || minS >= state.loadedFromS) return;
  const to = state.loadedFromS;
  state.loadedFromS = minS;
  try {
    await loadHistory(minS, to);
  } catch (e) {
    showError($("status"), e);
  }
}

function setRange(range) {
  for (const p of state.panels.values()) {
    p.range = range;
    p.touch();
  }
  $("live").setAttribute("aria-pressed", String(range === null));
  if (range) ensureHistory(range[0]);
}

function zoomed(min, max) {
  setRange([min, max]);
}

function current() {
  const p = state.panels.values().next().value;
  if (!p) return null;
  return p.range || p.liveWindow(p.windowS);
}

function wireToolbar() {
  const now = () => Date.now() / 1000;
  $("live").onclick = () => setRange(null);
  $("last-1h").onclick = () => setRange([now() - 3600, now()]);
  $("last-6h").onclick = () => setRange([now() - 6 * 3600, now()]);
  const shift = (dir) => {
    const [a, b] = current();
    const d = ((b - a) / 2) * dir;
    setRange([a + d, b + d]);
  };
  $("earlier").onclick = () => shift(-1);
  $("later").onclick = () => shift(1);
  // The live window scrolls even when nothing arrives (a silent device shows as a gap).
  setInterval(() => {
    for (const p of state.panels.values()) if (!p.range) p.touch();
  }, 1000);
}

function feedState(s) {
  const badge = $("feed-state");
  badge.textContent = s;
  badge.className = `badge ${s === "live" ? "ok" : s === "closed" ? "bad" : "warn"}`;
}

function accessEnded(reason) {
  for (const p of state.panels.values()) p.clear();
  updateCounts();
  $("status").replaceChildren(el("p", { class: "error", role: "alert" }, `Live access ended: ${reason}`));
}

let countdown = null;
function showBreakGlass(sharing) {
  if (!sharing.break_glass || !sharing.until_us) {
    $("btg-banner").hidden = true;
    return;
  }
  $("btg-banner").hidden = false;
  $("btg-until").textContent = new Date(sharing.until_us / 1000).toLocaleTimeString();
  $("btg-discloses").textContent =
    "Every vital sign of this patient is disclosed to you until then; the patient sees this access, its reason and every reading shown.";
  clearInterval(countdown);
  const tick = () => {
    const left = Math.max(0, Math.round(sharing.until_us / 1e6 - Date.now() / 1000));
    $("btg-left").textContent = `${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")}`;
    if (!left) clearInterval(countdown);
  };
  tick();
  countdown = setInterval(tick, 1000);
}

async function openCharts(sharing) {
  state.sharing = sharing;
  $("not-shared").hidden = true;
  $("charts-area").hidden = false;
  showBreakGlass(sharing);
  const panels = panelsFor(sharing.metrics);
  state.metrics = metricList(panels);
  buildCharts(panels);
  const nowS = Date.now() / 1000;
  state.loadedFromS = nowS - 900;
  state.feed = new LiveFeed({
    patients: [patient],
    metrics: state.metrics,
    onReadings: addReadings,
    onDeviceEvents: addDeviceEvents,
    onClosed: accessEnded,
    onState: feedState,
    onResubscribed: (sinceUs) => loadHistory(sinceUs / 1e6, Date.now() / 1000).catch((e) => showError($("status"), e)),
  });
  await Promise.all([state.feed.start(), loadHistory(state.loadedFromS, nowS + 60)]);
  for (const p of state.panels.values()) p.touch();
}

function notShared(sharing) {
  $("charts-area").hidden = true;
  $("not-shared").hidden = false;
  $("ns-reason").textContent = `This patient does not share their vital signs with you: ${sharing.reason}.`;
  $("btg-form").onsubmit = async (ev) => {
    ev.preventDefault();
    try {
      await api("/break-glass", {
        method: "POST",
        body: { patient, reason: $("btg-reason").value.trim(), minutes: Number($("btg-minutes").value) },
      });
      await openCharts(await api(`/api/patients/${encodeURIComponent(patient)}/sharing`));
    } catch (e) {
      showError($("btg-error"), e);
    }
  };
}

async function main() {
  await signedIn("clinician");
  $("title").textContent = `Patient ${patient}`;
  document.title = `${patient} · vitalproof`;
  wireToolbar();
  window.addEventListener("resize", () => { for (const p of state.panels.values()) p.touch(); });
  if (!window.uPlot) {
    showError($("status"), new Error("The chart library is missing from this install: run `make web` (it vendors uPlot from npm)."));
    return;
  }
  const sharing = await api(`/api/patients/${encodeURIComponent(patient)}/sharing`);
  if (sharing.shared) await openCharts(sharing);
  else notShared(sharing);
}

main().catch((e) => showError($("status"), e));
