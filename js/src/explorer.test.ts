import { wire, FakeModel } from "./fake";
import explorer from "./explorer";
import { type Model, type Payload, cellValue, columns, decodePayload, grids, navigate } from "./explorer/state";
import { trajectory } from "./explorer/trajectory";

const EVIL = "<img src=x onerror=alert(1)>";

/** 2 runs × 3 steps × 2 layers × 2 modules; run 1 (EVIL) has no checkpoint at the first step. */
function payload(): Payload {
  const n = 2 * 3 * 2 * 2;
  const values = Array.from({ length: n }, (_, i) => i + 1); // v = 1 + C-order index: every cell differs
  const progress = [1 / 3, 2 / 3, 1, NaN, 0.5, 1];
  return {
    runs: ["sft", EVIL],
    methods: ["sft", "opd"],
    steps: [10, 20, 30],
    layers: [0, 1],
    modules: ["mlp.down_proj", "self_attn.q_proj"],
    projections: ["mlp.down_proj", "self_attn.q_proj"],
    types: ["MLP", "attention"],
    progress: wire(progress, [2, 3]),
    metrics: {
      stable_rank: wire(values, [2, 3, 2, 2]),
      principal_overlap: wire(Array(n).fill(0.25), [2, 3, 2, 2]),
      lowmag_overlap: wire(Array(n).fill(0.75), [2, 3, 2, 2]),
    },
    order: ["stable_rank", "principal_overlap", "lowmag_overlap"],
    labels: { stable_rank: "stable rank", principal_overlap: "p", lowmag_overlap: "l" },
    attrs: {
      stable_rank: { long_name: "stable rank of ΔW", units: "1" },
      principal_overlap: { long_name: "p", units: "1" },
      lowmag_overlap: { long_name: "l", units: "degree" },
    },
    angles: { u: wire(Array(2 * 1 * 2 * 2 * 4).fill(3), [2, 1, 2, 2, 4]), v: wire(Array(32).fill(1), [2, 1, 2, 2, 4]), steps: [30] },
    // σ = 5, 4, 3, 2 at steps 20 and 30, then NaN (a matrix smaller than the rank dimension)
    spectrum: { s: wire(Array.from({ length: 2 * 2 * 2 * 2 * 5 }, (_, i) => (i % 5 === 4 ? NaN : 5 - (i % 5))), [2, 2, 2, 2, 5]), steps: [20, 30] },
    mask_alpha: 0.5,
    lock_k: 2,
  };
}

function mount(state: Partial<Model> = {}) {
  const model = new FakeModel<Model>({
    _data: payload(),
    metric: "stable_rank",
    module: "",
    scale: "linear",
    selection: { run: "sft", layer: 0, module: "mlp.down_proj", step: 30 },
    ...state,
  });
  const host = document.createElement("div");
  document.body.replaceChildren(host);
  const cleanup = explorer.render({ model, el: host } as never);
  return { model, host, cleanup };
}

