"""What a study runs: the grid (variants x N x seeds x models) and the overrides of each cell.

The staleness knob is varied the way the VESPO paper varies it: every optimizer update sees one
mini-batch of ``M = minibatch_prompts x group_size`` sequences made of whole groups, a rollout holds
``N x M`` sequences (N mini-batches, applied one after another, so the last update of a rollout uses data
N - 1 updates stale), and every cell runs the same number of optimizer updates, hence generates the same
number of tokens, whatever N. Only the staleness changes between the cells of one row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LOSSES = ("vespo", "grpo", "gspo", "sapo", "cispo")
HOT_SAMPLER_TEMPERATURE = 1.3
"""The heavy-weights arm's sampler temperature (the trainer's stays rollout.temperature = 1)."""
VARIANTS = {
    # The paper's two ablations of VESPO.
    "vespo-lennorm": ["loss.name=vespo", "loss.vespo.length_normalize=true"],
    "vespo-sym": ["loss.name=vespo", "loss.vespo.k_neg=2.0", "loss.vespo.lambda_neg=3.0"],
    # Train/inference mismatch: the sampler runs in bf16 while the trainer computes pi_old in fp32, as an
    # inference engine next to an fp32 trainer does; with and without the truncated-IS correction.
    "vespo+bf16": ["loss.name=vespo", "rollout.sampler_dtype=bf16"],
    "vespo+bf16+tis": ["loss.name=vespo", "rollout.sampler_dtype=bf16", "loss.correction.mode=tis"],
    "grpo+bf16": ["loss.name=grpo", "rollout.sampler_dtype=bf16"],
    "grpo+bf16+tis": ["loss.name=grpo", "rollout.sampler_dtype=bf16", "loss.correction.mode=tis"],
    # Heavy sequence weights by design: the sampler draws at a higher temperature than the trainer evaluates
    # and mu is the sampler's own log-prob, so every token adds to log W (docs/results.md, "heavy weights").
    **{f"{loss}+hot": [f"loss.name={loss}", "loss.behaviour=sampler",
                       f"rollout.sampler_temperature={HOT_SAMPLER_TEMPERATURE}"] for loss in ("vespo", "grpo", "gspo")},
}
MISMATCH_VARIANTS = ("vespo+bf16", "vespo+bf16+tis", "grpo+bf16", "grpo+bf16+tis")
HEAVY_VARIANTS = ("vespo+hot", "grpo+hot", "gspo+hot")
ABLATION_VARIANTS = ("vespo-lennorm", "vespo-sym")
MODELS = {
    "dense": [],
    # configs/tiny_moe_cpu.yaml's MoE layer in one process (ep=1).
    "moe": ["model.num_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=64",
            "model.moe_aux_loss_coeff=0.01", "model.moe_token_dispatcher=alltoall"],
}
TASKS = {
    # Step-by-step multi-operand arithmetic: responses of tens of tokens (docs/tasks.md).
    "chain": ["task.name=chain", "model.max_seq_length=64", "rollout.max_new_tokens=48"],
    # One-line sums: 1-4 token answers (the earlier toy).
    "arithmetic": ["task.name=arithmetic", "model.max_seq_length=16", "rollout.max_new_tokens=4"],
}
TASK_OPTIONS = {
    # Four operands in 0..20 with worked steps: responses of about 20-30 tokens that the tiny model can
    # learn to write out in a short warm-up (docs/tasks.md has the figures).
    "chain": {"min_operands": 4, "max_operands": 4, "max_operand": 20, "operators": "+"},
    "arithmetic": {"max_operand": 9, "operators": "+"},
}
WARMUP_LR = 3e-3
"""Learning rate of the supervised warm-up (its checkpoint carries this schedule; cells restart their own)."""
BASE_OVERRIDES = [
    "parallel.tp=1",
    f"rl.sft_lr={WARMUP_LR}",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
    "checkpoint.dir=null",
]


@dataclass(frozen=True)
class Plan:
    """One study run; every worker gets the same plan."""

    variants: tuple
    staleness: tuple
    seeds: int
    first_seed: int
    models: tuple
    task: str
    updates: int
    """Optimizer updates per cell, the same for every N (N divides it)."""
    minibatch_prompts: int
    """Prompts per mini-batch (whole groups); M = minibatch_prompts x group_size sequences per update."""
    group_size: int
    warmup_steps: int
    eval_prompts: int
    lrs: tuple
    runs_dir: str
    task_options: dict = field(default_factory=dict)

    @property
    def seed_values(self) -> range:
        return range(self.first_seed, self.first_seed + self.seeds)

    @property
    def minibatch_sequences(self) -> int:
        return self.minibatch_prompts * self.group_size

    def rollouts(self, n: int) -> int:
        return self.updates // n

    def check(self) -> None:
        bad = [n for n in self.staleness if n < 1 or self.updates % n]
        if bad:
            raise ValueError(f"N={bad}: every N must divide the {self.updates} optimizer updates per cell "
                             f"(--updates); pick N among the divisors of {self.updates} or raise --updates")
        unknown = [v for v in self.variants if v not in LOSSES and v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; known: {list(LOSSES) + list(VARIANTS)}")
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r} is not one of {list(TASKS)}")

    def unit_dir(self, model: str, seed: int) -> Path:
        return Path(self.runs_dir) / f"{self.task}_{model}_s{seed}"

    def lr_suffix(self, lr: float) -> str:
        """``_lr<lr>`` in a cell's directory name when the plan has several learning rates, else empty."""
        return f"_lr{lr:g}" if len(self.lrs) > 1 else ""

    def cell_dir(self, model: str, seed: int, variant: str, n: int, lr: float) -> Path:
        return self.unit_dir(model, seed) / f"{variant}_N{n}{self.lr_suffix(lr)}"


def _options_override(options: dict) -> str:
    inner = ", ".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in sorted(options.items()))
    return f"task.options={{{inner}}}"


def unit_overrides(plan: Plan, model: str, seed: int) -> list[str]:
    """Overrides shared by a (model, seed): model, task (its prompt stream seeded by the study seed), seeds."""
    options = dict(TASK_OPTIONS[plan.task], **plan.task_options, seed=11 + seed)
    return BASE_OVERRIDES + TASKS[plan.task] + MODELS[model] + [
        _options_override(options), f"train.seed={1234 + 1000 * seed}", f"rollout.group_size={plan.group_size}",
        f"rl.eval_prompts={plan.eval_prompts}",
    ]


def variant_overrides(variant: str) -> list[str]:
    return VARIANTS.get(variant, [f"loss.name={variant}"])


def cell_overrides(plan: Plan, model: str, seed: int, variant: str, n: int, lr: float) -> list[str]:
    """A fixed mini-batch of M sequences per update, a rollout of N x M, updates/N rollouts."""
    m = plan.minibatch_sequences
    return unit_overrides(plan, model, seed) + variant_overrides(variant) + [
        f"rollout.prompts_per_step={n * plan.minibatch_prompts}", f"rl.num_minibatches={n}",
        f"train.micro_batch_size={m}", f"train.global_batch_size={m}", f"train.steps={plan.rollouts(n)}",
        f"optimizer.lr={lr}", f"logging.run_dir={plan.cell_dir(model, seed, variant, n, lr)}",
    ]
