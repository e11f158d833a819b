"""The widgets in a real browser (Debian's Chromium, driven by Playwright): in a real JupyterLab with a live kernel,
and from a self-contained offline HTML file with every network request blocked. Screenshots and measured render
times go to ``build/test-artifacts/``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import numpy as np
import pytest
import xarray as xr
from conftest import DENSE_MODULES, EVIL_NAME

from opd_lens import Explorer, LockMonitor
from opd_lens.report import export_html

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).parents[1] / "build" / "test-artifacts"
if not Path(CHROMIUM).exists():
    # CI installs Chromium (scripts/test.sh), so there a missing browser is a failure, not a skip.
    reason = f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    if os.environ.get("CI"):
        raise RuntimeError(reason)
    pytestmark = pytest.mark.skip(reason=reason)


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"]
        b = p.chromium.launch(executable_path=CHROMIUM, args=args)
        yield b
        b.close()


class Guard:
    """Aborts every request outside ``allowed`` (and records it); records page errors and dialogs (alert())."""

    def __init__(self, page, allowed: tuple[str, ...]):
        self.blocked: list[str] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.route("**/*", self._route)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.allowed = allowed

    def _route(self, route):
        url = route.request.url
        if url.startswith(self.allowed):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A real JupyterLab server on localhost (no token, no update checks, no network)."""
    root = tmp_path_factory.mktemp("lab")
    port = _free_port()
    env = os.environ | {
        "JUPYTER_CONFIG_DIR": str(root / ".jupyter"),
        "JUPYTER_RUNTIME_DIR": str(root / ".runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(root / ".settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(root / ".workspaces"),
    }
    cmd = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
        f"--ServerApp.root_dir={root}", "--IdentityProvider.token=", "--ServerApp.password=",
        "--ServerApp.disable_check_xsrf=True", "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly",
        "--allow-root",
    ]  # fmt: skip
    log = (root / "lab.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"JupyterLab did not start:\n{(root / 'lab.log').read_text()}") from None
            time.sleep(0.5)
    yield url, root
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_explorer_in_jupyterlab_syncs_a_click_to_the_kernel(browser, lab, widget_store):
    url, root = lab
    selection_file = root / "selection.json"
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import json, pathlib, opd_lens\n"
            f"ex = opd_lens.Explorer({str(widget_store)!r}, module='mlp.down_proj')\n"
            f"out = pathlib.Path({str(selection_file)!r})\n"
            "ex.observe(lambda c: out.write_text(json.dumps(c['new'])), 'selection')\n"
            "ex"
        )
    ]
    nbformat.write(nb, root / "explorer.ipynb")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    guard = Guard(page, (url,))
    page.goto(f"{url}/lab/tree/explorer.ipynb")
    page.locator(".jp-Notebook").wait_for(timeout=120_000)
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=120_000)
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).first.click()
    heat = page.locator("canvas.opd-heat")
    try:
        heat.first.wait_for(timeout=int(os.environ.get("T", 120_000)))
    finally:
        page.screenshot(path=ARTIFACTS / "explorer-jupyterlab.png", full_page=True)
        (ARTIFACTS / "lab-page-errors.txt").write_text("\n".join(guard.errors + guard.blocked))
    assert heat.count() == 2
    evil = page.locator(f"canvas.opd-heat[data-run='{EVIL_NAME}']")
    box = evil.bounding_box()
    # Bottom-right cell of the second run: its last layer and last step.
    page.mouse.click(box["x"] + box["width"] * 0.9, box["y"] + box["height"] * 0.9)
    deadline = time.monotonic() + 60
    while not selection_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    page.screenshot(path=ARTIFACTS / "explorer-jupyterlab.png", full_page=True)
    assert json.loads(selection_file.read_text()) == {
        "run": EVIL_NAME, "layer": 2, "module": "mlp.down_proj", "step": 30,
    }  # fmt: skip
    # The HTML-named run shows as text and runs nothing; nothing left localhost.
    assert page.locator(".opd-explorer img").count() == 0
    assert page.locator(".opd-panel figcaption", has_text=EVIL_NAME).first.is_visible()  # a caption, not an <option>
    assert guard.dialogs == [] and guard.blocked == []
    page.close()


