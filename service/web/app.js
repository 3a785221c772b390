// The page at /: pick a model version, send an image (file, drop, paste or drawing), see the
// prediction with its per-layer step sizes and NSI against the reference profile, and the live
// stiffness of the traffic from GET /stiffness. Text from the API is only ever set as text.

import * as api from "./api.js";
import { el, clear, num, plusMinus, ms, percent, DASH } from "./dom.js";
import { drawStepSizes, drawNsi, drawDrift } from "./charts.js";
import { Pad } from "./pad.js";

const DRIFT_LIMIT = 3;            // |drift| past this many reference standard deviations is marked
const LIVE_PERIOD_MS = 3000;
const MODELS_RETRY_MS = 2000;     // while the service is still starting (503)

const NO_PREDICTION = "No prediction yet: choose, drop, paste or draw an image.";

const $ = (id) => document.getElementById(id);
const state = { versions: [], meta: null, sendTurn: 0, liveTimer: null, liveTurn: 0, pad: null,
                previewUrl: null };

// ---- models and versions ------------------------------------------------------------------

async function loadModels() {
  let body;
  try {
    body = await api.listModels();
  } catch (error) {
    $("model-info").textContent = `Could not list the models (${error}); trying again.`;
    setTimeout(loadModels, MODELS_RETRY_MS);
    return;
  }
  $("model-info").textContent = "";
  state.versions = body.models;
  const names = [...new Set(state.versions.map((v) => v.name))].sort();
  const preferred = state.versions.find((v) => v.default) || state.versions[0];
  const select = clear($("model"));
  for (const name of names) select.append(el("option", { text: name, attrs: { value: name } }));
  if (names.length === 0) {
    select.append(el("option", { text: "no models", attrs: { value: "" } }));
    select.disabled = true;
    return;
  }
  select.value = preferred.name;
  select.disabled = false;
  fillVersions();
}

function fillVersions() {
  const name = $("model").value;
  const versions = state.versions.filter((v) => v.name === name).sort((a, b) => b.version - a.version);
  const select = clear($("version"));
  for (const v of versions) {
    const label = v.state === "ready" ? `${v.version}` : `${v.version} (${v.state})`;
    const option = el("option", { text: label, attrs: { value: String(v.version) } });
    option.disabled = v.state !== "ready";
    select.append(option);
  }
  const ready = versions.find((v) => v.state === "ready") || versions[0];
  select.value = String(ready.version);
  select.disabled = versions.length < 2;
  selectVersion();
}

function selectVersion() {
  const name = $("model").value, version = Number($("version").value);
  state.meta = state.versions.find((v) => v.name === name && v.version === version) || null;
  const meta = state.meta;
  if (!meta) return;
  const accuracy = meta.accuracy ? `, top-1 ${percent(meta.accuracy.top1)} on ${meta.accuracy.dataset} ${meta.accuracy.split}` : "";
  $("model-info").textContent = `${meta.family}-${meta.depth}, ${meta.classes.length} classes, input ` +
    `${meta.input.shape.join("×")} (${meta.preprocessing.colour_mode}), ${meta.state}` +
    `${meta.provider ? " on " + meta.provider : ""}${accuracy}`;
  $("top-k").max = String(meta.classes.length);
  $("drawing").hidden = meta.preprocessing.colour_mode !== "L";
  $("reference-images").textContent = `the ${meta.profile.samples} ${meta.profile.dataset} images the model ` +
    "was calibrated on";
  clearAnswer(NO_PREDICTION);
  restartLive();
}

// ---- sending an image -----------------------------------------------------------------------

function topK() {
  const value = Number.parseInt($("top-k").value, 10);
  const most = state.meta ? state.meta.classes.length : 5;
  return Number.isFinite(value) ? Math.min(Math.max(1, value), most) : 5;
}

// The answer replaces whatever was shown before, prediction or error; only the latest send's counts.
async function send(image, filename) {
  if (!state.meta) return;
  const turn = ++state.sendTurn;
  clearAnswer("Classifying…");
  showPreview(image);
  const started = performance.now();
  try {
    const result = await api.predict(image, filename, { model: state.meta.name, version: state.meta.version,
                                                        topK: topK() });
    if (turn !== state.sendTurn) return;
    renderPrediction(result, performance.now() - started);
    reveal($("answer"));
    pollLive();
  } catch (error) {
    if (turn === state.sendTurn) showError(error);
  }
}

