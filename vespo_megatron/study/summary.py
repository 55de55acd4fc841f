"""Per-cell summaries: windowed rewards, collapse events and the VESPO diagnostics (docs/results.md)."""

from __future__ import annotations

import math

COLLAPSE_DROP = 0.5
"""A cell collapses when its windowed reward falls below COLLAPSE_DROP x its best windowed reward."""
SILENCED = 0.5
"""A step is silenced when more than this fraction of sequences has phi < 1e-3 (vespo/silenced_frac)."""
PHI_KEYS = ("vespo/phi_mean", "vespo/ess", "vespo/abs_log_w_mean", "vespo/silenced_frac")
SAMPLER_GAP_KEY = "mismatch/seq_abs_log_ratio_mean"
"""Mean |sum_t log pi_trainer - log mu_sampler| per sequence as a rollout enters training: the sequence log-weight
that a behaviour-policy mismatch (or lag) puts in, whatever the loss (recorded under loss.behaviour=sampler)."""


def window(updates: int) -> int:
    return max(2, updates // 4)


def finite_mean(values) -> float | None:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def finite_std(values) -> float | None:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(finite) < 2:
        return None
    mean = sum(finite) / len(finite)
    return math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def reward_summary(rewards: list[float], updates: int) -> dict:
    """Final and best windowed reward (one value per optimizer update) and the reward-drop test.

    The reference for a drop is the larger of the best windowed reward and the first update's reward
    (sampled by the warm-start weights, the same for every cell), so a cell that falls at once counts too.
    """
    w = min(window(updates), max(len(rewards), 1))
    windowed = [sum(rewards[i : i + w]) / w for i in range(max(len(rewards) - w + 1, 0))]
    if not windowed:
        return {"final_reward": math.nan, "best_reward": math.nan, "window": w, "reward_drop": False,
                "lowest_after_best": math.nan}
    best = max(windowed)
    reference = max(best, rewards[0])
    lowest = min(windowed) if rewards[0] >= best else min(windowed[windowed.index(best):])
    return {"final_reward": windowed[-1], "best_reward": best, "window": w, "lowest_after_best": lowest,
            "reward_drop": reference > 0.1 and lowest < COLLAPSE_DROP * reference}


def collapse_events(reward_drop: bool, nonfinite: int, silenced: int) -> list[str]:
    return [name for name, hit in (("reward_drop", reward_drop), ("nonfinite", nonfinite), ("silenced", silenced))
            if hit]


def summarise(records: list[dict], updates: int) -> dict:
    """Rewards, collapse events and last-window VESPO diagnostics of one cell's per-update metrics.

    ``records`` holds one metrics dict per optimizer update (a rollout's N updates each carry the
    rollout's reward, so cells with different N are compared update by update).
    """
    rewards = [r["reward/mean"] for r in records]
    summary = reward_summary(rewards, updates)
    nonfinite = sum(1 for r in records if not math.isfinite(r.get("loss/value", 0.0))
                    or not math.isfinite(r.get("grad_norm", 0.0)))
    silenced = sum(1 for r in records if r.get("vespo/silenced_frac", 0.0) > SILENCED)
    last = records[-summary["window"]:]
    summary.update(first_reward=rewards[0] if rewards else None, nonfinite_steps=nonfinite, silenced_steps=silenced,
                   collapse=collapse_events(summary["reward_drop"], nonfinite, silenced),
                   phi={key: finite_mean(r.get(key) for r in last) for key in PHI_KEYS},
                   sampler_abs_log_ratio=finite_mean(r.get(SAMPLER_GAP_KEY) for r in records),
                   reward_history=rewards)
    return summary


def refresh(cell: dict, updates: int) -> dict:
    """Recompute a stored cell's reward fields and collapse events with the current definitions."""
    cell = dict(cell, **reward_summary(cell["reward_history"], updates))
    cell["collapse"] = collapse_events(cell["reward_drop"], cell["nonfinite_steps"], cell["silenced_steps"])
    return cell
