// diffusers-api playground: submits jobs to /v1/jobs, follows their event stream, shows and keeps the results.
// Plain browser JavaScript, no dependencies. The API key (when the server sets API_KEY) stays in this browser.
"use strict";

const KEY_STORAGE = "diffusers-api.api-key";
const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED"]);
const MAX_PROGRESS_EVENTS = 50; // per job: callback_steps is chosen so that the bar moves about this often
const POLL_MS = 500; // job status polling, when the event stream is lost

const $ = (id) => document.getElementById(id);
const ui = {
  key: $("api-key"), notice: $("notice"), serverState: $("server-state"), serverModel: $("server-model"),
  form: $("form"), prompt: $("prompt"), negative: $("negative-prompt"), width: $("width"), height: $("height"),
  count: $("count"), steps: $("steps"), guidance: $("guidance"), seed: $("seed"), seedClear: $("seed-clear"),
  scheduler: $("scheduler"), model: $("model"), models: $("models"),
  mode: $("mode"), initFile: $("init-file"), maskFile: $("mask-file"), canvasWrap: $("canvas-wrap"),
  initCanvas: $("init-canvas"), maskCanvas: $("mask-canvas"), imageTools: $("image-tools"), brush: $("brush"),
  strength: $("strength"), strengthOut: $("strength-out"), maskClear: $("mask-clear"), initRemove: $("init-remove"),
  generate: $("generate"), cancel: $("cancel"),
  progress: $("progress"), bar: $("progress-bar"), status: $("job-status"), detail: $("job-detail"),
  error: $("error"), results: $("results"), resultInfo: $("result-info"), history: $("history"),
};

const state = {
  job: null, // {id, stream, poll, started, request}
  initImage: null, // the HTMLImageElement the init canvas is drawn from
  maskPainted: false,
  history: [], // finished results of this page's session, newest first
  catalogLoaded: false,
  keyRefused: false, // the lists wait for a (new) key instead of asking again with the refused one
};

// --- API ---------------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(body.message);
    this.status = status;
    this.code = body.code;
  }
}

async function api(path, { method = "GET", json } = {}) {
  const headers = {};
  const key = ui.key.value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (json !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: json === undefined ? undefined : JSON.stringify(json) });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = (body && (body.error || body.$error)) || { code: `HTTP_${response.status}`, message: response.statusText };
    throw new ApiError(response.status, error);
  }
  return body;
}

// --- server state, models and schedulers ----------------------------------------------------------------------

async function watchHealth() {
  let serving = false;
  try {
    const response = await fetch("/health");
    const body = await response.json();
    showServerState(body.status);
    serving = body.status === "READY" || body.status === "BUSY";
  } catch {
    showServerState("unreachable");
  }
  if (serving && !state.catalogLoaded && !state.keyRefused) await loadCatalog();
  setTimeout(watchHealth, serving ? 5000 : 1000);
}

function showServerState(name) {
  ui.serverState.dataset.state = name;
  ui.serverState.textContent = name === "unreachable" ? "unreachable" : name.toLowerCase().replace("_", " ");
}

async function loadCatalog() {
  try {
    const [models, schedulers] = await Promise.all([api("/v1/models"), api("/v1/schedulers")]);
    fillModels(models);
    fillSchedulers(schedulers);
    state.catalogLoaded = true;
    ui.key.classList.remove("wanted");
    hideNotice();
  } catch (error) {
    if (error.status === 401) {
      askForKey();
    } else {
      showNotice(`Could not read the server's models: ${error.message}`);
    }
  }
}

function askForKey() {
  state.keyRefused = true;
  ui.key.classList.add("wanted");
  showNotice(ui.key.value
    ? "The server refused this API key. Check it, then press Enter."
    : "This server needs an API key (API_KEY): enter it at the top right, then press Enter.");
}

function fillModels(models) {
  const loaded = models.loaded.map((model) => model.model_id);
  ui.models.replaceChildren(...loaded.map((id) => new Option(id, id)));
  ui.model.placeholder = loaded.length ? `${loaded[0]} (served)` : "the served model";
  ui.serverModel.textContent = loaded[0] || "";
}

