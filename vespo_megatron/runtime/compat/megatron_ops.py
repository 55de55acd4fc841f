"""Megatron functions that build or move CUDA tensors: the causal mask (P3), MoE split sizes (P7), and the
uneven all-gather / reduce-scatter that gloo lacks (P8)."""

from __future__ import annotations

import functools

import torch

from vespo_megatron.runtime.compat.base import once


# ---------------------------------------------------------------------------------------------- P3


@once("P3")
def shim_get_default_causal_mask() -> None:
    from megatron.core.transformer import utils as tutils

    @functools.lru_cache(maxsize=8)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    def get_sliding_window_causal_mask(sq, skv, window_size):
        ones = torch.ones(sq, skv, dtype=torch.bool)
        upper = torch.triu(ones, diagonal=skv - sq - window_size[0])
        return ~torch.tril(upper, diagonal=skv - sq + window_size[1])

    tutils.get_default_causal_mask = get_default_causal_mask
    tutils.get_sliding_window_causal_mask = get_sliding_window_causal_mask
    try:
        from megatron.core.fusions import fused_softmax
    except ImportError:
        return
    if hasattr(fused_softmax, "get_default_causal_mask"):
        fused_softmax.get_default_causal_mask = get_default_causal_mask
    if hasattr(fused_softmax, "get_sliding_window_causal_mask"):
        fused_softmax.get_sliding_window_causal_mask = get_sliding_window_causal_mask


# ---------------------------------------------------------------------------------------------- P7


@once("P7")
def shim_maybe_move_tensor_to_cpu() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if not torch.is_tensor(tensor):
            return tensor
        tensor = tensor.cpu()
        return tensor.numpy() if as_numpy else tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# ---------------------------------------------------------------------------------------------- P8


@once("P8")
def shim_uneven_split_mappings() -> None:
    from megatron.core.tensor_parallel import mappings

    upstream_gather = mappings._gather_along_first_dim
    upstream_reduce_scatter = mappings._reduce_scatter_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None:
            return upstream_gather(input_, group, None, use_global_buffer)
        world = torch.distributed.get_world_size(group)
        if world == 1:
            return input_
        sizes = [int(s) for s in output_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        chunks = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(chunks, padded.contiguous(), group=group)
        return torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes)], dim=0)

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None:
            return upstream_reduce_scatter(input_, group, None, use_global_buffer)
        world = torch.distributed.get_world_size(group)
        if world == 1:
            return input_
        total = input_.clone().contiguous()
        torch.distributed.all_reduce(total, group=group)
        rank = torch.distributed.get_rank(group)
        sizes = [int(s) for s in input_split_sizes]
        start = sum(sizes[:rank])
        return total[start : start + sizes[rank]].contiguous()

    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim
