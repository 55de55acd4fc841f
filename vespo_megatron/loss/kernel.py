"""The VESPO kernel: sequence log importance weights, the train/inference correction, and phi.

Pure tensor math (no Megatron, no process groups). The formulas, and the kernel's properties
(phi(1) = 1, the peak at W = k / lambda, why k >= 1 keeps the weight dominated by W), live in
docs/loss.md; the docstrings here only say what goes in and what comes out.

Shapes: B sequences, S token positions; `response_mask` [B, S] marks the response tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

LOG_RATIO_CLAMP = 20.0
"""Each token's log-ratio is clamped to +-LOG_RATIO_CLAMP before it enters a sequence sum."""

LOG_W_CLAMP = 20.0
"""The sequence log weight (after the correction term) is clamped to +-LOG_W_CLAMP before phi."""

LAMBDA_FLOOR = 1e-4
"""phi's lambda is floored here so that lambda * W never degenerates to an exactly flat kernel."""

CorrectionMode = Literal["none", "tis", "mis"]
CorrectionLevel = Literal["token", "sequence"]
CORRECTION_MODES = ("none", "tis", "mis")
CORRECTION_LEVELS = ("token", "sequence")


def _float_mask(response_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return response_mask.to(dtype=like.dtype)


def token_log_ratio(
    logprobs: torch.Tensor, base_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """Per-token `logprobs - base_logprobs` clamped to +-LOG_RATIO_CLAMP, zero off the mask. [B, S]."""
    diff = (logprobs - base_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    # torch.where (not a multiply) so that a non-finite value on a padding position cannot leak in.
    return torch.where(response_mask.bool(), diff, torch.zeros_like(diff))


def sequence_log_ratio(
    logprobs: torch.Tensor, base_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """`log W` without correction: the plain sum over response tokens of the clamped log-ratios. [B].

    Differentiable in `logprobs`; callers that feed phi detach it (`vespo_phi` does so itself).
    """
    return token_log_ratio(logprobs, base_logprobs, response_mask).sum(dim=-1)


def check_correction_args(mode: str, level: str, tis_threshold: float, mis_lower: float,
                          mis_upper: float) -> None:
    """Raise ValueError naming the bad train/inference correction setting."""
    if mode not in CORRECTION_MODES:
        raise ValueError(f"correction.mode={mode!r} is unknown; use one of {CORRECTION_MODES}")
    if level not in CORRECTION_LEVELS:
        raise ValueError(f"correction.level={level!r} is unknown; use one of {CORRECTION_LEVELS}")
    if mode == "tis" and not tis_threshold > 0:
        raise ValueError(f"correction.tis_threshold={tis_threshold} must be > 0 (it is the ratio cap C)")
    if mode == "mis" and not 0 <= mis_lower < mis_upper:
        raise ValueError(
            f"correction.mis_lower={mis_lower}, correction.mis_upper={mis_upper}: need 0 <= mis_lower < mis_upper"
        )


def _log_bounds(mis_lower: float, mis_upper: float) -> tuple[float, float]:
    log_lower = math.log(mis_lower) if mis_lower > 0 else -math.inf
    return log_lower, math.log(mis_upper)


@dataclass(kw_only=True)
class CorrectionParams:
    """Train/inference mismatch correction between pi_old (trainer) and pi_sampler (engine)."""

    mode: str = "none"
    """One of none, tis (truncated IS: the ratio capped at tis_threshold), mis (masked IS)."""
    level: str = "sequence"
    """sequence (one ratio per sequence) or token (per-token ratios; see docs/loss.md)."""
    tis_threshold: float = 2.0
    """TIS cap C on pi_old / pi_sampler."""
    mis_lower: float = 0.5
    """MIS: ratios below this are masked out."""
    mis_upper: float = 2.0
    """MIS: ratios above this are masked out."""

    def __post_init__(self) -> None:
        check_correction_args(self.mode, self.level, self.tis_threshold, self.mis_lower, self.mis_upper)


@torch.no_grad()
def train_inference_token_log_correction(
    old_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    mode: CorrectionMode = "none",
    tis_threshold: float = 2.0,
    mis_lower: float = 0.5,
    mis_upper: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level train/inference correction: (log term [B, S], keep [B, S] bool), both detached.

    d_t = clamp(log pi_old - log pi_sampler): "tis" gives min(d_t, log C); "mis" gives d_t and
    drops tokens whose ratio lies outside [mis_lower, mis_upper]; "none" gives zeros. Off the
    mask the term is 0 and keep is False.
    """
    check_correction_args(mode, "token", tis_threshold, mis_lower, mis_upper)
    mask = response_mask.bool()
    d = token_log_ratio(old_logprobs.detach(), sampler_logprobs.detach(), mask)
    if mode == "none":
        return torch.zeros_like(d), mask.clone()
    if mode == "tis":
        return d.clamp(max=math.log(tis_threshold)), mask.clone()
    log_lower, log_upper = _log_bounds(mis_lower, mis_upper)
    keep = mask & (d >= log_lower) & (d <= log_upper)
    return torch.where(keep, d, torch.zeros_like(d)), keep


@torch.no_grad()
def train_inference_log_correction(
    old_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    mode: CorrectionMode = "none",
    level: CorrectionLevel = "sequence",
    tis_threshold: float = 2.0,
    mis_lower: float = 0.5,
    mis_upper: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence train/inference correction: (log term [B], keep [B] bool), both detached.

    The log term is added to `log W`; a sequence with keep False gets weight zero.
    level "sequence": D = sum_t d_t; "tis" gives min(D, log C); "mis" gives D and keeps the
    sequence only if exp(D) lies in [mis_lower, mis_upper].
    level "token": the sum over tokens of the token-level terms; for "mis" the sequence is kept
    only if every response token's ratio lies inside the bounds.
    Sequences without response tokens get term 0 and keep True (they carry no loss anyway).
    """
    check_correction_args(mode, level, tis_threshold, mis_lower, mis_upper)
    mask = response_mask.bool()
    num_sequences = mask.shape[0]
    if mode == "none":
        return old_logprobs.new_zeros(num_sequences), mask.new_ones(num_sequences)
    if level == "token":
        term, keep_tok = train_inference_token_log_correction(
            old_logprobs, sampler_logprobs, mask, mode, tis_threshold, mis_lower, mis_upper
        )
        return term.sum(dim=-1), (keep_tok | ~mask).all(dim=-1)
    seq = sequence_log_ratio(old_logprobs.detach(), sampler_logprobs.detach(), mask)
    if mode == "tis":
        return seq.clamp(max=math.log(tis_threshold)), mask.new_ones(num_sequences)
    log_lower, log_upper = _log_bounds(mis_lower, mis_upper)
    keep = ((seq >= log_lower) & (seq <= log_upper)) | ~mask.any(dim=-1)
    return torch.where(keep, seq, torch.zeros_like(seq)), keep


def clamp_log_w(log_w: torch.Tensor) -> torch.Tensor:
    """Clamp a sequence log weight to +-LOG_W_CLAMP."""
    return log_w.clamp(-LOG_W_CLAMP, LOG_W_CLAMP)


def vespo_log_w(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    correction_log_term: torch.Tensor | None = None,
) -> torch.Tensor:
    """Detached, clamped `log W` [B]: sequence log-ratio + optional correction term."""
    log_w = sequence_log_ratio(logprobs.detach(), old_logprobs.detach(), response_mask)
    if correction_log_term is not None:
        log_w = log_w + correction_log_term.detach()
    return clamp_log_w(log_w)


def log_phi(log_w: torch.Tensor, k: torch.Tensor | float, lam: torch.Tensor | float) -> torch.Tensor:
    """`log phi = lam + k log W - lam W` with W = exp(log W); no clamping, no floor."""
    return lam + k * log_w - lam * torch.exp(log_w)


def vespo_phi(
    log_w: torch.Tensor,
    advantages: torch.Tensor,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
) -> torch.Tensor:
    """The VESPO weight phi(W) = W^k exp(lambda (1 - W)) per sequence, detached. [B].

    `log_w` [B] is clamped to +-LOG_W_CLAMP here as well (idempotent after `vespo_log_w`).
    Advantage >= 0 takes (k_pos, lambda_pos), < 0 takes (k_neg, lambda_neg); lambda is floored at
    LAMBDA_FLOOR; non-finite values become 0. The result never carries a gradient.
    """
    log_w = clamp_log_w(log_w.detach())
    positive = advantages.detach() >= 0
    k = torch.where(positive, log_w.new_tensor(k_pos), log_w.new_tensor(k_neg))
    lam = torch.where(
        positive,
        log_w.new_tensor(max(lambda_pos, LAMBDA_FLOOR)),
        log_w.new_tensor(max(lambda_neg, LAMBDA_FLOOR)),
    )
    phi = torch.exp(log_phi(log_w, k, lam))
    return torch.where(torch.isfinite(phi), phi, torch.zeros_like(phi))


def phi_peak(k: float, lam: float) -> tuple[float, float]:
    """(W*, phi(W*)) = (k / lam, (k / lam)^k exp(lam - k)): where phi peaks and its value."""
    lam = max(lam, LAMBDA_FLOOR)
    w_star = k / lam
    return w_star, math.exp(lam - k) * w_star**k
