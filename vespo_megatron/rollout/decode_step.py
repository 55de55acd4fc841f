"""The one-token decode step of dense local-spec models, run on the trainer's own parameters, plainly.

A decode step feeds one token per sequence, so its matrices are tiny and its time is the Python of the
layer stack: on a small model Megatron's module plumbing (autograd-function linears that run even under
``no_grad``, hooks, view-less tensor wrappers, per-call group lookups) costs several times the arithmetic.
:class:`LeanDecodeStep` runs the same step as a straight sequence of tensor operations over the very
parameters the model holds (no copy), and over the megatron-core ``StaticInferenceContext`` buffers that
the prefill, run by the full model, filled (re-laid out once for attention,
:meth:`LeanDecodeStep._regroup_cache`). The operations are Megatron's own in Megatron's order (the QKV layout
``[groups, (heads/groups + 2) * head_dim]``, the rotate-half RoPE of megatron-core's unfused path with its
cos/sin tabulated once, bias then residual, the gated activation with its clamp and offset), so the hidden
states equal the full model's to rounding; tests compare tokens and sampler log-probs with the stock path and the recompute
oracle.

Covered: dense GPT models of the local layer spec on one pipeline stage (``pp == 1``), any tensor-parallel
size (row-parallel outputs all-reduced over TP, as the stock layers do once sequence parallelism is off for
decoding), RoPE or learned absolute positions, RMSNorm or LayerNorm (the model's own norm modules are
called), optional QK norm and biases. Anything else (MoE layers, pipeline stages, Transformer-Engine
modules, gated attention, fused bias-activation, fp32 residuals, post-norm residuals) makes
:func:`lean_step_blocker` name the reason and the decoder runs the full model every step
(``rollout.kv_step: megatron`` forces that).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer

from vespo_megatron.models.attention import KVCacheSelfAttention, decode_attention
from vespo_megatron.models.gpt import unwrap


_ANNOUNCED: set = set()


def decode_path(engine, kv_step: str) -> tuple[str, str]:
    """The one-token step the KV decoder takes and why: ``lean`` (:class:`LeanDecodeStep`), ``kv-modules``
    (the full model with the project's attention, which caches post-RoPE keys) or ``full-model`` (the full
    model with attention modules that are not the project's, e.g. Transformer Engine's: Megatron's static
    inference path re-rotates the whole cached prefix every step)."""
    blocker = lean_step_blocker(engine)
    if kv_step == "lean" and blocker is None:
        return "lean", "dense single-stage model with the local layer spec"
    why = "rollout.kv_step=megatron" if kv_step != "lean" else f"no lean step: {blocker}"
    if any(isinstance(m, KVCacheSelfAttention) for chunk in engine.chunks for m in unwrap(chunk).modules()):
        return "kv-modules", why
    return "full-model", f"{why}; attention modules are not the KV-cache ones (Transformer Engine spec)"


def announce_decode_path(engine, kv_step: str) -> tuple[str, str]:
    """:func:`decode_path`, printed once per process and path (by global rank 0)."""
    path = decode_path(engine, kv_step)
    if path not in _ANNOUNCED:
        _ANNOUNCED.add(path)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"rollout: KV decoder one-token steps take the {path[0]} path ({path[1]})", flush=True)
    return path


def lean_step_blocker(engine) -> Optional[str]:
    """Why :class:`LeanDecodeStep` cannot run this engine's model (None when it can)."""
    if engine.ctx.pp > 1 or len(engine.chunks) != 1:
        return "pipeline parallelism (the stages exchange activations)"
    model = unwrap(engine.chunks[0])
    config = model.config
    if model.position_embedding_type not in ("rope", "learned_absolute"):
        return f"position_embedding_type={model.position_embedding_type}"
    if model.position_embedding_type == "rope" and type(model.rotary_pos_emb).__name__ != "RotaryEmbedding":
        return f"rotary embedding {type(model.rotary_pos_emb).__name__}"
    flags = {
        "attention_output_gate": config.attention_output_gate, "flash_decode": config.flash_decode,
        "bias_activation_fusion": config.bias_activation_fusion,
        "use_te_activation_func": config.use_te_activation_func,
        "apply_residual_connection_post_layernorm": config.apply_residual_connection_post_layernorm,
        "fp32_residual_connection": config.fp32_residual_connection,
        "rotary_interleaved": config.rotary_interleaved, "apply_rope_fusion": config.apply_rope_fusion,
        "multi_latent_attention": config.multi_latent_attention, "mrope_section": config.mrope_section,
    }
    raised = [name for name, value in flags.items() if value]
    if raised:
        return f"{', '.join(raised)} set"
    if config.num_query_groups < engine.ctx.tp:
        return "fewer query groups than tensor-parallel ranks"
    for layer in model.decoder.layers:
        if type(layer) is not TransformerLayer:
            return f"layer type {type(layer).__name__}"
        attention, mlp = layer.self_attention, layer.mlp
        if not isinstance(attention, SelfAttention) or type(mlp) is not MLP:
            return f"{type(attention).__name__} / {type(mlp).__name__} blocks (MoE or non-local modules)"
        linears = (attention.linear_qkv, attention.linear_proj, mlp.linear_fc1, mlp.linear_fc2)
        if [type(m) for m in linears] != [ColumnParallelLinear, RowParallelLinear, ColumnParallelLinear,
                                          RowParallelLinear]:
            return "non-local linear layers (Transformer Engine)"
    return None


