// The Explorer: small-multiple layer × step heatmaps per run, a trajectory panel, a layer × module grid and a
// detail panel, wired to the model here; each panel lives in ./explorer/.
import type { RenderProps } from "@anywidget/types";
import { controls } from "./explorer/controls";
import { detail } from "./explorer/detail";
import { grid } from "./explorer/grid";
import { heatmaps } from "./explorer/heatmaps";
import { type Model, State } from "./explorer/state";
import { trajectoryPanel } from "./explorer/trajectory";
import { all, onModel } from "./listen";
import { el } from "./svg";

function render({ model, el: host }: RenderProps<Model>) {
  const t0 = performance.now();
  const root = el("div", { className: "opd-lens opd-explorer" }, host);
  root.tabIndex = 0;
  const st = new State(model, root);
  const bar = controls(st, root);
  const heat = heatmaps(st, root, () => traj.draw());
  const lower = el("div", { className: "opd-lower" }, root);
  const traj = trajectoryPanel(st, lower);
  const cells = grid(st, lower);
  const info = detail(st, lower);

  const redraw = () => {
    st.regrid();
    heat.draw();
    traj.draw();
    moved();
  };
  const moved = () => {
    heat.mark();
    bar.follow();
    cells.draw();
    info.draw();
  };
  // A single module on the heatmaps is also the selected matrix's module (the mean over modules keeps it).
  const follow = () => {
    const module = model.get("module");
    if (module && module !== st.selection.module) st.select({ ...st.selection, module });
  };
  const cleanup = all([
    ...["metric", "module", "scale"].map((key) => onModel(model, `change:${key}`, redraw)),
    onModel(model, "change:module", follow),
    onModel(model, "change:selection", moved),
    ...[bar, heat, traj, cells, info].map((p) => p.cleanup),
    () => root.remove(),
  ]);
  redraw();
  root.dataset.renderMs = (performance.now() - t0).toFixed(1);
  return cleanup;
}

export default { render };
