"""The `loss`, `rollout`, `rl` and `task` sections."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from vespo_megatron.config.errors import require
from vespo_megatron.config.parallel import RolloutParallelConfig
from vespo_megatron.loss.kernel import CorrectionParams
from vespo_megatron.loss.params import CispoParams, GrpoParams, GspoParams, SapoParams, VespoParams


@dataclass(kw_only=True)
class LossConfig:
    """The policy loss: its name, aggregation, the train/inference correction and each loss's parameters."""

    name: Literal["vespo", "grpo", "gspo", "sapo", "cispo"] = "vespo"
    """Loss from the registry (vespo_megatron.loss.policy); docs/loss.md has every formula."""
    aggregation: Optional[Literal["token-mean", "micro-token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]] = None
    """How token losses become the update's scalar (docs/loss.md, Aggregation): token-mean over the update,
    micro-token-mean (each micro-batch's token mean, averaged over the update's micro-batches),
    seq-mean-token-mean or seq-mean-token-sum. None uses the loss's reference setting: micro-token-mean for
    vespo, seq-mean-token-mean for grpo/gspo/sapo, token-mean for cispo."""
    chunk_size: int = 1024
    """Tokens whose vocabulary-parallel logits are materialised at once in the loss."""
    behaviour: Optional[Literal["recompute", "sampler"]] = None
    """Where log mu (the behaviour policy of the importance weight) comes from. 'recompute': a forward
    pass of the trainer's weights as the rollout enters training: the sampling weights themselves when
    the rollout is fresh (colocated mode, or staleness 0), a newer proximal policy otherwise, with
    loss.correction (TIS/MIS) covering the gap to the sampler's log-probs. 'sampler': the sampler's own
    per-token log-probs (also for external JSONL rollouts), so log W spans any policy lag. None (the
    default) picks 'sampler' with parallel.rollout_ranks > 0 (disaggregated: rollouts lag the trainer)
    and 'recompute' otherwise. docs/rl.md."""
    allow_uncorrected_lag: bool = False
    """Disaggregated mode: accept loss.behaviour=recompute with no loss.correction while rollouts can lag
    the trainer (then log W is 0 whatever the lag: the lag goes uncorrected). Refused unless set."""
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
        require(self.chunk_size >= 1, f"loss.chunk_size={self.chunk_size} must be >= 1")

    @property
    def aggregation_mode(self) -> str:
        """``aggregation``, or the loss's reference setting when it is None."""
        from vespo_megatron.loss.aggregate import reference_aggregation

        return self.aggregation or reference_aggregation(self.name)

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
    partial: bool = False
    """Disaggregated mode: partial rollouts. A weight push that reaches a rollout worker in the middle of a
    generation is applied between two decode steps instead of after the batch: unfinished sequences go on under
    the new weights (their cache is rebuilt under them by one prefill), every token keeps the sampler log-prob and
    policy version it was drawn with, and rl.max_staleness bounds a sequence's oldest token. Needs
    loss.behaviour=sampler, rollout.engine=kv and rollout.parallel.tp=1. docs/rl.md."""
    routing_replay: bool = False
    """MoE: record each token's experts in the sampling pass (KV engine; the behaviour log-prob pass with
    the recompute engine) and replay them when computing old log-probs and in training."""
    engine: Literal["kv", "recompute"] = "kv"
    """Decoder: 'kv' prefills once and decodes one token per step over a KV cache (falls back to
    'recompute' when parallel.cp > 1); 'recompute' re-runs the padded batch every step (the reference)."""
    max_batch_sequences: Optional[int] = None
    """Rollout micro-batching: each rank decodes its prompts of a step in batches of at most this many sequences
    (the KV cache is allocated per batch); null decodes them as one batch. Samples and log-probs are the same
    either way (each sequence keeps its column of the step's uniforms table). `check-config` proposes the
    largest value whose KV cache fits."""
    kv_step: Literal["lean", "megatron"] = "lean"
    """KV engine's one-token steps: 'lean' runs dense single-stage local-spec models as plain tensor
    operations on the same parameters and cache (several times less Python per step; MoE, pipeline stages
    and Transformer-Engine layers use the full model regardless); 'megatron' runs the full model every step."""
    stop: list[str] = field(default_factory=list)
    """Extra stop strings: a response also ends once its tokens end with one of them as the tokenizer
    encodes it (the stop token always ends it)."""
    parallel: RolloutParallelConfig = field(default_factory=RolloutParallelConfig)
    """Layout of the rollout workers when parallel.rollout_ranks > 0 (disaggregated mode)."""
    sampler_dtype: Literal["fp32", "bf16"] = "fp32"
    """Precision of the sampling forward passes: 'bf16' runs them under bf16 autocast while the trainer
    (old log-probs, updates) stays in model.dtype, the train/inference mismatch of a bf16 inference engine
    beside an fp32 trainer; loss.correction (TIS/MIS) then covers the gap between the two log-probs."""

    def __post_init__(self) -> None:
        require(self.prompts_per_step >= 1, f"rollout.prompts_per_step={self.prompts_per_step} must be >= 1")
        require(self.group_size >= 1, f"rollout.group_size={self.group_size} must be >= 1")
        require(self.max_new_tokens >= 1, f"rollout.max_new_tokens={self.max_new_tokens} must be >= 1")
        require(self.temperature > 0, f"rollout.temperature={self.temperature} must be > 0")
        require(0 < self.top_p <= 1, f"rollout.top_p={self.top_p} must be in (0, 1]")
        require(self.top_k >= 0, f"rollout.top_k={self.top_k} must be >= 0 (0 disables it)")
        require(self.max_batch_sequences is None or self.max_batch_sequences >= 1,
                f"rollout.max_batch_sequences={self.max_batch_sequences} must be >= 1 (null decodes one batch)")
        require(
            self.source != "jsonl" or bool(self.jsonl_path),
            "rollout.source=jsonl needs rollout.jsonl_path=<file of external rollouts>",
        )
        require(all(isinstance(text, str) and text for text in self.stop),
                 f"rollout.stop={self.stop!r} must be a list of non-empty strings")


def worst_staleness(lookahead: int, num_minibatches: int, sync_every: int) -> int:
    """Largest ``c - v`` of a step entering training when rollout workers run ``lookahead`` steps ahead.

    The step ``i`` enters training at version ``i N`` and was sampled with the last push at or before
    version ``(i - L) N``, i.e. ``floor((i - L) N / S) S``; the gap's worst case over ``i`` is
    ``L N + S - gcd(N, S)``.
    """
    return lookahead * num_minibatches + sync_every - math.gcd(num_minibatches, sync_every)


def default_lookahead(max_staleness: Optional[int], num_minibatches: int, sync_every: int) -> int:
    """The largest lookahead whose :func:`worst_staleness` stays within ``max_staleness`` (1 if unbounded)."""
    if max_staleness is None:
        return 1
    slack = max_staleness - worst_staleness(0, num_minibatches, sync_every)
    return max(slack // num_minibatches, 0)


@dataclass(kw_only=True)
class RLConfig:
    """The RL loop: advantages, staleness and asynchrony."""

    num_minibatches: int = 1
    """N: each rollout batch is split into N mini-batches applied in sequence (the staleness knob). A
    mini-batch takes contiguous whole groups (GRPO groups stay together) when N divides the groups per
    data-parallel rank; with more mini-batches than groups a group spans consecutive updates."""
    shuffle_groups: bool = False
    """Permute the order of the groups (never the responses within a group) before the mini-batch split,
    with a per-step seed; false keeps the sampling order."""
    async_lag: int = 0
    """Colocated mode: train on the rollout sampled async_lag RL steps earlier (simulated asynchrony)."""
    max_staleness: Optional[int] = None
    """K: a rollout whose policy version (optimizer updates before it was sampled) is more than K
    behind the trainer's when it enters training is dropped and counted; None sets no bound."""
    sync_every: int = 1
    """Disaggregated mode: push the trainer's weights to the rollout workers every this many optimizer
    updates (checked after each RL step)."""
    lookahead: Optional[int] = None
    """Disaggregated mode: RL steps a rollout worker may run ahead of the trainer. None picks the
    largest that never exceeds rl.max_staleness (1 without a bound); larger values keep workers busier
    at the price of dropped rollouts."""
    sync_bucket_mb: float = 64.0
    """Disaggregated mode: weights travel to the workers in flat buckets of about this many MiB."""
    worker_timeout_s: float = 600.0
    """Disaggregated mode: seconds a peer across the trainer/worker divide may go without a heartbeat (every
    rank beats about once a second from a background thread); past it the job fails naming the silent rank
    instead of hanging. A busy peer (a long rollout, a long training step) is waited for without limit."""
    std_normalize_advantages: bool = True
    """Divide group-centred rewards by the group's std (GRPO); false keeps mean-centring only."""
    filter_uniform_groups: bool = False
    """Drop groups whose rewards are all equal (they carry no advantage signal)."""
    mismatch_metrics: bool = True
    """Report mismatch/* every step: the trainer's log-probs as a rollout enters training against the sampler's
    (docs/rl.md). With loss.behaviour=recompute they come free with mu; with 'sampler' they cost one
    forward pass per rollout, which false skips."""
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

    @property
    def lookahead_steps(self) -> int:
        """Disaggregated mode: ``lookahead``, or the largest that keeps within ``max_staleness``."""
        if self.lookahead is not None:
            return self.lookahead
        return default_lookahead(self.max_staleness, self.num_minibatches, self.sync_every)

    @property
    def max_admitted_lag(self) -> int:
        """Disaggregated mode: the largest policy lag a trained rollout can have (versions behind the trainer)."""
        worst = worst_staleness(self.lookahead_steps, self.num_minibatches, self.sync_every)
        return worst if self.max_staleness is None else min(worst, self.max_staleness)

    def __post_init__(self) -> None:
        require(self.num_minibatches >= 1, f"rl.num_minibatches={self.num_minibatches} must be >= 1")
        require(self.async_lag >= 0, f"rl.async_lag={self.async_lag} must be >= 0")
        require(self.max_staleness is None or self.max_staleness >= 0,
                 f"rl.max_staleness={self.max_staleness} must be >= 0 or null (no bound)")
        require(self.sync_every >= 1, f"rl.sync_every={self.sync_every} must be >= 1")
        require(self.lookahead is None or self.lookahead >= 0,
                 f"rl.lookahead={self.lookahead} must be >= 0 or null (derived from rl.max_staleness)")
        require(self.sync_bucket_mb > 0, f"rl.sync_bucket_mb={self.sync_bucket_mb} must be > 0")
        require(self.worker_timeout_s > 0, f"rl.worker_timeout_s={self.worker_timeout_s} must be > 0")
        require(self.sft_warmup_steps >= 0, f"rl.sft_warmup_steps={self.sft_warmup_steps} must be >= 0")
        require(self.kl_coef >= 0, f"rl.kl_coef={self.kl_coef} must be >= 0 (0 disables the KL penalty)")


@dataclass(kw_only=True)
class TaskConfig:
    """Prompts and verifiable rewards."""

    name: Literal["arithmetic", "chain", "math", "jsonl"] = "arithmetic"
    """Task from vespo_megatron.tasks (docs/tasks.md)."""
    options: dict = field(default_factory=dict)
    """Keyword options of the task (e.g. max_operand for arithmetic, path and reward_fn for jsonl)."""
    tokenizer: Optional[str] = None
    """sentencepiece model file, or a Hugging Face tokenizer folder; None uses model.hf_path's tokenizer when that
    folder has one, else the tiny sentencepiece model shipped with the package."""
    chat_template: bool = False
    """Render each prompt as a user turn through the HF tokenizer's chat template (with the generation prompt)."""
