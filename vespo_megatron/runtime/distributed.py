"""Process groups and seeding: the one place that talks to ``megatron.core.parallel_state``.

``initialize(config)`` picks the device and backend (cuda + nccl when a GPU is present, cpu + gloo
otherwise), joins the torch.distributed world from the torchrun/SLURM environment if no group exists
yet, applies the CPU compatibility shims, builds Megatron's TP/PP/VPP/CP/EP/ETP/DP groups and seeds
every generator the way Megatron's model-parallel seeding does. Everything downstream receives the
resulting :class:`ParallelContext` (groups as explicit handles) instead of reading globals.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from vespo_megatron.config import Config, ParallelConfig, validate
from vespo_megatron.runtime.compat import apply_cpu_compat, cpu_compat_needed
from vespo_megatron.runtime.liveness import Liveness


def device_and_backend() -> tuple[torch.device, str]:
    """``(cuda:LOCAL_RANK, "nccl")`` when CUDA is available, else ``(cpu, "gloo")``."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def collective_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """The device a buffer handed to a collective on ``group`` must live on.

    nccl groups need CUDA tensors (the current CUDA device); gloo groups need CPU tensors. ``group=None``
    is the default group.
    """
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class ParallelContext:
    """This rank's place in the grid, with the process groups the rest of the code needs."""

    device: torch.device
    world_size: int
    rank: int
    tp: int
    tp_rank: int
    sequence_parallel: bool
    pp: int
    pp_rank: int
    vpp: Optional[int]
    cp: int
    cp_rank: int
    ep: int
    ep_rank: int
    etp: int
    dp: int
    dp_rank: int
    tp_group: Optional[dist.ProcessGroup]
    cp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]
    dp_cp_group: Optional[dist.ProcessGroup]
    tp_cp_group: Optional[dist.ProcessGroup]
    """The ranks that share a sequence: the VESPO [B] all-reduce runs over this group."""
    pp_group: Optional[dist.ProcessGroup]
    model_parallel_group: Optional[dist.ProcessGroup]
    etp_rank: int = 0
    etp_group: Optional[dist.ProcessGroup] = None
    expert_dp_rank: int = 0
    global_ranks: tuple = ()
    """Global ranks of this side of the job (all ranks when colocated; trainers or workers otherwise)."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """The rank that prints progress and writes metrics (last stage, first TP/CP/DP rank)."""
        return self.is_last_stage and self.tp_rank == 0 and self.cp_rank == 0 and self.dp_rank == 0


def init_process_group_from_env(timeout_minutes: int = 30) -> None:
    """Join the world described by torchrun/srun environment variables, if not already joined."""
    if dist.is_initialized():
        return
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        # A plain `python` invocation is a world of one.
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            from vespo_megatron.runtime.local_workers import free_port

            os.environ["MASTER_PORT"] = str(free_port())
    device, backend = device_and_backend()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))


def initialize_model_parallel(par: ParallelConfig, rank_offset: int = 0, ranks: Optional[int] = None) -> None:
    """Build Megatron's process groups for ``par`` (torch.distributed must already be initialised).

    ``rank_offset``/``ranks`` lay the grid over global ranks ``rank_offset .. rank_offset + ranks - 1``
    only (disaggregated mode); every rank of the job must call it, members or not.
    """
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        rank_offset=rank_offset,
        local_world_size=ranks,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        context_parallel_size=par.cp,
        expert_model_parallel_size=par.ep,
        expert_tensor_parallel_size=par.expert_tp,
        create_gloo_process_groups=False,
    )


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and Megatron's model-parallel RNG tracker.

    Megatron gives each TP rank its own stream for weights that differ across TP (dropout inside
    TP regions) and keeps the default stream shared; the tracker must exist before any forward.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def build_context(par: ParallelConfig, device: torch.device, global_ranks: Optional[tuple] = None
                  ) -> ParallelContext:
    from megatron.core import parallel_state as ps

    global_ranks = tuple(range(dist.get_world_size())) if global_ranks is None else global_ranks
    return ParallelContext(
        device=device,
        world_size=len(global_ranks),
        rank=global_ranks.index(dist.get_rank()),
        tp=par.tp,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        sequence_parallel=par.sequence_parallel,
        pp=par.pp,
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        vpp=par.vpp,
        cp=par.cp,
        cp_rank=ps.get_context_parallel_rank(),
        ep=par.ep,
        ep_rank=ps.get_expert_model_parallel_rank(),
        etp=par.expert_tp,
        dp=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        tp_cp_group=ps.get_tensor_and_context_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        model_parallel_group=ps.get_model_parallel_group(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        etp_group=ps.get_expert_tensor_parallel_group(),
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
        global_ranks=global_ranks,
    )


def initialize(config: Config, seed: Optional[int] = None) -> ParallelContext:
    """Validate the config for this world, then set up groups, compatibility shims and seeds.

    Validation happens before Megatron's groups are built, so a bad layout fails on every rank
    with the same message instead of hanging in a collective.
    """
    world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    validate(config, world_size)
    init_process_group_from_env()
    device, _ = device_and_backend()
    if cpu_compat_needed():
        apply_cpu_compat()
    initialize_model_parallel(config.parallel)
    seed_everything(config.train.seed if seed is None else seed)
    return build_context(config.parallel, device)


@dataclass(frozen=True)
class JobSplit:
    """Disaggregated mode: which global ranks train, which generate, and the groups that join them."""

    role: str
    """'trainer' or 'rollout' for this rank."""
    trainer_ranks: tuple
    rollout_ranks: tuple
    control_group: dist.ProcessGroup
    """All ranks, gloo: rollouts and control messages (CPU tensors)."""
    weights_group: dist.ProcessGroup
    """All ranks, the device's backend (nccl on GPU, gloo on CPU): weight sync."""
    trainer_group: dist.ProcessGroup
    """The trainer ranks (preemption flag, barriers of the trainer alone)."""
    liveness: Liveness
    """This rank's heartbeat and its watch over the peers it waits for."""