function showPreview(image) {
  hidePreview();
  state.previewUrl = URL.createObjectURL(image);
  $("preview").src = state.previewUrl;
  $("preview").hidden = false;
}

function hidePreview() {
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = null;
}

// On a phone the answer is below the inputs: bring it into view, and move nothing when it is in view.
function reveal(node) {
  const box = node.getBoundingClientRect();
  if (box.top >= 0 && box.bottom <= window.innerHeight) return;
  node.scrollIntoView({ block: box.height > window.innerHeight ? "start" : "nearest" });
}

function firstImage(files) {
  return [...(files || [])].find((file) => file.type === "" || file.type.startsWith("image/")) ||
         (files && files[0]) || null;
}

function wireInputs() {
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) send(file, file.name);
    event.target.value = "";          // choosing the same file again sends it again
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = firstImage(event.dataTransfer.files);
    if (file) send(file, file.name || "dropped");
  });
  document.addEventListener("paste", (event) => {
    const file = firstImage(event.clipboardData && event.clipboardData.files);
    if (!file) return;
    event.preventDefault();
    send(file, file.name || "pasted");
  });
  state.pad = new Pad($("pad"));
  $("clear-drawing").addEventListener("click", () => state.pad.clear());
  $("send-drawing").addEventListener("click", async () => {
    if (!state.pad.drawn) {
      showError("Draw something on the pad first.");
      return;
    }
    send(await state.pad.toBlob(), "drawing.png");
  });
  $("preview").addEventListener("error", hidePreview);     // a format this browser cannot show
  $("model").addEventListener("change", fillVersions);
  $("version").addEventListener("change", selectVersion);
  $("live-on").addEventListener("change", restartLive);
}

// ---- the prediction -------------------------------------------------------------------------

// No prediction, no error, no preview, and the charts with the reference alone; `status` says why.
function clearAnswer(status) {
  hideError();
  hidePreview();
  clear($("predictions"));
  $("unusual").hidden = true;
  $("timing").textContent = "";
  $("prediction-status").textContent = status;
  $("prediction-status").hidden = status === "";
  renderLayers(null);
}

function renderPrediction(result, roundTrip) {
  $("prediction-status").hidden = true;
  const list = clear($("predictions"));
  for (const p of result.predictions) {
    const bar = el("progress", { attrs: { max: "1", value: String(p.probability),
                                          "aria-label": `probability of ${p.label}` } });
    list.append(el("li", {}, el("span", { className: "label", text: p.label }), bar,
                   el("span", { className: "probability", text: percent(p.probability) })));
  }
  renderScore(result.stiffness_score);
  const t = result.timing_ms;
  $("timing").textContent = `${result.model} version ${result.version}: ${ms(t.total)} in the service ` +
    `(queue ${ms(t.queue)}, preprocess ${ms(t.preprocess)}, inference ${ms(t.inference)}), ` +
    `${ms(roundTrip)} round trip from this page`;
  renderLayers(result);
}

// The stiffness score of the last prediction and its flag, in one line that says what it means.
function renderScore(score) {
  const line = $("unusual");
  line.hidden = score === null || score === undefined;
  if (line.hidden) return;
  const value = score.value === null ? "not finite" : score.value.toFixed(2);
  line.classList.toggle("flagged", score.unusual);
  line.textContent = (score.unusual ? "Unusual input" : "Typical input") +
    `: stiffness score ${value} (threshold ${score.threshold.toFixed(2)}), how far this image's ` +
    "step sizes and stiffness lie from those of the images the model was calibrated on.";
}

function renderLayers(result) {
  const meta = state.meta;
  drawStepSizes($("step-chart"), meta.profile, meta.layers, result);
  drawNsi($("nsi-chart"), meta.profile, meta.layers, result);
  const table = $("layers-table");
  clear(table.tBodies[0]);
  for (const [i, layer] of meta.layers.entries()) {
    const row = result ? result.layers[i] : null;
    const cells = row ? [num(row.step_size.mean), num(row.step_size.min), num(row.step_size.max), num(row.nsi)]
                      : [DASH, DASH, DASH, DASH];
    addRow(table, el("th", { text: layer.name, attrs: { scope: "row" } }), cells);
  }
}

