"""``jupyter nbconvert --to opd_lens NOTEBOOK.ipynb``: the stock HTML export of an executed notebook (the ``lab``
template, as ``--to html`` gives it), with RequireJS, anywidget and the widget manager inlined as in
:func:`~opd_lens.report.export_html` instead of loaded from a CDN, so its widgets draw and respond offline.

The widgets come back from the state that the notebook saved (nbclient and ``jupyter nbconvert --execute`` store it;
in JupyterLab, "Save Widget State Automatically"). MathJax loads from its CDN only where ``mathjax_url`` is set.
"""

from __future__ import annotations

from jinja2 import DictLoader
from nbconvert.exporters import HTMLExporter
from traitlets import Unicode, default

from .offline import offline_runtime

__all__ = ["OfflineHTMLExporter"]

_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{{ resources.opd_lens_require }}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}
{%- if "widgets" in nb.metadata -%}{{ resources.opd_lens_widgets }}{%- endif -%}
{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- if resources.mathjax_url -%}{{ super() }}{%- endif -%}{%- endblock -%}
"""


class OfflineHTMLExporter(HTMLExporter):
    """HTML that needs no network: ``--to html`` with the widget runtime inlined and no MathJax by default."""

    mathjax_url = Unicode("", help="URL to load MathJax from; empty (the default): none, TeX shows as written").tag(
        config=True
    )

    @default("extra_loaders")
    def _extra_loaders_default(self):
        return [DictLoader({"opd_lens.html.j2": _TEMPLATE})]

    @default("template_file")
    def _template_file_default(self):
        return "opd_lens.html.j2"

    def _init_resources(self, resources):
        resources = super()._init_resources(resources)
        resources["opd_lens_require"], resources["opd_lens_widgets"] = offline_runtime()
        return resources
