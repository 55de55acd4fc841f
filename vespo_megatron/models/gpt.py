"""Build dense or Mixture-of-Experts Megatron ``GPTModel`` chunks from the project config.

The layer spec is Transformer Engine's when TE and a GPU are present (``model.transformer_impl=auto``)
and Megatron's local spec otherwise, with these substitutions on the local spec: a norm that supports
sequence parallelism (:mod:`.norms`), a self-attention that caches rotated keys for KV-cache decoding
and a core attention with a fused one-token decode step, or, when ``parallel.cp > 1``, a
context-parallel core attention (:mod:`.attention`). Layer code never branches on the device.

The model returned is :class:`PolicyGPTModel`, a ``GPTModel`` whose last pipeline stage can hand back
the final hidden states instead of logits (``emit_hidden_states=True``) so the loss can compute log-probs
in vocabulary-parallel token chunks without materialising the logits.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from vespo_megatron.config import Config


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports and a GPU is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def use_transformer_engine(config: Config) -> bool:
    impl = config.model.transformer_impl
    if impl == "transformer_engine":
        if not transformer_engine_available():
            raise RuntimeError(
                "model.transformer_impl=transformer_engine needs Transformer Engine and a GPU; "
                "install the 'gpu' extra on a GPU machine or set model.transformer_impl=local"
            )
        return True
    return impl == "auto" and transformer_engine_available()


def transformer_config(config: Config, vocab_size: int):
    """Megatron ``TransformerConfig`` for this run (fp32 or bf16; dropout 0; per-token loss scaling)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    model, par = config.model, config.parallel
    bf16 = model.dtype == "bf16"
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        # No CUDA graphs; an empty module list says so without Megatron's "full scope" deprecation notice.
        cuda_graph_modules=[],
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=model.add_bias_linear,
        qk_layernorm=model.qk_layernorm,
        init_method_std=model.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=par.tp,
        sequence_parallel=par.sequence_parallel,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        context_parallel_size=par.cp,
        expert_model_parallel_size=par.ep,
        expert_tensor_parallel_size=par.expert_tp,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        calculate_per_token_loss=True,
        use_cpu_initialization=not on_gpu,
        batch_p2p_comm=_batch_p2p_comm(config),
        # Token-budget micro-batches differ in shape: pipeline stages exchange each activation's shape first.
        # The interleaved schedule cannot; there every packed row has one width (rl.batch.packed_row_width).
        variable_seq_lengths=config.train.max_tokens_per_microbatch is not None and par.pp > 1 and not par.vpp,
        # Megatron's default (allgather) refuses variable_seq_lengths, even on a dense model.
        moe_token_dispatcher_type=model.moe_token_dispatcher,
        **fusion_settings(config, on_gpu),
    )
    if model.is_moe:
        kwargs.update(
            num_moe_experts=model.num_experts,
            moe_router_topk=model.moe_router_topk,
            moe_ffn_hidden_size=model.moe_ffn_hidden_size or model.ffn_size,
            moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
            moe_aux_loss_coeff=model.moe_aux_loss_coeff,  # rescaled per update: Engine.scale_moe_aux_loss
            moe_router_load_balancing_type="aux_loss",
            moe_grouped_gemm=model.moe_grouped_gemm,
            moe_permute_fusion=False,
        )
    return TransformerConfig(**kwargs)


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def fusion_settings(config: Config, on_gpu: bool) -> dict:
    """The kernel fusions of the TransformerConfig: off on CPU; on CUDA, Megatron's training defaults
    (``pretrain_gpt``'s arguments turn on bias-activation, bias-dropout, masked-softmax, RoPE and
    gradient-accumulation fusion and the persistent layer norm; megatron-core's TransformerConfig defaults them
    off), each where its kernel is there: RoPE fusion needs the Transformer Engine spec (the local spec's KV-cache
    attention rotates keys itself), gradient-accumulation fusion that spec or apex's
    ``fused_weight_gradient_mlp_cuda``, the persistent layer norm NVIDIA apex's contrib kernel, and
    bias-activation fusion with plain GELU a bias (Megatron's own condition). These are also the ones
    Megatron-Bridge's Llama provider turns on."""
    if not on_gpu:
        return dict(bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
                    apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False)
    model = config.model
    te = use_transformer_engine(config)  # the TE layer spec: its linears fuse the gradient accumulation
    return dict(
        bias_activation_fusion=model.swiglu or model.add_bias_linear,
        bias_dropout_fusion=True,
        masked_softmax_fusion=True,
        apply_rope_fusion=te and model.position_embedding == "rope",
        gradient_accumulation_fusion=te or _importable("fused_weight_gradient_mlp_cuda"),
        persist_layer_norm=_importable("apex.contrib.layer_norm"),  # NVIDIA apex's persistent kernel
    )


def _batch_p2p_comm(config: Config) -> bool:
    par = config.parallel
    if par.batch_p2p_comm is not None:
        return par.batch_p2p_comm
    # With interleaving at pp=2 the previous and next stage are the same peer; batched p2p then
    # mismatches messages on gloo (and is no faster on nccl for two peers).
    return not (par.vpp and par.pp == 2)


