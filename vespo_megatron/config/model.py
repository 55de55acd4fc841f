"""The `model` section: the GPT (dense or MoE) shapes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from vespo_megatron.config.errors import divisors, require


@dataclass(kw_only=True)
class ModelConfig:
    """A GPT decoder (dense, or Mixture-of-Experts when num_experts is set)."""

    hf_path: Optional[str] = None
    """Local Hugging Face folder (config.json + safetensors): the run starts from its weights, and the shape
    keys (layers, widths, heads, vocab, norms, rope base, experts) are derived from its config.json; a shape
    key also given here must agree. Its tokenizer is used when it has one (docs/models.md)."""
    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: Optional[int] = None
    """Dense MLP width; None means 4 * hidden_size (8/3 * hidden rounded to 64 with swiglu)."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; None means num_attention_heads (plain MHA)."""
    kv_channels: Optional[int] = None
    """Per-head dimension; None means hidden_size / num_attention_heads."""
    vocab_size: Optional[int] = None
    """Vocabulary size; None takes it from the tokenizer. Padded up to make_vocab_size_divisible_by * tp."""
    make_vocab_size_divisible_by: int = 8
    """The padded vocabulary is a multiple of this times tp (Megatron's convention)."""
    max_seq_length: int = 64
    """Longest prompt + response the model sees (rotary tables and rollout budget)."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Norm type."""
    norm_epsilon: float = 1e-5
    """Norm epsilon."""
    swiglu: bool = True
    """SwiGLU gated MLP (fc1 holds gate and up projections)."""
    position_embedding: Literal["rope", "learned_absolute"] = "rope"
    """Rotary or learned absolute positions."""
    rotary_base: int = 10000
    """RoPE base frequency."""
    rope_scaling_factor: Optional[float] = None
    """Llama 3.1/3.2/3.3 ('llama3') RoPE scaling: the factor (8 for Llama 3.1, 32 for Llama 3.2) by which
    Megatron-Core divides the low-frequency bands, with its fixed low/high frequency factors 1 and 4 and original
    context 8192 (the Llama values); null: none. Derived from model.hf_path for imported models."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""
    add_bias_linear: bool = False
    """Biases in linear layers (must be false for MoE with etp > 1)."""
    qk_layernorm: bool = False
    """RMS/LayerNorm on queries and keys (Qwen3 style)."""
    init_method_std: float = 0.02
    """Std of the normal weight init."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Parameter/compute dtype. bf16 wraps the model in Megatron's Float16Module."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer spec: transformer_engine when TE and a GPU exist ('auto'), else Megatron's local spec."""
    num_experts: Optional[int] = None
    """MoE experts per layer; None builds a dense model."""
    moe_router_topk: int = 2
    """Experts chosen per token."""
    moe_ffn_hidden_size: Optional[int] = None
    """Expert MLP width; None means ffn_hidden_size."""
    moe_shared_expert_intermediate_size: Optional[int] = None
    """Width of the always-on shared expert; None disables it."""
    moe_aux_loss_coeff: float = 1e-2
    """Load-balancing auxiliary loss coefficient: the aux-loss gradient is this times the mean over the
    update's micro-batches of each micro-batch's Switch load-balancing loss gradient, whatever the response
    lengths and layout."""
    moe_token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """How tokens reach experts across expert-parallel ranks."""
    moe_grouped_gemm: bool = False
    """Grouped GEMM experts (needs bf16)."""

    def __post_init__(self) -> None:
        require(self.rope_scaling_factor is None or (self.rope_scaling_factor >= 1
                                                     and self.position_embedding == "rope"),
                f"model.rope_scaling_factor={self.rope_scaling_factor} needs model.position_embedding=rope and a "
                "factor >= 1 (null: no scaling)")
        for name in (
            "num_layers", "hidden_size", "num_attention_heads", "max_seq_length", "make_vocab_size_divisible_by"
        ):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"model.{name}={value!r} must be an integer >= 1")
        require(
            self.hidden_size % self.num_attention_heads == 0 or self.kv_channels is not None,
            f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
            f"{self.num_attention_heads}; set model.kv_channels or pick heads in {divisors(self.hidden_size)}",
        )
        groups = self.query_groups
        require(
            self.num_attention_heads % groups == 0,
            f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
            f"model.num_query_groups={groups}; use num_query_groups in {divisors(self.num_attention_heads)}",
        )
        if self.num_experts is not None:
            require(self.num_experts >= 1, f"model.num_experts={self.num_experts} must be >= 1 (or null for dense)")
            require(
                1 <= self.moe_router_topk <= self.num_experts,
                f"model.moe_router_topk={self.moe_router_topk} must be in [1, model.num_experts={self.num_experts}]",
            )
            require(
                not self.moe_grouped_gemm or self.dtype == "bf16",
                "model.moe_grouped_gemm=true needs model.dtype=bf16; set dtype=bf16 or moe_grouped_gemm=false",
            )
            # Megatron refuses top-1 routing with a post-top-k softmax (the gate gradient would be zero).
            require(
                self.moe_router_topk >= 2,
                f"model.moe_router_topk={self.moe_router_topk} is not supported (Megatron needs a pre-top-k "
                "softmax for top-1 routing); use moe_router_topk >= 2",
            )
            shared = self.moe_shared_expert_intermediate_size
            require(
                shared is None or shared >= 1,
                f"model.moe_shared_expert_intermediate_size={shared} must be >= 1 (or null for no shared expert)",
            )
            require(
                shared is None or not self.add_bias_linear,
                "model.moe_shared_expert_intermediate_size is set with model.add_bias_linear=true; Megatron's shared "
                "expert has no bias: set add_bias_linear=false or moe_shared_expert_intermediate_size=null",
            )

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.swiglu:
            return int(math.ceil(8 * self.hidden_size / 3 / 64) * 64)
        return 4 * self.hidden_size

    def padded_vocab_size(self, vocab_size: int, tp: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(vocab_size / multiple) * multiple)
