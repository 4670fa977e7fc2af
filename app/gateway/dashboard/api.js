// The JSON API and the token.  The token lives in sessionStorage only (gone when
// the tab closes); a "#token=..." fragment is read once and removed from the URL.

const TOKEN_KEY = "sluice.token";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** Read "#token=...&ws=..." once, keep the token, drop the fragment from the URL. */
export function takeFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const found = { token: params.get("token"), ws: params.get("ws") };
  if (found.token) setToken(found.token);
  if (found.ws) sessionStorage.setItem("sluice.ws", found.ws);
  if (found.token || found.ws) {
    params.delete("token");
    params.delete("ws");
    const rest = params.toString(); // keep "#job=..." links working
    history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  }
  return found;
}

/** Call a route; JSON in and out; a non-2xx answer throws ApiError(status, code, message). */
export async function api(path, { method = "GET", body, query } = {}) {
  const headers = { Authorization: `Bearer ${token()}` };
  let payload;
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let url = path;
  if (query) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== "" && v !== null && v !== undefined) q.set(k, v);
    if ([...q].length) url += `?${q}`;
  }
  let response;
  try {
    response = await fetch(url, { method, headers, body: payload });
  } catch (exc) {
    throw new ApiError(0, "network_error", `the gateway cannot be reached (${exc.message})`);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    // The gateway's error body: {"error": "<code>", "message": "...", "details": ..., "request_id": ...}
    const code = data && typeof data.error === "string" ? data.error : `http_${response.status}`;
    const message = (data && data.message) || response.statusText;
    throw new ApiError(response.status, code, message);
  }
  return data;
}