function fillSchedulers({ default: fallback, schedulers }) {
  const chosen = ui.scheduler.value;
  const options = [new Option(`Default (${fallback})`, ""), ...schedulers.map((name) => new Option(name, name))];
  ui.scheduler.replaceChildren(...options);
  if (schedulers.includes(chosen)) ui.scheduler.value = chosen;
}

function useKey() {
  const key = ui.key.value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  state.catalogLoaded = false;
  state.keyRefused = false;
  loadCatalog();
}

function showNotice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = false;
}

function hideNotice() {
  ui.notice.hidden = true;
}

// --- the request ---------------------------------------------------------------------------------------------

function buildRequest() {
  const request = { prompt: ui.prompt.value.trim() };
  const steps = intValue(ui.steps);
  optional(request, "negative_prompt", ui.negative.value.trim() || undefined);
  optional(request, "num_inference_steps", steps);
  optional(request, "guidance_scale", floatValue(ui.guidance));
  optional(request, "width", intValue(ui.width));
  optional(request, "height", intValue(ui.height));
  optional(request, "num_images_per_prompt", intValue(ui.count));
  optional(request, "seed", intValue(ui.seed));
  optional(request, "scheduler", ui.scheduler.value || undefined);
  optional(request, "model", ui.model.value.trim() || undefined);
  // A progress event every few steps, so that the bar moves smoothly however fast the steps are.
  request.callback_steps = Math.max(1, Math.round((steps || 50) / MAX_PROGRESS_EVENTS));
  if (state.initImage) {
    // The canvas's size, explicitly: inpainting pipelines would otherwise make the model's default size.
    request.width = ui.initCanvas.width;
    request.height = ui.initCanvas.height;
    request.image = ui.initCanvas.toDataURL("image/png");
    request.strength = Number(ui.strength.value);
    if (state.maskPainted) request.mask_image = maskDataURL();
  }
  return request;
}

function optional(request, name, value) {
  if (value !== undefined && !Number.isNaN(value)) request[name] = value;
}

function intValue(input) {
  return input.value.trim() === "" ? undefined : Number.parseInt(input.value, 10);
}

function floatValue(input) {
  return input.value.trim() === "" ? undefined : Number.parseFloat(input.value);
}

// --- jobs ----------------------------------------------------------------------------------------------------

async function submit(event) {
  event.preventDefault();
  if (state.job) return;
  const request = buildRequest();
  if (!request.prompt) {
    showError({ code: "INVALID_INPUTS", message: "write a prompt first" });
    ui.prompt.focus();
    return;
  }
  hideError();
  setRunning(true);
  showProgress(0, "queued", "Submitting…");
  const started = performance.now();
  try {
    const job = await api("/v1/jobs", { method: "POST", json: request });
    state.job = { id: job.id, started, request };
    ui.results.dataset.job = job.id;
    follow(job);
  } catch (error) {
    setRunning(false);
    showProgress(0, "failed", "Not submitted");
    showError(error);
    if (error.status === 401) askForKey();
  }
}

function follow(job) {
  const stream = new EventSource(job.events_url);
  state.job.stream = stream;
  stream.addEventListener("status", (message) => onStatus(JSON.parse(message.data)));
  stream.addEventListener("event", (message) => onEvent(JSON.parse(message.data)));
  stream.onerror = () => {
    // The stream ended before the job's final status (a proxy, a restart): poll the job instead.
    stream.close();
    if (state.job && state.job.id === job.id) pollJob(job.id);
  };
}

async function pollJob(jobId) {
  try {
    onStatus(await api(`/v1/jobs/${jobId}`));
  } catch (error) {
    finish(jobId);
    showProgress(0, "failed", "Lost");
    showError(error);
    return;
  }
  if (state.job && state.job.id === jobId) state.job.poll = setTimeout(() => pollJob(jobId), POLL_MS);
}

function onStatus(job) {
  if (!state.job || job.id !== state.job.id) return;
  if (!TERMINAL.has(job.status)) {
    showStage(job.progress);
    return;
  }
  // A stream opened after the job ended starts with a snapshot without the images; its final status has them.
  if (job.status === "COMPLETED" && !job.result) return;
  const elapsed = performance.now() - state.job.started;
  const request = state.job.request;
  finish(job.id);
  if (job.status === "COMPLETED") {
    showProgress(100, "done", "Completed", `${formatMs(elapsed)} from submit`);
    const entry = { id: job.id, request, result: job.result, elapsed };
    state.history.unshift(entry);
    showResult(entry);
    renderHistory();
  } else if (job.status === "CANCELLED") {
    showProgress(percent(job.progress), "cancelled", "Cancelled", stepText(job.progress));
  } else {
    showProgress(percent(job.progress), "failed", "Failed");
    showError(job.error || { code: "FAILED", message: "the job failed" });
  }
}