describe("data helpers", () => {
  const d = decodePayload(payload());
  it("keeps the metrics in the payload's order, not its keys' (a saved notebook sorts them)", () => {
    const p = payload();
    p.metrics = Object.fromEntries(Object.entries(p.metrics).sort(([a], [b]) => a.localeCompare(b)));
    expect(Object.keys(decodePayload(p).metrics)).toEqual(["stable_rank", "principal_overlap", "lowmag_overlap"]);
  });
  it("finds each run's steps from progress", () => {
    expect(d.runSteps).toEqual([[0, 1, 2], [1, 2]]);
  });
  it("takes one module or the mean over modules", () => {
    // run 0, step 2, layer 1: C index ((0*3+2)*2+1)*2 = 10 → values 11 and 12
    expect(cellValue(d, "stable_rank", "self_attn.q_proj", 0, 2, 1)).toBe(12);
    expect(cellValue(d, "stable_rank", "", 0, 2, 1)).toBe(11.5);
  });
  it("builds per-run layer × step grids and trajectories", () => {
    const g = grids(d, "stable_rank", "mlp.down_proj");
    expect(Array.from(g[1])).toEqual([17, 21, 19, 23]); // run 1: steps 20, 30; layers 0, 1
    const t = trajectory(g[1], 2, 2);
    expect(Array.from(t.mean)).toEqual([18, 22]);
    expect(Array.from(t.lo)).toEqual([17, 21]);
    expect(Array.from(t.hi)).toEqual([19, 23]);
  });
  it("groups the grid's columns by type, an MoE projection's experts in one column", () => {
    expect(columns(d)).toEqual([
      { name: "self_attn.q_proj", type: "attention", modules: [1] },
      { name: "mlp.down_proj", type: "MLP", modules: [0] },
    ]);
    const moe = {
      ...d,
      modules: ["mlp.experts.0.up_proj", "mlp.experts.1.up_proj", "mlp.gate", "self_attn.o_proj"],
      projections: ["mlp.experts.up_proj", "mlp.experts.up_proj", "mlp.gate", "self_attn.o_proj"],
      types: ["experts", "experts", "MLP", "attention"],
    };
    expect(columns(moe).map((c) => [c.name, c.modules])).toEqual([
      ["self_attn.o_proj", [3]],
      ["mlp.gate", [2]],
      ["mlp.experts.up_proj", [0, 1]],
    ]);
  });
  it("navigates with the arrow keys, clamped, and changes run with PageDown", () => {
    const s = { run: "sft", layer: 0, module: "mlp.down_proj", step: 30 };
    expect(navigate(d, s, "ArrowRight")?.step).toBe(30);
    expect(navigate(d, s, "ArrowLeft")?.step).toBe(20);
    expect(navigate(d, s, "ArrowDown")?.layer).toBe(1);
    expect(navigate(d, s, "ArrowUp")?.layer).toBe(0);
    expect(navigate(d, { ...s, step: 10 }, "PageDown")).toEqual({ ...s, run: EVIL, step: 30 });
    expect(navigate(d, s, "a")).toBeNull();
  });
});

