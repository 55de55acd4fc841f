"""Shared pieces of the RL-loop e2e tests: a tiny config, worker entry points, metrics comparison.

The tiny config is ``configs/tiny_dense_cpu.yaml`` shrunk so that one RL step takes a fraction of a
second on one CPU worker: 16-token context, 4-token responses, 4 prompts x 4 responses per step.
Importing this module imports the RL loop (and Megatron-Core) once in the test process, so forked
workers start without re-importing it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import vespo_megatron.rl.loop  # noqa: F401 - imported once here, inherited by forked workers

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny_dense_cpu.yaml"

TINY = [
    "parallel.tp=1",
    "model.max_seq_length=16",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=4",
    "train.micro_batch_size=4",
    "train.global_batch_size=16",
    "train.steps=4",
    "task.options={max_operand: 5, seed: 3}",
    "optimizer.lr=1e-3",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
    "checkpoint.dir=null",
]
"""Overrides of CONFIG for a one-worker run of a few steps (later overrides win)."""

WALL_CLOCK_PREFIXES = ("time/", "throughput/")


def overrides(tmp_path: Path, *extra: str) -> list[str]:
    """TINY with the run directory under ``tmp_path``, then ``extra``."""
    return TINY + [f"logging.run_dir={tmp_path / 'run'}"] + list(extra)


def load(overrides_: list[str]):
    from vespo_megatron.run_config import load_run_config

    return load_run_config(CONFIG, overrides_)


# ------------------------------------------------------------------------- worker entry points


def run_worker(rank, world_size, overrides_):
    """``vespo_megatron.rl.loop.run`` on this worker; returns what the tests look at."""
    from vespo_megatron.rl.loop import run

    trainer = run(load(overrides_))
    return {"history": trainer.state.history, "step": trainer.state.step, "iteration": trainer.context.engine.iteration,
            "eval_before": trainer.eval_before, "eval_after": trainer.eval_after}


def run_workers(world_size: int, overrides_: list[str], timeout_s: float = 900):
    from vespo_megatron.runtime.local_workers import run_local_workers

    return run_local_workers(run_worker, world_size, overrides_, timeout_s=timeout_s)


# ------------------------------------------------------------------------------------ CLI runs


def cli_env() -> dict:
    """Environment of a CLI subprocess: one CPU thread, the repo importable (for tests.e2e reward modules)."""
    env = dict(os.environ)
    env.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def train_command(overrides_: list[str]) -> list[str]:
    return [sys.executable, "-m", "vespo_megatron.cli", "train", str(CONFIG), *overrides_]


def run_cli(args: list[str], timeout_s: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout_s)


# ------------------------------------------------------------------------------ metrics, files


def deterministic_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl records without the wall-clock entries (``time``, ``time/*``, ``throughput/*``)."""
    records = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records.append({k: v for k, v in record.items()
                            if k != "time" and not k.startswith(WALL_CLOCK_PREFIXES)})
    return records


def tree_digest(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root``: a checkpoint directory's exact contents."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
