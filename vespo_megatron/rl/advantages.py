"""GRPO-style group advantages (pure functions).

Rewards come as ``[num_prompts, group_size]``: every prompt's G responses form a group. The advantage
of a response is its reward minus the group mean, optionally divided by the group's standard deviation.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, std_normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """``[P, G]`` rewards -> ``[P, G]`` advantages (mean-centred per group, optionally std-scaled)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_prompts, group_size], got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; check the task's reward function")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not std_normalize or rewards.shape[1] == 1:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """``[P]`` bool: groups whose rewards are not all equal (the others carry no advantage signal)."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) > 0
