// The Explorer's detail panel on the selected matrix and step: its history, its update-mask overlaps, the top
// singular values of its update and its principal-angle profiles.
import { type NDArray, at } from "../codecs";
import { fmt, linear, runColor, ticks } from "../scale";
import { axes, el, frame, linePath, svg } from "../svg";
import { type State, metricName, unitText } from "./state";

export function detail(st: State, parent: HTMLElement) {
  const { model, data } = st;
  const box = el("div", { className: "opd-detail" }, parent);

  function draw() {
    box.replaceChildren();
    const s = st.selection;
    const r = data.runs.indexOf(s.run);
    const l = data.layers.indexOf(s.layer);
    const m = data.modules.indexOf(s.module);
    const si = data.steps.indexOf(s.step);
    el("div", { className: "opd-panel-title", text: `${s.run} · layer ${s.layer} · ${s.module} · step ${s.step}` }, box);
    const row = el("div", { className: "opd-detail-row" }, box);
    if (r < 0 || l < 0 || m < 0 || si < 0) return;
    history(row, r, l, m);
    overlaps(row, r, si, l, m);
    spectrum(row, r, si, l, m);
    angles(row, r, si, l, m);
  }

  function history(parent: Element, r: number, l: number, m: number) {
    const box = el("div", { className: "opd-mini" }, parent);
    const metric = model.get("metric");
    el("div", { text: `${metricName(metric)} [${unitText(data.attrs[metric].units)}] of this matrix over steps` }, box);
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
    const j = xs.indexOf(st.selection.step);
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

  /** The index of the last of `steps` at or before step index `s` whose `finite(i)` holds, or -1. */
  function atOrBefore(steps: number[], s: number, finite: (i: number) => boolean): number {
    let e = -1;
    for (let i = 0; i < steps.length; i++) if (steps[i] <= data.steps[s] && finite(i)) e = i;
    return e;
  }

  function spectrum(parent: Element, r: number, s: number, l: number, m: number) {
    const box = el("div", { className: "opd-mini" }, parent);
    const sp = data.spectrum;
    const e = sp ? atOrBefore(sp.steps, s, (i) => Number.isFinite(at(sp.s, r, i, l, m, 0))) : -1;
    if (!sp || e < 0) {
      el("div", { text: "top singular values of ΔW" }, box);
      el("div", { className: "opd-note", text: "no spectrum stored at or before this step" }, box);
      return;
    }
    const K = data.lockK;
    const n = sp.s.shape[4];
    const note = K > 0 && K < n ? ` (dashed: K = ${K})` : K === n ? ` (all K = ${K} of V_K)` : "";
    el("div", { text: `top singular values σ_i of ΔW at step ${sp.steps[e]}${note}` }, box);
    const values = Array.from({ length: n }, (_, i) => at(sp.s, r, e, l, m, i));
    const finite = values.filter(Number.isFinite);
    const hi = Math.max(1e-12, ...finite);
    const f = frame(240, 150);
    const root = svg("svg", { width: f.width, height: f.height }, box);
    const x = linear(1, Math.max(2, n), f.margin.left, f.width - f.margin.right);
    const y = linear(0, hi, f.height - f.margin.bottom, f.margin.top);
    const xt = ticks(1, n, 4).filter(Number.isInteger);
    const plot = axes(root, f, x, y, xt, ticks(0, hi, 3), { x: "index i", y: "σ_i" }, fmt);
    const shown = values.map((v, i) => [i + 1, v]).filter(([, v]) => Number.isFinite(v));
    svg("path", { d: linePath(shown.map(([i]) => x(i)), shown.map(([, v]) => y(v))), stroke: runColor(r), fill: "none", "stroke-width": 2 }, plot);
    for (const [i, v] of shown) svg("circle", { cx: x(i), cy: y(v), r: 2.5, fill: runColor(r) }, plot);
    if (K > 0 && K < n) {
      const kx = x(K + 0.5);
      svg("line", { x1: kx, x2: kx, y1: y(0), y2: y(hi), class: "opd-baseline" }, plot);
    }
  }

  function angles(parent: Element, r: number, s: number, l: number, m: number) {
    const box = el("div", { className: "opd-mini" }, parent);
    const a = data.angles;
    // The endpoint step at or before the selection that has angles for this matrix (on either side).
    const e = a
      ? atOrBefore(a.steps, s, (i) => Number.isFinite(at(a.v, r, i, l, m, 0)) || Number.isFinite(at(a.u, r, i, l, m, 0)))
      : -1;
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

  return { draw, cleanup: () => box.remove() };
}
