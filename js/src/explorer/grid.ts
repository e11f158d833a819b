// The Explorer's layer × module grid: the selected run at the selected step, one column per projection (an MoE
// projection's experts averaged), grouped by module type, on its own colour scale; a click selects the cell.
import { type Cleanup, all, onDom } from "../listen";
import { colorScale, fmt } from "../scale";
import { el } from "../svg";
import { cellAt, cellCanvas, layerAxis } from "./heatmaps";
import { legend } from "./legend";
import { type State, columns, meanAt, metricName, metricTitle } from "./state";

const COLUMN_WIDTH = 22;
const GRID_HEIGHT = 150;

export function grid(st: State, parent: HTMLElement) {
  const { model, data } = st;
  const cols = columns(data);
  const nL = data.layers.length;
  const nC = cols.length;
  const box = el("div", { className: "opd-grid" }, parent);
  let listeners: Cleanup[] = [];

  function draw() {
    all(listeners)();
    box.replaceChildren();
    const s = st.selection;
    const r = data.runs.indexOf(s.run);
    const si = data.steps.indexOf(s.step);
    const metric = model.get("metric");
    el("div", { className: "opd-panel-title", text: `layer × module: ${s.run} · step ${s.step}` }, box);
    const values = new Float32Array(nL * nC).fill(NaN);
    if (r >= 0 && si >= 0)
      for (let l = 0; l < nL; l++)
        for (let c = 0; c < nC; c++) values[l * nC + c] = meanAt(data.metrics[metric], r, si, l, cols[c].modules);
    const scale = colorScale(values, model.get("scale"));

    const body = el("div", { className: "opd-heat-body" }, box);
    body.style.gridTemplateColumns = `auto 22px ${COLUMN_WIDTH * nC}px`;
    el("div", {}, body); // the group labels above the cells, right of the layer axis
    el("div", {}, body);
    const groups = el("div", { className: "opd-groups" }, body);
    for (const [type, from, n] of runsOf(cols.map((c) => c.type))) {
      const g = el("span", { text: type }, groups);
      g.title = type;
      g.style.left = `calc(${(100 * from) / nC}% + 2px)`; // a gap between neighbouring groups
      g.style.width = `calc(${(100 * n) / nC}% - 4px)`;
    }
    layerAxis(body, data.layers);
    const cells = el("div", { className: "opd-grid-cells" }, body);
    const canvas = cellCanvas(cells, "opd-cells", nC, nL, GRID_HEIGHT, (i) => scale.unit(values[i]));
    const l0 = data.layers.indexOf(s.layer);
    const c0 = cols.findIndex((c) => c.modules.includes(data.modules.indexOf(s.module)));
    if (l0 >= 0 && c0 >= 0) {
      const mark = el("div", { className: "opd-grid-mark" }, cells);
      Object.assign(mark.style, {
        left: `${(100 * c0) / nC}%`,
        width: `${100 / nC}%`,
        top: `${(100 * l0) / nL}%`,
        height: `${100 / nL}%`,
      });
    }
    const names = el("div", { className: "opd-colnames" }, body);
    for (const c of cols) {
      const name = el("span", { text: c.name.split(".").pop() ?? c.name }, names);
      name.title = c.modules.length > 1 ? `${c.name}: mean over ${c.modules.length} experts` : c.name;
    }
    const key = el("div", { className: "opd-legend" }, box);
    legend(key, metricTitle(data, metric), scale);

    listeners = [
      onDom(canvas, "mousemove", (ev) => {
        const [c, l] = cellAt(canvas, ev, nC, nL);
        canvas.title = `layer ${data.layers[l]} · ${cols[c].name}: ${metricName(metric)} = ${fmt(values[l * nC + c])}`;
      }),
      onDom(canvas, "click", (ev) => {
        if (!nC) return;
        const [c, l] = cellAt(canvas, ev, nC, nL);
        const keep = data.modules.indexOf(s.module); // an expert of this column stays selected
        const m = data.modules[cols[c].modules.includes(keep) ? keep : cols[c].modules[0]];
        st.select({ ...s, layer: data.layers[l], module: m });
        if (model.get("module") !== "") {
          model.set("module", m); // the heatmaps follow a single module
          model.save_changes();
        }
      }),
    ];
  }

  return {
    draw,
    cleanup: () => {
      all(listeners)();
      box.remove();
    },
  };
}

/** Runs of equal neighbours: [value, first index, length]. */
function runsOf(xs: string[]): [string, number, number][] {
  const out: [string, number, number][] = [];
  xs.forEach((x, i) => {
    const last = out[out.length - 1];
    if (last && last[0] === x) last[2]++;
    else out.push([x, i, 1]);
  });
  return out;
}
