"""The public face: every name in ``opd_lens.__all__`` resolves, every exception class lives in
:mod:`opd_lens.errors` and is exported from ``opd_lens``, and :mod:`opd_lens.testing` offers what it documents."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import opd_lens
import opd_lens.errors

ELSEWHERE = {
    "opd_lens.zoo.train.Cancelled": "the zoo's internal stop signal (caught by the retraining), never shown to users",
}
"""Exception classes defined outside opd_lens.errors, and why."""
INTERNAL = {"opd_lens.zoo.train.Cancelled"}
"""Exception classes that opd_lens does not export."""


def _exception_classes() -> dict[str, type[BaseException]]:
    """Qualified name -> class of every public exception class defined in a module of the package."""
    found = {}
    modules = pkgutil.walk_packages(opd_lens.__path__, "opd_lens.")
    for module in [opd_lens, *(importlib.import_module(m.name) for m in modules)]:
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
                and not name.startswith("_")
            ):
                found[f"{module.__name__}.{name}"] = obj
    return found


@pytest.mark.parametrize("name", opd_lens.__all__)
def test_every_exported_name_resolves(name):
    assert getattr(opd_lens, name) is not None


def test_star_import_gives_all():
    namespace = {}
    exec("from opd_lens import *", namespace)
    assert set(opd_lens.__all__) <= namespace.keys()


def test_every_exception_class_is_in_errors_and_exported():
    classes = _exception_classes()
    assert "opd_lens.errors.StoreError" in classes  # the walk reads the package at all
    assert sorted(q for q in classes if not q.startswith("opd_lens.errors.")) == sorted(ELSEWHERE)
    assert set(opd_lens.errors.__all__) == {q.rpartition(".")[2] for q in classes if q.startswith("opd_lens.errors.")}
    for qualified, cls in classes.items():
        if qualified not in INTERNAL:
            assert cls.__name__ in opd_lens.__all__, qualified
            assert getattr(opd_lens, cls.__name__) is cls, qualified


def test_the_documented_settings_and_store_errors_are_exported():
    from opd_lens.diagnostics import Settings
    from opd_lens.engine import ComputeReport

    assert (opd_lens.Settings, opd_lens.ComputeReport) == (Settings, ComputeReport)
    assert issubclass(opd_lens.StoreLockedError, opd_lens.StoreError)
    assert issubclass(opd_lens.StoreError, opd_lens.OpdLensError)


def test_testing_offers_what_it_documents(tmp_path):
    testing = importlib.import_module("opd_lens.testing")
    assert opd_lens.testing is testing
    assert testing.__doc__ and "tests, benchmarks and demos" in testing.__doc__
    assert set(testing.__all__) == {
        "SPECTRA",
        "fill_store",
        "qwen3_config",
        "qwen3_shapes",
        "update_direction",
        "write_planted_run",
    }
    assert all(getattr(testing, name).__doc__ for name in testing.__all__ if name != "SPECTRA")
    config = testing.qwen3_config(layers=1, hidden=16, intermediate=24)
    origin, run = testing.write_planted_run(tmp_path, config=config, steps=(1, 2), spectrum="planted")
    written = opd_lens.open_checkpoint(origin).tensors
    assert {name: tuple(info.shape) for name, info in written.items()} == testing.qwen3_shapes(config)
    assert [c.step for c in opd_lens.find_checkpoints(run)] == [1, 2]
