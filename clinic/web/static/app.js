// Shared by every page: the signed-in token, calls to the service's API, and the page frame.
// The token lives in sessionStorage (this tab only, gone when it closes); a link may carry
// it in its fragment (#token=...), which never reaches a server log.

const KEY = "vitalproof.token";

export class ApiError extends Error {
  constructor(status, reason) {
    super(reason);
    this.status = status;
  }
}

export function takeTokenFromFragment() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem(KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

export function token() {
  return sessionStorage.getItem(KEY);
}

export function setToken(t) {
  sessionStorage.setItem(KEY, t);
}

export function signOut() {
  sessionStorage.removeItem(KEY);
  location.href = "/ui/";
}

/** The reason a refusal gives (an OperationOutcome's diagnostics), or the status line. */
async function reasonOf(resp) {
  try {
    const body = await resp.json();
    const issue = body.issue && body.issue[0];
    if (issue && issue.diagnostics) return issue.diagnostics;
    if (body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (_) { /* not JSON */ }
  return `${resp.status} ${resp.statusText}`;
}

/** JSON from the service with the signed-in token; an ApiError carries the refusal's reason. */
export async function api(path, { method = "GET", body, signal } = {}) {
  const headers = { Accept: "application/json" };
  const t = token();
  if (t) headers.Authorization = `Bearer ${t}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, {
    method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!resp.ok) throw new ApiError(resp.status, await reasonOf(resp));
  return resp.status === 204 ? null : resp.json();
}

/** An element: el("td", {class: "ok"}, "text", child, ...). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const HOME = { clinician: "/ui/clinician.html", patient: "/ui/patient.html", operator: "/ui/operator.html" };

export function homeOf(role) {
  return HOME[role] || "/ui/";
}

/**
 * The signed-in principal (/api/me), or a redirect to sign-in when there is none or the token
 * was refused. ``role``: the page's role; another role is sent to its own page.
 */
export async function signedIn(role) {
  takeTokenFromFragment();
  if (!token()) {
    location.href = "/ui/?next=" + encodeURIComponent(location.pathname + location.search);
    throw new Error("not signed in");
  }
  let me;
  try {
    me = await api("/api/me");
  } catch (e) {
    sessionStorage.removeItem(KEY);
    location.href = "/ui/?error=" + encodeURIComponent(e.message);
    throw e;
  }
  if (role && me.role !== role) {
    location.href = homeOf(me.role);
    throw new Error(`a ${me.role} token on the ${role} page`);
  }
  frame(me);
  return me;
}

/** The page's top bar: where one can go, who is signed in, and sign-out. */
export function frame(me) {
  const bar = document.querySelector("header.top");
  if (!bar) return;
  const nav = el("nav", { "aria-label": "Main" });
  if (me) nav.append(el("a", { href: homeOf(me.role) }, "My view"));
  nav.append(el("a", { href: "/ui/verify.html" }, "Verify a reading"));
  bar.replaceChildren(el("a", { class: "brand", href: "/ui/" }, "vitalproof"), nav);
  if (me) {
    bar.append(
      el("span", { class: "who", "data-testid": "who" }, `${me.subject} (${me.role})`),
      el("button", { type: "button", onclick: signOut }, "Sign out"),
    );
  }
}

export function ago(us, nowMs = Date.now()) {
  const s = Math.max(0, Math.round(nowMs / 1000 - us / 1e6));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

export function showError(where, e) {
  where.replaceChildren(el("p", { class: "error", role: "alert" }, e.message || String(e)));
}
