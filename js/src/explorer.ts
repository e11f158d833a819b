// The Explorer: small-multiple layer × step heatmaps per run, a trajectory panel and a detail panel.
import type { RenderProps } from "@anywidget/types";
import { type NDArray, type Wire, at, decode } from "./codecs";
import { type ColorScale, type ScaleKind, colorScale, fmt, linear, paint, runColor, ticks } from "./scale";
import { type Frame, axes, bandPath, el, linePath, svg } from "./svg";

export interface Selection {
  run: string;
  layer: number;
  module: string;
  step: number;
}

export interface Payload {
  runs: string[];
  methods: string[];
  steps: number[];
  layers: number[];
  modules: string[];
  progress: Wire;
  metrics: Record<string, Wire>;
  labels: Record<string, string>;
  angles: { u: Wire; v: Wire; steps: number[] } | null;
  mask_alpha: number;
}

export interface Model {
  _data: Payload;
  metric: string;
  module: string; // "" = mean over modules
  scale: ScaleKind;
  selection: Selection;
}

/** The payload with its arrays decoded. */
export interface Data {
  runs: string[];
  methods: string[];
  steps: number[];
  layers: number[];
  modules: string[];
  progress: NDArray;
  metrics: Record<string, NDArray>;
  labels: Record<string, string>;
  angles: { u: NDArray; v: NDArray; steps: number[] } | null;
  maskAlpha: number;
  /** Per run, the indices into `steps` where the run has a checkpoint. */
  runSteps: number[][];
}

export function decodePayload(p: Payload): Data {
  const progress = decode(p.progress);
  const runSteps = p.runs.map((_, r) => p.steps.map((_, s) => s).filter((s) => Number.isFinite(at(progress, r, s))));
  const metrics: Record<string, NDArray> = {};
  for (const [k, w] of Object.entries(p.metrics)) metrics[k] = decode(w);
  const angles = p.angles ? { u: decode(p.angles.u), v: decode(p.angles.v), steps: p.angles.steps } : null;
  return { ...p, progress, metrics, angles, maskAlpha: p.mask_alpha, runSteps };
}

/** Values of `metric` for (run, step index, layer index): one module, or the NaN-skipping mean over modules. */
export function cellValue(d: Data, metric: string, module: string, r: number, s: number, l: number): number {
  const a = d.metrics[metric];
  if (module !== "") return at(a, r, s, l, d.modules.indexOf(module));
  let sum = 0;
  let n = 0;
  for (let m = 0; m < d.modules.length; m++) {
    const v = at(a, r, s, l, m);
    if (Number.isFinite(v)) {
      sum += v;
      n++;
    }
  }
  return n ? sum / n : NaN;
}

/** Per run: the grid [layer][step of that run] of the chosen metric/module, and its flat values. */
export function grids(d: Data, metric: string, module: string): Float32Array[] {
  return d.runs.map((_, r) => {
    const steps = d.runSteps[r];
    const out = new Float32Array(d.layers.length * steps.length);
    for (let l = 0; l < d.layers.length; l++)
      for (let j = 0; j < steps.length; j++) out[l * steps.length + j] = cellValue(d, metric, module, r, steps[j], l);
    return out;
  });
}

/** Mean, min and max over layers (of the chosen module) per step of a run. */
export function trajectory(grid: Float32Array, nLayers: number, nSteps: number) {
  const mean = new Float32Array(nSteps).fill(NaN);
  const lo = new Float32Array(nSteps).fill(NaN);
  const hi = new Float32Array(nSteps).fill(NaN);
  for (let j = 0; j < nSteps; j++) {
    let sum = 0;
    let n = 0;
    let a = Infinity;
    let b = -Infinity;
    for (let l = 0; l < nLayers; l++) {
      const v = grid[l * nSteps + j];
      if (!Number.isFinite(v)) continue;
      sum += v;
      n++;
      a = Math.min(a, v);
      b = Math.max(b, v);
    }
    if (n) [mean[j], lo[j], hi[j]] = [sum / n, a, b];
  }
  return { mean, lo, hi };
}

