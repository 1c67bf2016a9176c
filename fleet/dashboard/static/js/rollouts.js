// The rollouts list, newest first; re-read when a `rollout` event says one moved.
import { $, getJSON, h, header, live, mark, showError, when } from "./common.js";

function row(r) {
  const b = r.bundle || {};
  const state = r.phase === "finished" ? `finished: ${r.outcome}` : r.phase;
  const counts = Object.entries(r.devices || {})
    .map(([k, v]) => `${v} ${k.replace("_", " ")}`)
    .join(", ");
  return h(
    "tr",
    { dataset: { rollout: r.rollout_id, phase: r.phase } },
    h("td", {}, h("a", { href: `/rollout/${encodeURIComponent(r.rollout_id)}`, text: r.rollout_id })),
    h("td", {}, h("span", { class: `phase ph-${r.phase} out-${r.outcome || "none"}`, text: state }), r.reason ? h("div", { class: "note", text: r.reason }) : null),
    h("td", { text: b.name ? `${b.name} ${b.version}` : "—" }),
    h("td", { class: "n", text: r.targets ?? "—" }),
    h("td", { text: r.waves ? `${r.waves_finished}/${r.waves.length} finished` : "—" }),
    h("td", { text: counts || "—" }),
    h("td", { text: when(r.created_ts) }),
    h("td", { text: r.operator || "" }),
  );
}

async function load() {
  const doc = await getJSON("/api/rollouts");
  const rows = (doc.rollouts || []).map(row);
  if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 8, class: "empty", text: "no rollouts in the record yet (edge-fleet deploy starts one)" })));
  $("#rollouts tbody").replaceChildren(...rows);
  mark("rollouts-ready");
}

let pending = null;
function soon() {
  if (pending) return;
  pending = setTimeout(() => {
    pending = null;
    load().catch(showError);
  }, 500);
}

async function main() {
  await header("rollouts");
  await load();
  live({ rollout: soon }, soon, []); // no device rows
}

main().catch(showError);
