"""Record the torch.distributed collectives a piece of code issues, with their group size and bytes.

Used by the communication tests and ``bench loss`` to check the loss's traffic budget::

    with trace_collectives() as trace:
        loss.backward()
    trace.wire_bytes(), trace.count("all_reduce")

While active, the public collectives of ``torch.distributed`` (``dist.all_reduce`` and friends) are
replaced by wrappers that record and then call the original; code must call them through the module
(``dist.all_reduce(...)``), as this project does. Nested calls (one public collective implemented
with another) are recorded once, at the outermost call.

Two byte counts per call, both per rank:

* ``payload_bytes``: the size of the tensor(s) the call produces on this rank;
* ``wire_bytes``: what a bandwidth-optimal (ring) implementation sends from this rank, the usual way
  to compare collectives: all-reduce of n bytes ``2 n (P-1)/P``; all-gather to n bytes and
  reduce-scatter from n bytes ``n (P-1)/P``; all-to-all of n input bytes the part not kept locally;
  broadcast ``n``. Single-rank groups move nothing.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

TRACED_OPS = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "_all_gather_base",
    "all_to_all",
    "all_to_all_single",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "_reduce_scatter_base",
    "broadcast",
)


@dataclass(frozen=True)
class CollectiveRecord:
    op: str
    group_size: int
    payload_bytes: int
    wire_bytes: float


@dataclass
class CommTrace:
    records: list[CollectiveRecord] = field(default_factory=list)

    def _select(self, op=None, group_size=None):
        return [
            r for r in self.records
            if (op is None or r.op == op) and (group_size is None or r.group_size == group_size)
        ]

    def count(self, op: str | None = None, group_size: int | None = None) -> int:
        """Collectives issued (group size 1 included), optionally of one kind or group size."""
        return len(self._select(op, group_size))

    def wire_bytes(self, op: str | None = None, group_size: int | None = None) -> float:
        return sum(r.wire_bytes for r in self._select(op, group_size))

    def payload_bytes(self, op: str | None = None, group_size: int | None = None) -> int:
        return sum(r.payload_bytes for r in self._select(op, group_size))

    def summary(self) -> dict:
        """``{op: {"calls", "wire_bytes"}}`` for printing or JSON."""
        out: dict = {}
        for r in self.records:
            entry = out.setdefault(r.op, {"calls": 0, "wire_bytes": 0.0})
            entry["calls"] += 1
            entry["wire_bytes"] += r.wire_bytes
        return out


def _nbytes(tensors) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_nbytes(t) for t in tensors)


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None else dist.get_world_size()


def measure(op: str, bound: inspect.BoundArguments) -> CollectiveRecord:
    """The record of one call of ``op`` with arguments ``bound``."""
    args = bound.arguments
    size = _group_size(args.get("group"))
    frac = (size - 1) / size
    if op == "all_reduce":
        payload = _nbytes(args["tensor"])
        wire = 2 * payload * frac
    elif op == "broadcast":
        payload = _nbytes(args["tensor"])
        wire = payload if size > 1 else 0
    elif op == "all_gather":
        payload = _nbytes(args["tensor_list"])
        wire = payload * frac
    elif op in ("all_gather_into_tensor", "all_gather_single", "_all_gather_base"):
        payload = _nbytes(next(v for k, v in args.items() if k.startswith("output")))
        wire = payload * frac
    elif op == "reduce_scatter":
        payload = _nbytes(args["output"])
        wire = _nbytes(args["input_list"]) * frac
    elif op in ("reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base"):
        payload = _nbytes(args["output"])
        wire = _nbytes(args["input"]) * frac
    elif op == "all_to_all":
        payload = _nbytes(args["output_tensor_list"])
        wire = _nbytes(args["input_tensor_list"]) * frac
    elif op == "all_to_all_single":
        payload = _nbytes(args["output"])
        wire = _nbytes(args["input"]) * frac
    else:  # pragma: no cover - TRACED_OPS and this table are kept together
        raise KeyError(op)
    return CollectiveRecord(op, size, payload, wire if size > 1 else 0.0)


@contextlib.contextmanager
def trace_collectives():
    """Patch the public collectives of ``torch.distributed`` for the duration; yield a :class:`CommTrace`."""
    trace = CommTrace()
    local = threading.local()
    originals = {op: getattr(dist, op) for op in TRACED_OPS if hasattr(dist, op)}

    def wrap(op, original):
        signature = inspect.signature(original)

        def traced(*args, **kwargs):
            depth = getattr(local, "depth", 0)
            if depth == 0:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                trace.records.append(measure(op, bound))
            local.depth = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                local.depth = depth

        return traced

    try:
        for op, original in originals.items():
            setattr(dist, op, wrap(op, original))
        yield trace
    finally:
        for op, original in originals.items():
            setattr(dist, op, original)
