// Admin panels: queue depth and rates, and the fleet (workers, WebSocket servers,
// dependencies).  Read every few seconds from the admin routes.

import { api } from "./api.js";
import { el, seconds, shortId } from "./util.js";

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

/** Grouped bars per 30 s bucket: enqueued, completed, failed. */
export function ratesChart(buckets) {
  const width = 400;
  const height = 100;
  const max = Math.max(1, ...buckets.flatMap((b) => [b.enqueued, b.completed, b.failed]));
  const slot = width / Math.max(1, buckets.length);
  const bar = slot / 4;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", preserveAspectRatio: "none" });
  const total = buckets.reduce((a, b) => [a[0] + b.enqueued, a[1] + b.completed, a[2] + b.failed], [0, 0, 0]);
  const title = svg("title", {});
  title.textContent = `Last ${buckets.length} buckets: ${total[0]} enqueued, ${total[1]} completed, ${total[2]} failed`;
  root.append(title);
  buckets.forEach((b, i) => {
    [["enq", b.enqueued], ["done", b.completed], ["fail", b.failed]].forEach(([cls, n], j) => {
      const h = (n / max) * (height - 2);
      root.append(svg("rect", { class: cls, x: i * slot + j * bar, y: height - h, width: bar * 0.9, height: h }));
    });
  });
  return { node: root, summary: title.textContent };
}

export async function refreshQueue(root) {
  const q = await api("/api/v1/admin/queue");
  root.querySelector("#queue-table tbody").replaceChildren(...q.priorities.map((p) => el("tr", {},
    el("th", { scope: "row" }, p.priority), el("td", {}, String(p.queued)), el("td", {}, String(p.retrying)),
    el("td", {}, String(p.running)), el("td", {}, seconds(p.oldest_queued_seconds)))));
  root.querySelector("#ready-in-redis").textContent = String(q.ready_in_redis);
  const chart = ratesChart(q.rates.buckets);
  root.querySelector("#rates-chart").replaceChildren(chart.node);
  root.querySelector("#rates-caption").textContent =
    `Per ${q.rates.bucket_seconds} s (blue enqueued, green completed, red failed). ${chart.summary}`;
  root.querySelector("#aging-rule").textContent = `Aging: ${q.aging_rule}`;
}

export async function refreshFleet(root) {
  const [fleet, stats] = await Promise.all([api("/api/v1/admin/fleet"), api("/api/v1/ws/stats")]);
  const workers = fleet.workers.map((w) => el("tr", {},
    el("th", { scope: "row" }, w.worker_id), el("td", {}, `${w.running.length}/${w.slots}`),
    el("td", {}, `${seconds(w.heartbeat_age_seconds)} ago`),
    el("td", {}, w.running.length ? w.running.map((r) =>
      `${shortId(r.job_id)} (${r.owner_id}, ${r.stage || "starting"}, ${r.priority}, lease ${r.lease_expires_at || "–"})`).join("; ") : "idle")));
  root.querySelector("#workers-table tbody").replaceChildren(...(workers.length ? workers
    : [el("tr", {}, el("td", { colSpan: 4 }, "no worker alive"))]));
  const wsRows = stats.instances.map((s) => el("tr", {},
    el("th", { scope: "row" }, String(s.instance_id ?? s.instance ?? "?")),
    el("td", {}, String(s.connections ?? "–")), el("td", {}, String(s.authenticated ?? "–")),
    el("td", {}, String(s.subscriptions ?? "–")), el("td", {}, Number(s.messages_per_second ?? 0).toFixed(1))));
  const t = stats.total;
  wsRows.push(el("tr", {}, el("th", { scope: "row" }, `total (${t.instances})`), el("td", {}, String(t.connections)),
    el("td", {}, String(t.authenticated)), el("td", {}, String(t.subscriptions)),
    el("td", {}, Number(t.messages_per_second).toFixed(1))));
  root.querySelector("#ws-table tbody").replaceChildren(...wsRows);
  const checks = (fleet.dependencies && fleet.dependencies.checks) || {};
  root.querySelector("#deps-table tbody").replaceChildren(...Object.entries(checks).map(([name, c]) => el("tr", {},
    el("th", { scope: "row" }, name), el("td", {}, c.ok === false || c.status === "down" ? "✗ down" : "✓ up"),
    el("td", {}, c.latency_ms === undefined ? "–" : `${Number(c.latency_ms).toFixed(1)} ms`))));
}
