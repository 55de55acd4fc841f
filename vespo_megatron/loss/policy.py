"""Policy losses as pure functions of tensors: VESPO and the GRPO, GSPO, SAPO and CISPO baselines.

Every loss takes a `PolicyLossInputs` and its own typed params and returns a `PolicyLossOutput`: the
per-token loss [B, S] (zero off the response mask) and a dict of float metrics. Reducing the token
loss to a scalar is `aggregate.py`'s job. The formula of each loss is in docs/loss.md; `get_policy_loss`
looks one up by name. `vespo_sequence_loss` is the per-sequence form used by the sequence-parallel
path, which only holds per-sequence sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch

from vespo_megatron.loss import kernel
from vespo_megatron.loss import metrics as m
from vespo_megatron.loss.kernel import CorrectionParams
from vespo_megatron.loss.params import (
    CispoParams,
    GrpoParams,
    GspoParams,
    PolicyLossParams,
    SapoParams,
    VespoParams,
)

# ----------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True, kw_only=True, eq=False)
class PolicyLossInputs:
    """The tensors every policy loss reads. Shapes are checked on construction; `validate()` also
    checks values (it syncs with the device, so call it once per mini-batch, not per op)."""

    logprobs: torch.Tensor
    """[B, S] log pi_theta(y_t) under the current parameters; carries the gradient."""
    old_logprobs: torch.Tensor
    """[B, S] log-probs of the behaviour policy the mini-batch was sampled or evaluated under."""
    advantages: torch.Tensor
    """[B] one advantage per sequence (e.g. GRPO group-normalised rewards)."""
    response_mask: torch.Tensor
    """[B, S] bool or 0/1: True on response tokens, False on prompt and padding."""
    sampler_logprobs: torch.Tensor | None = None
    """[B, S] inference-engine log-probs; needed only by the train/inference correction."""

    def __post_init__(self) -> None:
        self._check_shapes()

    def _check_shapes(self) -> None:
        if self.logprobs.dim() != 2:
            raise ValueError(
                f"PolicyLossInputs.logprobs must be [B, S], got shape {tuple(self.logprobs.shape)}"
            )
        if not self.logprobs.is_floating_point():
            raise ValueError(f"PolicyLossInputs.logprobs must be floating point, got {self.logprobs.dtype}")
        shape = tuple(self.logprobs.shape)
        for name in ("old_logprobs", "response_mask", "sampler_logprobs"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(
                    f"PolicyLossInputs.{name} has shape {tuple(value.shape)} but logprobs has {shape}; "
                    "every [B, S] field must match logprobs"
                )
        if tuple(self.advantages.shape) != shape[:1]:
            raise ValueError(
                f"PolicyLossInputs.advantages has shape {tuple(self.advantages.shape)}; expected "
                f"({shape[0]},), one advantage per sequence (broadcast token advantages per sequence first)"
            )

    def validate(self, allow_empty_rows: bool = False) -> None:
        """Raise ValueError naming the field on a non-0/1 mask, a row without response tokens
        (unless `allow_empty_rows`), or non-finite values on response positions / in advantages."""
        self._check_shapes()
        mask = self.response_mask
        if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
            raise ValueError("PolicyLossInputs.response_mask must be bool or contain only 0 and 1")
        mask = mask.bool()
        empty = ~mask.any(dim=-1)
        if not allow_empty_rows and empty.any():
            rows = empty.nonzero().flatten().tolist()
            raise ValueError(
                f"PolicyLossInputs.response_mask has rows without any response token: {rows[:8]}; "
                "drop those sequences or call validate(allow_empty_rows=True) for padding rows"
            )
        for name in ("logprobs", "old_logprobs", "sampler_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_finite(f"PolicyLossInputs.{name}", value.detach(), mask)
        _check_finite("PolicyLossInputs.advantages", self.advantages.detach(), None)

    @property
    def response_lengths(self) -> torch.Tensor:
        """[B] number of response tokens per sequence (int64)."""
        return self.response_mask.bool().sum(dim=-1)


def _check_finite(name: str, value: torch.Tensor, mask: torch.Tensor | None) -> None:
    bad = ~torch.isfinite(value)
    if mask is not None:
        bad = bad & mask
    if bad.any():
        first = tuple(bad.nonzero()[0].tolist())
        where = " on response positions" if mask is not None else ""
        raise ValueError(f"{name} has {int(bad.sum())} non-finite values{where} (first at {first})")


# ---------------------------------------------------------------------------------------- outputs


class PolicyLossOutput(NamedTuple):
    token_loss: torch.Tensor
    """[B, S] loss per token, zero off the response mask."""
    metrics: dict[str, float]


class SequenceLossOutput(NamedTuple):
    seq_loss: torch.Tensor
    """[B] loss per sequence (the sum of its token losses)."""
    metrics: dict[str, float]


# ---------------------------------------------------------------------------------------- helpers


def _sampler_logprobs(inputs: PolicyLossInputs, correction: CorrectionParams) -> torch.Tensor:
    if inputs.sampler_logprobs is None:
        raise ValueError(
            f"correction.mode={correction.mode!r} needs PolicyLossInputs.sampler_logprobs; pass the "
            "inference engine's log-probs or set correction.mode='none'"
        )
    return inputs.sampler_logprobs


def _sequence_correction(inputs: PolicyLossInputs, c: CorrectionParams):
    """(log term [B], keep [B], metrics) of the correction, or (None, None, {}) when off."""
    if c.mode == "none":
        return None, None, {}
    term, keep = kernel.train_inference_log_correction(
        inputs.old_logprobs, _sampler_logprobs(inputs, c), inputs.response_mask, c.mode, c.level,
        c.tis_threshold, c.mis_lower, c.mis_upper,
    )
    return term, keep, m.correction_metrics(term, keep)


def _token_correction_weight(inputs: PolicyLossInputs, c: CorrectionParams):
    """Detached multiplicative weight ([B, S] or [B, 1]) for token-level losses, or None when off."""
    if c.mode == "none":
        return None, {}
    if c.level == "sequence":
        term, keep, metrics = _sequence_correction(inputs, c)
        return (term.exp() * keep.to(term.dtype)).unsqueeze(-1), metrics
    term, keep = kernel.train_inference_token_log_correction(
        inputs.old_logprobs, _sampler_logprobs(inputs, c), inputs.response_mask, c.mode,
        c.tis_threshold, c.mis_lower, c.mis_upper,
    )
    return term.exp() * keep.to(term.dtype), m.correction_metrics(term, keep, inputs.response_mask)


def _finish(token_loss: torch.Tensor, inputs: PolicyLossInputs, weight, metrics: dict) -> PolicyLossOutput:
    """Apply the correction weight, zero off-mask positions, add the shared metrics."""
    if weight is not None:
        token_loss = token_loss * weight
    token_loss = torch.where(inputs.response_mask.bool(), token_loss, torch.zeros_like(token_loss))
    metrics = {**metrics, **m.kl_metrics(inputs.logprobs, inputs.old_logprobs, inputs.response_mask),
               **m.response_length_metrics(inputs.response_mask)}
    return PolicyLossOutput(token_loss, metrics)


def _token_ratio(inputs: PolicyLossInputs) -> torch.Tensor:
    """r_t = exp(clamp(logp - old_logp)); differentiable in logprobs."""
    log_r = (inputs.logprobs - inputs.old_logprobs.detach()).clamp(-kernel.LOG_RATIO_CLAMP, kernel.LOG_RATIO_CLAMP)
    return torch.where(inputs.response_mask.bool(), log_r, torch.zeros_like(log_r)).exp()


# ------------------------------------------------------------------------------------------ VESPO


def vespo_sequence_loss(
    logprob_sum: torch.Tensor,
    log_w: torch.Tensor,
    advantages: torch.Tensor,
    params: VespoParams | None = None,
    keep: torch.Tensor | None = None,
    response_lengths: torch.Tensor | None = None,
) -> SequenceLossOutput:
    """Per-sequence VESPO loss `-phi(W) A S` [B] from the summed log-probs S = `logprob_sum` [B].

    `log_w` [B] already includes the correction term (it is detached and clamped here); `keep` [B]
    zeroes sequences rejected by MIS; `response_lengths` [B] is needed when params.length_normalize.
    """
    params = params or VespoParams()
    phi = kernel.vespo_phi(log_w, advantages, params.k_pos, params.lambda_pos, params.k_neg, params.lambda_neg)
    if keep is not None:
        phi = phi * keep.to(phi.dtype)
    coef = phi * advantages.detach().to(phi.dtype)
    if params.length_normalize:
        if response_lengths is None:
            raise ValueError("vespo.length_normalize=True needs response_lengths [B]; pass the response token counts")
        coef = coef / response_lengths.to(coef.dtype).clamp(min=1)
    metrics = m.vespo_metrics(kernel.clamp_log_w(log_w), phi, advantages)
    return SequenceLossOutput(-coef.to(logprob_sum.dtype) * logprob_sum, metrics)


def vespo_loss(inputs: PolicyLossInputs, params: VespoParams) -> PolicyLossOutput:
    """VESPO per-token loss `-phi(W) A log pi(y_t)` (docs/loss.md, "VESPO"); its token sum is the
    sequence loss, so the gradient is REINFORCE scaled by the detached phi."""
    term, keep, corr_metrics = _sequence_correction(inputs, params.correction)
    log_w = kernel.vespo_log_w(inputs.logprobs, inputs.old_logprobs, inputs.response_mask, term)
    mask = inputs.response_mask.bool()
    logprobs = torch.where(mask, inputs.logprobs, torch.zeros_like(inputs.logprobs))
    # Feeding ones as logprob_sum yields -phi A (or -phi A / L): the per-sequence token coefficient.
    coef, metrics = vespo_sequence_loss(
        torch.ones_like(log_w, dtype=logprobs.dtype), log_w, inputs.advantages, params, keep,
        inputs.response_lengths,
    )
    return _finish(coef.unsqueeze(-1) * logprobs, inputs, None, {**metrics, **corr_metrics})


# -------------------------------------------------------------------------------------- baselines


def grpo_loss(inputs: PolicyLossInputs, params: GrpoParams) -> PolicyLossOutput:
    """PPO token clip with dual clip (docs/loss.md, "GRPO")."""
    ratio = _token_ratio(inputs)
    adv = inputs.advantages.detach().to(ratio.dtype).unsqueeze(-1)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - params.eps_low, 1 + params.eps_high)
    loss = torch.maximum(unclipped, clipped)
    flags = {"clip_frac": clipped > unclipped}
    if params.dual_clip_c is not None:
        cap = -adv * params.dual_clip_c
        negative = (adv < 0).expand_as(loss)
        flags["dual_clip_frac"] = negative & (cap < loss)
        loss = torch.where(negative, torch.minimum(loss, cap), loss)
    weight, metrics = _token_correction_weight(inputs, params.correction)
    return _finish(loss, inputs, weight, {**metrics, **m.fraction_metrics("grpo", flags, inputs.response_mask)})


def gspo_loss(inputs: PolicyLossInputs, params: GspoParams) -> PolicyLossOutput:
    """GSPO: clipped sequence geometric-mean ratio in its token form (docs/loss.md, "GSPO")."""
    mask = inputs.response_mask.bool()
    lengths = inputs.response_lengths.clamp(min=1).to(inputs.logprobs.dtype)
    log_ratio = kernel.token_log_ratio(inputs.logprobs.detach(), inputs.old_logprobs.detach(), mask)
    seq_ratio = (log_ratio.sum(dim=-1) / lengths).exp().unsqueeze(-1)
    logprobs = torch.where(mask, inputs.logprobs, torch.zeros_like(inputs.logprobs))
    ratio = seq_ratio * (logprobs - logprobs.detach()).exp()  # value s, gradient s * grad logp_t
    adv = inputs.advantages.detach().to(ratio.dtype).unsqueeze(-1)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - params.eps_low, 1 + params.eps_high)
    loss = torch.maximum(unclipped, clipped)
    weight, metrics = _token_correction_weight(inputs, params.correction)
    seq_clipped = (clipped > unclipped)[:, 0]
    metrics = {**metrics, **m.fraction_metrics("gspo", {"clip_frac": seq_clipped}, mask.any(dim=-1))}
    return _finish(loss, inputs, weight, metrics)


def sapo_gate(ratio: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """f(r) = sigmoid(tau (r - 1)) 4 / tau; f'(1) = 1."""
    return torch.sigmoid(tau * (ratio - 1)) * (4 / tau)


