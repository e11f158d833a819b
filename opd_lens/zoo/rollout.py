"""Sampling, greedy decoding and response log-probabilities of fixed-length responses."""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from .objectives import token_logprobs
from .task import exact_match

__all__ = ["generate", "response_logits", "response_logprobs", "accuracy"]


@torch.no_grad()
def generate(model, prompts: torch.Tensor, n_tokens: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n_tokens`` response tokens per prompt (with a KV cache): sampled at temperature 1.0 from ``generator``,
    greedy if none."""
    # One cache, filled in place by every call, passed by the name this transformers takes (`cache` since 5.x,
    # `past_key_values` before), so no deprecated argument or output attribute is touched.
    cache = {_cache_argument(model): DynamicCache()}
    out = model(input_ids=prompts, use_cache=True, **cache)
    tokens = []
    for i in range(n_tokens):
        logits = out.logits[:, -1].float()
        if generator is None:
            token = logits.argmax(-1, keepdim=True)
        else:
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        tokens.append(token)
        if i + 1 < n_tokens:
            out = model(input_ids=token, use_cache=True, **cache)
    return torch.cat(tokens, 1)


def _cache_argument(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def response_logits(model, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """The logits ``[B, T, V]`` that predict each response token (one forward pass over prompt + response)."""
    seq = torch.cat([prompts, responses[:, :-1]], 1)
    return model(input_ids=seq, use_cache=False).logits[:, prompts.shape[1] - 1 :]


def response_logprobs(model, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """log π(a_t | s_t) of every response token, ``[B, T]``."""
    return token_logprobs(response_logits(model, prompts, responses), responses)


@torch.no_grad()
def accuracy(model, prompts: torch.Tensor, answers: torch.Tensor, samples: int, generator: torch.Generator) -> float:
    """Held-out accuracy avg@``samples``: the mean exact-match reward of ``samples`` temperature-1.0 responses
    per prompt (the paper reports avg@8)."""
    responses = generate(model, prompts.repeat_interleave(samples, 0), answers.shape[1], generator)
    return float(exact_match(responses, answers.repeat_interleave(samples, 0)).mean())
