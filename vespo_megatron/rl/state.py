"""The RL loop's mutable state, in one typed object that checkpoints and resumes exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from vespo_megatron.rl.batch import Rollout
from vespo_megatron.rl.staleness import StalenessManager
from vespo_megatron.rollout.external import ExternalRollouts
from vespo_megatron.tasks.base import PromptStream


@dataclass
class LoopState:
    """Where the run is: the step, the prompt stream's position, the rollout queue, staleness counts.

    ``queue`` holds the colocated loop's sampled-but-not-trained rollouts (``rl.async_lag``); the
    disaggregated buffer of sampled-ahead steps belongs to the trainer's link
    (:class:`~vespo_megatron.rl.remote.RemoteRollouts`) and is checkpointed beside this state.
    """

    prompts: PromptStream
    staleness: StalenessManager
    external: Optional[ExternalRollouts] = None
    """``rollout.source=jsonl``: the file the rollouts are read from, instead of sampling."""
    step: int = 0
    queue: list[Rollout] = field(default_factory=list)
    history: list[float] = field(default_factory=list)
    """The mean sampled reward of every logged step."""
    stopping: bool = False
    """Disaggregated mode: this step is the last (train.steps reached or preemption); the workers are told."""

    def state_dict(self) -> dict:
        state = {"step": self.step, "queue": [r.state_dict() for r in self.queue], "history": list(self.history),
                 "prompts": self.prompts.state_dict(), "staleness": self.staleness.state_dict()}
        if self.external is not None:
            state["external"] = self.external.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.queue = [Rollout.from_state_dict(r) for r in state["queue"]]
        self.history = list(state.get("history", []))
        self.prompts.load_state_dict(state["prompts"])
        if self.external is not None and "external" in state:
            self.external.load_state_dict(state["external"])
        if "staleness" in state:
            self.staleness.load_state_dict(state["staleness"])
