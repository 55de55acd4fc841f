"""Typed configuration for every part of a run, loaded from YAML with ``section.key=value`` overrides.

Each section is a ``kw_only`` dataclass whose field comments double as documentation
(``docs/configs.md`` is generated from them by ``vespo-megatron config-docs``). Checks that need only one
section live in its ``__post_init__``; checks that relate sections to each other or to the world size
live in :func:`validate`, which runs before any process group exists so a bad layout fails in
milliseconds with a message that names the fields, their values and a fix, instead of hanging a job.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin, get_type_hints

import yaml

from vespo_megatron.loss.kernel import CorrectionParams
from vespo_megatron.loss.policy import CispoParams, GrpoParams, GspoParams, SapoParams, VespoParams


class ConfigError(ValueError):
    """A configuration value (or combination) that cannot run; the message says how to fix it."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(kw_only=True)
class ParallelConfig:
    """How ranks are arranged. The data-parallel size is derived: world / (tp * pp * cp)."""

    tp: int = 1
    """Tensor-parallel size: attention heads, MLP columns and the vocabulary are split over tp ranks."""
    sequence_parallel: bool = False
    """Split activations along the sequence over the tp ranks in norm/dropout regions (needs tp > 1)."""
    pp: int = 1
    """Pipeline-parallel size: transformer layers are split into pp stages."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per pipeline rank (interleaved schedule); None disables interleaving."""
    cp: int = 1
    """Context-parallel size: every sequence is split into 2*cp load-balanced chunks over cp ranks."""
    ep: int = 1
    """Expert-parallel size: MoE experts are split over ep ranks."""
    etp: Optional[int] = None
    """Expert-tensor-parallel size: each expert's weights are split over etp ranks; None means etp = tp."""
    batch_p2p_comm: Optional[bool] = None
    """Batch pipeline send/recv into one call; None picks False for vpp with pp=2 (required on gloo)."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "ep"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"parallel.{name}={value!r} must be an integer >= 1")
        _require(self.vpp is None or self.vpp >= 1, f"parallel.vpp={self.vpp!r} must be None or >= 1")
        _require(self.etp is None or self.etp >= 1, f"parallel.etp={self.etp!r} must be None or >= 1")
        _require(
            not (self.sequence_parallel and self.tp == 1),
            "parallel.sequence_parallel=true needs parallel.tp > 1; set sequence_parallel=false or raise tp",
        )

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def model_parallel(self) -> int:
        """Ranks that hold one copy of the dense model: tp * pp * cp."""
        return self.tp * self.pp * self.cp

    def dp(self, world_size: int) -> int:
        return world_size // self.model_parallel

    def expert_dp(self, world_size: int) -> int:
        return world_size // (self.expert_tp * self.ep * self.pp)


@dataclass(kw_only=True)
class ModelConfig:
    """A GPT decoder (dense, or Mixture-of-Experts when num_experts is set)."""

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
    """Load-balancing auxiliary loss coefficient."""
    moe_token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """How tokens reach experts across expert-parallel ranks."""
    moe_grouped_gemm: bool = False
    """Grouped GEMM experts (needs bf16)."""

    def __post_init__(self) -> None:
        for name in (
            "num_layers", "hidden_size", "num_attention_heads", "max_seq_length", "make_vocab_size_divisible_by"
        ):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"model.{name}={value!r} must be an integer >= 1")
        _require(
            self.hidden_size % self.num_attention_heads == 0 or self.kv_channels is not None,
            f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
            f"{self.num_attention_heads}; set model.kv_channels or pick heads in {_divisors(self.hidden_size)}",
        )
        groups = self.query_groups
        _require(
            self.num_attention_heads % groups == 0,
            f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
            f"model.num_query_groups={groups}; use num_query_groups in {_divisors(self.num_attention_heads)}",
        )
        if self.num_experts is not None:
            _require(self.num_experts >= 1, f"model.num_experts={self.num_experts} must be >= 1 (or null for dense)")
            _require(
                1 <= self.moe_router_topk <= self.num_experts,
                f"model.moe_router_topk={self.moe_router_topk} must be in [1, model.num_experts={self.num_experts}]",
            )
            _require(
                not self.moe_grouped_gemm or self.dtype == "bf16",
                "model.moe_grouped_gemm=true needs model.dtype=bf16; set dtype=bf16 or moe_grouped_gemm=false",
            )
            # Megatron refuses top-1 routing with a post-top-k softmax (the gate gradient would be zero).
            _require(
                self.moe_router_topk >= 2,
                f"model.moe_router_topk={self.moe_router_topk} is not supported (Megatron needs a pre-top-k "
                "softmax for top-1 routing); use moe_router_topk >= 2",
            )
            shared = self.moe_shared_expert_intermediate_size
            _require(
                shared is None or shared >= 1,
                f"model.moe_shared_expert_intermediate_size={shared} must be >= 1 (or null for no shared expert)",
            )
            _require(
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


@dataclass(kw_only=True)
class OptimizerConfig:
    """Adam through Megatron's optimizer (distributed optimizer optional)."""

    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the decay schedule."""
    lr_warmup_steps: int = 0
    """Linear warm-up, in optimizer steps."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up, over train.steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with backward."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with forward (needs the distributed optimizer)."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optimizer.lr={self.lr} must be > 0")
        _require(0 <= self.min_lr <= self.lr, f"optimizer.min_lr={self.min_lr} must be in [0, optimizer.lr={self.lr}]")
        _require(self.clip_grad >= 0, f"optimizer.clip_grad={self.clip_grad} must be >= 0 (0 disables clipping)")
        _require(
            not self.overlap_param_gather or self.use_distributed_optimizer,
            "optimizer.overlap_param_gather=true needs optimizer.use_distributed_optimizer=true",
        )


