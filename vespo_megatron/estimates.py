"""Parameter counts, per-GPU memory and the loss's communication for a config, in pure Python.

Parameter counts follow the modules Megatron's ``GPTModel`` builds (local or Transformer Engine spec;
both hold the same tensors) and are exact: ``tests/dist/test_param_counts.py`` compares them with
``count_parameters`` on real tensor/expert/pipeline-parallel builds.

Memory per GPU (bytes, per pipeline stage; the worst stage is what must fit):

- weights: ``P * w`` with ``w`` = 2 (bf16) or 4 (fp32) bytes per parameter;
- gradients: ``P * 4`` when the model is fp32 or gradients are reduced in fp32 (``grad_reduce_in_fp32``),
  else ``P * 2``;
- Adam: fp32 exp_avg + exp_avg_sq (8 bytes/param) plus an fp32 master copy for bf16 models (4 more);
  with ``optimizer.use_distributed_optimizer`` the state of dense parameters is sharded over the
  ``dp * cp`` ranks and that of expert parameters over the expert-data-parallel ranks;
- activations: the per-layer estimate of Korthikanti et al. (2022, "Reducing Activation Recomputation
  in Large Transformer Models", ``sbh(34 + 5as/h)`` bytes for fp16 GPT with dropout) re-derived for this
  model family, counting the tensors each layer keeps for backward, in elements per micro-batch
  (``s`` tokens, ``b`` sequences, ``h`` hidden, ``a`` query heads, ``g`` query groups, ``d`` head dim,
  ``f`` MLP width, ``c`` = 2 with SwiGLU else 1, no dropout as RL training uses none)::

      norm regions   4 s b h                      (inputs and outputs of the two norms) / (tp if SP) / cp
      attention      s b d (a + 2g)  [Q, K, V]  +  s b a d  [core-attention output]
                     + s b d (a + g) with qk_layernorm                               / tp / cp
      scores         b a s^2 / cp, only with the local (unfused) attention            / tp
      dense MLP      s b f (c + 1)   [fc1 output, activation output]                  / tp / cp
      MoE            router logits s b E (norm region) + shared expert as a dense MLP, and per routed
                     (token, expert) pair 2h [permuted input, expert output] + (c + 1) f_e / etp, with
                     s b k etp / (tp cp) pairs per rank under balanced routing

  A training micro-batch is ``micro_batch_size`` sequences of ``seq_length`` tokens, or with a token budget
  (``train.max_tokens_per_microbatch`` = T) one packed row of T tokens, or (unpacked) ``T // min(seq_length, T)``
  rows of ``min(seq_length, T)`` tokens (:func:`training_micro_batch_shape`).

  A stage holds ``L / pp`` layers for ``min(pp, micro-batches)`` micro-batches in flight under 1F1B
  (times ``1 + (pp - 1) / (pp * vpp)`` when interleaved), plus the last stage's chunked log-prob
  logits (``loss.chunk_size x V/tp`` fp32, twice: logits and their softmax). Element sizes are 2 bytes (bf16) or
  4 (fp32). The CUDA/NCCL context is not modelled (``overhead_gb`` is added as a flat allowance).

The rollout (colocated: the trainer's ranks sample with the KV-cache decoder) is a second phase with the same
weights, gradient buffers and optimizer state resident, plus, for one decode batch of ``b`` sequences
(``min(rollout.max_batch_sequences, prompts_per_step * group_size / dp)``):

- the KV cache: ``L / pp`` layers x b x ``seq_length`` positions (the decoder caches the longest prompt plus
  ``max_new_tokens - 1``, which the context bounds) x ``g / tp`` KV heads x ``d`` x 2 (keys and values) x the
  element size;
- the prefill's transient: one layer's activations (the formula above, without sequence parallelism, which
  decoding does not use) at the longest prompt the context leaves, ``seq_length + 1 - max_new_tokens`` tokens;
- the logits: ``b x V/tp`` fp32 on this rank, ``b x V`` fp32 gathered, and the sampler's temporaries on them
  (scaled logits, log-softmax and probabilities in fp32, the cumulative distribution in fp64), plus the
  output-layer rows converted to fp32 at a time (``rollout.common.LOGIT_CHUNK_ROWS x h``).

The peak is the larger phase. Rollout workers of the disaggregated mode (``parallel.rollout_ranks > 0``) are
not estimated yet: the trainer's ranks then have no rollout phase.

The VESPO loss needs one all-reduce of ``[2, B]`` fp32 sums per micro-batch over the TP x CP group;
the sequence-level design of all-gathering ``[B, S]`` token log-probs moves ``S / 2`` times more.
(Both pay the per-token logsumexp statistics inside the TP group, which are not counted here.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from vespo_megatron.config import Config, ModelConfig

GIB = 1024**3
LOGIT_CHUNK_ROWS = 8192
"""rollout.common.LOGIT_CHUNK_ROWS, repeated so that this module needs no torch (a test keeps them equal)."""


# ------------------------------------------------------------------------------------------------ params
@dataclass(frozen=True)
class StageParameters:
    """Parameters held by one rank of a pipeline stage (every TP/EP rank of a stage holds as many)."""

    pp_rank: int
    dense: int
    """Parameters reduced over dp*cp: embeddings, attention, norms, dense MLP, router, shared expert."""
    expert: int
    """Routed-expert parameters of this rank's local experts (reduced over expert-data-parallel ranks)."""

    @property
    def total(self) -> int:
        return self.dense + self.expert


