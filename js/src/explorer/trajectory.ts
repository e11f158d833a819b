// The Explorer's trajectory panel: per run, the mean over layers against progress, with the min–max band and the
// hovered layer.
import { at } from "../codecs";
import { fmt, linear, runColor, ticks } from "../scale";
import { axes, bandPath, el, frame, linePath, svg } from "../svg";
import { type State, metricName, unitText } from "./state";

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

export function trajectoryPanel(st: State, parent: HTMLElement) {
  const { model, data } = st;
  const box = el("div", { className: "opd-trajectory" }, parent);

  function draw() {
    box.replaceChildren();
    el("div", { className: "opd-panel-title", text: "trajectory: mean over layers, band = min–max" }, box);
    const metric = model.get("metric");
    const f = frame(420, 220);
    const root = svg("svg", { width: f.width, height: f.height, class: "opd-traj-svg" }, box);
    const curves = data.runs.map((_, r) => {
      const steps = data.runSteps[r];
      const xs = steps.map((s) => at(data.progress, r, s));
      return { xs, ...trajectory(st.grids[r], data.layers.length, steps.length) };
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
    const plot = axes(root, f, x, y, ticks(0, 1), ticks(lo, hi), { x: "progress", y: `${metricName(metric)} [${unitText(data.attrs[metric].units)}]` }, fmt);
    curves.forEach((c, r) => {
      const px = c.xs.map(x);
      svg("path", { d: bandPath(px, c.lo.map(y), c.hi.map(y)), fill: runColor(r), "fill-opacity": 0.18 }, plot);
      svg("path", { d: linePath(px, c.mean.map(y)), stroke: runColor(r), fill: "none", "stroke-width": 2 }, plot);
    });
    if (st.hover) {
      const { run: r, layer: l } = st.hover;
      const n = data.runSteps[r].length;
      const ys = Array.from({ length: n }, (_, j) => y(st.grids[r][l * n + j]));
      const path = svg("path", { d: linePath(curves[r].xs.map(x), ys), class: "opd-hover-line" }, plot);
      path.setAttribute("stroke", runColor(r));
      svg("text", { x: f.width - f.margin.right, y: f.margin.top + 10, "text-anchor": "end" }, plot).textContent =
        `${data.runs[r]}, layer ${data.layers[l]}`;
    }
  }
  return { draw, cleanup: () => box.remove() };
}
