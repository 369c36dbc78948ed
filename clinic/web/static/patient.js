// The patient's page: who can see my data (FHIR Consent: list, grant, revoke) and who looked
// at it (the audit log, newest first, with each record's proof status and its proof).
// Everything goes through the service's API; a refusal shows the service's reason.

import { api, el, showError, signedIn } from "/ui/app.js";

const PAGE = 50;
const CONSENT_ID = "urn:vitalproof:consent-id";
const FHIR = {
  scope: "http://terminology.hl7.org/CodeSystem/consentscope",
  loinc: "http://loinc.org",
  actCode: "http://terminology.hl7.org/CodeSystem/v3-ActCode",
  participation: "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
  actReason: "http://terminology.hl7.org/CodeSystem/v3-ActReason",
};
const ACTIONS = {
  read: "Read your history",
  stream: "Watched your vitals live",
  subscribe: "Opened a live view",
  proof: "Took the proof of a reading",
  consent: "Changed your sharing",
  "break-glass": "Opened emergency access",
  erasure: "Erased your data",
};
const FHIR_ID = /^[A-Za-z0-9.\-]{1,64}$/;

const $ = (id) => document.getElementById(id);
let me;
let options;
let metricText = {};
let purposeText = {};

function when(iso, timeStyle = "short") {
  if (!iso) return "";
  const d = new Date(iso);
  return el("time", { datetime: iso }, d.toLocaleString(undefined, { dateStyle: "medium", timeStyle }));
}

function ok(where, text) {
  where.replaceChildren(el("p", { class: "ok", role: "status" }, text));
}

// -- who can see my data -------------------------------------------------------------------

/** The parts of a FHIR Consent the table shows (the service writes one provision). */
function grantOf(c) {
  const p = c.provision || {};
  const actor = (p.actor || [])[0] || {};
  const ids = (c.identifier || []).filter((i) => i.system === CONSENT_ID);
  const purpose = ((p.purpose || [])[0] || {}).code;
  const metrics = p.code
    ? p.code.map((cc) => {
        const ours = (cc.coding || []).find((x) => x.system === options.systems.metric);
        return ours ? metricText[ours.code] || ours.code : cc.text;
      })
    : null;
  const period = p.period || {};
  const now = Date.now();
  let status;
  if (c.status !== "active") status = { text: "Revoked", cls: "muted", at: c.meta && c.meta.lastUpdated };
  else if (period.end && Date.parse(period.end) <= now) status = { text: "Expired", cls: "muted" };
  else if (period.start && Date.parse(period.start) > now) status = { text: "Not started yet", cls: "warn" };
  else status = { text: "Active", cls: "ok" };
  return {
    id: ids.length ? ids[0].value : c.id,
    grantee: actor.reference && actor.reference.reference,
    metrics,
    purpose,
    start: period.start,
    end: period.end,
    status,
    live: c.status === "active" && !(period.end && Date.parse(period.end) <= now),
  };
}

async function loadGrants() {
  const where = $("grants-status");
  try {
    const bundle = await api("/fhir/Consent");
    const grants = (bundle.entry || []).map((e) => grantOf(e.resource));
    grants.sort((a, b) => (b.live - a.live) || String(b.start).localeCompare(String(a.start)));
    const body = $("grants").querySelector("tbody");
    body.replaceChildren(...grants.map(grantRow));
    if (!grants.length) {
      body.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "You share your data with nobody.")));
    }
  } catch (e) {
    showError(where, e);
  }
}

function grantRow(g) {
  const revoke = g.live
    ? el("button", { type: "button", class: "danger", onclick: () => confirmRevoke(g) }, `Revoke ${g.grantee}`)
    : null;
  return el(
    "tr",
    { "data-grant": g.id, "data-status": g.status.text.toLowerCase() },
    el("td", {}, g.grantee),
    el("td", {}, g.metrics ? g.metrics.join(", ") : "All vital signs"),
    el(
      "td",
      {},
      g.purpose === "BTG" ? [el("span", { class: "badge bg" }, "Break-glass"), " "] : null,
      g.purpose ? `${purposeText[g.purpose] || g.purpose} (${g.purpose})` : "",
    ),
    el("td", {}, when(g.start)),
    el("td", {}, g.end ? when(g.end) : el("span", { class: "muted" }, "until you revoke")),
    el("td", { class: g.status.cls }, g.status.text, g.status.at ? [" ", when(g.status.at)] : null),
    el("td", {}, revoke),
  );
}

