// The live feed: one WebSocket to the progress server, authenticated with the
// first-message "auth" (never the query string).  It follows a set of jobs and
// remembers the last seq seen per job; after a reconnect it subscribes again
// with "since" so the server replays exactly the events that were missed.

const MAX_PER_MESSAGE = 100;

export class LiveFeed {
  constructor({ url, getToken, onEvent, onState }) {
    this.url = url;
    this.getToken = getToken;
    this.onEvent = onEvent;
    this.onState = onState;
    this.lastSeq = new Map();
    this.ws = null;
    this.ready = false;
    this.retry = 0;
    this.stopped = false;
  }

  /** Follow jobs; ``seqs`` maps a job id to the last seq already shown (from a listing). */
  follow(seqs) {
    const fresh = {};
    for (const [jobId, seq] of Object.entries(seqs)) {
      if (!this.lastSeq.has(jobId)) fresh[jobId] = seq;
      const known = this.lastSeq.get(jobId) ?? -1;
      this.lastSeq.set(jobId, Math.max(known, seq));
    }
    if (this.ready && Object.keys(fresh).length) this.subscribe(fresh);
  }

  unfollow(jobIds) {
    const ids = jobIds.filter((id) => this.lastSeq.delete(id));
    for (let i = 0; this.ready && i < ids.length; i += MAX_PER_MESSAGE) {
      this.send({ type: "unsubscribe", job_ids: ids.slice(i, i + MAX_PER_MESSAGE) });
    }
  }

  subscribe(seqs) {
    const ids = Object.keys(seqs);
    for (let i = 0; i < ids.length; i += MAX_PER_MESSAGE) {
      const batch = ids.slice(i, i + MAX_PER_MESSAGE);
      const since = {};
      for (const id of batch) since[id] = Math.max(0, seqs[id]);
      this.send({ type: "subscribe", job_ids: batch, since });
    }
  }

  send(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(message));
  }

  connect() {
    this.stopped = false;
    this.onState("connecting");
    const ws = new WebSocket(`${this.url}/api/v1/ws/progress`);
    this.ws = ws;
    ws.onopen = () => ws.send(JSON.stringify({ type: "auth", token: this.getToken() }));
    ws.onmessage = (event) => this.receive(JSON.parse(event.data));
    ws.onclose = (event) => {
      this.ready = false;
      if (this.stopped || this.ws !== ws) return;
      if (event.code === 4401) {
        this.onState("unauthorized");
        return;
      }
      const delay = Math.min(15000, 500 * 2 ** this.retry) * (0.5 + Math.random() / 2);
      this.retry += 1;
      this.onState("reconnecting");
      setTimeout(() => this.connect(), delay);
    };
  }

  close() {
    this.stopped = true;
    if (this.ws) this.ws.close(1000);
  }

  receive(message) {
    if (message.type === "connected") {
      this.ready = true;
      this.retry = 0;
      this.onState("live");
      const seqs = Object.fromEntries(this.lastSeq);
      if (Object.keys(seqs).length) this.subscribe(seqs);
    } else if (message.type === "job_progress" && message.data) {
      const event = message.data;
      const known = this.lastSeq.get(message.job_id) ?? -1;
      if (!message.snapshot && event.seq <= known) return; // replayed twice: already shown
      this.lastSeq.set(message.job_id, Math.max(known, event.seq));
      this.onEvent(event, message);
    } else if (message.type === "error" && message.code !== "not_found") {
      this.onState(`error: ${message.message}`);
    }
  }
}
