import { wire, FakeModel } from "./fake";
import monitor, { type Model, outside } from "./monitor";

const series = (mean: number[]) => ({
  mean: wire(mean, [mean.length]),
  min: wire(mean.map((v) => v - 1), [mean.length]),
  max: wire(mean.map((v) => v + 1), [mean.length]),
});

describe("LockMonitor view", () => {
  it("open band sides never alarm", () => {
    expect(outside(0.5, [0.9, null])).toBe(true);
    expect(outside(5, [null, null])).toBe(false);
    expect(outside(NaN, [0.9, null])).toBe(false);
  });
  it("draws both series, marks points out of band and shows the alarms", () => {
    const model = new FakeModel<Model>({
      run: "<b>opd</b>",
      _data: { steps: [10, 20, 30], stable_rank: series([4, 5, 6]), lock_alignment: series([0.5, 0.95, 1]), lock_k: 16 },
      stable_rank_band: [null, null],
      sim_band: [0.9, null],
      alarms: ["Sim_16 0.5 < 0.9 at step 10"],
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
});
