"""KV-cache sampling with the trainer's own Megatron model: prefill, then one token per step.

The decoder owns one megatron-core ``StaticInferenceContext``: every attention layer of this rank keeps
its keys and values there (``[positions, batch, kv_heads / tp, head_dim]`` per layer, keyed by the
global layer number), so a step feeds one token per sequence instead of the whole padded batch.

Batching. All sequences share one position counter (the context's ``sequence_len_offset``): the
prefill runs the first ``min(prompt lengths)`` tokens of every prompt at once; from then on each step
feeds position ``p`` of every live sequence, where a sequence whose prompt is longer than ``p`` feeds
its own next prompt token instead of a sample. Every token therefore sits at its true position with a
causal view of exactly its own prefix (no padding inside the cache, no masks), which is why the
log-probs equal the recompute decoder's. A sequence stops at the stop token, at the end of a stop
sequence or after ``max_new_tokens``; finished rows are dropped from the batch and from every layer's
cache at once, so they stop costing compute.

Layouts. The model runs in eval mode under ``torch.no_grad`` with its parameters untouched (no copy);
training mode, sequence-parallel flags and the hidden-state switch are restored afterwards
(:mod:`vespo_megatron.rollout.forward` runs the model).
- TP: each rank projects the last hidden state on its vocabulary shard; shards are all-gathered so all
  TP ranks see the same logits and, with the same uniforms, draw the same tokens.
- SP: Megatron's static inference runs without sequence parallelism (a one-token step cannot be
  scattered over TP ranks); like it we switch the SP flags off for the call (MoE layers keep theirs
  when both TP and EP exceed one, as Megatron does) and the layers all-reduce instead.
- PP/VPP: the stages run one after another, each receiving the previous stage's activations by p2p
  (one micro-batch per step); the last stage broadcasts the sampled tokens to the pipeline.
- DP: each data-parallel rank decodes its own prompts. With MoE expert parallelism the EP group spans
  data-parallel ranks, so those ranks agree every step whether any of them still decodes and an idle
  rank runs a one-token keep-alive forward to serve the expert exchange.
- CP: the KV path does not shard the sequence; with ``parallel.cp > 1``
  :func:`vespo_megatron.rollout.decoders.sample` falls back to
  the recompute decoder (documented in docs/rl.md).

Decode steps. After the prefill, dense single-stage models run each one-token step through
:class:`vespo_megatron.rollout.decode_step.LeanDecodeStep` (the same parameters and cache, without
Megatron's per-module overhead); ``rollout.kv_step: megatron`` or an unsupported model runs the full model
every step instead. The path taken and why is printed once per process
(:func:`vespo_megatron.rollout.decode_step.announce_decode_path`).

MoE routing (R3). With ``record_routing`` every router's expert choice of every fed token is kept and
returned in the layout the trainer replays (:mod:`vespo_megatron.models.routing`).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from vespo_megatron.models.routing import routing_recorder, tokens_to_sequences, unrouted
from vespo_megatron.rollout.common import (
    DecodeRequest,
    Generated,
    check_prompts,
    hits_stop,
    lockstep_group,
    padded_prompts,
    sample_and_share,
    stop_id_set,
    uniforms_table,
)
from vespo_megatron.rollout.decode_step import LeanDecodeStep, announce_decode_path
from vespo_megatron.rollout.forward import PipelineForward, inference_mode, keep_alive, last_token_logits
from vespo_megatron.runtime.collectives import any_over


def kv_cache_bytes(context) -> int:
    """Bytes held by the keys and values of every layer in ``context``."""
    return sum(t.numel() * t.element_size() for pair in context.key_value_memory_dict.values() for t in pair)


def _compact(context, keep: torch.Tensor) -> None:
    """Keep only batch rows ``keep`` in every layer's keys and values."""
    for layer, (keys, values) in context.key_value_memory_dict.items():
        index = keep.to(keys.device, non_blocking=True)
        context.key_value_memory_dict[layer] = (keys.index_select(1, index), values.index_select(1, index))
    context.max_batch_size = int(keep.numel())