function onEvent(event) {
  if (!state.job) return;
  if (event.status === "progress") showStage({ stage: "inference", ...event.payload });
  else if (event.status === "done" && event.type === "inference") showProgress(100, "finishing", "Finishing…");
}

function showStage(progress) {
  const labels = { queued: "Queued", starting: "Starting…", inference: "Generating", finishing: "Finishing…" };
  // Never backwards: the stream's first status is a snapshot that may be newer than events still on their way.
  state.job.percent = Math.max(state.job.percent || 0, percent(progress));
  showProgress(state.job.percent, progress.stage, labels[progress.stage] || progress.stage, stepText(progress));
}

function percent(progress) {
  if (!progress || !progress.steps) return 0;
  return Math.min(100, Math.round((100 * progress.step) / progress.steps));
}

function stepText(progress) {
  if (!progress || !progress.steps) return "";
  const eta = progress.eta_s !== undefined ? ` · ${progress.eta_s.toFixed(1)} s left` : "";
  return `step ${progress.step} / ${progress.steps}${eta}`;
}

async function cancel() {
  if (!state.job) return;
  ui.cancel.disabled = true;
  try {
    onStatus(await api(`/v1/jobs/${state.job.id}`, { method: "DELETE" }));
  } catch (error) {
    showError(error);
    ui.cancel.disabled = false;
  }
}

function finish(jobId) {
  if (!state.job || state.job.id !== jobId) return;
  if (state.job.stream) state.job.stream.close();
  clearTimeout(state.job.poll);
  state.job = null;
  setRunning(false);
}

function setRunning(running) {
  ui.generate.disabled = running;
  ui.cancel.disabled = !running;
  ui.generate.textContent = running ? "Generating…" : "Generate";
}

function showProgress(value, stage, label, detail = "") {
  ui.progress.setAttribute("aria-valuenow", String(value));
  ui.progress.dataset.state = stage;
  ui.bar.style.width = `${value}%`;
  ui.status.textContent = value > 0 && stage === "inference" ? `${label} · ${value}%` : label;
  ui.status.dataset.status = stage;
  ui.detail.textContent = detail;
}

function showError(error) {
  const code = document.createElement("code");
  code.textContent = error.code;
  ui.error.replaceChildren(code, document.createTextNode(` ${error.message}`));
  ui.error.hidden = false;
}

function hideError() {
  ui.error.hidden = true;
}

// --- results and history -------------------------------------------------------------------------------------

function dataURL(image) {
  return `data:image/${image.format};base64,${image.data}`;
}

function showResult(entry) {
  const { result } = entry;
  ui.results.replaceChildren(...result.images.map((image, index) => figure(image, index)));
  ui.results.dataset.job = entry.id;
  const meta = result.meta || {};
  const facts = [
    ["model", meta.MODEL_ID], ["pipeline", meta.PIPELINE], ["scheduler", meta.SCHEDULER],
    ...Object.entries(result.timings || {}).map(([name, ms]) => [name, formatMs(ms)]),
    ["total", formatMs(entry.elapsed)],
  ];
  ui.resultInfo.replaceChildren(...facts.filter(([, value]) => value !== undefined).map(([name, value]) => fact(name, value)));
  for (const button of ui.history.querySelectorAll("button")) {
    button.classList.toggle("current", button.dataset.job === entry.id);
  }
}

