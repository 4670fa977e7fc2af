// Resumable multipart uploads from the browser.
//
// One FileUpload per file: initiate (or, when localStorage holds an upload id for
// the same file fingerprint, ask the server's "status" what it already has),
// send the missing parts N at a time, each with its MD5 (computed in a worker),
// retry a failed part with backoff, then "complete".  Pause aborts the parts in
// flight; resume (or a page reload and the same file dropped again) sends only
// what the server does not have.

import { ApiError, api, token } from "./api.js";
import { el, mb } from "./util.js";

const PREFIX = "/api/v1/documents/upload";
const STORE = "sluice.upload.";
const RETRIES = 4;

let worker = null;
let nextHashId = 0;
const pendingHashes = new Map();

function md5(buffer) {
  if (worker === null) {
    worker = new Worker("/dashboard/md5worker.js", { type: "module" });
    worker.onmessage = (event) => {
      const { id, hex, buffer: back } = event.data;
      pendingHashes.get(id)({ hex, buffer: back });
      pendingHashes.delete(id);
    };
  }
  const id = nextHashId++;
  return new Promise((resolve) => {
    pendingHashes.set(id, resolve);
    worker.postMessage({ id, buffer }, [buffer]);
  });
}

export function fingerprint(file) {
  return `${file.name}|${file.size}|${file.lastModified}`;
}

