// A rollout page: its waves as a timeline, each device's outcome, every gate with its
// figure, baseline and limit, the halt reason, the records; live through `rollout`
// events (re-read on each, at most every 300 ms). Actions need a login and send the
// session's CSRF token.
import {
  $, getJSON, h, header, live, mark, num, pathId, postJSON, serverNow, showError, clearError,
  when,
} from "./common.js";

const id = pathId("/rollout/");
let session = { logged_in: false };
let doc = null;

const STATUS_TEXT = {
  pending: "pending",
  started: "updating",
  succeeded: "succeeded",
  failed: "failed",
  timed_out: "timed out",
  skipped_offline: "skipped (offline)",
  already_current: "already current",
  rolled_back: "rolled back",
  rollback_failed: "rollback failed",
};

function statusBadge(status) {
  return h("span", { class: `st st-${status}` }, STATUS_TEXT[status] || status);
}

function fig(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "string") return v; // "NaN", "Infinity" as stored
  return Math.abs(v) >= 100 ? num(v, 1) : Math.abs(v) >= 1 ? num(v, 2) : num(v, 4);
}

function head(r) {
  const b = r.bundle || {};
  document.title = `${r.rollout_id} · edgerun fleet`;
  $("#rollout-id").textContent = r.rollout_id;
  const phase = r.phase === "finished" ? `finished: ${r.outcome}` : r.phase;
  $("#rollout-phase").replaceChildren(h("span", { class: `phase ph-${r.phase} out-${r.outcome || "none"}`, text: phase }));
  const counts = Object.entries(r.devices || {})
    .map(([k, v]) => `${v} ${STATUS_TEXT[k] || k}`)
    .join(", ");
  const items = [
    ["Bundle", `${b.name || "?"} ${b.version || "?"}`],
    ["SHA-256", b.sha256 ? b.sha256.slice(0, 16) : "—"],
    ["Targets", `${r.targets} in ${(r.waves || []).length} waves (${(r.waves || []).join(" / ")})`],
    ["Waves", `${r.waves_started} started, ${r.waves_finished} finished`],
    ["Devices", counts || "—"],
    ["Created", `${when(r.created_ts)} by ${(r.created_by || {}).operator || "?"}`],
    ["Driver", r.driver || "—"],
    ["Plan", planText(r.plan || {})],
  ];
  $("#rollout-summary").replaceChildren(...items.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: String(v) })]));
  const halt = $("#halt");
  const reason = (r.halted && r.halted.reason) || (r.outcome && r.outcome !== "succeeded" ? r.reason : "");
  if (reason) {
    halt.hidden = false;
    const c = r.halted && r.halted.cause;
    const cause = c && !reason.startsWith(c) ? `${c}: ` : "";
    halt.replaceChildren(h("strong", { text: r.halted ? "Halted. " : "Stopped. " }), `${cause}${reason}`);
  } else halt.hidden = true;
}

function planText(p) {
  const parts = [];
  if (p.gates && p.gates.length) parts.push(`gates ${p.gates.map((g) => (typeof g === "string" ? g : g.text || JSON.stringify(g))).join(", ")}`);
  if (p.soak_s !== undefined) parts.push(`soak ${p.soak_s} s`);
  if (p.success_pct !== undefined) parts.push(`success ≥ ${p.success_pct} %`);
  return parts.join("; ") || "—";
}

function gatesByDevice(gates) {
  const m = new Map();
  for (const g of gates || []) {
    if (!m.has(g.device_id)) m.set(g.device_id, []);
    m.get(g.device_id).push(g);
  }
  return m;
}