function figure(image, index) {
  const element = document.createElement("figure");
  element.className = "image";
  const img = new Image();
  img.src = dataURL(image);
  img.alt = `image ${index + 1}, seed ${image.seed}`;
  const caption = document.createElement("figcaption");
  const seed = document.createElement("span");
  seed.className = "seed";
  seed.textContent = `seed ${image.seed}`;
  img.addEventListener("load", () => { seed.textContent = `seed ${image.seed} · ${img.naturalWidth}×${img.naturalHeight}`; });
  const download = document.createElement("a");
  download.href = img.src;
  download.download = `diffusers-api-${image.seed}.${image.format === "jpeg" ? "jpg" : image.format}`;
  download.textContent = "Download";
  caption.append(seed, button("Reuse seed", () => { ui.seed.value = image.seed; }),
    button("Use as init", () => loadInitImage(img.src)), download);
  element.append(img, caption);
  return element;
}

function button(label, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = label;
  element.addEventListener("click", onClick);
  return element;
}

function fact(name, value) {
  const span = document.createElement("span");
  const bold = document.createElement("b");
  bold.textContent = value;
  span.append(`${name} `, bold);
  return span;
}

function renderHistory() {
  ui.history.replaceChildren(...state.history.map((entry, index) => {
    const images = entry.result.images;
    const thumb = new Image();
    thumb.src = dataURL(images[0]);
    thumb.alt = entry.request.prompt;
    const item = button("", () => showResult(entry));
    item.title = `${entry.request.prompt} (seed ${images[0].seed})`;
    item.dataset.job = entry.id;
    item.classList.toggle("current", index === 0);
    item.append(thumb);
    if (images.length > 1) {
      const count = document.createElement("span");
      count.className = "count";
      count.textContent = `×${images.length}`;
      item.append(count);
    }
    return item;
  }));
}

function formatMs(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
}

// --- init image and mask -------------------------------------------------------------------------------------

function loadInitImage(source) {
  const image = new Image();
  image.onload = () => {
    state.initImage = image;
    drawInitImage();
    clearMask();
    ui.canvasWrap.hidden = false;
    ui.imageTools.hidden = false;
    ui.maskFile.disabled = false;
    updateMode();
  };
  image.onerror = () => showError({ code: "INVALID_IMAGE", message: "the browser could not read that image" });
  image.src = source;
}

function canvasSize(image) {
  // The requested size where one is set, else the image's own (at most 1024 on its longer side), in multiples of 8.
  const scale = Math.min(1, 1024 / Math.max(image.naturalWidth, image.naturalHeight));
  const round8 = (value) => Math.max(8, Math.round(value / 8) * 8);
  return [
    intValue(ui.width) || round8(image.naturalWidth * scale),
    intValue(ui.height) || round8(image.naturalHeight * scale),
  ];
}

function drawInitImage() {
  const image = state.initImage;
  if (!image) return;
  const [width, height] = canvasSize(image);
  const previousMask = copyCanvas(ui.maskCanvas);
  for (const canvas of [ui.initCanvas, ui.maskCanvas]) {
    canvas.width = width;
    canvas.height = height;
  }
  drawCover(ui.initCanvas.getContext("2d"), image, width, height);
  if (previousMask) ui.maskCanvas.getContext("2d").drawImage(previousMask, 0, 0, width, height);
  showSizePlaceholders(width, height);
}

function showSizePlaceholders(width, height) {
  // With an init image, the request's size is the canvas's (see buildRequest).
  ui.width.placeholder = width ? String(width) : "model's";
  ui.height.placeholder = height ? String(height) : "model's";
}

function drawCover(context, image, width, height) {
  // Fill the canvas, cropping the image's overflow evenly: the request's aspect ratio wins.
  const sourceWidth = image.naturalWidth || image.width;
  const sourceHeight = image.naturalHeight || image.height;
  const scale = Math.max(width / sourceWidth, height / sourceHeight);
  const drawnWidth = sourceWidth * scale;
  const drawnHeight = sourceHeight * scale;
  context.drawImage(image, (width - drawnWidth) / 2, (height - drawnHeight) / 2, drawnWidth, drawnHeight);
}

function copyCanvas(canvas) {
  if (!state.maskPainted || !canvas.width) return null;
  const copy = document.createElement("canvas");
  copy.width = canvas.width;
  copy.height = canvas.height;
  copy.getContext("2d").drawImage(canvas, 0, 0);
  return copy;
}

function removeInitImage() {
  state.initImage = null;
  clearMask();
  ui.initFile.value = "";
  ui.maskFile.value = "";
  ui.maskFile.disabled = true;
  ui.canvasWrap.hidden = true;
  ui.imageTools.hidden = true;
  showSizePlaceholders();
  updateMode();
}

