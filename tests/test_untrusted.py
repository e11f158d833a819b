"""Untrusted stores and reports: opening a store, or a report, that someone else made runs no code and injects no
markup.

One real store is built; each case rewrites its JSON attributes on disk as an attacker would (the group's schema
version, settings and run registry in ``data.zarr/zarr.json``, and the attributes of its arrays), with hypothesis.
Every read a user makes (``Store.dataset``, :func:`opd_lens.summarize` and its renderings, the Explorer,
``export_html``, ``opd-lens summary`` and ``report``) then works, or raises opd_lens's own error naming the store in
one line. Pages built from stores that carry markup in every string they show are loaded in headless Chromium with
the network blocked: no dialog, no injected element or script, no page or console error, and each payload shows as
text. Screenshots go to ``build/test-artifacts/``."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_browser import ARTIFACTS, browser  # noqa: F401  (browser: the module's Chromium fixture)

from opd_lens import open_store
from opd_lens.diagnostics import Settings
from opd_lens.errors import ChartError, OpdLensError, StoreError
from opd_lens.locking import final_channel_overlap
from opd_lens.offline import widget_runtime
from opd_lens.report import export_html, store_report
from opd_lens.summary import Summary, summarize
from opd_lens.testing import qwen3_config, write_planted_run
from opd_lens.widgets import Explorer

PWN = "window.__pwned=1;alert(1)"
PAYLOADS = (
    f"<script>{PWN}</script>",
    f'<img src=x onerror="{PWN}">',
    f"</script><script>{PWN}</script>",
    "<!--<script>",
    f"javascript:{PWN}",
    f'"><svg onload="{PWN}">',
    "{{constructor.constructor('window.__pwned=1')()}}",
    "${window.__pwned=1}<%= 7*7 %>",
    "a\u2028b\u2029</title><style>*{display:none}</style>",
    "nul\x00byte",
    "lone \ud800 surrogate",
    "Ω≈ç 💥 \u202eevil\u200b",
    "&lt;b&gt; &amp; &#60;",
)
"""Markup, script, template syntax and odd characters, to put where the store keeps a string."""
RUN = f'</script><img src=x onerror="{PWN}">{{{{7*7}}}}'
"""The second run's name in the store (the first is ``sft``)."""
STEPS = (1, 2)
LONG = "A" * 100_000 + PAYLOADS[1]
HUGE = "@HUGE"
"""Stands for an integer of 5000 digits, beyond what Python's ``json`` reads."""
TRAPS = {
    "text": {"log_history": [{"step": 2, "eval_accuracy": PAYLOADS[0]}]},
    "nested": {"log_history": [{"step": 2, "eval_accuracy": {"a": [1]}}]},
    "history": {"log_history": 5},
    "list": [1, 2],
    "huge": {"log_history": [{"step": 2, "eval_accuracy": 1e308}]},
}
"""Checkpoint folders a forged registry may point to: their ``trainer_state.json`` (``fifo``: a named pipe)."""
ARRAYS = ("run", "step", "layer", "module", "complete", "lock_ref", "numel", "stable_rank", "angles_u", "angle_index")
CF = ("_FillValue", "units", "calendar", "scale_factor", "add_offset", "missing_value", "coordinates", "dtype",
      "_Encoding", "long_name", "description")  # fmt: skip
"""Attribute names that xarray's CF decoding (or the Explorer) reads."""
CF_VALUES = ("days since 2000-01-01", "seconds since 1970-01-01", "noleap", "bool", "S1", "utf-8", "step layer bogus")
EXAMPLES = int(os.environ.get("OPD_LENS_UNTRUSTED_EXAMPLES", "160"))
"""Cases of forged group attributes (and a quarter as many of forged array attributes)."""
CASES = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def _paths() -> list[tuple[str, ...]]:
    """Every key of the store's attributes, as a path from the group's ``attributes``."""
    paths = [(k,) for k in ("schema_version", "opd_lens_version", "home", "settings", "runs")]
    paths += [("settings", k) for k in Settings().asdict()]
    for name in ("sft", RUN):
        run = ("runs", name)
        fields = ("run_dir", "origin", "method", "include_globals", "origin_fingerprint", "checkpoints")
        paths += [run, *((*run, k) for k in fields)]
        for step in map(str, STEPS):
            entry = (*run, "checkpoints", step)
            paths += [entry, *((*entry, k) for k in ("path", "fingerprint", "schema", "endpoint", "lock_ref"))]
    return paths


