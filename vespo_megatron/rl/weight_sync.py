"""Weight sync from the trainer's layout to the rollout workers' layout, shard to shard, in buckets.

No rank ever assembles a whole tensor, let alone the whole model. Every trainer rank that holds the main
replica of a shard (Megatron's ``replica_id`` of zero: data-parallel rank 0, tensor-parallel rank 0 for a
replicated tensor, expert-data-parallel rank 0 for an expert) is a *source*: it sends its local shards,
flattened into buckets of about ``rl.sync_bucket_mb``, to every worker rank. A worker copies into its own
shard the part of each received shard that overlaps it. Where a shard sits is read from the model's own
``sharded_state_dict()`` (the metadata Megatron's distributed checkpoints use), so trainer and worker
agree on coordinates whatever their layouts:

* a tensor's canonical name is its sharded key plus its offsets along the prepended axes (the global layer
  index; the global expert index), so a pipeline stage or an expert-parallel rank names it as an unsplit
  model would;
* its place is a box in the canonical tensor: the global offset and the local size along every other axis.
  A SwiGLU ``linear_fc1`` (a sharded-tensor factory) is two boxes, its gate and up halves.

The plan (which source sends what, in which bucket) is exchanged once; a sync then moves only tensor
data. Sources are independent (no trainer collective during a sync), so a worker that drains one
source after the other cannot deadlock them. Every wait lasts while the peer is alive
(:mod:`vespo_megatron.runtime.liveness`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from vespo_megatron.models.gpt import unwrap
from vespo_megatron.runtime.distributed import JobSplit
from vespo_megatron.runtime.liveness import WorkerFailure

WEIGHTS_TAG = 41


@dataclass(frozen=True)
class Box:
    """One contiguous block of a local tensor and where it sits in the canonical tensor."""

    canonical: tuple
    """Start along every (non-prepended) axis of the canonical tensor."""
    local: tuple
    """Start along every axis of the local tensor."""
    size: tuple


@dataclass(frozen=True)
class ShardSpec:
    """A local tensor: its canonical name, local shape, the boxes it holds of the canonical tensor."""

    name: str
    shape: tuple
    """Local shape."""
    boxes: tuple


def _box(sharded, param: torch.Tensor) -> Box:
    """Where ``sharded`` (a ShardedTensor whose data is a view of ``param``) sits in ``param`` and canonically."""
    prepend = sharded.prepend_axis_num
    offset = sharded.data.storage_offset() - param.storage_offset()
    local = []
    for stride in param.stride():
        local.append(offset // stride)
        offset %= stride
    return Box(canonical=tuple(int(o) for o in sharded.global_offset[prepend:]), local=tuple(local),
               size=tuple(int(n) for n in sharded.data.shape))


def _is_main_replica(replica_id) -> bool:
    ids = replica_id if isinstance(replica_id, tuple) else (replica_id,)
    return all(int(i) == 0 for i in ids)


def _placements(model) -> dict[str, tuple[list, bool]]:
    """Parameter name -> (its ShardedTensors, whether this rank holds the main replica), from Megatron's
    ``sharded_state_dict`` (a factory, e.g. a SwiGLU fc1, contributes the tensors it builds)."""
    out = {}
    for name, item in model.sharded_state_dict().items():
        if isinstance(item, ShardedTensorFactory):
            tensors = list(item.build())
        elif isinstance(item, ShardedTensor):
            tensors = [item]
        else:
            continue
        out[name] = (tensors, all(_is_main_replica(t.replica_id) for t in tensors))
    return out


def canonical_shards(chunks) -> list[tuple[ShardSpec, torch.Tensor, bool]]:
    """``(spec, parameter, is_source)`` for every parameter of this rank's model chunks, in a fixed order."""
    out = []
    for chunk in chunks:
        model = unwrap(chunk)
        placements = _placements(model)
        for name, param in model.named_parameters():
            if name not in placements:
                raise RuntimeError(f"weight sync: parameter {name} has no entry in the model's sharded_state_dict")
            tensors, main = placements[name]
            first = tensors[0]
            prepended = ",".join(str(int(o)) for o in first.global_offset[:first.prepend_axis_num])
            spec = ShardSpec(name=f"{first.key}@{prepended}", shape=tuple(param.shape),
                             boxes=tuple(_box(t, param) for t in tensors))
            out.append((spec, param, main))
    return out


def plan_buckets(shards, bucket_bytes: int) -> list[list[tuple[ShardSpec, torch.Tensor]]]:
    """This rank's source shards grouped into buckets of at most ``bucket_bytes`` (a larger shard is its own)."""
    buckets, current, size = [], [], 0
    for spec, param, source in shards:
        if not source:
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

    def __init__(self, chunks, split: JobSplit, bucket_mb: float):
        self.split = split
        self.buckets = plan_buckets(canonical_shards(chunks), int(bucket_mb * 2**20))
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

    def __init__(self, chunks, split: JobSplit, manifests: dict[int, list[list[ShardSpec]]]):
        self.split = split
        self.manifests = manifests
        self.local = {spec.name: (spec, param) for spec, param, _ in canonical_shards(chunks)}
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
        """Copy every overlap of a sent box with one of this worker's boxes (an empty overlap copies nothing)."""
        if sent.name not in self.local:
            return  # a tensor this worker does not hold (another expert shard, a tied copy)
        mine, param = self.local[sent.name]
        for src in sent.boxes:
            for dst in mine.boxes:
                source, target = values, param
                for axis, (s0, sn, d0, dn) in enumerate(zip(src.canonical, src.size, dst.canonical, dst.size)):
                    start, end = max(s0, d0), min(s0 + sn, d0 + dn)
                    if start >= end:
                        break
                    source = source.narrow(axis, src.local[axis] + start - s0, end - start)
                    target = target.narrow(axis, dst.local[axis] + start - d0, end - start)
                else:
                    target.copy_(source)


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
