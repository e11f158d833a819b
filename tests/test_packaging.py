"""The distributions as users get them, built by the real `python -m build` with no Node on PATH: the sdist carries the
built widget bundle, so a wheel builds from it; the wheel carries the bundle, the classroom notebooks, ``py.typed`` and
the license, and nothing from tests, node_modules or Jupyter's checkpoints; installed, it renders and copies the
notebooks out."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = ["explorer.js", "monitor.js", "widget.css", "vendor/embed-amd.js", "vendor/require.js"]
NOTEBOOKS = sorted(p.name for p in (REPO / "demo_notebooks").glob("*.ipynb"))
LEFTOVERS = ("/tests/", "node_modules", ".ipynb_checkpoints", "__pycache__")


def build(kind: str, source: Path, out: Path) -> Path:
    """``python -m build --no-isolation --<kind>`` with only the venv on PATH: no npm, no node."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    cmd = [sys.executable, "-m", "build", "--no-isolation", f"--{kind}", "--outdir", str(out), str(source)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return next(out.glob("*.tar.gz" if kind == "sdist" else "*.whl"))


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """(sdist, wheel built from the unpacked sdist) of a checkout as a user has it after building the bundle and
    opening the notebooks in Jupyter: the tracked files, the bundle, node_modules and a stray checkpoint folder."""
    if not (REPO / "opd_lens" / "static" / "explorer.js").is_file():
        pytest.fail("the widget bundle is not built: npm --prefix js run build")
    tmp = tmp_path_factory.mktemp("dist")
    checkout = tmp / "checkout"
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    for name in tracked.decode().split("\0"):
        if name and (REPO / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, checkout / name)
    shutil.copytree(REPO / "opd_lens" / "static", checkout / "opd_lens" / "static")
    for stray in ("demo_notebooks/.ipynb_checkpoints/01_quickstart-checkpoint.ipynb", "js/node_modules/x/index.js"):
        (checkout / stray).parent.mkdir(parents=True)
        (checkout / stray).write_text("{}", encoding="utf-8")
    sdist = build("sdist", checkout, tmp / "sdist")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()
    return sdist, build("wheel", unpacked, tmp / "wheel")


def test_the_sdist_carries_the_bundle_and_no_leftovers(dists):
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
    for path in [f"opd_lens/static/{b}" for b in BUNDLE] + ["LICENSE", "CHANGELOG.md", "README.md", "js/package.json"]:
        assert path in names, path
    assert [f"demo_notebooks/{n}" for n in NOTEBOOKS] == sorted(n for n in names if n.startswith("demo_notebooks/"))
    assert not [n for n in names if "node_modules" in n or ".ipynb_checkpoints" in n or "__pycache__" in n]


def test_the_wheel_from_the_sdist_has_what_users_need(dists):
    _, wheel = dists
    names = zipfile.ZipFile(wheel).namelist()
    for path in [f"opd_lens/static/{b}" for b in BUNDLE] + ["opd_lens/py.typed"]:
        assert path in names, path
    assert sorted(n for n in names if n.startswith("opd_lens/demo_notebooks/")) == [
        f"opd_lens/demo_notebooks/{n}" for n in NOTEBOOKS
    ]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not [n for n in names if not n.startswith(("opd_lens/", "opd_lens-"))]
    assert not [n for n in names if any(bad in "/" + n for bad in LEFTOVERS)]


def test_the_installed_wheel_renders_and_copies_the_notebooks(dists, tmp_path):
    _, wheel = dists
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = (
        "import sys, opd_lens\n"
        "from opd_lens.widgets._static import STATIC\n"
        "from opd_lens.cli import main\n"
        "print(opd_lens.__file__, STATIC, sep='\\n')\n"
        "sys.exit(main(['notebooks', sys.argv[1]]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the editable checkout on sys.path
    cmd = [sys.executable, "-c", script, "books"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)  # not the checkout's opd_lens/
    assert res.returncode == 0, res.stderr
    module, static = res.stdout.splitlines()[:2]
    assert Path(module).is_relative_to(site) and Path(static) == site / "opd_lens" / "static"
    copied = sorted((tmp_path / "books").glob("*.ipynb"))
    assert [p.read_bytes() for p in copied] == [(REPO / "demo_notebooks" / n).read_bytes() for n in NOTEBOOKS]
