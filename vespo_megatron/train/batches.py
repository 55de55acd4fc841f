"""Micro-batches in the layout Megatron's GPTModel expects, and their context-parallel split.

A micro-batch is a dict of ``[b, s]`` tensors: ``tokens`` (model input), ``labels`` (the next token of
each position), ``loss_mask`` (1.0 where the label is trained on), ``position_ids``; RL batches add
per-token and per-sequence fields (see :mod:`vespo_megatron.rl.batch`). Every rank of a pipeline builds
the same micro-batches; with context parallelism each rank keeps its two load-balanced chunks of the
sequence dimension (chunks r and 2*cp-1-r, :func:`~vespo_megatron.runtime.collectives.context_parallel_chunks`),
the layout Megatron's attention expects.
"""

from __future__ import annotations

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