// A body row whose cells carry their column's heading, shown beside each value where a narrow
// screen stacks the table (style.css).
function addRow(table, header, cells, className = "") {
  const headings = [...table.tHead.rows[0].cells].map((cell) => cell.textContent);
  const tds = cells.map((text, i) => el("td", { text, attrs: { "data-label": headings[i + 1] } }));
  table.tBodies[0].append(el("tr", { className }, header, ...tds));
}

// ---- live stiffness ---------------------------------------------------------------------------

function restartLive() {
  clearTimeout(state.liveTimer);
  state.liveTimer = null;
  if ($("live-on").checked) pollLive();
  else $("live-status").textContent = "Paused.";
}

// One chain of polls: a poll started meanwhile (after a prediction, a new version) supersedes it.
async function pollLive() {
  clearTimeout(state.liveTimer);
  const turn = ++state.liveTurn;
  const meta = state.meta;
  if (!meta) return;
  if (document.visibilityState === "visible") {
    try {
      const summary = await api.stiffness({ model: meta.name, version: meta.version });
      if (turn === state.liveTurn) renderLive(summary);
    } catch (error) {
      if (turn === state.liveTurn) $("live-status").textContent = `Could not refresh: ${error}`;
    }
  }
  if (turn === state.liveTurn && $("live-on").checked) state.liveTimer = setTimeout(pollLive, LIVE_PERIOD_MS);
}

function renderLive(summary) {
  $("live-status").textContent = `${summary.model} version ${summary.version}, last ${summary.window} ` +
    `requests, updated ${new Date().toLocaleTimeString()}`;
  $("live-count").textContent = String(summary.count);
  const flagged = summary.layers.filter((layer) => layer.drift !== null && Math.abs(layer.drift) > DRIFT_LIMIT);
  $("live-flagged").textContent = flagged.length
    ? `${flagged.length} layer${flagged.length > 1 ? "s" : ""} past |drift| > ${DRIFT_LIMIT}: ` +
      flagged.map((layer) => layer.name).join(", ")
    : "";
  drawDrift($("drift-chart"), summary, DRIFT_LIMIT);

  const stages = clear($("stages-table").tBodies[0]);
  for (const stage of summary.stages) {
    stages.append(el("tr", {}, el("th", { text: String(stage.stage), attrs: { scope: "row" } }),
                     el("td", { text: num(stage.stiffness_ratio.reference) }),
                     el("td", { text: num(stage.stiffness_ratio.live) })));
  }

  const table = $("live-table");
  clear(table.tBodies[0]);
  for (const layer of summary.layers) {
    const ref = layer.reference, live = layer.live;
    const past = layer.drift !== null && Math.abs(layer.drift) > DRIFT_LIMIT;
    const nsiRef = ref.log_nsi_mean === null ? DASH : num(Math.exp(ref.log_nsi_mean));
    const drift = layer.drift === null ? DASH : `${num(layer.drift)}${past ? " (past ±" + DRIFT_LIMIT + ")" : ""}`;
    // marked by its name too, where a row is read first, whatever the width shows of the Drift column
    const name = el("th", { text: layer.name, attrs: { scope: "row" } },
                    ...(past ? [" ", el("span", { className: "mark", text: "drift" })] : []));
    addRow(table, name, [drift, plusMinus(ref.step_size_mean, ref.step_size_std), num(live.step_size_mean),
                         num(live.step_size_p95), nsiRef, num(live.nsi_p50), num(live.nsi_p95)],
           past ? "past" : "");
  }
}

// ---- errors -----------------------------------------------------------------------------------

// An error replaces the answer: no prediction, charts or preview of an image the service refused.
function showError(error) {
  clearAnswer("");
  $("error").textContent = String(error);
  $("error").hidden = false;
  reveal($("answer"));
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && $("live-on").checked) pollLive();
});
$("live-period").textContent = String(LIVE_PERIOD_MS / 1000);
wireInputs();
loadModels();
