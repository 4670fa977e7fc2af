// The search box: POST /api/v1/search over the caller's indexed chunks.

import { api } from "./api.js";
import { el } from "./util.js";

export function setupSearch(form, input, statusLine, list) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    statusLine.textContent = "searching…";
    list.replaceChildren();
    try {
      const found = await api("/api/v1/search", { method: "POST", body: { query: input.value, top_k: 10 } });
      statusLine.textContent = `${found.results.length} result(s) in ${found.took_ms.toFixed(0)} ms`;
      for (const hit of found.results) {
        const pages = hit.page_start === null ? "" : hit.page_start === hit.page_end
          ? `p. ${hit.page_start}` : `pp. ${hit.page_start}–${hit.page_end}`;
        list.append(el("li", {},
          el("strong", {}, hit.filename), ` · ${pages} · score ${hit.score.toFixed(3)}`,
          el("p", { className: "hit-text" }, hit.text)));
      }
    } catch (exc) {
      statusLine.textContent = `search failed: ${exc.code}: ${exc.message}`;
    }
  });
}
