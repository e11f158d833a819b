import { wire, FakeModel } from "./fake";
import monitor, { type Model } from "./monitor";

const series = (mean: number[]) => ({
  mean: wire(mean, [mean.length]),
  min: wire(mean.map((v) => v - 1), [mean.length]),
  max: wire(mean.map((v) => v + 1), [mean.length]),
});

describe("LockMonitor view", () => {
  it("draws both series, marks points out of band and shows the alarms", () => {
    const model = new FakeModel<Model>({
      run: "<b>opd</b>",
      _data: { steps: [10, 20, 30], stable_rank: series([4, 5, 6]), lock_alignment: series([0.5, 0.95, 1]), lock_k: 16 },
      stable_rank_band: [null, null],
      sim_band: [0.9, null],
      from_step: 0,
      alarms: ["Sim_16 0.5 < 0.9 at step 10"],
      _in_alarm: { stable_rank: [false, false, false], lock_alignment: [true, false, false] },
    });
    const host = document.createElement("div");
    monitor.render({ model, el: host } as never);
    expect(host.querySelector("b")).toBeNull();
    expect(host.textContent).toContain("<b>opd</b>: 3 checkpoint(s)");
    expect(host.querySelector(".opd-status")?.textContent).toBe("Sim_16 0.5 < 0.9 at step 10");
    expect(host.querySelectorAll("circle.opd-alarm").length).toBe(1);
    expect(host.querySelectorAll("rect.opd-band").length).toBe(1);
    model.set("alarms", []);
    expect(host.querySelector(".opd-status")?.textContent).toBe("within the bands");
  });
  it("draws red the points Python flags, not every point outside a band", () => {
    const model = new FakeModel<Model>({
      run: "opd",
      _data: { steps: [10, 20, 30], stable_rank: series([4, 5, 6]), lock_alignment: series([0.5, 0.8, 1]), lock_k: 16 },
      stable_rank_band: [null, null],
      sim_band: [0.9, null],
      from_step: 20, // step 10 is outside the band but before from_step
      alarms: ["Sim_16 0.8 < 0.9 at step 20"],
      _in_alarm: { stable_rank: [false, false, false], lock_alignment: [false, true, false] },
    });
    const host = document.createElement("div");
    const cleanup = monitor.render({ model, el: host } as never);
    const red = () => Array.from(host.querySelectorAll("circle.opd-alarm"), (c) => c.textContent?.split(":")[0]);
    expect(red()).toEqual(["step 20"]);
    model.set("_in_alarm", { stable_rank: [false, false, false], lock_alignment: [true, true, false] }); // redrawn as flagged
    expect(red()).toEqual(["step 10", "step 20"]);
    expect(model.listening).toBeGreaterThan(0);
    cleanup();
    expect(model.listening).toBe(0);
    expect(host.childElementCount).toBe(0);
  });
});
