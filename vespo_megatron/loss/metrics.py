"""Diagnostics of the policy losses as plain floats: phi statistics, ESS, clip fractions, KL, lengths.

Every function is pure, sees only detached tensors and returns `dict[str, float]` with keys such as
`vespo/phi_mean_pos`; the full list of keys and their definitions is in docs/loss.md ("Metrics").
Statistics over an empty group (e.g. no negative-advantage sequence) are NaN; the matching count key
says how many elements went in, so that a logger can weight or skip them.
"""

from __future__ import annotations

import torch

SILENCED_PHI = 1e-3
"""A sequence whose phi is below this counts as silenced."""


def to_floats(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Convert a dict of 0-dim tensors / numbers to plain floats with a single device sync."""
    if not values:
        return {}
    devices = [v.device for v in values.values() if isinstance(v, torch.Tensor)]
    device = next((d for d in devices if d.type != "cpu"), torch.device("cpu"))
    stacked = torch.stack(
        [torch.as_tensor(v, dtype=torch.float64, device=device).detach() for v in values.values()]
    )
    return dict(zip(values, stacked.tolist()))


def _nan() -> torch.Tensor:
    return torch.tensor(float("nan"), dtype=torch.float64)


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.double().mean() if x.numel() else _nan()


def _min(x: torch.Tensor) -> torch.Tensor:
    return x.double().min() if x.numel() else _nan()


def _max(x: torch.Tensor) -> torch.Tensor:
    return x.double().max() if x.numel() else _nan()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is set (NaN when there are none); detached."""
    return _mean(values.detach()[mask.bool()])


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """Normalised ESS `(sum w)^2 / (n sum w^2)` in [1/n, 1]; 0 when every weight is 0, NaN if n = 0."""
    w = weights.detach().double()
    if w.numel() == 0:
        return _nan()
    sum_sq = (w * w).sum()
    ess = w.sum() ** 2 / (w.numel() * sum_sq)
    return torch.where(sum_sq > 0, ess, torch.zeros_like(ess))


def vespo_metrics(
    log_w: torch.Tensor,
    phi: torch.Tensor,
    advantages: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> dict[str, float]:
    """|log W| mean/max, phi mean/min/max per advantage sign (A >= 0 is "pos"), silenced share, ESS.

    `keep` [B] (bool) zeroes the phi of sequences rejected by the train/inference correction.
    """
    log_w, phi, advantages = log_w.detach(), phi.detach(), advantages.detach()
    if keep is not None:
        phi = phi * keep.to(phi.dtype)
    positive = advantages >= 0
    out: dict[str, torch.Tensor | float] = {
        "vespo/log_w_abs_mean": _mean(log_w.abs()),
        "vespo/log_w_abs_max": _max(log_w.abs()),
        "vespo/phi_mean": _mean(phi),
        "vespo/silenced_frac": _mean((phi < SILENCED_PHI).double()),
        "vespo/ess": effective_sample_size(phi),
    }
    for name, group in (("pos", positive), ("neg", ~positive)):
        out[f"vespo/num_{name}"] = group.sum()
        out[f"vespo/phi_mean_{name}"] = _mean(phi[group])
        out[f"vespo/phi_min_{name}"] = _min(phi[group])
        out[f"vespo/phi_max_{name}"] = _max(phi[group])
    return to_floats(out)


def fraction_metrics(prefix: str, flags: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, float]:
    """`{prefix}/{name}`: the share of masked positions where each boolean flag is set."""
    return to_floats({f"{prefix}/{name}": masked_mean(flag.double(), mask) for name, flag in flags.items()})


def kl_metrics(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> dict[str, float]:
    """Token-mean estimates of KL(pi_old || pi_theta) from samples of pi_old: k1 and k3."""
    log_r = (logprobs.detach() - old_logprobs.detach()).double()
    log_r = torch.where(response_mask.bool(), log_r, torch.zeros_like(log_r))
    k1 = -log_r
    k3 = torch.expm1(log_r) - log_r
    return to_floats({"kl/k1": masked_mean(k1, response_mask), "kl/k3": masked_mean(k3, response_mask)})


def response_length_metrics(response_mask: torch.Tensor) -> dict[str, float]:
    """Response length (tokens per sequence) mean/min/max and the total token count."""
    lengths = response_mask.detach().bool().sum(dim=-1).double()
    return to_floats(
        {
            "response/length_mean": _mean(lengths),
            "response/length_min": _min(lengths),
            "response/length_max": _max(lengths),
            "response/num_tokens": lengths.sum(),
        }
    )


def correction_metrics(
    log_term: torch.Tensor, keep: torch.Tensor, response_mask: torch.Tensor | None = None
) -> dict[str, float]:
    """Train/inference correction: mean log term and share kept, per sequence ([B] inputs) or per
    response token ([B, S] inputs with their `response_mask`)."""
    if response_mask is None:
        response_mask = torch.ones_like(keep, dtype=torch.bool)
    return to_floats(
        {
            "correction/log_term_mean": masked_mean(log_term, response_mask),
            "correction/keep_frac": masked_mean(keep.double(), response_mask),
        }
    )
