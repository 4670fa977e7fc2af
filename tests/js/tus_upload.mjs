// One tus-js-client (Node build) upload against Sluice, driven by tests/test_tus_js_client.py.
//
//   SLUICE_TOKEN=... node tus_upload.mjs MODE ENDPOINT FILE [URL_STORE] [STOP_AT]
//
// MODE: "plain" (one upload), "parallel" (parallelUploads: 4), "start" (stores its URL in
// the FileUrlStorage URL_STORE and aborts once the server holds >= STOP_AT bytes) or
// "resume" (a new Upload finds that URL with findPreviousUploads() and finishes it).
// The options are the README's snippet, plus any in TUS_OPTIONS (a JSON object); the token
// comes from the environment, never argv.
// Prints one JSON line on stdout: what the client saw, for the test to check against S3
// and Postgres.  Exits 0 when the upload succeeded or was aborted as asked, 1 otherwise.
import { createReadStream } from "node:fs";
import { PassThrough } from "node:stream";
import * as tus from "tus-js-client";

const MiB = 1024 * 1024;
const [mode, endpoint, file, urlStore, stopAt] = process.argv.slice(2);
const token = process.env.SLUICE_TOKEN;
const modes = ["plain", "parallel", "start", "resume"];
if (!modes.includes(mode) || !endpoint || !file || !token) {
  console.error("usage: SLUICE_TOKEN=... node tus_upload.mjs plain|parallel|start|resume ENDPOINT FILE [URL_STORE] [STOP_AT]");
  process.exit(2);
}

const seen = {
  mode,
  ok: false,
  aborted: false,
  error: null,
  url: null,
  jobIds: [],          // every Sluice-Job-Id header, in the order the answers came
  documentIds: [],
  requests: [],        // [method, status, Upload-Offset sent, Upload-Offset answered, Sluice-Job-Id]
  patchedBytes: 0,     // bytes the server acknowledged for this process's PATCHes (and
                       // a creation-with-upload POST)
  resumedFrom: null,   // "resume": the previous upload it found
  progress: 0,
};

let finish;
const done = new Promise((resolve) => { finish = resolve; });
let upload;

const options = {
  endpoint,
  headers: { Authorization: `Bearer ${token}` },
  chunkSize: 1 * MiB,
  metadata: { filename: "report.pdf", filetype: "application/pdf", priority: "high" },
  retryDelays: [0, 500],
  onBeforeRequest(req) {
    req._sent = req.getHeader("Upload-Offset");
  },
  onAfterResponse(req, res) {
    const answered = res.getHeader("Upload-Offset");
    const jobId = res.getHeader("Sluice-Job-Id");
    seen.requests.push([req.getMethod(), res.getStatus(), req._sent ?? null, answered ?? null, jobId ?? null]);
    const final = String(req.getHeader("Upload-Concat") ?? "").startsWith("final");
    if (req.getMethod() !== "HEAD" && !final && res.getStatus() < 300 && answered != null) {
      seen.patchedBytes += Number(answered) - Number(req._sent ?? 0);
    }
    if (jobId && !seen.jobIds.includes(jobId)) seen.jobIds.push(jobId);
    const documentId = res.getHeader("Sluice-Document-Id");
    if (documentId && !seen.documentIds.includes(documentId)) seen.documentIds.push(documentId);
  },
  onProgress(sent) {
    seen.progress = sent;
  },
  onSuccess() {
    seen.ok = true;
    finish();
  },
  onError(err) {
    seen.error = String(err && err.message ? err.message : err);
    finish();
  },
};

if (mode === "parallel") {
  options.parallelUploads = 4;
}
// More tus-js-client options, as JSON (e.g. {"uploadDataDuringCreation": true}).
Object.assign(options, JSON.parse(process.env.TUS_OPTIONS || "{}"));
if (mode === "start" || mode === "resume") {
  options.urlStorage = new tus.FileUrlStorage(urlStore);
  options.storeFingerprintForResuming = true;
}
if (mode === "start") {
  // Abort once the server holds STOP_AT bytes (of one partial, with parallelUploads) and
  // the URL storage holds the upload: with parallelUploads tus-js-client stores the
  // partials' URLs without waiting, so an abort before that would leave nothing to resume.
  // A single upload is stored before its first PATCH, so it aborts at once, between two
  // PATCHes; a parallel one aborts a moment later, its partials' PATCHes in flight.
  let stopping = false;
  const abort = () => {
    seen.aborted = true;
    upload.abort().then(finish, (err) => { seen.error = String(err); finish(); });
  };
  options.onChunkComplete = (_chunk, accepted) => {
    if (accepted < Number(stopAt) || stopping) return;
    stopping = true;
    if ((options.parallelUploads ?? 1) === 1) {
      abort();
      return;
    }
    stored().then((found) => {
      if (found && !seen.ok) abort();
      else stopping = false;
    });
  };
}

async function stored() {
  try {
    const all = await options.urlStorage.findAllUploads();
    return all.some((u) => u.uploadUrl || (u.parallelUploadUrls?.length && u.parallelUploadUrls.every(Boolean)));
  } catch {
    return false;  // read while being written: ask again at the next chunk
  }
}

// TUS_INPUT=stream: a Readable without a path (the size unknown to the client, no fingerprint).
const input = process.env.TUS_INPUT === "stream"
  ? createReadStream(file).pipe(new PassThrough())
  : createReadStream(file);
upload = new tus.Upload(input, options);
const timer = setTimeout(() => {
  seen.error = "timed out";
  upload.abort().finally(finish);
}, 60_000);

const previous = await upload.findPreviousUploads();
if (mode === "resume") {
  if (previous.length) {
    seen.resumedFrom = previous[0].uploadUrl;
    upload.resumeFromPreviousUpload(previous[0]);
  } else {
    seen.error = "no previous upload found";
  }
}
if (!seen.error) {
  upload.start();
  await done;
}
clearTimeout(timer);
seen.url = upload.url;
process.stdout.write(`${JSON.stringify(seen)}\n`);
process.exit(seen.ok || (mode === "start" && seen.aborted && !seen.error) ? 0 : 1);