def _open_offline(browser, path: Path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    guard = Guard(page, ("file:",))
    page.goto(path.as_uri())
    return page, guard


def test_offline_html_renders_and_stays_interactive_with_the_network_blocked(browser, widget_store, tmp_path):
    ex = Explorer(widget_store, module="mlp.down_proj")
    mon = LockMonitor(widget_store, "sft", sim_band=(0.99, None))
    path = export_html([ex, mon, f"run {EVIL_NAME}"], tmp_path / "report.html")
    page, guard = _open_offline(browser, path)
    page.locator("canvas.opd-heat").first.wait_for(timeout=60_000)
    page.locator(".opd-monitor svg").first.wait_for(timeout=60_000)
    title = page.locator(".opd-detail .opd-panel-title")
    assert title.text_content() == "sft · layer 0 · mlp.down_proj · step 30"  # the first run is selected first
    captions = page.locator(".opd-panel figcaption").all_text_contents()
    assert captions == ["sft", f"{EVIL_NAME}opd"]  # the method only where it is not the run's name
    box = page.locator("canvas.opd-heat[data-run='sft']").bounding_box()
    page.mouse.click(box["x"] + 2, box["y"] + box["height"] - 2)  # first step, last layer
    assert title.text_content() == "sft · layer 2 · mlp.down_proj · step 10"
    page.keyboard.press("ArrowRight")
    assert title.text_content() == "sft · layer 2 · mlp.down_proj · step 20"
    page.select_option("select[aria-label=module]", "mlp.up_proj")  # the detail panel follows the picker
    assert title.text_content() == "sft · layer 2 · mlp.up_proj · step 20"
    page.screenshot(path=ARTIFACTS / "explorer-offline-module.png", full_page=True)
    grid = page.locator("canvas.opd-cells").bounding_box()  # its first column: the first attention matrix
    page.mouse.click(grid["x"] + 2, grid["y"] + 2)
    assert title.text_content() == "sft · layer 0 · self_attn.k_proj · step 20"
    assert page.locator("select[aria-label=module]").input_value() == "self_attn.k_proj"
    assert page.locator(".opd-grid .opd-groups span").all_text_contents() == ["attention", "MLP"]
    page.mouse.move(0, 0)
    page.screenshot(path=ARTIFACTS / "explorer-offline-grid.png", full_page=True)
    assert page.locator(".opd-monitor .opd-status").text_content() == " · ".join(mon.alarms)
    page.screenshot(path=ARTIFACTS / "explorer-offline.png", full_page=True)
    assert guard.blocked == [] and guard.errors == [] and guard.dialogs == []
    assert page.locator("img").count() == 0
    page.close()


def test_channels_across_runs_offline(browser, widget_store, tmp_path):
    """A second run from sft's origin (same planted directions, less of the sparse part): picking "Sim_K to the
    final channel of sft" colours both runs from one origin and leaves the run from another origin blank."""
    import shutil

    from opd_lens import open_store
    from opd_lens.testing import qwen3_config, write_planted_run

    shutil.copytree(widget_store, tmp_path / "store")
    store = open_store(tmp_path / "store", create=False)
    origin, run = write_planted_run(tmp_path / "twin", config=qwen3_config(layers=3, hidden=32, intermediate=64),
                                    steps=(10, 30), scale=0.05, spectrum="planted")  # fmt: skip
    store.add_run("sft-twin", run, origin, method="sft")
    store.compute(progress=False)
    path = export_html([Explorer(store)], tmp_path / "channels.html")
    page, guard = _open_offline(browser, path)
    page.locator("canvas.opd-heat").first.wait_for(timeout=60_000)
    group = page.locator("select[aria-label=metric] optgroup")
    assert group.get_attribute("label") == "channels across runs"
    runs = ["sft", EVIL_NAME, "sft-twin"]
    assert group.locator("option").all_text_contents() == [f"Sim_K to {r}'s final channel" for r in runs]
    _pick(page, "metric", "channel_overlap:sft")
    legend = page.locator(".opd-explorer > .opd-legend .opd-legend-title").text_content()
    assert legend == "Sim_K to sft's final channel [dimensionless]:"
    assert "do the runs share a channel?" in page.locator(".opd-explorer .opd-description").text_content()
    page.mouse.move(0, 0)
    page.screenshot(path=ARTIFACTS / "explorer-channels.png", full_page=True)
    assert guard.blocked == [] and guard.errors == [] and guard.dialogs == []
    page.close()


def test_monitor_draws_red_exactly_the_alarms_it_lists(browser, widget_store, tmp_path):
    # Every stable rank is above 0 and every Sim_K below 1.1, but only the checkpoints from step 20 on alarm.
    mon = LockMonitor(widget_store, "sft", sim_band=(1.1, None), stable_rank_band=(None, 0.0), from_step=20)
    steps = [int(a.split()[-1]) for a in mon.alarms]
    assert steps == [20, 30, 20]  # stable rank at 20 and 30, Sim_K at 20 (the latest is never checked)
    page, guard = _open_offline(browser, export_html([mon], tmp_path / "monitor.html"))
    page.locator(".opd-monitor svg").first.wait_for(timeout=60_000)
    red = page.locator(".opd-monitor circle.opd-alarm title").all_text_contents()
    assert [t.split(":")[0] for t in red] == [f"step {s}" for s in steps]
    for chart in page.locator(".opd-monitor .opd-mini").all():  # step 10 is outside both bands, yet not red
        first = chart.locator("circle").first
        assert first.text_content().startswith("step 10:") and first.get_attribute("class") == "opd-dot"
    page.screenshot(path=ARTIFACTS / "monitor-offline.png", full_page=True)
    assert guard.blocked == [] and guard.errors == [] and guard.dialogs == []
    page.close()


def test_store_report_renders_offline(browser, widget_store, tmp_path):
    from opd_lens import open_store
    from opd_lens.report import store_report

    path = store_report(open_store(widget_store, create=False), tmp_path / "report.html")
    page, guard = _open_offline(browser, path)
    page.locator("canvas.opd-heat").first.wait_for(timeout=60_000)
    assert page.locator("table.dataframe tbody tr").count() == 2
    assert page.locator("body > div.opd-item > svg").count() == 4  # regimes, two trajectories, overlaps
    assert page.locator("select[aria-label=metric]").input_value() == "unchanged_frac"
    legend = page.locator("ul.opd-summary-legend")  # a list below the table, not restyled by the widgets' CSS
    assert legend.evaluate("e => getComputedStyle(e).display") == "block"
    assert legend.locator("li").count() == page.locator("table.opd-summary thead th").count()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= page.viewport_size["width"], width  # nothing wider than the window
    page.screenshot(path=ARTIFACTS / "store-report.png", full_page=True)
    assert guard.blocked == [] and guard.errors == [] and guard.dialogs == []
    page.close()


def _large_dataset(runs=6, steps=300, layers=36, modules=DENSE_MODULES) -> xr.Dataset:
    """A Dataset the size of a real study (random values; the views do not care where numbers come from)."""
    rng = np.random.default_rng(0)
    shape = (runs, steps, layers, len(modules))
    names = ["unchanged_frac", "update_fro", "stable_rank", "hill_alpha", "lock_alignment", "principal_overlap",
             "lowmag_overlap", "max_angle_u", "max_angle_v", "spectral_shift"]  # fmt: skip
    data = {n: (("run", "step", "layer", "module"), rng.random(shape, dtype=np.float32)) for n in names}
    step = np.arange(1, steps + 1) * 10
    return xr.Dataset(
        data,
        coords={
            "run": [f"run-{i}" for i in range(runs)],
            "step": step,
            "layer": np.arange(layers),
            "module": list(modules),
            "progress": (("run", "step"), np.broadcast_to(step / step[-1], (runs, steps))),
            "method": ("run", ["sft", "opd", "rlvr", "opd", "sft", "rlvr"][:runs]),
        },
        attrs={"mask_alpha": 0.5},
    )


def _pick(page, label: str, value: str) -> float:
    """Set the picker ``label`` to ``value`` in the page; the milliseconds the redraw took."""
    return page.evaluate(
        """([label, value]) => {
            const select = document.querySelector(`select[aria-label=${label}]`);
            const t = performance.now();
            select.value = value;
            select.dispatchEvent(new Event("change"));
            return performance.now() - t;
        }""",
        [label, value],
    )


def test_explorer_render_time_at_paper_scale(browser, tmp_path):
    """36 layers × 7 modules × 300 steps × 6 runs, every metric: first render, a metric switch, the mean over
    modules and keyboard steps, measured; the axes stay readable."""
    ds = _large_dataset()
    rng = np.random.default_rng(1)
    channels = xr.DataArray(  # every run against every run's final channel, as final_channel_overlap gives it
        rng.random((ds.sizes["run"], *ds.stable_rank.shape), dtype=np.float32),
        dims=("other", "run", "step", "layer", "module"),
        coords={"other": ds.run.values, **{d: ds[d].values for d in ("run", "step", "layer", "module")}},
        attrs={"lock_k": 16},
    )
    ex = Explorer(ds, channels=channels)
    path = export_html([ex], tmp_path / "large.html")
    page, guard = _open_offline(browser, path)
    t0 = time.monotonic()
    page.locator("canvas.opd-heat").first.wait_for(timeout=120_000)
    load_s = time.monotonic() - t0
    render_ms = float(page.locator(".opd-explorer").get_attribute("data-render-ms"))
    assert page.locator("canvas.opd-heat").count() == 6
    first = page.locator(".opd-panel").first
    assert first.locator(".opd-yaxis span").all_text_contents() == [str(i) for i in range(0, 36, 5)]
    assert first.locator(".opd-xaxis span").all_text_contents() == [str(s) for s in range(500, 3001, 500)]
    assert (
        page.locator(".opd-explorer > .opd-legend .opd-legend-title").text_content()
        == "stable rank of ΔW [dimensionless]:"
    )
    page.screenshot(path=ARTIFACTS / "explorer-paper-scale.png", full_page=True)
    switch_ms = _pick(page, "metric", "max_angle_u")
    assert (
        page.locator(".opd-explorer > .opd-legend .opd-legend-title").text_content()
        == "largest principal angle, U side [°]:"
    )
    channel_ms = _pick(page, "metric", "channel_overlap:run-3")
    assert (
        page.locator(".opd-explorer > .opd-legend .opd-legend-title").text_content()
        == "Sim_K to run-3's final channel [dimensionless]:"
    )
    mean_ms = _pick(page, "module", "")
    step_ms = page.evaluate(
        """() => {
            const root = document.querySelector(".opd-explorer");
            const t = performance.now();
            for (let i = 0; i < 20; i++) root.dispatchEvent(new KeyboardEvent("keydown", {key: "ArrowLeft"}));
            return (performance.now() - t) / 20;
        }"""
    )
    assert page.locator(".opd-detail .opd-panel-title").text_content() == "run-0 · layer 0 · mlp.down_proj · step 2800"
    page.screenshot(path=ARTIFACTS / "explorer-paper-scale-mean.png", full_page=True)
    report = {
        "grid": "6 runs x 300 steps x 36 layers x 7 modules, 10 metrics and 6 cross-run channel overlaps",
        "html_bytes": path.stat().st_size,
        "page_load_s": round(load_s, 2),
        "first_render_ms": render_ms,
        "metric_switch_ms": round(switch_ms, 1),
        "channel_switch_ms": round(channel_ms, 1),
        "mean_over_modules_ms": round(mean_ms, 1),
        "keyboard_step_ms": round(step_ms, 2),
    }
    (ARTIFACTS / "explorer-render-time.json").write_text(json.dumps(report, indent=1))
    print(report)
    assert guard.blocked == [] and guard.errors == []
    page.close()
