"""Train one part of the zoo (a pretrained model or a run), checkpointing like a Hugging Face trainer.

A run's checkpoints ``runs/<name>/checkpoint-N/`` hold bf16 ``model.safetensors``, ``config.json`` and
``trainer_state.json`` (the step, and the held-out accuracy in ``log_history``), plus ``training_state.pt`` (fp32
master weights, Adam state, random generator state, log history) from which a stopped run resumes bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ZooError
from ..files import replacing
from ..progress import progress_bar
from .models import bf16_state, build_model, load_model, qwen3_config, save_model
from .objectives import grpo_advantages, mix_advantages, opd_advantages, ppo_clip_loss, sft_loss
from .presets import RUNS, Preset, RunSpec
from .rollout import accuracy, generate, response_logits, response_logprobs
from .task import Task, exact_match, make_task

__all__ = ["Cancelled", "STATE", "Variant", "derived_seed", "pretrain", "run_entry", "train_run"]

STATE = "training_state.pt"


def derived_seed(seed: int, what: str) -> int:
    """The seed of one part of the zoo (``what``), independent of the others."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{what}".encode()).digest()[:8], "little") >> 1


def pretrain(out: Path, name: str, preset: Preset, seed: int, progress: bool, position: int | None = None) -> dict:
    """Pretrain ``base`` (student size, briefly) or ``teacher`` (larger, longer) from scratch on correct equations
    of the train split (next-token loss on the answer); save it to ``out/name`` and return its manifest entry."""
    task = _task(preset, seed)
    size, steps = (preset.student, preset.base_steps) if name == "base" else (preset.teacher, preset.teacher_steps)
    model = build_model(qwen3_config(size, task.prompt_len + task.answer_len), derived_seed(seed, f"{name}/init"))
    opt = _adamw(model, preset.pretrain_lr, (0.9, 0.95))
    gen = _generator(seed, f"{name}/data")
    bar = progress_bar(
        range(1, steps + 1), desc=f"pretrain {name}", unit="step", position=position, disable=not progress
    )
    for step in bar:
        _set_lr(opt, _cosine(step, steps, preset.pretrain_lr, 0.05, preset.pretrain_lr / 10))
        idx = torch.randint(len(task.train_prompts), (preset.pretrain_batch,), generator=gen)
        answers = task.train_answers[idx]
        sft_loss(response_logits(model, task.train_prompts[idx], answers), answers).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    acc = _accuracy(model, task, seed)
    save_model(out / name, model, steps, [{"step": steps, "eval_accuracy": acc}])
    return {"path": name, "step": steps, "accuracy": acc}


@dataclass(frozen=True)
class Variant:
    """A run trained again from one of its own checkpoints under a constraint (see :mod:`opd_lens.zoo.retrain`):
    saved as run ``name`` with method label ``method``, continuing from checkpoint ``start`` of the original (its
    weights, Adam state and random state), with ``attach(model, optimizer)`` — a context manager — active."""

    name: str
    method: str
    start: int
    attach: Callable


class Cancelled(Exception):
    """Training stopped on request; what was saved resumes on the next call."""


