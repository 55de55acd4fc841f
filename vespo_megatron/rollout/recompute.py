"""The reference decoder (``rollout.engine=recompute``): autoregressive sampling by recompute, any
TP/SP/PP/VPP/CP/EP layout.

The default KV-cache decoder (:mod:`vespo_megatron.rollout.decode`) must sample exactly what this one
samples. Every step re-runs the forward-only pipeline schedule over the fixed-length padded batch (recompute
instead of a KV cache: simple, layout-agnostic, and cheap at the lengths CPU demos use). On the last
stage each rank projects the hidden state of every sequence's last position onto its vocabulary shard;
shards are gathered over TP and the position's owner contributes over CP, so every rank of the
model-parallel group sees the same full logits and, sampling with the same uniforms, draws the
same tokens. Other pipeline stages receive the tokens by broadcast from the last stage.
"""

from __future__ import annotations

import torch

from vespo_megatron.models.gpt import full_hidden, unwrap
from vespo_megatron.rollout.common import (
    DecodeRequest,
    Generated,
    check_prompts,
    gather_vocab,
    hits_stop,
    lockstep_group,
    padded_prompts,
    sample_and_share,
    shard_logits,
    uniforms_table,
)
from vespo_megatron.runtime.collectives import any_over, context_parallel_chunks, sum_tensor_over
from vespo_megatron.train.batches import shard_micro_batch


def _last_position_logits(hidden_full, weight, positions, ctx) -> torch.Tensor:
    """Full-vocabulary logits ``[b, V]`` at ``positions`` [b] (global positions in the sequence)."""
    seq_local = hidden_full.shape[0]
    local_positions = context_parallel_chunks(
        torch.arange(seq_local * ctx.cp).unsqueeze(0), ctx.cp, ctx.cp_rank
    ).squeeze(0)
    positions = positions.cpu()
    batch = hidden_full.shape[1]
    picked = torch.zeros(batch, hidden_full.shape[2], dtype=torch.float32, device=hidden_full.device)
    for row in range(batch):
        where = (local_positions == positions[row]).nonzero()
        if where.numel():
            picked[row] = hidden_full[int(where[0, 0]), row].float()
    if ctx.cp > 1:
        sum_tensor_over(picked, ctx.cp_group)
    return gather_vocab(shard_logits(picked, weight), ctx)


def _logits_head(ctx):
    def head(output, batch, model):
        hidden = full_hidden(output, ctx)
        logits = _last_position_logits(hidden, unwrap(model).output_weight(), batch["positions"], ctx)
        return (torch.zeros((), device=logits.device), torch.zeros((), dtype=torch.int, device=logits.device),
                {"logits": logits})

    return head


@torch.no_grad()
def generate(engine, prompts: list[list[int]], request: DecodeRequest) -> Generated:
    """Sample one response per prompt (repeat prompts for groups) with the engine's current weights.

    Every step runs the full padded batch; same contract and same samples as
    :func:`vespo_megatron.rollout.decode.decode`.
    """
    ctx = engine.ctx
    settings, seq_length = request.settings, request.seq_length
    n = len(prompts)
    prompt_lengths = check_prompts(prompts, settings.max_new_tokens, seq_length)
    uniforms = uniforms_table(request, n)
    sequences = padded_prompts(prompts, request)
    sampler_logprobs = torch.zeros(n, seq_length + 1)
    lengths = prompt_lengths.clone()
    finished = torch.zeros(n, dtype=torch.bool)
    num_micro = ctx.pp if ctx.vpp else 1
    if n % num_micro:
        raise ValueError(f"{n} sequences cannot be split into {num_micro} generation micro-batches")
    head = _logits_head(ctx)
    lockstep = lockstep_group(engine)
    for step in range(settings.max_new_tokens):
        if not any_over(n > 0 and not bool(finished.all()), lockstep):
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
        next_tokens, next_logprobs = sample_and_share(logits, n, uniforms[step], request, ctx)
        for row in (~finished).nonzero().flatten().tolist():
            sequences[row, lengths[row]] = next_tokens[row]
            sampler_logprobs[row, lengths[row]] = next_logprobs[row]
            lengths[row] += 1
            response = sequences[row, prompt_lengths[row]:lengths[row]].tolist()
            finished[row] = hits_stop(response, request.eos_id, request.stop_sequences)
    return Generated(
        sequences=sequences,
        prompt_lengths=prompt_lengths,
        response_lengths=lengths - prompt_lengths,
        sampler_logprobs=sampler_logprobs,
    )
