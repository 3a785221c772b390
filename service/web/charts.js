// Per-layer charts in plain SVG: one slot per residual block in network order, grouped by stage,
// each slot with the reference profile's mean ± std band behind the value of the last prediction
// (or of live traffic). Charts take the width of their box and redraw when it changes.

import { svg, clear, num, plusMinus } from "./dom.js";

const HEIGHT = 230;
const MARGIN = { top: 12, right: 10, bottom: 46, left: 54 };
const STAGE_GAP = 16;
const MIN_BAND_PX = 4;          // a reference band narrower than this is drawn this thick around its middle
const STEP_SIZE_DOMAIN = [0, 1];  // the bounds of h

const specs = new WeakMap();
const resized = new ResizeObserver((entries) => {
  for (const entry of entries) {
    const spec = specs.get(entry.target);
    if (spec) render(entry.target, spec);
  }
});

// spec: {label, axis, domain: [lo, hi], ticks: [{at, label}], lines: [{at, className}],
//        layers: [{name, stage, block}], rows: [{band, mean, value, range, bar, past, tip}]}
// in plot units (for NSI: ln NSI). A row without value is drawn as "n/a".
export function draw(node, spec) {
  specs.set(node, spec);
  resized.observe(node);
  render(node, spec);
}

function render(node, spec) {
  const width = Math.max(280, Math.round(node.getBoundingClientRect().width) || 640);
  clear(node);
  node.setAttribute("viewBox", `0 0 ${width} ${HEIGHT}`);
  node.setAttribute("role", "img");
  node.setAttribute("aria-label", spec.label);
  svg("title", {}, node, spec.label);
  const [lo, hi] = spec.domain;
  const bottom = HEIGHT - MARGIN.bottom;
  const y = (v) => MARGIN.top + ((hi - Math.min(hi, Math.max(lo, v))) / (hi - lo)) * (bottom - MARGIN.top);
  const { x, slot } = layout(spec.layers, width);

  const grid = svg("g", { class: "grid" }, node);
  for (const tick of spec.ticks) {
    svg("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y(tick.at), y2: y(tick.at) }, grid);
    svg("text", { x: MARGIN.left - 6, y: y(tick.at), class: "tick", "text-anchor": "end",
                  "dominant-baseline": "middle" }, grid, tick.label);
  }
  for (const line of spec.lines || []) {
    svg("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y(line.at), y2: y(line.at),
                  class: line.className }, node);
  }
  svg("text", { class: "axis-title", transform: `translate(13 ${(MARGIN.top + bottom) / 2}) rotate(-90)`,
                "text-anchor": "middle" }, node, spec.axis);

  const half = Math.min(slot * 0.36, 18);
  spec.layers.forEach((layer, i) => {
    const row = spec.rows[i];
    const g = svg("g", { class: "layer" }, node);
    svg("title", {}, g, row.tip);
    if (row.band) {
      const top = y(row.band[1]), height = y(row.band[0]) - top;
      const thick = Math.max(MIN_BAND_PX, height);
      svg("rect", { x: x[i] - half, width: 2 * half, y: top + (height - thick) / 2, height: thick,
                    class: "band" }, g);
    }
    if (row.mean !== null && row.mean !== undefined) {
      svg("line", { x1: x[i] - half, x2: x[i] + half, y1: y(row.mean), y2: y(row.mean), class: "ref-mean" }, g);
    }
    if (row.value === null || row.value === undefined) {
      if (!row.band) svg("text", { x: x[i], y: y((lo + hi) / 2), class: "na", "text-anchor": "middle" }, g, "n/a");
    } else if (row.bar) {
      const top = y(Math.max(0, row.value));
      svg("rect", { x: x[i] - half * 0.7, width: 1.4 * half, y: top, height: Math.max(1, y(Math.min(0, row.value)) - top),
                    class: row.past ? "bar past" : "bar" }, g);
    } else {
      if (row.range) {
        const [a, b] = row.range.map(y);
        svg("line", { x1: x[i], x2: x[i], y1: a, y2: b, class: "whisker" }, g);
        for (const end of [a, b]) {
          svg("line", { x1: x[i] - half / 2, x2: x[i] + half / 2, y1: end, y2: end, class: "whisker" }, g);
        }
      }
      svg("circle", { cx: x[i], cy: y(row.value), r: 4, class: "dot" }, g);
    }
    svg("text", { x: x[i], y: bottom + 14, class: "tick", "text-anchor": "middle" }, node, `b${layer.block}`);
  });
  drawStages(node, spec.layers, x, half, bottom);
}

