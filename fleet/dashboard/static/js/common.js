// Shared by every page: DOM building (text only, never innerHTML: device ids, reasons and
// gate strings come from devices and operators), the JSON API, the session, the header,
// the live stream and number/time formatting.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function $(sel, root = document) {
  return root.querySelector(sel);
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
  toString() {
    return `[${this.code}] ${this.message}`;
  }
}

async function parse(res) {
  let body = null;
  try {
    body = await res.json();
  } catch {
    body = null;
  }
  if (!res.ok) {
    const err = (body && body.error) || {};
    throw new ApiError(
      res.status,
      err.code || `http.${res.status}`,
      err.message || `${res.status} ${res.statusText}`,
    );
  }
  return body;
}

export async function getJSON(path, params) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== null && v !== undefined && v !== "") url.searchParams.set(k, String(v));
  }
  const res = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
  return parse(res);
}

export async function postJSON(path, body) {
  const session = await getSession();
  const headers = { "Content-Type": "application/json", Accept: "application/json" };
  if (session.csrf) headers["X-CSRF-Token"] = session.csrf;
  const res = await fetch(path, {
    method: "POST",
    headers,
    credentials: "same-origin",
    body: JSON.stringify(body || {}),
  });
  return parse(res);
}

let sessionPromise = null;

export function getSession(refresh = false) {
  if (refresh || !sessionPromise) {
    sessionPromise = getJSON("/api/session").catch(() => ({ logged_in: false, user: null, csrf: null }));
  }
  return sessionPromise;
}

// ------------------------------------------------------------------ header and messages

export async function header(active) {
  const nav = h(
    "nav",
    { class: "top", "aria-label": "main" },
    h("a", { href: "/", class: "brand", text: "edgerun fleet" }),
    h("a", { href: "/", class: active === "devices" ? "active" : "", text: "Devices" }),
    h("a", { href: "/rollouts", class: active === "rollouts" ? "active" : "", text: "Rollouts" }),
    h("span", { class: "spacer" }),
    h("span", { id: "live-state", class: "live-state", role: "status", text: "connecting…" }),
    h("span", { id: "who", class: "who" }),
  );
  if (active === "login") nav.querySelector("#live-state").remove(); // no stream on this page
  document.body.prepend(nav);
  const session = await getSession();
  const who = $("#who");
  if (session.logged_in) {
    who.append(
      h("span", { text: `signed in as ${session.user}` }),
      h("button", {
        type: "button",
        id: "logout",
        text: "Log out",
        onclick: async () => {
          try {
            await postJSON("/api/logout", {});
          } finally {
            location.reload();
          }
        },
      }),
    );
  } else if (session.read_only) {
    // No credentials configured: nobody can log in, so offer no login.
    who.append(
      h("span", {
        class: "readonly",
        id: "read-only",
        title: session.read_only_reason || "edge-fleet serve --credentials FILE enables actions",
        text: "read-only dashboard",
      }),
    );
  } else {
    const next = encodeURIComponent(location.pathname + location.search);
    who.append(
      h("span", { class: "readonly", text: "read-only" }),
      h("a", { href: `/login?next=${next}`, id: "login-link", text: "Log in" }),
    );
  }
  return session;
}

export function showError(err) {
  let box = $("#message");
  if (!box) {
    box = h("div", { id: "message", class: "message", role: "alert" });
    $("main").prepend(box);
  }
  box.textContent = err instanceof ApiError ? err.toString() : String(err && err.message ? err.message : err);
  box.hidden = false;
}

export function clearError() {
  const box = $("#message");
  if (box) box.hidden = true;
}

// ------------------------------------------------------------------ live stream

// One EventSource per page; EventSource retries by itself. `onReopen` runs when the stream
// comes back after a drop, so a page re-reads what it may have missed (no polling).
// `devices`: only these devices' rows (an array; [] for none), else every changed row.
export function live(handlers, onReopen, devices) {
  const state = $("#live-state");
  const url = devices ? `/api/live?devices=${devices.map(encodeURIComponent).join(",")}` : "/api/live";
  const es = new EventSource(url);
  let dropped = false;
  es.addEventListener("open", () => {
    if (state) {
      state.textContent = "live";
      state.className = "live-state up";
    }
    if (dropped && onReopen) onReopen();
    dropped = false;
  });
  es.addEventListener("error", () => {
    dropped = true;
    if (state) {
      state.textContent = "reconnecting…";
      state.className = "live-state down";
    }
  });
  for (const [name, fn] of Object.entries(handlers)) {
    es.addEventListener(name, (ev) => {
      let data;
      try {
        data = JSON.parse(ev.data);
      } catch {
        return;
      }
      fn(data);
    });
  }
  window.addEventListener("pagehide", () => es.close(), { once: true });
  return es;
}

// ------------------------------------------------------------------ formatting

// The server's clock minus ours (seconds), learnt from rows (seen_at + age_s = server now),
// so "offline for 3 min" is right even when this browser's clock is off.
let skew = 0;
export function learnSkew(row) {
  if (row && typeof row.seen_at === "number" && typeof row.age_s === "number") {
    skew = row.seen_at + row.age_s - Date.now() / 1000;
  }
}
export function serverNow() {
  return Date.now() / 1000 + skew;
}

export function dur(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "—";
  s = Math.max(0, s);
  if (s < 60) return `${Math.floor(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

export function ago(ts) {
  if (ts === null || ts === undefined) return "—";
  return `${dur(serverNow() - ts)} ago`;
}

export function num(v, digits = 1) {
  if (v === null || v === undefined || v === "") return "—";
  const n = typeof v === "number" ? v : Number(v);
  if (!Number.isFinite(n)) return String(v);
  return n.toFixed(digits);
}

export function pct(v) {
  if (v === null || v === undefined) return "—";
  return `${(Number(v) * 100).toFixed(2)} %`;
}

export function when(ts) {
  if (ts === null || ts === undefined) return "—";
  const d = new Date(ts * 1000);
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getUTCFullYear()}-${p(d.getUTCMonth() + 1)}-${p(d.getUTCDate())} ${p(d.getUTCHours())}:${p(d.getUTCMinutes())}:${p(d.getUTCSeconds())} UTC`;
}

export const HEALTH_TEXT = {
  ok: "healthy",
  warn: "warning",
  bad: "unhealthy",
  offline: "offline",
  unknown: "unknown",
};

// A coloured dot plus the word: colour is never the only signal.
export function healthBadge(cls, detail) {
  const c = HEALTH_TEXT[cls] ? cls : "unknown";
  return h(
    "span",
    { class: `health health-${c}`, title: detail || HEALTH_TEXT[c] },
    h("span", { class: "dot", "aria-hidden": "true" }),
    HEALTH_TEXT[c],
  );
}

export function pathId(prefix) {
  const rest = location.pathname.slice(prefix.length);
  return decodeURIComponent(rest.replace(/\/+$/, ""));
}

// Marks for tests and bench/dashboard.py: performance marks plus data attributes.
export function mark(name) {
  performance.mark(`edgerun:${name}`);
  document.documentElement.dataset[name.replace(/-(\w)/g, (_, c) => c.toUpperCase())] =
    String(performance.now());
}