// The timeline: one lane per wave, placed on a common time axis from the rollout's
// creation to its end (or now), with one chip per device coloured by its outcome.
function timeline(r, waves) {
  const t0 = r.created_ts || (waves[0] && waves[0].started_at) || serverNow();
  const ends = waves.map((w) => w.finished_at || w.started_at).filter((x) => x);
  const t1 = Math.max(r.phase === "finished" ? Math.max(t0 + 1, ...ends) : serverNow(), t0 + 1);
  const span = t1 - t0;
  const lanes = waves.map((w) => {
    const lane = h("div", {
      class: "lane",
      dataset: { wave: String(w.index), passed: w.passed === true || w.passed === false ? String(w.passed) : "pending" },
    });
    const label = h(
      "div",
      { class: "lane-label" },
      h("strong", { text: w.index === 0 ? "wave 0 (canary)" : `wave ${w.index}` }),
      h("span", { text: ` ${w.devices.length} device${w.devices.length === 1 ? "" : "s"}` }),
      h("span", {
        class: `verdict v-${w.passed === true ? "passed" : w.passed === false ? "failed" : w.started_at ? "running" : "waiting"}`,
        text: w.passed === true ? "passed" : w.passed === false ? "failed" : w.started_at ? "running" : "not started",
      }),
    );
    const track = h("div", { class: "track" });
    if (w.started_at) {
      const bar = h("div", { class: `bar ${w.passed === false ? "bad" : w.passed === true ? "good" : "run"}` });
      const left = ((w.started_at - t0) / span) * 100;
      const right = (((w.finished_at || serverNow()) - t0) / span) * 100;
      bar.style.left = `${Math.max(0, Math.min(100, left))}%`;
      bar.style.width = `${Math.max(0.8, Math.min(100, right) - Math.max(0, left))}%`;
      bar.title = `${when(w.started_at)} – ${w.finished_at ? when(w.finished_at) : "running"}`;
      track.append(bar);
    }
    const chips = h("div", { class: "chips" });
    for (const d of w.devices) {
      chips.append(h("a", {
        class: `chip st-${d.status}`,
        href: `#dev-${cssId(d.device_id)}`,
        title: `${d.device_id}: ${STATUS_TEXT[d.status] || d.status}${d.code ? ` (${d.code})` : ""}`,
        "aria-label": `${d.device_id} ${STATUS_TEXT[d.status] || d.status}`,
      }));
    }
    lane.append(label, track, chips);
    return lane;
  });
  const axis = h("div", { class: "axis" }, h("span", { text: when(t0) }), h("span", { text: r.phase === "finished" ? when(t1) : "now" }));
  $("#timeline").replaceChildren(...lanes, axis);
}

function cssId(s) {
  return s.replace(/[^A-Za-z0-9_-]/g, "_");
}

function devicesTable(waves, gates) {
  const byDev = gatesByDevice(gates);
  const rows = [];
  for (const w of waves) {
    for (const d of w.devices) {
      const gs = d.gates && d.gates.length ? d.gates : byDev.get(d.device_id) || [];
      rows.push(
        h(
          "tr",
          { id: `dev-${cssId(d.device_id)}`, dataset: { device: d.device_id, status: d.status } },
          h("td", { text: String(w.index) }),
          h("td", {}, h("a", { href: `/device/${encodeURIComponent(d.device_id)}`, text: d.device_id })),
          h("td", {}, statusBadge(d.status)),
          h("td", { class: "mono", text: d.code || "" }),
          h(
            "td",
            {},
            ...gs.map((g) => h("span", { class: `gchip ${g.passed ? "pass" : "fail"}`, title: g.reason || "" }, `${g.gate} ${g.passed ? "✓" : "✗"}`)),
          ),
        ),
      );
    }
  }
  $("#devices tbody").replaceChildren(...rows);
}

function gatesTable(gates) {
  const rows = (gates || []).map((g) =>
    h(
      "tr",
      { class: g.passed ? "" : "bad", dataset: { device: g.device_id, gate: g.gate, passed: String(g.passed) } },
      h("td", { text: g.wave === undefined ? "" : String(g.wave) }),
      h("td", {}, h("a", { href: `/device/${encodeURIComponent(g.device_id)}`, text: g.device_id })),
      h("td", { class: "mono", text: g.gate }),
      h("td", { class: "n fig", text: fig(g.figure) }),
      h("td", { class: "n", text: fig(g.baseline) }),
      h("td", { class: "n", text: fig(g.limit) }),
      h("td", {}, h("span", { class: `gchip ${g.passed ? "pass" : "fail"}` }, g.passed ? (g.inconclusive ? "passed (no data)" : "passed") : g.inconclusive ? "failed (no data)" : "failed")),
      h("td", { text: g.reason || "" }),
    ),
  );
  if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 8, class: "empty", text: "no gate judged yet" })));
  $("#gates tbody").replaceChildren(...rows);
}

