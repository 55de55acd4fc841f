"""The supervised warm-up before RL: cross-entropy updates on the task's demonstrations (its reference answers,
unless the task models an imperfect teacher: ``Task.demonstration``)."""

from __future__ import annotations

import torch

from vespo_megatron.rl.context import RLContext
from vespo_megatron.runtime.collectives import data_parallel_share
from vespo_megatron.tasks.base import Sample
from vespo_megatron.train.batches import causal_lm_batch, shard_micro_batch
from vespo_megatron.train.sft import sft_loss_head


def sft_micro_batches(context: RLContext, samples: list[Sample]) -> list[dict]:
    """Prompt + demonstration + eos per sample, loss on the demonstration's tokens, cut into micro-batches."""
    tok, seq_len = context.tokenizer, context.config.seq_length
    rows, masks = [], []
    for sample in samples:
        prompt = tok.encode_prompt(sample.prompt)
        answer = tok.encode(context.task.demonstration(sample)) + [tok.eos_id]
        ids = (prompt + answer)[: seq_len + 1]
        row = torch.full((seq_len + 1,), tok.pad_id, dtype=torch.long)
        row[: len(ids)] = torch.tensor(ids)
        mask = torch.zeros(seq_len + 1, dtype=torch.long)
        mask[len(prompt) : len(ids)] = 1
        rows.append(row)
        masks.append(mask)
    sequences, mask = torch.stack(rows), torch.stack(masks)
    mbs = context.config.train.micro_batch_size
    return [shard_micro_batch(causal_lm_batch(s, m), context.parallel)
            for s, m in zip(sequences.split(mbs), mask.split(mbs))]


def supervised_warmup(context: RLContext, steps: int) -> list[float]:
    """``steps`` cross-entropy updates on the task's demonstrations; returns the losses."""
    config, ctx = context.config, context.parallel
    warm = context.task.prompts()  # an independent stream: the RL prompt position is untouched
    losses = []
    for _ in range(steps):
        samples = data_parallel_share(warm.next_batch(config.train.global_batch_size), ctx.dp, ctx.dp_rank)
        result = context.engine.train_step(sft_micro_batches(context, samples), sft_loss_head,
                                           lr=config.rl.sft_lr or config.optimizer.lr)
        losses.append(result.metrics["sft/loss"])
    return losses
