"""The model side of KV-cache decoding: the trainer's Megatron chunks run forward-only, stage after stage.

- :func:`inference_mode` puts the chunks in eval mode with hidden-state output and no sequence parallelism
  (Megatron's static inference runs without it: a one-token step cannot be scattered over TP ranks; MoE
  layers keep their flags when both TP and EP exceed one, as Megatron does) and restores all of it after.
- :class:`PipelineForward` runs one forward of this rank's chunks over a token block on a
  ``StaticInferenceContext``, receiving the previous stage's activations and sending its own by p2p.
- :func:`last_token_logits` projects the last position onto the vocabulary (gathered over TP), converting a
  bf16 output layer to fp32 in vocabulary chunks.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.moe.moe_layer import BaseMoELayer

from vespo_megatron.models.gpt import model_device, unwrap
from vespo_megatron.rollout.common import gather_vocab, shard_logits

SP_ATTRIBUTES = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


def _callable_module(chunk):
    """The module to call: below Megatron's DDP wrapper, above Float16Module (which casts in and out)."""
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def _sp_modules(chunks, keep_moe: bool) -> list:
    """(module, attribute) pairs holding a sequence-parallel switch, MoE layers left out when ``keep_moe``."""
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


class PipelineForward:
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

    def __call__(self, tokens: torch.Tensor, position_ids: torch.Tensor, context) -> Optional[torch.Tensor]:
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
    """Full-vocabulary fp32 logits ``[b, V]`` of the last position of ``hidden`` [s, b, h] (gathered over TP),
    without an fp32 copy of the whole output-layer shard (:func:`~vespo_megatron.rollout.common.shard_logits`)."""
    weight = unwrap(engine.chunks[-1]).output_weight()
    return gather_vocab(shard_logits(hidden[-1], weight), engine.ctx)


def keep_alive(forward: PipelineForward, pad_id: int) -> None:
    """A one-token forward on a throw-away context: serves the expert exchange of still-decoding peers."""
    forward(torch.full((1, 1), pad_id, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
            StaticInferenceContext(1, 1))
