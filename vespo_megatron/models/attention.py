"""Our attention variants for the local (non-Transformer-Engine) layer spec.

* :class:`ContextParallelAttention`: causal core attention with context parallelism (below);
* :class:`LocalCoreAttention`: the stock local core attention plus a packed-sequence (THD) path and a
  fused one-token decode step;
* :class:`KVCacheSelfAttention`: self-attention whose KV cache holds keys with RoPE applied.

With the Transformer Engine spec (GPU) none of these is used: TE's attention does CP and THD itself.

Context parallelism: Megatron-Core's stock CP lives in Transformer Engine's attention. Without TE this
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


# ------------------------------------------------------------------------ KV-cache decoding (inference)


def _self_attention_base():
    from megatron.core.transformer.attention import SelfAttention

    return SelfAttention


class KVCacheSelfAttention(_self_attention_base()):
    """``SelfAttention`` whose static KV cache holds keys with RoPE already applied.

    Megatron's static inference path caches raw keys and rotates the whole cached prefix again at every
    decode step (O(context) extra work per token). Here each key is rotated once, with its own
    position, before it is stored; queries are rotated as before. The rotation of a key depends only on
    its position, so the cached keys equal the ones the stock path rebuilds every step. Without an
    inference context (training, log-prob passes) this is the stock module.
    """

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb,
                                        rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                                        sequence_len_offset=None, *, inference_params=None):
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        if (inference_context is None or not inference_context.is_static_batching() or rotary_pos_emb is None
                or self.config.flash_decode or inference_params is not None):
            return super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin,
                rotary_pos_cos_sin, sequence_len_offset)
        q_pos_emb, k_pos_emb = rotary_pos_emb
        start = inference_context.sequence_len_offset
        end = start + key.size(0)
        key = apply_rotary_pos_emb(key, k_pos_emb[start:end], config=self.config,
                                   mscale=self._yarn_concentration_factor, cp_group=self.pg_collection.cp)
        query, key, value, _, mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, None, rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin,
            sequence_len_offset)
        return query, key, value, (q_pos_emb[start:end], None), mask_type, block_table


def _dot_product_attention_base():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention


class LocalCoreAttention(_dot_product_attention_base()):
    """Megatron's local ``DotProductAttention``, with a fused one-token decode step and a packed (THD) path.

    A decode step attends ``sq = 1`` query per sequence to ``sk`` cached keys, all visible. The stock
    module first materialises the grouped-query repeat of the whole cache; here the step goes through
    ``scaled_dot_product_attention`` with grouped heads instead (same scale, same result up to rounding).
    A packed micro-batch (``packed_seq_params`` in THD format, which the stock module refuses) goes through
    :func:`packed_causal_attention`: causal attention within each sequence of the packed row. Any other
    call (padded training, prefill, masks) is the stock module.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        if packed_seq_params is not None:
            if attention_bias is not None or self.training and self.config.attention_dropout > 0:
                raise ValueError("packed sequences on the local spec support neither attention bias nor dropout")
            return packed_causal_attention(query, key, value, packed_seq_params.cu_seqlens_q, scale)
        if query.shape[0] != 1 or key.shape[0] == 1 or attention_mask is not None or attention_bias is not None \
                or self.training and self.config.attention_dropout > 0:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        return decode_attention(query, key, value, scale)


def packed_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Causal attention restricted to each sequence of a packed (THD) row: ``[t, heads, d]`` -> ``[t, heads * d]``.

    ``cu_seqlens`` [k + 1] bounds the sequences (``cu_seqlens[-1] = t``); keys and values have ``groups``
    heads (grouped-query attention, passed to ``scaled_dot_product_attention`` as groups). Each sequence is
    its own call, so the work is the sum of the squared sequence lengths, not the square of the row's
    length. The RoPE rotation already applied to ``query`` and ``key`` restarted per sequence (Megatron's
    THD rotary path).
    """
    import torch.nn.functional as F

    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != query.shape[0]:
        raise ValueError(f"cu_seqlens {bounds} must run from 0 to the packed row's {query.shape[0]} tokens")
    grouped = key.shape[1] != query.shape[1]
    out = torch.empty(query.shape[0], query.shape[1], value.shape[2], dtype=query.dtype, device=query.device)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # [s, heads, d] -> [heads, s, d]
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        out[start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                        enable_gqa=grouped).transpose(0, 1)
    return out.reshape(query.shape[0], -1)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence over all of its cached keys: ``[1, b, heads, d]`` x ``[sk, b, groups, d]``.

    Returns ``[1, b, heads * d]``. Grouped-query heads go to ``scaled_dot_product_attention`` as groups,
    without materialising the repeated cache.
    """
    import torch.nn.functional as F

    # [s, b, heads, d] -> [b, heads, s, d]
    out = F.scaled_dot_product_attention(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3),
                                         value.permute(1, 2, 0, 3), scale=scale,
                                         enable_gqa=key.shape[2] != query.shape[2])
    return out.permute(2, 0, 1, 3).reshape(1, query.shape[1], -1)
