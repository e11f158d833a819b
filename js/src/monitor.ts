// The LockMonitor: stable rank and Sim_K to the latest channel per checkpoint of one run, with alarm bands.
import type { RenderProps } from "@anywidget/types";
import { type NDArray, type Wire, decode } from "./codecs";
import { all, onModel } from "./listen";
import { fmt, linear, ticks } from "./scale";
import { axes, bandPath, el, linePath, svg } from "./svg";

interface Series {
  mean: Wire;
  min: Wire;
  max: Wire;
}

type Band = [number | null, number | null];

export interface Model {
  run: string;
  _data: { steps: number[]; stable_rank: Series; lock_alignment: Series; lock_k: number };
  stable_rank_band: Band;
  sim_band: Band;
  from_step: number;
  alarms: string[];
  /** Per series, whether each checkpoint is in alarm: Python's rule, drawn as it says. */
  _in_alarm: { stable_rank: boolean[]; lock_alignment: boolean[] };
}

function chart(
  parent: Element,
  title: string,
  steps: number[],
  s: Record<"mean" | "min" | "max", NDArray>,
  band: Band,
  alarm: boolean[],
) {
  const box = el("div", { className: "opd-mini" }, parent);
  el("div", { className: "opd-panel-title", text: title }, box);
  const f = { width: 360, height: 190, margin: { top: 10, right: 12, bottom: 30, left: 52 } };
  const root = svg("svg", { width: f.width, height: f.height }, box);
  const values = [...s.min.data, ...s.max.data, ...band.filter((b): b is number => b !== null)].filter(Number.isFinite);
  const [lo, hi] = values.length ? [Math.min(...values), Math.max(...values)] : [0, 1];
  const x0 = steps[0] ?? 0;
  const x1 = steps[steps.length - 1] ?? 1;
  const x = linear(x0, x1, f.margin.left, f.width - f.margin.right);
  const y = linear(lo, hi, f.height - f.margin.bottom, f.margin.top);
  const plot = axes(root, f, x, y, ticks(x0, x1, 4), ticks(lo, hi, 4), { x: "step", y: "" }, fmt);
  const top = band[1] ?? hi;
  const bottom = band[0] ?? lo;
  if (band[0] !== null || band[1] !== null) {
    svg("rect", { x: x(x0), width: x(x1) - x(x0), y: y(top), height: Math.max(0, y(bottom) - y(top)), class: "opd-band" }, plot);
  }
  const xs = steps.map(x);
  svg("path", { d: bandPath(xs, Array.from(s.min.data, y), Array.from(s.max.data, y)), class: "opd-range" }, plot);
  svg("path", { d: linePath(xs, Array.from(s.mean.data, y)), class: "opd-line", fill: "none" }, plot);
  steps.forEach((step, i) => {
    const v = s.mean.data[i];
    if (!Number.isFinite(v)) return;
    const dot = svg("circle", { cx: x(step), cy: y(v), r: 3.5, class: alarm[i] ? "opd-dot opd-alarm" : "opd-dot" }, plot);
    svg("title", {}, dot).textContent = `step ${step}: ${fmt(v)} (min ${fmt(s.min.data[i])}, max ${fmt(s.max.data[i])})`;
  });
}

function render({ model, el: host }: RenderProps<Model>) {
  const root = el("div", { className: "opd-lens opd-monitor" }, host);
  const draw = () => {
    root.replaceChildren();
    const d = model.get("_data");
    const series = (s: Series) => ({ mean: decode(s.mean), min: decode(s.min), max: decode(s.max) });
    const head = el("div", { className: "opd-panel-title" }, root);
    el("span", { text: `${model.get("run")}: ` }, head);
    el("span", { text: d.steps.length ? `${d.steps.length} checkpoint(s)` : "waiting for the first checkpoint" }, head);
    const alarms = model.get("alarms");
    const status = el("div", { className: alarms.length ? "opd-status opd-alarm" : "opd-status" }, root);
    status.textContent = alarms.length ? alarms.join(" · ") : "within the bands";
    const row = el("div", { className: "opd-detail-row" }, root);
    const flags = model.get("_in_alarm");
    for (const [name, title, band] of [
      ["stable_rank", "stable rank of ΔW (mean, min–max over matrices)", "stable_rank_band"],
      ["lock_alignment", `Sim_${d.lock_k} to the latest channel`, "sim_band"],
    ] as const)
      chart(row, title, d.steps, series(d[name]), model.get(band), flags[name]);
  };
  const keys = ["_data", "alarms", "_in_alarm", "stable_rank_band", "sim_band", "run"] as const;
  const cleanup = all([...keys.map((key) => onModel(model, `change:${key}`, draw)), () => root.remove()]);
  draw();
  return cleanup;
}

export default { render };
