"""The training signals of the paper (reference/diagnostics.md §8–9), on fixed-length responses ``[B, T]``.

SFT is next-token cross-entropy on the response. OPD, RLVR and the controls are one policy-gradient family: a
per-token advantage ``A`` fed to the PPO-clip loss with the importance ratio against the rollout policy, no KL loss
and no entropy bonus. They differ only in how ``A`` is made:

- OPD: ``A_t = −r_t``, ``r_t = log π_student(a_t) − log π_teacher(a_t)`` on the sampled token (tinker/slime form);
- RLVR: the GRPO advantage of the binary reward, normalized within each group of samples of one prompt,
  broadcast to every token;
- token sparsification: ``r̃_t = (T / Σ_τ m_τ) · m_t · r_t`` with a top-KL (largest signed ``r_t``) or random mask;
- mixing: ``A = α·A_OPD + (1 − α)·A_GRPO`` with the GRPO advantage not divided by the group's std.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "token_logprobs",
    "sft_loss",
    "opd_advantages",
    "grpo_advantages",
    "sparsify_tokens",
    "mix_advantages",
    "ppo_clip_loss",
]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(a_t | s_t) of ``tokens [B, T]`` under ``logits [B, T, V]`` (fp32 log-softmax)."""
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``targets [B, T]`` under ``logits [B, T, V]``."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def opd_advantages(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    sparsify: tuple[str, float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-token OPD advantage ``−r_t``, ``r_t = log π_student − log π_teacher`` on the sampled tokens; with
    ``sparsify`` (mode, kept fraction) the signal is first sparsified by :func:`sparsify_tokens`."""
    r = student_logp - teacher_logp
    if sparsify is not None:
        r = sparsify_tokens(r, sparsify[1], sparsify[0], generator)
    return -r


def grpo_advantages(rewards: torch.Tensor, group_size: int, std_normalize: bool = True, eps: float = 1e-6):
    """GRPO advantage per sample: reward minus its group's mean, divided by the group's (unbiased) std + ``eps``
    unless ``std_normalize`` is false. ``rewards [B]`` holds consecutive groups of ``group_size`` samples."""
    r = rewards.view(-1, group_size)
    a = r - r.mean(-1, keepdim=True)
    if std_normalize:
        a = a / (r.std(-1, keepdim=True) + eps)
    return a.flatten()


def sparsify_tokens(r: torch.Tensor, keep: float, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token sparsification of the OPD signal ``r [B, T]``: keep ``ceil(keep·T)`` tokens per sample, those with the
    largest signed ``r_t`` (``mode="topkl"``) or uniformly random ones (``"random"``), and rescale by ``T / Σ m``."""
    n = r.shape[-1]
    k = math.ceil(keep * n)
    if mode == "topkl":
        score = r
    elif mode == "random":
        score = torch.rand(r.shape, generator=generator)
    else:
        raise ValueError(f"unknown sparsification mode {mode!r}; known: topkl, random")
    mask = torch.zeros_like(r).scatter_(-1, score.topk(k, -1).indices, 1.0)
    return (n / k) * mask * r


def mix_advantages(a_opd: torch.Tensor, a_grpo: torch.Tensor, alpha: float) -> torch.Tensor:
    """``α·A_OPD + (1 − α)·A_GRPO``: per-token ``a_opd [B, T]``, per-sample ``a_grpo [B]`` broadcast over tokens."""
    return alpha * a_opd + (1 - alpha) * a_grpo.unsqueeze(-1)


def ppo_clip_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> torch.Tensor:
    """Token-mean PPO-clip loss ``−min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A)``, ρ = π_θ / π_rollout per token."""
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    return -torch.minimum(ratio * advantages, clipped * advantages).mean()