def sapo_loss(inputs: PolicyLossInputs, params: SapoParams) -> PolicyLossOutput:
    """SAPO: token loss `-f(r_t) A` with a sign-dependent temperature (docs/loss.md, "SAPO")."""
    ratio = _token_ratio(inputs)
    adv = inputs.advantages.detach().to(ratio.dtype).unsqueeze(-1)
    tau = torch.where(adv > 0, ratio.new_tensor(params.tau_pos), ratio.new_tensor(params.tau_neg))
    loss = -sapo_gate(ratio, tau) * adv
    weight, metrics = _token_correction_weight(inputs, params.correction)
    with torch.no_grad():
        sig = torch.sigmoid(tau * (ratio - 1))
        slope = 4 * sig * (1 - sig)  # df/dr: the soft counterpart of a clip indicator
    metrics = {**metrics, **m.to_floats({"sapo/gate_slope_mean": m.masked_mean(slope, inputs.response_mask)})}
    return _finish(loss, inputs, weight, metrics)


def cispo_loss(inputs: PolicyLossInputs, params: CispoParams) -> PolicyLossOutput:
    """CISPO: `-sg[clip(r_t)] A log pi(y_t)` (docs/loss.md, "CISPO")."""
    ratio = _token_ratio(inputs).detach()
    lower, upper = 1 - params.eps_low, 1 + params.eps_high
    weight_is = ratio.clamp(lower, upper)
    adv = inputs.advantages.detach().to(ratio.dtype).unsqueeze(-1)
    mask = inputs.response_mask.bool()
    logprobs = torch.where(mask, inputs.logprobs, torch.zeros_like(inputs.logprobs))
    loss = -weight_is * adv * logprobs
    weight, metrics = _token_correction_weight(inputs, params.correction)
    flags = {"clip_frac_high": ratio > upper, "clip_frac_low": ratio < lower}
    return _finish(loss, inputs, weight, {**metrics, **m.fraction_metrics("cispo", flags, mask)})