@dataclass(kw_only=True)
class TrainConfig:
    """Batching and the length of a run."""

    steps: int = 10
    """Optimizer steps (RL: one rollout per step, split into train.num_minibatches updates)."""
    global_batch_size: int = 8
    """Sequences per optimizer update, over all data-parallel ranks."""
    micro_batch_size: int = 2
    """Sequences per forward/backward on one rank."""
    seq_length: Optional[int] = None
    """Padded sequence length of a training batch; None means model.max_seq_length."""
    seed: int = 1234
    """Base seed of weights, data and sampling."""

    def __post_init__(self) -> None:
        _require(self.steps >= 0, f"train.steps={self.steps} must be >= 0")
        _require(self.micro_batch_size >= 1, f"train.micro_batch_size={self.micro_batch_size} must be >= 1")
        _require(self.global_batch_size >= 1, f"train.global_batch_size={self.global_batch_size} must be >= 1")


@dataclass(kw_only=True)
class LoggingConfig:
    """Where metrics go."""

    run_dir: str = "runs/default"
    """Directory of metrics.jsonl, TensorBoard events and plots."""
    tensorboard: bool = True
    """Write TensorBoard event files to run_dir/tensorboard."""
    wandb_project: Optional[str] = None
    """Also log to Weights & Biases under this project (needs the wandb extra)."""
    progress_bar: bool = True
    """A progress bar on rank 0 with reward and ETA."""
    log_every: int = 1
    """Write metrics every this many steps."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Megatron dist-checkpointing saves; resume is automatic from the newest one in dir."""

    dir: Optional[str] = None
    """Checkpoint directory; None disables saving and resuming."""
    save_every: int = 0
    """Save every this many steps; 0 saves only at the end and on SIGTERM/SIGUSR1."""
    keep_last: int = 2
    """Keep this many newest checkpoints."""
    resume: bool = True
    """Resume from the newest checkpoint in dir when one exists."""

    def __post_init__(self) -> None:
        _require(self.save_every >= 0, f"checkpoint.save_every={self.save_every} must be >= 0")
        _require(self.keep_last >= 1, f"checkpoint.keep_last={self.keep_last} must be >= 1")


