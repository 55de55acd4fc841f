"""The weight push: the trainer's current weights into every live vLLM server.

Every trainer rank takes part in Megatron-Bridge's export (:func:`vespo_megatron.models.hf.export_hf`: each
HF tensor is gathered over TP/PP/EP one at a time and only the writing rank keeps it, in safetensors files of
about ``rollout.vllm.sync_bucket_mb``); global rank 0 writes them under ``rollout.vllm.sync_dir``
(shared memory), posts pause / collective_rpc reload_weights / resume to every server, and removes the folder.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from vespo_megatron.rollout.vllm.client import VllmClient


@dataclass(frozen=True)
class PushReport:
    """One push, as every trainer rank knows it."""

    version: int
    seconds: float
    bytes: int

    def metrics(self) -> dict[str, float]:
        """``sync/seconds`` and ``sync/bytes`` of this push."""
        return {"sync/seconds": self.seconds, "sync/bytes": float(self.bytes)}


def folder_bytes(folder: Path) -> int:
    """Bytes of the safetensors files in ``folder``."""
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def push_weights(engine, hf_path: str, sync_dir: str, bucket_mb: float, client: Optional[VllmClient]) -> PushReport:
    """Export the engine's weights and load them into the servers; collective over every trainer rank.

    ``client`` is given on global rank 0 only (it posts to the servers); the others only join the export.
    """
    from vespo_megatron.models.hf import export_hf

    started = time.perf_counter()
    engine.gather_params()  # the optimizer's sharded copy into the model parameters (distributed optimizer)
    rank = dist.get_rank() if dist.is_initialized() else 0
    target = Path(sync_dir) / f"vespo-vllm-push-{os.getpid()}-v{engine.iteration}"
    export_hf(engine.chunks, hf_path, target, max_shard_bytes=max(int(bucket_mb * 1024**2), 1))
    failure: Optional[BaseException] = None
    size = 0
    if rank == 0:
        try:
            if client is None:
                raise ValueError("push_weights: global rank 0 needs the servers' client")
            size = folder_bytes(target)
            client.reload_weights(str(target))
        except Exception as error:  # every rank must leave the broadcast below, then raise
            failure = error
        finally:
            shutil.rmtree(target, ignore_errors=True)
    report = torch.tensor([time.perf_counter() - started, float(size), float(failure is not None)],
                          dtype=torch.float64)
    if dist.is_initialized():
        dist.broadcast(report, src=0)
    if failure is not None:
        raise failure
    if report[2]:
        raise RuntimeError("the weight push failed on global rank 0 (its error names the vLLM server)")
    return PushReport(version=engine.iteration, seconds=float(report[0]), bytes=int(report[1]))
