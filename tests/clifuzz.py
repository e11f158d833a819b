"""Fuzzing the ``opd-lens`` command: seed runs in four trainer layouts, mutations of their files drawn by
hypothesis, and a runner that forks one process per command and checks what it did.

A case copies a pristine working folder (an origin, the seed runs, a store holding all of them and a decoy folder a
symlink may point at), applies its mutations there and runs ``inspect`` or ``compute`` on one run. The command must
exit 0 or 2 within its time limit, with one ``opd-lens:`` line per message and no traceback; nothing outside the
store may change (the decoy and the temporary folder included); and every stored step keeps its values unless the
command said it recomputed it. ``tests/test_fuzz_cli.py`` runs it: a few hundred cases in CI, any number with
``scripts/fuzz.py``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import select
import shutil
import signal
import struct
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hypothesis import strategies as st

from opd_lens.checkpoints import find_checkpoints, save_checkpoint
from opd_lens.testing import qwen3_config, write_planted_run

CONFIG = qwen3_config(layers=1, hidden=32, intermediate=48)
SETTINGS = ("--angle-k", "8", "--mask-rank", "8", "--lock-k", "8")  # below every side of CONFIG's matrices
LAYOUTS = ("hf", "sharded", "dcp", "lora")
STEPS = (10, 20)
TIME_LIMIT = 120.0
"""Seconds a command may take: each takes well under one here, so only a hang reaches it, even on a loaded box."""


# --- the seed runs -------------------------------------------------------------------------------------------------


def build_pristine(work: Path) -> None:
    """Write the origin, one run per layout, the decoy and a store holding every run into ``work``."""
    origin, hf = write_planted_run(work / "planted", config=CONFIG, steps=STEPS, rank=2, dtype=torch.bfloat16)
    shutil.move(origin, work / "origin")
    shutil.move(hf, work / "runs" / "hf")
    shutil.rmtree(work / "planted")
    runs = work / "runs"
    for ckpt in find_checkpoints(runs / "hf"):
        sd = {name: ckpt.read(name) for name in ckpt.tensors}
        save_checkpoint(
            runs / "sharded" / f"checkpoint-{ckpt.step}", sd, step=ckpt.step, config=CONFIG, max_shard_bytes=6_000
        )
        _write_fsdp(runs / "dcp" / f"checkpoint-{ckpt.step}", sd, ckpt.step)
    _write_lora(work / "origin", runs / "lora")
    (work / "outside").mkdir()
    (work / "outside" / "decoy.safetensors").write_bytes(
        (runs / "hf" / "checkpoint-10" / "model.safetensors").read_bytes()
    )
    for layout in LAYOUTS:
        status, _, err = run_cli(
            [
                "compute",
                str(runs / layout),
                "--origin",
                str(work / "origin"),
                "--name",
                f"r-{layout}",
                "--store",
                str(work / "store"),
                *SETTINGS,
                "--quiet",
            ],
            work,
        )
        assert status == 0, err


def _write_fsdp(step_dir: Path, sd: dict[str, torch.Tensor], step: int) -> None:
    """HF Trainer with FSDP ``SHARDED_STATE_DICT``: DCP in ``pytorch_model_fsdp_0/``, trainer state beside it."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": sd}, checkpoint_id=step_dir / "pytorch_model_fsdp_0", no_dist=True)
    (step_dir / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    (step_dir / "config.json").write_text(json.dumps(CONFIG))


def _write_lora(base: Path, run: Path) -> None:
    """peft adapters of rank 2 on every linear layer, saved by ``save_pretrained`` at each step."""
    import peft
    import transformers

    model = transformers.Qwen3ForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
    )
    gen = torch.Generator().manual_seed(0)
    for step in STEPS:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(1e-3 * step * torch.randn(p.shape, generator=gen))
        model.save_pretrained(run / f"checkpoint-{step}")
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))