function confirmRevoke(g) {
  const dialog = $("confirm-revoke");
  const what = g.metrics ? g.metrics.join(", ") : "all your vital signs";
  $("confirm-text").textContent =
    `${g.grantee} loses access to ${what} at once, including any live view they have open. ` +
    "You can share with them again later.";
  dialog.returnValue = "";
  dialog.addEventListener(
    "close",
    () => {
      if (dialog.returnValue === "revoke") revoke(g);
    },
    { once: true },
  );
  dialog.showModal();
}

async function revoke(g) {
  const where = $("grants-status");
  try {
    await api(`/fhir/Consent/${encodeURIComponent(g.id)}`, { method: "DELETE" });
    ok(where, `${g.grantee} can no longer see your data.`);
  } catch (e) {
    showError(where, e);
  }
  await Promise.all([loadGrants(), reloadLog()]);
  // The button that opened the dialog is gone: keep keyboard users where the answer is.
  where.setAttribute("tabindex", "-1");
  where.focus();
}

// -- share with someone --------------------------------------------------------------------

function drawForm() {
  const boxes = $("metric-boxes");
  boxes.replaceChildren(
    ...options.metrics.map((m) =>
      el("label", {}, el("input", { type: "checkbox", name: "metric", value: m.code }), m.text),
    ),
  );
  const all = $("all-vitals");
  all.addEventListener("change", () => {
    for (const box of boxes.querySelectorAll("input")) {
      box.disabled = all.checked;
      if (all.checked) box.checked = false;
    }
  });
  $("purpose").replaceChildren(
    ...options.purposes.map((p) =>
      el("option", { value: p.code, selected: p.code === "TREAT" }, `${p.text} (${p.code})`),
    ),
  );
  $("start").value = localDate(new Date());
  $("share").addEventListener("submit", (ev) => {
    ev.preventDefault();
    share();
  });
}

function localDate(d) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
}

/** Midnight at the start of a yyyy-mm-dd day in this browser's time zone (+ days). */
function dayStart(text, days = 0) {
  const [y, m, d] = text.split("-").map(Number);
  return new Date(y, m - 1, d + days);
}

function patientRef() {
  const pid = me.patient_id;
  return FHIR_ID.test(pid)
    ? { reference: `Patient/${pid}` }
    : { type: "Patient", identifier: { system: options.systems.patient_id, value: pid } };
}

/** The form as a FHIR R4 Consent (the shape clinic/fhir_consent.py reads). */
function consentFromForm() {
  const grantee = $("grantee").value.trim();
  const all = $("all-vitals").checked;
  const metrics = [...$("metric-boxes").querySelectorAll("input:checked")].map((b) => b.value);
  if (!all && !metrics.length) throw new Error("Choose what they may see: all vital signs, or some of them.");
  const start = dayStart($("start").value);
  const end = $("end").value ? dayStart($("end").value, 1) : null;
  if (end && end <= start) throw new Error("The last day is before the first day.");
  const period = { start: start.toISOString() };
  if (end) period.end = end.toISOString();
  const provision = {
    type: "permit",
    period,
    actor: [{ role: { coding: [{ system: FHIR.participation, code: "IRCP" }] }, reference: { reference: grantee } }],
    purpose: [{ system: FHIR.actReason, code: $("purpose").value }],
  };
  if (!all) provision.code = metrics.map((m) => ({ coding: [{ system: options.systems.metric, code: m }] }));
  return {
    resourceType: "Consent",
    status: "active",
    scope: { coding: [{ system: FHIR.scope, code: "patient-privacy" }] },
    category: [{ coding: [{ system: FHIR.loinc, code: "59284-0" }] }],
    patient: patientRef(),
    dateTime: new Date().toISOString(),
    policyRule: { coding: [{ system: FHIR.actCode, code: "OPTIN" }] },
    provision,
  };
}

async function share() {
  const where = $("share-status");
  let doc;
  try {
    doc = consentFromForm();
  } catch (e) {
    showError(where, e);
    return;
  }
  try {
    await api("/fhir/Consent", { method: "POST", body: doc });
    ok(where, `Shared with ${doc.provision.actor[0].reference.reference}.`);
    $("share").reset();
    for (const box of $("metric-boxes").querySelectorAll("input")) box.disabled = false;
    $("start").value = localDate(new Date());
  } catch (e) {
    showError(where, e);
  }
  await Promise.all([loadGrants(), reloadLog()]);
}

