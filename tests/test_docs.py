"""The documentation site as ``scripts/docs.sh`` builds it, on the ci zoo: every page, the API reference from the
docstrings and the classroom notebooks executed at build time; opened from ``file://`` in Chromium with every other
request blocked, the notebooks' widgets draw and respond without a kernel."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_browser import ARTIFACTS, Guard, _pick, browser  # noqa: F401  (browser: the module's Chromium fixture)

from opd_lens.schema import VARIABLES

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (REPO / "demo_notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def site(ci_zoo, tmp_path_factory) -> Path:
    """The built site: ``scripts/docs.sh`` with PRESET=ci on a copy of the session's ci zoo."""
    tmp = tmp_path_factory.mktemp("docs")
    shutil.copytree(ci_zoo[0], tmp / "demo" / "zoo")
    env = {**os.environ, "PRESET": "ci", "DEMO": str(tmp / "demo"), "OUT": str(tmp / "html")}
    res = subprocess.run(["bash", "scripts/docs.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-8000:]
    return tmp / "html"


def open_page(browser, path: Path):  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    guard = Guard(page, ("file:",))
    page.goto(path.as_uri())
    return page, guard


def test_every_page_is_built_and_loads_nothing_from_the_network(site):
    pages = {p.relative_to(site).as_posix() for p in site.rglob("*.html")}
    expected = {"index.html", "concepts.html", "getting-started.html", "api/index.html", "changelog.html"}
    expected |= {f"notebooks/{n}.html" for n in NOTEBOOKS}
    expected |= {f"howto/{n}.html" for n in ("checkpoints", "lora", "moe", "cluster", "trainer-callback")}
    assert expected <= pages, expected - pages
    for name in pages:
        html = (site / name).read_text(encoding="utf-8")
        remote = re.findall(r'<(?:script|link|img)[^>]+(?:src|href)="((?:https?:)?//[^"]+)"', html)
        assert remote == [], (name, remote)


def test_the_api_reference_and_the_variables_come_from_the_code(site):
    api = (site / "api" / "store.html").read_text(encoding="utf-8")
    for anchor in ("opd_lens.open_store", "opd_lens.Store.compute", "opd_lens.Store.dataset", "opd_lens.summarize"):
        assert f'id="{anchor}"' in api, anchor
    diagnostics = (site / "api" / "diagnostics.html").read_text(encoding="utf-8")
    assert 'id="opd_lens.diagnostics.stable_rank"' in diagnostics
    assert "|M ∩ M_upd| / |M_upd|" in text(diagnostics)  # bars are absolute values and set sizes, not substitutions
    concepts = text((site / "concepts.html").read_text(encoding="utf-8"))
    assert "51.6" in concepts  # the paper's numbers
    listed = concepts.split("Every stored variable")[1]
    for name, v in VARIABLES.items():
        assert f"{name} — {v.long_name}" in listed, name


def text(html: str) -> str:
    """The page's text, tags removed and entities of the characters used here decoded."""
    return re.sub(r"<[^>]+>", "", html).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")


def test_the_quickstart_explorer_is_live_offline(browser, site):  # noqa: F811
    page, guard = open_page(browser, site / "notebooks" / "01_quickstart.html")
    page.locator("canvas.opd-heat").first.wait_for(timeout=60_000)
    runs = page.locator("canvas.opd-heat").evaluate_all("cs => cs.map(c => c.dataset.run)")
    assert runs == ["sft", "opd", "rlvr"]
    title = page.locator(".opd-detail .opd-panel-title")
    first = title.text_content()
    assert first.startswith("sft · layer ")
    legend = page.locator(".opd-explorer > .opd-legend .opd-legend-title")
    before = legend.text_content()
    _pick(page, "metric", "stable_rank")  # no kernel: the cube is in the saved widget state
    assert legend.text_content() != before and "stable rank" in legend.text_content()
    heat = page.locator("canvas.opd-heat[data-run='opd']")
    heat.scroll_into_view_if_needed()
    box = heat.bounding_box()
    page.mouse.click(box["x"] + box["width"] - 2, box["y"] + 2)  # opd, last step, first layer
    assert title.text_content().startswith("opd · layer 0 · ") and title.text_content() != first
    page.mouse.move(0, 0)
    page.evaluate("document.querySelector('.bd-header').style.position = 'static'")  # not over the element shot
    page.locator(".opd-explorer").screenshot(path=ARTIFACTS / "docs-quickstart-explorer.png")
    page.screenshot(path=ARTIFACTS / "docs-quickstart.png", full_page=True)
    assert guard.blocked == [] and guard.errors == [] and guard.dialogs == []
    page.close()


def test_every_notebook_page_draws_its_widgets_offline(browser, site):  # noqa: F811
    for name in NOTEBOOKS:
        page, guard = open_page(browser, site / "notebooks" / f"{name}.html")
        views = page.locator('script[type="application/vnd.jupyter.widget-view+json"]').count()
        page.wait_for_function(
            "n => document.querySelectorAll('.widget-subarea, .jupyter-widgets').length >= n", arg=views, timeout=60_000
        )
        assert page.locator(".jupyter-widgets-error-widget, .widget-error").count() == 0, name
        assert guard.blocked == [] and guard.errors == [], (name, guard.blocked, guard.errors)
        page.close()
