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
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits`` [n, V]; return ``(tokens [n], behaviour_logprobs [n])``.

    ``uniforms`` [n] in [0, 1) replaces the generator: row i takes the token whose cumulative-probability
    interval holds ``uniforms[i]`` (inverse-CDF sampling). A decoder that draws one uniform per
    (sequence, response position) up front then samples every sequence the same way whatever other
    sequences share its batch, which is what lets the KV-cache decoder drop finished rows and still
    match the recompute decoder token for token.

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
        if uniforms is None and generator is not None and generator.device != probs.device:
            # A CPU generator draws on the CPU, so a seed gives the same tokens on every device.
            tokens = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)
        elif uniforms is None:
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            tokens = inverse_cdf_sample(probs, uniforms)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Row i's token ``t`` with ``cdf[t-1] <= u_i * cdf[-1] < cdf[t]`` (zero-probability tokens never win)."""
    if uniforms.shape != probs.shape[:-1]:
        raise ValueError(f"uniforms {tuple(uniforms.shape)} must have one value per row of probs {tuple(probs.shape)}")
    cdf = torch.cumsum(probs.double(), dim=-1)
    target = (uniforms.double() * cdf[..., -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return tokens.clamp_max(probs.shape[-1] - 1)