// -- who looked at my data -----------------------------------------------------------------

let nextBefore = null;

async function reloadLog() {
  $("log").querySelector("tbody").replaceChildren();
  await loadLog(null);
}

async function loadLog(before) {
  const where = $("log-status");
  try {
    const q = new URLSearchParams({ limit: PAGE });
    if (before) q.set("before", before);
    const page = await api(`/api/disclosures?${q}`);
    const body = $("log").querySelector("tbody");
    body.append(...page.records.map(logRow));
    if (!page.total) body.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "Nobody has accessed your data.")));
    nextBefore = page.next_before;
    $("more").hidden = nextBefore === null;
    if (page.problem) showError(where, new Error(page.problem));
    else where.replaceChildren(el("p", { class: "muted small" }, `${page.total} records in all.`));
  } catch (e) {
    showError(where, e);
  }
}

function logRow(r) {
  const you = r.actor === me.subject;
  const what = [ACTIONS[r.action] || r.action];
  if (r.break_glass) what.unshift(el("span", { class: "badge bg" }, "Break-glass"), " ");
  const details = [el("div", { class: "muted small" }, r.what)];
  if (r.action === "break-glass") details.unshift(el("div", { class: "reason" }, `Reason given: ${r.reason}`));
  const outcome =
    r.outcome === "allowed"
      ? el("span", { class: "ok" }, "Allowed")
      : [el("span", { class: "bad" }, "Refused"), el("div", { class: "small" }, r.reason)];
  return el(
    "tr",
    { class: r.break_glass ? "break-glass" : null, "data-seq": r.seq, "data-action": r.action },
    el("td", {}, when(r.time, "medium")),
    el("td", {}, you ? "You" : r.actor, el("div", { class: "muted small" }, r.role)),
    el("td", {}, el("div", {}, what), details),
    el("td", {}, r.count ? String(r.count) : "—"),
    el("td", {}, r.purpose ? `${purposeText[r.purpose] || r.purpose} (${r.purpose})` : "—"),
    el("td", {}, outcome),
    el("td", {}, proofCell(r)),
  );
}

function proofCell(r) {
  const p = r.proof;
  if (p.status === "anchored") {
    return [
      el("span", { class: "badge ok", title: `checkpoint ${p.checkpoint}, transaction ${p.tx_hash}` }, "Anchored"),
      el("div", { class: "small" }, "tx ", el("code", { class: "tx" }, shortHash(p.tx_hash))),
      el("button", { type: "button", class: "secondary small", onclick: () => download(r.seq) },
        "Download proof", el("span", { class: "visually-hidden" }, ` of record ${r.seq}`)),
    ];
  }
  if (p.status === "pending") return el("span", { class: "badge warn" }, "Pending");
  return el("span", { class: "badge bad", title: p.problem }, "Unverified");
}

function shortHash(h) {
  return h && h.length > 14 ? `${h.slice(0, 10)}…${h.slice(-4)}` : String(h);
}

async function download(seq) {
  try {
    const doc = await api(`/api/disclosures/${seq}/proof`);
    const url = URL.createObjectURL(new Blob([JSON.stringify(doc, null, 2)], { type: "application/json" }));
    const a = el("a", { href: url, download: `disclosure-${seq}.json` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  } catch (e) {
    showError($("log-status"), e);
  }
}

// -- start ---------------------------------------------------------------------------------

async function main() {
  me = await signedIn("patient");
  try {
    options = await api("/api/consent-options");
  } catch (e) {
    showError($("page-status"), e);
    return;
  }
  metricText = Object.fromEntries(options.metrics.map((m) => [m.code, m.text]));
  purposeText = Object.fromEntries(options.purposes.map((p) => [p.code, p.text]));
  purposeText.BTG = "emergency access";
  drawForm();
  $("more").addEventListener("click", () => loadLog(nextBefore));
  await Promise.all([loadGrants(), loadLog(null)]);
  document.body.dataset.ready = "true";
}

main().catch((e) => {
  if (!String(e.message).startsWith("not signed in") && !String(e.message).includes("token on the")) {
    showError($("page-status"), e);
  }
});
