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
training mode, sequence-parallel flags and the hidden-state switch are restored afterwards.
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
- CP: the KV path does not shard the sequence; with ``parallel.cp > 1`` :func:`sample` falls back to
  the recompute decoder (documented in docs/rl.md).

Decode steps. After the prefill, dense single-stage models run each one-token step through
:class:`vespo_megatron.rollout.decode_step.LeanDecodeStep` (the same parameters and cache, without
Megatron's per-module overhead); ``rollout.kv_step: megatron`` or an unsupported model runs the full model
every step instead.

MoE routing (R3). With ``record_routing`` every router's expert choice of every fed token is kept and
returned in the layout the trainer replays (:mod:`vespo_megatron.models.routing`).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Optional

import torch
import torch.distributed as dist

from vespo_megatron.config import RolloutConfig
from vespo_megatron.models.gpt import unwrap
from vespo_megatron.rollout.generate import (
    Generated,
    any_rank_active,
    check_prompts,
    generate,
    hits_stop,
    lockstep_group,
    stop_id_set,
    uniforms_table,
)
from vespo_megatron.rollout.decode_step import LeanDecodeStep, lean_step_blocker
from vespo_megatron.rollout.sampling import sample_next_tokens
from vespo_megatron.runtime.distributed import collective_device
from vespo_megatron.train.megatron_loss import model_device

SP_ATTRIBUTES = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


def _callable_module(chunk):
    """The module to call: below Megatron's DDP wrapper, above Float16Module (which casts in and out)."""
    from megatron.core.distributed import DistributedDataParallel

    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def _sp_modules(chunks, keep_moe: bool) -> list:
    """(module, attribute) pairs holding a sequence-parallel switch, MoE layers left out when ``keep_moe``."""
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer

    found = []

    def visit(module):
        if keep_moe and isinstance(module, BaseMoELayer):
            return
        found.extend((module, attr) for attr in SP_ATTRIBUTES if isinstance(getattr(module, attr, None), bool))
        for child in module.children():
            visit(child)

    for chunk in chunks:
        visit(unwrap(chunk))
    return found


@contextmanager
def inference_mode(engine):
    """Eval mode, hidden-state output and no sequence parallelism for the duration; all restored after."""
    chunks = engine.chunks
    models = [unwrap(chunk) for chunk in chunks]
    training = [chunk.training for chunk in chunks]
    emit = [model.emit_hidden_states for model in models]
    tconfig = engine.built.tconfig
    switches = []
    if tconfig.sequence_parallel:
        keep_moe = engine.ctx.tp > 1 and engine.ctx.ep > 1
        switches = [(module, attr, getattr(module, attr)) for module, attr in _sp_modules(chunks, keep_moe)]
    configs = {id(model.config): model.config for model in models} | {id(tconfig): tconfig}
    config_sp = {key: cfg.sequence_parallel for key, cfg in configs.items()}
    try:
        for chunk, model in zip(chunks, models):
            chunk.eval()
            model.emit_hidden_states = True
        for module, attr, _ in switches:
            setattr(module, attr, False)
        for cfg in configs.values():
            cfg.sequence_parallel = False
        with torch.no_grad():
            yield
    finally:
        for module, attr, value in switches:
            setattr(module, attr, value)
        for key, cfg in configs.items():
            cfg.sequence_parallel = config_sp[key]
        for chunk, model, was_training, was_emitting in zip(chunks, models, training, emit):
            chunk.train(was_training)
            model.emit_hidden_states = was_emitting


class PipelineRunner:
    """One forward of this rank's model chunks over a ``[b, s]`` token block, stage after stage by p2p."""

    def __init__(self, engine):
        self.ctx = engine.ctx
        self.chunks = engine.chunks
        self.hidden_size = engine.built.tconfig.hidden_size
        self.dtype = engine.built.tconfig.pipeline_dtype or torch.float32
        self.device = model_device(unwrap(self.chunks[0]))
        ctx = self.ctx
        if ctx.pp > 1:
            self.prev = dist.get_global_rank(ctx.pp_group, (ctx.pp_rank - 1) % ctx.pp)
            self.next = dist.get_global_rank(ctx.pp_group, (ctx.pp_rank + 1) % ctx.pp)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor, context) -> Optional[torch.Tensor]:
        """Final hidden states ``[s, b, h]`` on the last stage (None on the others).

        ``tokens`` and ``position_ids`` may live on the CPU; they are copied to the model's device.
        """
        ctx = self.ctx
        tokens = tokens.to(self.device, non_blocking=True)
        position_ids = position_ids.to(self.device, non_blocking=True)
        last_chunk = len(self.chunks) - 1
        output = None
        for index, chunk in enumerate(self.chunks):
            first = index == 0 and ctx.is_first_stage
            if not first:
                received = torch.empty(tokens.shape[1], tokens.shape[0], self.hidden_size, dtype=self.dtype,
                                       device=self.device)
                dist.recv(received, src=self.prev)
                unwrap(chunk).set_input_tensor(received)
            output = _callable_module(chunk)(tokens, position_ids, None, inference_context=context)
            if not (index == last_chunk and ctx.is_last_stage):
                dist.send(output.to(self.dtype).contiguous(), dst=self.next)
        return output if ctx.is_last_stage else None


