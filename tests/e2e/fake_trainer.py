"""A stand-in for ``vespo-megatron train`` that the launcher tests run under torchrun.

It keeps the parts of the real entry point's contract that a launcher can break, and nothing else:

* command line ``fake_trainer.py CONFIG [section.key=value ...]``; CONFIG is a YAML file and the
  overrides replace its keys (``checkpoint.dir``, ``logging.run_dir``, ``train.steps``,
  ``train.step_seconds``, ``checkpoint.interval``);
* it reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and joins a
  gloo group (nccl when CUDA exists);
* each step all-reduces a tensor and rank 0 appends one JSON line to ``<logging.run_dir>/metrics.jsonl``;
* SIGTERM or SIGUSR1 makes every rank stop after the current step, save a checkpoint and exit 0;
* on start it resumes from ``<checkpoint.dir>/latest.json`` when that file exists.

Swapping in the real CLI is a change of the command the test passes to the launcher, not of the launcher.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

_stop_signal: list[int] = []


def _on_stop_signal(signum, frame) -> None:
    # Only record the request; the loop agrees on the stop step across ranks with an all-reduce.
    _stop_signal.append(signum)


def load_config(path: str, overrides: list[str]) -> dict:
    config = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"override {item!r} is not section.key=value")
        section, name = key.split(".", 1)
        config.setdefault(section, {})[name] = yaml.safe_load(value)
    return config


def load_checkpoint(ckpt_dir: Path) -> int:
    latest = ckpt_dir / "latest.json"
    return json.loads(latest.read_text())["step"] if latest.exists() else 0


def save_checkpoint(ckpt_dir: Path, step: int) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / "latest.json.tmp"
    tmp.write_text(json.dumps({"step": step}))
    os.replace(tmp, ckpt_dir / "latest.json")


def main(argv: list[str]) -> int:
    if len(argv) < 1:
        raise SystemExit("usage: fake_trainer.py CONFIG [section.key=value ...]")
    config = load_config(argv[0], argv[1:])
    steps = int(config["train"]["steps"])
    step_seconds = float(config["train"].get("step_seconds", 0.0))
    interval = int(config["checkpoint"].get("interval", 0))
    ckpt_dir = Path(config["checkpoint"]["dir"])
    run_dir = Path(config["logging"]["run_dir"])

    signal.signal(signal.SIGTERM, _on_stop_signal)
    signal.signal(signal.SIGUSR1, _on_stop_signal)

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    start_step = load_checkpoint(ckpt_dir)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"rank 0 of {world_size} on {socket.gethostname()}: steps {start_step}..{steps - 1}", flush=True)

    step = start_step
    while step < steps:
        value = torch.ones(1)
        dist.all_reduce(value)
        time.sleep(step_seconds)
        if rank == 0:
            record = {
                "step": step,
                "world_size": world_size,
                "allreduce": value.item(),
                "resumed_from": start_step,
                "restart": restart,
            }
            with open(run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        step += 1
        stop = torch.tensor([1.0 if _stop_signal else 0.0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() or (interval and step % interval == 0) or step == steps:
            if rank == 0:
                save_checkpoint(ckpt_dir, step)
            dist.barrier()
        if stop.item():
            if rank == 0:
                print(f"stop signal: saved checkpoint at step {step}, exiting", flush=True)
            break

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
