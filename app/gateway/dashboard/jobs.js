// The live jobs table: loaded once from the listing (own jobs, or every user's
// for an admin), then updated by WebSocket events only (no polling).

import { ApiError, api } from "./api.js";
import { STAGES, TERMINAL, el, pct, seconds, shortId } from "./util.js";

export class JobsTable {
  constructor({ tbody, statusLine, admin, userId, feed, onOpen, names }) {
    this.userId = userId;
    this.tbody = tbody;
    this.statusLine = statusLine;
    this.admin = admin;
    this.feed = feed;
    this.onOpen = onOpen;
    this.names = names; // job_id -> filename, for files uploaded from this page
    this.rows = new Map();
    this.filters = { status: "", priority: "" };
    this.more = false;
  }

  async load(filters = this.filters) {
    this.filters = filters;
    const query = { ...filters, limit: 50 };
    let page;
    try {
      page = await api(this.admin ? "/api/v1/admin/jobs" : "/api/v1/jobs", { query });
    } catch (exc) {
      if (!(this.admin && exc instanceof ApiError && exc.status === 404)) throw exc;
      page = await api("/api/v1/jobs", { query }); // admin listing not deployed: own jobs
    }
    this.feed.unfollow([...this.rows.keys()]);
    this.rows.clear();
    this.tbody.replaceChildren();
    const seqs = {};
    for (const job of page.items) {
      this.upsert(job);
      // The WebSocket server streams an admin every user's jobs, anyone else their own.
      if (!TERMINAL.has(job.status)) seqs[job.job_id] = job.seq;
    }
    this.feed.follow(seqs);
    this.more = Boolean(page.next_cursor);
    this.count();
  }

  count() {
    const older = this.more ? " (newest first; older ones not shown)" : "";
    this.statusLine.textContent = `${this.rows.size} job(s)${older}`;
  }

  /** The last seq shown for a job (0 when it is not in the table). */
  seqOf(jobId) {
    const row = this.rows.get(jobId);
    return row ? row.job.seq : 0;
  }

  /** A job this page just created: fetch it, show it first, and follow it from its first
   * event (seq 0), so that stages already run by the time it is shown are replayed too. */
  async add(jobId) {
    const job = await api(`/api/v1/jobs/${jobId}`);
    this.upsert(job, true, true);
    this.feed.follow({ [jobId]: 0 });
  }

  upsert(job, first = false, fromStart = false) {
    let row = this.rows.get(job.job_id);
    if (!row) {
      row = { job: { ...job }, trail: [], tr: el("tr", { dataset: { jobId: job.job_id } }) };
      if (job.stage && !fromStart) row.trail.push(job.stage);
      this.rows.set(job.job_id, row);
      if (first) this.tbody.prepend(row.tr);
      else this.tbody.append(row.tr);
      if (first) this.count();
    } else {
      Object.assign(row.job, job);
    }
    this.draw(row);
  }

  /** A WebSocket event (a ProgressEvent) for a followed job; ``snapshot`` when it is the
   * job's current state rather than a recorded event (a resume that could not replay). */
  apply(event, snapshot = false) {
    const row = this.rows.get(event.job_id);
    if (!row) return;
    if (snapshot) this.backfill(row);
    const job = row.job;
    if (event.stage && row.trail[row.trail.length - 1] !== event.stage) {
      const now = event.ts;
      if (row.stageStart && job.stage) {
        job.stage_timings = { ...job.stage_timings, [job.stage]: [now - row.stageStart] };
      }
      row.stageStart = now;
      row.trail.push(event.stage);
    }
    Object.assign(job, {
      status: event.status, stage: event.stage, stage_progress: event.stage_progress,
      overall_progress: event.overall_progress, message: event.message, seq: event.seq,
      error_code: event.error_code, error_message: event.error_message,
    });
    if (event.details && typeof event.details.attempt === "number") job.attempts = event.details.attempt;
    this.draw(row);
    if (TERMINAL.has(event.status)) {
      this.statusLine.textContent = `job ${shortId(event.job_id)} ${event.status}`; // announced (role=status)
      this.refreshLater(event.job_id);
    }
  }

  /** Rebuild a row's stage trail from the job's recorded events (when the gateway has them). */
  backfill(row) {
    api(`/api/v1/jobs/${row.job.job_id}/events`, { query: { since: 0, limit: 1000 } }).then((answer) => {
      const trail = [];
      for (const e of answer.events) if (e.stage && trail[trail.length - 1] !== e.stage) trail.push(e.stage);
      if (trail.length >= row.trail.length) {
        row.trail = trail;
        this.draw(row);
      }
    }).catch(() => {});
  }

  /** After a terminal event, read the row once (attempts, exact stage timings). */
  refreshLater(jobId) {
    api(`/api/v1/jobs/${jobId}`).then((job) => this.upsert(job)).catch(() => {});
  }

  draw({ job, trail, tr }) {
    const name = this.names.get(job.job_id);
    const open = el("button", { type: "button", className: "link", title: `open job ${job.job_id}` }, shortId(job.job_id));
    open.addEventListener("click", () => this.onOpen(job.job_id));
    const timings = STAGES.filter((s) => job.stage_timings && job.stage_timings[s])
      .map((s) => `${s} ${seconds(job.stage_timings[s][job.stage_timings[s].length - 1])}`).join(", ");
    const progress = el("progress", { max: 1, value: job.overall_progress || 0, "aria-label": "overall progress" });
    const actions = el("td", { className: "c-act" });
    if (!TERMINAL.has(job.status)) actions.append(this.action("Cancel", job, "cancel"));
    if (job.status === "failed" || job.status === "cancelled") actions.append(this.action("Retry", job, "retry"));
    const owner = this.admin && job.owner_id ? el("span", { className: "trail" }, `owner ${job.owner_id}`) : null;
    tr.dataset.status = job.status;
    tr.replaceChildren(
      el("td", {}, open),
      el("td", { title: job.document_id }, name || shortId(job.document_id), owner),
      el("td", { className: `status status-${job.status}` }, job.status),
      el("td", { className: "stage" }, job.stage || "–", el("span", { className: "trail" }, trail.join(" › "))),
      el("td", {}, progress, ` ${pct(job.overall_progress)}`),
      el("td", {}, job.priority || ""),
      el("td", {}, String(job.attempts ?? "")),
      el("td", {}, timings || "–"),
      el("td", { className: "error" }, job.error_code ? `${job.error_code}: ${job.error_message || ""}` : ""),
      actions,
    );
  }

  action(label, job, verb) {
    const button = el("button", { type: "button", "aria-label": `${label} job ${shortId(job.job_id)}` }, label);
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        const updated = await api(`/api/v1/jobs/${job.job_id}/${verb}`, { method: "POST" });
        this.statusLine.textContent = `${verb} of job ${shortId(job.job_id)}: ${updated.status || "requested"}`;
        if (verb === "retry") this.feed.follow({ [job.job_id]: job.seq });
      } catch (exc) {
        this.statusLine.textContent = `${verb} of job ${shortId(job.job_id)} refused: ${exc.code}: ${exc.message}`;
        button.disabled = false;
      }
    });
    return button;
  }
}
