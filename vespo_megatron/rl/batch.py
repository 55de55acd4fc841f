"""One rollout's sequences as stale-policy training data, split into mini- and micro-batches.

A :class:`Rollout` is what one data-parallel rank sampled in one step (or read from an inference
engine's JSONL): right-padded sequences, where each response starts, the sampler's per-token log-probs,
rewards and group advantages, and the old-policy log-prob sums computed right after sampling with the
sampling weights (the behaviour policy mu of the VESPO weight). ``micro_batches`` turns a subset of its
rows into the ``[b, s]`` dicts the Megatron schedule consumes, already split for context parallelism;
``minibatch_rows`` chooses those rows for each update (contiguous whole groups).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from vespo_megatron.train.batches import causal_lm_batch, shard_micro_batch


@dataclass
class Rollout:
    """Sequences of one step on one data-parallel rank (all tensors on CPU)."""

    sequences: torch.Tensor
    """[n, seq_length + 1] prompt + response + padding."""
    prompt_lengths: torch.Tensor
    """[n]"""
    response_lengths: torch.Tensor
    """[n]"""
    sampler_logprobs: torch.Tensor
    """[n, seq_length + 1] the sampler's log-prob of each response token at its position."""
    rewards: torch.Tensor
    """[n]"""
    advantages: torch.Tensor
    """[n]"""
    old_logprob_sums: Optional[torch.Tensor] = None
    """[n] sum over the response of log pi_old (trainer weights at sampling time)."""
    trainer_logprob_sums: Optional[torch.Tensor] = None
    """[n] sum over the response of the trainer's log-probs as the rollout entered training (the mismatch
    metrics' side of the comparison with the sampler; ``old_logprob_sums`` with loss.behaviour=recompute)."""
    ref_logprob_sums: Optional[torch.Tensor] = None
    """[n] sum over the response of log pi_ref (frozen reference; only with rl.kl_coef > 0)."""
    old_token_logprobs: Optional[torch.Tensor] = None
    """[n, seq_length] per-label log pi_old (token-level losses only)."""
    generated_lengths: Optional[torch.Tensor] = None
    """[n] sampled response lengths before group filtering (for metrics)."""
    behaviour_version: int = 0
    """Optimizer updates applied before these sequences were sampled."""
    step_index: int = 0
    """The RL step whose prompts these are (the prompt stream's position and the sampling seed)."""
    token_versions: Optional[torch.Tensor] = None
    """Partial rollouts: [n, seq_length + 1] policy version each response token was sampled with (-1
    elsewhere); ``behaviour_version`` is then the oldest of them."""
    routing_indices: Optional[torch.Tensor] = None
    """[n, moe_layers_local, s_local, topk] experts each of this rank's local tokens visited in the
    behaviour pass (rollout.routing_replay; see vespo_megatron/models/routing.py)."""
    routing_mismatch_frac: Optional[torch.Tensor] = None
    """Share of the sampler's routed (token, layer) slots where the trainer's own top-k picks other experts
    (0-dim, over all ranks; only when the sampler recorded the routing)."""

    @property
    def size(self) -> int:
        return int(self.sequences.shape[0])

    def response_token_mask(self) -> torch.Tensor:
        """[n, seq_length + 1] 1 on response tokens."""
        positions = torch.arange(self.sequences.shape[1]).unsqueeze(0)
        start = self.prompt_lengths.unsqueeze(1)
        return ((positions >= start) & (positions < start + self.response_lengths.unsqueeze(1))).long()

    def sampler_logprob_sums(self) -> torch.Tensor:
        return (self.sampler_logprobs * self.response_token_mask()).sum(dim=1)

    def select(self, rows: torch.Tensor) -> "Rollout":
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            picked[f.name] = value[rows] if torch.is_tensor(value) and value.dim() > 0 else value
        return Rollout(**picked)

    def state_dict(self) -> dict:
        """Tensors and ints only (safe to save and load with ``weights_only``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Rollout":
        return cls(**state)


def minibatch_rows(size: int, group_size: int, num_minibatches: int, shuffle_groups: bool = False,
                   seed: int = 0) -> list[torch.Tensor]:
    """Row indices of each of the ``num_minibatches`` updates of a rollout of ``size`` rows.

    The rollout's rows hold its groups one after another (``group_size`` responses per prompt); the rows
    are split into equal contiguous parts, so every mini-batch holds whole groups whenever
    ``num_minibatches`` divides the number of groups (more mini-batches than groups split each group over
    consecutive updates). ``shuffle_groups`` first permutes the order of the groups with ``seed`` while
    the rows of a group stay together.
    """
    if size % group_size or size % num_minibatches:
        raise ValueError(f"{size} rows are not whole groups of {group_size} split into {num_minibatches} mini-batches")
    groups = torch.arange(size // group_size)
    if shuffle_groups:
        groups = groups[torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed))]
    rows = (groups.unsqueeze(1) * group_size + torch.arange(group_size)).reshape(-1)
    return list(rows.chunk(num_minibatches))


def micro_batches(rollout: Rollout, rows: torch.Tensor, micro_batch_size: int, ctx) -> list[dict]:
    """``[b, s]`` micro-batch dicts (CP-sharded) of ``rows``, with the per-sequence RL fields."""
    if len(rows) % micro_batch_size:
        raise ValueError(f"{len(rows)} rows are not divisible by micro_batch_size={micro_batch_size}")
    mask = rollout.response_token_mask()
    sampler_sums = rollout.sampler_logprob_sums()
    batches = []
    for chunk in rows.split(micro_batch_size):
        batch = causal_lm_batch(rollout.sequences[chunk], mask[chunk])
        batch["sampler_logprobs"] = rollout.sampler_logprobs[chunk][:, 1:].contiguous()
        batch["rows"] = chunk  # rollout row of each sequence (named in error messages)
        batch["advantages"] = rollout.advantages[chunk].float()
        batch["response_lengths"] = rollout.response_lengths[chunk]
        batch["sampler_logprob_sums"] = sampler_sums[chunk].float()
        if rollout.old_logprob_sums is not None:
            batch["old_logprob_sums"] = rollout.old_logprob_sums[chunk].float()
        if rollout.ref_logprob_sums is not None:
            batch["ref_logprob_sums"] = rollout.ref_logprob_sums[chunk].float()
        batch = shard_micro_batch(batch, ctx)
        if rollout.routing_indices is not None:  # already this rank's local tokens: added after the CP split
            batch["routing_indices"] = rollout.routing_indices[chunk]
        batches.append(batch)
    return batches


def segment_ids(loss_mask: torch.Tensor) -> torch.Tensor:
    """``[s, b]`` sequence index of every response label (its batch row), -1 elsewhere."""
    rows = torch.arange(loss_mask.shape[0], device=loss_mask.device).unsqueeze(1).expand_as(loss_mask)
    return torch.where(loss_mask.bool(), rows, torch.full_like(rows, -1)).t().contiguous()