describe("Explorer view", () => {
  it("draws one heatmap per run with the shared colour scale", () => {
    const { host } = mount({ module: "mlp.down_proj" });
    const canvases = host.querySelectorAll<HTMLCanvasElement>("canvas.opd-heat");
    expect(canvases.length).toBe(2);
    expect([canvases[0].width, canvases[0].height, canvases[1].width]).toEqual([3, 2, 2]);
    // The largest value (23, run 1, layer 1, step 30) is the top of the shared scale: viridis yellow.
    const px = canvases[1].getContext("2d")?.getImageData(1, 1, 1, 1).data;
    expect(Array.from(px ?? [])).toEqual([0xfd, 0xe7, 0x25, 255]);
    const smallest = canvases[0].getContext("2d")?.getImageData(0, 0, 1, 1).data;
    expect(Array.from(smallest ?? []).slice(0, 3)).toEqual([0x44, 0x01, 0x54]);
    expect(host.querySelector(".opd-legend")?.textContent).toContain("23");
    expect(host.querySelector(".opd-legend-title")?.textContent).toBe("stable rank of ΔW [dimensionless]:");
    expect(host.querySelector(".opd-traj-svg")?.textContent).toContain("stable_rank [dimensionless]");
  });
  it("shows run names as text, never as HTML", () => {
    const { host } = mount();
    expect(host.querySelector("img")).toBeNull();
    expect(host.textContent).toContain(EVIL);
  });
  it("names each run once, with its method where that differs from the name", () => {
    const { host } = mount();
    const captions = [...host.querySelectorAll(".opd-panel figcaption")].map((c) => c.textContent);
    expect(captions).toEqual(["sft", `${EVIL}opd`]);
  });
  it("a click selects the cell and saves the selection", () => {
    const { host, model } = mount();
    const canvas = host.querySelectorAll<HTMLCanvasElement>("canvas.opd-heat")[1];
    const box = canvas.getBoundingClientRect();
    canvas.dispatchEvent(
      new MouseEvent("click", { clientX: box.left + box.width * 0.75, clientY: box.top + box.height * 0.75, bubbles: true }),
    );
    expect(model.get("selection")).toEqual({ run: EVIL, layer: 1, module: "mlp.down_proj", step: 30 });
    expect(model.saved).toBe(1);
    expect(host.querySelector(".opd-detail .opd-panel-title")?.textContent).toBe(
      `${EVIL} · layer 1 · mlp.down_proj · step 30`,
    );
  });
  it("arrow keys move the selection and the step scrubber follows", () => {
    const { host, model } = mount();
    const root = host.querySelector<HTMLElement>(".opd-explorer");
    root?.dispatchEvent(new KeyboardEvent("keydown", { key: "ArrowLeft", bubbles: true }));
    expect(model.get("selection").step).toBe(20);
    expect(host.querySelector<HTMLInputElement>("input[type=range]")?.value).toBe("1");
  });
  it("the scrubber moves the step", () => {
    const { host, model } = mount();
    const scrub = host.querySelector<HTMLInputElement>("input[type=range]");
    if (!scrub) throw new Error("no scrubber");
    scrub.value = "0";
    scrub.dispatchEvent(new Event("input"));
    expect(model.get("selection").step).toBe(10);
  });
  it("pickers set the model and redraw", () => {
    const { host, model } = mount();
    const select = host.querySelector<HTMLSelectElement>("select[aria-label=module]");
    if (!select) throw new Error("no module picker");
    select.value = "self_attn.q_proj";
    select.dispatchEvent(new Event("change"));
    expect(model.get("module")).toBe("self_attn.q_proj");
    model.set("metric", "principal_overlap");
    expect(host.querySelector(".opd-description")?.textContent).toBe("p");
    model.set("metric", "lowmag_overlap");
    model.set("scale", "log");
    expect(host.querySelector(".opd-legend-title")?.textContent).toBe("l [°], log scale:");
  });
  it("labels the layer and step axes of each heatmap", () => {
    const { host } = mount();
    const [sft, evil] = [...host.querySelectorAll(".opd-panel")];
    const labels = (panel: Element, axis: string) => [...panel.querySelectorAll(`${axis} span`)].map((t) => t.textContent);
    expect(labels(sft, ".opd-yaxis")).toEqual(["0", "1"]);
    expect(labels(sft, ".opd-xaxis")).toEqual(["10", "20", "30"]);
    expect(labels(evil, ".opd-xaxis")).toEqual(["20", "30"]); // its own checkpoints
    expect(sft.querySelector(".opd-xaxis span")?.getAttribute("style")).toContain("left: 16.6");
    expect(sft.querySelector(".opd-ytitle")?.textContent).toBe("layer");
    expect(sft.querySelector(".opd-xtitle")?.textContent).toBe("step");
  });
  it("the detail panel follows the module picker", () => {
    const { host, model } = mount({ module: "mlp.down_proj" });
    const select = host.querySelector<HTMLSelectElement>("select[aria-label=module]");
    if (!select) throw new Error("no module picker");
    select.value = "self_attn.q_proj";
    select.dispatchEvent(new Event("change"));
    expect(model.get("selection").module).toBe("self_attn.q_proj");
    expect(host.querySelector(".opd-detail .opd-panel-title")?.textContent).toBe(
      "sft · layer 0 · self_attn.q_proj · step 30",
    );
    select.value = ""; // the mean over modules keeps the selected matrix
    select.dispatchEvent(new Event("change"));
    expect(model.get("selection").module).toBe("self_attn.q_proj");
  });
  it("the layer × module grid shows the selected run and step, grouped by module type", () => {
    const { host } = mount();
    const grid = host.querySelector(".opd-grid");
    const canvas = grid?.querySelector<HTMLCanvasElement>("canvas.opd-cells");
    if (!grid || !canvas) throw new Error("no grid");
    expect(grid.querySelector(".opd-panel-title")?.textContent).toBe("layer × module: sft · step 30");
    expect([canvas.width, canvas.height]).toEqual([2, 2]);
    // run 0, step 30: v = 9 + 2·layer + module; columns q_proj (module 1), down_proj (module 0); own colour scale.
    const px = (x: number, y: number) => Array.from(canvas.getContext("2d")?.getImageData(x, y, 1, 1).data ?? []);
    expect(px(0, 1)).toEqual([0xfd, 0xe7, 0x25, 255]); // 12: layer 1, q_proj
    expect(px(1, 0).slice(0, 3)).toEqual([0x44, 0x01, 0x54]); // 9: layer 0, down_proj
    expect([...grid.querySelectorAll(".opd-groups span")].map((g) => g.textContent)).toEqual(["attention", "MLP"]);
    expect([...grid.querySelectorAll(".opd-colnames span")].map((g) => g.textContent)).toEqual(["q_proj", "down_proj"]);
    expect(grid.querySelector(".opd-legend")?.textContent).toContain("stable rank of ΔW [dimensionless]:9");
    const mark = grid.querySelector<HTMLElement>(".opd-grid-mark"); // layer 0, down_proj
    expect([mark?.style.left, mark?.style.top]).toEqual(["50%", "0%"]);
  });
  it("a click on the grid selects the layer and module, and the heatmaps follow a single module", () => {
    const { host, model } = mount({ module: "mlp.down_proj" });
    const canvas = host.querySelector<HTMLCanvasElement>(".opd-grid canvas");
    if (!canvas) throw new Error("no grid");
    const box = canvas.getBoundingClientRect();
    canvas.dispatchEvent(
      new MouseEvent("click", { clientX: box.left + box.width * 0.25, clientY: box.top + box.height * 0.75 }),
    );
    expect(model.get("selection")).toEqual({ run: "sft", layer: 1, module: "self_attn.q_proj", step: 30 });
    expect(model.get("module")).toBe("self_attn.q_proj");
    expect(host.querySelector<HTMLSelectElement>("select[aria-label=module]")?.value).toBe("self_attn.q_proj");
  });
  it("groups the module picker by type, the mean over modules last", () => {
    const { host } = mount();
    const select = host.querySelector<HTMLSelectElement>("select[aria-label=module]");
    const groups = [...(select?.querySelectorAll("optgroup") ?? [])].map((g) => [g.label, g.textContent]);
    expect(groups).toEqual([["attention", "self_attn.q_proj"], ["MLP", "mlp.down_proj"]]);
    expect(select?.lastElementChild?.textContent).toBe("mean over modules");
  });
  it("the detail panel shows overlaps against α and the angle profiles", () => {
    const { host } = mount();
    const detail = host.querySelector(".opd-detail");
    expect(detail?.textContent).toContain("random α = 0.5");
    expect(detail?.textContent).toContain("principal angles at step 30");
    expect(detail?.querySelectorAll("path.opd-angle-u").length).toBe(1);
  });
  it("the detail panel draws the update spectrum of the nearest step with one, and K", () => {
    const { host } = mount();
    const box = [...host.querySelectorAll(".opd-detail .opd-mini")].find((b) => b.textContent?.includes("σ_i"));
    expect(box?.textContent).toContain("top singular values σ_i of ΔW at step 30 (dashed: K = 2)");
    expect(box?.querySelectorAll("circle").length).toBe(4); // the NaN is not drawn
    expect(box?.querySelectorAll("line.opd-baseline").length).toBe(1);
    const all = mount({ _data: { ...payload(), lock_k: 5 } }).host;
    expect(all.querySelector(".opd-detail")?.textContent).toContain("at step 30 (all K = 5 of V_K)");
    const early = mount({ selection: { run: "sft", layer: 0, module: "mlp.down_proj", step: 10 } }).host;
    expect(early.querySelector(".opd-detail")?.textContent).toContain("no spectrum stored at or before this step");
  });
  it("steps without angles say so", () => {
    const { host } = mount({ selection: { run: "sft", layer: 0, module: "mlp.down_proj", step: 10 } });
    expect(host.querySelector(".opd-detail")?.textContent).toContain("no angles stored");
  });
  it("hovering shows a tooltip with the value and highlights the layer", () => {
    const { host } = mount({ module: "mlp.down_proj" });
    const canvas = host.querySelectorAll<HTMLCanvasElement>("canvas.opd-heat")[0];
    const box = canvas.getBoundingClientRect();
    canvas.dispatchEvent(new MouseEvent("mousemove", { clientX: box.left + 1, clientY: box.top + 1, bubbles: true }));
    const tip = host.querySelector<HTMLElement>(".opd-tooltip");
    expect(tip?.hidden).toBe(false);
    expect(tip?.textContent).toContain("stable_rank = 1");
    expect(host.querySelector(".opd-hover-line")).not.toBeNull();
  });
  it("its cleanup removes every model listener and what it drew", () => {
    const { host, model, cleanup } = mount();
    const root = host.querySelector<HTMLElement>(".opd-explorer");
    expect(model.listening).toBeGreaterThan(0);
    cleanup();
    expect(model.listening).toBe(0);
    expect(host.childElementCount).toBe(0);
    root?.dispatchEvent(new KeyboardEvent("keydown", { key: "ArrowLeft", bubbles: true }));
    expect(model.get("selection").step).toBe(30);
  });
});
