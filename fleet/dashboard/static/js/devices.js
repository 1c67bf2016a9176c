// The device table: a virtual list over server-side pages. Only the rows on screen (plus
// a small margin) are in the DOM, and only the pages they fall in are fetched, so 10,000
// devices cost one page of JSON and ~40 table rows. Live rows from /api/live replace
// their cached copies in place.
import {
  $, ago, dur, getJSON, h, header, healthBadge, learnSkew, live, mark, num, pct, serverNow,
  showError, clearError,
} from "./common.js";

const ROW_H = 28; // px; must match `.vt tbody tr` in app.css
const PAGE = 200;
const MARGIN = 8; // rows rendered beyond each edge of the viewport

const COLUMNS = [
  { key: "health_class", sort: "health_class", label: "Health" },
  { key: "device_id", sort: "device_id", label: "Device" },
  { key: "online", sort: "online", label: "State" },
  { key: "model_version", sort: "model_version", label: "Model" },
  { key: "p95_ms", sort: "p95_ms", label: "p95 ms", num: true },
  { key: "rate_per_s", sort: "rate_per_s", label: "rate/s", num: true },
  { key: "error_rate", sort: "error_rate", label: "errors", num: true },
  { key: "rss_mb", sort: "rss_mb", label: "RSS MB", num: true },
  { key: "temperature_c", sort: "temperature_c", label: "temp °C", num: true },
  { key: "seen_at", sort: "seen_at", label: "Last seen" },
  { key: "phase", sort: "phase", label: "Update" },
];

const params = new URLSearchParams(location.search);
const query = {
  group: params.get("group") || "",
  q: params.get("q") || "",
  sort: params.get("sort") || "device_id",
  desc: params.get("desc") === "1" ? 1 : 0,
};

let gen = 0; // bumped on every query change: late answers of an older query are dropped
let total = null;
const pages = new Map(); // page index -> rows
const loading = new Set();
const where = new Map(); // device_id -> [page, index]
let groups = [];

const scroller = $("#scroller");
const tbody = $("#rows");
const countEl = $("#count");

function cell(col, r) {
  switch (col.key) {
    case "health_class":
      return healthBadge(r.health_class, `health: ${r.health}`);
    case "device_id":
      return h("a", { href: `/device/${encodeURIComponent(r.device_id)}`, text: r.device_id });
    case "online": {
      if (r.online === null || r.online === undefined) return "never seen";
      const word = r.online ? "online" : "offline";
      const since = r.since ? ` ${dur(serverNow() - r.since)}` : "";
      return h("span", { class: r.online ? "on" : "off", title: r.reason || "" }, word + since);
    }
    case "model_version":
      return r.model_version ? `${r.model_name || ""} ${r.model_version}`.trim() : "—";
    case "error_rate":
      return pct(r.error_rate);
    case "seen_at":
      return r.seen_at ? ago(r.seen_at) : "—";
    case "phase":
      return r.phase || "—";
    default:
      return num(r[col.key], col.key === "rate_per_s" ? 2 : 1);
  }
}

function rowEl(r, i) {
  const tr = h("tr", {
    class: `h-${r.health_class || "unknown"}`,
    dataset: { device: r.device_id, health: r.health_class || "unknown", online: String(r.online), index: String(i), telemetryTs: String(r.telemetry_ts ?? "") },
  });
  for (const col of COLUMNS) tr.append(h("td", { class: col.num ? "n" : "" }, cell(col, r)));
  return tr;
}

function rowAt(i) {
  const p = pages.get(Math.floor(i / PAGE));
  return p ? p[i % PAGE] : undefined;
}

async function loadPage(p) {
  if (pages.has(p) || loading.has(p)) return;
  loading.add(p);
  const mine = gen;
  try {
    const res = await getJSON("/api/devices", { ...query, offset: p * PAGE, limit: PAGE });
    if (mine !== gen) return;
    clearError();
    store(p, res);
    render();
  } catch (err) {
    if (mine === gen) showError(err);
  } finally {
    loading.delete(p);
  }
}

function store(p, res) {
  total = res.total;
  pages.set(p, res.rows);
  res.rows.forEach((r, i) => where.set(r.device_id, [p, i]));
  if (res.rows.length) learnSkew(res.rows[0]);
  if (res.groups && res.groups.join("\n") !== groups.join("\n")) {
    groups = res.groups;
    fillGroups();
  }
}

let scheduled = false;
function render() {
  if (scheduled) return;
  scheduled = true;
  requestAnimationFrame(() => {
    scheduled = false;
    draw();
  });
}

