// The verify page: one bundle, every check of the Python verifier in its order (cli.py's
// check_file), each shown as pass, fail or not run, and one verdict. The bundle is read here and
// checked here; the only requests are the JSON-RPC calls to the URL the user typed.

import { el, frame } from "/ui/app.js";
import { FAILURE, OFFLINE_CHECKS_V2, ProofError, loadBundle, offlineChecks } from "/ui/bundle.js";
import { CHAIN_CHECKS, RpcUnusable, call } from "/ui/rpc.js";

const RPC_KEY = "vitalproof.rpc";
const PARSE = { id: "bundle", label: "The file is a proof bundle (version 1 or 2)", failure: FAILURE.MALFORMED };

const form = document.getElementById("verify");
const input = document.getElementById("bundle");
const rpc = document.getElementById("rpc");
const drop = document.getElementById("drop");
const verdict = document.getElementById("verdict");
const list = document.getElementById("checks");

const BADGE = { pass: "ok", fail: "bad", "not-run": "muted" };

function show(check, state, reason) {
  const row = el(
    "li", { "data-check": check.id, "data-state": state, "data-failure": state === "fail" ? check.failure : null },
    el("span", { class: `badge ${BADGE[state]}` }, state.replace("-", " ")), " ",
    el("strong", {}, check.label), el("br"),
    el("span", { class: "reason" }, reason),
  );
  list.querySelector(`[data-check="${check.id}"]`).replaceWith(row);
}

function conclude(kind, text, failure) {
  verdict.className = { verified: "ok", rejected: "bad", undecided: "warn" }[kind];
  verdict.dataset.verdict = kind;
  if (failure) verdict.dataset.failure = failure;
  verdict.textContent = text;
}

/** One row per check, each "not run" until it runs. */
function listChecks(all) {
  list.replaceChildren(...all.map((c) => el("li", { "data-check": c.id })));
  all.forEach((c) => show(c, "not-run", "not run"));
}

/** Run every check on `bytes`, against the chain at `url` when one is given. */
async function verify(bytes, url) {
  listChecks([PARSE, ...OFFLINE_CHECKS_V2, ...CHAIN_CHECKS]);
  let bundle;
  try {
    bundle = loadBundle(bytes);
  } catch (e) {
    show(PARSE, "fail", e.detail);
    for (const c of [...OFFLINE_CHECKS_V2, ...CHAIN_CHECKS]) show(c, "not-run", "not run: the file is not a bundle");
    return conclude("rejected", `Rejected: ${e.message}`, e.failure);
  }
  const offline = offlineChecks(bundle); // the bundle's version decides its checks
  listChecks([PARSE, ...offline, ...CHAIN_CHECKS]);
  const r = bundle.reading;
  show(PARSE, "pass", `version ${bundle.version}: reading ${r.reading_id} (${r.metric}) of patient ${r.patient_id}`);
  const ctx = { url };
  const checks = url ? [...offline, ...CHAIN_CHECKS] : offline;
  try {
    if (url) ctx.chainId = BigInt(await call(url, "eth_chainId")); // is it there at all?
    for (const [i, check] of checks.entries()) {
      try {
        show(check, "pass", await check.run(bundle, ctx));
      } catch (e) {
        if (!(e instanceof ProofError)) throw e;
        show(check, "fail", e.detail);
        for (const c of checks.slice(i + 1)) show(c, "not-run", "not run: an earlier check failed");
        return conclude("rejected", `Rejected: ${e.message}`, e.failure);
      }
    }
  } catch (e) {
    if (!(e instanceof RpcUnusable)) throw e;
    return conclude("undecided", `Not decided: ${e.message}`);
  }
  const a = bundle.anchor;
  const what = `reading ${r.reading_id} is in batch ${bundle.batch.batch_id}, anchored in tx ${a.tx_hash} (block ${a.block_number})`;
  if (!url) {
    for (const c of CHAIN_CHECKS) show(c, "not-run", "not run: no JSON-RPC URL given");
    return conclude("verified", `Verified offline only (no JSON-RPC URL given): ${what}; the chain was not asked.`);
  }
  conclude("verified", `Verified: ${what}, checked on chain ${a.chain_id}.`);
}

rpc.value = localStorage.getItem(RPC_KEY) || "";

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const file = input.files[0];
  const url = rpc.value.trim();
  if (url) localStorage.setItem(RPC_KEY, url);
  else localStorage.removeItem(RPC_KEY);
  delete verdict.dataset.failure;
  if (!file) return conclude("undecided", "Choose a proof bundle file first.");
  verdict.className = "";
  verdict.dataset.verdict = "running";
  verdict.textContent = `Checking ${file.name}…`;
  try {
    await verify(new Uint8Array(await file.arrayBuffer()), url);
  } catch (e) {
    conclude("undecided", `Not decided: ${e.message}`);
  }
});

drop.addEventListener("dragover", (ev) => {
  ev.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => {
  ev.preventDefault();
  drop.classList.remove("over");
  if (ev.dataTransfer.files.length) input.files = ev.dataTransfer.files;
});

frame(null);