/** The selection moved by a key, or null when the key is not a navigation key. */
export function navigate(d: Data, sel: Selection, key: string): Selection | null {
  const r = d.runs.indexOf(sel.run);
  const steps = d.runSteps[r].map((s) => d.steps[s]);
  const j = steps.indexOf(sel.step);
  const l = d.layers.indexOf(sel.layer);
  const clamp = (i: number, n: number) => Math.max(0, Math.min(n - 1, i));
  switch (key) {
    case "ArrowLeft":
    case "ArrowRight":
      return { ...sel, step: steps[clamp(j + (key === "ArrowRight" ? 1 : -1), steps.length)] };
    case "ArrowUp":
    case "ArrowDown":
      return { ...sel, layer: d.layers[clamp(l + (key === "ArrowDown" ? 1 : -1), d.layers.length)] };
    case "PageUp":
    case "PageDown": {
      const r2 = clamp(r + (key === "PageDown" ? 1 : -1), d.runs.length);
      const steps2 = d.runSteps[r2].map((s) => d.steps[s]);
      const step = steps2.includes(sel.step) ? sel.step : steps2[steps2.length - 1];
      return { ...sel, run: d.runs[r2], step };
    }
    default:
      return null;
  }
}

const HEAT_HEIGHT = 150;

function render({ model, el: host }: RenderProps<Model>) {
  const t0 = performance.now();
  const root = el("div", { className: "opd-lens opd-explorer" }, host);
  root.tabIndex = 0;
  const data = decodePayload(model.get("_data"));
  let hover: { run: number; layer: number } | null = null;

  // Controls.
  const bar = el("div", { className: "opd-controls" }, root);
  const picker = (label: string, options: [string, string][], key: "metric" | "module" | "scale") => {
    const wrap = el("label", { text: `${label} ` }, bar);
    const select = el("select", {}, wrap);
    select.setAttribute("aria-label", label);
    for (const [value, text] of options) {
      const o = el("option", { text }, select);
      o.value = value;
    }
    select.value = model.get(key);
    select.addEventListener("change", () => {
      model.set(key, select.value as never);
      model.save_changes();
    });
    model.on(`change:${key}`, () => {
      select.value = model.get(key);
    });
    return select;
  };
  picker("metric", Object.keys(data.metrics).map((m) => [m, m]), "metric");
  picker("module", [["", "mean of modules"], ...data.modules.map((m): [string, string] => [m, m])], "module");
  picker("colour", [["linear", "linear"], ["log", "log"]], "scale");
  const scrubLabel = el("label", { text: "step " }, bar);
  const scrub = el("input", {}, scrubLabel);
  scrub.type = "range";
  scrub.setAttribute("aria-label", "step");
  const scrubText = el("span", { className: "opd-step" }, scrubLabel);

  const description = el("div", { className: "opd-description" }, root);
  const heat = el("div", { className: "opd-heatmaps" }, root);
  const legend = el("div", { className: "opd-legend" }, root);
  const lower = el("div", { className: "opd-lower" }, root);
  const trajBox = el("div", { className: "opd-trajectory" }, lower);
  const detail = el("div", { className: "opd-detail" }, lower);
  const tooltip = el("div", { className: "opd-tooltip" }, root);
  tooltip.hidden = true;

  let current: Float32Array[] = [];
  let scale: ColorScale = colorScale([], "linear");

  const selection = (): Selection => model.get("selection"); // Python validates it and always sets one
  const select = (s: Selection) => {
    model.set("selection", s);
    model.save_changes();
  };

  function drawHeatmaps() {
    const metric = model.get("metric");
    const module = model.get("module");
    current = grids(data, metric, module);
    const all = new Float32Array(current.reduce((n, g) => n + g.length, 0));
    current.reduce((off, g) => (all.set(g, off), off + g.length), 0);
    scale = colorScale(all, model.get("scale"));
    description.textContent = data.labels[metric] ?? "";
    heat.replaceChildren();
    const nL = data.layers.length;
    data.runs.forEach((run, r) => {
      const nS = data.runSteps[r].length;
      const panel = el("figure", { className: "opd-panel" }, heat);
      const title = el("figcaption", {}, panel);
      el("span", { className: "opd-swatch" }, title).style.background = runColor(r);
      el("span", { text: run }, title);
      el("span", { className: "opd-method", text: data.methods[r] }, title);
      const canvas = el("canvas", { className: "opd-heat" }, panel);
      canvas.dataset.run = run;
      canvas.width = Math.max(nS, 1);
      canvas.height = nL;
      canvas.style.height = `${HEAT_HEIGHT}px`;
      const ctx = canvas.getContext("2d");
      if (ctx && nS) {
        const img = ctx.createImageData(nS, nL);
        for (let i = 0; i < nL * nS; i++) paint(img.data, 4 * i, scale.unit(current[r][i]));
        ctx.putImageData(img, 0, 0);
      }
      const axis = el("div", { className: "opd-xaxis" }, panel);
      el("span", { text: nS ? `step ${data.steps[data.runSteps[r][0]]}` : "no steps" }, axis);
      el("span", { text: nS ? `${data.steps[data.runSteps[r][nS - 1]]}` : "" }, axis);
      const mark = el("div", { className: "opd-mark" }, panel);
      mark.dataset.run = run;
      const locate = (ev: MouseEvent) => {
        const box = canvas.getBoundingClientRect();
        const j = Math.min(nS - 1, Math.max(0, Math.floor(((ev.clientX - box.left) / box.width) * nS)));
        const l = Math.min(nL - 1, Math.max(0, Math.floor(((ev.clientY - box.top) / box.height) * nL)));
        return { j, l };
      };
      canvas.addEventListener("mousemove", (ev) => {
        if (!nS) return;
        const { j, l } = locate(ev);
        const s = data.runSteps[r][j];
        const mod = model.get("module");
        tooltip.replaceChildren();
        el("div", { className: "opd-tip-title", text: run }, tooltip);
        for (const line of [
          `layer ${data.layers[l]} · ${mod || "mean of modules"}`,
          `step ${data.steps[s]} (progress ${fmt(at(data.progress, r, s))})`,
          `${model.get("metric")} = ${fmt(current[r][l * nS + j])}`,
        ])
          el("div", { text: line }, tooltip);
        tooltip.hidden = false;
        const rootBox = root.getBoundingClientRect();
        tooltip.style.left = `${ev.clientX - rootBox.left + 12}px`;
        tooltip.style.top = `${ev.clientY - rootBox.top + 12}px`;
        if (!hover || hover.run !== r || hover.layer !== l) {
          hover = { run: r, layer: l };
          drawTrajectory();
        }
      });
      canvas.addEventListener("mouseleave", () => {
        tooltip.hidden = true;
        hover = null;
        drawTrajectory();
      });
      canvas.addEventListener("click", (ev) => {
        if (!nS) return;
        const { j, l } = locate(ev);
        const prev = selection();
        const mod = model.get("module") || prev.module;
        select({ run, layer: data.layers[l], module: mod, step: data.steps[data.runSteps[r][j]] });
        root.focus();
      });
    });
    drawLegend();
  }

  function drawLegend() {
    legend.replaceChildren();
    const bar = el("canvas", { className: "opd-ramp" }, legend);
    bar.width = 256;
    bar.height = 1;
    const ctx = bar.getContext("2d");
    if (ctx) {
      const img = ctx.createImageData(256, 1);
      for (let i = 0; i < 256; i++) paint(img.data, 4 * i, i / 255);
      ctx.putImageData(img, 0, 0);
    }
    legend.prepend(el("span", { text: `${model.get("metric")}${scale.kind === "log" ? " (log)" : ""}:` }));
    bar.before(el("span", { text: fmt(scale.lo) }));
    bar.after(el("span", { text: fmt(scale.hi) }));
    const nan = el("span", { className: "opd-nan", text: "not computed / not applicable" }, legend);
    nan.title = "NaN in the Dataset";
  }

  function drawMarks() {
    const s = selection();
    for (const mark of heat.querySelectorAll<HTMLDivElement>(".opd-mark")) {
      const r = data.runs.indexOf(mark.dataset.run ?? "");
      const steps = data.runSteps[r];
      const j = steps.findIndex((k) => data.steps[k] === s.step);
      const l = data.layers.indexOf(s.layer);
      mark.hidden = mark.dataset.run !== s.run || j < 0 || l < 0;
      if (mark.hidden) continue;
      const canvas = mark.parentElement?.querySelector("canvas");
      const w = canvas?.clientWidth ?? 0;
      const top = canvas?.offsetTop ?? 0;
      const left = canvas?.offsetLeft ?? 0;
      mark.style.left = `${left + (j / steps.length) * w}px`;
      mark.style.width = `${Math.max(2, w / steps.length)}px`;
      mark.style.top = `${top + (l / data.layers.length) * HEAT_HEIGHT}px`;
      mark.style.height = `${Math.max(2, HEAT_HEIGHT / data.layers.length)}px`;
    }
    const r = data.runs.indexOf(s.run);
    const steps = data.runSteps[r];
    scrub.min = "0";
    scrub.max = String(Math.max(0, steps.length - 1));
    scrub.value = String(Math.max(0, steps.findIndex((k) => data.steps[k] === s.step)));
    scrubText.textContent = `${s.step} of ${s.run}`;
  }

  const frame = (width: number, height: number): Frame => ({
    width,
    height,
    margin: { top: 10, right: 10, bottom: 30, left: 52 },
  });

  function drawTrajectory() {
    trajBox.replaceChildren();
    el("div", { className: "opd-panel-title", text: "trajectory: mean over layers, band = min–max" }, trajBox);
    const f = frame(420, 220);
    const root = svg("svg", { width: f.width, height: f.height, class: "opd-traj-svg" }, trajBox);
    const curves = data.runs.map((_, r) => {
      const steps = data.runSteps[r];
      const xs = steps.map((s) => at(data.progress, r, s));
      return { xs, ...trajectory(current[r], data.layers.length, steps.length) };
    });
    let lo = Infinity;
    let hi = -Infinity;
    for (const c of curves)
      for (let j = 0; j < c.xs.length; j++) {
        if (Number.isFinite(c.lo[j])) lo = Math.min(lo, c.lo[j]);
        if (Number.isFinite(c.hi[j])) hi = Math.max(hi, c.hi[j]);
      }
    if (!(lo <= hi)) [lo, hi] = [0, 1];
    const x = linear(0, 1, f.margin.left, f.width - f.margin.right);
    const y = linear(lo, hi, f.height - f.margin.bottom, f.margin.top);
    const plot = axes(root, f, x, y, ticks(0, 1), ticks(lo, hi), { x: "progress", y: model.get("metric") }, fmt);
    curves.forEach((c, r) => {
      const px = c.xs.map(x);
      svg("path", { d: bandPath(px, c.lo.map(y), c.hi.map(y)), fill: runColor(r), "fill-opacity": 0.18 }, plot);
      svg("path", { d: linePath(px, c.mean.map(y)), stroke: runColor(r), fill: "none", "stroke-width": 2 }, plot);
    });
    if (hover) {
      const { run: r, layer: l } = hover;
      const n = data.runSteps[r].length;
      const ys = Array.from({ length: n }, (_, j) => y(current[r][l * n + j]));
      const path = svg("path", { d: linePath(curves[r].xs.map(x), ys), class: "opd-hover-line" }, plot);
      path.setAttribute("stroke", runColor(r));
      svg("text", { x: f.width - f.margin.right, y: f.margin.top + 10, "text-anchor": "end" }, plot).textContent =
        `${data.runs[r]}, layer ${data.layers[l]}`;
    }
  }

  function drawDetail() {
    detail.replaceChildren();
    const s = selection();
    const r = data.runs.indexOf(s.run);
    const l = data.layers.indexOf(s.layer);
    const m = data.modules.indexOf(s.module);
    const si = data.steps.indexOf(s.step);
    el("div", { className: "opd-panel-title", text: `${s.run} · layer ${s.layer} · ${s.module} · step ${s.step}` }, detail);
    const row = el("div", { className: "opd-detail-row" }, detail);
    if (r < 0 || l < 0 || m < 0 || si < 0) return;
    history(row, r, l, m);
    overlaps(row, r, si, l, m);
    angles(row, r, si, l, m);
  }

  function history(parent: Element, r: number, l: number, m: number) {
    const box = el("div", { className: "opd-mini" }, parent);
    const metric = model.get("metric");
    el("div", { text: `${metric} of this matrix over steps` }, box);
    const f = frame(220, 150);
    const root = svg("svg", { width: f.width, height: f.height }, box);
    const steps = data.runSteps[r];
    const xs = steps.map((k) => data.steps[k]);
    const ys = steps.map((k) => at(data.metrics[metric], r, k, l, m));
    const finite = ys.filter(Number.isFinite);
    const [lo, hi] = finite.length ? [Math.min(...finite), Math.max(...finite)] : [0, 1];
    const x = linear(xs[0] ?? 0, xs[xs.length - 1] ?? 1, f.margin.left, f.width - f.margin.right);
    const y = linear(lo, hi, f.height - f.margin.bottom, f.margin.top);
    const xt = ticks(xs[0] ?? 0, xs[xs.length - 1] ?? 1, 3);
    const plot = axes(root, f, x, y, xt, ticks(lo, hi, 3), { x: "step", y: "" }, fmt);
    svg("path", { d: linePath(xs.map(x), ys.map(y)), stroke: runColor(r), fill: "none", "stroke-width": 2 }, plot);
    const j = xs.indexOf(selection().step);
    if (j >= 0 && Number.isFinite(ys[j])) svg("circle", { cx: x(xs[j]), cy: y(ys[j]), r: 4, class: "opd-dot" }, plot);
  }

  function overlaps(parent: Element, r: number, s: number, l: number, m: number) {
    const box = el("div", { className: "opd-mini" }, parent);
    el("div", { text: `update-mask overlaps (dashed: random α = ${fmt(data.maskAlpha)})` }, box);
    const names = ["principal_overlap", "lowmag_overlap"].filter((k) => k in data.metrics);
    const f = frame(200, 150);
    const root = svg("svg", { width: f.width, height: f.height }, box);
    const x = linear(0, names.length, f.margin.left, f.width - f.margin.right);
    const y = linear(0, 1, f.height - f.margin.bottom, f.margin.top);
    const plot = axes(root, f, x, y, [], ticks(0, 1, 4), { x: "", y: "overlap" }, fmt);
    names.forEach((k, i) => {
      const v = at(data.metrics[k], r, s, l, m);
      const bar = svg("rect", { x: x(i) + 6, width: x(1) - x(0) - 12, class: "opd-bar" }, plot);
      bar.setAttribute("y", String(Number.isFinite(v) ? y(v) : y(0)));
      bar.setAttribute("height", String(Number.isFinite(v) ? y(0) - y(v) : 0));
      svg("text", { x: x(i + 0.5), y: f.height - 16, "text-anchor": "middle" }, plot).textContent =
        k.replace("_overlap", "");
      svg("text", { x: x(i + 0.5), y: (Number.isFinite(v) ? y(v) : y(0)) - 3, "text-anchor": "middle" }, plot)
        .textContent = fmt(v);
    });
    if (Number.isFinite(data.maskAlpha)) {
      const a = y(data.maskAlpha);
      svg("line", { x1: x(0), x2: x(names.length), y1: a, y2: a, class: "opd-baseline" }, plot);
    }
  }

  function angles(parent: Element, r: number, s: number, l: number, m: number) {
    const box = el("div", { className: "opd-mini" }, parent);
    const a = data.angles;
    const step = data.steps[s];
    // The endpoint step at or before the selection that has angles for this matrix.
    let e = -1;
    if (a) {
      for (let i = 0; i < a.steps.length; i++)
        if (a.steps[i] <= step && Number.isFinite(at(a.v, r, i, l, m, 0))) e = i;
    }
    if (!a || e < 0) {
      el("div", { text: "principal angles" }, box);
      el("div", { className: "opd-note", text: "no angles stored at or before this step (endpoint steps only)" }, box);
      return;
    }
    el("div", { text: `principal angles at step ${a.steps[e]}` }, box);
    const k = a.u.shape[4];
    const f = frame(240, 150);
    const root = svg("svg", { width: f.width, height: f.height }, box);
    const prof = (arr: NDArray) => Array.from({ length: k }, (_, i) => at(arr, r, e, l, m, i));
    const pu = prof(a.u);
    const pv = prof(a.v);
    const hi = Math.max(1e-6, ...pu.filter(Number.isFinite), ...pv.filter(Number.isFinite));
    const x = linear(0, Math.max(1, k - 1), f.margin.left, f.width - f.margin.right);
    const y = linear(0, hi, f.height - f.margin.bottom, f.margin.top);
    const plot = axes(root, f, x, y, ticks(0, k - 1, 3).filter(Number.isInteger), ticks(0, hi, 3), { x: "index", y: "degrees" }, fmt);
    const xs = pu.map((_, i) => x(i));
    svg("path", { d: linePath(xs, pu.map(y)), class: "opd-angle-u", fill: "none" }, plot);
    svg("path", { d: linePath(xs, pv.map(y)), class: "opd-angle-v", fill: "none" }, plot);
    const key = el("div", { className: "opd-note" }, box);
    el("span", { className: "opd-key-u", text: "— U (left)  " }, key);
    el("span", { className: "opd-key-v", text: "— V (right)" }, key);
  }

  const redraw = () => {
    drawHeatmaps();
    drawMarks();
    drawTrajectory();
    drawDetail();
  };
  model.on("change:metric", redraw);
  model.on("change:module", redraw);
  model.on("change:scale", redraw);
  model.on("change:selection", () => {
    drawMarks();
    drawDetail();
  });
  scrub.addEventListener("input", () => {
    const s = selection();
    const r = data.runs.indexOf(s.run);
    select({ ...s, step: data.steps[data.runSteps[r][Number(scrub.value)]] });
  });
  root.addEventListener("keydown", (ev) => {
    const next = navigate(data, selection(), ev.key);
    if (!next) return;
    ev.preventDefault();
    select(next);
  });
  const observer = new ResizeObserver(() => drawMarks());
  observer.observe(heat);
  redraw();
  root.dataset.renderMs = (performance.now() - t0).toFixed(1);
  return () => observer.disconnect();
}

export default { render };
