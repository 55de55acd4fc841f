"""What a trainer rank's RL functions read and never change: the run's config, engine, tokenizer and task.

Built once by :func:`vespo_megatron.rl.loop.build_trainer`; everything that changes from step to step is in
:class:`vespo_megatron.rl.state.LoopState`. Rollout ranks of a disaggregated job never build one: a
:class:`~vespo_megatron.rl.worker.RolloutWorker` holds its own model and follows the trainer's headers.
"""

from __future__ import annotations

from dataclasses import dataclass

from vespo_megatron.config import Config
from vespo_megatron.runtime.distributed import ParallelContext
from vespo_megatron.tasks.base import Task
from vespo_megatron.tokenizer import RunTokenizer
from vespo_megatron.train.engine import Engine


@dataclass(frozen=True)
class RLContext:
    """The trainer side of an RL run, fixed at set-up."""

    config: Config
    engine: Engine
    """The training engine: Megatron model chunks, DDP, optimizer, schedule, this rank's process groups."""
    tokenizer: RunTokenizer
    task: Task

    @property
    def parallel(self) -> ParallelContext:
        """This rank's place in the trainer's grid and its process groups."""
        return self.engine.ctx