# --- mutations -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    """One change to one file or folder of a case: ``kind`` says what, ``target`` which (modulo the candidates of
    that kind), ``picks`` where inside it and ``value`` what goes there."""

    kind: str
    target: int
    picks: tuple[int, ...] = ()
    value: object = None

    def apply(self, work: Path, layout: str) -> str:
        """Apply it in the case folder ``work``; return what was done, for the failure message."""
        candidates = _candidates(work, layout, self.kind)
        if not candidates:
            return f"{self.kind}: no candidate"
        path = candidates[self.target % len(candidates)]
        getattr(self, f"_{self.kind}")(path, work)
        return f"{self.kind} {path.relative_to(work)} {self.picks} {self.value!r:.80}"

    def _flip(self, path: Path, work: Path) -> None:
        data = bytearray(path.read_bytes())
        for i, offset in enumerate(self.picks):
            if data:
                data[offset % len(data)] = self.value[i % len(self.value)]
        path.write_bytes(bytes(data))

    def _cut(self, path: Path, work: Path) -> None:
        data = path.read_bytes()
        at = self.picks[0] % (len(data) + 1)
        path.write_bytes(data[:at] + self.value + data[at + self.picks[1] % 64 :])

    def _header(self, path: Path, work: Path) -> None:
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        if self.picks[0] % 4 == 3:  # a length prefix that lies
            path.write_bytes(struct.pack("<Q", self.picks[-1] % 2**64) + data[8:])
            return
        raw = json.dumps(mutate_json(header, self.picks, self.value)).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])

    def _json(self, path: Path, work: Path) -> None:
        doc = json.loads(path.read_bytes())
        path.write_text(json.dumps(mutate_json(doc, self.picks, self.value)))

    def _raw(self, path: Path, work: Path) -> None:
        path.write_bytes(self.value)

    def _remove(self, path: Path, work: Path) -> None:
        path.unlink()

    def _rename(self, path: Path, work: Path) -> None:
        new = path.with_name(self.value)
        if not new.exists():
            path.rename(new)

    def _replace(self, path: Path, work: Path) -> None:
        """The file becomes a symlink (to the decoy, to itself, to nothing, to a folder) or a FIFO."""
        path.unlink()
        how = self.value
        if how == "fifo":
            os.mkfifo(path)
        else:
            to = {
                "decoy": work / "outside" / "decoy.safetensors",
                "loop": path,
                "dangling": work / "nowhere",
                "folder": work / "outside",
            }[how]
            path.symlink_to(to)


def _candidates(work: Path, layout: str, kind: str) -> list[Path]:
    """The files (or for ``rename``, the folders) of the case a mutation of ``kind`` may change, in a fixed order."""
    roots = [work / "runs" / layout] + ([work / "origin"] if kind != "rename" else [])
    found = sorted(p for root in roots for p in root.rglob("*") if not p.is_symlink())
    if kind == "rename":
        return [p for p in found if p.is_dir()]
    files = [p for p in found if p.is_file()]
    if kind == "header":
        return [p for p in files if p.suffix == ".safetensors" and _has_json_header(p)]
    if kind == "json":
        return [p for p in files if p.suffix == ".json" and _is_json(p)]
    if kind == "raw":
        return [p for p in files if p.suffix == ".json" or p.name == ".metadata"]
    return files


def _has_json_header(path: Path) -> bool:
    data = path.read_bytes()
    if len(data) < 8:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return 8 + n <= len(data) and _parses(data[8 : 8 + n])


def _is_json(path: Path) -> bool:
    return _parses(path.read_bytes())


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:
        return False
    return True


def mutate_json(doc, picks: tuple[int, ...], value):
    """A copy of ``doc`` with one node changed: ``picks[0]`` says how (replace, delete, add beside), the rest which
    node, walking down one pick per level while there are containers."""
    doc = copy.deepcopy(doc)
    op, path = picks[0] % 4, picks[1:]
    if not isinstance(doc, dict | list) or not doc:
        return value
    parent, key = None, None
    node = doc
    for pick in path:
        if not isinstance(node, dict | list) or not node:
            break
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, keys[pick % len(keys)]
        node = node[key]
    if parent is None:
        parent, key = doc, (list(doc) if isinstance(doc, dict) else list(range(len(doc))))[0]
    if op == 1:
        del parent[key]
    elif op == 2:
        if isinstance(parent, dict):
            parent[f"{key}~"] = value
        else:
            parent.append(value)
    else:
        parent[key] = value
    return doc


json_st = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**70) | st.floats() | st.text(max_size=6),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=8,
)
"""Any JSON value, including the numbers (huge, negative, NaN, infinite) a reader must not trust."""
_TRICKY = st.sampled_from(
    [
        0,
        -1,
        1,
        2**63,
        2**64 - 1,
        10**20,
        1e308,
        "F32",
        "BF16",
        "I64",
        "F8_E4M3",
        "",
        "..",
        "/etc/passwd",
        "model.safetensors",
        "x" * 300,
        [0, 2**62],
        [-1, 4],
        [4, 0],
        [[1]],
        {"__class__": "os.system"},
    ]
)
picks_st = st.lists(st.integers(0, 2**20), min_size=1, max_size=6).map(tuple)
_DIR_NAMES = st.sampled_from(
    [
        "checkpoint-0",
        "checkpoint--1",
        "checkpoint-99999999999999999999",
        "checkpoint-٣",
        "checkpoint-1\n",
        "checkpoint-20 ",
        "global_step20",
        "step_20",
        "checkpoint-10.tmp",
        ".tmp-checkpoint-10",
        "checkpoint-",
        "checkpoint-5",
        "checkpoint-30",
        "pytorch_model_fsdp_1",
        "huggingface",
        "weights",
        "ckpt",
    ]
) | st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)
mutation_st = st.one_of(
    st.builds(Mutation, st.just("flip"), st.integers(0, 99), picks_st, st.binary(min_size=1, max_size=4)),
    st.builds(
        Mutation,
        st.just("cut"),
        st.integers(0, 99),
        st.tuples(st.integers(0, 2**24), st.integers(0, 99)),
        st.binary(max_size=16),
    ),
    st.builds(Mutation, st.just("header"), st.integers(0, 99), picks_st, json_st | _TRICKY),
    st.builds(Mutation, st.just("json"), st.integers(0, 99), picks_st, json_st | _TRICKY),
    st.builds(Mutation, st.just("raw"), st.integers(0, 99), st.just(()), st.binary(max_size=48)),
    st.builds(Mutation, st.just("remove"), st.integers(0, 99)),
    st.builds(Mutation, st.just("rename"), st.integers(0, 99), st.just(()), _DIR_NAMES),
    st.builds(
        Mutation,
        st.just("replace"),
        st.integers(0, 99),
        st.just(()),
        st.sampled_from(["decoy", "loop", "dangling", "folder", "fifo"]),
    ),
)


@dataclass(frozen=True)
class Case:
    layout: str
    command: str
    """``inspect``, ``inspect-origin``, ``compute-new`` (into a new run) or ``compute-stored`` (the stored run)."""
    mutations: tuple[Mutation, ...]

    def argv(self, work: Path) -> list[str]:
        run, origin, store = work / "runs" / self.layout, work / "origin", work / "store"
        if self.command.startswith("inspect"):
            return ["inspect", str(run), *(["--origin", str(origin)] if self.command == "inspect-origin" else [])]
        name = "new" if self.command == "compute-new" else f"r-{self.layout}"
        return ["compute", str(run), "--origin", str(origin), "--name", name, "--store", str(store), "--quiet"]


case_st = st.builds(
    Case,
    st.sampled_from(LAYOUTS),
    st.sampled_from(["inspect", "inspect-origin", "compute-new", "compute-stored"]),
    st.lists(mutation_st, min_size=1, max_size=3).map(tuple),
)


# --- running and checking ------------------------------------------------------------------------------------------


def run_cli(argv: list[str], cwd: Path, timeout: float = TIME_LIMIT) -> tuple[int | None, str, str]:
    """Run ``opd-lens ARGV`` in a forked child, as its own process would: ``(exit status or None if it hung and was
    killed, stdout, stderr)``. A signal's death is a negative status; an exception the CLI let through is 99."""
    out, err = cwd.parent / f".{cwd.name}.out", cwd.parent / f".{cwd.name}.err"
    tmp = cwd.parent / f".{cwd.name}.tmp"
    tmp.mkdir(exist_ok=True)
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 99
        try:
            code = _child(argv, cwd, out, err, tmp)
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    fd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    code = os.waitstatus_to_exitcode(status) if ready else None
    return code, out.read_text(errors="replace"), err.read_text(errors="replace")