def rollout_parallel_config(config: Config) -> ParallelConfig:
    """The rollout workers' layout: ``rollout.parallel.tp``, no PP/CP, experts unsplit."""
    tp = config.rollout.parallel.tp
    return ParallelConfig(tp=tp, sequence_parallel=tp > 1 and config.model.is_moe)


def _parallel_state_globals() -> dict:
    from megatron.core import parallel_state as ps

    return {name: (dict(value) if isinstance(value, dict) else value) for name, value in vars(ps).items()
            if (name.startswith("_") and name[1:2].isupper() and name.upper() == name)
            or name == "_global_process_group_list"}


def _set_parallel_state_globals(values: dict) -> None:
    from megatron.core import parallel_state as ps

    for name, value in values.items():
        setattr(ps, name, value)


def initialize_disaggregated(config: Config, seed: Optional[int] = None) -> tuple[ParallelContext, JobSplit]:
    """Split the job: the first ``world - parallel.rollout_ranks`` ranks train, the rest generate.

    Megatron's ``parallel_state`` is one set of module globals per process, and its
    ``initialize_model_parallel`` creates groups with ``new_group``, which every rank of the job must
    enter. So every rank builds both grids in the same order: the trainer grid over the first ranks
    (``rank_offset=0``), then the rollout grid over the last ones. Between the two, the module's
    globals are put back to their pristine values, and a trainer restores its own grid at the end;
    each process is left with exactly one Megatron state: its side's.
    """
    world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    validate(config, world_size)
    init_process_group_from_env()
    world_size = dist.get_world_size()
    device, backend = device_and_backend()
    if cpu_compat_needed():
        apply_cpu_compat()
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    trainers = world_size - config.parallel.rollout_ranks
    pristine = _parallel_state_globals()
    initialize_model_parallel(config.parallel, rank_offset=0, ranks=trainers)
    trainer_state = _parallel_state_globals()
    _set_parallel_state_globals(pristine)
    initialize_model_parallel(rollout_parallel_config(config), rank_offset=trainers, ranks=world_size - trainers)
    role = "trainer" if dist.get_rank() < trainers else "rollout"
    if role == "trainer":
        _set_parallel_state_globals(trainer_state)
    # Waits across the divide are bounded by liveness (runtime/liveness.py), not by the groups' own timeout:
    # a busy peer may take as long as its work does.
    timeout = timedelta(days=7)
    everyone = list(range(world_size))
    control = dist.new_group(everyone, timeout=timeout, backend="gloo")
    weights = control if backend == "gloo" else dist.new_group(everyone, timeout=timeout, backend=backend)
    trainer_group = dist.new_group(list(range(trainers)), backend=backend)
    if dist.get_rank() < trainers:
        # The trainer's world: Megatron's optimizer set-up and dist-checkpointing run collectives on the
        # default group, which must not wait for the workers. Trainers are ranks 0..T-1, so their ranks in
        # this group equal their global ranks and point-to-point addressing is unchanged.
        from torch.distributed import distributed_c10d

        distributed_c10d._update_default_pg(trainer_group)
    seed_everything(config.train.seed if seed is None else seed)
    trainer_ranks, rollout_ranks = tuple(range(trainers)), tuple(range(trainers, world_size))
    par = config.parallel if role == "trainer" else rollout_parallel_config(config)
    ctx = build_context(par, device, trainer_ranks if role == "trainer" else rollout_ranks)
    split = JobSplit(role=role, trainer_ranks=trainer_ranks, rollout_ranks=rollout_ranks, control_group=control,
                     weights_group=weights, trainer_group=trainer_group,
                     liveness=Liveness(dist.get_rank(), config.rl.worker_timeout_s))
    return ctx, split


def shutdown() -> None:
    """Tear down Megatron's groups and the default process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
