"""Autoregressive sampling with the Megatron policy by recompute (any TP/SP/PP/VPP/CP/EP layout).

This is the reference decoder (``rollout.engine=recompute``); the default KV-cache decoder lives in
:mod:`vespo_megatron.rollout.decode` and shares the pieces defined here (prompt checks, the uniforms
table, stop rules). Every step re-runs the forward-only pipeline schedule over the fixed-length padded batch (recompute
instead of a KV cache: simple, layout-agnostic, and cheap at the lengths CPU demos use). On the last
stage each rank projects the hidden state of every sequence's last position onto its vocabulary shard;
shards are gathered over TP and the position's owner contributes over CP, so every rank of the
model-parallel group sees the same full logits and, sampling with the same seeded generator, draws the
same tokens. Other pipeline stages receive the tokens by broadcast from the last stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from vespo_megatron.config import RolloutConfig
from vespo_megatron.models.gpt import unwrap
from vespo_megatron.rollout.sampling import sample_next_tokens
from vespo_megatron.runtime.distributed import collective_device


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
    routing_indices: Optional[torch.Tensor] = None
    """MoE, when recorded by the sampler: [n, moe_layers_local, s_local, topk] experts each of this rank's
    training tokens visited while sampling (:data:`vespo_megatron.models.routing.UNROUTED` where the sampler
    never fed the token), in the layout ``Rollout.routing_indices`` replays."""
    kv_cache_bytes: int = 0
    """Bytes of the KV cache the KV-cache decoder allocated on this rank (0 for the recompute decoder)."""
    token_versions: Optional[torch.Tensor] = None
    """Partial rollouts: [n, seq_length + 1] policy version each sampled token was drawn with (-1 elsewhere)."""


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
    positions = positions.cpu()
    batch = hidden_full.shape[1]
    picked = torch.zeros(batch, hidden_full.shape[2], dtype=torch.float32, device=hidden_full.device)
    for row in range(batch):
        where = (local_positions == positions[row]).nonzero()
        if where.numel():
            picked[row] = hidden_full[int(where[0, 0]), row].float()
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
        return (torch.zeros((), device=logits.device), torch.zeros((), dtype=torch.int, device=logits.device),
                {"logits": logits})

    return head


def check_prompts(prompts: list[list[int]], max_new_tokens: int, seq_length: int) -> torch.Tensor:
    """Prompt lengths ``[n]``, after checking every prompt fits the context with its response budget."""
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    if not prompts:
        return lengths
    empty = (lengths < 1).nonzero()
    if empty.numel():
        raise ValueError(f"prompt {int(empty[0, 0])} is empty; every prompt needs at least one token (e.g. BOS)")
    longest = int(lengths.max())
    context = seq_length + 1
    if longest >= context:
        raise ValueError(f"a prompt of {longest} tokens leaves no room in the context of {context} tokens "
                         "(seq_length + 1); shorten the prompt or raise model.max_seq_length / train.seq_length")
    if longest + max_new_tokens > context:
        raise ValueError(
            f"a prompt of {longest} tokens plus rollout.max_new_tokens={max_new_tokens} exceeds the "
            f"context of {context} tokens; shorten prompts, lower max_new_tokens or raise model.max_seq_length"
        )
    return lengths


def draw_uniforms(generator: torch.Generator, max_new_tokens: int, n: int) -> torch.Tensor:
    """``[max_new_tokens, n]`` uniforms: entry (k, i) draws sequence i's k-th response token.

    Both decoders draw this table first, so a seeded generator gives the same samples whatever the
    batch composition (finished rows dropped or not) and on every rank of a model-parallel group.
    """
    return torch.rand(max_new_tokens, n, generator=generator)


def uniforms_table(generator: Optional[torch.Generator], uniforms: Optional[torch.Tensor], max_new_tokens: int,
                   n: int) -> torch.Tensor:
    """The decoders' ``[max_new_tokens, n]`` table: ``uniforms`` when the caller drew it (several seeded shares
    decoded as one batch), else drawn from ``generator``."""
    if uniforms is None:
        return draw_uniforms(generator, max_new_tokens, n)
    if tuple(uniforms.shape) != (max_new_tokens, n):
        raise ValueError(f"uniforms of shape {tuple(uniforms.shape)} given for {n} prompts of up to {max_new_tokens} "
                         f"new tokens; expected ({max_new_tokens}, {n})")
    return uniforms


def stop_id_set(eos_id) -> frozenset[int]:
    """``eos_id`` as a set of stop ids (an int, or a list of ints)."""
    return frozenset([int(eos_id)] if isinstance(eos_id, int) else (int(i) for i in eos_id))


def hits_stop(response: list[int], eos_id, stop_sequences: tuple[tuple[int, ...], ...] = ()) -> bool:
    """True when ``response`` (token ids sampled so far) ends with a stop id (``eos_id``: one or a list)
    or a stop sequence."""
    if response and response[-1] in stop_id_set(eos_id):
        return True
    return any(len(response) >= len(stop) and tuple(response[-len(stop):]) == stop for stop in stop_sequences)


def any_rank_active(active: bool, group) -> bool:
    """OR of ``active`` over ``group`` (ranks that must run the same number of forwards)."""
    if group is None or dist.get_world_size(group) == 1:
        return active
    flag = torch.tensor([1 if active else 0], dtype=torch.int32, device=collective_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def lockstep_group(engine):
    """The data-parallel group when MoE expert parallelism couples data-parallel ranks' forwards, else None.

    Expert dispatch exchanges tokens over the EP group, which spans data-parallel ranks: those ranks must
    run the same number of forwards even when one of them has no sequence left to decode.
    """
    ctx = engine.ctx
    if engine.config.model.is_moe and ctx.dp > 1 and (ctx.ep > 1 or ctx.etp > 1):
        return ctx.dp_group
    return None


@torch.no_grad()
def generate(
    engine,
    prompts: list[list[int]],
    settings: RolloutConfig,
    *,
    seq_length: int,
    eos_id: int | list[int],
    pad_id: int,
    generator: Optional[torch.Generator],
    greedy: bool = False,
    uniforms: Optional[torch.Tensor] = None,
    vocab_size: int | None = None,
    stop_sequences: tuple[tuple[int, ...], ...] = (),
) -> Generated:
    """Sample one response per prompt (repeat prompts for groups) with the engine's current weights.

    The recompute decoder (``rollout.engine=recompute``), kept as the reference of the KV-cache decoder
    (:func:`vespo_megatron.rollout.decode.decode`): every step runs the full padded batch.
    ``vocab_size`` (the tokenizer's) keeps the padding rows of Megatron's padded vocabulary from being
    sampled; the recorded log-probs stay those of the full softmax the trainer evaluates. A response
    ends at ``eos_id`` (one stop id, or a list of them: an HF model's generation_config often lists
    several), at the end of any of ``stop_sequences`` (token ids) or after ``settings.max_new_tokens``
    tokens.
    """
    from vespo_megatron.train.batches import shard_micro_batch

    ctx = engine.ctx
    n = len(prompts)
    prompt_lengths = check_prompts(prompts, settings.max_new_tokens, seq_length)
    uniforms = uniforms_table(generator, uniforms, settings.max_new_tokens, n)
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
    lockstep = lockstep_group(engine)
    for step in range(settings.max_new_tokens):
        if not any_rank_active(n > 0 and not bool(finished.all()), lockstep):
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
                logits, vocab_size=vocab_size, temperature=settings.temperature, top_k=settings.top_k,
                top_p=settings.top_p, greedy=greedy, uniforms=uniforms[step].to(logits.device),
            )
        if ctx.pp > 1:
            last = dist.get_global_rank(ctx.pp_group, ctx.pp - 1)
            packed = torch.stack([next_tokens.double(), next_logprobs.double()]).to(collective_device(ctx.pp_group))
            dist.broadcast(packed, src=last, group=ctx.pp_group)
            next_tokens, next_logprobs = packed[0].long(), packed[1].float()
        next_tokens, next_logprobs = next_tokens.cpu(), next_logprobs.cpu()
        for row in (~finished).nonzero().flatten().tolist():
            sequences[row, lengths[row]] = next_tokens[row]
            sampler_logprobs[row, lengths[row]] = next_logprobs[row]
            lengths[row] += 1
            response = sequences[row, prompt_lengths[row]:lengths[row]].tolist()
            finished[row] = hits_stop(response, eos_id, stop_sequences)
    return Generated(
        sequences=sequences,
        prompt_lengths=prompt_lengths,
        response_lengths=lengths - prompt_lengths,
        sampler_logprobs=sampler_logprobs,
    )
