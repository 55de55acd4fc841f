"""Choosing the next token from full-vocabulary logits: temperature, top-k, top-p (pure functions).

The recorded behaviour log-prob of a sampled token is its log-probability under the
temperature-scaled distribution *before* top-k/top-p truncation: that is the distribution the trainer
evaluates (log-softmax of logits / temperature), so ``log pi_old - log mu`` is zero for on-policy samples.
"""

from __future__ import annotations

import torch


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k set and outside the smallest nucleus of mass >= top_p to -inf."""
    filtered = logits.clone()
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(filtered, top_k, dim=-1).values[..., -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(filtered, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p  # keeps at least the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        filtered = filtered.masked_fill(drop, float("-inf"))
    return filtered


def sample_next_tokens(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    greedy: bool = False,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits`` [n, V]; return ``(tokens [n], behaviour_logprobs [n])``.

    Columns at or beyond ``vocab_size`` (vocabulary padding) are never chosen. They are cut off before
    drawing rather than masked: the multinomial draw consumes generator state per column, and the
    padding width depends on the tensor-parallel size, so masking would make the samples of a seeded
    generator differ between layouts (e.g. after resuming a TP=2 checkpoint with TP=1).
    """
    scaled = logits.float() / temperature
    logprobs = torch.log_softmax(scaled, dim=-1)
    allowed = scaled
    if vocab_size is not None and vocab_size < scaled.shape[-1]:
        allowed = scaled[..., :vocab_size]
    if greedy:
        tokens = allowed.argmax(dim=-1)
    else:
        probs = torch.softmax(filter_top_k_top_p(allowed, top_k, top_p), dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
