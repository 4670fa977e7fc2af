// The dashboard's entry point: token, identity, configuration, then the panels.

import { ApiError, api, setToken, takeFragment, token } from "./api.js";
import { JobDetail } from "./detail.js";
import { JobsTable } from "./jobs.js";
import { LiveFeed } from "./live.js";
import { refreshFleet, refreshQueue } from "./panels.js";
import { setupSearch } from "./search.js";
import { FileUpload } from "./upload.js";
import { el } from "./util.js";

const $ = (selector) => document.querySelector(selector);
const ADMIN_REFRESH_MS = 10000; // 3 requests each time: well within the per-minute API budget
const DEFAULT_CONFIG = {
  upload: { parallel_parts: 4 },
  priorities: ["low", "normal", "high", "critical"],
};

function notice(text) {
  $("#notice").hidden = !text;
  $("#notice").textContent = text || "";
}

async function loadConfig() {
  let config;
  try {
    config = await api("/api/v1/dashboard/config");
  } catch (exc) {
    if (!(exc instanceof ApiError) || exc.status !== 404) throw exc;
    config = { ...DEFAULT_CONFIG, ws_url: `ws://${location.hostname}:8765` };
  }
  const override = sessionStorage.getItem("sluice.ws");
  return override ? { ...config, ws_url: override } : config;
}

function setupUploads(config, jobs, names) {
  const list = $("#uploads");
  const extensions = config.upload.accepted_extensions || []; // extensions, unlike MIME types, hide no file
  if (extensions.length) $("#file-input").accept = extensions.join(",");
  const priority = $("#priority-input");
  priority.replaceChildren(...config.priorities.map((p) => el("option", { value: p, selected: p === "normal" }, p)));
  const startFiles = (files) => {
    for (const file of files) {
      const upload = new FileUpload(file, {
        priority: priority.value,
        parallel: config.upload.parallel_parts || 4,
        onJob: (jobId, name) => {
          names.set(jobId, name);
          jobs.add(jobId).catch((exc) => notice(`job ${jobId}: ${exc.message}`));
        },
      });
      list.prepend(upload.node);
      upload.start();
    }
  };
  $("#file-input").addEventListener("change", (event) => {
    startFiles([...event.target.files]);
    event.target.value = "";
  });
  const zone = $("#dropzone");
  zone.addEventListener("keydown", (event) => {
    if ((event.key === "Enter" || event.key === " ") && event.target === zone) {
      event.preventDefault();
      $("#file-input").click();
    }
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    startFiles([...event.dataTransfer.files]);
  });
}

function setupAdmin() {
  $("#queue-panel").hidden = false;
  $("#fleet-panel").hidden = false;
  const tick = async () => {
    if (document.hidden) return; // a background tab does not spend the caller's rate limit
    try {
      await Promise.all([refreshQueue($("#queue-panel")), refreshFleet($("#fleet-panel"))]);
    } catch (exc) {
      $("#aging-rule").textContent = `queue and fleet unavailable: ${exc.code}: ${exc.message}`;
    }
  };
  tick();
  setInterval(tick, ADMIN_REFRESH_MS);
}

async function start() {
  const me = await api("/api/v1/me");
  $("#who").textContent = `${me.user_id}${me.admin ? " (admin)" : ""}`;
  const config = await loadConfig();
  $("#main").hidden = false;
  const names = new Map();
  const detail = new JobDetail($("#job-detail"));
  let jobs = null;
  const feed = new LiveFeed({
    url: config.ws_url,
    getToken: token,
    onEvent: (event, message) => {
      jobs.apply(event, Boolean(message.snapshot));
      detail.add(event);
    },
    onState: (state) => {
      $("#live-state").textContent = `live updates: ${state}`;
      $("#live-state").dataset.state = state;
    },
  });
  jobs = new JobsTable({
    tbody: $("#jobs-table tbody"), statusLine: $("#jobs-status"), admin: me.admin, userId: me.user_id, feed, names,
    onOpen: (jobId) => {
      if (location.hash === `#job=${jobId}`) openFromHash();
      else location.hash = `job=${jobId}`; // a job's page has a link: #job=<id>
    },
  });
  const openFromHash = () => {
    const jobId = new URLSearchParams(location.hash.slice(1)).get("job");
    if (!jobId) {
      detail.close();
      return;
    }
    feed.follow({ [jobId]: jobs.seqOf(jobId) });
    detail.open(jobId).catch((exc) => notice(`job ${jobId}: ${exc.message}`));
  };
  window.addEventListener("hashchange", openFromHash);
  $("#close-detail").addEventListener("click", () => {
    history.replaceState(null, "", location.pathname + location.search);
    detail.close();
  });
  $("#priority-filter").append(...config.priorities.map((p) => el("option", { value: p }, p)));
  $("#job-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    jobs.load({ status: $("#status-filter").value, priority: $("#priority-filter").value })
      .catch((exc) => notice(`jobs: ${exc.message}`));
  });
  setupUploads(config, jobs, names);
  setupSearch($("#search-form"), $("#search-input"), $("#search-status"), $("#search-results"));
  feed.connect();
  await jobs.load();
  if (me.admin) setupAdmin();
  openFromHash();
}

function main() {
  takeFragment();
  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setToken($("#token-input").value.trim());
    location.reload();
  });
  $("#sign-out").addEventListener("click", () => {
    setToken("");
    location.reload();
  });
  if (!token()) {
    notice("Enter an API token (sluice token --user NAME, or the link `sluice dev` prints).");
    return;
  }
  start().catch((exc) => notice(exc.status === 401 ? "This token is not valid (expired?): enter another."
    : `The dashboard could not start: ${exc.message}`));
}

main();