def _child(argv: list[str], cwd: Path, out: Path, err: Path, tmp: Path) -> int:
    """In the forked child: a fresh process's streams, warnings, temporary folder and one torch thread, then the CLI."""
    for fd, path in ((1, out), (2, err)):
        new = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(new, fd)
        os.close(new)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)  # noqa: SIM115
    os.chdir(cwd)
    os.environ["TMPDIR"] = str(tmp)
    import tempfile

    tempfile.tempdir = None
    warnings.resetwarnings()
    torch.set_num_threads(1)
    from opd_lens import cli

    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse
        return e.code if isinstance(e.code, int) else 2


def tree(*roots: Path) -> dict[str, tuple]:
    """Every entry under ``roots``: a file's size and SHA-256, a link's target, a folder, a FIFO."""
    entries = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            if p.is_symlink():
                entries[str(p)] = ("link", os.readlink(p))
            elif p.is_file():
                entries[str(p)] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                entries[str(p)] = ("dir" if p.is_dir() else "other",)
    return entries


def outside_store(work: Path) -> list[Path]:
    return [p for p in work.iterdir() if p.name != "store"]


_RECOMPUTING = re.compile(r"recomputing step (\d+)")


def check_outcome(case: Case, work: Path, status: int | None, out: str, err: str) -> None:
    """The command ended by itself with status 0 or 2, and said what it had to say in ``opd-lens:`` lines."""
    assert status is not None, f"hung: no exit within {TIME_LIMIT:g}s"
    assert status in (0, 2), f"exit status {status}\n{err}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert all(line.startswith("opd-lens: ") for line in lines), err
    if status == 0 and case.command.startswith("compute"):
        assert re.match(r"\S+: computed ", out), out


def check_store(case: Case, work: Path, pristine, err: str) -> None:
    """Every step of ``pristine`` (the store's Dataset before the case) is still stored with the same values, but
    those the command said it recomputed; a run that computed anything may have new lock_alignment values."""
    from opd_lens import open_store

    ds = open_store(work / "store", create=False).dataset()
    recomputed = {int(s) for s in _RECOMPUTING.findall(err)}
    stored = f"r-{case.layout}" if case.command == "compute-stored" else None
    assert set(pristine.run.values) <= set(ds.run.values)
    for run in pristine.run.values:
        before = pristine.sel(run=run)
        steps = [int(s) for s in before.step.values if np.isfinite(before.update_fro.sel(step=s)).any()]
        for step in steps:
            if run == stored and step in recomputed:
                continue
            assert step in ds.step.values, f"{run}: step {step} is gone"
            after = ds.sel(run=run, step=step)
            for name in pristine.data_vars:
                if run == stored and name == "lock_alignment":
                    continue  # refers to the run's last step, which the command may have recomputed or added
                a, b = before[name].sel(step=step).values, after[name].values
                assert a.shape == b.shape and np.array_equal(a, b, equal_nan=True), f"{run}: {name} at step {step}"