function layout(layers, width) {
  const stages = new Set(layers.map((layer) => layer.stage)).size;
  const plot = width - MARGIN.left - MARGIN.right;
  const slot = (plot - STAGE_GAP * Math.max(0, stages - 1)) / Math.max(1, layers.length);
  const x = [];
  let position = MARGIN.left;
  layers.forEach((layer, i) => {
    if (i > 0 && layer.stage !== layers[i - 1].stage) position += STAGE_GAP;
    x.push(position + slot / 2);
    position += slot;
  });
  return { x, slot };
}

function drawStages(node, layers, x, half, bottom) {
  let first = 0;
  layers.forEach((layer, i) => {
    if (i + 1 < layers.length && layers[i + 1].stage === layer.stage) return;
    const left = x[first] - half, right = x[i] + half;
    svg("line", { x1: left, x2: right, y1: bottom + 22, y2: bottom + 22, class: "stage-rule" }, node);
    svg("text", { x: (left + right) / 2, y: bottom + 36, class: "stage-label", "text-anchor": "middle" },
        node, `stage ${layer.stage}`);
    first = i + 1;
  });
}

// Ticks over [lo, hi] a step of 1, 2 or 5 (else 2.5) times a power of ten apart, the step that gives
// the number of ticks nearest `count`.
export function niceTicks(lo, hi, count = 5) {
  const power = 10 ** Math.floor(Math.log10((hi - lo) / count));
  let best = null;
  for (const scale of [power / 10, power, power * 10]) {
    for (const m of [1, 2, 5, 2.5]) {
      const step = m * scale;
      const first = Math.ceil(lo / step - 1e-9), last = Math.floor(hi / step + 1e-9);
      const cost = Math.abs(last - first + 1 - count) + (m === 2.5 ? 1.5 : 0);
      if (best === null || cost < best.cost) best = { step, first, last, cost };
    }
  }
  const ticks = [];
  for (let i = best.first; i <= best.last; i++) ticks.push(Number((i * best.step).toPrecision(12)));
  return ticks;
}

// [lo, hi] of the finite values, widened by `pad` of the span on each side (never empty).
export function extent(values, pad = 0.08, minSpan = 0.02) {
  const finite = values.filter((v) => v !== null && v !== undefined && Number.isFinite(v));
  if (finite.length === 0) return [0, 1];
  let lo = Math.min(...finite), hi = Math.max(...finite);
  if (hi - lo < minSpan) {
    const mid = (lo + hi) / 2;
    lo = mid - minSpan / 2;
    hi = mid + minSpan / 2;
  }
  const span = hi - lo;
  return [lo - pad * span, hi + pad * span];
}

// Ticks of a log axis, in ln units, about `count` of them: plain nice values when the range is
// narrow, else the densest of 1-2-3-5-7, 1-2-5, 1-3 or 1 per decade that is not crowded (decades
// thinned out when even 1 per decade is).
export function logTicks(lnLo, lnHi, count = 5) {
  const lo = Math.exp(lnLo), hi = Math.exp(lnHi);
  let values = niceTicks(lo, hi, count).filter((v) => v > 0);
  if (hi / lo > 10) {
    for (const mantissas of [[1, 2, 3, 5, 7], [1, 2, 5], [1, 3], [1]]) {
      values = [];
      for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
        for (const m of mantissas) values.push(Number((m * 10 ** e).toPrecision(12)));
      }
      values = values.filter((v) => v >= lo && v <= hi);
      if (values.length <= count + 1) break;
    }
    const every = Math.ceil(values.length / (count + 1));
    values = values.filter((_, i) => i % every === 0);
  }
  return values.map((v) => ({ at: Math.log(v), label: num(v, 3) }));
}

