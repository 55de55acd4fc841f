"""``vespo-megatron study staleness``: every loss at N stale mini-batch updates per rollout, from one warm start.

For each (model, seed) one worker process runs a supervised warm-up once, saves it with
:func:`vespo_megatron.checkpoint.save_checkpoint` and loads it into a freshly built engine for every
(loss, N) cell, so all cells of that (model, seed) start from the same weights, Adam state and RNG
state. A cell then runs ``--steps`` RL steps on the synthetic arithmetic task with
``rl.num_minibatches=N``: each rollout of ``prompts x group`` sequences is split into N mini-batches
applied one after another (the staleness knob of the paper's Table 2). The micro-batch size is
``sequences / N``, so every update is one micro-batch; the loss is normalised over the whole update
either way, so this only changes speed. Per cell it records the final and best sampled reward, greedy
accuracy after training, collapse events and the VESPO diagnostics; it writes ``OUT/staleness.json``,
``OUT/staleness.md`` and PNG plots. docs/results.md shows a full run beside the paper.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LOSSES = ("vespo", "grpo", "gspo", "sapo", "cispo")
ABLATIONS = {
    # The paper's two ablations; extra rows beside "vespo".
    "vespo-lennorm": ["loss.name=vespo", "loss.vespo.length_normalize=true"],
    "vespo-sym": ["loss.name=vespo", "loss.vespo.k_neg=2.0", "loss.vespo.lambda_neg=3.0"],
}
MODELS = {
    "dense": [],
    # configs/tiny_moe_cpu.yaml's MoE layer, run in one process (ep=1) for speed.
    "moe": ["model.num_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=64",
            "model.moe_aux_loss_coeff=0.01", "model.moe_token_dispatcher=alltoall"],
}
BASE_OVERRIDES = [
    "parallel.tp=1",
    "model.max_seq_length=16",
    "task.name=arithmetic",
    "rollout.group_size=8",
    "rollout.max_new_tokens=4",
    "rl.sft_lr=3e-3",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
    "checkpoint.dir=null",
]
COLLAPSE_DROP = 0.5
"""A cell collapses when its windowed reward falls below COLLAPSE_DROP x its best windowed reward."""
SILENCED = 0.5
"""A step is silenced when more than this fraction of sequences has phi < 1e-3 (vespo/silenced_frac)."""
PHI_KEYS = ("vespo/phi_mean", "vespo/ess", "vespo/abs_log_w_mean", "vespo/silenced_frac")


@dataclass(frozen=True)
class Plan:
    """What one study run does; every worker gets the same plan."""

    losses: tuple
    staleness: tuple
    seeds: int
    first_seed: int
    models: tuple
    steps: int
    warmup_steps: int
    prompts_per_step: int
    eval_prompts: int
    lr: float
    runs_dir: str

    @property
    def seed_values(self) -> range:
        return range(self.first_seed, self.first_seed + self.seeds)

    @property
    def sequences(self) -> int:
        return self.prompts_per_step * 8


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vespo-megatron study", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["staleness"], help="the study to run")
    parser.add_argument("--quick", action="store_true",
                        help="reduced grid for CI: vespo, grpo x N in {1, 16} x 1 seed x dense, 6 steps")
    parser.add_argument("--out", default="runs/study", help="table, JSON and plots go here (default runs/study)")
    parser.add_argument("--runs-dir", default=None, help="per-cell metrics and warm starts (default OUT/runs)")
    parser.add_argument("--json", action="store_true", help="print the JSON of all cells on stdout")
    parser.add_argument("--losses", nargs="+", default=None, choices=list(LOSSES) + list(ABLATIONS),
                        help=f"losses (default {' '.join(LOSSES)})")
    parser.add_argument("--ablations", action="store_true", help=f"add the rows {', '.join(ABLATIONS)}")
    parser.add_argument("--staleness", nargs="+", type=int, default=None, help="N values (default 1 4 16 64)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 2)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds are first_seed .. first_seed+seeds-1 (split a grid over processes)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: tabulate and plot the cells already finished in the runs directory")
    parser.add_argument("--models", nargs="+", default=None, choices=list(MODELS), help="default dense moe")
    parser.add_argument("--steps", type=int, default=None, help="RL steps per cell (default 32, quick 6)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="supervised warm-up steps (default 60)")
    parser.add_argument("--prompts", type=int, default=8,
                        help="prompts per rollout, 8 responses each (default 8: 64 sequences, N=64 -> 1 per update)")
    parser.add_argument("--lr", type=float, default=3e-4, help="RL learning rate (default 3e-4)")
    parser.add_argument("--eval-prompts", type=int, default=64, help="greedy eval prompts after each cell")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds before the worker is killed")
    return parser


def make_plan(args) -> Plan:
    quick = args.quick
    losses = tuple(args.losses or (("vespo", "grpo") if quick else LOSSES))
    if args.ablations:
        losses += tuple(name for name in ABLATIONS if name not in losses)
    staleness = tuple(args.staleness or ((1, 16) if quick else (1, 4, 16, 64)))
    sequences = args.prompts * 8
    bad = [n for n in staleness if n < 1 or sequences % n]
    if bad:
        raise SystemExit(f"--staleness {bad}: N must divide the {sequences} sequences per rollout "
                         f"(--prompts {args.prompts} x 8 responses); pick N among the divisors of {sequences}")
    out = Path(args.out)
    return Plan(losses=losses, staleness=staleness, seeds=args.seeds or (1 if quick else 2),
                first_seed=args.first_seed,
                models=tuple(args.models or (("dense",) if quick else tuple(MODELS))),
                steps=args.steps or (6 if quick else 32), warmup_steps=args.warmup_steps if args.warmup_steps
                is not None else 60, prompts_per_step=args.prompts, eval_prompts=args.eval_prompts, lr=args.lr,
                runs_dir=str(Path(args.runs_dir) if args.runs_dir else out / "runs"))


# ------------------------------------------------------------------------------------- the worker


def _overrides(plan: Plan, model: str, seed: int) -> list[str]:
    return BASE_OVERRIDES + MODELS[model] + [
        f"task.options={{max_operand: 9, operators: \"+\", seed: {11 + seed}}}", f"train.seed={1234 + 1000 * seed}",
        f"rollout.prompts_per_step={plan.prompts_per_step}", f"rl.eval_prompts={plan.eval_prompts}",
        f"optimizer.lr={plan.lr}",
    ]


def _loss_overrides(loss: str) -> list[str]:
    return ABLATIONS.get(loss, [f"loss.name={loss}"])


def _warm_start(plan: Plan, config_path: str, model: str, seed: int) -> dict:
    """Warm up once and save; a saved warm start from an earlier run with the same plan is reused."""
    from vespo_megatron.checkpoint import latest_checkpoint, save_checkpoint
    from vespo_megatron.config import load_config
    from vespo_megatron.rl.loop import build_runner, evaluate, loop_state, supervised_warmup

    root = Path(plan.runs_dir) / f"{model}_s{seed}" / "warm_start"
    info_path = root / "warm_start.json"
    if latest_checkpoint(root) is not None and info_path.is_file():
        return json.loads(info_path.read_text())
    config = load_config(config_path, _overrides(plan, model, seed) + [
        "train.micro_batch_size=16", "train.global_batch_size=32"])
    runner = build_runner(config)
    started = time.perf_counter()
    losses = supervised_warmup(runner, plan.warmup_steps)
    accuracy = evaluate(runner, plan.eval_prompts) if plan.eval_prompts else None
    path = save_checkpoint(runner.engine, root, plan.warmup_steps, loop_state(runner), keep_last=1)
    info = {"model": model, "seed": seed, "steps": plan.warmup_steps, "sft_loss_last": losses[-1] if losses else None,
            "eval_accuracy": accuracy, "seconds": time.perf_counter() - started, "checkpoint": str(path)}
    info_path.write_text(json.dumps(info, indent=1))
    return info


def _run_cell(plan: Plan, config_path: str, model: str, seed: int, loss: str, n: int) -> dict:
    """Load the warm start into a fresh engine, run ``plan.steps`` RL steps, summarise."""
    from vespo_megatron.checkpoint import latest_checkpoint, load_checkpoint
    from vespo_megatron.config import config_to_dict, load_config
    from vespo_megatron.metrics import MetricsLogger
    from vespo_megatron.rl.loop import build_runner, evaluate, run_step

    run_dir = Path(plan.runs_dir) / f"{model}_s{seed}" / f"{loss}_N{n}"
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        return refresh(json.loads(summary_path.read_text()), plan.steps)
    config = load_config(config_path, _overrides(plan, model, seed) + _loss_overrides(loss) + [
        f"rl.num_minibatches={n}", f"train.micro_batch_size={plan.sequences // n}",
        f"train.global_batch_size={plan.sequences}", f"train.steps={plan.steps}", f"logging.run_dir={run_dir}"])
    runner = build_runner(config)
    load_checkpoint(runner.engine, latest_checkpoint(Path(plan.runs_dir) / f"{model}_s{seed}" / "warm_start"))
    started = time.perf_counter()
    records = []
    with MetricsLogger(run_dir, enabled=True, tensorboard=False, config_dict=config_to_dict(config)) as logger:
        while runner.step < plan.steps:
            metrics = run_step(runner)
            runner.step += 1
            if metrics is not None:
                logger.log(runner.step, metrics)
                records.append(metrics)
        accuracy = evaluate(runner, plan.eval_prompts) if plan.eval_prompts else None
    summary = summarise(records, plan.steps)
    summary.update(model=model, seed=seed, loss=loss, N=n, eval_accuracy=accuracy,
                   seconds=time.perf_counter() - started, run_dir=str(run_dir))
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def _grid_worker(rank, world_size, plan: Plan, config_path: str) -> dict:
    warm, cells = [], []
    for model in plan.models:
        for seed in plan.seed_values:
            warm.append(_warm_start(plan, config_path, model, seed))
            for loss in plan.losses:
                for n in plan.staleness:
                    cells.append(_run_cell(plan, config_path, model, seed, loss, n))
                    print(f"study: {model} seed {seed} {loss} N={n}: final reward {cells[-1]['final_reward']:.3f} "
                          f"({cells[-1]['seconds']:.0f}s)", flush=True)
    return {"warm_starts": warm, "cells": cells}


def collect_finished(plan: Plan) -> dict:
    """The warm starts and cells of ``plan`` already summarised in its runs directory (a partial grid)."""
    warm, cells = [], []
    for model in plan.models:
        for seed in plan.seed_values:
            unit = Path(plan.runs_dir) / f"{model}_s{seed}"
            if (unit / "warm_start" / "warm_start.json").is_file():
                warm.append(json.loads((unit / "warm_start" / "warm_start.json").read_text()))
            for loss in plan.losses:
                for n in plan.staleness:
                    path = unit / f"{loss}_N{n}" / "summary.json"
                    if path.is_file():
                        cells.append(refresh(json.loads(path.read_text()), plan.steps))
    return {"warm_starts": warm, "cells": cells}


# ------------------------------------------------------------------------------------ summaries


def _window(steps: int) -> int:
    return max(2, steps // 4)


def _finite_mean(values) -> float | None:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def reward_summary(rewards: list[float], steps: int) -> dict:
    """Final and best windowed reward and the reward-drop test (docs/results.md defines them).

    The reference for a drop is the larger of the best windowed reward and the first rollout's reward
    (sampled by the warm-start weights, the same for every cell), so a cell that falls at once counts too.
    """
    w = min(_window(steps), max(len(rewards), 1))
    windowed = [sum(rewards[i : i + w]) / w for i in range(max(len(rewards) - w + 1, 0))]
    if not windowed:
        return {"final_reward": math.nan, "best_reward": math.nan, "window": w, "reward_drop": False,
                "lowest_after_best": math.nan}
    best = max(windowed)
    reference = max(best, rewards[0])
    lowest = min(windowed) if rewards[0] >= best else min(windowed[windowed.index(best):])
    return {"final_reward": windowed[-1], "best_reward": best, "window": w, "lowest_after_best": lowest,
            "reward_drop": reference > 0.1 and lowest < COLLAPSE_DROP * reference}


def _collapse_events(reward_drop: bool, nonfinite: int, silenced: int) -> list[str]:
    return [name for name, hit in (("reward_drop", reward_drop), ("nonfinite", nonfinite), ("silenced", silenced))
            if hit]


def summarise(records: list[dict], steps: int) -> dict:
    """Rewards, collapse events and last-window VESPO diagnostics of one cell's per-step metrics."""
    rewards = [r["reward/mean"] for r in records]
    summary = reward_summary(rewards, steps)
    nonfinite = sum(1 for r in records if not math.isfinite(r.get("loss/value", 0.0))
                    or not math.isfinite(r.get("grad_norm", 0.0)))
    silenced = sum(1 for r in records if r.get("vespo/silenced_frac", 0.0) > SILENCED)
    last = records[-summary["window"]:]
    summary.update(first_reward=rewards[0] if rewards else None, nonfinite_steps=nonfinite, silenced_steps=silenced,
                   collapse=_collapse_events(summary["reward_drop"], nonfinite, silenced),
                   phi={key: _finite_mean(r.get(key) for r in last) for key in PHI_KEYS}, reward_history=rewards)
    return summary