function recordsTable(records) {
  const rows = [...(records || [])].reverse().map((r) =>
    h(
      "tr",
      {},
      h("td", { class: "n", text: String(r.seq) }),
      h("td", { text: when(r.ts) }),
      h("td", { class: "mono", text: r.kind }),
      h("td", { text: r.device_id || "" }),
      h("td", { text: r.result || "" }),
      h("td", { text: r.operator || "" }),
    ),
  );
  $("#records tbody").replaceChildren(...rows);
}

// What each action makes sense for (the server refuses the rest, saying why).
function allowed(r, what) {
  if (r.phase === "finished") return what === "rollback" && ["succeeded", "aborted"].includes(r.outcome);
  if (what === "pause") return !r.paused && r.phase !== "paused" && ["created", "running"].includes(r.phase);
  if (what === "resume") return r.paused || r.phase === "paused";
  return true;
}

function actions(r) {
  const box = $("#actions");
  const buttons = ["pause", "resume", "abort", "rollback"].map((what) =>
    h("button", {
      type: "button",
      id: `action-${what}`,
      class: `action ${what === "abort" || what === "rollback" ? "danger" : ""}`,
      disabled: !session.logged_in || !allowed(r, what),
      title: session.logged_in ? "" : "log in to control rollouts",
      text: { pause: "Pause", resume: "Resume", abort: "Abort", rollback: "Roll back" }[what],
      onclick: () => act(what),
    }),
  );
  const note = session.logged_in
    ? h("span", { class: "note", text: `as ${session.user}; recorded in the audit log` })
    : h("span", { class: "note", id: "actions-note" }, "Read-only: ", h("a", { href: `/login?next=${encodeURIComponent(location.pathname)}`, text: "log in" }), " to pause, resume, abort or roll back.");
  box.replaceChildren(...buttons, note);
}

async function act(what) {
  if ((what === "abort" || what === "rollback") && !window.confirm(`${what} rollout ${id}?`)) return;
  try {
    const res = await postJSON(`/api/rollouts/${encodeURIComponent(id)}/${what}`, {});
    clearError();
    $("#action-result").textContent = `${what} requested (record ${res.record})`;
    await load();
  } catch (err) {
    showError(err);
  }
}

async function load() {
  doc = await getJSON(`/api/rollouts/${encodeURIComponent(id)}`);
  const r = doc.rollout;
  head(r);
  actions(r);
  timeline(r, doc.waves || []);
  devicesTable(doc.waves || [], doc.gates || []);
  gatesTable(doc.gates || []);
  recordsTable(doc.records || []);
  document.documentElement.dataset.lastSeq = String((doc.records || []).reduce((m, x) => Math.max(m, x.seq), 0));
  mark("rollout-ready");
}

let pending = null;
let inflight = false;
function soon() {
  // Coalesce bursts of records (a wave of 1,000 outcomes) into one re-read.
  if (pending) return;
  pending = setTimeout(async () => {
    pending = null;
    if (inflight) return soon();
    inflight = true;
    try {
      await load();
    } catch (err) {
      showError(err);
    } finally {
      inflight = false;
    }
  }, 300);
}

async function main() {
  session = await header("rollouts");
  $("#rollout-id").textContent = id;
  try {
    await load();
  } catch (err) {
    showError(err);
    return;
  }
  live({ rollout: (msg) => msg.id === id && soon() }, soon, []); // no device rows
  // The running wave's bar grows with the clock.
  setInterval(() => doc && doc.rollout.phase !== "finished" && timeline(doc.rollout, doc.waves || []), 2000);
}

main().catch(showError);