class LeanDecodeStep:
    """Decode steps (one new token per live sequence) over the model's parameters and ``context``'s cache.

    The KV buffers must already exist (the prefill ran the full model with the same ``context``) and hold
    keys with RoPE applied, as :class:`vespo_megatron.models.attention.KVCacheSelfAttention` stores them. The
    first step re-lays them out for decoding (:meth:`_regroup_cache`); from then on only this class may
    step with ``context``.
    """

    def __init__(self, engine, context):
        self.model = unwrap(engine.chunks[0])
        self.context = context
        self.tp_group = engine.ctx.tp_group if engine.ctx.tp > 1 else None
        config = self.model.config
        self.config = config
        self.regrouped = False
        self.cos = self.sin = None
        if self.model.position_embedding_type == "rope":
            # megatron-core's unfused RoPE recomputes cos/sin of the frequencies on every call; the table is
            # computed once here with the same expression.
            freqs = self.model.rotary_pos_emb(context.max_sequence_length)  # [positions, 1, 1, rot_dim]
            mscale = self.model.decoder.layers[0].self_attention._yarn_concentration_factor
            self.cos, self.sin = torch.cos(freqs) * mscale, torch.sin(freqs) * mscale
        self.scales = [layer.self_attention.core_attention.softmax_scale
                       * (layer.self_attention.core_attention.layer_number if config.apply_query_key_layer_scaling
                          else 1) for layer in self.model.decoder.layers]

    def _all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        if self.tp_group is not None:
            dist.all_reduce(partial, group=self.tp_group)
        return partial

    def __call__(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Final hidden states ``[1, b, h]`` (post final norm) of ``tokens`` [b, 1] fed at ``position``.

        Every live sequence's keys and values of this token are written at ``position`` of the cache.
        """
        model = self.model
        if not self.regrouped:
            self._regroup_cache()
        batch = tokens.shape[0]
        positions = torch.full_like(tokens, position)
        hidden = model.embedding(input_ids=tokens, position_ids=positions)  # [1, b, h]
        rotation = None
        if self.cos is not None:
            rotation = self.cos[position:position + 1], self.sin[position:position + 1]
        for layer, scale in zip(model.decoder.layers, self.scales):
            attention, mlp = layer.self_attention, layer.mlp
            residual = hidden
            x = layer.input_layernorm(hidden)
            query, key, value = self._split_qkv(attention, F.linear(x, attention.linear_qkv.weight,
                                                                    attention.linear_qkv.bias))
            if attention.q_layernorm is not None:
                query = attention.q_layernorm(query)
            if attention.k_layernorm is not None:
                key = attention.k_layernorm(key)
            if rotation is not None:
                if rotation[0].dtype != query.dtype:  # once per step (bf16 autocast): the table is fp32
                    rotation = tuple(t.to(query.dtype) for t in rotation)
                query, key = _rotate(query, *rotation), _rotate(key, *rotation)
            keys, values = self.context.key_value_memory_dict[attention.layer_number]  # [groups, b, positions, d]
            keys[:, :batch, position] = key[0].transpose(0, 1)
            values[:, :batch, position] = value[0].transpose(0, 1)
            out = decode_attention(query, keys[:, :batch, :position + 1].permute(2, 1, 0, 3),
                                   values[:, :batch, :position + 1].permute(2, 1, 0, 3), scale)
            out = self._all_reduce(F.linear(out, attention.linear_proj.weight))
            if attention.linear_proj.bias is not None:
                out = out + attention.linear_proj.bias
            hidden = residual + out
            residual = hidden
            x = F.linear(layer.pre_mlp_layernorm(hidden), mlp.linear_fc1.weight, mlp.linear_fc1.bias)
            x = self._activate(x)
            out = self._all_reduce(F.linear(x, mlp.linear_fc2.weight))
            if mlp.linear_fc2.bias is not None:
                out = out + mlp.linear_fc2.bias
            hidden = residual + out
        return model.decoder.final_layernorm(hidden)

    def _regroup_cache(self) -> None:
        """Lay every layer's cache out as ``[groups, batch, positions, head_dim]`` (once, after the prefill).

        Megatron's ``[positions, batch, groups, head_dim]`` makes each (sequence, head) a strided column that
        attention reads element by element; here each one is a contiguous ``[positions, head_dim]`` block
        (about 3x faster attention at 2,000 cached positions on a CPU). The batch stays dimension 1, so
        compaction (``index_select`` on dimension 1) and the byte count are unchanged.
        """
        memory = self.context.key_value_memory_dict
        for layer, (keys, values) in list(memory.items()):
            memory[layer] = (keys.permute(2, 1, 0, 3).contiguous(), values.permute(2, 1, 0, 3).contiguous())
        self.regrouped = True

    @staticmethod
    def _split_qkv(attention, mixed: torch.Tensor):
        """Megatron's fused QKV layout ``[s, b, groups, (heads/groups + 2) * head_dim]`` split per head."""
        groups = attention.num_query_groups_per_partition
        head_dim = attention.hidden_size_per_attention_head
        per_group = attention.num_attention_heads_per_partition // groups
        mixed = mixed.view(*mixed.shape[:-1], groups, (per_group + 2) * head_dim)
        query, key, value = torch.split(mixed, [per_group * head_dim, head_dim, head_dim], dim=3)
        return query.reshape(*query.shape[:2], -1, head_dim), key, value

    def _activate(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's activation, gated (``act(x1) * (x2 + offset)``, with the optional clamp) or plain."""
        config = self.config
        if not config.gated_linear_unit:
            return config.activation_func(x)
        gate, linear = torch.chunk(x, 2, dim=-1)
        if (limit := config.activation_func_clamp_value) is not None:
            gate = gate.clamp(min=None, max=limit)
            linear = linear.clamp(min=-limit, max=limit)
        return config.activation_func(gate) * (linear + config.glu_linear_offset)


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as megatron-core's unfused bshd path computes it (rotate-half, not interleaved): the first
    ``rot_dim`` channels rotated, the rest passed through; ``cos``/``sin`` already in ``t``'s dtype."""
    rot_dim = cos.shape[-1]
    rotated, passed = t[..., :rot_dim], t[..., rot_dim:]
    first, second = torch.chunk(rotated, 2, dim=-1)
    rotated = rotated * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((rotated, passed), dim=-1) if passed.shape[-1] else rotated