def train_run(
    out: Path,
    name: str,
    preset: Preset,
    seed: int,
    progress: bool,
    position: int | None = None,
    *,
    variant: Variant | None = None,
    stop: threading.Event | None = None,
    on_step: Callable[[int, int, dict | None], None] | None = None,
) -> dict:
    """Train run ``name`` of the zoo in ``out/runs/name`` from its origin (``out/base`` or ``out/anchor``),
    resuming from its last complete checkpoint; return its manifest entry. Each checkpoint logs the held-out
    accuracy and the mean training ``loss`` (SFT) or rollout ``reward`` (the teacher's rollouts when off-policy).

    ``variant`` trains a constrained copy instead (in ``out/runs/<variant.name>``); ``stop`` set ends training
    (raising :class:`Cancelled`) after the current step; ``on_step(step, total, record)`` follows progress, with the
    checkpoint's log record when one was saved.
    """
    spec, total, saves = RUNS[name], preset.steps(name), preset.save_steps(name)
    task = _task(preset, seed)
    run_dir = out / "runs" / (variant.name if variant else name)
    model = load_model(out / spec.origin)
    teacher = load_model(out / "teacher").eval()
    if spec.sft:
        opt = _adamw(model, 10 * preset.lr, (0.9, 0.95))
        step_fn = _sft_steps(model, opt, teacher, task, preset, seed)
    else:
        opt = _adamw(model, preset.lr, (0.9, 0.98), eps=1e-15 if spec.rlvr else 1e-8)
        step_fn = _policy_gradient_steps(model, opt, teacher, spec, task, preset)
    gen = _generator(seed, f"runs/{name}")
    step, history = _resume(run_dir, saves, model, opt, gen)
    if variant is not None and step == 0:
        step, history = variant.start, _load_state(out / "runs" / name / f"checkpoint-{variant.start}", model, opt, gen)
    bar = progress_bar(
        total=total, initial=step, desc=run_dir.name, unit="step", position=position, disable=not progress
    )
    metrics: list[dict[str, float]] = []
    with variant.attach(model, opt) if variant else contextlib.nullcontext():
        while step < total:
            if stop is not None and stop.is_set():
                bar.close()
                raise Cancelled(f"{run_dir.name}: stopped at step {step} of {total}")
            done, stats = step_fn(step, gen)
            metrics.append(stats)
            step += done
            bar.update(done)
            record = None
            if step in saves:
                record = {"step": step, "eval_accuracy": _accuracy(model, task, seed)}
                history.append(record | {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]})
                metrics = []
                _save(run_dir / f"checkpoint-{step}", model, opt, gen, history)
                bar.set_postfix(accuracy=f"{record['eval_accuracy']:.3f}")
            if on_step is not None:
                on_step(step, total, record)
    bar.close()
    return run_entry(out, name, preset, variant)


def run_entry(out: Path, name: str, preset: Preset, variant: Variant | None = None) -> dict:
    """The manifest entry of the finished run ``name`` (or of its ``variant``): method, origin, steps and the log
    of every checkpoint."""
    spec, total = RUNS[name], preset.steps(name)
    path = f"runs/{variant.name if variant else name}"
    state = json.loads((out / path / f"checkpoint-{total}" / "trainer_state.json").read_text())
    entry = {"method": variant.method if variant else spec.method, "origin": spec.origin, "path": path}
    return entry | {"steps": total, "checkpoints": state["log_history"]}


def _task(preset: Preset, seed: int) -> Task:
    return make_task(preset.digits, preset.n_train, preset.n_eval, derived_seed(seed, "task"))


def _generator(seed: int, what: str) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, what))