def refresh(cell: dict, steps: int) -> dict:
    """Recompute a stored cell's reward fields and collapse events with the current definitions."""
    cell = dict(cell, **reward_summary(cell["reward_history"], steps))
    cell["collapse"] = _collapse_events(cell["reward_drop"], cell["nonfinite_steps"], cell["silenced_steps"])
    return cell


def _by(cells, **fixed):
    return [c for c in cells if all(c[k] == v for k, v in fixed.items())]


def _fmt(value, digits=3) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def write_table(result: dict, plan: Plan, out: Path, command: str) -> Path:
    cells, lines = result["cells"], []
    lines += [f"# Staleness study ({plan.steps} RL steps per cell, {plan.seeds} seed(s))", "",
              f"Command: `{command}`", "",
              f"Each entry: final sampled reward (mean of the last {_window(plan.steps)} steps), mean over seeds "
              "[min, max]; then greedy accuracy after training (mean over seeds); `!k` = k of the seeds had a collapse "
              f"event (windowed reward below {COLLAPSE_DROP} x max(best window, first rollout), non-finite loss or "
              f"grad norm, or vespo/silenced_frac > {SILENCED} at some step).", ""]
    for model in plan.models:
        warm = [w["eval_accuracy"] for w in result["warm_starts"] if w["model"] == model]
        lines += [f"## {model} (warm-start greedy accuracy {_fmt(_finite_mean(warm))})", "",
                  "| loss | " + " | ".join(f"N={n}" for n in plan.staleness) + " |",
                  "|---|" + "---|" * len(plan.staleness)]
        for loss in plan.losses:
            row = []
            for n in plan.staleness:
                group = _by(cells, model=model, loss=loss, N=n)
                finals = [c["final_reward"] for c in group]
                collapsed = sum(1 for c in group if c["collapse"])
                text = f"{_fmt(_finite_mean(finals))} [{_fmt(min(finals))}, {_fmt(max(finals))}]" if finals else "–"
                text += f"; acc {_fmt(_finite_mean(c['eval_accuracy'] for c in group))}"
                row.append(text + (f" !{collapsed}" if collapsed else ""))
            lines.append(f"| {loss} | " + " | ".join(row) + " |")
        lines += ["", f"VESPO diagnostics ({model}, last window, mean over seeds): phi_mean / ESS / |log W| / "
                      "silenced_frac", "", "| loss | " + " | ".join(f"N={n}" for n in plan.staleness) + " |",
                  "|---|" + "---|" * len(plan.staleness)]
        for loss in (name for name in plan.losses if name.startswith("vespo")):
            row = []
            for n in plan.staleness:
                group = _by(cells, model=model, loss=loss, N=n)
                row.append(" / ".join(_fmt(_finite_mean(c["phi"][k] for c in group), 2) for k in PHI_KEYS))
            lines.append(f"| {loss} | " + " | ".join(row) + " |")
        lines.append("")
    path = out / "staleness.md"
    path.write_text("\n".join(lines))
    return path


