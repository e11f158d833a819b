"""An executed notebook showing an Explorer, exported with the real ``jupyter nbconvert`` CLI: ``--to opd_lens`` gives
a page whose Explorer draws and responds from ``file://`` with every request blocked, as an ``export_html`` page
does; ``--to html`` is left as it was (its widgets load from a CDN)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import test_browser
from nbclient import NotebookClient
from test_browser import ARTIFACTS, _open_offline

from opd_lens import Explorer
from opd_lens.report import export_html

JUPYTER = Path(sys.executable).with_name("jupyter")
STATE = "application/vnd.jupyter.widget-state+json"
browser = test_browser.browser  # the Chromium fixture
pytestmark = getattr(test_browser, "pytestmark", [])  # no Chromium: skipped, as test_browser is


@pytest.fixture(scope="module")
def executed(widget_store, tmp_path_factory) -> Path:
    """A notebook that shows an Explorer of the widget store, executed by nbclient (which saves the widget state)."""
    root = tmp_path_factory.mktemp("export")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Where did the fine-tuning go?"),
        nbformat.v4.new_code_cell(f"import opd_lens\nopd_lens.Explorer({str(widget_store)!r}, module='mlp.down_proj')"),
    ]
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(root)}}).execute()
    models = nb.metadata.widgets[STATE]["state"].values()
    assert any("_esm" in m["state"] for m in models)  # anywidget's front end travels in the saved state
    path = root / "explorer.ipynb"
    nbformat.write(nb, path)
    return path


def nbconvert(notebook: Path, to: str, output: str) -> Path:
    """``jupyter nbconvert --to TO NOTEBOOK`` into the notebook's folder; the page it wrote."""
    cmd = [str(JUPYTER), "nbconvert", "--to", to, "--output", output, str(notebook)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return notebook.with_name(f"{output}.html")


def test_opd_lens_is_an_nbconvert_exporter():
    from nbconvert.exporters import get_exporter

    from opd_lens.nbconvert import OfflineHTMLExporter

    assert get_exporter("opd_lens") is OfflineHTMLExporter, "reinstall opd_lens to register its entry point"


@pytest.fixture(scope="module")
def offline(executed) -> Path:
    return nbconvert(executed, "opd_lens", "offline")


def test_nbconvert_export_draws_and_responds_offline(browser, offline):
    page, guard = _open_offline(browser, offline)
    heat = page.locator("canvas.opd-heat")
    heat.first.wait_for(timeout=60_000)
    assert heat.count() == 2
    title = page.locator(".opd-detail .opd-panel-title")
    assert title.text_content() == "sft · layer 0 · mlp.down_proj · step 30"
    legend = page.locator(".opd-explorer > .opd-legend .opd-legend-title")
    assert legend.text_content() == "stable rank of ΔW [dimensionless]:"
    pixels = heat.first.evaluate("c => c.toDataURL()")
    page.select_option("select[aria-label=metric]", "max_angle_u")
    assert legend.text_content() == "largest principal angle, U side [°]:"
    assert heat.first.evaluate("c => c.toDataURL()") != pixels  # the heatmap was redrawn
    box = page.locator("canvas.opd-heat[data-run='sft']").bounding_box()
    page.mouse.click(box["x"] + 2, box["y"] + box["height"] - 2)  # first step, last layer
    assert title.text_content() == "sft · layer 2 · mlp.down_proj · step 10"
    assert page.locator("h1", has_text="Where did the fine-tuning go?").is_visible()  # the notebook around it
    page.mouse.move(0, 0)
    page.screenshot(path=ARTIFACTS / "nbconvert-explorer.png", full_page=True)
    assert page.locator(".opd-explorer img").count() == 0  # the HTML-named run is text
    assert guard.blocked == [] and guard.errors == [] and guard.dialogs == []
    page.close()


def _rendered(browser, path: Path) -> tuple[str, list[str]]:
    """The Explorer's text outside its pickers, and its metric picker's options, in the page at ``path``."""
    page, guard = _open_offline(browser, path)
    page.locator("canvas.opd-heat").first.wait_for(timeout=60_000)
    root = page.locator(".opd-explorer")
    text = root.evaluate(
        "e => { const c = e.cloneNode(true); c.querySelectorAll('select').forEach(s => s.remove());"
        "return c.textContent; }"
    )
    options = root.locator("select[aria-label=metric] option").all_text_contents()
    assert guard.blocked == [] and guard.errors == []
    page.close()
    return text, options


@pytest.fixture(scope="module")
def reference(browser, widget_store, tmp_path_factory) -> tuple[str, list[str]]:
    """The same Explorer in an ``export_html`` page."""
    path = tmp_path_factory.mktemp("reference") / "report.html"
    return _rendered(browser, export_html([Explorer(widget_store, module="mlp.down_proj")], path))


def test_nbconvert_export_renders_the_explorer_as_export_html_does(browser, offline, reference):
    text, options = _rendered(browser, offline)
    assert text == reference[0] and options == reference[1]  # the picker's order survives nbformat's sorted keys


def test_stock_html_export_is_unchanged(browser, executed):
    """``--to html`` still loads RequireJS and the widget manager from their CDNs: offline its widgets do not draw."""
    path = nbconvert(executed, "html", "stock")
    assert 'define("anywidget"' not in path.read_text(encoding="utf-8")
    page, guard = _open_offline(browser, path)
    assert any(url.startswith("https://unpkg.com/@jupyter-widgets/html-manager@") for url in guard.blocked)
    assert any(url.startswith("https://cdnjs.cloudflare.com/ajax/libs/require.js/") for url in guard.blocked)
    assert page.locator("canvas.opd-heat").count() == 0
    page.close()
