"""The zoo's runs and its presets (how long everything trains)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .models import ModelSize

__all__ = ["RunSpec", "RUNS", "Preset", "PRESETS"]


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run of the zoo.

    ``sft`` runs train on teacher demonstrations with cross-entropy; the others are policy-gradient runs whose
    per-token advantage is ``alpha·A_OPD + (1 − alpha)·A_GRPO`` (``alpha`` 1: OPD, 0: RLVR), optionally with the
    OPD signal sparsified (``sparsify``: mode and kept fraction), on rollouts of the student or the teacher.
    """

    method: str
    origin: str = "anchor"
    sft: bool = False
    alpha: float = 1.0
    rollout: str = "student"
    sparsify: tuple[str, float] | None = None
    clip: tuple[float, float] = (0.2, 0.28)

    @property
    def rlvr(self) -> bool:
        """Pure RLVR: GRPO with std normalization, dynamic filtering and Adam eps 1e-15, as in the paper."""
        return not self.sft and self.alpha == 0.0


RUNS = {
    "sft": RunSpec("sft", origin="base", sft=True),
    "opd": RunSpec("opd"),
    "rlvr": RunSpec("rlvr", alpha=0.0),
    "opd-topkl-50": RunSpec("opd top-KL 50%", sparsify=("topkl", 0.5)),
    "opd-random-25": RunSpec("opd random 25%", sparsify=("random", 0.25)),
    "opd-offpolicy": RunSpec("opd off-policy", rollout="teacher", clip=(1.0, 1.0)),
    "mix-0.5": RunSpec("opd+rlvr α=0.5", alpha=0.5),
    "mix-0.05": RunSpec("opd+rlvr α=0.05", alpha=0.05),
}
"""The zoo's runs by name. The final ``sft`` checkpoint is the anchor that every other run starts from."""


@dataclass(frozen=True)
class Preset:
    """Task, model sizes and schedules. Steps are optimizer steps; a policy-gradient step trains on one of
    ``minibatches`` slices of a rollout batch of ``prompts`` × ``group`` samples."""

    name: str
    runs: tuple[str, ...]
    digits: int
    n_train: int
    n_eval: int
    student: ModelSize
    teacher: ModelSize
    base_steps: int
    teacher_steps: int
    pretrain_batch: int
    pretrain_lr: float
    sft_demos: int
    sft_steps: int
    sft_batch: int
    opd_steps: int
    rlvr_steps: int
    prompts: int
    group: int
    minibatches: int
    lr: float
    """OPD/RLVR learning rate (constant); SFT peaks at 10× this and decays to it (cosine, 10% warmup)."""
    saves: int
    """Checkpoints per run, evenly spaced, the last at the final step."""

    def __post_init__(self):
        if unknown := sorted(set(self.runs) - set(RUNS)):
            raise ValueError(f"unknown run {unknown[0]!r}; known: {', '.join(RUNS)}")
        if "sft" not in self.runs:
            raise ValueError("a zoo trains 'sft': its final checkpoint is the anchor of the other runs")
        if self.opd_steps % self.minibatches or self.rlvr_steps % self.minibatches:
            raise ValueError(f"OPD and RLVR steps must be multiples of minibatches ({self.minibatches})")

    @classmethod
    def from_dict(cls, d: dict) -> Preset:
        """The preset that :func:`dataclasses.asdict` turned into ``d``."""
        sizes = {k: ModelSize(**d[k]) for k in ("student", "teacher")}
        return cls(**d | sizes | {"runs": tuple(d["runs"])})

    def steps(self, run: str) -> int:
        spec = RUNS[run]
        return self.sft_steps if spec.sft else self.rlvr_steps if spec.rlvr else self.opd_steps

    def save_steps(self, run: str) -> list[int]:
        """The steps of ``run``'s checkpoints; policy-gradient runs save at the end of a rollout batch."""
        total = self.steps(run)
        unit = 1 if RUNS[run].sft else self.minibatches
        return sorted({unit * round(total * i / self.saves / unit) for i in range(1, self.saves + 1)})


_CLASSROOM = Preset(
    name="classroom",
    runs=tuple(RUNS),
    digits=4,
    n_train=20000,
    n_eval=500,
    student=ModelSize(hidden=64, layers=2, intermediate=192),
    teacher=ModelSize(hidden=96, layers=3, intermediate=288),
    base_steps=150,
    teacher_steps=400,
    pretrain_batch=64,
    pretrain_lr=3e-3,
    sft_demos=12800,
    sft_steps=1000,  # 5 epochs, as in the paper
    sft_batch=64,
    opd_steps=200,
    rlvr_steps=200,
    prompts=64,
    group=8,
    minibatches=2,
    lr=3e-5,
    saves=5,
)

PRESETS = {
    "ci": replace(
        _CLASSROOM,
        name="ci",
        runs=("sft", "opd", "rlvr"),
        teacher=ModelSize(hidden=64, layers=3, intermediate=192),
        base_steps=100,
        teacher_steps=300,
        sft_demos=2048,
        sft_steps=150,
        opd_steps=60,
        rlvr_steps=60,
        lr=3e-4,
        saves=3,
    ),
    "classroom": _CLASSROOM,
    "paper": replace(
        _CLASSROOM,
        name="paper",
        teacher_steps=600,
        sft_demos=16000,
        sft_steps=1250,
        opd_steps=300,
        rlvr_steps=1000,
        saves=5,
    ),
}
"""Presets by name. ``ci``: about 2 minutes on 2 CPU cores, sft, opd and rlvr only, at 10× the learning rates.
``classroom``: about 7 minutes, every run. ``paper``: about 15 minutes, the paper's OPD and RLVR step counts
(300 and 1000)."""