def _adamw(model: torch.nn.Module, lr: float, betas: tuple[float, float], eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with weight decay 0.1 on matrices (embeddings, projections, lm_head), none on norms."""
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _cosine(step: int, total: int, peak: float, warmup: float, floor: float) -> float:
    """Linear warmup over a ``warmup`` fraction of ``total``, then cosine from ``peak`` down to ``floor``."""
    ramp = max(1, round(warmup * total))
    if step <= ramp:
        return peak * step / ramp
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (step - ramp) / max(1, total - ramp)))


def _accuracy(model: torch.nn.Module, task: Task, seed: int) -> float:
    """Held-out accuracy (avg@4) of the weights as saved (rounded to bf16); every model of a zoo is evaluated on
    the same random numbers, so differences between them are not sampling noise."""
    saved = copy.deepcopy(model)
    saved.load_state_dict(bf16_state(model))
    return accuracy(saved, task.eval_prompts, task.eval_answers, 4, _generator(seed, "eval"))


def _save(path: Path, model, opt: torch.optim.Optimizer, gen: torch.Generator, history: list[dict]) -> None:
    """The checkpoint as a trainer writes it, then the state to resume from (written last, so a checkpoint
    without it is trained again from the previous one)."""
    save_model(path, model, history[-1]["step"], history)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state()}
    with replacing(path / STATE) as tmp:
        torch.save(state | {"history": history}, tmp)


def _resume(run_dir: Path, saves: list[int], model, opt: torch.optim.Optimizer, gen: torch.Generator):
    """Load the last checkpoint of ``run_dir`` that holds a training state; return its step and log history
    (0 and empty when there is none)."""
    for step in reversed(saves):
        if (run_dir / f"checkpoint-{step}" / STATE).is_file():
            return step, _load_state(run_dir / f"checkpoint-{step}", model, opt, gen)
    return 0, []


def _load_state(checkpoint: Path, model, opt: torch.optim.Optimizer, gen: torch.Generator) -> list[dict]:
    """Load the training state saved with ``checkpoint``; return its log history."""
    path = checkpoint / STATE
    if not path.is_file():
        raise ZooError(f"{checkpoint}: no {STATE} to continue training from")
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    return state["history"]


StepFn = Callable[[int, torch.Generator], tuple[int, dict[str, float]]]
"""Trains from step ``done`` on; returns how many optimizer steps it took and statistics to log."""


def _sft_steps(model, opt, teacher, task: Task, preset: Preset, seed: int) -> StepFn:
    """SFT on teacher demonstrations (the teacher's temperature-1 samples for the first ``sft_demos`` train
    prompts): cross-entropy on the response, 10× the OPD/RLVR learning rate, cosine to 1× after 10% warmup."""
    prompts = task.train_prompts[: preset.sft_demos]
    demos = generate(teacher, prompts, task.answer_len, _generator(seed, "sft/demos"))

    def step(done: int, gen: torch.Generator) -> tuple[int, dict[str, float]]:
        _set_lr(opt, _cosine(done + 1, preset.sft_steps, 10 * preset.lr, 0.1, preset.lr))
        idx = torch.randint(len(prompts), (preset.sft_batch,), generator=gen)
        loss = sft_loss(response_logits(model, prompts[idx], demos[idx]), demos[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return 1, {"loss": loss.item()}

    return step


def _policy_gradient_steps(model, opt, teacher, spec: RunSpec, task: Task, preset: Preset) -> StepFn:
    """One rollout batch (``prompts`` × ``group`` samples at temperature 1.0), then one PPO-clip optimizer step
    per minibatch, the importance ratio taken against the policy that sampled (the student before the batch)."""

    def step(done: int, gen: torch.Generator) -> tuple[int, dict[str, float]]:
        idx = torch.randint(len(task.train_prompts), (preset.prompts,), generator=gen)
        prompts = task.train_prompts[idx].repeat_interleave(preset.group, 0)
        answers = task.train_answers[idx].repeat_interleave(preset.group, 0)
        responses = generate(teacher if spec.rollout == "teacher" else model, prompts, task.answer_len, gen)
        rewards = exact_match(responses, answers)
        with torch.no_grad():
            old_logp = response_logprobs(model, prompts, responses)
            adv = _advantages(spec, old_logp, teacher, prompts, responses, rewards, preset.group, gen)
        keep = torch.arange(len(prompts))
        if spec.rlvr:  # dynamic filter: a group whose rewards are all equal carries no signal
            keep = keep.view(-1, preset.group)[rewards.view(-1, preset.group).std(-1) > 0].flatten()
        for mb in keep[torch.randperm(len(keep), generator=gen)].tensor_split(preset.minibatches):
            if len(mb):  # a step whose samples were all filtered out is skipped
                logp = response_logprobs(model, prompts[mb], responses[mb])
                ppo_clip_loss(logp, old_logp[mb], adv[mb], *spec.clip).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return preset.minibatches, {"reward": rewards.mean().item()}

    return step


def _advantages(spec: RunSpec, student_logp, teacher, prompts, responses, rewards, group: int, gen) -> torch.Tensor:
    """Per-token advantages ``[B, T]`` of a rollout batch for ``spec``."""
    if spec.rlvr:
        return grpo_advantages(rewards, group).unsqueeze(-1).expand_as(student_logp)
    a_opd = opd_advantages(student_logp, response_logprobs(teacher, prompts, responses), spec.sparsify, gen)
    if spec.alpha == 1.0:
        return a_opd
    return mix_advantages(a_opd, grpo_advantages(rewards, group, std_normalize=False), spec.alpha)
