// The operator's page: pipeline health from GET /api/health (the figures /metrics exposes),
// redrawn every 2 s. No health data comes here: counts, rates, lags, the last anchor.
import { api, el, signedIn, showError } from "/ui/app.js";

const REFRESH_MS = 2000;
const WINDOW_S = 600; // the chart's span: the history the service keeps
const count = new Intl.NumberFormat("en-US");
const $ = (id) => document.getElementById(id);
const field = (name) => document.querySelector(`[data-testid="${name}"]`);

function num(n) {
  return n === null || n === undefined ? "–" : count.format(n);
}

function rate(x) {
  return x === null || x === undefined ? "–" : x.toFixed(1);
}

function duration(s) {
  if (s < 120) return `${Math.round(s)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${Math.round(s / 3600)} h`;
}

function plural(n, one, many) {
  return `${num(n)} ${n === 1 ? one : many}`;
}

function set(name, text) {
  field(name).textContent = text;
}

function banner(h) {
  const box = $("banner");
  const problems = [];
  if (h.refreshed_at && !h.kafka.up) {
    problems.push(`The service cannot reach Kafka at ${h.kafka.bootstrap}: ${h.kafka.error}. ` +
      "Records in, consumer lag and new DLQ records are unknown until it answers.");
  }
  if (h.anchor_error) problems.push(`The anchor log cannot be read: ${h.anchor_error}`);
  if (!problems.length) {
    box.replaceChildren();
    return;
  }
  box.replaceChildren(el("div", { class: "panel error", role: "alert", "data-testid": "banner" },
    ...problems.map((p) => el("p", {}, p))));
}

function tiles(h) {
  const t = h.topics;
  document.querySelector('[data-field="raw-topic"]').textContent = t.raw.topic;
  document.querySelector('[data-field="clean-topic"]').textContent = t.clean.topic;
  set("raw-rate", rate(t.raw.per_s));
  set("raw-records", num(t.raw.records));
  set("clean-rate", rate(t.clean.per_s));
  set("clean-records", num(t.clean.records));
  set("sealed-rate", rate(h.sealed.readings_per_s));
  set("sealed-readings", num(h.sealed.readings));
  set("sealed-batches", num(h.sealed.batches));
  set("sealed-records-rate", rate(h.sealed.records_per_s));
  const live = h.live;
  set("subscriptions", num(live.subscriptions));
  set("connections", num(live.connections));
  set("fanout", live.fanout);
  set("delivered", num(live.readings_delivered));
  set("refused", num(live.deliveries_refused));
  const a = h.anchor;
  $("anchor").replaceChildren(...(a === null ? [el("p", { class: "muted" }, "None yet.")] : [
    el("p", { class: "figure" }, el("span", { "data-testid": "anchor-age" }, duration(a.age_s)),
      " ", el("span", { class: "unit" }, "ago")),
    el("p", {}, "Block ", el("span", { "data-testid": "anchor-block" }, num(a.block_number)),
      ` (chain ${a.chain_id}); covers ${plural(a.tree_size, "log entry", "log entries")}; ` +
      `anchor ${num(a.anchors)} of this log`),
    el("p", {}, "Transaction ", el("code", { class: "tx", "data-testid": "anchor-tx" }, a.tx_hash)),
  ]));
}

function tables(h) {
  $("lag").replaceChildren(...(h.lag.length ? h.lag.map((l) => el("tr", { "data-consumer": l.consumer },
    el("td", {}, l.consumer), el("td", {}, l.topic), el("td", {}, l.group),
    el("td", { class: `n ${l.records ? "warn" : "ok"}` }, num(l.records)))) :
    [el("tr", {}, el("td", { colspan: 4, class: "muted" }, h.kafka.up ? "No pipeline topic yet." : "Unknown: Kafka does not answer."))]));
  set("dlq-records", num(h.dlq.records));
  $("dlq").replaceChildren(...(h.dlq.reasons.length ? h.dlq.reasons.map((r) => el("tr", {},
    el("td", {}, r.stage), el("td", {}, r.reason), el("td", { class: "n" }, num(r.records)))) :
    [el("tr", {}, el("td", { colspan: 3, class: "muted" }, "No rejected record."))]));
  const pending = h.dlq.not_counted_yet;
  $("dlq-note").textContent = pending ? `${num(pending)} more records not counted yet.` :
    "Reasons with names and values taken out, so that records rejected the same way count together.";
}

let plot = null;

function chart(h) {
  const box = $("chart");
  if (!window.uPlot) {
    box.replaceChildren(el("p", { class: "error" }, "The chart library is not installed (run make web)."));
    return;
  }
  const c = h.history;
  const data = [c.t, c.clean_in, c.sealed_records, c.sealed_readings];
  const width = Math.max(320, box.clientWidth - 8);
  if (plot === null) {
    const value = (unit) => (u, v) => (v == null ? "–" : `${v.toFixed(1)} ${unit}`);
    plot = new window.uPlot({
      width, height: 220,
      scales: {
        // the last 10 minutes, however few samples there are yet
        x: { time: true, range: () => [Date.now() / 1000 - WINDOW_S, Date.now() / 1000] },
        records: { range: (u, min, max) => [0, Math.max(1, max)] },
        readings: { range: (u, min, max) => [0, Math.max(1, max)] },
      },
      series: [
        {},
        { label: "vitals.clean in", scale: "records", stroke: "#0b5cad", width: 2, value: value("records/s") },
        { label: "sealed (acknowledged)", scale: "records", stroke: "#116329", width: 2, dash: [6, 3], value: value("records/s") },
        { label: "readings sealed", scale: "readings", stroke: "#8a4b00", width: 1.5, value: value("readings/s") },
      ],
      axes: [
        {},
        { scale: "records", label: "records/s" },
        { scale: "readings", label: "readings/s", side: 1, grid: { show: false } },
      ],
      legend: { live: true },
    }, data, box);
  } else {
    if (Math.abs(plot.width - width) > 2) plot.setSize({ width, height: 220 });
    plot.setData(data);
  }
}

function draw(h) {
  banner(h);
  tiles(h);
  tables(h);
  chart(h);
  $("updated").textContent = `Updated ${new Date(h.at * 1000).toLocaleTimeString()}.`;
}

async function refresh() {
  try {
    draw(await api("/api/health"));
  } catch (e) {
    showError($("banner"), e);
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

await signedIn("operator");
refresh();
