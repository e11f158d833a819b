"""The readable table: :class:`opd_lens.summary.Summary` as text, markdown and HTML, on a store named like the
classroom zoo (runs sft, opd, rlvr and the controls, their method labels, held-out accuracy in trainer_state.json)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
from conftest import EVIL_NAME

import opd_lens
from opd_lens.cli import main
from opd_lens.diagnostics import Settings
from opd_lens.schema import VARIABLES
from opd_lens.summary import MISSING, Summary, held_out_accuracy, summarize
from opd_lens.testing import qwen3_config, write_planted_run

RUNS = {  # name -> method label, as in the classroom zoo (opd_lens.zoo.RUNS)
    "sft": "sft",
    "opd": "opd",
    "rlvr": "rlvr",
    "opd-topkl-50": "opd top-KL 50%",
    "opd-random-25": "opd random 25%",
    "opd-offpolicy": "opd off-policy",
    "mix-0.5": "opd+rlvr α=0.5",
    "mix-0.05": "opd+rlvr α=0.05",
}
STEPS = (20, 40, 60)
UNLOGGED = "mix-0.05"
"""The run whose checkpoints log no held-out accuracy."""


def accuracy(seed: int, step: int) -> float:
    return 0.1 * seed + step / 1000


@pytest.fixture(scope="module")
def zoo_store(tmp_path_factory, one_torch_thread) -> Path:
    root = tmp_path_factory.mktemp("summary")
    store = opd_lens.open_store(root / "store", Settings(angle_k=8, mask_rank=4, lock_k=6))
    config = qwen3_config(layers=1, hidden=32, intermediate=64)
    for seed, (name, method) in enumerate(RUNS.items()):
        origin, run = write_planted_run(root / name, config=config, steps=STEPS, scale=0.02 * (seed + 1), seed=seed)
        for step in STEPS if name != UNLOGGED else ():
            log = [{"step": s, "eval_accuracy": accuracy(seed, s), "loss": 1.0} for s in STEPS if s <= step]
            (run / f"checkpoint-{step}" / "trainer_state.json").write_text(
                json.dumps({"global_step": step, "log_history": log})
            )
        store.add_run(name, run, origin, method=method)
    store.compute(progress=False, endpoint="last")
    return store.path


@pytest.fixture(scope="module")
def summary(zoo_store) -> Summary:
    return Summary.of(opd_lens.open_store(zoo_store, create=False).dataset())


def blocks(text: str) -> list[list[str]]:
    """The table blocks of the text form (before the legend), as lists of lines."""
    parts = text.split("\n\n")
    return [part.splitlines() for part in parts[:-1]]


def test_accuracy_is_the_last_checkpoints_logged_value(summary):
    table = summary.table
    for seed, name in enumerate(RUNS):
        expected = 100 * accuracy(seed, STEPS[-1]) if name != UNLOGGED else float("nan")
        assert table.loc[name, "accuracy_pct"] == pytest.approx(expected, nan_ok=True)
    assert list(table.columns[:5]) == ["method", "steps", "first_step", "last_step", "accuracy_pct"]


def test_no_accuracy_column_when_no_run_logs_one(summary, zoo_store):
    ds = opd_lens.open_store(zoo_store, create=False).dataset().sel(run=[UNLOGGED])
    assert held_out_accuracy(ds) == {}
    assert "accuracy_pct" not in summarize(ds).columns
    assert "acc %" not in Summary.of(ds).text() and "acc %" in summary.text()


def test_text_fits_120_columns_in_stacked_blocks(summary):
    text = summary.text()
    assert max(len(line) for line in text.splitlines()) <= 120
    table_blocks = blocks(text)
    assert len(table_blocks) == 2  # too wide for one: split, not wrapped
    labels = []
    for block in table_blocks:
        assert block[0].startswith("run ") and [line.split()[0] for line in block[1:]] == list(RUNS)
        labels += re.split(r"\s{2,}", block[0].strip())[1:]
    assert labels == [c.label for c in summary.columns[1:]]  # every column once, in order
    assert len(blocks(summary.text(width=1000))) == 1
    assert str(summary) == text and summary._repr_html_() == summary.html()  # print() and a notebook show it


def test_values_have_fixed_decimals_and_a_marker_for_nan(summary):
    cells = summary.cells()
    for i, column in enumerate(summary.columns):
        for row, (_, values) in zip(cells, summary.table.reset_index().iterrows(), strict=True):
            value = values[column.name]
            if column.decimals is None:
                assert row[i] == str(value)
            elif value != value:  # NaN
                assert row[i] == MISSING
            else:
                fraction = rf"\.\d{{{column.decimals}}}" if column.decimals else ""
                assert re.fullmatch(rf"-?\d+{fraction}", row[i])
                assert float(row[i]) == pytest.approx(value, abs=0.51 * 10**-column.decimals)
    unlogged = cells[list(RUNS).index(UNLOGGED)]
    assert unlogged[[c.name for c in summary.columns].index("accuracy_pct")] == MISSING
    first_block = blocks(summary.text())[0]
    assert f" {MISSING} " in next(line for line in first_block if line.startswith(UNLOGGED))


def test_legend_has_a_line_per_column_with_schema_names_and_settings(summary):
    legend = summary.legend()
    assert [line.split(" = ", 1)[0] for line in legend] == [c.label for c in summary.columns]
    for column, line in zip(summary.columns, legend, strict=True):
        if column.variable:
            assert VARIABLES[column.variable].long_name in line
    by_name = dict(zip([c.name for c in summary.columns], legend, strict=True))
    assert "random baseline α=0.5 (50%)" in by_name["principal_overlap_pct"]
    assert "random baseline α=0.5 (50%)" in by_name["lowmag_overlap_pct"]
    assert "k=8" in by_name["max_angle_v_deg"] and "K=6" in by_name["lock_alignment_first"]
    assert "parameter-weighted" in by_name["unchanged_pct"] and "°" in by_name["max_angle_u_deg"].split(" = ")[0]
    text_legend = summary.text().split("\n\n")[-1].replace("\n    ", " ").splitlines()
    assert text_legend == legend  # below the table, long lines wrapped with an indent


def test_legend_says_which_k_the_angles_used(summary):
    by_name = dict(zip([c.name for c in summary.columns], summary.legend(), strict=True))
    assert by_name["max_angle_v_deg"].endswith("k=8 (matrices with a side ≤ k left out: 0° by construction)")
    relative = Summary(summary.table, {**summary.attrs, "angle_k": 0.125}).legend()
    assert any("k=1/8·min(m, n) (matrices with a side ≤ k" in line for line in relative)


def test_legend_names_symbols_when_the_attrs_lack_the_settings(summary):
    legend = Summary(summary.table, {}).legend()
    assert any(line.endswith("random baseline α") for line in legend) and any(line.endswith("; K") for line in legend)


def test_markdown_has_every_header_row_and_legend_line(summary):
    lines = summary.markdown().splitlines()
    assert lines[0] == "| " + " | ".join(c.label for c in summary.columns) + " |"
    assert lines[1].count("---") == len(summary.columns)
    assert [line.split(" | ")[0] for line in lines[2 : 2 + len(RUNS)]] == [f"| {name}" for name in RUNS]
    assert lines[-len(summary.legend()) :] == [f"- {line}" for line in summary.legend()]


def test_markdown_escapes_pipes(summary):
    piped = Summary(summary.table.rename(index={"sft": "a|b"}), summary.attrs).markdown()
    assert "| a\\|b | sft |" in piped


def test_html_escapes_every_value(summary):
    evil = Summary(summary.table.rename(index={"sft": EVIL_NAME}), summary.attrs).html()
    assert "<img" not in evil and "&lt;img src=x onerror=alert(1)&gt;" in evil


def test_report_shows_the_table_with_its_legend(zoo_store, summary, tmp_path):
    from opd_lens.report import store_report

    page = store_report(opd_lens.open_store(zoo_store, create=False), tmp_path / "report.html").read_text()
    assert summary.html() in page
    start = page.index('<table class="dataframe opd-summary">')
    table = page[start : page.index("</table>", start)]
    headers = re.findall(r"<th title=[^>]*>([^<]*)</th>", table)
    assert headers == [c.label for c in summary.columns]  # one header row, no empty index row
    assert table.count("<tr>") == 1 + len(RUNS)
    assert all(f"<li>{html.escape(line)}</li>" in page for line in summary.legend())
    assert "acc %" in page and MISSING in table


def test_cli_summary_prints_the_text(zoo_store, summary, capsys):
    assert main(["summary", str(zoo_store)]) == 0
    assert capsys.readouterr().out == summary.text() + "\n"
    assert main(["summary", str(zoo_store), "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("run,method,steps,first_step,last_step,accuracy_pct,")