function clearMask() {
  ui.maskCanvas.getContext("2d").clearRect(0, 0, ui.maskCanvas.width, ui.maskCanvas.height);
  state.maskPainted = false;
  ui.maskFile.value = "";
  updateMode();
}

function updateMode() {
  const mode = !state.initImage ? "txt2img" : state.maskPainted ? "inpaint" : "img2img";
  ui.mode.textContent = mode;
  ui.mode.dataset.mode = mode;
}

function paintMask() {
  const canvas = ui.maskCanvas;
  const context = canvas.getContext("2d");
  let last = null;
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * (canvas.width / box.width), (event.clientY - box.top) * (canvas.height / box.height)];
  };
  const stroke = (to) => {
    const box = canvas.getBoundingClientRect();
    context.strokeStyle = "#ff3d8b";
    context.lineCap = "round";
    context.lineJoin = "round";
    context.lineWidth = Number(ui.brush.value) * (canvas.width / box.width);
    context.beginPath();
    context.moveTo(...(last || to));
    context.lineTo(...to);
    context.stroke();
    last = to;
  };
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    last = null;
    stroke(point(event));
    state.maskPainted = true;
    updateMode();
  });
  canvas.addEventListener("pointermove", (event) => { if (last) stroke(point(event)); });
  const end = () => { last = null; };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
}

function loadMaskFile(file) {
  // An uploaded mask: its light pixels become painted ones, so that it shows (and can be touched up) like a drawn one.
  const image = new Image();
  image.onload = () => {
    const { width, height } = ui.maskCanvas;
    const scratch = document.createElement("canvas");
    scratch.width = width;
    scratch.height = height;
    const scratchContext = scratch.getContext("2d");
    drawCover(scratchContext, image, width, height);
    const pixels = scratchContext.getImageData(0, 0, width, height);
    const data = pixels.data;
    for (let i = 0; i < data.length; i += 4) {
      const light = data[i] * 0.299 + data[i + 1] * 0.587 + data[i + 2] * 0.114 > 127;
      data.set(light ? [0xff, 0x3d, 0x8b, 255] : [0, 0, 0, 0], i);
    }
    ui.maskCanvas.getContext("2d").putImageData(pixels, 0, 0);
    state.maskPainted = true;
    updateMode();
    URL.revokeObjectURL(image.src);
  };
  image.src = URL.createObjectURL(file);
}

function maskDataURL() {
  // diffusers' convention: white is repainted, black is kept.
  const { width, height } = ui.maskCanvas;
  const painted = ui.maskCanvas.getContext("2d").getImageData(0, 0, width, height);
  const mask = document.createElement("canvas");
  mask.width = width;
  mask.height = height;
  const context = mask.getContext("2d");
  const pixels = context.createImageData(width, height);
  for (let i = 0; i < pixels.data.length; i += 4) {
    const value = painted.data[i + 3] > 0 ? 255 : 0;
    pixels.data.set([value, value, value, 255], i);
  }
  context.putImageData(pixels, 0, 0);
  return mask.toDataURL("image/png");
}

// --- wiring --------------------------------------------------------------------------------------------------

function start() {
  ui.key.value = localStorage.getItem(KEY_STORAGE) || "";
  ui.key.addEventListener("change", useKey);
  ui.form.addEventListener("submit", submit);
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) ui.form.requestSubmit();
  });
  ui.cancel.addEventListener("click", cancel);
  ui.seedClear.addEventListener("click", () => { ui.seed.value = ""; });
  ui.initFile.addEventListener("change", () => {
    if (ui.initFile.files[0]) loadInitImage(URL.createObjectURL(ui.initFile.files[0]));
  });
  ui.maskFile.addEventListener("change", () => { if (ui.maskFile.files[0]) loadMaskFile(ui.maskFile.files[0]); });
  ui.maskClear.addEventListener("click", clearMask);
  ui.initRemove.addEventListener("click", removeInitImage);
  ui.strength.addEventListener("input", () => { ui.strengthOut.value = Number(ui.strength.value).toFixed(2); });
  for (const input of [ui.width, ui.height]) input.addEventListener("change", drawInitImage);
  paintMask();
  watchHealth();
}

start();