# --------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class PolicyLoss:
    """A registered loss: its name, function and params dataclass."""

    name: str
    fn: Callable[[PolicyLossInputs, Any], PolicyLossOutput]
    params_cls: type

    def make_params(self, **kwargs: Any) -> PolicyLossParams:
        """Build this loss's params; a nested `correction` dict becomes CorrectionParams."""
        return self.params_cls(**kwargs)

    def __call__(self, inputs: PolicyLossInputs, params: PolicyLossParams | None = None) -> PolicyLossOutput:
        params = self.params_cls() if params is None else params
        if not isinstance(params, self.params_cls):
            raise TypeError(f"loss {self.name!r} takes {self.params_cls.__name__}, got {type(params).__name__}")
        return self.fn(inputs, params)


POLICY_LOSSES: dict[str, PolicyLoss] = {
    loss.name: loss
    for loss in (
        PolicyLoss("vespo", vespo_loss, VespoParams),
        PolicyLoss("grpo", grpo_loss, GrpoParams),
        PolicyLoss("gspo", gspo_loss, GspoParams),
        PolicyLoss("sapo", sapo_loss, SapoParams),
        PolicyLoss("cispo", cispo_loss, CispoParams),
    )
}


def get_policy_loss(name: str) -> PolicyLoss:
    """The registered loss called `name`; the error lists the known names."""
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"loss.name={name!r} is unknown; use one of {sorted(POLICY_LOSSES)}") from None
