"""The typed parameters of every policy loss (the ``loss.vespo``, ``loss.grpo``, ... config sections).

Each dataclass validates its own values on construction with a one-line error naming the field; the loss
functions that take them are in :mod:`vespo_megatron.loss.policy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vespo_megatron.loss.kernel import CorrectionParams


@dataclass(kw_only=True)
class PolicyLossParams:
    """Fields every policy loss shares."""

    correction: CorrectionParams = field(default_factory=CorrectionParams)
    """Train/inference correction; needs PolicyLossInputs.sampler_logprobs when mode != "none"."""

    def __post_init__(self) -> None:
        if isinstance(self.correction, dict):  # e.g. straight from YAML
            self.correction = CorrectionParams(**self.correction)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(kw_only=True)
class VespoParams(PolicyLossParams):
    """VESPO kernel phi(W) = W^k exp(lambda (1 - W)); (k, lambda) chosen by the advantage's sign."""

    k_pos: float = 2.0
    """k for sequences with advantage >= 0."""
    lambda_pos: float = 3.0
    """lambda for sequences with advantage >= 0."""
    k_neg: float = 3.0
    """k for sequences with advantage < 0."""
    lambda_neg: float = 2.0
    """lambda for sequences with advantage < 0."""
    length_normalize: bool = False
    """Ablation: divide each sequence's log-prob sum by its response length."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("k_pos", "k_neg"):
            value = getattr(self, name)
            _require(value >= 0, f"vespo.{name}={value} must be >= 0 (k >= 1 keeps phi <= C W); use e.g. 2.0")
        for name in ("lambda_pos", "lambda_neg"):
            value = getattr(self, name)
            _require(value > 0, f"vespo.{name}={value} must be > 0 (phi would not decay); use e.g. 2.0")


def _check_eps(owner: str, eps_low: float, eps_high: float) -> None:
    _require(0 <= eps_low < 1, f"{owner}.eps_low={eps_low} must be in [0, 1); the lower clip bound is 1 - eps_low")
    _require(eps_high >= 0, f"{owner}.eps_high={eps_high} must be >= 0; the upper clip bound is 1 + eps_high")


@dataclass(kw_only=True)
class GrpoParams(PolicyLossParams):
    """PPO token clip with dual clip, as used by GRPO."""

    eps_low: float = 0.2
    """Lower clip: ratios below 1 - eps_low stop pushing."""
    eps_high: float = 0.2
    """Upper clip: ratios above 1 + eps_high stop pushing (0.28 is the "clip-higher" choice)."""
    dual_clip_c: float | None = 3.0
    """Dual clip for A < 0: the token loss is capped at c |A|; None disables it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_eps("grpo", self.eps_low, self.eps_high)
        c = self.dual_clip_c
        _require(c is None or c > 1, f"grpo.dual_clip_c={c} must be > 1 or None; use 3.0 or None")


@dataclass(kw_only=True)
class GspoParams(PolicyLossParams):
    """GSPO: the sequence geometric-mean ratio, clipped."""

    eps_low: float = 3e-4
    """Lower clip on the sequence ratio."""
    eps_high: float = 4e-4
    """Upper clip on the sequence ratio."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_eps("gspo", self.eps_low, self.eps_high)


@dataclass(kw_only=True)
class SapoParams(PolicyLossParams):
    """SAPO: smooth sigmoid gate f(r) = sigmoid(tau (r - 1)) 4 / tau instead of a hard clip."""

    tau_pos: float = 1.0
    """Gate temperature for A > 0."""
    tau_neg: float = 1.05
    """Gate temperature for A <= 0 (a slightly sharper gate damps negative updates sooner)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("tau_pos", "tau_neg"):
            value = getattr(self, name)
            _require(value > 0, f"sapo.{name}={value} must be > 0; use e.g. 1.0")


@dataclass(kw_only=True)
class CispoParams(PolicyLossParams):
    """CISPO: a clipped, detached IS weight on the log-prob (REINFORCE-style gradient)."""

    eps_low: float = 1.0
    """Lower clip on the IS weight; 1.0 means no lower clip (the bound is 0)."""
    eps_high: float = 0.28
    """Upper clip on the IS weight."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0 <= self.eps_low <= 1, f"cispo.eps_low={self.eps_low} must be in [0, 1]; 1.0 disables it")
        _require(self.eps_high >= 0, f"cispo.eps_high={self.eps_high} must be >= 0; use e.g. 0.28")
