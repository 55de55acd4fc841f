"""Autoregressive sampling with the Megatron policy itself (any TP/SP/PP/VPP/CP/EP layout).

Every step re-runs the forward-only pipeline schedule over the fixed-length padded batch (recompute
instead of a KV cache: simple, layout-agnostic, and cheap at the lengths CPU demos use). On the last
stage each rank projects the hidden state of every sequence's last position onto its vocabulary shard;
shards are gathered over TP and the position's owner contributes over CP, so every rank of the
model-parallel group sees the same full logits and, sampling with the same seeded generator, draws the
same tokens. Other pipeline stages receive the tokens by broadcast from the last stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from vespo_megatron.config import RolloutConfig
from vespo_megatron.models.gpt import unwrap
from vespo_megatron.rollout.sampling import sample_next_tokens


@dataclass
class Generated:
    """Prompts with sampled responses, right-padded to ``seq_length + 1`` tokens."""

    sequences: torch.Tensor
    """[n, seq_length + 1] prompt + response + padding."""
    prompt_lengths: torch.Tensor
    """[n]"""
    response_lengths: torch.Tensor
    """[n] sampled tokens, the stop token included."""
    sampler_logprobs: torch.Tensor
    """[n, seq_length + 1] behaviour log-prob of each sampled token at its position (0 elsewhere)."""


def full_hidden(hidden: torch.Tensor, ctx) -> torch.Tensor:
    """Last-stage hidden states as every TP rank needs them for a vocabulary-parallel projection.

    With sequence parallelism the gather's backward is a reduce-scatter over TP; without it Megatron's
    copy-to-TP mapping all-reduces the gradient. Either way the partial input gradients that the
    vocabulary-parallel log-prob functions return get summed over TP, as the output layer would do.
    """
    from megatron.core import tensor_parallel

    if ctx.tp == 1:
        return hidden
    if ctx.sequence_parallel:
        return tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    return tensor_parallel.copy_to_tensor_model_parallel_region(hidden)


def vocab_start(model_chunk, ctx) -> int:
    return ctx.tp_rank * unwrap(model_chunk).output_weight().shape[0]


def _last_position_logits(hidden_full, weight, positions, ctx) -> torch.Tensor:
    """Full-vocabulary logits ``[b, V]`` at ``positions`` [b] (global positions in the sequence)."""
    from vespo_megatron.train.batches import context_parallel_chunks

    seq_local = hidden_full.shape[0]
    local_positions = context_parallel_chunks(
        torch.arange(seq_local * ctx.cp).unsqueeze(0), ctx.cp, ctx.cp_rank
    ).squeeze(0)
    batch = hidden_full.shape[1]
    picked = torch.zeros(batch, hidden_full.shape[2], dtype=torch.float32)
    for row in range(batch):
        where = (local_positions == positions[row]).nonzero()
        if where.numel():
            picked[row] = hidden_full[where[0, 0], row].float()
    if ctx.cp > 1:
        dist.all_reduce(picked, group=ctx.cp_group)
    shard = picked @ weight.float().t()
    if ctx.tp == 1:
        return shard
    parts = [torch.empty_like(shard) for _ in range(ctx.tp)]
    dist.all_gather(parts, shard.contiguous(), group=ctx.tp_group)
    return torch.cat(parts, dim=-1)


def _logits_head(ctx):
    def head(output, batch, model):
        hidden = full_hidden(output, ctx)
        logits = _last_position_logits(hidden, unwrap(model).output_weight(), batch["positions"], ctx)
        return torch.zeros(()), torch.zeros((), dtype=torch.int), {"logits": logits}

    return head


@torch.no_grad()
def generate(
    engine,
    prompts: list[list[int]],
    settings: RolloutConfig,
    *,
    seq_length: int,
    eos_id: int | list[int],
    pad_id: int,
    generator: torch.Generator,
    greedy: bool = False,
    vocab_size: int | None = None,
) -> Generated:
    """Sample one response per prompt (repeat prompts for groups) with the engine's current weights.

    ``vocab_size`` (the tokenizer's) keeps the padding rows of Megatron's padded vocabulary from being
    sampled; the recorded log-probs stay those of the full softmax the trainer evaluates. ``eos_id`` may
    be a list of stop ids (an HF model's generation_config lists several).
    """
    from vespo_megatron.train.batches import shard_micro_batch

    ctx = engine.ctx
    n = len(prompts)
    prompt_lengths = torch.tensor([len(p) for p in prompts])
    longest = int(prompt_lengths.max()) if n else 0
    if n and (int(prompt_lengths.min()) < 1):
        raise ValueError("every prompt needs at least one token")
    if longest + settings.max_new_tokens > seq_length + 1:
        raise ValueError(
            f"a prompt of {longest} tokens plus rollout.max_new_tokens={settings.max_new_tokens} exceeds the "
            f"context of {seq_length + 1} tokens; shorten prompts, lower max_new_tokens or raise model.max_seq_length"
        )
    sequences = torch.full((n, seq_length + 1), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        sequences[row, : len(prompt)] = torch.tensor(prompt)
    sampler_logprobs = torch.zeros(n, seq_length + 1)
    lengths = prompt_lengths.clone()
    finished = torch.zeros(n, dtype=torch.bool)
    num_micro = ctx.pp if ctx.vpp else 1
    if n % num_micro:
        raise ValueError(f"{n} sequences cannot be split into {num_micro} generation micro-batches")
    head = _logits_head(ctx)
    for _ in range(settings.max_new_tokens):
        if bool(finished.all()):
            break
        positions = lengths - 1
        micro = []
        for rows in torch.arange(n).chunk(num_micro):
            tokens = sequences[rows, :seq_length]
            batch = {
                "tokens": tokens,
                "position_ids": torch.arange(seq_length).unsqueeze(0).expand(len(rows), -1).contiguous(),
                "positions": positions[rows],
            }
            micro.append(shard_micro_batch(batch, ctx))
        reports = engine.forward_only(micro, head, emit_hidden_states=True)
        logits = torch.cat([r["logits"].view(len(rows), -1) for r, rows in
                            zip(reports, torch.arange(n).chunk(num_micro))]) if reports else None
        next_tokens = torch.zeros(n, dtype=torch.long)
        next_logprobs = torch.zeros(n)
        if ctx.is_last_stage:
            next_tokens, next_logprobs = sample_next_tokens(
                logits, vocab_size=vocab_size, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                generator=generator, greedy=greedy,
            )
        if ctx.pp > 1:
            last = dist.get_global_rank(ctx.pp_group, ctx.pp - 1)
            packed = torch.stack([next_tokens.double(), next_logprobs.double()])
            dist.broadcast(packed, src=last, group=ctx.pp_group)
            next_tokens, next_logprobs = packed[0].long(), packed[1].float()
        active = ~finished
        rows = active.nonzero().squeeze(-1)
        sequences[rows, lengths[rows]] = next_tokens[rows]
        sampler_logprobs[rows, lengths[rows]] = next_logprobs[rows]
        lengths[rows] += 1
        finished |= active & torch.isin(next_tokens, torch.as_tensor(eos_id, device=next_tokens.device))
    return Generated(
        sequences=sequences,
        prompt_lengths=prompt_lengths,
        response_lengths=lengths - prompt_lengths,
        sampler_logprobs=sampler_logprobs,
    )
