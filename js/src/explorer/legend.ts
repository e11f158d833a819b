// A colour legend: the title, the viridis ramp between the scale's ends and the swatch for NaN.
import { type ColorScale, fmt, paint } from "../scale";
import { el } from "../svg";

export function legend(box: HTMLElement, title: string, scale: ColorScale): void {
  box.replaceChildren();
  const log = scale.kind === "log" ? ", log scale" : "";
  el("span", { className: "opd-legend-title", text: `${title}${log}:` }, box);
  el("span", { text: fmt(scale.lo) }, box);
  const bar = el("canvas", { className: "opd-ramp" }, box);
  bar.width = 256;
  bar.height = 1;
  const ctx = bar.getContext("2d");
  if (ctx) {
    const img = ctx.createImageData(256, 1);
    for (let i = 0; i < 256; i++) paint(img.data, 4 * i, i / 255);
    ctx.putImageData(img, 0, 0);
  }
  el("span", { text: fmt(scale.hi) }, box);
  const nan = el("span", { className: "opd-nan", text: "not computed / not applicable" }, box);
  nan.title = "NaN in the Dataset";
}