function draw() {
  if (total === null) return;
  countEl.textContent = `${total} device${total === 1 ? "" : "s"}`;
  const first = Math.max(0, Math.floor(scroller.scrollTop / ROW_H) - MARGIN);
  const visible = Math.ceil(scroller.clientHeight / ROW_H) + 2 * MARGIN;
  const last = Math.min(total, first + visible);
  const shown = [];
  for (let p = Math.floor(first / PAGE); p <= Math.floor(Math.max(first, last - 1) / PAGE); p++) {
    if (p * PAGE < total) {
      loadPage(p);
      shown.push(p);
    }
  }
  follow(shown);
  const frag = document.createDocumentFragment();
  const top = h("tr", { class: "pad", "aria-hidden": "true" });
  top.style.height = `${first * ROW_H}px`;
  frag.append(top);
  for (let i = first; i < last; i++) {
    const r = rowAt(i);
    if (r) frag.append(rowEl(r, i));
    else {
      const tr = h("tr", { class: "loading" }, h("td", { colspan: COLUMNS.length, text: "…" }));
      frag.append(tr);
    }
  }
  const bottom = h("tr", { class: "pad", "aria-hidden": "true" });
  bottom.style.height = `${(total - last) * ROW_H}px`;
  frag.append(bottom);
  tbody.replaceChildren(frag);
  tbody.dataset.drawnAt = String(scroller.scrollTop); // which scroll position this shows
  if (total === 0) {
    tbody.append(h("tr", {}, h("td", { colspan: COLUMNS.length, class: "empty", text: "no devices seen on the broker" })));
  }
  const firstScreen = last >= Math.min(total, first + 1) && (total === 0 || rowAt(first));
  if (firstScreen && !document.documentElement.dataset.tableReady) mark("table-ready");
}

function reset() {
  gen++;
  pages.clear();
  where.clear();
  total = null;
  scroller.scrollTop = 0;
  const url = new URL(location.href);
  for (const [k, v] of Object.entries(query)) {
    if (v === "" || (k === "desc" && !v) || (k === "sort" && v === "device_id")) url.searchParams.delete(k);
    else url.searchParams.set(k, String(v));
  }
  history.replaceState(null, "", url);
  drawHeaders();
  loadPage(0);
}

function drawHeaders() {
  const tr = $("#head");
  tr.replaceChildren(
    ...COLUMNS.map((col) => {
      const active = query.sort === col.sort;
      const th = h(
        "th",
        {
          scope: "col",
          class: col.num ? "n" : "",
          "aria-sort": active ? (query.desc ? "descending" : "ascending") : "none",
        },
        h(
          "button",
          {
            type: "button",
            dataset: { sort: col.sort },
            title: `sort by ${col.label}`,
            onclick: () => {
              if (query.sort === col.sort) query.desc = query.desc ? 0 : 1;
              else {
                query.sort = col.sort;
                query.desc = 0;
              }
              reset();
            },
          },
          col.label,
          active ? (query.desc ? " ▼" : " ▲") : "",
        ),
      );
      return th;
    }),
  );
}

function fillGroups() {
  const sel = $("#group");
  const opts = [h("option", { value: "", text: "all groups" })];
  for (const g of groups) opts.push(h("option", { value: g, text: g }));
  sel.replaceChildren(...opts);
  sel.value = query.group;
}

// Live rows: replace the cached copy; a device not in a loaded page (new, or outside the
// window) changes nothing on screen unless the total moved, which re-reads the window.
function onDevices(msg) {
  let touched = false;
  for (const r of msg.rows || []) {
    const at = where.get(r.device_id);
    if (!at) continue;
    const page = pages.get(at[0]);
    if (page && page[at[1]] && page[at[1]].device_id === r.device_id) {
      page[at[1]] = r;
      touched = true;
    }
  }
  if (typeof msg.total === "number" && msg.total !== total && !query.group && !query.q) {
    // Devices came or went: the paging moved under us. Re-read what is on screen.
    refresh();
    return;
  }
  if (touched) render();
}

// The live stream carries only the rows of the pages on screen (`?devices=`): at 10,000
// devices the whole stream is ~1,000 rows a second the page would parse for nothing.
// Scrolling to other pages re-subscribes (debounced); with nothing on screen, all rows.
let stream = null;
let streamKey = null;
let resubscribe = null;
function follow(shownPages) {
  const ids = [];
  for (const p of shownPages) for (const r of pages.get(p) || []) ids.push(r.device_id);
  if (shownPages.some((p) => !pages.has(p))) return; // wait for the rows to arrive
  const key = ids.length ? [...ids].sort().join(",") : "*";
  if (key === streamKey) return;
  clearTimeout(resubscribe);
  resubscribe = setTimeout(() => {
    streamKey = key;
    if (stream) stream.close();
    stream = live({ devices: onDevices }, refresh, ids.length ? ids : undefined);
  }, stream ? 250 : 0);
}

function refresh() {
  const keep = scroller.scrollTop;
  gen++;
  const loaded = [...pages.keys()];
  pages.clear();
  where.clear();
  for (const p of loaded.length ? loaded : [0]) loadPage(p);
  scroller.scrollTop = keep;
}

async function main() {
  await header("devices");
  $("#q").value = query.q;
  let typing = null;
  $("#q").addEventListener("input", (ev) => {
    clearTimeout(typing);
    typing = setTimeout(() => {
      query.q = ev.target.value.trim();
      reset();
    }, 200);
  });
  $("#group").addEventListener("change", (ev) => {
    query.group = ev.target.value;
    reset();
  });
  scroller.addEventListener("scroll", render, { passive: true });
  window.addEventListener("resize", render);
  // Ages ("12 s ago", "offline 3 min") move with the clock: redraw the visible rows.
  setInterval(render, 1000);
  drawHeaders();
  loadPage(0);
}

main().catch(showError);
