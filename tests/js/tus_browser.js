// The page script of tests/test_tus_browser.py: README's tus-js-client and Uppy snippets, run
// in a real browser on a page whose origin is not the gateway's (every request is cross-origin
// and, with its Authorization header, preflighted).  Each function resolves with what the
// client saw: whether onSuccess fired, its error, the upload URL, every response
// [method, status, Upload-Offset, Sluice-Job-Id] and the ids read from the headers, which
// the page can read only if the gateway's CORS answer exposes them.

function recorder() {
  const seen = { ok: false, aborted: false, error: null, url: null, requests: [], jobIds: [], documentIds: [] };
  seen.onAfterResponse = (req, res) => {
    const jobId = res.getHeader("Sluice-Job-Id");
    const offset = res.getHeader("Upload-Offset");
    seen.requests.push([req.getMethod(), res.getStatus(), offset ?? null, jobId ?? null]);
    if (jobId && !seen.jobIds.includes(jobId)) seen.jobIds.push(jobId);
    const documentId = res.getHeader("Sluice-Document-Id");
    if (documentId && !seen.documentIds.includes(documentId)) seen.documentIds.push(documentId);
  };
  return seen;
}

function done(seen) {
  const { onAfterResponse, socket, ...plain } = seen;
  return plain;
}

async function pdfFile(path) {
  const blob = await (await fetch(path)).blob(); // same origin as the page
  // a file on disk keeps its lastModified, which is part of tus-js-client's fingerprint
  return new File([blob], "report.pdf", { type: "application/pdf", lastModified: 1764460800000 });
}

// README's follow(): the job's events over the WebSocket server, collected in seen.events.
function follower(seen, wsUrl, token) {
  seen.events = [];
  return (jobId) => {
    const ws = new WebSocket(`${wsUrl}/api/v1/ws/progress`);
    seen.socket = ws;
    ws.onopen = () => {
      ws.send(JSON.stringify({ type: "auth", token }));
      ws.send(JSON.stringify({ type: "subscribe", job_ids: [jobId], channels: ["progress"] }));
    };
    ws.onmessage = (event) => seen.events.push(JSON.parse(event.data));
  };
}

// Resolve once the followed job has sent an event of `status` (or after `ms`).
async function eventOf(seen, status, ms) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline && !seen.events.some((e) => e.data?.status === status)) {
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  seen.socket?.close();
}

// README's tus-js-client snippet; `extra` adds or overrides tus-js-client options; with
// `wsUrl`, the job named by Sluice-Job-Id is followed as the README's follow() does.
// With `abortAfter`, the upload is aborted once that many bytes were accepted.
globalThis.uploadWithTusJsClient = async ({ endpoint, token, path, wsUrl, abortAfter, extra }) => {
  const file = await pdfFile(path);
  const seen = recorder();
  const follow = wsUrl ? follower(seen, wsUrl, token) : () => {};
  let followed = false;
  const record = seen.onAfterResponse;
  seen.onAfterResponse = (req, res) => {
    record(req, res);
    const jobId = res.getHeader("Sluice-Job-Id");
    if (jobId && !followed) {
      followed = true;
      follow(jobId);
    }
  };
  await new Promise((resolve) => {
    const upload = new tus.Upload(file, {
      endpoint,
      headers: { Authorization: `Bearer ${token}` },
      chunkSize: 8 * 1024 * 1024,
      metadata: { filename: file.name, filetype: file.type, priority: "high" },
      onAfterResponse: seen.onAfterResponse,
      onSuccess: () => {
        seen.ok = true;
        seen.url = upload.url;
        resolve();
      },
      onError: (err) => {
        seen.error = String(err);
        seen.errorStatus = err.originalResponse?.getStatus() ?? null; // null: no answer readable
        seen.errorBody = err.originalResponse?.getBody() ?? null;
        resolve();
      },
      onChunkComplete: (chunk, accepted) => {
        if (abortAfter != null && accepted >= abortAfter) {
          seen.aborted = true;
          seen.url = upload.url;
          upload.abort().then(resolve); // as a reload would: the URL stays in localStorage
        }
      },
      ...extra,
    });
    upload.findPreviousUploads().then((previous) => {
      if (previous.length) upload.resumeFromPreviousUpload(previous[0]);
      upload.start();
    });
  });
  if (wsUrl && seen.ok) await eventOf(seen, "queued", 15000);
  return done(seen);
};

// README's Uppy snippet (Uppy's standalone bundle: globalThis.Uppy holds Uppy and Tus).
globalThis.uploadWithUppy = async ({ endpoint, token, path, wsUrl, extra }) => {
  const { Uppy, Tus } = globalThis.Uppy;
  const file = await pdfFile(path);
  const seen = recorder();
  const follow = wsUrl ? follower(seen, wsUrl, token) : () => {};
  const record = seen.onAfterResponse;
  const followed = new Set();
  const uppy = new Uppy({ meta: { priority: "high" } }).use(Tus, {
    endpoint,
    headers: { Authorization: `Bearer ${token}` },
    chunkSize: 8 * 1024 * 1024,
    allowedMetaFields: ["name", "type", "priority"],
    onAfterResponse(req, res) {
      record(req, res);
      const jobId = res.getHeader("Sluice-Job-Id");
      if (jobId && !followed.has(jobId)) {
        followed.add(jobId);
        follow(jobId);
      }
    },
    ...extra,
  });
  uppy.addFile({ name: file.name, type: file.type, data: file });
  try {
    const result = await uppy.upload();
    seen.ok = result.successful.length === 1 && result.failed.length === 0;
    seen.url = result.successful[0]?.uploadURL ?? null;
    if (result.failed.length) seen.error = String(result.failed[0].error);
  } catch (err) {
    seen.error = String(err);
  }
  if (wsUrl && seen.ok) await eventOf(seen, "queued", 15000);
  return done(seen);
};