def write_plots(result: dict, plan: Plan, out: Path) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from vespo_megatron.plotting import plot_runs

    paths = []
    for model in plan.models:
        fig = Figure(figsize=(11, 4), dpi=80)
        FigureCanvasAgg(fig)
        panels = (("final_reward", f"final sampled reward (last {_window(plan.steps)} steps)"),
                  ("eval_accuracy", f"greedy accuracy after RL ({plan.eval_prompts} held-out prompts)"))
        for index, (key, ylabel) in enumerate(panels):
            ax = fig.add_subplot(1, 2, index + 1)
            for i, loss in enumerate(plan.losses):
                means, lows, highs = [], [], []
                for n in plan.staleness:
                    values = [c[key] for c in _by(result["cells"], model=model, loss=loss, N=n)
                              if c[key] is not None]
                    means.append(_finite_mean(values) if values else math.nan)
                    lows.append(min(values, default=math.nan))
                    highs.append(max(values, default=math.nan))
                ax.plot(plan.staleness, means, marker="o", color=f"C{i}", label=loss)
                ax.fill_between(plan.staleness, lows, highs, color=f"C{i}", alpha=0.12)
            ax.set_xscale("log", base=2)
            ax.set_xticks(plan.staleness, [str(n) for n in plan.staleness])
            ax.set_xlabel("N (stale mini-batch updates per rollout)")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.suptitle(f"Staleness study, {model} (band = min..max over seeds)")
        fig.tight_layout()
        path = out / f"reward_vs_N_{model}.png"
        fig.savefig(path, format="png")
        paths.append(path)
        n = max(plan.staleness)
        group = _by(result["cells"], model=model, seed=plan.first_seed, N=n)
        paths.append(plot_runs([c["run_dir"] for c in group], [c["loss"] for c in group], "reward/mean",
                               out / f"reward_curves_{model}_N{n}.png"))
    return paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = make_plan(args)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from vespo_megatron.demo import default_config_path
    from vespo_megatron.runtime.local_workers import run_local_workers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "vespo-megatron study " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    cells = len(plan.models) * plan.seeds * len(plan.losses) * len(plan.staleness)
    print(f"study: {cells} cells ({', '.join(plan.models)} x {plan.seeds} seed(s) x {', '.join(plan.losses)} x "
          f"N in {list(plan.staleness)}), {plan.steps} steps each; runs in {plan.runs_dir}", flush=True)
    started = time.perf_counter()
    if args.report_only:
        result = collect_finished(plan)
        print(f"study: --report-only, {len(result['cells'])} of {cells} cells finished", flush=True)
    else:
        result = run_local_workers(_grid_worker, 1, plan, str(default_config_path()), timeout_s=args.timeout)[0]
    result.update(plan=asdict(plan), command=command, seconds=time.perf_counter() - started)
    (out / "staleness.json").write_text(json.dumps(result, indent=1))
    table = write_table(result, plan, out, command)
    plots = write_plots(result, plan, out)
    print(table.read_text())
    print(f"study: {len(result['cells'])} cells in {result['seconds']:.0f}s; wrote {out / 'staleness.json'}, {table}, "
          + ", ".join(str(p) for p in plots))
    if args.json:
        print(json.dumps(result))
    return 0