def last_token_logits(hidden: torch.Tensor, engine) -> torch.Tensor:
    """Full-vocabulary logits ``[b, V]`` of the last position of ``hidden`` [s, b, h] (gathered over TP)."""
    ctx = engine.ctx
    weight = unwrap(engine.chunks[-1]).output_weight()
    shard = hidden[-1].float() @ weight.float().t()
    if ctx.tp == 1:
        return shard
    parts = [torch.empty_like(shard) for _ in range(ctx.tp)]
    dist.all_gather(parts, shard.contiguous(), group=ctx.tp_group)
    return torch.cat(parts, dim=-1)


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
        from vespo_megatron.models.routing import unrouted

        self.recorder = recorder
        self.full = torch.full((n, len(recorder.layers), seq_length, topk), unrouted(recorder.dtype),
                               dtype=recorder.dtype)

    def add(self, rows: list[int], start: int) -> None:
        """File the choices of the forward just run: batch rows ``rows`` at positions ``start...``."""
        from vespo_megatron.models.routing import tokens_to_sequences

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


def _keep_alive(runner, pad_id: int) -> None:
    """A one-token forward on a throw-away context: serves the expert exchange of still-decoding peers."""
    from megatron.core.inference.contexts import StaticInferenceContext

    runner.forward(torch.full((1, 1), pad_id, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
                   StaticInferenceContext(1, 1))


class _Rows:
    """The decode state: which sequences are still in the batch (in batch order) and what they hold."""

    def __init__(self, prompts: list[list[int]], prompt_lengths: torch.Tensor, seq_length: int, pad_id: int,
                 track_versions: bool = False):
        n = len(prompts)
        self.sequences = torch.full((n, seq_length + 1), pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            self.sequences[row, : len(prompt)] = torch.tensor(prompt)
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
    settings: RolloutConfig,
    *,
    seq_length: int,
    eos_id: int | list[int],
    pad_id: int,
    generator: Optional[torch.Generator],
    greedy: bool = False,
    uniforms: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
    stop_sequences: tuple[tuple[int, ...], ...] = (),
    record_routing: bool = False,
    policy_version: Optional[Callable[[], int]] = None,
) -> Generated:
    """Sample one response per prompt with a KV cache; same contract and same samples as ``generate``.

    ``record_routing`` (MoE) also returns each token's experts from this pass in
    ``Generated.routing_indices``. ``policy_version`` (partial rollouts) is called before every forward pass;
    it may update the weights in place and returns the version that the next tokens are sampled with, recorded
    per token in ``Generated.token_versions``; when the version changes the live rows' cache is rebuilt under
    the new weights, so each token's log-prob is exactly its version's. Needs
    ``parallel.cp == 1`` (see :func:`sample`).
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    from vespo_megatron.models.routing import routing_recorder

    ctx = engine.ctx
    if ctx.cp > 1:
        raise ValueError("the KV-cache decoder needs parallel.cp=1; use rollout.engine=recompute with cp > 1")
    n = len(prompts)
    prompt_lengths = check_prompts(prompts, settings.max_new_tokens, seq_length)
    uniforms = uniforms_table(generator, uniforms, settings.max_new_tokens, n)
    state = _Rows(prompts, prompt_lengths, seq_length, pad_id, track_versions=policy_version is not None)
    recorder = routing_recorder(engine) if record_routing else None
    trace = None
    if recorder is not None and recorder.layers:
        trace = RoutingTrace(recorder, n, seq_length, engine.config.model.moe_router_topk)
    start = int(prompt_lengths.min()) if n else 0
    cached = int(prompt_lengths.max()) + settings.max_new_tokens - 1 if n else 1  # the last sample is never fed
    context = StaticInferenceContext(max_batch_size=max(n, 1), max_sequence_length=max(cached, 1))
    runner = PipelineRunner(engine)
    lean = None
    if settings.kv_step == "lean" and lean_step_blocker(engine) is None:
        lean = LeanDecodeStep(engine, context)
    lockstep = lockstep_group(engine)
    fed = 0
    cache_bytes = 0
    stop_ids = torch.tensor(sorted(stop_id_set(eos_id)), dtype=torch.long)

    def done(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        finished = torch.isin(tokens, stop_ids) | (state.generated[rows] >= settings.max_new_tokens)
        if stop_sequences:
            for index, row in enumerate(rows.tolist()):
                start_of_response = int(prompt_lengths[row])
                response = state.sequences[row, start_of_response:start_of_response + int(state.generated[row])]
                finished[index] |= hits_stop(response.tolist(), eos_id, stop_sequences)
        return finished

    with inference_mode(engine), recorder.recording() if recorder is not None else nullcontext():
        while any_rank_active(len(state.live) > 0, lockstep):
            if not len(state.live):
                _keep_alive(runner, pad_id)
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
                hidden = lean(state.sequences[rows, fed:fed + 1].to(runner.device, non_blocking=True), fed)
            else:
                positions = torch.arange(fed, fed + span).unsqueeze(0).expand(len(rows), -1)
                hidden = runner.forward(state.sequences[rows, fed:fed + span], positions, context)
            if trace is not None:
                trace.add(rows.tolist(), fed)
            if fed == 0:
                cache_bytes = kv_cache_bytes(context)
            fed += span
            # Position `fed` gets a sample where the prompt has ended, the prompt's own token elsewhere.
            sampling = (prompt_lengths[rows] <= fed).nonzero().flatten()
            if not len(sampling):
                continue
            tokens, logprobs = _sample_step(engine, hidden, sampling, state.generated[rows[sampling]],
                                            rows[sampling], uniforms, settings, greedy, vocab_size)
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


def _sample_step(engine, hidden, sampling, generated, rows, uniforms, settings, greedy, vocab_size):
    """Tokens and sampler log-probs of batch slots ``sampling`` (last stage samples, then broadcasts).

    The draw runs where the logits are, from the CPU uniforms table (so a seeded generator picks the same
    uniforms on every device); the results come back to the CPU.
    """
    ctx = engine.ctx
    tokens = torch.zeros(len(sampling), dtype=torch.long)
    logprobs = torch.zeros(len(sampling), dtype=torch.float64)
    if ctx.is_last_stage:
        logits = last_token_logits(hidden, engine)
        logits = logits[sampling.to(logits.device, non_blocking=True)]
        tokens, logprobs = sample_next_tokens(
            logits, vocab_size=vocab_size, temperature=settings.temperature, top_k=settings.top_k,
            top_p=settings.top_p, greedy=greedy, uniforms=uniforms[generated, rows].to(logits.device),
        )
    if ctx.pp > 1:
        packed = torch.stack([tokens.double(), logprobs.double()]).to(collective_device(ctx.pp_group))
        dist.broadcast(packed, src=dist.get_global_rank(ctx.pp_group, ctx.pp - 1), group=ctx.pp_group)
        tokens, logprobs = packed[0].long(), packed[1]
    return tokens.cpu(), logprobs.cpu()


def sample(engine, prompts: list[list[int]], settings: RolloutConfig, **kwargs) -> Generated:
    """Sample with the decoder ``settings.engine`` names (``kv``, or ``recompute``, which kv uses when cp > 1).

    Keyword arguments are :func:`decode`'s; ``record_routing`` is dropped for the recompute decoder
    (the trainer then records the routing of its own behaviour pass).
    """
    record = kwargs.pop("record_routing", False)
    version = kwargs.pop("policy_version", None)
    with sampler_precision(engine, settings.sampler_dtype):
        if settings.engine == "kv" and engine.ctx.cp == 1:
            return decode(engine, prompts, settings, record_routing=record, policy_version=version, **kwargs)
        if version is not None:
            raise ValueError("rollout.partial=true needs the KV decoder (rollout.engine=kv, parallel.cp=1)")
        return generate(engine, prompts, settings, **kwargs)


def sampler_precision(engine, dtype: str):
    """bf16 autocast around the sampling passes when ``rollout.sampler_dtype`` is 'bf16', else nothing."""
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device_type=engine.ctx.device.type, dtype=torch.bfloat16)