PATHS = _paths()
markup = st.sampled_from(PAYLOADS)
texts = st.one_of(
    markup,
    st.text(max_size=12),
    st.tuples(st.text(max_size=4), markup, st.text(max_size=4)).map("".join),
    st.just(LONG),
    st.sampled_from([f"@TRAP:{t}" for t in (*TRAPS, "fifo")]),
)
numbers = st.one_of(
    st.integers(), st.floats(), st.sampled_from([2**63, -(2**70), 10**30, HUGE, 0.5, 1, 3, 0])
)  # floats: NaN and ±Infinity too, written as non-standard JSON
values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, texts),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.one_of(markup, st.text(max_size=6)), inner, max_size=3)
    ),
    max_leaves=6,
)


@dataclass(frozen=True)
class Mutation:
    """``set`` the value at ``path``, ``drop`` it, or ``add`` an extra ``key`` to the object there."""

    op: str
    path: tuple[str, ...]
    value: object = None
    key: str = ""

    def apply(self, doc: dict) -> None:
        """Apply to a ``zarr.json`` document; a path that an earlier mutation removed is left alone."""
        node, keys = doc, ("attributes", *self.path)
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return
        if self.op == "set":
            node[keys[-1]] = self.value
        elif self.op == "drop":
            node.pop(keys[-1], None)
        elif isinstance(node.get(keys[-1]), dict):
            node[keys[-1]][self.key] = self.value


