// Colour and position scales shared by the widgets.

/** Viridis anchors (matplotlib), interpolated linearly into a 256-entry lookup table. */
const VIRIDIS = ["440154", "482878", "3e4a89", "31688e", "26828e", "1f9e89", "35b779", "6ece58", "b5de2b", "fde725"];
export const LUT: Uint8ClampedArray = (() => {
  const rgb = VIRIDIS.map((h) => [0, 2, 4].map((i) => parseInt(h.slice(i, i + 2), 16)));
  const lut = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const x = (i / 255) * (rgb.length - 1);
    const j = Math.min(Math.floor(x), rgb.length - 2);
    const f = x - j;
    for (let c = 0; c < 3; c++) lut[3 * i + c] = Math.round(rgb[j][c] * (1 - f) + rgb[j + 1][c] * f);
  }
  return lut;
})();

/** Tableau-10: one colour per run, in Dataset order (the altair charts use the same order). */
export const RUN_COLORS = [
  "#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac",
];
export const runColor = (i: number): string => RUN_COLORS[i % RUN_COLORS.length];

export type ScaleKind = "linear" | "log";

export interface ColorScale {
  kind: ScaleKind;
  lo: number;
  hi: number;
  /** Position in [0, 1], or NaN for values the scale cannot show (NaN, or ≤ 0 on a log scale). */
  unit(v: number): number;
}

/** A colour scale over the finite values (positive ones for log) of `values`; NaN-only input gives lo = hi = NaN. */
export function colorScale(values: ArrayLike<number>, kind: ScaleKind): ColorScale {
  let lo = Infinity;
  let hi = -Infinity;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (!Number.isFinite(v) || (kind === "log" && v <= 0)) continue;
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  if (lo > hi) return { kind, lo: NaN, hi: NaN, unit: () => NaN };
  const f = kind === "log" ? Math.log10 : (v: number) => v;
  const a = f(lo);
  const span = f(hi) - a;
  const unit = (v: number): number => {
    if (!Number.isFinite(v) || (kind === "log" && v <= 0)) return NaN;
    return span > 0 ? Math.min(1, Math.max(0, (f(v) - a) / span)) : 0.5;
  };
  return { kind, lo, hi, unit };
}

/** Write the RGBA of `unit` (NaN → light grey) into `out` at `offset`. */
export function paint(out: Uint8ClampedArray, offset: number, unit: number): void {
  if (Number.isNaN(unit)) {
    out.set([232, 232, 232, 255], offset);
    return;
  }
  const i = 3 * Math.round(unit * 255);
  out[offset] = LUT[i];
  out[offset + 1] = LUT[i + 1];
  out[offset + 2] = LUT[i + 2];
  out[offset + 3] = 255;
}

/** Compact number formatting for ticks and tooltips. */
export function fmt(v: number): string {
  if (!Number.isFinite(v)) return "n/a";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return Number(v.toPrecision(4)).toString();
}

/** A map from [d0, d1] onto [r0, r1]. */
export function linear(d0: number, d1: number, r0: number, r1: number): (v: number) => number {
  const k = d1 === d0 ? 0 : (r1 - r0) / (d1 - d0);
  return (v) => (d1 === d0 ? (r0 + r1) / 2 : r0 + (v - d0) * k);
}

/** About `n` round tick values covering [lo, hi]. */
export function ticks(lo: number, hi: number, n = 4): number[] {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [];
  if (hi === lo) return [lo];
  const raw = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? raw;
  const out: number[] = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out.length >= 2 ? out : [lo, hi];
}

/** Indices to label on an ordinal axis of ascending `values` (one cell each): the first cell at or past each of
 * about `n` round values, none closer than a `1 / (n + 1)` of the axis to the one before. */
export function ordinalTicks(values: ArrayLike<number>, n: number): number[] {
  const out: number[] = [];
  let i = 0;
  for (const t of ticks(values[0], values[values.length - 1], n).filter(Number.isInteger)) {
    while (i < values.length - 1 && values[i] < t) i++;
    if (!out.length || i - out[out.length - 1] >= values.length / (n + 1)) out.push(i);
  }
  return out;
}