def layer_spec(config: Config, tconfig, vp_stage: Optional[int]):
    """The decoder block spec for one pipeline chunk."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    model = config.model
    if use_transformer_engine(config):
        layer = specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=model.num_experts, moe_grouped_gemm=model.moe_grouped_gemm, qk_layernorm=model.qk_layernorm
        )
        return layer
    from vespo_megatron.models.attention import ContextParallelAttention, LocalCoreAttention, KVCacheSelfAttention
    from vespo_megatron.models.norms import SequenceParallelNorm

    if model.is_moe and model.moe_grouped_gemm:
        # Megatron-Core >= 0.19 has grouped-GEMM experts only in Transformer Engine; its local spec
        # would silently build per-expert SequentialMLP instead.
        raise ValueError(
            "model.moe_grouped_gemm=true needs Transformer Engine and a GPU (the local layer spec has no "
            "grouped-GEMM experts); set model.moe_grouped_gemm=false, or run on a GPU with transformer_impl=auto"
        )
    layer = specs.get_gpt_layer_local_spec(
        num_experts=model.num_experts,
        moe_grouped_gemm=model.moe_grouped_gemm,
        qk_layernorm=model.qk_layernorm,
        normalization=model.normalization,
    )
    layer = copy.deepcopy(layer)
    sub = layer.submodules
    sub.input_layernorm = SequenceParallelNorm
    sub.pre_mlp_layernorm = SequenceParallelNorm
    attn = sub.self_attention.submodules
    if model.qk_layernorm:
        attn.q_layernorm = SequenceParallelNorm
        attn.k_layernorm = SequenceParallelNorm
    # KV-cache decoding (rollout/decode.py): keys cached with RoPE applied, fused one-token steps.
    sub.self_attention.module = KVCacheSelfAttention
    attn.core_attention = ContextParallelAttention if config.parallel.cp > 1 else LocalCoreAttention
    num_layers = get_num_layers_to_build(tconfig, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=SequenceParallelNorm)


def _policy_model_class():
    from megatron.core.models.gpt import GPTModel

    class PolicyGPTModel(GPTModel):
        """``GPTModel`` that can return final hidden states (post final-norm) from its last stage.

        With ``emit_hidden_states`` set, the last stage returns ``[s(/tp with SP), b, h]`` hidden states;
        :meth:`output_weight` is the vocabulary-parallel output weight shard to project them with.
        """

        emit_hidden_states: bool = False

        def _postprocess(self, hidden_states, *args, **kwargs):
            if self.emit_hidden_states and self.post_process:
                return hidden_states
            return super()._postprocess(hidden_states, *args, **kwargs)

        def output_weight(self) -> torch.Tensor:
            if self.share_embeddings_and_output_weights:
                return self.shared_embedding_or_output_weight()
            return self.output_layer.weight

    return PolicyGPTModel


@dataclass(frozen=True)
class BuiltModel:
    """The model chunks of this rank (one per virtual pipeline stage) and their Megatron config."""

    chunks: list
    tconfig: object
    padded_vocab_size: int


def build_model(config: Config, vocab_size: int) -> BuiltModel:
    """Build this rank's ``PolicyGPTModel`` chunks (after ``runtime.distributed.initialize``)."""
    from megatron.core import parallel_state as ps

    padded_vocab = config.model.padded_vocab_size(
        config.model.vocab_size or vocab_size, config.parallel.tp
    )
    tconfig = transformer_config(config, padded_vocab)
    model_class = _policy_model_class()
    vpp = config.parallel.vpp
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        chunk = model_class(
            config=tconfig,
            transformer_layer_spec=layer_spec(config, tconfig, stage),
            vocab_size=padded_vocab,
            max_sequence_length=config.model.max_seq_length,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=config.model.tie_embeddings,
            position_embedding_type=config.model.position_embedding,
            rotary_base=config.model.rotary_base,
            rope_scaling=config.model.rope_scaling_factor is not None,
            rope_scaling_factor=config.model.rope_scaling_factor or 8.0,
            vp_stage=stage,
        )
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        if tconfig.bf16:
            from megatron.core.transformer.module import Float16Module

            chunk = Float16Module(tconfig, chunk)
        chunks.append(chunk)
    return BuiltModel(chunks=chunks, tconfig=tconfig, padded_vocab_size=padded_vocab)


def unwrap(chunk):
    """The ``PolicyGPTModel`` inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_device(model) -> torch.device:
    """The device ``model``'s parameters live on (CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def full_hidden(hidden: torch.Tensor, ctx) -> torch.Tensor:
    """Last-stage hidden states as every TP rank needs them for a vocabulary-parallel projection.

    With sequence parallelism the gather's backward is a reduce-scatter over TP; without it Megatron's
    copy-to-TP mapping all-reduces the gradient. Either way the partial input gradients that the
    vocabulary-parallel log-prob functions return get summed over TP, as the output layer would do.
    """
    from megatron.core import tensor_parallel  # here, as everywhere in this module: importing megatron.core takes seconds

    if ctx.tp == 1:
        return hidden
    if ctx.sequence_parallel:
        return tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    return tensor_parallel.copy_to_tensor_model_parallel_region(hidden)


def count_parameters(chunks) -> int:
    """Parameters held by this rank (shared embeddings counted once per rank)."""
    seen = set()
    total = 0
    for chunk in chunks:
        for param in unwrap(chunk).parameters():
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
    return total
