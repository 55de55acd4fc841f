"""Policy versions and the staleness bound: one owner that the RL loop asks.

A *policy version* is the number of optimizer updates applied to the trainer's weights. Every rollout
carries the version that sampled it; when it enters training the trainer is at version ``c`` and the
rollout's staleness is ``c - v``. With ``rl.max_staleness = K`` a rollout with ``c - v > K`` is dropped
(and counted) instead of trained. Inside one rollout the ``rl.num_minibatches`` updates see staleness
``c - v``, ``c - v + 1``, ...: the histogram counts every trained sequence at the staleness of its own
update.

In disaggregated mode the workers' pace follows from the same numbers: a worker generates RL step ``i``
only after the trainer has finished step ``i - 1 - L`` (``L`` = lookahead) and uses the newest weights
pushed by then. With ``N`` updates per step and a push every ``S`` updates the worst staleness of a
step that is not dropped is ``L * N + S - gcd(N, S)``
(:func:`vespo_megatron.config.rl.worst_staleness`, kept with the config it validates), so
:func:`~vespo_megatron.config.rl.default_lookahead` picks the largest ``L`` that keeps it within ``K``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class StalenessManager:
    """Admits or drops rollouts by version, and keeps the staleness histogram and drop counts.

    ``admit`` is asked once per rollout as it reaches the trainer; ``record_update`` once per optimizer
    update with the sequences it trained. ``step_metrics`` returns (and clears) what happened since the
    last call; totals survive checkpoints through ``state_dict``.
    """

    max_staleness: Optional[int]
    num_minibatches: int = 1
    histogram: dict = field(default_factory=dict)
    """staleness -> trained sequences, since the last ``step_metrics``."""
    dropped_rollouts: int = 0
    dropped_sequences: int = 0
    total_dropped_rollouts: int = 0
    total_dropped_sequences: int = 0
    total_trained_sequences: int = 0

    def staleness(self, behaviour_version: int, current_version: int) -> int:
        if behaviour_version > current_version:
            raise ValueError(f"a rollout of policy version {behaviour_version} reached a trainer at version "
                             f"{current_version}: versions must never run ahead of the trainer")
        return current_version - behaviour_version

    def admit(self, behaviour_version: int, current_version: int, num_sequences: int) -> bool:
        """True when the rollout may train; otherwise it is counted as dropped."""
        lag = self.staleness(behaviour_version, current_version)
        if self.max_staleness is None or lag <= self.max_staleness:
            return True
        self.dropped_rollouts += 1
        self.dropped_sequences += num_sequences
        self.total_dropped_rollouts += 1
        self.total_dropped_sequences += num_sequences
        return False

    def record_update(self, behaviour_version: int, version_before_update: int, num_sequences: int) -> int:
        """Count ``num_sequences`` trained at this update's staleness; returns that staleness."""
        lag = self.staleness(behaviour_version, version_before_update)
        self.histogram[lag] = self.histogram.get(lag, 0) + num_sequences
        self.total_trained_sequences += num_sequences
        return lag

    def histogram_bins(self) -> int:
        """Fixed number of histogram entries in the metrics (stable columns): K + N, or N + 1 unbounded."""
        bound = self.max_staleness if self.max_staleness is not None else 1
        return bound + self.num_minibatches

    def step_metrics(self) -> dict[str, float]:
        """``staleness/*`` metrics since the last call: histogram of trained sequences, mean, max, drops."""
        bins = self.histogram_bins()
        metrics = {f"staleness/hist_{lag}": float(self.histogram.get(lag, 0)) for lag in range(bins)}
        overflow = sum(count for lag, count in self.histogram.items() if lag >= bins)
        if overflow:
            metrics[f"staleness/hist_{bins}+"] = float(overflow)
        trained = sum(self.histogram.values())
        if trained:
            metrics["staleness/mean"] = sum(lag * n for lag, n in self.histogram.items()) / trained
            metrics["staleness/max"] = float(max(self.histogram))
        metrics["staleness/dropped_rollouts"] = float(self.dropped_rollouts)
        metrics["staleness/dropped_sequences"] = float(self.dropped_sequences)
        metrics["staleness/dropped_rollouts_total"] = float(self.total_dropped_rollouts)
        self.histogram = {}
        self.dropped_rollouts = 0
        self.dropped_sequences = 0
        return metrics

    def state_dict(self) -> dict:
        return {"histogram": {int(k): int(v) for k, v in self.histogram.items()},
                "dropped_rollouts": self.dropped_rollouts, "dropped_sequences": self.dropped_sequences,
                "total_dropped_rollouts": self.total_dropped_rollouts,
                "total_dropped_sequences": self.total_dropped_sequences,
                "total_trained_sequences": self.total_trained_sequences}

    def load_state_dict(self, state: dict) -> None:
        self.histogram = {int(k): int(v) for k, v in state["histogram"].items()}
        for name in ("dropped_rollouts", "dropped_sequences", "total_dropped_rollouts",
                     "total_dropped_sequences", "total_trained_sequences"):
            setattr(self, name, int(state[name]))
