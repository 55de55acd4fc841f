"""One rollout's sequences as stale-policy training data, split into mini- and micro-batches.

A :class:`Rollout` is what one data-parallel rank sampled in one step (or read from an inference
engine's JSONL): right-padded sequences, where each response starts, the sampler's per-token log-probs,
rewards and group advantages, and the old-policy log-prob sums computed right after sampling with the
sampling weights (the behaviour policy mu of the VESPO weight). ``micro_batches`` turns a subset of its
rows into the dicts the Megatron schedule consumes (fixed-size, token-budget or packed; already split for
context parallelism); ``minibatch_rows`` chooses those rows for each update (contiguous whole groups).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from vespo_megatron.train.batches import align_up, causal_lm_batch, packed_lm_batch, shard_micro_batch
from vespo_megatron.train.microbatching import check_lengths, plan_micro_batches


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


def input_positions(rollout: Rollout) -> torch.Tensor:
    """[n] model input positions each sequence needs: prompt + response - 1 (the last token is only a
    label), 0 for a sequence without response tokens (nothing of it is trained on)."""
    needed = rollout.prompt_lengths + rollout.response_lengths - 1
    return torch.where(rollout.response_lengths > 0, needed, torch.zeros_like(needed))


def row_alignment(ctx) -> int:
    """Multiple the length of a micro-batch's rows must have: TP (sequence parallelism) x 2*CP chunks."""
    tp = ctx.tp if getattr(ctx, "sequence_parallel", False) else 1
    return tp * (2 * ctx.cp if ctx.cp > 1 else 1)


def micro_batch_rows(rollout: Rollout, rows: torch.Tensor, micro_batch_size: int, ctx,
                     max_tokens: Optional[int] = None, pack: bool = False,
                     count_multiple_of: int = 1) -> list[torch.Tensor]:
    """The rollout rows of each micro-batch: ``micro_batch_size`` consecutive rows, or, with ``max_tokens``,
    whole sequences binned by length (:func:`~vespo_megatron.train.microbatching.plan_micro_batches`: the
    same number of micro-batches on every data-parallel rank, a multiple of ``count_multiple_of``, a
    collective over ``ctx.dp_group``)."""
    if max_tokens is None:
        if len(rows) % micro_batch_size:
            raise ValueError(f"{len(rows)} rows are not divisible by micro_batch_size={micro_batch_size}")
        return list(rows.split(micro_batch_size))
    lengths = input_positions(rollout)[rows]
    check_lengths(lengths.tolist(), max_tokens, rows.tolist())
    if not pack:  # a padded row's length is rounded up to the alignment: bin by the rounded length
        lengths = torch.tensor([align_up(int(length), row_alignment(ctx)) for length in lengths])
    bins = plan_micro_batches(lengths.tolist(), max_tokens, pack, ctx.dp_group, count_multiple_of)
    return [rows[torch.tensor(members, dtype=torch.long)] for members in bins]


def packed_row_width(max_tokens: int, ctx) -> int:
    """The one width of every packed row under the interleaved (virtual) pipeline schedule: the token budget
    rounded up to the row alignment. That schedule sends activations of one shape (it cannot exchange shapes
    per micro-batch), so each packed row is padded to it; the bins fill rows close to the budget anyway."""
    return align_up(max_tokens, row_alignment(ctx))


def micro_batches(rollout: Rollout, rows: torch.Tensor, micro_batch_size: int, ctx, *,
                  max_tokens: Optional[int] = None, pack: bool = False, fixed_width: bool = False) -> list[dict]:
    """Micro-batch dicts (CP-sharded) of ``rows``, with the per-sequence RL fields.

    Without ``max_tokens``: ``micro_batch_size`` rows each, ``[b, seq_length]``. With it: token-budget
    micro-batches (:func:`micro_batch_rows`), each ``[b, w]`` with ``w`` its longest sequence (aligned),
    or, with ``pack``, one packed ``[1, t]`` row (:func:`~vespo_megatron.train.batches.packed_lm_batch`),
    ``t`` = :func:`packed_row_width` for every row with ``fixed_width``, and then as many micro-batches as a
    multiple of the pipeline size (the interleaved schedule's rule; a micro-batch may then hold only padding).
    Per-token RL fields (``sampler_logprobs``, and ``old_logprobs`` once the rollout has per-token old
    log-probs) are in the row layout ``[b, w]`` (:func:`row_layout`); ``rows`` names each sequence's
    rollout row.
    """
    mask = rollout.response_token_mask()
    sampler_sums = rollout.sampler_logprob_sums()
    positions = input_positions(rollout)
    seq_length = rollout.sequences.shape[1] - 1
    batches = []
    count_multiple_of = ctx.pp if fixed_width else 1
    for chunk in micro_batch_rows(rollout, rows, micro_batch_size, ctx, max_tokens, pack, count_multiple_of):
        width = seq_length
        if max_tokens is not None:
            longest = max(int(positions[chunk].max()) if len(chunk) else 0, 1)
            width = longest if pack else min(seq_length, align_up(longest, row_alignment(ctx)))
        if pack:
            batch = packed_lm_batch(rollout.sequences[chunk], mask[chunk], positions[chunk].tolist(),
                                    row_alignment(ctx), packed_row_width(max_tokens, ctx) if fixed_width else None)
        else:
            batch = causal_lm_batch(rollout.sequences[chunk][:, :width + 1], mask[chunk][:, :width + 1])
        batch["sampler_logprobs"] = rollout.sampler_logprobs[chunk][:, 1:width + 1].contiguous()
        if rollout.old_token_logprobs is not None:
            batch["old_logprobs"] = rollout.old_token_logprobs[chunk][:, :width].contiguous()
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


def config_micro_batches(config, rollout: Rollout, rows: torch.Tensor, ctx) -> list[dict]:
    """:func:`micro_batches` as ``config.train`` sets them (fixed size, token budget, packing)."""
    train = config.train
    return micro_batches(rollout, rows, train.micro_batch_size, ctx, max_tokens=train.max_tokens_per_microbatch,
                         pack=train.pack_sequences, fixed_width=bool(config.parallel.vpp))


def row_layout(batch: dict, values: torch.Tensor) -> torch.Tensor:
    """Per-token ``values`` of a micro-batch's model layout in the row layout ``[b, w]`` of its sequences.

    A padded micro-batch is already in it (returned as is); a packed ``[1, t]`` row is scattered to
    sequence ``sequence_index`` at column ``position_ids`` (differentiable), zeros elsewhere. ``w`` is
    the width of the batch's ``sampler_logprobs``.
    """
    if "sequence_index" not in batch:
        return values
    index, columns = batch["sequence_index"][0], batch["position_ids"][0]
    real = index >= 0
    shape = (batch["rows"].numel(), batch["sampler_logprobs"].shape[1])
    return values.new_zeros(shape).index_put((index[real], columns[real]), values[0][real])


def segment_ids(loss_mask: torch.Tensor, sequence_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[s, b]`` sequence index of every response label, -1 elsewhere.

    The index is the batch row, or for a packed row the ``sequence_index`` [1, t] of each position.
    """
    if sequence_index is None:
        sequence_index = torch.arange(loss_mask.shape[0], device=loss_mask.device).unsqueeze(1).expand_as(loss_mask)
    return torch.where(loss_mask.bool(), sequence_index, torch.full_like(sequence_index, -1)).t().contiguous()
