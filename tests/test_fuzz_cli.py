"""The fuzzing campaign against ``opd-lens inspect`` and ``compute`` (see :mod:`clifuzz`): 200 derandomized cases
here; ``scripts/fuzz.py`` runs any number with fresh seeds and writes their tally."""

from __future__ import annotations

import collections
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from clifuzz import Case, build_pristine, case_st, check_outcome, check_store, outside_store, run_cli, tree
from hypothesis import HealthCheck, given, settings

from opd_lens import open_store

EXAMPLES = int(os.environ.get("OPD_LENS_FUZZ_EXAMPLES", "200"))
REPORT = os.environ.get("OPD_LENS_FUZZ_REPORT")
CAMPAIGN = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=REPORT is None,  # CI: the same cases every run
    suppress_health_check=list(HealthCheck),
)
tally: collections.Counter = collections.Counter()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The case folder's pristine copy, and the Dataset of its store."""
    root = tmp_path_factory.mktemp("fuzz")
    work = root / "work"
    build_pristine(work)
    shutil.copytree(work, root / "pristine", symlinks=True)
    return root, open_store(work / "store", create=False).dataset().load()


def _write_report() -> None:
    part = Path(f"{REPORT}.part")
    part.write_text(json.dumps(dict(tally)))
    part.replace(REPORT)


@CAMPAIGN
@given(case=case_st)
def test_inspect_and_compute_survive_mutated_checkpoints(pristine, case: Case):
    root, dataset = pristine
    work = root / "work"
    shutil.rmtree(work)
    shutil.copytree(root / "pristine", work, symlinks=True)
    done = [m.apply(work, case.layout) for m in case.mutations]
    before = tree(*outside_store(work))
    start = time.monotonic()
    status, out, err = run_cli(case.argv(work), work)
    tally[f"{case.command} exit {status}"] += 1
    took = time.monotonic() - start
    tally["seconds"] += took
    tally["slowest"] = max(tally["slowest"], took)
    if REPORT:  # a campaign's progress, read by scripts/fuzz.py
        _write_report()
    try:
        check_outcome(case, work, status, out, err)
        assert tree(*outside_store(work)) == before, "wrote outside the store"
        assert not any((root / ".work.tmp").iterdir()), "left files in the temporary folder"
        if case.command.startswith("compute"):
            check_store(case, work, dataset, err)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{case.argv(work)}\nmutations: {done}\nstdout: {out}\nstderr: {err}") from None