@dataclass(kw_only=True)
class LossConfig:
    """The policy loss: its name, aggregation, the train/inference correction and each loss's parameters."""

    name: Literal["vespo", "grpo", "gspo", "sapo", "cispo"] = "vespo"
    """Loss from the registry (vespo_megatron.loss.policy); docs/loss.md has every formula."""
    aggregation: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    """Normaliser over the whole update (all micro-batches, all data-parallel ranks)."""
    chunk_size: int = 1024
    """Tokens whose vocabulary-parallel logits are materialised at once in the loss."""
    correction: CorrectionParams = field(default_factory=CorrectionParams)
    """Train/inference correction between the trainer's old-policy log-probs and the sampler's."""
    vespo: VespoParams = field(default_factory=VespoParams)
    """VESPO kernel parameters (k, lambda per advantage sign; length_normalize ablation)."""
    grpo: GrpoParams = field(default_factory=GrpoParams)
    """GRPO token clip parameters."""
    gspo: GspoParams = field(default_factory=GspoParams)
    """GSPO sequence-ratio clip parameters."""
    sapo: SapoParams = field(default_factory=SapoParams)
    """SAPO soft-gate temperatures."""
    cispo: CispoParams = field(default_factory=CispoParams)
    """CISPO IS-weight clip parameters."""

    def __post_init__(self) -> None:
        _require(self.chunk_size >= 1, f"loss.chunk_size={self.chunk_size} must be >= 1")

    def params(self):
        """The selected loss's parameters, carrying ``loss.correction``."""
        return dataclasses.replace(getattr(self, self.name), correction=self.correction)


@dataclass(kw_only=True)
class RolloutConfig:
    """How responses are produced for each RL step."""

    source: Literal["model", "jsonl"] = "model"
    """'model': sample with the Megatron policy itself; 'jsonl': read an inference engine's rollouts."""
    jsonl_path: Optional[str] = None
    """With source=jsonl: file of {prompt_tokens, response_tokens, sampler_logprobs, reward?, ...} lines."""
    prompts_per_step: int = 8
    """Prompts per RL step (over all data-parallel ranks)."""
    group_size: int = 4
    """Responses sampled per prompt (the GRPO group)."""
    max_new_tokens: int = 8
    """Response budget in tokens."""
    temperature: float = 1.0
    """Sampling temperature (the trainer's log-probs use the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling threshold; 1.0 disables it."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables it."""
    routing_replay: bool = False
    """MoE: record each token's experts when computing behaviour log-probs and replay them in training."""

    def __post_init__(self) -> None:
        _require(self.prompts_per_step >= 1, f"rollout.prompts_per_step={self.prompts_per_step} must be >= 1")
        _require(self.group_size >= 1, f"rollout.group_size={self.group_size} must be >= 1")
        _require(self.max_new_tokens >= 1, f"rollout.max_new_tokens={self.max_new_tokens} must be >= 1")
        _require(self.temperature > 0, f"rollout.temperature={self.temperature} must be > 0")
        _require(0 < self.top_p <= 1, f"rollout.top_p={self.top_p} must be in (0, 1]")
        _require(self.top_k >= 0, f"rollout.top_k={self.top_k} must be >= 0 (0 disables it)")
        _require(
            self.source != "jsonl" or bool(self.jsonl_path),
            "rollout.source=jsonl needs rollout.jsonl_path=<file of external rollouts>",
        )


@dataclass(kw_only=True)
class RLConfig:
    """The RL loop: advantages, staleness and asynchrony."""

    num_minibatches: int = 1
    """N: each rollout batch is split into N mini-batches applied in sequence (the staleness knob)."""
    async_lag: int = 0
    """K: rollouts come from the policy as it was K optimizer updates ago (simulated asynchrony)."""
    std_normalize_advantages: bool = True
    """Divide group-centred rewards by the group's std (GRPO); false keeps mean-centring only."""
    filter_uniform_groups: bool = False
    """Drop groups whose rewards are all equal (they carry no advantage signal)."""
    sft_warmup_steps: int = 0
    """Supervised steps on the task's reference answers before RL starts."""
    sft_lr: Optional[float] = None
    """Learning rate of the warm-up; None uses optimizer.lr."""
    eval_prompts: int = 0
    """Greedy accuracy on this many held-out prompts before and after RL (0 disables the evaluation)."""
    kl_coef: float = 0.0
    """KL penalty to a frozen reference (the policy when RL starts): each sequence's loss gains
    kl_coef * sg(S - S_ref) * S with S = sum_t log pi(y_t), the score-function gradient of KL(pi || ref).
    0 disables it (no reference model is built)."""

    def __post_init__(self) -> None:
        _require(self.num_minibatches >= 1, f"rl.num_minibatches={self.num_minibatches} must be >= 1")
        _require(self.async_lag >= 0, f"rl.async_lag={self.async_lag} must be >= 0")
        _require(self.sft_warmup_steps >= 0, f"rl.sft_warmup_steps={self.sft_warmup_steps} must be >= 0")
        _require(self.kl_coef >= 0, f"rl.kl_coef={self.kl_coef} must be >= 0 (0 disables the KL penalty)")


