"""Micro-batches in the layout Megatron's GPTModel expects, and their context-parallel split.

A micro-batch is a dict of ``[b, s]`` tensors: ``tokens`` (model input), ``labels`` (the next token of
each position), ``loss_mask`` (1.0 where the label is trained on), ``position_ids``; RL batches add
per-token and per-sequence fields (see :mod:`vespo_megatron.rl.batch`). Every rank of a pipeline builds
the same micro-batches; with context parallelism each rank keeps its two load-balanced chunks of the
sequence dimension (chunks r and 2*cp-1-r, :func:`~vespo_megatron.runtime.collectives.context_parallel_chunks`),
the layout Megatron's attention expects.

A *packed* micro-batch (:func:`packed_lm_batch`) is one ``[1, t]`` row holding several sequences one
after another without padding (Megatron's THD format): ``position_ids`` restart at 0 for every sequence,
``sequence_index`` names the sequence of each position (-1 on alignment padding) and ``cu_seqlens`` /
``max_seqlen`` bound each sequence, from which :func:`packed_seq_params` builds Megatron's
``PackedSeqParams`` so that attention stays within a sequence and RoPE restarts per sequence.
"""

from __future__ import annotations

from typing import Optional

import torch

from vespo_megatron.runtime.collectives import SEQUENCE_DIM, context_parallel_chunks
from vespo_megatron.runtime.distributed import ParallelContext


def causal_lm_batch(sequences: torch.Tensor, loss_mask: torch.Tensor) -> dict:
    """Input/label pair from ``sequences`` [b, s+1]: predict token t+1 from tokens <= t.

    ``loss_mask`` [b, s+1] marks the tokens to be predicted (e.g. response tokens); it is shifted the
    same way as the labels.
    """
    if sequences.dim() != 2 or sequences.shape != loss_mask.shape:
        raise ValueError(f"sequences {tuple(sequences.shape)} and loss_mask {tuple(loss_mask.shape)} "
                         "must both be [batch, seq_len + 1]")
    tokens = sequences[:, :-1].contiguous()
    batch, seq = tokens.shape
    return {
        "tokens": tokens,
        "labels": sequences[:, 1:].contiguous(),
        "loss_mask": loss_mask[:, 1:].float().contiguous(),
        "position_ids": torch.arange(seq).unsqueeze(0).expand(batch, seq).contiguous(),
    }


def align_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= value`` (at least ``multiple``)."""
    return max(-(-value // multiple), 1) * multiple


def packed_lm_batch(sequences: torch.Tensor, loss_mask: torch.Tensor, lengths: list[int], align: int = 1,
                    width: Optional[int] = None) -> dict:
    """One packed ``[1, t]`` row from ``sequences`` [b, s+1]: the first ``lengths[i]`` input positions of each.

    Sequence ``i`` contributes tokens ``0 .. lengths[i]-1`` as inputs and ``1 .. lengths[i]`` as labels
    (the same pairs :func:`causal_lm_batch` makes); a sequence of length 0 takes no position. The row is
    padded at its end to a multiple of ``align`` (sequence parallelism splits it over TP ranks), or to exactly
    ``width`` positions when given (a fixed shape for the interleaved pipeline schedule), with positions of a
    segment of its own, never trained on. Extra fields: ``sequence_index`` [1, t] (long), ``cu_seqlens``
    [segments + 1] (int32, padding included as the last segment), ``max_seqlen`` (int).
    """
    if sequences.dim() != 2 or sequences.shape != loss_mask.shape or len(lengths) != sequences.shape[0]:
        raise ValueError(f"sequences {tuple(sequences.shape)}, loss_mask {tuple(loss_mask.shape)} and "
                         f"{len(lengths)} lengths must describe the same [batch, seq_len + 1] rows")
    parts: dict[str, list[torch.Tensor]] = {"tokens": [], "labels": [], "loss_mask": [], "position_ids": [],
                                            "sequence_index": []}
    segments = []
    for index, length in enumerate(lengths):
        if length == 0:
            continue
        parts["tokens"].append(sequences[index, :length])
        parts["labels"].append(sequences[index, 1:length + 1])
        parts["loss_mask"].append(loss_mask[index, 1:length + 1].float())
        parts["position_ids"].append(torch.arange(length))
        parts["sequence_index"].append(torch.full((length,), index, dtype=torch.long))
        segments.append(length)
    total = sum(segments)
    if width is not None and (width < total or width % align):
        raise ValueError(f"a packed row of width {width} cannot hold {total} positions in multiples of {align}")
    padding = (align_up(total, align) if width is None else width) - total
    if padding:
        parts["tokens"].append(torch.zeros(padding, dtype=sequences.dtype))
        parts["labels"].append(torch.zeros(padding, dtype=sequences.dtype))
        parts["loss_mask"].append(torch.zeros(padding))
        parts["position_ids"].append(torch.arange(padding))
        parts["sequence_index"].append(torch.full((padding,), -1, dtype=torch.long))
        segments.append(padding)
    batch = {key: torch.cat(values).unsqueeze(0).contiguous() for key, values in parts.items()}
    batch["cu_seqlens"] = torch.tensor([0] + segments, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    batch["max_seqlen"] = max(segments)
    return batch


def packed_seq_params(batch: dict):
    """Megatron's ``PackedSeqParams`` (THD) of a packed micro-batch on its device; None for a padded one."""
    if "cu_seqlens" not in batch:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens, longest = batch["cu_seqlens"], int(batch["max_seqlen"])
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def shard_micro_batch(batch: dict, ctx: ParallelContext) -> dict:
    """This rank's view of a micro-batch: ``[b, s]`` tensors split over CP; others kept as they are."""
    if ctx.cp == 1:
        return batch
    seq_len = batch["tokens"].shape[SEQUENCE_DIM]
    sharded = {}
    for key, value in batch.items():
        is_token_field = torch.is_tensor(value) and value.dim() >= 2 and value.shape[SEQUENCE_DIM] == seq_len
        sharded[key] = context_parallel_chunks(value, ctx.cp, ctx.cp_rank) if is_token_field else value
    return sharded


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """``batch`` with every tensor on ``device`` (non-blocking copies); a no-op for tensors already there.

    Micro-batches are built and stored on the CPU; this is where they enter the model. Non-tensor values
    are kept as they are.
    """
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}
