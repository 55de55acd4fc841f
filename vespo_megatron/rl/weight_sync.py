"""Weight sync from the trainer's layout to the rollout workers' layout, shard to shard, in buckets.

No rank ever assembles a whole tensor, let alone the whole model. Every trainer rank that holds a
distinct shard of a parameter (data-parallel rank 0; for experts, expert-data-parallel rank 0; for
replicated parameters also tensor-parallel rank 0) is a *source*: it sends its local shards, flattened
into buckets of about ``rl.sync_bucket_mb``, to every worker rank. A worker copies into its own shard
the part of each received shard that overlaps it. Overlaps are computed on *canonical* coordinates:

* names: the local layer index becomes the global one (``layer_number - 1``), the local expert index
  the global one (``ep_rank * experts_per_rank + j``), so a pipeline stage or an expert-parallel rank
  names its parameters as an unsplit model would;
* the partition dimension of a tensor-parallel parameter is cut into ``pieces`` equal slices, shard
  ``index`` holding slice ``index``; a SwiGLU ``linear_fc1`` holds ``[gate; up]`` and is cut per half.

The plan (which source sends what, in which bucket) is exchanged once; a sync then moves only tensor
data. Sources are independent (no trainer collective during a sync), so a worker that drains one
source after the other cannot deadlock them. Every wait lasts while the peer is alive
(:mod:`vespo_megatron.runtime.liveness`).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from vespo_megatron.models.gpt import unwrap
from vespo_megatron.runtime.liveness import WorkerFailure

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"local_experts\.(\d+)\.")
_GROUPED_EXPERT = re.compile(r"(experts\.linear_fc[12]\.(?:weight|bias))(\d+)$")
WEIGHTS_TAG = 41


@dataclass(frozen=True)
class ShardSpec:
    """Where a local tensor sits in its canonical (unsplit) tensor."""

    name: str
    shape: tuple
    """Local shape."""
    dim: Optional[int]
    """Partition dimension; None for a replicated tensor."""
    pieces: int
    index: int
    halves: int
    """2 for a SwiGLU fc1 (gate and up are split separately), else 1."""

    def ranges(self) -> list[tuple[int, int, int]]:
        """``(canonical start, canonical end, local start)`` along ``dim`` for every contiguous part."""
        if self.dim is None:
            return []
        local = self.shape[self.dim]
        part = local // self.halves
        full_half = part * self.pieces
        return [(h * full_half + self.index * part, h * full_half + (self.index + 1) * part, h * part)
                for h in range(self.halves)]


def _expert_index_offset(ctx, num_experts: int) -> int:
    return ctx.ep_rank * (num_experts // ctx.ep)


def canonical_shards(chunks, ctx, num_experts: Optional[int], swiglu: bool) -> list[tuple[ShardSpec, torch.Tensor, bool]]:
    """``(spec, parameter, is_expert)`` for every parameter of this rank's model chunks, in a fixed order."""
    out = []
    for chunk in chunks:
        model = unwrap(chunk)
        layers = list(model.decoder.layers) if hasattr(model, "decoder") else []
        for name, param in model.named_parameters():
            match = _LAYER.match(name)
            if match:
                name = f"decoder.layers.{layers[int(match.group(1))].layer_number - 1}." + name[match.end():]
            expert = not getattr(param, "allreduce", True)
            if expert and num_experts:
                offset = _expert_index_offset(ctx, num_experts)
                name = _LOCAL_EXPERT.sub(lambda m, o=offset: f"local_experts.{int(m.group(1)) + o}.", name)
                name = _GROUPED_EXPERT.sub(lambda m, o=offset: f"{m.group(1)}{int(m.group(2)) + o}", name)
            sharded = bool(getattr(param, "tensor_model_parallel", False))
            pieces, index = (ctx.etp, ctx.etp_rank) if expert else (ctx.tp, ctx.tp_rank)
            dim = int(param.partition_dim) if sharded else None
            gated = swiglu and dim == 0 and "linear_fc1." in name
            spec = ShardSpec(name=name, shape=tuple(param.shape), dim=dim, pieces=pieces if sharded else 1,
                             index=index if sharded else 0, halves=2 if gated else 1)
            out.append((spec, param, expert))
    return out


def is_source(ctx, spec: ShardSpec, expert: bool) -> bool:
    """Whether this trainer rank sends this shard (one copy of every distinct shard is sent)."""
    replicated_ok = spec.dim is not None or (ctx.etp_rank == 0 if expert else ctx.tp_rank == 0)
    if expert:
        return ctx.expert_dp_rank == 0 and replicated_ok
    return ctx.dp_rank == 0 and ctx.cp_rank == 0 and replicated_ok


def plan_buckets(shards, ctx, bucket_bytes: int) -> list[list[tuple[ShardSpec, torch.Tensor]]]:
    """This source's shards grouped into buckets of at most ``bucket_bytes`` (a larger shard is its own)."""
    buckets, current, size = [], [], 0
    for spec, param, expert in shards:
        if not is_source(ctx, spec, expert):
            continue
        nbytes = param.numel() * param.element_size()
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append((spec, param))
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def post(op, tensor: torch.Tensor, peer: int, group, tag: int, what: str):
    """``dist.isend``/``dist.irecv`` to/from global rank ``peer``; a dead peer becomes a :class:`WorkerFailure`."""
    try:
        return op(tensor, peer, group=group, tag=tag)
    except Exception as exc:
        raise WorkerFailure(f"{what} failed: {exc}") from exc