@dataclass(kw_only=True)
class TaskConfig:
    """Prompts and verifiable rewards."""

    name: Literal["arithmetic", "math", "jsonl"] = "arithmetic"
    """Task from vespo_megatron.tasks (docs/tasks.md)."""
    options: dict = field(default_factory=dict)
    """Keyword options of the task (e.g. max_operand for arithmetic, path and reward_fn for jsonl)."""
    tokenizer: Optional[str] = None
    """sentencepiece model file; None uses the tiny model shipped with the package."""


@dataclass(kw_only=True)
class Config:
    """A whole run."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    @property
    def seq_length(self) -> int:
        return self.train.seq_length or self.model.max_seq_length


# --------------------------------------------------------------------------------------------------
# Cross-section validation
# --------------------------------------------------------------------------------------------------


def validate(config: Config, world_size: int) -> None:
    """Reject every layout that would fail or hang once process groups exist.

    Runs in pure Python (no torch.distributed); raises :class:`ConfigError` naming fields and a fix.
    """
    _require(world_size >= 1, f"world_size={world_size} must be >= 1")
    _validate_grid(config.parallel, world_size)
    _validate_model_split(config.parallel, config.model)
    _validate_experts(config.parallel, config.model, world_size)
    _validate_batch(config, world_size)
    _validate_rl(config, world_size)


def _validate_grid(par: ParallelConfig, world_size: int) -> None:
    dense = par.model_parallel
    _require(
        world_size % dense == 0,
        f"world size {world_size} is not divisible by parallel.tp*pp*cp = {par.tp}*{par.pp}*{par.cp} = {dense}; "
        f"use a world size that is a multiple of {dense} or change tp/pp/cp",
    )
    expert = par.expert_tp * par.ep * par.pp
    _require(
        world_size % expert == 0,
        f"world size {world_size} is not divisible by parallel.etp*ep*pp = {par.expert_tp}*{par.ep}*{par.pp} "
        f"= {expert} (the expert grid); change ep or etp",
    )
    _require(
        par.vpp is None or par.pp > 1,
        f"parallel.vpp={par.vpp} needs parallel.pp > 1 (got pp={par.pp}); set vpp=null or raise pp",
    )
    _require(
        not (par.vpp and par.pp == 2 and par.batch_p2p_comm),
        "parallel.batch_p2p_comm=true with pp=2 and vpp set mismatches messages (prev and next stage are the "
        "same peer); set parallel.batch_p2p_comm=false or null",
    )


def _validate_model_split(par: ParallelConfig, model: ModelConfig) -> None:
    _require(
        model.num_attention_heads % par.tp == 0,
        f"model.num_attention_heads={model.num_attention_heads} is not divisible by parallel.tp={par.tp}; "
        f"use tp in {_divisors(model.num_attention_heads)}",
    )
    _require(
        model.query_groups % par.tp == 0,
        f"model.num_query_groups={model.query_groups} is not divisible by parallel.tp={par.tp}; "
        f"use tp in {_divisors(model.query_groups)} or raise num_query_groups",
    )
    _require(
        model.ffn_size % par.tp == 0,
        f"model.ffn_hidden_size={model.ffn_size} is not divisible by parallel.tp={par.tp}",
    )
    stages = par.pp * (par.vpp or 1)
    _require(
        model.num_layers % stages == 0,
        f"model.num_layers={model.num_layers} is not divisible by parallel.pp*vpp = {par.pp}*{par.vpp or 1} = "
        f"{stages}; use num_layers a multiple of {stages} or pp*vpp in {_divisors(model.num_layers)}",
    )
    _require(
        model.num_layers // stages >= 1,
        f"model.num_layers={model.num_layers} leaves an empty pipeline chunk with pp*vpp={stages}",
    )
    if par.cp > 1:
        _require(
            model.max_seq_length % (2 * par.cp) == 0,
            f"model.max_seq_length={model.max_seq_length} must be divisible by 2*parallel.cp={2 * par.cp} "
            "(context parallelism splits every sequence into 2*cp chunks)",
        )
    if par.sequence_parallel:
        _require(
            model.max_seq_length % (par.tp * par.cp * 2 if par.cp > 1 else par.tp) == 0,
            f"model.max_seq_length={model.max_seq_length} must be divisible by parallel.tp={par.tp}"
            + (f" * 2*cp={2 * par.cp}" if par.cp > 1 else "")
            + " with sequence_parallel=true",
        )


def _validate_experts(par: ParallelConfig, model: ModelConfig, world_size: int) -> None:
    if not model.is_moe:
        _require(
            par.ep == 1 and par.etp in (None, par.tp),
            f"parallel.ep={par.ep} / parallel.etp={par.etp} are set but model.num_experts is null (a dense model); "
            "set ep=1 and etp=null, or set model.num_experts",
        )
        return
    _require(
        model.num_experts % par.ep == 0,
        f"parallel.ep={par.ep} does not divide model.num_experts={model.num_experts}; "
        f"use ep in {_divisors(model.num_experts)}",
    )
    _require(
        par.tp == 1 or par.sequence_parallel,
        f"MoE with parallel.tp={par.tp} requires parallel.sequence_parallel=true (Megatron's MoE layer needs it)",
    )
    _require(
        par.expert_tp == 1 or not model.add_bias_linear,
        f"parallel.etp={par.expert_tp} > 1 requires model.add_bias_linear=false",
    )
    _require(
        not (par.ep == 1 and par.expert_tp != par.tp),
        f"parallel.ep=1 with parallel.etp={par.expert_tp} != tp={par.tp} leaves replicated expert weights "
        "un-reduced across tensor-parallel ranks (wrong gradients); set etp=null (= tp) or raise ep",
    )
    expert_ffn = model.moe_ffn_hidden_size or model.ffn_size
    _require(
        expert_ffn % par.expert_tp == 0,
        f"model.moe_ffn_hidden_size={expert_ffn} is not divisible by parallel.etp={par.expert_tp}",
    )
    shared = model.moe_shared_expert_intermediate_size
    _require(
        shared is None or shared % par.tp == 0,
        f"model.moe_shared_expert_intermediate_size={shared} is not divisible by parallel.tp={par.tp} "
        "(the shared expert is tensor-parallel like a dense MLP)",
    )


def _validate_batch(config: Config, world_size: int) -> None:
    dp = config.parallel.dp(world_size)
    train = config.train
    per_update = train.micro_batch_size * dp
    _require(
        train.global_batch_size % per_update == 0,
        f"train.global_batch_size={train.global_batch_size} is not divisible by train.micro_batch_size*dp = "
        f"{train.micro_batch_size}*{dp} = {per_update}; use a multiple of {per_update}",
    )
    num_micro = train.global_batch_size // per_update
    vpp = config.parallel.vpp
    if vpp:
        _require(
            num_micro % config.parallel.pp == 0,
            f"the interleaved schedule needs micro-batches per update ({num_micro} = global_batch_size / "
            f"(micro_batch_size*dp)) to be a multiple of parallel.pp={config.parallel.pp}",
        )
    _require(
        config.seq_length <= config.model.max_seq_length,
        f"train.seq_length={config.seq_length} exceeds model.max_seq_length={config.model.max_seq_length}",
    )
    # The batches are padded to train.seq_length, which the model.max_seq_length checks do not cover.
    par, seq = config.parallel, config.seq_length
    if par.cp > 1:
        _require(
            seq % (2 * par.cp) == 0,
            f"train.seq_length={seq} must be divisible by 2*parallel.cp={2 * par.cp} "
            "(context parallelism splits every sequence into 2*cp chunks)",
        )
    if par.sequence_parallel:
        _require(
            seq % (par.tp * par.cp) == 0,
            f"train.seq_length={seq} must be divisible by parallel.tp*cp={par.tp * par.cp} with "
            "sequence_parallel=true (each tensor-parallel rank holds seq_length/(tp*cp) tokens)",
        )


def _validate_rl(config: Config, world_size: int) -> None:
    dp = config.parallel.dp(world_size)
    rollout, rl, micro = config.rollout, config.rl, config.train.micro_batch_size
    _require(
        rollout.prompts_per_step % dp == 0,
        f"rollout.prompts_per_step={rollout.prompts_per_step} is not divisible by the data-parallel size {dp}; "
        "every data-parallel rank samples its own share of prompts",
    )
    sequences = rollout.prompts_per_step * rollout.group_size // dp
    per_update = rl.num_minibatches * micro
    _require(
        sequences % per_update == 0,
        f"each data-parallel rank holds rollout.prompts_per_step*group_size/dp = {sequences} sequences per step, "
        f"not divisible by rl.num_minibatches*train.micro_batch_size = {rl.num_minibatches}*{micro}; "
        "change prompts_per_step, group_size, num_minibatches or micro_batch_size",
    )
    if config.parallel.vpp:
        micro_per_update = sequences // per_update
        _require(
            micro_per_update % config.parallel.pp == 0,
            f"the interleaved schedule needs micro-batches per RL update ({micro_per_update}) to be a multiple of "
            f"parallel.pp={config.parallel.pp}",
        )
    _require(
        not (config.loss.name == "gspo" and config.parallel.cp > 1),
        "loss.name=gspo needs each sequence's mean log-ratio on one rank; it does not support parallel.cp > 1 "
        "(use vespo, grpo, sapo or cispo with context parallelism)",
    )
    _require(
        config.loss.correction.level == "sequence" or config.loss.name != "vespo",
        "loss.correction.level=token is not available with loss.name=vespo, whose sequence-parallel path only "
        "has per-sequence sums; use loss.correction.level=sequence",
    )
    _require(
        not (rl.kl_coef > 0 and config.loss.name != "vespo" and config.parallel.cp > 1),
        f"rl.kl_coef > 0 with loss.name={config.loss.name} needs whole sequences per rank; it does not support "
        "parallel.cp > 1 (VESPO's sequence-parallel path does)",
    )
    _require(
        not rollout.routing_replay or config.model.is_moe,
        "rollout.routing_replay=true needs an MoE model (model.num_experts is null)",
    )


# --------------------------------------------------------------------------------------------------
# YAML loading and overrides
# --------------------------------------------------------------------------------------------------


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = get_origin(annotation)
    if origin is Optional or (origin is not None and type(None) in get_args(annotation)):
        if value is None:
            return None
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        allowed = get_args(annotation)
        _require(value in allowed, f"{where}={value!r} is not one of {list(allowed)}")
        return value
    if dataclasses.is_dataclass(annotation):
        _require(isinstance(value, dict), f"{where} must be a mapping, got {value!r}")
        return _build(annotation, value, where)
    if annotation is bool:
        _require(isinstance(value, bool), f"{where}={value!r} must be true or false")
        return value
    if annotation is int:
        _require(isinstance(value, int) and not isinstance(value, bool), f"{where}={value!r} must be an integer")
        return value
    if annotation is float:
        # YAML 1.1 reads exponents without a dot (1e-6, 3e-4) as strings; accept them as numbers.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        _require(
            isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}={value!r} must be a number"
        )
        return float(value)
    if annotation is str:
        _require(isinstance(value, (str, int, float)), f"{where}={value!r} must be a string")
        return str(value)
    return value


def _build(cls: type, data: dict, where: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    prefix = f"{where}." if where else ""
    _require(not unknown, f"unknown key(s) {[prefix + k for k in unknown]}; valid keys: {sorted(names)}")
    kwargs = {key: _coerce(value, hints[key], prefix + key) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where or 'config'}: {err}") from None


def config_from_dict(data: dict) -> Config:
    """Build a :class:`Config` from nested plain data (unknown keys and wrong types are errors)."""
    return _build(Config, data or {}, "")


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["parallel.tp=2", "loss.name=grpo"]`` into a nested dict; values are parsed as YAML."""
    nested: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        _require(bool(sep) and bool(key), f"override {item!r} must look like section.key=value")
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            _require(isinstance(node, dict), f"override {item!r} conflicts with another override")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return nested


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``section.key=value`` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        _require(isinstance(data, dict), f"{path}: the top level must be a mapping of sections")
    return config_from_dict(_merge(data, parse_overrides(overrides or [])))


def config_to_dict(config: Config) -> dict:
    """Plain nested data (for saving next to checkpoints and metrics)."""
    return dataclasses.asdict(config)
