import { at, decode } from "./codecs";
import { wire } from "./fake";
import { colorScale, fmt, LUT, ordinalTicks, paint, ticks } from "./scale";
import { bandPath, linePath } from "./svg";

describe("decode", () => {
  it("reads C-order arrays with their strides", () => {
    const a = decode(wire([0, 1, 2, 3, 4, 5], [2, 3]));
    expect(a.strides).toEqual([3, 1]);
    expect(at(a, 1, 2)).toBe(5);
    expect(at(a, 0, 1)).toBe(1);
  });
  it("copies unaligned views instead of failing", () => {
    const bytes = new Uint8Array(4 * 3 + 1);
    new DataView(bytes.buffer).setFloat32(1, 2.5, true);
    const a = decode({ view: new DataView(bytes.buffer, 1, 12), dtype: "float32", shape: [3] });
    expect(a.data[0]).toBe(2.5);
  });
  it("rejects a size mismatch and unknown dtypes", () => {
    expect(() => decode(wire([1, 2, 3], [2, 2]))).toThrow(/shape \[2,2\]/);
    expect(() => decode({ ...wire([1], [1]), dtype: "float64" as never })).toThrow(/dtype float64/);
  });
});

describe("colour scale", () => {
  it("maps the finite extent onto [0, 1]", () => {
    const s = colorScale([2, NaN, 4, 3], "linear");
    expect([s.lo, s.hi]).toEqual([2, 4]);
    expect(s.unit(3)).toBeCloseTo(0.5);
    expect(s.unit(NaN)).toBeNaN();
  });
  it("log scales ignore values ≤ 0", () => {
    const s = colorScale([0, 1, 10, 100, -5], "log");
    expect([s.lo, s.hi]).toEqual([1, 100]);
    expect(s.unit(10)).toBeCloseTo(0.5);
    expect(s.unit(0)).toBeNaN();
  });
  it("paints the ends of viridis and NaN as grey", () => {
    const px = new Uint8ClampedArray(12);
    paint(px, 0, 0);
    paint(px, 4, 1);
    paint(px, 8, NaN);
    expect(Array.from(px.slice(0, 3))).toEqual([0x44, 0x01, 0x54]);
    expect(Array.from(px.slice(4, 7))).toEqual(Array.from(LUT.slice(765, 768)));
    expect(Array.from(px.slice(8, 11))).toEqual([232, 232, 232]);
  });
  it("formats and ticks", () => {
    expect(fmt(NaN)).toBe("n/a");
    expect(fmt(0.000123)).toBe("1.23e-4");
    expect(ticks(0, 1)).toEqual([0, 0.25, 0.5, 0.75, 1]);
    expect(ticks(1.001, 1.002, 4)).toEqual([1.001, 1.0015, 1.002]);
    expect(ticks(0, 10, 5)).toEqual([0, 2, 4, 6, 8, 10]);
  });
  it("thins ordinal ticks to round values", () => {
    const layers = Array.from({ length: 36 }, (_, i) => i);
    expect(ordinalTicks(layers, 7)).toEqual([0, 5, 10, 15, 20, 25, 30, 35]);
    const steps = Array.from({ length: 300 }, (_, i) => 10 * (i + 1));
    expect(ordinalTicks(steps, 6).map((i) => steps[i])).toEqual([500, 1000, 1500, 2000, 2500, 3000]);
    expect(ordinalTicks([10, 20, 30], 6)).toEqual([0, 1, 2]);
    expect(ordinalTicks([10, 20, 30, 40, 50, 1000], 4)).toEqual([5]); // irregular: one label, not four on one cell
    expect(ordinalTicks([], 4)).toEqual([]);
  });
});

describe("paths", () => {
  it("break lines at NaN and close bands per finite stretch", () => {
    expect(linePath([0, 1, 2, 3], [0, NaN, 2, 3])).toBe("M0.0,0.0M2.0,2.0L3.0,3.0");
    expect(bandPath([0, 1], [0, 0], [1, 1])).toBe("M0.0,1.0L1.0,1.0L1.0,0.0L0.0,0.0Z");
  });
});
