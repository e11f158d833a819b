"""The zoo's task: multi-digit addition with a character tokenizer and an exact-match (verifiable) reward.

Every number is written least-significant digit first, zero-padded to a fixed width: the prompt holds two
``digits``-digit operands, ``a+b=``, the answer the ``digits + 1``-digit sum (123 + 456 = 579 with 3 digits is
``321+654=9750``). In this order each answer digit depends on the two digits in the same place and the carry, which a
tiny transformer learns in a few hundred steps. Prompts and answers have fixed lengths, so batches need no padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["VOCAB", "Task", "make_task", "encode", "decode", "exact_match"]

VOCAB = "0123456789+="
"""The character vocabulary; a token id is the character's index."""


def encode(text: str) -> list[int]:
    return [VOCAB.index(c) for c in text]


def decode(ids) -> str:
    return "".join(VOCAB[i] for i in ids)


@dataclass(frozen=True)
class Task:
    """Train and held-out problems as token tensors: prompts ``[N, 2·digits + 2]``, answers ``[N, digits + 1]``."""

    digits: int
    train_prompts: torch.Tensor
    train_answers: torch.Tensor
    eval_prompts: torch.Tensor
    eval_answers: torch.Tensor

    @property
    def prompt_len(self) -> int:
        return 2 * self.digits + 2

    @property
    def answer_len(self) -> int:
        return self.digits + 1


def make_task(digits: int, n_train: int, n_eval: int, seed: int) -> Task:
    """Distinct random problems from ``seed``, the first ``n_eval`` held out and the next ``n_train`` for training.
    Each operand has a random number of digits, 1 to ``digits``, so easy and hard problems mix and accuracy rises
    gradually rather than in one jump."""
    n = n_train + n_eval
    if n > 10 ** (2 * digits) // 2:
        raise ValueError(f"{n} problems asked of {digits}-digit addition, more than half of all there are")
    gen = torch.Generator().manual_seed(seed)
    picked: dict[tuple[int, int], None] = {}  # distinct pairs in drawing order
    while len(picked) < n:
        bound = 10 ** torch.randint(1, digits + 1, (2, n), generator=gen)  # each operand has 1..digits digits
        values = (torch.rand((2, n), generator=gen, dtype=torch.float64) * bound).long()
        picked.update(dict.fromkeys(zip(*values.tolist(), strict=True)))
    pairs = list(picked)[:n]
    prompts = torch.tensor([encode(f"{_lsb_first(a, digits)}+{_lsb_first(b, digits)}=") for a, b in pairs])
    answers = torch.tensor([encode(_lsb_first(a + b, digits + 1)) for a, b in pairs])
    return Task(digits, prompts[n_eval:], answers[n_eval:], prompts[:n_eval], answers[:n_eval])


def _lsb_first(n: int, width: int) -> str:
    return f"{n:0{width}d}"[::-1]


def exact_match(responses: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """The verifiable reward: 1.0 where the response equals the answer token for token, else 0.0."""
    return (responses == answers).all(-1).float()
