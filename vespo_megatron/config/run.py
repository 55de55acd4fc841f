"""A whole run: one field per section."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from vespo_megatron.config.model import ModelConfig
from vespo_megatron.config.parallel import ParallelConfig
from vespo_megatron.config.rl import LossConfig, RLConfig, RolloutConfig, TaskConfig
from vespo_megatron.config.training import CheckpointConfig, LoggingConfig, OptimizerConfig, TrainConfig


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

    def __post_init__(self) -> None:
        if self.loss.behaviour is None:  # disaggregated rollouts lag the trainer: the sampler's log-probs are mu
            external = self.parallel.rollout_ranks or self.rollout.engine == "vllm"
            self.loss = replace(self.loss, behaviour="sampler" if external else "recompute")

    @property
    def seq_length(self) -> int:
        return self.train.seq_length or self.model.max_seq_length