class TrainerSync:
    """Trainer side: the bucket plan of this rank and ``push`` of the current weights."""

    def __init__(self, chunks, ctx, split, num_experts, swiglu: bool, bucket_mb: float):
        self.split = split
        self.buckets = plan_buckets(canonical_shards(chunks, ctx, num_experts, swiglu), ctx,
                                    int(bucket_mb * 2**20))
        self.device = ctx.device
        self.in_flight: list = []
        """``(worker rank, work, buffer)`` of the last push, until every worker has taken it."""

    def manifest(self) -> list[list[ShardSpec]]:
        return [[spec for spec, _ in bucket] for bucket in self.buckets]

    @torch.no_grad()
    def push(self) -> dict[str, float]:
        """Post every bucket to every worker rank; returns ``sync/seconds`` and ``sync/bytes`` (this rank's).

        The push does not wait for the workers: each bucket is a copy, sent while the trainer goes on, and a
        worker takes it at the next step boundary it reaches (never inside a generation). Only the previous
        push must have been taken first (one push in flight: one copy of this rank's source shards).
        """
        started = time.perf_counter()
        self.finish()
        sent = 0
        for bucket in self.buckets:
            flat = torch.cat([param.detach().reshape(-1) for _, param in bucket])
            for dst in self.split.rollout_ranks:
                work = post(dist.isend, flat, dst, self.split.weights_group, WEIGHTS_TAG,
                            f"weight sync to rollout worker rank {dst}")
                self.in_flight.append((dst, work, flat))
                sent += flat.numel() * flat.element_size()
        return {"sync/seconds": time.perf_counter() - started, "sync/bytes": float(sent)}

    def finish(self) -> None:
        """Wait until every worker has taken the last push (for as long as the workers are alive)."""
        for dst, work, _ in self.in_flight:
            self.split.liveness.wait(work, dst, f"weight sync to rollout worker rank {dst}")
        self.in_flight = []


class WorkerSync:
    """Worker side: where each received shard lands in this worker's parameters."""

    def __init__(self, chunks, ctx, split, num_experts, swiglu: bool, manifests: dict[int, list[list[ShardSpec]]]):
        self.split = split
        self.manifests = manifests
        self.local = {spec.name: (spec, param) for spec, param, _ in canonical_shards(chunks, ctx, num_experts, swiglu)}
        offered = {spec.name for buckets in manifests.values() for bucket in buckets for spec in bucket}
        missing = sorted(set(self.local) - offered)
        if missing:
            raise RuntimeError(f"rollout worker parameters {missing[:4]} are not sent by any trainer rank; "
                               "the trainer and rollout models differ (check model and parallel settings)")

    @torch.no_grad()
    def receive(self) -> int:
        """Receive one sync from every source in rank order; returns the bytes received."""
        received = 0
        for source in sorted(self.manifests):
            for bucket in self.manifests[source]:
                dtype = next(iter(self.local.values()))[1].dtype
                numel = sum(math.prod(spec.shape) for spec in bucket)
                flat = torch.empty(numel, dtype=dtype, device=next(iter(self.local.values()))[1].device)
                work = post(dist.irecv, flat, source, self.split.weights_group, WEIGHTS_TAG,
                            f"weight sync from trainer rank {source}")
                self.split.liveness.wait(work, source, f"weight sync from trainer rank {source}")
                received += flat.numel() * flat.element_size()
                offset = 0
                for spec in bucket:
                    size = math.prod(spec.shape)
                    self._apply(spec, flat[offset : offset + size].view(spec.shape))
                    offset += size
        return received

    def _apply(self, sent: ShardSpec, values: torch.Tensor) -> None:
        if sent.name not in self.local:
            return  # a tensor this worker does not hold (another expert shard, a tied copy)
        mine, param = self.local[sent.name]
        if sent.dim is None or mine.dim is None:
            if tuple(values.shape) != tuple(param.shape):
                raise RuntimeError(f"weight sync: {sent.name} has shape {tuple(values.shape)} on the trainer and "
                                   f"{tuple(param.shape)} on the worker")
            param.copy_(values)
            return
        for src_start, src_end, src_local in sent.ranges():
            for dst_start, dst_end, dst_local in mine.ranges():
                start, end = max(src_start, dst_start), min(src_end, dst_end)
                if start >= end:
                    continue
                piece = values.narrow(sent.dim, src_local + start - src_start, end - start)
                param.narrow(mine.dim, dst_local + start - dst_start, end - start).copy_(piece)


def exchange_manifests(split, trainer_sync: Optional[TrainerSync], dp_rank: Optional[int] = None
                       ) -> tuple[dict[int, list[list[ShardSpec]]], list[int]]:
    """Every rank learns every trainer rank's bucket plan and data-parallel rank (once, at start-up).

    Returns ``{source rank: buckets}`` and the data-parallel rank of each trainer rank, in rank order.
    """
    mine = (trainer_sync.manifest() if trainer_sync is not None else None, dp_rank)
    gathered = [None] * dist.get_world_size(group=split.control_group)
    dist.all_gather_object(gathered, mine, group=split.control_group)
    plans = {rank: plan for rank, (plan, _) in enumerate(gathered) if plan}
    return plans, [gathered[rank][1] for rank in split.trainer_ranks]