TEXT_KEYS = ("run_dir", "origin", "method", "origin_fingerprint", "path", "fingerprint", "home", "opd_lens_version")
NUMBER_KEYS = (
    *(k for k, v in Settings().asdict().items() if type(v) is not bool),
    "schema_version",
    "schema",
    "lock_ref",
)
mutations = st.one_of(
    st.builds(
        Mutation,
        op=st.sampled_from(["set", "set", "drop", "add"]),
        path=st.sampled_from([(), *PATHS]),
        value=values,
        key=st.one_of(markup, st.sampled_from(["evil", "__proto__", "constructor"]), st.text(max_size=6)),
    ),
    # the type the store writes, an attacker's value: these reach the pages
    st.builds(Mutation, op=st.just("set"), path=st.sampled_from([p for p in PATHS if p[-1] in TEXT_KEYS]), value=texts),
    st.builds(
        Mutation, op=st.just("set"), path=st.sampled_from([p for p in PATHS if p[-1] in NUMBER_KEYS]), value=numbers
    ),
)
array_attrs = st.dictionaries(
    st.sampled_from(ARRAYS),
    st.dictionaries(
        st.one_of(st.sampled_from(CF), st.text(max_size=6)),
        st.one_of(values, st.sampled_from(CF_VALUES)),
        min_size=1,
        max_size=3,
    ),
    min_size=1,
    max_size=2,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A real store of two planted runs, ``sft`` and :data:`RUN`, angles at every step, sft logging a held-out
    accuracy; beside it the checkpoint folders of :data:`TRAPS`."""
    root = tmp_path_factory.mktemp("untrusted")
    config = qwen3_config(layers=2, hidden=16, intermediate=32)
    store = open_store(root / "store", Settings(angle_k=4, mask_rank=2, lock_k=2, hill_k=2))
    for seed, (name, method) in enumerate([("sft", "sft"), (RUN, "opd")]):
        origin, run = write_planted_run(root / f"run{seed}", config=config, steps=STEPS, seed=seed)
        store.add_run(name, run, origin, method=method)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    store.compute(progress=False, endpoint="all")
    torch.set_num_threads(n)
    state = {"global_step": 2, "log_history": [{"step": 2, "eval_accuracy": 0.75}]}
    (root / "run0" / "run" / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(state))
    for name, doc in TRAPS.items():
        (root / "traps" / name).mkdir(parents=True)
        (root / "traps" / name / "trainer_state.json").write_text(json.dumps(doc))
    (root / "traps" / "fifo").mkdir()
    os.mkfifo(root / "traps" / "fifo" / "trainer_state.json")  # reading it would block
    return root / "store"


class Forger:
    """One working copy of the pristine store whose metadata each case rewrites (and :meth:`restore` puts back)."""

    def __init__(self, pristine: Path, where: Path):
        self.path = where
        if not where.exists():
            shutil.copytree(pristine, where)
        self.metadata = {p: p.read_bytes() for p in (where / "data.zarr").rglob("zarr.json")}
        self.traps = {f"@TRAP:{p.name}": str(p) for p in (pristine.parent / "traps").iterdir()}

    def forge(self, group: Iterable[Mutation] = (), arrays: dict[str, dict] | None = None) -> None:
        """Rewrite the group's attributes by ``group`` and set the attributes of ``arrays`` (name -> attributes)."""
        meta = self.path / "data.zarr" / "zarr.json"
        doc = json.loads(meta.read_text())
        for m in group:
            m.apply(doc)
        self._write(meta, doc)
        for name, attrs in (arrays or {}).items():
            meta = self.path / "data.zarr" / name / "zarr.json"
            self._write(meta, json.loads(meta.read_text()) | {"attributes": attrs})

    def _write(self, meta: Path, doc: dict) -> None:
        text = json.dumps(doc, allow_nan=True)  # NaN and Infinity as bare words, as Python's json reads them
        for token, path in self.traps.items():
            text = text.replace(json.dumps(token), json.dumps(path))
        meta.write_text(text.replace(json.dumps(HUGE), "1" + "0" * 5000))

    def restore(self) -> None:
        for path, data in self.metadata.items():
            path.write_bytes(data)


@pytest.fixture(scope="module")
def forger(pristine, tmp_path_factory) -> Forger:
    yield Forger(pristine, tmp_path_factory.mktemp("forged") / "store")
    print("forged stores:", dict(tally))


def _files(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


class Page(HTMLParser):
    """What a page holds: tags, event-handler attributes, scripts (type, text) and the text of table cells."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: Counter = Counter()
        self.handlers: list[str] = []
        self.scripts: list[list] = []
        self.cells: list[str] = []
        self._open = ""
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        self.handlers += [f"<{tag} {k}>" for k, v in attrs if k.startswith("on") or (v or "").startswith("javascript:")]
        self._open = tag
        if tag == "script":
            self.scripts.append([dict(attrs).get("type"), ""])
        elif tag in ("th", "td"):
            self.cells.append("")

    def handle_endtag(self, tag):
        self._open = ""

    def handle_data(self, data):
        if self._open == "script":
            self.scripts[-1][1] += data
        elif self._open in ("th", "td"):
            self.cells[-1] += data


PAGE_TAGS = {"html", "head", "meta", "title", "style", "script", "body", "h1", "p", "div", "table", "thead", "tbody",
             "tr", "th", "td", "ul", "li"}  # fmt: skip
STATE, VIEW = "application/vnd.jupyter.widget-state+json", "application/vnd.jupyter.widget-view+json"


def check_page(html: str, ds: xr.Dataset) -> None:
    """The offline page of a summary and an Explorer: only the page's own elements and scripts, no event handler,
    JSON that cannot end or comment out its <script>, and every run name and method label as a table cell."""
    page = Page(html)
    assert set(page.tags) <= PAGE_TAGS, set(page.tags) - PAGE_TAGS
    assert page.handlers == []
    assert [t for t, _ in page.scripts] == [None] * len(widget_runtime()) + [STATE, VIEW]
    for _, text in page.scripts[-2:]:
        assert "<" not in text
        json.loads(text, parse_constant=_not_json)  # the browser's JSON.parse knows no NaN
    for s in [*map(str, ds.run.values), *map(str, ds.method.values)]:
        assert s in page.cells, s[:80]


def _not_json(token: str):
    raise ValueError(f"{token} is not JSON")


def show(path: Path, out: Path) -> xr.Dataset | None:
    """Every read of the store at ``path`` that a user makes, its offline page written to ``out`` and checked; the
    Dataset, or None when opd_lens refused the store with its own error: one short line that names the store."""
    try:
        store = open_store(path, create=False)
        repr(store)
        ds = store.dataset()
        summary = Summary.of(ds)
        summary.text(), summary.markdown()
        export_html([summary, Explorer(ds), f"{path}: {list(summary.table.index)}"], out)
    except OpdLensError as e:
        message = str(e)
        assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 600, message
        return None
    check_page(out.read_text(encoding="utf-8"), ds)
    return ds


tally: Counter = Counter()


@settings(CASES, max_examples=EXAMPLES)
@given(case=st.lists(mutations, min_size=1, max_size=3))
def test_forged_group_attributes(forger, tmp_path_factory, case):
    _run_case(forger, tmp_path_factory, case, None)


@settings(CASES, max_examples=EXAMPLES // 4)
@given(arrays=array_attrs, case=st.lists(mutations, max_size=1))
def test_forged_array_attributes(forger, tmp_path_factory, arrays, case):
    _run_case(forger, tmp_path_factory, case, arrays)


def _run_case(forger: Forger, tmp_path_factory, case, arrays) -> None:
    forger.forge(case, arrays)
    before = _files(forger.path)
    try:
        ds = show(forger.path, tmp_path_factory.getbasetemp() / "page.html")
        tally["shown" if ds is not None else "refused"] += 1
        assert _files(forger.path) == before, "reading the store wrote to it"
    finally:
        forger.restore()


# --- regressions: each was a raw exception (or a broken page) before ------------------------------------------------


def _forged(forger: Forger, *group: Mutation, arrays: dict | None = None) -> Path:
    forger.restore()
    forger.forge(list(group), arrays)
    return forger.path


def _refused(forger: Forger, *group: Mutation, arrays: dict | None = None) -> str:
    """The store forged by ``group`` (and ``arrays``; none: as it is) is refused with a StoreError naming it: its
    message."""
    path = _forged(forger, *group, arrays=arrays) if group or arrays else forger.path
    try:
        with pytest.raises(StoreError) as e:
            open_store(path, create=False).dataset()
    finally:
        forger.restore()
    assert str(e.value).startswith(f"{path}: ")
    return str(e.value)


def test_settings_of_the_wrong_type_or_unknown_are_refused(forger):
    """Were a TypeError (an unknown key), a ValueError from Settings (lock_k "2") or, later, from the summary's legend
    (mask_alpha "<b>")."""
    assert 'setting "evil" of data.zarr is unknown' in _refused(forger, Mutation("add", ("settings",), 1, "evil"))
    assert 'setting "mask_alpha" of data.zarr is "<b>", not a number' in _refused(
        forger, Mutation("set", ("settings", "mask_alpha"), "<b>")
    )
    assert 'setting "lock_k" of data.zarr is "2", not a number' in _refused(
        forger, Mutation("set", ("settings", "lock_k"), "2")
    )
    assert 'setting "exact" of data.zarr is "yes", not a boolean' in _refused(
        forger, Mutation("set", ("settings", "exact"), "yes")
    )
    assert "angle_k: k must be" in _refused(forger, Mutation("set", ("settings", "angle_k"), -1))


def test_a_missing_attribute_is_refused(forger):
    """Were a KeyError."""
    for key in ("settings", "runs", "schema_version"):
        assert f"data.zarr has no attribute {key!r}" in _refused(forger, Mutation("drop", (key,)))


def test_a_schema_version_that_is_no_integer_is_refused_as_such(forger):
    """Was "written by a newer opd_lens (schema 4, this is 4)" for "4"; true passed as schema 1."""
    for value, kind in (("4", "a string"), (3.0, "a number"), (True, "a boolean")):
        message = _refused(forger, Mutation("set", ("schema_version",), value))
        assert f"attribute 'schema_version' of data.zarr is {kind}, not an integer" in message


@pytest.mark.parametrize(
    ("mutation", "wrong"),
    [
        (Mutation("set", ("runs", "sft"), None), 'run "sft" in the registry of data.zarr is null, not an object'),
        (Mutation("set", ("runs", "sft"), "<script>"), 'run "sft" in the registry of data.zarr is a string'),
        (Mutation("drop", ("runs", "sft", "method")), "run \"sft\" in the registry of data.zarr has no 'method'"),
        (Mutation("set", ("runs", "sft", "method"), json.loads("[" * 99 + "]" * 99)), "has 'method' = [[[[[[[["),
        (Mutation("set", ("runs", "sft", "run_dir"), 3), "has 'run_dir' = 3, not a string"),
        (Mutation("drop", ("runs", RUN, "origin_fingerprint")), "has no 'origin_fingerprint'"),
        (Mutation("set", ("runs", "sft", "checkpoints"), []), "has 'checkpoints' = [], not an object"),
        (Mutation("set", ("runs", "sft", "checkpoints", "2", "path"), 12), 'checkpoint "2" of run "sft"'),
        (Mutation("drop", ("runs", "sft", "checkpoints", "2", "path")), "has no 'path'"),
        (Mutation("add", ("runs", "sft", "checkpoints"), {}, "x<b>"), 'checkpoint "x<b>" of run "sft" in the regis'),
        (Mutation("set", ("runs", "sft", "method"), "a\ud800b"), "has 'method' = \"a\\ud800b\", not valid Unicode"),
        (Mutation("add", ("runs", "sft", "checkpoints"), {}, LONG), 'checkpoint "AAAAA'),
    ],
)
def test_registry_entries_not_as_the_store_writes_them_are_refused(forger, mutation, wrong):
    """Were a TypeError, KeyError or AttributeError in Store.runs, the summary or the Explorer (a nested method: a
    ValueError from xarray; a lone surrogate: a UnicodeEncodeError printing the table, a ValueError writing the
    report). A megabyte string is cut short in the message."""
    message = _refused(forger, mutation)
    assert wrong in message and "damaged opd_lens store" in message
    assert len(message) < 300


def test_cf_attributes_of_arrays_are_not_decoded(forger, tmp_path):
    """A time unit on ``step`` was a UFuncTypeError, a string scale_factor or _Encoding an xarray error: the store
    writes no CF attributes, so none is decoded; a _FillValue (which xarray always decodes) is refused, where it was
    a TypeError or "a writer was interrupted"."""
    forged = {"step": {"units": "days since 2000-01-01"}, "stable_rank": {"scale_factor": "<b>", "add_offset": 1},
              "module": {"_Encoding": "utf-8", "dtype": "S1"}}  # fmt: skip
    clean = open_store(forger.path, create=False).dataset()
    path = _forged(forger, arrays=forged)
    try:
        ds = show(path, tmp_path / "page.html")
        xr.testing.assert_identical(ds.drop_attrs(deep=True), clean.drop_attrs(deep=True))
    finally:
        forger.restore()
    for name in ("step", "run", "stable_rank"):
        message = _refused(forger, arrays={name: {"_FillValue": "x"}})
        assert f"array {name} of data.zarr has a _FillValue attribute" in message


def test_array_metadata_that_zarr_cannot_read_is_refused(forger):
    """An integer of 5000 digits in an array's attributes, or its zarr.json cut short: zarr's ValueError escaped
    (for ``complete``, read first) or read as "arrays disagree in size" after a second of retries."""
    for name in ("complete", "run", "stable_rank"):
        message = _refused(forger, arrays={name: {"n": HUGE}})
        assert f"array {name} of data.zarr cannot be read (ValueError: Exceeds the limit" in message
    meta = forger.path / "data.zarr" / "step" / "zarr.json"
    meta.write_text(meta.read_text()[:100])
    assert "array step of data.zarr cannot be read (" in _refused(forger)


def test_a_logged_accuracy_that_is_no_number_is_left_out(forger, tmp_path):
    """A trainer_state.json whose eval_accuracy is text (a ValueError) or whose log_history is a number (a
    TypeError) gives no accuracy; a named pipe in its place is not read (it would block)."""
    for trap in ("text", "nested", "history", "list", "fifo"):
        path = _forged(forger, Mutation("set", ("runs", "sft", "checkpoints", "2", "path"), f"@TRAP:{trap}"))
        try:
            table = summarize(open_store(path, create=False).dataset())
        finally:
            forger.restore()
        assert "accuracy_pct" not in table.columns, trap
    assert summarize(open_store(forger.path, create=False).dataset()).loc["sft", "accuracy_pct"] == 75.0


def test_widget_state_cannot_open_a_script_comment(forger, tmp_path):
    """A method label "<!--<script>" made the page's widget-state <script> run on past its end tag, swallowing the
    body (nothing rendered): its JSON now holds no "<" at all."""
    path = _forged(forger, Mutation("set", ("runs", RUN, "method"), "<!--<script>"))
    try:
        ds = show(path, tmp_path / "page.html")
    finally:
        forger.restore()
    assert "<!--<script>" in list(ds.method.values)


# --- the command line: real subprocesses, run at once ------------------------------------------------------------


@dataclass(frozen=True)
class Forgery:
    """A forged copy of the store: group mutations, runs renamed (old -> new, in the registry and the ``run`` array),
    modules renamed (old -> new, in the ``module`` array), in a folder of its own name."""

    name: str
    group: tuple[Mutation, ...] = ()
    runs: tuple[tuple[str, str], ...] = ()
    modules: tuple[tuple[str, str], ...] = ()
    folder: str = "store"

    def make(self, pristine: Path, root: Path) -> Path:
        path = root / self.name / self.folder
        shutil.copytree(pristine, path)
        forger = Forger(pristine, path)
        renames = [Mutation("set", ("runs", new), _registry(pristine)[old]) for old, new in self.runs]
        forger.forge([*(Mutation("drop", ("runs", old)) for old, _ in self.runs), *renames, *self.group])
        for dim, renamed in (("run", dict(self.runs)), ("module", dict(self.modules))):
            if renamed:
                coord = zarr.open_array(path / "data.zarr" / dim, mode="r+")
                coord[:] = [renamed.get(str(v), str(v)) for v in coord[:]]
        return path


def _registry(store: Path) -> dict:
    return json.loads((store / "data.zarr" / "zarr.json").read_text())["attributes"]["runs"]


def _set(*path_and_value) -> Mutation:
    *path, value = path_and_value
    return Mutation("set", tuple(path), value)


MARKED = Forgery("marked", (_set("runs", "sft", "method", PAYLOADS[0]), _set("runs", RUN, "method", PAYLOADS[1]),
                            _set("settings", "mask_alpha", float("nan"))))  # fmt: skip
CLI = {
    "summary-marked": (MARKED, ["summary"], 0),
    "summary-csv": (MARKED, ["summary", "--csv"], 0),
    "summary-fifo": (Forgery("fifo", (_set("runs", "sft", "checkpoints", "2", "path", "@TRAP:fifo"),)), ["summary"], 0),
    "summary-surrogate": (Forgery("surrogate", (_set("runs", "sft", "method", "a\ud800"),)), ["summary"], 2),
    "summary-runs-list": (Forgery("runs-list", (_set("runs", [PAYLOADS[0]]),)), ["summary"], 2),
    "report-marked": (MARKED, ["report", "-o", "{out}", "--title", PAYLOADS[2] + PAYLOADS[8]], 0),
    "report-settings": (Forgery("settings", (Mutation("add", ("settings",), 1, PAYLOADS[1]),)), ["report"], 2),
}
"""Case -> (forged store, command line, exit status)."""


@pytest.fixture(scope="module")
def cli(pristine, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, Path]]:
    """Each case of :data:`CLI` run as ``python -m opd_lens.cli`` (all at once): its result, store and output."""
    root = tmp_path_factory.mktemp("cli")
    stores = {f.name: f.make(pristine, root) for f in {f.name: f for f, _, _ in CLI.values()}.values()}
    env = {**os.environ, "PYTHONWARNINGS": "", "OMP_NUM_THREADS": "1"}
    procs = {}
    for case, (forgery, argv, _) in CLI.items():
        out = root / f"{case}.html"
        cmd = [sys.executable, "-m", "opd_lens.cli", argv[0], str(stores[forgery.name]), *argv[1:]]
        cmd = [a.replace("{out}", str(out)) for a in cmd]
        procs[case] = (subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True), stores[forgery.name], out)  # fmt: skip
    results = {}
    for case, (proc, store, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[case] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), store, out)
    return results


@pytest.mark.parametrize("case", CLI)
def test_cli_exits_0_or_2_with_one_error_line(cli, case):
    res, store, _ = cli[case]
    assert res.returncode == CLI[case][2], res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    if res.returncode == 2:
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"opd-lens: error: {store}: "), res.stderr
    elif case.startswith("summary"):  # the table as text: the names and labels verbatim
        cells = [c for row in csv.reader(io.StringIO(res.stdout)) for c in row] if "--csv" in res.args else []
        for text in ("sft", RUN, *(run["method"] for run in _registry(store).values())):
            assert text in cells if cells else text in res.stdout, (text, res.stdout)


# --- pages in Chromium ------------------------------------------------------------------------------------------


SHOWN = {
    "pristine": Forgery("pristine"),
    "methods": MARKED,
    "comment": Forgery("comment", (_set("runs", RUN, "method", "<!--<script>"),), (("sft", PAYLOADS[2]),)),
    "attribute": Forgery("attribute", (_set("runs", "sft", "method", PAYLOADS[6]),), (("sft", PAYLOADS[5]),)),
    "modules": Forgery(
        "modules",
        modules=(
            ("mlp.down_proj", PAYLOADS[1]),
            ("mlp.up_proj", PAYLOADS[7]),
            ("self_attn.q_proj", f"self_attn.{PAYLOADS[0]}.q_proj"),
        ),
    ),  # fmt: skip
    "paths": Forgery(
        "paths",
        (
            _set("home", PAYLOADS[4]),
            _set("runs", "sft", "run_dir", PAYLOADS[1]),
            _set("runs", RUN, "origin", PAYLOADS[4]),
            _set("runs", "sft", "checkpoints", "2", "path", "@TRAP:text"),
        ),
    ),
    "settings": Forgery(
        "settings",
        (
            _set("settings", "mask_alpha", float("inf")),
            _set("settings", "angle_k", 0.5),
            _set("settings", "lock_k", 10**30),
        ),
    ),
    "characters": Forgery(
        "characters",
        (_set("runs", "sft", "method", PAYLOADS[8]), _set("runs", RUN, "method", PAYLOADS[9])),
        (("sft", PAYLOADS[11]),),
    ),
    "entities": Forgery("entities", (_set("runs", RUN, "method", PAYLOADS[12]),), (("sft", PAYLOADS[3]),)),
}
"""Forged stores whose pages are shown: markup in run names, method labels, module names and paths."""
REPORTS = {"report-folder": (Forgery("folder", MARKED.group, folder=PAYLOADS[1]), PAYLOADS[0])}
"""Forged stores whose whole report (charts too) is shown, with the report's title."""


SHOWN_TEXT = """() => {
    const text = [document.title];
    for (const e of document.querySelectorAll("body *:not(script):not(style)")) {
        for (const n of e.childNodes) if (n.nodeType === Node.TEXT_NODE) text.push(n.data);
        if (e.title) text.push(e.title);
    }
    return text.join("\\n");
}"""
INJECTED = """() => [...document.querySelectorAll("*")]
    .filter(e => ["img", "iframe", "object", "embed", "a"].includes(e.localName)
        || [...e.attributes].some(a => a.name.startsWith("on") || /^\\s*javascript:/i.test(a.value)))
    .map(e => e.outerHTML.slice(0, 120))"""


def _norm(text: str) -> str:
    """Text as a page shows it: no NUL (HTML drops it), whitespace runs as one space."""
    return " ".join(text.replace("\x00", "").split())


def render(browser, page_path: Path, name: str) -> dict:  # noqa: F811
    """Load ``page_path`` from file:// with every other request blocked, wait for the Explorer, screenshot it; what
    went wrong and what it shows."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    seen = {"dialogs": [], "errors": [], "blocked": []}
    page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
    page.route("**/*", lambda r: r.continue_() if r.request.url.startswith("file:") else
               (seen["blocked"].append(r.request.url), r.abort()))  # fmt: skip
    page.goto(page_path.as_uri())
    try:
        page.locator("canvas.opd-heat").first.wait_for(timeout=30_000)
    except Exception as e:  # Playwright's TimeoutError: told below, with the page's errors
        seen["errors"].append(f"the Explorer did not render: {type(e).__name__}")
    page.mouse.move(0, 0)
    page.screenshot(path=ARTIFACTS / f"untrusted-{name}.png", full_page=True)
    seen |= {
        "pwned": page.evaluate("typeof window.__pwned"),
        "injected": page.evaluate(INJECTED),
        "scripts": page.evaluate("document.scripts.length"),
        "heatmaps": page.locator("canvas.opd-heat").count(),
        "text": _norm(page.evaluate(SHOWN_TEXT)),
    }
    page.close()
    return seen


def check_render(seen: dict, shown: list[str]) -> None:
    """Nothing went wrong, nothing ran or was injected, and every string in ``shown`` is shown as text."""
    problems = {k: seen[k] for k in ("dialogs", "errors", "blocked")}
    assert problems == {"dialogs": [], "errors": [], "blocked": []}, problems
    assert seen["pwned"] == "undefined"
    assert seen["injected"] == []
    assert seen["scripts"] == len(widget_runtime()) + 2  # the page's own: the runtime, the widget state, one view
    assert seen["heatmaps"] == 2
    for text in shown:
        assert _norm(text) in seen["text"], text


def _shown(ds: xr.Dataset) -> list[str]:
    """The strings of the Dataset that a page shows: run names, method labels, module names."""
    return [str(v) for dim in ("run", "method", "module") for v in ds[dim].values]


def test_pages_of_forged_stores_show_markup_as_text(browser, pristine, tmp_path, cli):  # noqa: F811
    """Each forged store's page (summary, Explorer, a line naming the store), and its whole report for
    :data:`REPORTS` and the CLI's report under a markup title, rendered in Chromium."""
    pages = {}
    for name, forgery in SHOWN.items():
        path = forgery.make(pristine, tmp_path)
        store = open_store(path, create=False)
        ds = store.dataset()
        items = [Summary.of(ds), Explorer(store), f"{path}: {ds.sizes['run']} run(s)"]
        pages[name] = export_html(items, tmp_path / f"{name}.html", title=f"{name} {RUN}"), [*_shown(ds), str(path)]
    for name, (forgery, title) in REPORTS.items():
        path = forgery.make(pristine, tmp_path)
        store = open_store(path, create=False)
        pages[name] = store_report(store, tmp_path / f"{name}.html", title=title), [*_shown(store.dataset()), title]
    _, store, out = cli["report-marked"]
    pages["report-cli"] = out, [*_shown(open_store(store, create=False).dataset()), CLI["report-marked"][1][-1]]
    for name, (page, shown) in pages.items():
        try:
            check_render(render(browser, page, name), shown)
        except AssertionError as e:
            raise AssertionError(f"page {name}: {e}") from None


def test_a_report_whose_chart_vega_cannot_draw_is_one_error(pristine, tmp_path):
    """A run named with U+2028 (or U+2029) broke the expression that Vega-Lite compiles from a custom sort order:
    its ValueError, a traceback from ``opd-lens report``, is a ChartError naming the store and the chart."""
    path = Forgery("separator", runs=(("sft", "line\u2028separator"),)).make(pristine, tmp_path)
    with pytest.raises(ChartError, match=r"^/.*/separator/store: Vega-Lite cannot draw the chart 'Update regimes.*'"):
        store_report(open_store(path, create=False), tmp_path / "report.html")
    assert not (tmp_path / "report.html").exists()


def test_cached_bases_of_renamed_modules_are_skipped(pristine, tmp_path):
    """A store whose ``module`` array no longer names the matrices of its cached V_K bases: the Explorer's channels
    across runs (final_channel_overlap) raised a KeyError (LockBases.alignment_grid indexed the grid by every key of
    the cached bases). Those bases are left out: the renamed modules have no overlap, the others theirs."""
    forgery = SHOWN["modules"]
    store = open_store(forgery.make(pristine, tmp_path), create=False)
    ds = store.dataset()
    overlap = final_channel_overlap(store, ds)
    renamed = [new for _, new in forgery.modules]
    assert overlap.sel(module=renamed).isnull().all()
    kept = [m for m in map(str, ds.module.values) if m not in renamed]
    for run in map(str, ds.run.values):  # against itself, a run's overlap is its lock_alignment
        expected = ds.lock_alignment.sel(run=run, module=kept)
        assert expected.notnull().any()
        got = overlap.sel(other=run, run=run, module=kept).values
        np.testing.assert_allclose(got, expected.values, atol=1e-5)
    assert any(m.startswith("channel_overlap:") for m in Explorer(store)._data["metrics"])


def test_a_mask_alpha_that_is_not_finite_leaves_the_widget_state_json(forger, tmp_path):
    """A NaN (or infinite) mask_alpha went into the Explorer's state as a bare NaN, which the page's JSON.parse (and
    Jupyter's) rejects: the Explorer never rendered. It is sent as null."""
    for alpha in (float("nan"), float("inf")):
        path = _forged(forger, _set("settings", "mask_alpha", alpha))
        try:
            ds = show(path, tmp_path / "page.html")
        finally:
            forger.restore()
        assert ds is not None and Explorer(ds)._data["mask_alpha"] is None


def test_explorer_of_a_store_whose_first_run_has_no_computed_step(pristine, tmp_path):
    """The default selection took the last step of the first run: a ValueError (NaN to int) when that run has none
    yet (added, not computed); it is the first run that has one."""
    path = Forgery("uncomputed").make(pristine, tmp_path)
    zarr.open_array(path / "data.zarr" / "complete", mode="r+")[0] = 0
    ds = open_store(path, create=False).dataset()
    assert ds.progress.sel(run="sft").isnull().all()
    assert Explorer(open_store(path, create=False)).selection == {
        "run": RUN, "layer": 0, "module": "mlp.down_proj", "step": 2,
    }  # fmt: skip