class RoutingTrace:
    """The experts each fed token visited while sampling, per sequence, in the trainer's replay layout."""

    def __init__(self, recorder, n: int, seq_length: int, topk: int):
        self.recorder = recorder
        self.full = torch.full((n, len(recorder.layers), seq_length, topk), unrouted(recorder.dtype),
                               dtype=recorder.dtype)

    def add(self, rows: list[int], start: int) -> None:
        """File the choices of the forward just run: batch rows ``rows`` at positions ``start...``."""
        index = torch.tensor(rows)
        for layer, calls in enumerate(self.recorder.take_recorded()):
            if len(calls) != 1:
                raise RuntimeError(f"routing record: router {layer} ran {len(calls)} times in one decode forward")
            per_sequence = tokens_to_sequences(calls[0], len(rows))  # [b, s, k]
            self.full[index, layer, start:start + per_sequence.shape[1]] = per_sequence

    def local(self, ctx) -> torch.Tensor:
        """``[n, layers_local, s_local, topk]``: this rank's slice of the sequence in training (SP)."""
        if ctx.sequence_parallel and ctx.tp > 1:
            width = self.full.shape[2] // ctx.tp
            return self.full[:, :, ctx.tp_rank * width:(ctx.tp_rank + 1) * width].contiguous()
        return self.full


class _Rows:
    """The decode state: which sequences are still in the batch (in batch order) and what they hold."""

    def __init__(self, prompts: list[list[int]], prompt_lengths: torch.Tensor, request: DecodeRequest,
                 track_versions: bool = False):
        n, seq_length = len(prompts), request.seq_length
        self.sequences = padded_prompts(prompts, request)
        self.sampler_logprobs = torch.zeros(n, seq_length + 1)
        self.prompt_lengths = prompt_lengths
        self.generated = torch.zeros(n, dtype=torch.long)
        self.live = torch.arange(n)
        """Sequence index of every batch slot."""
        self.versions = torch.full((n, seq_length + 1), -1, dtype=torch.long) if track_versions else None
        """Partial rollouts: the policy version each sampled token was drawn with (-1 elsewhere)."""
        self.version = -1

    def fill(self, position: int, tokens: torch.Tensor, logprobs: torch.Tensor, sampling: torch.Tensor,
             done) -> torch.Tensor:
        """Write the sampled ``tokens`` of batch slots ``sampling`` at ``position``; return the slots to keep.

        ``done(rows, tokens)`` says which of the rows just written have finished.
        """
        rows = self.live[sampling]
        self.sequences[rows, position] = tokens
        self.sampler_logprobs[rows, position] = logprobs.float()
        if self.versions is not None:
            self.versions[rows, position] = self.version
        self.generated[rows] += 1
        keep = torch.ones(len(self.live), dtype=torch.bool)
        keep[sampling[done(rows, tokens)]] = False
        return keep.nonzero().flatten()


