// The Explorer's heatmaps: one layer × step canvas per run on a shared colour scale, its legend, the tooltip and
// the mark on the selected cell.
import { at } from "../codecs";
import { type Cleanup, all, onDom } from "../listen";
import { fmt, ordinalTicks, paint, runColor } from "../scale";
import { el } from "../svg";
import { legend } from "./legend";
import { type State, metricName, metricTitle } from "./state";

const HEAT_HEIGHT = 150;
/** About how many layer and step ticks a heatmap labels (36 layers → every 5th; 300 steps of 10 → every 500). */
const LAYER_TICKS = 7;
const STEP_TICKS = 6;

/** A tick label at `at` (a fraction) along `axis`, from its `side`. */
function tick(axis: HTMLElement, value: number, side: "top" | "left", at: number) {
  el("span", { text: String(value) }, axis).style[side] = `${100 * at}%`;
}

/** The title and thinned tick labels of a layer axis, one row per layer, into a `.opd-heat-body` grid. */
export function layerAxis(body: HTMLElement, layers: number[]): void {
  el("span", { className: "opd-ytitle", text: "layer" }, body);
  const axis = el("div", { className: "opd-yaxis" }, body);
  for (const l of ordinalTicks(layers, LAYER_TICKS)) tick(axis, layers[l], "top", (l + 0.5) / layers.length);
}

/** The (column, row) of the `nx` × `ny` cells of `canvas` under the pointer, clamped to the cells. */
export function cellAt(canvas: HTMLCanvasElement, ev: MouseEvent, nx: number, ny: number): [number, number] {
  const box = canvas.getBoundingClientRect();
  const clamp = (f: number, n: number) => Math.min(n - 1, Math.max(0, Math.floor(f * n)));
  return [clamp((ev.clientX - box.left) / box.width, nx), clamp((ev.clientY - box.top) / box.height, ny)];
}

/** A canvas of `nx` × `ny` cells, one pixel each, drawn `height` px tall; cell i (row-major) gets the colour of
 * `unit(i)` in [0, 1] (NaN: "not computed"). */
export function cellCanvas(
  parent: HTMLElement,
  className: string,
  nx: number,
  ny: number,
  height: number,
  unit: (i: number) => number,
): HTMLCanvasElement {
  const canvas = el("canvas", { className }, parent);
  canvas.width = Math.max(nx, 1);
  canvas.height = ny;
  canvas.style.height = `${height}px`;
  const ctx = canvas.getContext("2d");
  if (ctx && nx) {
    const img = ctx.createImageData(nx, ny);
    for (let i = 0; i < nx * ny; i++) paint(img.data, 4 * i, unit(i));
    ctx.putImageData(img, 0, 0);
  }
  return canvas;
}

/** `onHover` runs when the hovered row (`st.hover`) changes. */
export function heatmaps(st: State, parent: HTMLElement, onHover: () => void) {
  const { model, data, root } = st;
  const description = el("div", { className: "opd-description" }, parent);
  const heat = el("div", { className: "opd-heatmaps" }, parent);
  const legendBox = el("div", { className: "opd-legend" }, parent);
  const tooltip = el("div", { className: "opd-tooltip" }, parent);
  tooltip.hidden = true;
  let canvases: Cleanup[] = []; // the listeners on the canvases drawn last
  const hover = (h: State["hover"]) => {
    st.hover = h;
    onHover();
  };

  function draw() {
    all(canvases)();
    canvases = [];
    tooltip.hidden = true; // it described the cells drawn last
    const metric = model.get("metric");
    description.textContent = data.labels[metric] ?? "";
    heat.replaceChildren();
    const nL = data.layers.length;
    data.runs.forEach((run, r) => {
      const grid = st.grids[r];
      const nS = data.runSteps[r].length;
      const panel = el("figure", { className: "opd-panel" }, heat);
      const title = el("figcaption", {}, panel);
      el("span", { className: "opd-swatch" }, title).style.background = runColor(r);
      el("span", { text: run }, title);
      if (data.methods[r] !== run) el("span", { className: "opd-method", text: data.methods[r] }, title);
      const body = el("div", { className: "opd-heat-body" }, panel);
      layerAxis(body, data.layers);
      const canvas = cellCanvas(body, "opd-heat", nS, nL, HEAT_HEIGHT, (i) => st.scale.unit(grid[i]));
      canvas.dataset.run = run;
      const axis = el("div", { className: "opd-xaxis" }, body);
      const steps = data.runSteps[r].map((k) => data.steps[k]);
      for (const j of ordinalTicks(steps, STEP_TICKS)) tick(axis, steps[j], "left", (j + 0.5) / nS);
      el("div", { className: "opd-xtitle", text: nS ? "step" : "no steps" }, body);
      const mark = el("div", { className: "opd-mark" }, panel);
      mark.dataset.run = run;
      canvases.push(
        onDom(canvas, "mousemove", (ev) => {
          if (!nS) return;
          const [j, l] = cellAt(canvas, ev, nS, nL);
          const s = data.runSteps[r][j];
          tooltip.replaceChildren();
          el("div", { className: "opd-tip-title", text: run }, tooltip);
          for (const line of [
            `layer ${data.layers[l]} · ${model.get("module") || "mean over modules"}`,
            `step ${data.steps[s]} (progress ${fmt(at(data.progress, r, s))})`,
            `${metricName(model.get("metric"))} = ${fmt(grid[l * nS + j])}`,
          ])
            el("div", { text: line }, tooltip);
          tooltip.hidden = false;
          const rootBox = root.getBoundingClientRect();
          tooltip.style.left = `${ev.clientX - rootBox.left + 12}px`;
          tooltip.style.top = `${ev.clientY - rootBox.top + 12}px`;
          if (st.hover?.run !== r || st.hover.layer !== l) hover({ run: r, layer: l });
        }),
        onDom(canvas, "mouseleave", () => {
          tooltip.hidden = true;
          hover(null);
        }),
        onDom(canvas, "click", (ev) => {
          if (!nS) return;
          const [j, l] = cellAt(canvas, ev, nS, nL);
          const mod = model.get("module") || st.selection.module;
          st.select({ run, layer: data.layers[l], module: mod, step: data.steps[data.runSteps[r][j]] });
          root.focus();
        }),
      );
    });
    legend(legendBox, metricTitle(data, metric), st.scale);
  }

  /** Put the mark on the selected cell (hidden on the other runs). */
  function mark() {
    const s = st.selection;
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
  }

  const observer = new ResizeObserver(mark);
  observer.observe(heat);
  const cleanup = () => {
    all(canvases)();
    observer.disconnect();
    for (const e of [description, heat, legendBox, tooltip]) e.remove();
  };
  return { draw, mark, cleanup };
}
