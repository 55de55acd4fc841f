"""Causal core attention with context parallelism for the local (non-Transformer-Engine) layer spec.

Megatron-Core's stock context parallelism lives in Transformer Engine's attention. Without TE this
module provides the same contract: with the sequence split over ``cp`` ranks into ``2*cp`` load-balanced
chunks (rank r holds chunks r and 2*cp-1-r, as ``megatron.core.utils.get_batch_on_this_cp_rank`` lays
them out), every rank all-gathers the keys and values of the whole sequence, rebuilds the global token
positions of its queries and of every key, and masks causally by position. The backward of the gather
sums the key/value gradients of all ranks and keeps this rank's slice, so gradients equal the
unsharded computation. Grouped-query attention repeats key/value heads as the stock module does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule


def load_balanced_positions(seq_len_local: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions of the ``seq_len_local`` tokens a CP rank holds (chunks r and 2*cp-1-r)."""
    chunk = seq_len_local // 2
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    mirror = 2 * cp_size - 1 - cp_rank
    second = torch.arange(mirror * chunk, (mirror + 1) * chunk, device=device)
    return torch.cat([first, second])


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over a group; backward sums the gradients of every rank, keeps this slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        world = dist.get_world_size(ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad.chunk(world, dim=0)[rank].contiguous(), None


class ContextParallelAttention(MegatronModule):
    """Drop-in ``core_attention`` for the local spec that supports ``context_parallel_size > 1``."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) != 0:
            raise ValueError("ContextParallelAttention supports attention_dropout=0 only")
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        if config.apply_query_key_layer_scaling:
            raise ValueError("ContextParallelAttention does not support apply_query_key_layer_scaling")
        self.cp_group = pg_collection.cp if pg_collection is not None else parallel_state.get_context_parallel_group()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("ContextParallelAttention does not support packed sequences or attention bias")
        cp_size = dist.get_world_size(self.cp_group) if self.cp_group is not None else 1
        cp_rank = dist.get_rank(self.cp_group) if self.cp_group is not None else 0
        sq = query.shape[0]
        if cp_size > 1:
            key = _GatherSequence.apply(key, self.cp_group)
            value = _GatherSequence.apply(value, self.cp_group)
            q_pos = load_balanced_positions(sq, cp_size, cp_rank, query.device)
            k_pos = torch.cat([load_balanced_positions(sq, cp_size, r, query.device) for r in range(cp_size)])
        else:
            q_pos = torch.arange(sq, device=query.device)
            k_pos = q_pos
        heads, groups = query.shape[2], key.shape[2]
        if heads != groups:
            key = key.repeat_interleave(heads // groups, dim=2)
            value = value.repeat_interleave(heads // groups, dim=2)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.softmax_scale
        masked = k_pos.unsqueeze(0) > q_pos.unsqueeze(1)
        scores = scores.masked_fill(masked, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        context = torch.matmul(probs, v)  # [b, n, sq, d]
        return context.permute(2, 0, 1, 3).reshape(sq, query.shape[1], heads * query.shape[3])
