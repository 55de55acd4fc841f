"""Every collective the RL wing runs besides the loss's one ``[B]`` all-reduce, each once, its group passed in.

The loss's sequence all-reduce is an autograd function and lives with the loss
(:mod:`vespo_megatron.loss.sequence`); what is here moves numbers that carry no gradient: metric sums and
maxima over data-parallel ranks, per-sequence vectors gathered for step metrics, the last pipeline stage's
results handed to every stage, and the context-parallel split of a sequence with its inverse. Each function
is a no-op copy when its group has one rank, so callers never test the layout themselves. Buffers go to the
device the group's backend needs (CPU for gloo, the current CUDA device for nccl).
"""

from __future__ import annotations

from typing import Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from vespo_megatron.runtime.distributed import collective_device

Item = TypeVar("Item")

SEQUENCE_DIM = 1
"""The sequence dimension of ``[batch, seq]`` micro-batch tensors."""


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """Ranks in ``group``; 1 when no process group exists (a single-process run)."""
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def sum_over(values: Sequence[float], group: Optional[dist.ProcessGroup]) -> list[float]:
    """Element-wise float64 sum of ``values`` over the ranks of ``group``."""
    tensor = torch.tensor(list(values), dtype=torch.float64)
    if group_size(group) == 1:
        return tensor.tolist()
    tensor = tensor.to(collective_device(group))
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()


def max_over(values: Sequence[float], group: Optional[dist.ProcessGroup]) -> list[float]:
    """Element-wise float64 maximum of ``values`` over the ranks of ``group``."""
    tensor = torch.tensor(list(values), dtype=torch.float64)
    if group_size(group) == 1:
        return tensor.tolist()
    tensor = tensor.to(collective_device(group))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor.tolist()


def sum_tensor_over(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """``tensor`` summed over the ranks of ``group``, in place on its own device (which must suit the group)."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def any_over(flag: bool, group: Optional[dist.ProcessGroup]) -> bool:
    """OR of ``flag`` over the ranks of ``group``."""
    if group_size(group) == 1:
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device(group))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return bool(tensor.item())


def gather_last_dim(shard: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """The shards of every rank of ``group`` joined along the last dimension in rank order (e.g. vocabulary
    shards of logits over tensor-parallel ranks), on ``shard``'s device."""
    ranks = group_size(group)
    if ranks == 1:
        return shard
    parts = [torch.empty_like(shard) for _ in range(ranks)]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def gather_objects(obj: Item, group: Optional[dist.ProcessGroup]) -> list[Item]:
    """``obj`` of every rank of ``group``, in group-rank order (pickled; for small metric payloads)."""
    if group_size(group) == 1:
        return [obj]
    gathered: list = [None] * group_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def from_last_stage(values: torch.Tensor, pp_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """The last pipeline stage's CPU ``values`` on every stage of ``pp_group`` (same shape and dtype there)."""
    stages = group_size(pp_group)
    if stages == 1:
        return values
    buffer = values.contiguous().to(collective_device(pp_group))
    dist.broadcast(buffer, src=dist.get_global_rank(pp_group, stages - 1), group=pp_group)
    return buffer.cpu()


def object_from_last_stage(obj: Item, pp_group: Optional[dist.ProcessGroup]) -> Item:
    """The last pipeline stage's ``obj`` on every stage of ``pp_group`` (pickled; for names and small metadata)."""
    stages = group_size(pp_group)
    if stages == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=dist.get_global_rank(pp_group, stages - 1), group=pp_group)
    return holder[0]


def data_parallel_share(items: Sequence[Item], dp: int, dp_rank: int) -> list[Item]:
    """Data-parallel rank ``dp_rank``'s contiguous ``len(items) / dp`` of ``items`` (rank order = item order)."""
    if len(items) % dp:
        raise ValueError(f"{len(items)} items do not split evenly over {dp} data-parallel ranks")
    per_rank = len(items) // dp
    return list(items[dp_rank * per_rank:(dp_rank + 1) * per_rank])


def data_parallel_rows(count: int, dp: int, dp_rank: int) -> torch.Tensor:
    """The row indices of :func:`data_parallel_share` for a tensor of ``count`` rows."""
    return torch.tensor(data_parallel_share(range(count), dp, dp_rank), dtype=torch.long)


def context_parallel_chunks(tensor: torch.Tensor, cp: int, cp_rank: int, dim: int = SEQUENCE_DIM) -> torch.Tensor:
    """Context-parallel rank ``cp_rank``'s load-balanced slice of ``tensor`` along ``dim``.

    The sequence is cut into ``2 * cp`` equal chunks; rank ``r`` keeps chunks ``r`` and ``2 * cp - 1 - r``
    (so causal-attention work is even across ranks), concatenated in that order: the layout Megatron's
    attention expects. Inverse: :func:`gather_context_parallel`.
    """
    if cp < 1 or not 0 <= cp_rank < cp:
        raise ValueError(f"cp_rank={cp_rank} must lie in [0, cp={cp})")
    if cp == 1:
        return tensor
    length = tensor.shape[dim]
    if length % (2 * cp):
        raise ValueError(f"sequence length {length} (dim {dim}) is not divisible by 2*cp={2 * cp}; "
                         "pad the batch to a multiple of 2*cp")
    chunks = tensor.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp - 1 - cp_rank]], dim=dim).contiguous()


def gather_context_parallel(values: torch.Tensor, cp_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Undo :func:`context_parallel_chunks` on ``[b, s_local]`` values: every rank gets the CPU ``[b, s]``."""
    cp = group_size(cp_group)
    if cp == 1:
        return values
    local = values.contiguous().to(collective_device(cp_group))
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local, group=cp_group)
    seq = values.shape[1] * cp
    positions = torch.cat([context_parallel_chunks(torch.arange(seq).unsqueeze(0), cp, rank).squeeze(0)
                           for rank in range(cp)])
    full = torch.empty(values.shape[0], seq, dtype=values.dtype)
    full[:, positions] = torch.cat(parts, dim=1).cpu()
    return full
