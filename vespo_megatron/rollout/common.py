"""What both decoders share: the request, the result, prompt checks, the uniforms table, stop rules and the
collectives that keep the ranks of a model-parallel group sampling the same tokens.

The decoders are :func:`vespo_megatron.rollout.decode.decode` (KV cache, the default) and
:func:`vespo_megatron.rollout.recompute.generate` (its reference); :func:`vespo_megatron.rollout.decoders.sample`
picks one. Both take a :class:`DecodeRequest` and return a :class:`Generated`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vespo_megatron.config import RolloutConfig
from vespo_megatron.rollout.sampling import sample_next_tokens
from vespo_megatron.runtime.collectives import from_last_stage, gather_last_dim


@dataclass(frozen=True)
class DecodeRequest:
    """How to sample one response per prompt: the decoders' shared arguments.

    A response ends at ``eos_id`` (one stop id, or a list of them: an HF model's generation_config often lists
    several), at the end of any of ``stop_sequences`` (token ids) or after ``settings.max_new_tokens`` tokens.
    """

    settings: RolloutConfig
    """The ``rollout`` section: max_new_tokens, temperature, top_k/top_p, the decoder and its precision."""
    seq_length: int
    """Context of ``seq_length + 1`` tokens (prompt + response + padding)."""
    eos_id: int | list[int]
    pad_id: int
    generator: Optional[torch.Generator] = None
    """Draws the uniforms table when ``uniforms`` is None."""
    uniforms: Optional[torch.Tensor] = None
    """``[max_new_tokens, n]`` table drawn by the caller (several seeded shares decoded as one batch)."""
    greedy: bool = False
    vocab_size: Optional[int] = None
    """The tokenizer's: keeps the padding rows of Megatron's padded vocabulary from being sampled (the recorded
    log-probs stay those of the full softmax the trainer evaluates)."""
    stop_sequences: tuple[tuple[int, ...], ...] = ()


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


def concat_generated(parts: list[Generated]) -> Generated:
    """One :class:`Generated` of the rows of ``parts`` in order (the batches of one step's rollout)."""
    def cat(name):
        values = [getattr(part, name) for part in parts]
        return None if any(v is None for v in values) else torch.cat(values)

    return Generated(
        sequences=cat("sequences"), prompt_lengths=cat("prompt_lengths"), response_lengths=cat("response_lengths"),
        sampler_logprobs=cat("sampler_logprobs"), routing_indices=cat("routing_indices"),
        kv_cache_bytes=max(part.kv_cache_bytes for part in parts), token_versions=cat("token_versions"),
    )


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


def padded_prompts(prompts: list[list[int]], request: DecodeRequest) -> torch.Tensor:
    """``[n, seq_length + 1]``: each prompt at the start of its row, ``pad_id`` after it."""
    sequences = torch.full((len(prompts), request.seq_length + 1), request.pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        sequences[row, : len(prompt)] = torch.tensor(prompt)
    return sequences


def draw_uniforms(generator: torch.Generator, max_new_tokens: int, n: int) -> torch.Tensor:
    """``[max_new_tokens, n]`` uniforms: entry (k, i) draws sequence i's k-th response token.

    Both decoders draw this table first, so a seeded generator gives the same samples whatever the
    batch composition (finished rows dropped or not) and on every rank of a model-parallel group.
    """
    return torch.rand(max_new_tokens, n, generator=generator)


def uniforms_table(request: DecodeRequest, n: int) -> torch.Tensor:
    """The decoders' ``[max_new_tokens, n]`` table: ``request.uniforms`` when the caller drew it, else drawn
    from ``request.generator``."""
    max_new_tokens = request.settings.max_new_tokens
    if request.uniforms is None:
        return draw_uniforms(request.generator, max_new_tokens, n)
    if tuple(request.uniforms.shape) != (max_new_tokens, n):
        raise ValueError(f"uniforms of shape {tuple(request.uniforms.shape)} given for {n} prompts of up to "
                         f"{max_new_tokens} new tokens; expected ({max_new_tokens}, {n})")
    return request.uniforms


def stop_id_set(eos_id) -> frozenset[int]:
    """``eos_id`` as a set of stop ids (an int, or a list of ints)."""
    return frozenset([int(eos_id)] if isinstance(eos_id, int) else (int(i) for i in eos_id))


def hits_stop(response: list[int], eos_id, stop_sequences: tuple[tuple[int, ...], ...] = ()) -> bool:
    """True when ``response`` (token ids sampled so far) ends with a stop id (``eos_id``: one or a list)
    or a stop sequence."""
    if response and response[-1] in stop_id_set(eos_id):
        return True
    return any(len(response) >= len(stop) and tuple(response[-len(stop):]) == stop for stop in stop_sequences)


def lockstep_group(engine):
    """The data-parallel group when MoE expert parallelism couples data-parallel ranks' forwards, else None.

    Expert dispatch exchanges tokens over the EP group, which spans data-parallel ranks: those ranks must
    run the same number of forwards even when one of them has no sequence left to decode.
    """
    ctx = engine.ctx
    if engine.config.model.is_moe and ctx.dp > 1 and (ctx.ep > 1 or ctx.etp > 1):
        return ctx.dp_group
    return None


LOGIT_CHUNK_ROWS = 8192
"""Vocabulary rows of the output layer converted to fp32 at a time by :func:`shard_logits`."""


def shard_logits(hidden: torch.Tensor, weight: torch.Tensor, chunk_rows: int = LOGIT_CHUNK_ROWS) -> torch.Tensor:
    """fp32 logits ``[b, V / tp]`` of ``hidden`` ``[b, h]`` on this rank's output-layer shard ``weight`` ``[V / tp, h]``.

    The products are fp32 as before, but a bf16 weight is converted ``chunk_rows`` vocabulary rows at a time
    (``chunk_rows x h`` fp32 of temporary memory instead of a copy of the whole shard); an fp32 weight is used
    as it is.
    """
    hidden = hidden.float()
    if weight.dtype == torch.float32:
        return hidden @ weight.t()
    out = torch.empty(hidden.shape[0], weight.shape[0], dtype=torch.float32, device=hidden.device)
    for lo in range(0, weight.shape[0], chunk_rows):
        out[:, lo:lo + chunk_rows] = hidden @ weight[lo:lo + chunk_rows].float().t()
    return out


def gather_vocab(shard: torch.Tensor, ctx) -> torch.Tensor:
    """Full-vocabulary logits ``[b, V]`` from this rank's vocabulary shard ``[b, V / tp]`` (all-gather over TP)."""
    return gather_last_dim(shard, ctx.tp_group)


def sample_and_share(logits: Optional[torch.Tensor], n: int, uniforms: torch.Tensor, request: DecodeRequest,
                     ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[n]`` and their sampler log-probs (float64), on the CPU, on every pipeline stage.

    The last stage samples from ``logits`` with the CPU ``uniforms`` ``[n]`` (moved where the logits are, so a
    seeded generator picks the same uniforms on every device), then broadcasts to the other stages.
    """
    tokens = torch.zeros(n, dtype=torch.long)
    logprobs = torch.zeros(n, dtype=torch.float64)
    if ctx.is_last_stage:
        settings = request.settings
        tokens, logprobs = sample_next_tokens(
            logits, vocab_size=request.vocab_size, temperature=settings.sampling_temperature, top_k=settings.top_k,
            top_p=settings.top_p, greedy=request.greedy, uniforms=uniforms.to(logits.device),
        )
    if ctx.pp > 1:
        packed = from_last_stage(torch.stack([tokens.double().cpu(), logprobs.double().cpu()]), ctx.pp_group)
        tokens, logprobs = packed[0].long(), packed[1]
    return tokens.cpu(), logprobs.cpu()
