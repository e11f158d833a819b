// The Explorer's controls: metric, module (grouped by type) and colour pickers, the step scrubber, and keyboard navigation.
import { type Cleanup, all, onDom, onModel } from "../listen";
import { el } from "../svg";
import { CHANNEL_PREFIX, type State, columns, metricName, navigate } from "./state";

export function controls(st: State, parent: HTMLElement) {
  const { model, data } = st;
  const bar = el("div", { className: "opd-controls" }, parent);
  const cleanups: Cleanup[] = [];
  /** A picker of [value, text, group?] options (neighbours with one group share an optgroup). */
  const picker = (label: string, options: [string, string, string?][], key: "metric" | "module" | "scale") => {
    const wrap = el("label", { text: `${label} ` }, bar);
    const select = el("select", {}, wrap);
    select.setAttribute("aria-label", label);
    let group: HTMLOptGroupElement | undefined;
    for (const [value, text, type] of options) {
      if (type && group?.label !== type) {
        group = el("optgroup", {}, select);
        group.label = type;
      }
      const o = el("option", { text }, type ? group : select);
      o.value = value;
    }
    select.value = model.get(key);
    cleanups.push(
      onDom(select, "change", () => {
        model.set(key, select.value as never);
        model.save_changes();
      }),
      onModel(model, `change:${key}`, () => {
        select.value = model.get(key);
      }),
    );
  };
  // Cross-run channel overlaps (metric "channel_overlap:RUN") are grouped under the run whose channel they compare with.
  const metricOption = (m: string): [string, string, string?] =>
    m.startsWith(CHANNEL_PREFIX) ? [m, `${metricName(m)}'s final channel`, "channels across runs"] : [m, m];
  picker("metric", Object.keys(data.metrics).map(metricOption), "metric");
  const byType = columns(data).flatMap((c) =>
    c.modules.map((m): [string, string, string] => [data.modules[m], data.modules[m], c.type]),
  );
  picker("module", [...byType, ["", "mean over modules"]], "module");
  picker("colour", [["linear", "linear"], ["log", "log"]], "scale");
  const scrubLabel = el("label", { text: "step " }, bar);
  const scrub = el("input", {}, scrubLabel);
  scrub.type = "range";
  scrub.setAttribute("aria-label", "step");
  const scrubText = el("span", { className: "opd-step" }, scrubLabel);

  cleanups.push(
    onDom(scrub, "input", () => {
      const s = st.selection;
      const r = data.runs.indexOf(s.run);
      st.select({ ...s, step: data.steps[data.runSteps[r][Number(scrub.value)]] });
    }),
    onDom(st.root, "keydown", (ev) => {
      const next = navigate(data, st.selection, ev.key);
      if (!next) return;
      ev.preventDefault();
      st.select(next);
    }),
  );

  /** Move the scrubber to the selected step of the selected run. */
  const follow = () => {
    const s = st.selection;
    const steps = data.runSteps[data.runs.indexOf(s.run)];
    scrub.min = "0";
    scrub.max = String(Math.max(0, steps.length - 1));
    scrub.value = String(Math.max(0, steps.findIndex((k) => data.steps[k] === s.step)));
    scrubText.textContent = `${s.step} of ${s.run}`;
  };
  return { follow, cleanup: all([...cleanups, () => bar.remove()]) };
}
