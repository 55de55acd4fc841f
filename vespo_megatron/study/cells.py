"""Running a study's cells: one saved warm start per (model, seed), then every cell from it.

For each (model, seed) the worker runs the supervised warm-up once, saves it with
:func:`vespo_megatron.checkpoint.save_checkpoint` and loads it into a freshly built engine for every cell,
so all cells of that (model, seed) start from the same weights, Adam state and RNG state. A finished
cell leaves ``summary.json`` in its run directory and is not run again (a grid can be split over
processes and resumed).
"""

from __future__ import annotations

import dataclasses
import json
import time

from vespo_megatron.study.plan import WARMUP_LR, Plan, cell_overrides, unit_overrides
from vespo_megatron.study.summary import refresh, summarise


def warm_start(plan: Plan, config_path: str, model: str, seed: int) -> dict:
    """Warm up once and save; a saved warm start from an earlier run with the same plan is reused."""
    from vespo_megatron.checkpoint import latest_checkpoint, save_checkpoint
    from vespo_megatron.rl.evaluation import evaluate
    from vespo_megatron.rl.loop import build_trainer, checkpoint_state
    from vespo_megatron.rl.warmup import supervised_warmup
    from vespo_megatron.run_config import load_run_config

    root = plan.unit_dir(model, seed) / "warm_start"
    info_path = root / "warm_start.json"
    if latest_checkpoint(root) is not None and info_path.is_file():
        return json.loads(info_path.read_text())
    m = plan.minibatch_sequences
    config = load_run_config(config_path, unit_overrides(plan, model, seed) + [
        f"train.micro_batch_size={m}", f"train.global_batch_size={m}", f"optimizer.lr={WARMUP_LR}"])
    trainer = build_trainer(config)
    started = time.perf_counter()
    losses = supervised_warmup(trainer.context, plan.warmup_steps)
    accuracy = evaluate(trainer.context, plan.eval_prompts) if plan.eval_prompts else None
    path = save_checkpoint(trainer.context.engine, root, plan.warmup_steps, checkpoint_state(trainer), keep_last=1)
    info = {"model": model, "seed": seed, "task": plan.task, "steps": plan.warmup_steps,
            "sft_loss_last": losses[-1] if losses else None, "eval_accuracy": accuracy,
            "seconds": time.perf_counter() - started, "checkpoint": str(path)}
    info_path.write_text(json.dumps(info, indent=1))
    return info


def run_cell(plan: Plan, config_path: str, model: str, seed: int, variant: str, n: int, lr: float) -> dict:
    """Load the warm start into a fresh engine, run ``plan.updates`` optimizer updates, summarise."""
    from vespo_megatron.checkpoint import latest_checkpoint, load_checkpoint
    from vespo_megatron.config import config_to_dict
    from vespo_megatron.metrics import MetricsLogger
    from vespo_megatron.rl.evaluation import evaluate
    from vespo_megatron.rl.loop import build_trainer
    from vespo_megatron.rl.step import run_step
    from vespo_megatron.run_config import load_run_config

    run_dir = plan.cell_dir(model, seed, variant, n, lr)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        return refresh(json.loads(summary_path.read_text()), plan.updates)
    config = load_run_config(config_path, cell_overrides(plan, model, seed, variant, n, lr))
    # Built at the warm start's lr so its Adam state loads (Megatron matches parameter groups by lr), then
    # the schedule restarts at the cell's lr.
    trainer = build_trainer(dataclasses.replace(config, optimizer=dataclasses.replace(config.optimizer, lr=WARMUP_LR)))
    context, state = trainer.context, trainer.state
    load_checkpoint(context.engine, latest_checkpoint(plan.unit_dir(model, seed) / "warm_start"))
    context.engine.restart_schedule(lr)
    state.step = 0
    started = time.perf_counter()
    per_update = []
    with MetricsLogger(run_dir, enabled=True, tensorboard=False, config_dict=config_to_dict(config)) as logger:
        while state.step < plan.rollouts(n):
            metrics = run_step(context, state)
            state.step += 1
            if metrics is not None:
                logger.log(state.step, metrics)
                per_update += [metrics] * n  # each of the rollout's N updates trained on this rollout
        accuracy = evaluate(context, plan.eval_prompts) if plan.eval_prompts else None
    summary = summarise(per_update, plan.updates)
    summary.update(model=model, seed=seed, variant=variant, N=n, lr=lr, task=plan.task, eval_accuracy=accuracy,
                   aggregation=config.loss.aggregation_mode,
                   tokens_generated=sum(r.get("response/tokens", 0.0) for r in per_update[::n]),
                   seconds=time.perf_counter() - started, run_dir=str(run_dir))
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def grid_worker(rank, world_size, plan: Plan, config_path: str) -> dict:
    """Every (model, seed): its warm start, then every (variant, N, lr) cell, printing one line per cell."""
    warm, cells = [], []
    for model in plan.models:
        for seed in plan.seed_values:
            warm.append(warm_start(plan, config_path, model, seed))
            for variant in plan.variants:
                for n in plan.staleness:
                    for lr in plan.lrs:
                        cell = run_cell(plan, config_path, model, seed, variant, n, lr)
                        cells.append(cell)
                        print(f"study: {plan.task} {model} seed {seed} {variant} N={n} lr={lr:g}: final reward "
                              f"{cell['final_reward']:.3f}, accuracy {cell['eval_accuracy']} "
                              f"({cell['seconds']:.0f}s)", flush=True)
    return {"warm_starts": warm, "cells": cells}


def collect_finished(plan: Plan) -> dict:
    """The warm starts and cells of ``plan`` already summarised in its runs directory (a partial grid)."""
    warm, cells = [], []
    for model in plan.models:
        for seed in plan.seed_values:
            info = plan.unit_dir(model, seed) / "warm_start" / "warm_start.json"
            if info.is_file():
                warm.append(json.loads(info.read_text()))
            for variant in plan.variants:
                for n in plan.staleness:
                    for lr in plan.lrs:
                        path = plan.cell_dir(model, seed, variant, n, lr) / "summary.json"
                        if path.is_file():
                            cells.append(refresh(json.loads(path.read_text()), plan.updates))
    return {"warm_starts": warm, "cells": cells}