def _norm(model: ModelConfig, width: int) -> int:
    return width * (2 if model.normalization == "LayerNorm" else 1)


def _mlp(model: ModelConfig, ffn: int, split: int, bias: bool) -> int:
    glu = 2 if model.swiglu else 1
    h = model.hidden_size
    fc1 = glu * ffn // split * (h + (1 if bias else 0))
    fc2 = h * ffn // split + (h if bias else 0)
    return fc1 + fc2


def _layer(model: ModelConfig, tp: int, ep: int, etp: int) -> tuple[int, int]:
    """(dense, expert) parameters of one transformer layer on one rank."""
    h, a, g = model.hidden_size, model.num_attention_heads, model.query_groups
    d = model.kv_channels or h // a
    bias = model.add_bias_linear
    qkv = (a + 2 * g) * d // tp * (h + (1 if bias else 0))
    proj = h * (a * d // tp) + (h if bias else 0)
    dense = 2 * _norm(model, h) + qkv + proj
    if model.qk_layernorm:
        dense += 2 * _norm(model, d)
    if not model.is_moe:
        return dense + _mlp(model, model.ffn_size, tp, bias), 0
    dense += model.num_experts * (h + (1 if bias else 0))  # router
    if model.moe_shared_expert_intermediate_size:
        dense += _mlp(model, model.moe_shared_expert_intermediate_size, tp, False)
    expert_ffn = model.moe_ffn_hidden_size or model.ffn_size
    expert = model.num_experts // ep * _mlp(model, expert_ffn, etp, bias)
    return dense, expert


def _stage(config: Config, vocab_size: int, pp_rank: int, pp: int, tp: int, ep: int, etp: int) -> StageParameters:
    model = config.model
    h = model.hidden_size
    padded = model.padded_vocab_size(model.vocab_size or vocab_size, config.parallel.tp)
    first, last = pp_rank == 0, pp_rank == pp - 1
    layer_dense, layer_expert = _layer(model, tp, ep, etp)
    layers = model.num_layers // pp
    dense, expert = layers * layer_dense, layers * layer_expert
    if first:
        dense += padded // tp * h
        if model.position_embedding == "learned_absolute":
            dense += model.max_seq_length * h
    if last:
        dense += _norm(model, h)
        # A tied output layer reuses the embedding on the same stage; on a separate last stage it is a
        # second copy kept equal by the embedding-group all-reduce.
        if not (model.tie_embeddings and first):
            dense += padded // tp * h
    return StageParameters(pp_rank=pp_rank, dense=dense, expert=expert)


def parameters_per_rank(config: Config, vocab_size: int) -> list[StageParameters]:
    """Parameters on one rank of each pipeline stage (index = pp rank; VPP chunks of a rank summed).

    ``vocab_size`` is the tokenizer's (``model.vocab_size`` wins when set); it is padded as Megatron does.
    """
    par = config.parallel
    return [_stage(config, vocab_size, r, par.pp, par.tp, par.ep, par.expert_tp) for r in range(par.pp)]


def total_parameters(config: Config, vocab_size: int) -> int:
    """Distinct parameters of the whole model (tied embeddings once; vocabulary padded for parallel.tp)."""
    return _stage(config, vocab_size, 0, 1, 1, 1, 1).total


def active_parameters(config: Config, vocab_size: int) -> int:
    """Parameters one token passes through (MoE: top-k routed experts of each layer, not all)."""
    model = config.model
    total = total_parameters(config, vocab_size)
    if not model.is_moe:
        return total
    expert_ffn = model.moe_ffn_hidden_size or model.ffn_size
    inactive = model.num_experts - model.moe_router_topk
    return total - model.num_layers * inactive * _mlp(model, expert_ffn, 1, model.add_bias_linear)


# ------------------------------------------------------------------------------------------------ memory
def num_micro_batches(config: Config, world_size: int) -> int:
    """Micro-batches per optimizer update on each data-parallel rank."""
    dp = config.parallel.dp(world_size)
    return config.train.global_batch_size // (config.train.micro_batch_size * dp)


def training_micro_batch_shape(config: Config) -> tuple[int, int]:
    """``(tokens per sequence, sequences)`` of the largest training micro-batch on one rank.

    ``micro_batch_size`` rows of ``seq_length``; with ``train.max_tokens_per_microbatch`` = T at most T tokens
    in all: one row of T when packed, else rows padded to their longest, counted here as rows of
    ``min(seq_length, T)`` (the most the quadratic attention term can reach within the budget)."""
    budget = config.train.max_tokens_per_microbatch
    if budget is None:
        return config.seq_length, config.train.micro_batch_size
    if config.train.pack_sequences:
        return budget, 1
    tokens = min(config.seq_length, budget)
    return tokens, max(1, budget // tokens)


def activation_elements_per_layer(config: Config, tokens: int | None = None, sequences: int | None = None,
                                  *, sequence_parallel: bool | None = None, cp: int | None = None) -> int:
    """Elements one transformer layer keeps for backward per micro-batch on one rank (see module doc).

    ``tokens`` per sequence, ``sequences``, ``sequence_parallel`` and ``cp`` default to training's (the rollout's
    prefill passes its own)."""
    model, par = config.model, config.parallel
    train_tokens, train_sequences = training_micro_batch_shape(config)
    s = train_tokens if tokens is None else tokens
    b = train_sequences if sequences is None else sequences
    h, a, g = model.hidden_size, model.num_attention_heads, model.query_groups
    d = model.kv_channels or h // a
    glu = 2 if model.swiglu else 1
    tp = par.tp
    cp = par.cp if cp is None else cp
    sp = par.sequence_parallel if sequence_parallel is None else sequence_parallel
    sp_split = tp if sp else 1
    norm_region = 4 * s * b * h
    if model.is_moe:
        norm_region += s * b * model.num_experts
    tp_region = s * b * d * (a + 2 * g) + s * b * a * d
    if model.qk_layernorm:
        tp_region += s * b * d * (a + g)
    if not model.is_moe:
        tp_region += s * b * model.ffn_size * (glu + 1)
    elif model.moe_shared_expert_intermediate_size:
        tp_region += s * b * model.moe_shared_expert_intermediate_size * (glu + 1)
    elements = norm_region // (sp_split * cp) + tp_region // (tp * cp)
    if model.transformer_impl == "local":
        elements += b * a * s * s // (tp * cp)
    if model.is_moe:
        expert_ffn = model.moe_ffn_hidden_size or model.ffn_size
        etp = par.expert_tp
        pairs = s * b * model.moe_router_topk * etp // (tp * cp)
        elements += pairs * (2 * h + (glu + 1) * expert_ffn // etp)
    return elements


def rollout_batch_sequences(config: Config, world_size: int) -> int:
    """Sequences one decode batch holds on each data-parallel rank (0 when the trainer's ranks do not sample)."""
    rollout = config.rollout
    if config.parallel.rollout_ranks or rollout.source != "model":
        return 0
    per_rank = rollout.prompts_per_step * rollout.group_size // config.parallel.dp(world_size)
    return min(per_rank, rollout.max_batch_sequences or per_rank)


def kv_cache_bytes_per_sequence(config: Config) -> int:
    """KV-cache bytes one decoded sequence holds on one rank of a pipeline stage (see module doc)."""
    model, par = config.model, config.parallel
    d = model.kv_channels or model.hidden_size // model.num_attention_heads
    width = 2 if model.dtype == "bf16" else 4
    return model.num_layers // par.pp * config.seq_length * (model.query_groups // par.tp) * d * 2 * width


def rollout_transient_bytes(config: Config, vocab_size: int, sequences: int, last_stage: bool) -> int:
    """The prefill's largest layer and (last stage) the logits of ``sequences`` rows (see module doc)."""
    if sequences == 0:
        return 0
    model, par = config.model, config.parallel
    width = 2 if model.dtype == "bf16" else 4
    prompt = config.seq_length + 1 - config.rollout.max_new_tokens
    prefill = activation_elements_per_layer(config, prompt, sequences, sequence_parallel=False, cp=1) * width
    if not last_stage:
        return prefill
    from_stage = (4 if model.dtype == "bf16" else 0) * LOGIT_CHUNK_ROWS * model.hidden_size
    padded = model.padded_vocab_size(model.vocab_size or vocab_size, par.tp)
    logits = sequences * (padded // par.tp * 4 + padded * (4 + 3 * 4 + 8))
    return prefill + logits + from_stage


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one GPU of a pipeline stage needs in training and in the rollout (the larger is its peak)."""

    pp_rank: int
    parameters: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    overhead: int
    kv_cache: int = 0
    """The rollout's KV cache for one decode batch of ``rollout_batch`` sequences."""
    rollout_transient: int = 0
    """The rollout's prefill layer and logits (see module doc)."""
    rollout_batch: int = 0

    @property
    def resident(self) -> int:
        """Held in both phases: weights, gradient buffers, optimizer state and the flat overhead."""
        return self.weights + self.grads + self.optimizer + self.overhead

    @property
    def training(self) -> int:
        return self.resident + self.activations

    @property
    def rollout(self) -> int:
        return self.resident + self.kv_cache + self.rollout_transient if self.rollout_batch else 0

    @property
    def total(self) -> int:
        return max(self.training, self.rollout)

    @property
    def peak_phase(self) -> str:
        return "rollout" if self.rollout > self.training else "training"

    def to_gib(self) -> dict:
        keys = ("weights", "grads", "optimizer", "activations", "kv_cache", "rollout_transient", "overhead",
                "training", "rollout", "total")
        return {k: round(getattr(self, k) / GIB, 3) for k in keys} | {
            "peak_phase": self.peak_phase, "rollout_batch": self.rollout_batch}


def estimate_memory(
    config: Config,
    world_size: int,
    vocab_size: int,
    *,
    grad_reduce_in_fp32: bool = True,
    logprob_chunk_tokens: int | None = None,
    overhead_gb: float = 2.0,
) -> list[MemoryEstimate]:
    """Per-GPU memory of each pipeline stage (formulas in the module docstring)."""
    par, model = config.parallel, config.model
    chunk = logprob_chunk_tokens or config.loss.chunk_size
    bf16 = model.dtype == "bf16"
    width = 2 if bf16 else 4
    grad_width = 4 if (not bf16 or grad_reduce_in_fp32) else 2
    adam_width = 12 if bf16 else 8
    dense_shards = par.dp(world_size) * par.cp if config.optimizer.use_distributed_optimizer else 1
    expert_shards = par.expert_dp(world_size) if config.optimizer.use_distributed_optimizer else 1
    in_flight = min(par.pp, num_micro_batches(config, world_size))
    if par.vpp:
        in_flight *= 1 + (par.pp - 1) / (par.pp * par.vpp)
    per_layer = activation_elements_per_layer(config) * width
    padded = model.padded_vocab_size(model.vocab_size or vocab_size, par.tp)
    batch = rollout_batch_sequences(config, world_size)
    estimates = []
    for stage in parameters_per_rank(config, vocab_size):
        last = stage.pp_rank == par.pp - 1
        activations = per_layer * model.num_layers // par.pp * in_flight
        if last:
            activations += 2 * min(chunk, math.prod(training_micro_batch_shape(config))) * (
                padded // par.tp
            ) * 4
        optimizer = adam_width * (stage.dense / dense_shards + stage.expert / expert_shards)
        estimates.append(
            MemoryEstimate(
                pp_rank=stage.pp_rank,
                parameters=stage.total,
                weights=stage.total * width,
                grads=stage.total * grad_width,
                optimizer=int(optimizer),
                activations=int(activations),
                overhead=int(overhead_gb * GIB),
                kv_cache=batch * kv_cache_bytes_per_sequence(config),
                rollout_transient=rollout_transient_bytes(config, vocab_size, batch, last),
                rollout_batch=batch,
            )
        )
    return estimates


def peak_memory(estimates: list[MemoryEstimate]) -> MemoryEstimate:
    """The stage that needs the most memory."""
    return max(estimates, key=lambda e: e.total)


def fitting_rollout_batch(estimates: list[MemoryEstimate], config: Config, world_size: int, vocab_size: int,
                          budget_bytes: float) -> int:
    """The largest decode batch (sequences) whose rollout fits ``budget_bytes`` on every stage, at most the
    per-rank sequences of a step; 0 when not even one sequence fits."""
    best = config.rollout.prompts_per_step * config.rollout.group_size // config.parallel.dp(world_size)
    for stage in estimates:
        last = stage.pp_rank == config.parallel.pp - 1

        def fits(b: int) -> bool:
            need = stage.resident + b * kv_cache_bytes_per_sequence(config)
            return need + rollout_transient_bytes(config, vocab_size, b, last) <= budget_bytes

        lo, hi = 0, best  # largest b in [0, hi] with fits(b): the need grows with b
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        best = lo
    return best


# ------------------------------------------------------------------------------------------------ loss comm
@dataclass(frozen=True)
class LossCommunication:
    """Bytes the sequence-level loss moves per rank, ours vs all-gathering token log-probs."""

    group_size: int
    """Ranks that share a sequence: tp * cp."""
    micro_batches: int
    """Per optimizer update on each data-parallel rank."""
    sums_bytes_per_micro_batch: int
    """One all-reduce of [2, B] fp32: the log-prob sum and the behaviour log-prob sum of each sequence."""
    gather_bytes_per_micro_batch: int
    """The alternative: an all-gather of [B, S] fp32 token log-probs."""

    @property
    def sums_bytes_per_update(self) -> int:
        return self.sums_bytes_per_micro_batch * self.micro_batches

    @property
    def gather_bytes_per_update(self) -> int:
        return self.gather_bytes_per_micro_batch * self.micro_batches

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            sums_bytes_per_update=self.sums_bytes_per_update, gather_bytes_per_update=self.gather_bytes_per_update
        )
        return out


def loss_communication(config: Config, world_size: int) -> LossCommunication:
    """The VESPO loss's per-step traffic over the TP x CP group (zero when that group is one rank)."""
    par = config.parallel
    group = par.tp * par.cp
    b, s = config.train.micro_batch_size, config.seq_length
    shared = group > 1
    return LossCommunication(
        group_size=group,
        micro_batches=num_micro_batches(config, world_size),
        sums_bytes_per_micro_batch=2 * b * 4 if shared else 0,
        gather_bytes_per_micro_batch=b * s * 4 if shared else 0,
    )