function putPart(url, buffer, hex, onProgress, signal) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", url);
    xhr.setRequestHeader("Authorization", `Bearer ${token()}`);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.setRequestHeader("X-Chunk-Hash", hex);
    xhr.upload.onprogress = (e) => onProgress(e.loaded);
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) resolve(JSON.parse(xhr.responseText));
      else {
        let body = {};
        try { body = JSON.parse(xhr.responseText) || {}; } catch { body = {}; }
        const code = typeof body.error === "string" ? body.error : `http_${xhr.status}`;
        reject(new ApiError(xhr.status, code, body.message || "part refused"));
      }
    };
    xhr.onerror = () => reject(new ApiError(0, "network_error", "network error"));
    xhr.onabort = () => reject(new ApiError(0, "aborted", "paused"));
    signal.addEventListener("abort", () => xhr.abort(), { once: true });
    xhr.send(buffer);
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export class FileUpload {
  constructor(file, { priority, parallel, onJob }) {
    this.file = file;
    this.priority = priority;
    this.parallel = parallel;
    this.onJob = onJob;
    this.key = STORE + fingerprint(file);
    this.session = null;
    this.doneBytes = 0;
    this.inflight = new Map();
    this.resumed = false;
    this.controller = null;
    this.state = "waiting";
    this.speed = { t0: 0, bytes0: 0 };
    this.render();
  }

  render() {
    this.bar = el("progress", { max: 1, value: 0, "aria-label": `upload of ${this.file.name}` });
    this.text = el("span", { className: "u-text" }, "waiting");
    this.button = el("button", { type: "button", disabled: true }, "Pause");
    this.button.addEventListener("click", () => (this.state === "paused" ? this.resume() : this.pause()));
    this.node = el("li", { dataset: { file: this.file.name } },
      el("span", { className: "u-name", title: this.file.name }, this.file.name),
      this.bar, this.text, this.button);
  }

  sentBytes() {
    let flying = 0;
    for (const n of this.inflight.values()) flying += n;
    return this.doneBytes + flying;
  }

  show(message) {
    const size = this.file.size;
    const sent = this.sentBytes();
    this.bar.value = size ? sent / size : 1;
    const elapsed = (performance.now() - this.speed.t0) / 1000;
    const rate = elapsed > 0.2 ? (sent - this.speed.bytes0) / 1e6 / elapsed : 0;
    const speed = this.state === "uploading" ? ` · ${rate.toFixed(1)} MB/s` : "";
    this.text.textContent = message || `${this.state} ${mb(sent)} / ${mb(size)}${speed}`;
    this.node.dataset.state = this.state;
  }

  async start() {
    try {
      await this.openSession();
      if (this.state === "done") return;
      await this.run();
    } catch (exc) {
      this.fail(exc);
    }
  }

  async openSession() {
    const saved = localStorage.getItem(this.key);
    if (saved) {
      try {
        const status = await api(`${PREFIX}/status/${saved}`);
        if (status.status === "completed") {
          localStorage.removeItem(this.key);
          this.state = "done";
          this.doneBytes = this.file.size;
          this.show(`already uploaded · job ${status.job_id.slice(0, 8)}`);
          this.onJob(status.job_id, this.file.name);
          return;
        }
        if (status.status === "initiated" || status.status === "uploading") {
          this.session = { upload_id: status.upload_id, job_id: status.job_id, chunk_size: status.chunk_size,
            total_parts: status.total_parts };
          this.missing = status.missing_parts.slice();
          this.doneBytes = status.bytes_received;
          this.resumed = this.missing.length < status.total_parts;
          return;
        }
      } catch (exc) {
        if (!(exc instanceof ApiError) || exc.status === 0) throw exc;
      }
      localStorage.removeItem(this.key); // expired, cancelled, lost or gone: start afresh
    }
    this.session = await api(`${PREFIX}/initiate`, {
      method: "POST",
      body: { filename: this.file.name, file_size: this.file.size, content_type: this.file.type || "",
        priority: this.priority },
    });
    localStorage.setItem(this.key, this.session.upload_id);
    this.missing = Array.from({ length: this.session.total_parts }, (_, i) => i + 1);
  }

  async run() {
    this.state = "uploading";
    this.button.disabled = false;
    this.button.textContent = "Pause";
    this.controller = new AbortController();
    this.speed = { t0: performance.now(), bytes0: this.doneBytes };
    this.show(this.resumed ? "resuming" : "");
    const queue = this.missing.slice();
    const lanes = Array.from({ length: Math.min(this.parallel, queue.length) }, () => this.lane(queue));
    const results = await Promise.allSettled(lanes);
    if (this.state === "paused") return;
    const failed = results.find((r) => r.status === "rejected");
    if (failed) throw failed.reason;
    this.state = "completing";
    this.button.disabled = true;
    this.show("completing");
    const done = await api(`${PREFIX}/complete/${this.session.upload_id}`, { method: "POST" });
    localStorage.removeItem(this.key);
    this.state = "done";
    const how = this.resumed ? "resumed, " : "";
    this.show(`done (${how}${mb(this.file.size)}) · job ${done.job_id.slice(0, 8)}`);
    this.onJob(done.job_id, this.file.name);
  }

  async lane(queue) {
    while (queue.length && this.state === "uploading") {
      const part = queue.shift();
      try {
        await this.sendPart(part);
      } catch (exc) {
        if (this.state === "paused") queue.unshift(part);
        throw exc;
      }
    }
  }

  async sendPart(part) {
    const size = this.session.chunk_size;
    const start = (part - 1) * size;
    const blob = this.file.slice(start, Math.min(start + size, this.file.size));
    for (let attempt = 0; ; attempt++) {
      const { hex, buffer } = await md5(await blob.arrayBuffer());
      if (this.state !== "uploading") throw new ApiError(0, "aborted", "paused");
      try {
        const url = `${PREFIX}/${this.session.upload_id}/parts/${part}`;
        await putPart(url, buffer, hex, (n) => { this.inflight.set(part, n); this.show(); }, this.controller.signal);
        this.inflight.delete(part);
        this.doneBytes += blob.size;
        this.show();
        return;
      } catch (exc) {
        this.inflight.delete(part);
        const transient = exc.status === 0 || exc.status === 429 || exc.status >= 500;
        if (this.state !== "uploading" || !transient || attempt >= RETRIES) throw exc;
        await sleep(Math.min(8000, 400 * 2 ** attempt) * (0.5 + Math.random() / 2));
      }
    }
  }

  pause() {
    if (this.state !== "uploading") return;
    this.state = "paused";
    this.controller.abort();
    this.button.textContent = "Resume";
    this.show(`paused at ${mb(this.doneBytes)} / ${mb(this.file.size)}`);
  }

  async resume() {
    try {
      this.state = "resuming";
      this.button.disabled = true;
      const status = await api(`${PREFIX}/status/${this.session.upload_id}`);
      this.missing = status.missing_parts.slice();
      this.doneBytes = status.bytes_received;
      this.resumed = true;
      await this.run();
    } catch (exc) {
      this.fail(exc);
    }
  }

  fail(exc) {
    if (this.state === "paused") return;
    this.state = "failed";
    this.button.disabled = true;
    this.show(`failed: ${exc.code || "error"}: ${exc.message}`);
  }
}
