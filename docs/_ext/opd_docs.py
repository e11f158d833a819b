"""Sphinx additions that render the docs from the code: ``opd-variables`` lists every stored variable from
``opd_lens.schema.VARIABLES`` with the docstring of the function that defines it, and docstrings keep their
mathematical bars (``|W_0|``, ``|cos|``) instead of reading them as reST substitutions."""

from __future__ import annotations

import re

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

from opd_lens.schema import MATRIX_DIMS, VARIABLES

WHEN = {
    "step": "at every checkpoint",
    "endpoint": "at endpoint steps (each run's last by default)",
    "final": "at every checkpoint, against the run's last one (recomputed when a newer checkpoint arrives)",
}
_LITERAL = re.compile(r"(``.+?``)")


def _escape(line: str) -> str:
    """``|x|`` outside inline literals is an absolute value or a set size here, never a reST substitution."""
    return "".join(p if p.startswith("``") else p.replace("|", r"\|") for p in _LITERAL.split(line))


def variable_rst(name: str) -> list[str]:
    """One variable: its name, long name, units, dims, when it is computed, description, NaN rule and formula."""
    v = VARIABLES[name]
    extra = [d for d in v.dims if d not in MATRIX_DIMS]
    dims = "per matrix and step" + (f", over ``{extra[0]}``" if extra else "")
    since = f"; since schema {v.since}" if v.since > 1 else ""
    description = _escape(v.description[0].upper() + v.description[1:])
    lines = [
        f".. rubric:: {v.name} — {v.long_name}",
        "",
        f"{description}. Units ``{v.units}``; {dims}; computed {WHEN[v.when]}{since}.",
        "",
    ]
    if v.comment:
        lines += [f"{_escape(v.comment)}.", ""]
    return lines + [f".. autofunction:: {v.formula}", "   :no-index:", ""]


class Variables(SphinxDirective):
    """``.. opd-variables::`` (inside ``eval-rst``): every variable of the schema, in the schema's order."""

    def run(self) -> list[nodes.Node]:
        rst = [line for name in VARIABLES for line in variable_rst(name)]
        container = nodes.container()
        self.state.nested_parse(StringList(rst, source="opd_lens.schema.VARIABLES"), self.content_offset, container)
        return container.children


def escape_bars(app, what, name, obj, options, lines: list[str]) -> None:
    """Docstrings keep their bars: see :func:`_escape`."""
    lines[:] = [_escape(line) for line in lines]


def setup(app):
    app.add_directive("opd-variables", Variables)
    app.connect("autodoc-process-docstring", escape_bars)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
