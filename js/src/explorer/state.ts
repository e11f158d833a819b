// What the Explorer's panels share: the synced model, the decoded payload, the selection and the current grids.
import type { AnyModel } from "@anywidget/types";
import { type NDArray, type Wire, at, decode } from "../codecs";
import { type ColorScale, type ScaleKind, colorScale } from "../scale";

export interface Selection {
  run: string;
  layer: number;
  module: string;
  step: number;
}

/** The metric key prefix of a cross-run channel overlap: "channel_overlap:RUN" is Sim_K to RUN's final channel. */
export const CHANNEL_PREFIX = "channel_overlap:";

/** A metric's short name for axes and tooltips: its key, or "Sim_K to RUN" for a cross-run channel overlap. */
export const metricName = (metric: string): string =>
  metric.startsWith(CHANNEL_PREFIX) ? `Sim_K to ${metric.slice(CHANNEL_PREFIX.length)}` : metric;

/** A variable's CF attributes, as the Dataset holds them. */
export interface Attrs {
  long_name: string;
  units: string;
}

/** A unit as a reader writes it: CF's "1" is dimensionless, "degree" is °. */
export const unitText = (units: string): string =>
  units === "1" ? "dimensionless" : units === "degree" ? "°" : units;

/** A metric's long name and unit, for legends. */
export function metricTitle(d: Data, metric: string): string {
  const { long_name, units } = d.attrs[metric];
  return `${long_name} [${unitText(units)}]`;
}

export interface Payload {
  runs: string[];
  methods: string[];
  steps: number[];
  layers: number[];
  modules: string[];
  /** Per module: its projection (an MoE projection's experts share one) and its type (attention, MLP, …). */
  projections: string[];
  types: string[];
  progress: Wire;
  metrics: Record<string, Wire>;
  /** The metrics in picker order (JSON objects do not keep theirs: nbformat saves widget state with sorted keys). */
  order: string[];
  labels: Record<string, string>;
  attrs: Record<string, Attrs>;
  angles: { u: Wire; v: Wire; steps: number[] } | null;
  /** The top singular values of ΔW (run, step, layer, module, rank) at `steps`. */
  spectrum: { s: Wire; steps: number[] } | null;
  /** null where the Dataset does not say (JSON has no NaN). */
  mask_alpha: number | null;
  lock_k: number;
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
  /** Per module: its projection (an MoE projection's experts share one) and its type (attention, MLP, …). */
  projections: string[];
  types: string[];
  progress: NDArray;
  metrics: Record<string, NDArray>;
  labels: Record<string, string>;
  attrs: Record<string, Attrs>;
  angles: { u: NDArray; v: NDArray; steps: number[] } | null;
  spectrum: { s: NDArray; steps: number[] } | null;
  maskAlpha: number;
  lockK: number;
  /** Per run, the indices into `steps` where the run has a checkpoint. */
  runSteps: number[][];
  /** Every module's index. */
  allModules: number[];
}

export function decodePayload(p: Payload): Data {
  const progress = decode(p.progress);
  const runSteps = p.runs.map((_, r) => p.steps.map((_, s) => s).filter((s) => Number.isFinite(at(progress, r, s))));
  const metrics: Record<string, NDArray> = {};
  for (const k of p.order) metrics[k] = decode(p.metrics[k]);
  const angles = p.angles ? { u: decode(p.angles.u), v: decode(p.angles.v), steps: p.angles.steps } : null;
  const spectrum = p.spectrum ? { s: decode(p.spectrum.s), steps: p.spectrum.steps } : null;
  const allModules = p.modules.map((_, m) => m);
  return {
    ...p,
    progress,
    metrics,
    angles,
    spectrum,
    maskAlpha: p.mask_alpha ?? NaN,
    lockK: p.lock_k,
    runSteps,
    allModules,
  };
}

/** The NaN-skipping mean of a metric cube at (run, step index, layer index) over the module indices `ms`. */
export function meanAt(a: NDArray, r: number, s: number, l: number, ms: ArrayLike<number>): number {
  let sum = 0;
  let n = 0;
  for (let i = 0; i < ms.length; i++) {
    const v = at(a, r, s, l, ms[i]);
    if (Number.isFinite(v)) {
      sum += v;
      n++;
    }
  }
  return n ? sum / n : NaN;
}

/** Values of `metric` for (run, step index, layer index): one module, or the NaN-skipping mean over modules. */
export function cellValue(d: Data, metric: string, module: string, r: number, s: number, l: number): number {
  const a = d.metrics[metric];
  if (module !== "") return at(a, r, s, l, d.modules.indexOf(module));
  return meanAt(a, r, s, l, d.allModules);
}

/** One column of the layer × module grid: a projection, its type and its module indices (an MoE's experts). */
export interface Column {
  name: string;
  type: string;
  modules: number[];
}

const TYPE_ORDER = ["attention", "MLP", "experts", "other"];

/** The grid's columns: one per projection, in module order within each type, the types in `TYPE_ORDER`. */
export function columns(d: Data): Column[] {
  const byName = new Map<string, Column>();
  d.projections.forEach((name, m) => {
    const c = byName.get(name) ?? { name, type: d.types[m], modules: [] };
    c.modules.push(m);
    byName.set(name, c);
  });
  return [...byName.values()].sort((a, b) => TYPE_ORDER.indexOf(a.type) - TYPE_ORDER.indexOf(b.type));
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

/** One Explorer view's state; the panels read it, and the heatmaps set `hover`. */
export class State {
  readonly data: Data;
  /** Per run, the grid of the chosen metric and module (see `grids`), and the colour scale the runs share. */
  grids: Float32Array[] = [];
  scale: ColorScale = colorScale([], "linear");
  /** The heatmap row under the pointer. */
  hover: { run: number; layer: number } | null = null;

  constructor(
    readonly model: AnyModel<Model>,
    readonly root: HTMLElement,
  ) {
    this.data = decodePayload(model.get("_data"));
  }

  /** The selected matrix and step (Python validates it and always sets one). */
  get selection(): Selection {
    return this.model.get("selection");
  }

  select(s: Selection): void {
    this.model.set("selection", s);
    this.model.save_changes();
  }

  /** Recompute the grids and their colour scale for the model's metric, module and scale. */
  regrid(): void {
    this.grids = grids(this.data, this.model.get("metric"), this.model.get("module"));
    const all = new Float32Array(this.grids.reduce((n, g) => n + g.length, 0));
    this.grids.reduce((off, g) => (all.set(g, off), off + g.length), 0);
    this.scale = colorScale(all, this.model.get("scale"));
  }
}
