// Small SVG building blocks for the line charts (text is always set with textContent, never parsed as HTML).

const NS = "http://www.w3.org/2000/svg";

export function svg<K extends keyof SVGElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | number> = {},
  parent?: Element,
): SVGElementTagNameMap[K] {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  parent?.appendChild(node);
  return node;
}

export function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props: { className?: string; text?: string } = {},
  parent?: Element,
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (props.className) node.className = props.className;
  if (props.text !== undefined) node.textContent = props.text;
  parent?.appendChild(node);
  return node;
}

/** An SVG path through the finite points; gaps where y is NaN. */
export function linePath(xs: ArrayLike<number>, ys: ArrayLike<number>): string {
  let d = "";
  let pen = false;
  for (let i = 0; i < xs.length; i++) {
    if (!Number.isFinite(ys[i]) || !Number.isFinite(xs[i])) {
      pen = false;
      continue;
    }
    d += `${pen ? "L" : "M"}${xs[i].toFixed(1)},${ys[i].toFixed(1)}`;
    pen = true;
  }
  return d;
}

/** A closed band between `lo` and `hi` over the points where both are finite (one polygon per finite run). */
export function bandPath(xs: ArrayLike<number>, lo: ArrayLike<number>, hi: ArrayLike<number>): string {
  let d = "";
  let i = 0;
  while (i < xs.length) {
    while (i < xs.length && !(Number.isFinite(lo[i]) && Number.isFinite(hi[i]))) i++;
    const start = i;
    while (i < xs.length && Number.isFinite(lo[i]) && Number.isFinite(hi[i])) i++;
    if (i > start) {
      const idx = Array.from({ length: i - start }, (_, k) => start + k);
      const top = idx.map((j) => `${xs[j].toFixed(1)},${hi[j].toFixed(1)}`);
      const bottom = idx.reverse().map((j) => `${xs[j].toFixed(1)},${lo[j].toFixed(1)}`);
      d += `M${top.join("L")}L${bottom.join("L")}Z`;
    }
  }
  return d;
}

export interface Frame {
  width: number;
  height: number;
  margin: { top: number; right: number; bottom: number; left: number };
}

/** A frame with room for the tick labels below and on the left. */
export const frame = (width: number, height: number): Frame => ({
  width,
  height,
  margin: { top: 10, right: 10, bottom: 30, left: 52 },
});

/** Axes with round ticks; returns the plot group. */
export function axes(
  root: SVGSVGElement,
  f: Frame,
  x: (v: number) => number,
  y: (v: number) => number,
  xt: number[],
  yt: number[],
  labels: { x: string; y: string },
  fmt: (v: number) => string,
): SVGGElement {
  const g = svg("g", { class: "opd-axes" }, root);
  const { top, left, bottom } = f.margin;
  const x0 = left;
  const y0 = f.height - bottom;
  svg("line", { x1: x0, x2: f.width - f.margin.right, y1: y0, y2: y0 }, g);
  svg("line", { x1: x0, x2: x0, y1: top, y2: y0 }, g);
  for (const t of xt) {
    svg("line", { x1: x(t), x2: x(t), y1: y0, y2: y0 + 4 }, g);
    svg("text", { x: x(t), y: y0 + 15, "text-anchor": "middle" }, g).textContent = fmt(t);
  }
  for (const t of yt) {
    svg("line", { x1: x0 - 4, x2: x0, y1: y(t), y2: y(t) }, g);
    svg("text", { x: x0 - 6, y: y(t) + 3, "text-anchor": "end" }, g).textContent = fmt(t);
  }
  svg("text", { x: (x0 + f.width - f.margin.right) / 2, y: f.height - 2, "text-anchor": "middle" }, g).textContent =
    labels.x;
  const yl = svg("text", { x: 10, y: (top + y0) / 2, "text-anchor": "middle" }, g);
  yl.setAttribute("transform", `rotate(-90 10 ${(top + y0) / 2})`);
  yl.textContent = labels.y;
  return svg("g", { class: "opd-plot" }, root);
}
