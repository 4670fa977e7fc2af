// Small DOM and formatting helpers shared by the dashboard's modules.

/** Create an element: el("td", {className: "x"}, "text", child...). */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("aria-") || key === "role") node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

export function shortId(id) {
  return id ? id.slice(0, 8) : "";
}

export function pct(fraction) {
  return `${(Math.max(0, Math.min(1, fraction || 0)) * 100).toFixed(0)}%`;
}

export function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 60) return `${value.toFixed(1)} s`;
  if (value < 3600) return `${(value / 60).toFixed(1)} min`;
  return `${(value / 3600).toFixed(1)} h`;
}

export function mb(bytes) {
  return `${(bytes / 1e6).toFixed(1)} MB`;
}

export function clock(ts) {
  return new Date(ts * 1000).toLocaleTimeString([], { hour12: false });
}

export const STAGES = ["validate", "extract", "chunk", "embed", "index"];
export const TERMINAL = new Set(["completed", "failed", "cancelled"]);
