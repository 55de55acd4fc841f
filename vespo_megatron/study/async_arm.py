"""The study's asynchronous arm: staleness that comes from real asynchrony, not from splitting a rollout.

Every cell is one disaggregated job of two ranks (``parallel.rollout_ranks=1``: one rollout worker and one
trainer; docs/rl.md, "Disaggregated (asynchronous) mode") that runs the ordinary RL loop
(:func:`vespo_megatron.rl.loop.run`). The trainer first does the same supervised warm-up as the staleness
study's warm start (``plan.warmup_steps`` updates at the warm-up learning rate), pushes its weights to the
worker, then trains ``plan.updates`` updates of one mini-batch each (``M`` sequences of whole groups, as every
cell of the study) at the study's learning rate.
``rl.max_staleness = K`` bounds the policy lag and the worker samples ``K`` steps ahead (the default
lookahead for that bound, a weight sync after every update), so once the pipeline is full every trained
rollout was sampled by the weights of exactly ``K`` updates earlier, while the next rollouts are being
generated: K = 0 is the synchronous loop. The importance weight's behaviour policy is the sampler
(``loss.behaviour=sampler``, see ``DEFAULT_BEHAVIOUR``). What is measured per cell is what the staleness
study measures (rewards, collapse events, the VESPO diagnostics, greedy accuracy on held-out prompts), plus the lag
histogram the trainer logged (``staleness/*``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from vespo_megatron.study.plan import WARMUP_LR, Plan, cell_overrides
from vespo_megatron.study.summary import refresh, summarise

DEFAULT_BOUNDS = (0, 2, 8)
ARM_OVERRIDES = ["parallel.rollout_ranks=1", "rl.sync_every=1", "rl.lookahead=null", "rl.worker_timeout_s=900"]
DEFAULT_BEHAVIOUR = "sampler"
"""``loss.behaviour=sampler``: log mu is the sampler's own log-probs, so log W spans the K updates between the
weights that sampled a rollout and the weights that train on it. With 'recompute' (``--behaviour recompute``,
the contrast) the trainer takes mu from its current weights as the rollout arrives: W is 1 at the rollout's
only update and every loss ignores the lag."""


def async_cell_dir(plan: Plan, model: str, seed: int, variant: str, bound: int, lr: float,
                   behaviour: str = DEFAULT_BEHAVIOUR) -> Path:
    suffix = plan.lr_suffix(lr) + (f"_{behaviour}" if behaviour != DEFAULT_BEHAVIOUR else "")
    return plan.unit_dir(model, seed) / "async" / f"{variant}_K{bound}{suffix}"


def async_cell_overrides(plan: Plan, model: str, seed: int, variant: str, bound: int, lr: float,
                         behaviour: str = DEFAULT_BEHAVIOUR) -> list[str]:
    """A one-mini-batch rollout per update, K updates of lag, the warm-up inside the job."""
    return cell_overrides(plan, model, seed, variant, 1, lr) + ARM_OVERRIDES + [
        f"loss.behaviour={behaviour}", f"loss.allow_uncorrected_lag={str(behaviour == 'recompute').lower()}",
        f"rl.max_staleness={bound}", f"rl.sft_warmup_steps={plan.warmup_steps}",
        f"rl.sft_lr={WARMUP_LR}", f"logging.run_dir={async_cell_dir(plan, model, seed, variant, bound, lr, behaviour)}",
    ]


def _job(rank, world_size, config_path: str, overrides: list[str]) -> dict:
    """One rank of a cell's job: the RL loop; the trainer reports its greedy accuracy before and after."""
    from vespo_megatron.rl.loop import run
    from vespo_megatron.run_config import load_run_config

    result = run(load_run_config(config_path, overrides))
    if result.role == "rollout":
        return {"role": "rollout"}
    return {"role": "trainer", "eval_before": result.eval_before, "eval_after": result.eval_after}


def lag_summary(records: list[dict]) -> dict:
    """Mean and largest policy lag of the trained sequences, and the rollouts dropped, over the cell."""
    lags = [r["staleness/policy_lag"] for r in records if "staleness/policy_lag" in r]
    return {"lag_mean": sum(lags) / len(lags) if lags else None, "lag_max": max(lags) if lags else None,
            "dropped_rollouts": sum(r.get("staleness/dropped_rollouts", 0.0) for r in records)}


def run_async_cell(plan: Plan, config_path: str, model: str, seed: int, variant: str, bound: int, lr: float,
                   timeout_s: float, behaviour: str = DEFAULT_BEHAVIOUR) -> dict:
    """Run one cell's two-rank job (unless its summary exists) and summarise it."""
    from vespo_megatron.config import load_config
    from vespo_megatron.metrics import read_metrics
    from vespo_megatron.runtime.local_workers import run_local_workers

    run_dir = async_cell_dir(plan, model, seed, variant, bound, lr, behaviour)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        return refresh(json.loads(summary_path.read_text()), plan.updates)
    overrides = async_cell_overrides(plan, model, seed, variant, bound, lr, behaviour)
    started = time.perf_counter()
    ranks = run_local_workers(_job, 2, config_path, overrides, timeout_s=timeout_s)
    trainer = next(r for r in ranks if r["role"] == "trainer")
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "reward/mean" in r]
    summary = summarise(records, plan.updates)
    summary.update(lag_summary(records), aggregation=load_config(config_path, overrides).loss.aggregation_mode,
                   behaviour=behaviour, model=model, seed=seed, variant=variant, K=bound, N=1, lr=lr, task=plan.task, eval_accuracy=trainer["eval_after"], warm_eval_accuracy=trainer["eval_before"],
                   seconds=time.perf_counter() - started, run_dir=str(run_dir))
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def run_async_arm(plan: Plan, config_path: str, bounds: tuple, timeout_s: float, report_only: bool = False,
                  behaviour: str = DEFAULT_BEHAVIOUR) -> dict:
    """Every (model, seed, variant, K, lr) cell of the arm, printing one line per cell (``report_only``:
    only the cells already finished, nothing run)."""
    cells = []
    for model in plan.models:
        for seed in plan.seed_values:
            for variant in plan.variants:
                for bound in bounds:
                    for lr in plan.lrs:
                        done = async_cell_dir(plan, model, seed, variant, bound, lr, behaviour) / "summary.json"
                        if report_only and not done.is_file():
                            continue
                        cell = run_async_cell(plan, config_path, model, seed, variant, bound, lr, timeout_s,
                                              behaviour)
                        cells.append(cell)
                        print(f"study async: {plan.task} {model} seed {seed} {variant} K={bound} lr={lr:g}: "
                              f"final reward {cell['final_reward']:.3f}, accuracy {cell['eval_accuracy']}, "
                              f"mean lag {cell['lag_mean']} ({cell['seconds']:.0f}s)", flush=True)
    return {"cells": cells}