function linearTicks([lo, hi]) {
  return niceTicks(lo, hi).map((v) => ({ at: v, label: num(v, 3) }));
}

// Step size of the last prediction (mean, whisker min-max) against the profile's mean ± std.
export function drawStepSizes(node, profile, layers, result) {
  const ref = profile.layers;
  const rows = layers.map((layer, i) => {
    const r = ref[i], live = result ? result.layers[i].step_size : null;
    const tip = `${layer.name}: reference ${plusMinus(r.step_size_mean, r.step_size_std)}` +
      (live ? `; this image: mean ${num(live.mean)} (min ${num(live.min)}, max ${num(live.max)})` : "");
    return { band: [r.step_size_mean - r.step_size_std, r.step_size_mean + r.step_size_std],
             mean: r.step_size_mean, value: live ? live.mean : null,
             range: live ? [live.min, live.max] : null, tip };
  });
  draw(node, { label: "Step size h per layer, from 0 to 1: the last prediction's mean over channels (dot) and " +
                      "min to max (whisker), against the reference mean ± std (band)",
               axis: "step size h", domain: STEP_SIZE_DOMAIN, ticks: linearTicks(STEP_SIZE_DOMAIN), layers, rows });
}

// NSI of the last prediction on a log axis, against exp(mean ± std of ln NSI) of the profile.
export function drawNsi(node, profile, layers, result) {
  const ref = profile.layers;
  const rows = layers.map((layer, i) => {
    const r = ref[i];
    const nsi = result ? result.layers[i].nsi : null;
    const defined = r.log_nsi_mean !== null;
    const value = nsi !== null && nsi > 0 ? Math.log(nsi) : null;
    const tip = defined
      ? `${layer.name}: reference ln NSI ${plusMinus(r.log_nsi_mean, r.log_nsi_std)} ` +
        `(NSI ${num(Math.exp(r.log_nsi_mean))})` + (result ? `; this image: NSI ${num(nsi)}` : "")
      : `${layer.name}: first block of stage ${layer.stage}, NSI undefined`;
    return { band: defined ? [r.log_nsi_mean - r.log_nsi_std, r.log_nsi_mean + r.log_nsi_std] : null,
             mean: defined ? r.log_nsi_mean : null, value, tip };
  });
  const domain = extent(rows.flatMap((row) => [...(row.band || []), row.value]), 0.08, 0.1);
  draw(node, { label: "NSI per layer on a log scale: the last prediction (dot) against the reference " +
                      "exp(mean ± std of ln NSI) (band); n/a: first block of a stage",
               axis: "NSI (log scale)", domain, ticks: logTicks(...domain), layers, rows });
}

// Drift of live traffic per layer, with the ±3 marks past which a layer is flagged.
export function drawDrift(node, summary, limit) {
  const rows = summary.layers.map((layer) => ({
    value: layer.drift, bar: true, past: layer.drift !== null && Math.abs(layer.drift) > limit,
    tip: `${layer.name}: drift ${num(layer.drift)}`,
  }));
  const largest = Math.max(limit + 1, ...rows.map((row) => Math.abs(row.value || 0) * 1.1));
  const domain = [-largest, largest];
  draw(node, { label: `Drift per layer of the live mean of ln NSI, in reference standard deviations; ` +
                      `past ±${limit} marked`,
               axis: "drift (std)", domain, ticks: linearTicks(domain), layers: summary.layers, rows,
               lines: [{ at: 0, className: "zero" }, { at: limit, className: "threshold" },
                       { at: -limit, className: "threshold" }] });
}
