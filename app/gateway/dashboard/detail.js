// The job page: facts, the full event timeline (the capped Redis stream read
// with "since" until it is exhausted, then live events), time per stage, and the
// document's chunks with their page ranges.

import { ApiError, api } from "./api.js";
import { STAGES, clock, el, pct, seconds } from "./util.js";

export class JobDetail {
  constructor(root) {
    this.root = root;
    this.jobId = null;
    this.job = null;
    this.events = [];
  }

  async open(jobId) {
    this.jobId = jobId;
    this.events = [];
    this.root.hidden = false;
    this.root.querySelector("#timeline").replaceChildren();
    this.root.querySelector("#timeline-note").textContent = "";
    const job = await api(`/api/v1/jobs/${jobId}`);
    this.job = job;
    this.facts(job);
    await this.loadEvents(jobId);
    await this.loadChunks(job.document_id);
    this.root.scrollIntoView({ block: "start" });
  }

  close() {
    this.jobId = null;
    this.root.hidden = true;
  }

  facts(job) {
    const dl = this.root.querySelector("#job-facts");
    const rows = [["job", job.job_id], ["document", job.document_id], ["status", job.status],
      ["stage", job.stage || "–"], ["progress", pct(job.overall_progress)], ["priority", job.priority],
      ["attempts", `${job.attempts} of ${job.max_attempts}`], ["created", job.created_at],
      ["finished", job.finished_at || "–"], ["error", job.error_code ? `${job.error_code}: ${job.error_message}` : "none"]];
    dl.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
  }

  async loadEvents(jobId) {
    let since = 0;
    for (let page = 0; page < 20; page++) {
      let answer;
      try {
        answer = await api(`/api/v1/jobs/${jobId}/events`, { query: { since, limit: 1000 } });
      } catch (exc) {
        if (exc instanceof ApiError && exc.status === 404 && page === 0) {
          this.root.querySelector("#timeline-note").textContent = "event history is not available from this gateway";
          return;
        }
        throw exc;
      }
      if (answer.truncated && page === 0) {
        this.root.querySelector("#timeline-note").textContent =
          "older events have been trimmed from the capped stream; the first entry is the job's state then";
      }
      for (const event of answer.events) this.add(event);
      if (answer.events.length < 1000 || answer.next_since <= since) break;
      since = answer.next_since;
    }
  }

  /** An event (from the history or live); ignored when already shown or for another job. */
  add(event) {
    if (event.job_id !== this.jobId) return;
    const last = this.events[this.events.length - 1];
    if (last && event.seq <= last.seq) return;
    this.events.push(event);
    const text = `#${event.seq} ${clock(event.ts)} ${event.status}${event.stage ? ` · ${event.stage}` : ""}` +
      ` · ${pct(event.overall_progress)}${event.message ? ` · ${event.message}` : ""}` +
      (event.error_code ? ` · ${event.error_code}: ${event.error_message || ""}` : "");
    this.root.querySelector("#timeline").append(el("li", { dataset: { seq: event.seq } }, text));
    this.durations();
    if (this.job && event.seq > this.job.seq) {
      Object.assign(this.job, { status: event.status, stage: event.stage, seq: event.seq,
        overall_progress: event.overall_progress, error_code: event.error_code, error_message: event.error_message });
      this.facts(this.job);
    }
  }

  durations() {
    const spent = new Map();
    for (let i = 0; i < this.events.length; i++) {
      const e = this.events[i];
      const next = this.events[i + 1];
      if (!e.stage || !next || e.status !== "running") continue;
      spent.set(e.stage, (spent.get(e.stage) || 0) + (next.ts - e.ts));
    }
    const body = this.root.querySelector("#stage-durations tbody");
    body.replaceChildren(...STAGES.filter((s) => spent.has(s))
      .map((s) => el("tr", {}, el("td", {}, s), el("td", {}, seconds(spent.get(s))))));
  }

  async loadChunks(documentId) {
    const body = this.root.querySelector("#chunks-table tbody");
    body.replaceChildren();
    let page;
    try {
      page = await api(`/api/v1/documents/${documentId}/chunks`, { query: { limit: 100 } });
    } catch (exc) {
      body.append(el("tr", {}, el("td", { colSpan: 4 }, `no chunks: ${exc.message}`)));
      return;
    }
    for (const c of page.items) {
      const pages = c.page_start === null ? "–" : c.page_start === c.page_end ? `p. ${c.page_start}` : `pp. ${c.page_start}–${c.page_end}`;
      const text = c.text.length > 160 ? `${c.text.slice(0, 160)}…` : c.text;
      body.append(el("tr", {}, el("td", {}, String(c.seq)), el("td", {}, pages), el("td", {}, String(c.token_count)), el("td", {}, text)));
    }
    if (!page.items.length) body.append(el("tr", {}, el("td", { colSpan: 4 }, "no chunks yet")));
  }
}
