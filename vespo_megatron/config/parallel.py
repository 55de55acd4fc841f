"""The `parallel` section: how ranks are arranged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from vespo_megatron.config.errors import require


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
    rollout_ranks: int = 0
    """Disaggregated RL: the last rollout_ranks ranks of the job are rollout workers (layout in
    rollout.parallel) and the others train with this section's layout; 0 keeps generation and training
    on the same ranks (colocated). docs/rl.md describes the mode."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "ep"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"parallel.{name}={value!r} must be an integer >= 1")
        require(isinstance(self.rollout_ranks, int) and self.rollout_ranks >= 0,
                 f"parallel.rollout_ranks={self.rollout_ranks!r} must be an integer >= 0 (0 = colocated)")
        require(self.vpp is None or self.vpp >= 1, f"parallel.vpp={self.vpp!r} must be None or >= 1")
        require(self.etp is None or self.etp >= 1, f"parallel.etp={self.etp!r} must be None or >= 1")
        require(
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

    def trainer_world(self, world_size: int) -> int:
        """Ranks that train: the job minus the rollout workers."""
        return world_size - self.rollout_ranks

    def dp(self, world_size: int) -> int:
        """Data-parallel size of the trainer (``world_size`` is the whole job's)."""
        return self.trainer_world(world_size) // self.model_parallel

    def expert_dp(self, world_size: int) -> int:
        return self.trainer_world(world_size) // (self.expert_tp * self.ep * self.pp)


@dataclass(kw_only=True)
class RolloutParallelConfig:
    """Layout of the rollout workers in disaggregated mode (parallel.rollout_ranks > 0).

    The rollout ranks form ``parallel.rollout_ranks / tp`` replicas of ``tp`` ranks, each holding the
    whole policy (experts unsplit: expert parallelism of the trainer is gathered away) and taking RL
    steps in turn. Pipeline and context parallelism are not used for generation.
    """

    tp: int = 1
    """Tensor-parallel size of a rollout replica (weights are resharded from the trainer's layout)."""

    def __post_init__(self) -> None:
        require(isinstance(self.tp, int) and self.tp >= 1,
                 f"rollout.parallel.tp={self.tp!r} must be an integer >= 1")
