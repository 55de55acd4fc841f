"""Run a function on N local gloo workers and collect what each returns.

This is how tests, benchmarks and the CPU demo start a small torch.distributed world without
torchrun: the parent forks ``world_size`` processes, each joins a gloo process group on a free
loopback port, calls ``fn(rank, world_size, *args)`` and sends the (picklable) result back. A worker
that raises makes the whole call raise with that worker's traceback; a worker that hangs is killed at
``timeout_s`` so a broken collective never stalls a test run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import traceback
from typing import Any, Callable, Sequence


class WorkerError(RuntimeError):
    """A local worker raised, died or timed out."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_main(fn, rank, world_size, port, args, results, threads, backend="gloo"):
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        # Plain pickle copies tensor data; the multiprocessing pickler would share memory that dies
        # with this process before the parent reads it.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            parallel_state = sys.modules.get("megatron.core.parallel_state")
            if parallel_state is not None:
                parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def run_local_workers(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
    threads_per_worker: int = 1,
    backend: str = "gloo",
) -> Sequence[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` forked gloo workers.

    With ``threads_per_worker > 1`` the workers come from a fork server instead, and with ``backend="nccl"``
    (rank ``r`` on ``cuda:r``) they are spawned (CUDA does not survive a fork), so ``fn`` and ``args`` must then
    be picklable (a module-level function).

    Returns the list of results ordered by rank. Raises :class:`WorkerError` naming the first
    failing rank (with its traceback) if any worker raises, exits abnormally or exceeds ``timeout_s``.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    # Forking is fastest (the parent's imports are inherited), but a forked child must not run OpenMP
    # parallel regions once the parent has: GNU OpenMP's thread pool does not survive fork and the child
    # hangs. Single-threaded workers never enter one; multi-threaded ones start from a fresh fork server.
    if backend == "nccl":
        ctx = mp.get_context("spawn")
    elif threads_per_worker == 1:
        ctx = mp.get_context("fork")
    else:
        # Idle OpenMP threads sleep instead of spinning (unless the user set a policy): with more threads than
        # cores, spinning threads starve the other workers' collectives (the demo at 2 workers x 2 threads on
        # 2 cores took 384 s spinning, 172 s passive). The fork server reads the environment when it starts.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch"])
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(fn, rank, world_size, port, args, results, threads_per_worker, backend),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    collected: dict[int, Any] = {}
    failure: str | None = None
    try:
        while len(collected) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout_s)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(collected))
                raise WorkerError(f"ranks {missing} produced no result within {timeout_s:.0f}s") from None
            if not ok and failure is None:
                failure = f"rank {rank} failed:\n{value}"
                break
            collected[rank] = pickle.loads(value)
    finally:
        for proc in procs:
            proc.join(timeout=5 if failure is None else 0.5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if failure is not None:
        raise WorkerError(failure)
    return [collected[rank] for rank in range(world_size)]