@torch.no_grad()
def decode(
    engine,
    prompts: list[list[int]],
    request: DecodeRequest,
    *,
    record_routing: bool = False,
    policy_version: Optional[Callable[[], int]] = None,
) -> Generated:
    """Sample one response per prompt with a KV cache; same contract and same samples as
    :func:`vespo_megatron.rollout.recompute.generate`.

    ``record_routing`` (MoE) also returns each token's experts from this pass in
    ``Generated.routing_indices``. ``policy_version`` (partial rollouts) is called before every forward pass;
    it may update the weights in place and returns the version that the next tokens are sampled with, recorded
    per token in ``Generated.token_versions``; when the version changes the live rows' cache is rebuilt under
    the new weights, so each token's log-prob is exactly its version's. Needs
    ``parallel.cp == 1`` (see :func:`vespo_megatron.rollout.decoders.sample`).
    """
    ctx = engine.ctx
    if ctx.cp > 1:
        raise ValueError("the KV-cache decoder needs parallel.cp=1; use rollout.engine=recompute with cp > 1")
    settings, seq_length = request.settings, request.seq_length
    n = len(prompts)
    prompt_lengths = check_prompts(prompts, settings.max_new_tokens, seq_length)
    uniforms = uniforms_table(request, n)
    state = _Rows(prompts, prompt_lengths, request, track_versions=policy_version is not None)
    recorder = routing_recorder(engine) if record_routing else None
    trace = None
    if recorder is not None and recorder.layers:
        trace = RoutingTrace(recorder, n, seq_length, engine.config.model.moe_router_topk)
    start = int(prompt_lengths.min()) if n else 0
    cached = int(prompt_lengths.max()) + settings.max_new_tokens - 1 if n else 1  # the last sample is never fed
    context = StaticInferenceContext(max_batch_size=max(n, 1), max_sequence_length=max(cached, 1))
    forward = PipelineForward(engine)
    lean = None
    if announce_decode_path(engine, settings.kv_step)[0] == "lean":
        lean = LeanDecodeStep(engine, context)
    lockstep = lockstep_group(engine)
    fed = 0
    cache_bytes = 0
    stop_ids = torch.tensor(sorted(stop_id_set(request.eos_id)), dtype=torch.long)
    stop_sequences = request.stop_sequences

    def done(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        finished = torch.isin(tokens, stop_ids) | (state.generated[rows] >= settings.max_new_tokens)
        if stop_sequences:
            for index, row in enumerate(rows.tolist()):
                start_of_response = int(prompt_lengths[row])
                response = state.sequences[row, start_of_response:start_of_response + int(state.generated[row])]
                finished[index] |= hits_stop(response.tolist(), request.eos_id, stop_sequences)
        return finished

    with inference_mode(engine), recorder.recording() if recorder is not None else nullcontext():
        while any_over(len(state.live) > 0, lockstep):
            if not len(state.live):
                keep_alive(forward, request.pad_id)
                if recorder is not None:
                    recorder.take_recorded()
                continue
            refill = 0
            if policy_version is not None:
                version = policy_version()
                if fed > 0 and version != state.version:
                    # New weights mid-generation: rebuild the live rows' cache under them (one prefill), so every
                    # later token is sampled from exactly this version's distribution.
                    context = StaticInferenceContext(max_batch_size=len(state.live), max_sequence_length=max(cached, 1))
                    lean = LeanDecodeStep(engine, context) if lean is not None else None
                    refill, fed = fed + 1, 0
                state.version = version
            span = (refill or start) if fed == 0 else 1
            context.sequence_len_offset = fed
            rows = state.live
            if lean is not None and span == 1:
                hidden = lean(state.sequences[rows, fed:fed + 1].to(forward.device, non_blocking=True), fed)
            else:
                positions = torch.arange(fed, fed + span).unsqueeze(0).expand(len(rows), -1)
                hidden = forward(state.sequences[rows, fed:fed + span], positions, context)
            if trace is not None:
                trace.add(rows.tolist(), fed)
            if fed == 0:
                cache_bytes = kv_cache_bytes(context)
            fed += span
            # Position `fed` gets a sample where the prompt has ended, the prompt's own token elsewhere.
            sampling = (prompt_lengths[rows] <= fed).nonzero().flatten()
            if not len(sampling):
                continue
            logits = None
            if ctx.is_last_stage:
                logits = last_token_logits(hidden, engine)
                logits = logits[sampling.to(logits.device, non_blocking=True)]
            tokens, logprobs = sample_and_share(logits, len(sampling),
                                                uniforms[state.generated[rows[sampling]], rows[sampling]], request, ctx)
            keep = state.fill(fed, tokens, logprobs, sampling, done)
            if len(keep) < len(rows):
                if len(keep):
                    _compact(context, keep)
                state.live = rows[keep]
    return Generated(
        sequences=state.sequences,
        prompt_lengths=prompt_lengths,
        response_lengths=state.generated.clone(),
        sampler_logprobs=state.sampler_logprobs,
        routing_indices=trace.local(ctx) if trace is not None else None,
        kv_cache_bytes=cache_bytes,
        token_versions=state.versions,
    )
