"""Sphinx configuration of the opd_lens documentation: MyST pages, the classroom notebooks executed by myst-nb with
their widgets live (served from local files, no CDN), and the API reference from the docstrings.

Build it with ``bash scripts/docs.sh`` (it trains the demo zoo the notebooks run on, if missing)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

import opd_lens  # noqa: E402
from opd_lens.offline import widget_runtime  # noqa: E402

project = "opd_lens"
author = "the opd_lens developers"
copyright = "2026, the opd_lens developers"
release = version = opd_lens.__version__

extensions = ["myst_nb", "sphinx.ext.autodoc", "opd_docs"]
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]
smartquotes = False  # names and formulas keep the characters the code has

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}

html_theme = "pydata_sphinx_theme"
html_title = f"opd_lens {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "header_links_before_dropdown": 3,
    # The notebooks get the whole width: the Explorer lays its heatmaps side by side as in JupyterLab.
    "secondary_sidebar_items": {p: ["page-toc"] for p in ("*", "guide/*", "howto/*", "api/*")} | {"notebooks/*": []},
}
# Only the API reference has pages below a page; elsewhere the navigation bar is all there is, and the page is wider.
html_sidebars = {pattern: [] for pattern in ("*", "guide/*", "howto/*", "notebooks/*")}
html_static_path = ["_static", "_generated"]
html_css_files = ["custom.css"]
html_show_sourcelink = False

# The classroom notebooks, copied from demo_notebooks/ and executed at every build (OPD_LENS_DEMO, OPD_LENS_PRESET
# say where the demo lives and which preset; scripts/docs.sh sets both).
for notebook in sorted((DOCS.parent / "demo_notebooks").glob("*.ipynb")):
    (DOCS / "notebooks").mkdir(exist_ok=True)
    shutil.copyfile(notebook, DOCS / "notebooks" / notebook.name)
nb_execution_mode = os.environ.get("OPD_LENS_DOCS_EXECUTE", "force")
nb_execution_timeout = 1800
nb_execution_raise_on_error = True
nb_merge_streams = True

# The widget manager, RequireJS and anywidget from the package itself, not a CDN: the pages work offline.
(DOCS / "_generated").mkdir(exist_ok=True)
nb_ipywidgets_js = {}
for name, source in widget_runtime().items():
    (DOCS / "_generated" / name).write_text(source, encoding="utf-8")
    nb_ipywidgets_js[name] = {}
