// A device page: its row, uPlot charts of its telemetry over the last hours (column
// arrays straight from /api/devices/{id}/telemetry), its model history and events.
// Live rows from /api/live update the summary and append a point when a new report came.
import {
  $, ago, dur, getJSON, h, header, healthBadge, learnSkew, live, mark, num, pathId, pct,
  serverNow, showError, when,
} from "./common.js";

const HOURS = 6;
const SERIES = [
  { key: "p95_ms", label: "p95 latency", unit: "ms", color: "#3b6fd8" },
  { key: "rate_per_s", label: "request rate", unit: "/s", color: "#2a9d5c" },
  { key: "error_rate", label: "error rate", unit: "", color: "#c9372c" },
  { key: "rss_mb", label: "RSS", unit: "MB", color: "#8a5cc2" },
  { key: "temperature_c", label: "temperature", unit: "°C", color: "#d07a1f" },
];

const id = pathId("/device/");
let data = null; // the telemetry columns
let current = null; // the latest row (the summary's ages move with the clock)
const charts = [];

function summary(row) {
  $("#device-id").textContent = row.device_id;
  document.title = `${row.device_id} · edgerun fleet`;
  $("#device-health").replaceChildren(healthBadge(row.health_class, `health: ${row.health}`));
  const state =
    row.online === null || row.online === undefined
      ? "never seen"
      : `${row.online ? "online" : "offline"}${row.since ? ` for ${dur(serverNow() - row.since)}` : ""}${row.reason ? ` (${row.reason})` : ""}`;
  const items = [
    ["State", state],
    ["Model", row.model_version ? `${row.model_name || ""} ${row.model_version}` : "—"],
    // Which of the bundle's variants the device measured fastest, and why (its own words).
    ["Variant", row.variant ? `${row.variant}${row.variant_reason ? ` (${row.variant_reason})` : ""}` : "—"],
    ["Rollback slot", row.previous_version || "—"],
    ["Agent", row.agent_version || "—"],
    ["Groups", (row.groups || []).join(", ") || "—"],
    ["Health", row.health],
    ["p95", `${num(row.p95_ms)} ms`],
    ["Rate", `${num(row.rate_per_s, 2)} /s`],
    ["Errors", pct(row.error_rate)],
    ["RSS", `${num(row.rss_mb)} MB`],
    ["Temperature", `${num(row.temperature_c)} °C`],
    ["Outbox", row.outbox_messages ?? "—"],
    ["Last seen", ago(row.seen_at)],
    ["Update", row.phase ? `${row.phase} (job ${row.job})` : "—"],
  ];
  $("#summary").replaceChildren(...items.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: String(v) })]));
}

function chartWidth() {
  const box = $("#charts");
  const w = box.clientWidth || 900;
  return Math.max(280, Math.floor(w > 900 ? w / 2 - 36 : w - 24));
}

function drawCharts() {
  const box = $("#charts");
  charts.splice(0).forEach((c) => c.destroy());
  box.replaceChildren();
  const ts = data.ts || [];
  $("#charts-range").textContent = ts.length
    ? `(${ts.length} reports since ${when(ts[0])})`
    : `(no reports in the last ${HOURS} h)`;
  for (const s of SERIES) {
    const ys = data[s.key] || [];
    const have = ys.some((v) => v !== null && v !== undefined);
    const fig = h("figure", { class: "chart", dataset: { series: s.key, points: String(ys.filter((v) => v !== null).length) } });
    fig.append(h("figcaption", { text: `${s.label}${s.unit ? ` (${s.unit})` : ""}` }));
    box.append(fig);
    if (!have) {
      fig.append(h("p", { class: "note", text: "no figures" }));
      continue;
    }
    const opts = {
      width: chartWidth(),
      height: 180,
      legend: { show: true },
      // A rate that stays at 0 would get uPlot's default 0-100 axis: keep rates near 0-5%.
      scales: {
        x: { time: true },
        y: s.key === "error_rate" ? { range: (u, lo, hi) => [0, Math.max(0.05, (hi || 0) * 1.2)] } : {},
      },
      series: [{}, { label: s.label, stroke: s.color, width: 1.5, spanGaps: false, points: { show: ts.length < 60 } }],
      axes: [{}, { size: 60 }],
    };
    charts.push(new window.uPlot(opts, [ts, ys], fig));
  }
  mark("charts-ready");
}

function appendPoint(row) {
  if (!data || typeof row.telemetry_ts !== "number") return;
  const ts = data.ts;
  if (ts.length && row.telemetry_ts <= ts[ts.length - 1]) return;
  ts.push(row.telemetry_ts);
  for (const s of SERIES) (data[s.key] = data[s.key] || []).push(row[s.key] ?? null);
  drawCharts();
}

function tables(doc) {
  $("#models tbody").replaceChildren(
    ...(doc.models || []).map((m) =>
      h(
        "tr",
        {},
        h("td", { text: when(m.ts) }),
        h("td", { text: m.version }),
        h("td", { class: "mono", title: m.sha256 || "", text: m.sha256 ? m.sha256.slice(0, 16) : "—" }),
        h("td", {}, m.via ? h("a", { href: `/rollout/${encodeURIComponent(m.via)}`, text: m.via }) : "direct"),
      ),
    ),
  );
  if (!(doc.models || []).length) $("#models tbody").append(h("tr", {}, h("td", { colspan: 4, class: "empty", text: "none recorded" })));
  const events = [...(doc.events || [])].reverse();
  $("#events tbody").replaceChildren(
    ...events.map((e) =>
      h(
        "tr",
        { class: /failed|rolled_back|refused|interrupted/.test(e.kind) ? "bad" : "" },
        h("td", { text: when(e.ts) }),
        h("td", { class: "mono", text: e.kind }),
        h("td", { text: e.reason || "" }),
        h("td", { class: "mono small", text: e.data && Object.keys(e.data).length ? JSON.stringify(e.data) : "" }),
      ),
    ),
  );
  if (!events.length) $("#events tbody").append(h("tr", {}, h("td", { colspan: 4, class: "empty", text: "no events" })));
}

async function load() {
  const doc = await getJSON(`/api/devices/${encodeURIComponent(id)}`);
  learnSkew(doc.row);
  current = doc.row;
  summary(doc.row);
  tables(doc);
  data = await getJSON(`/api/devices/${encodeURIComponent(id)}/telemetry`, {
    since: Math.floor(serverNow() - HOURS * 3600),
  });
  drawCharts();
}

async function main() {
  await header("devices");
  $("#device-id").textContent = id;
  try {
    await load();
  } catch (err) {
    showError(err);
    mark("charts-ready");
    return;
  }
  live(
    {
      devices: (msg) => {
        const row = (msg.rows || []).find((r) => r.device_id === id);
        if (!row) return;
        current = row;
        summary(row);
        appendPoint(row);
      },
    },
    () => load().catch(showError),
    [id], // only this device's rows
  );
  setInterval(() => current && summary(current), 5000);
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => data && drawCharts(), 150);
  });
}

main().catch(showError);
