"""The `optimizer`, `train`, `logging` and `checkpoint` sections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from vespo_megatron.config.errors import require


@dataclass(kw_only=True)
class OptimizerConfig:
    """Adam through Megatron's optimizer (distributed optimizer optional)."""

    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the decay schedule."""
    lr_warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimizer updates (Megatron's schedule: update k runs at
    lr * k / lr_warmup_steps, so the first at 0)."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up, ending at min_lr after the run's train.steps x rl.num_minibatches optimizer
    updates (supervised warm-up updates run at rl.sft_lr, outside the schedule)."""
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
        require(self.lr > 0, f"optimizer.lr={self.lr} must be > 0")
        require(0 <= self.min_lr <= self.lr, f"optimizer.min_lr={self.min_lr} must be in [0, optimizer.lr={self.lr}]")
        require(self.clip_grad >= 0, f"optimizer.clip_grad={self.clip_grad} must be >= 0 (0 disables clipping)")
        require(
            not self.overlap_param_gather or self.use_distributed_optimizer,
            "optimizer.overlap_param_gather=true needs optimizer.use_distributed_optimizer=true",
        )


@dataclass(kw_only=True)
class TrainConfig:
    """Batching and the length of a run."""

    steps: int = 10
    """Optimizer steps (RL: one rollout per step, split into rl.num_minibatches updates)."""
    global_batch_size: int = 8
    """Sequences per optimizer update, over all data-parallel ranks."""
    micro_batch_size: int = 2
    """Sequences per forward/backward on one rank (supervised steps; RL passes when
    max_tokens_per_microbatch is null)."""
    max_tokens_per_microbatch: Optional[int] = None
    """Token budget of one RL micro-batch on one rank (update, old, reference and mismatch log-prob passes):
    whole sequences are binned by length (prompt + response - 1 input positions each) so that each
    micro-batch holds at most this many, every data-parallel rank running the same number of micro-batches
    (docs/parallelism.md, "Token-budget micro-batches"). A sequence longer than the budget is an error. null:
    micro_batch_size sequences per micro-batch, each padded to seq_length."""
    pack_sequences: bool = False
    """Concatenate the sequences of a token-budget micro-batch into one row without padding (THD, attention
    restricted to each sequence, RoPE positions restarting per sequence); false pads each micro-batch to its
    longest sequence. Needs max_tokens_per_microbatch; not with parallel.cp > 1. Required with parallel.vpp,
    where every packed row is padded to the budget (the interleaved schedule sends one activation shape)."""
    seq_length: Optional[int] = None
    """Padded sequence length of a training batch; None means model.max_seq_length."""
    seed: int = 1234
    """Base seed of weights, data and sampling."""

    def __post_init__(self) -> None:
        require(self.steps >= 0, f"train.steps={self.steps} must be >= 0")
        require(self.micro_batch_size >= 1, f"train.micro_batch_size={self.micro_batch_size} must be >= 1")
        require(self.global_batch_size >= 1, f"train.global_batch_size={self.global_batch_size} must be >= 1")
        budget = self.max_tokens_per_microbatch
        require(budget is None or budget >= 1,
                 f"train.max_tokens_per_microbatch={budget} must be >= 1 (or null for micro_batch_size sequences)")
        require(not self.pack_sequences or budget is not None,
                 "train.pack_sequences=true needs train.max_tokens_per_microbatch (the token budget of a packed row)")


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
    export_hf_every: int = 0
    """Also write the weights as a Hugging Face folder (dir/hf/step_XXXXXXXX) every this many steps; needs
    model.hf_path and dir. 0 disables it. `vespo-megatron export-hf` does the same from a saved checkpoint."""

    def __post_init__(self) -> None:
        require(self.save_every >= 0, f"checkpoint.save_every={self.save_every} must be >= 0")
        require(self.keep_last >= 1, f"checkpoint.keep_last={self.keep_last} must be >= 1")
        require(self.export_hf_every >= 0, f"checkpoint.export_hf_every={self.export_hf_every} must be >= 0")
