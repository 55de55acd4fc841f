"""``vespo-megatron study``: the staleness study the way the VESPO paper varies N, and its learning-rate sweep.

``study staleness`` runs every variant (a loss, an ablation, or a train/inference-mismatch arm) at each N
from one saved warm start per (model, seed): the mini-batch per optimizer update is fixed, the rollout grows
to N mini-batches, and every cell runs the same number of updates (vespo_megatron/study/plan.py).
``study lr-sweep`` runs the variants at N = 1 over several learning rates, to choose the one rate every
cell of the staleness study then uses. ``study frontier`` runs the staleness grid at every rate of a sweep that
spans "all fine" to "all collapse" and reports, per (variant, N), the largest rate that still learns
(vespo_megatron/study/frontier.py). ``study async`` is the asynchronous arm: each cell a two-rank job (one
rollout worker, one trainer) with ``rl.max_staleness = K`` (vespo_megatron/study/async_arm.py). Each writes
``OUT/<name>.json`` and ``OUT/<name>.md`` (staleness and async also PNG plots); docs/results.md shows full runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from vespo_megatron.study.plan import (
    ABLATION_VARIANTS,
    HEAVY_VARIANTS,
    HOT_SAMPLER_TEMPERATURE,
    LOSSES,
    MISMATCH_VARIANTS,
    MODELS,
    TASKS,
    VARIANTS,
    Plan,
)
from vespo_megatron.study.frontier import KEEP, comparison_table, frontier_table, paired_comparisons
from vespo_megatron.study.frontier import frontier as frontier_rows
from vespo_megatron.study.summary import summarise

FRONTIER_LRS = (3e-4, 5e-4, 7e-4, 1e-3, 1.5e-3)
"""``study frontier``'s default sweep: from where every loss learns to where every loss collapsed before."""

__all__ = ["build_parser", "main", "make_plan", "summarise"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vespo-megatron study", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["staleness", "lr-sweep", "frontier", "async"], help="the study to run")
    parser.add_argument("--quick", action="store_true",
                        help="reduced grid for CI: vespo, grpo x N in {1, 4} (async: K in {0, 2}) x 1 seed x "
                             "dense, 4 updates (frontier: lr in {3e-4, 1e-3})")
    parser.add_argument("--max-staleness", type=int, nargs="+", default=None, metavar="K",
                        help="async: rl.max_staleness bounds, the worker running K steps ahead (default 0 2 8)")
    parser.add_argument("--behaviour", choices=["sampler", "recompute"], default="sampler",
                        help="async: loss.behaviour of every cell; 'sampler' (default) puts the lag into log W, "
                             "'recompute' takes mu from the trainer's current weights (W = 1: the lag is ignored)")
    parser.add_argument("--out", default="runs/study", help="tables, JSON and plots go here (default runs/study)")
    parser.add_argument("--runs-dir", default=None, help="per-cell metrics and warm starts (default OUT/runs)")
    parser.add_argument("--json", action="store_true", help="print the JSON of all cells on stdout")
    parser.add_argument("--task", default="chain", choices=list(TASKS),
                        help="chain: step-by-step sums with responses of tens of tokens (default); "
                             "arithmetic: one-line sums")
    parser.add_argument("--losses", nargs="+", default=None, choices=list(LOSSES) + list(VARIANTS),
                        help=f"variants (default {' '.join(LOSSES)})")
    parser.add_argument("--ablations", action="store_true", help=f"add the rows {', '.join(ABLATION_VARIANTS)}")
    parser.add_argument("--mismatch", action="store_true",
                        help=f"add the train/inference mismatch arm: {', '.join(MISMATCH_VARIANTS)}")
    parser.add_argument("--heavy-weights", action="store_true",
                        help=f"add the heavy-weights arm: {', '.join(HEAVY_VARIANTS)} (the sampler draws at "
                             f"temperature {HOT_SAMPLER_TEMPERATURE}, the trainer evaluates at 1, mu is the "
                             "sampler's log-prob: every token adds to log W)")
    parser.add_argument("--staleness", nargs="+", type=int, default=None,
                        help="N values (default 1 4 16 64; frontier 1 8 32 64)")
    parser.add_argument("--updates", type=int, default=None,
                        help="optimizer updates per cell, the same for every N (default 64, quick 4)")
    parser.add_argument("--minibatch-prompts", type=int, default=2,
                        help="prompts per mini-batch (x group size sequences per update; default 2)")
    parser.add_argument("--group-size", type=int, default=8, help="responses per prompt (default 8)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 3, quick 1)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds are first_seed .. first_seed+seeds-1 (split a grid over processes)")
    parser.add_argument("--models", nargs="+", default=None, choices=list(MODELS), help="default dense moe")
    parser.add_argument("--warmup-steps", type=int, default=None, help="supervised warm-up steps (default 150)")
    parser.add_argument("--lr", type=float, nargs="+", default=None,
                        help="RL learning rate(s); staleness takes one (default 1e-4), lr-sweep several "
                             "(default 3e-5 1e-4 3e-4), frontier several, the smallest being the base rate "
                             "(default 3e-4 5e-4 7e-4 1e-3 1.5e-3)")
    parser.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a task option (repeatable), e.g. --task-option max_operands=3")
    parser.add_argument("--eval-prompts", type=int, default=64, help="greedy eval prompts after each cell")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: tabulate and plot the cells already finished in the runs directory")
    parser.add_argument("--timeout", type=float, default=8 * 3600, help="seconds before the worker is killed")
    return parser


def _task_options(items: list[str]) -> dict:
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--task-option {item!r} must look like KEY=VALUE")
        options[key] = yaml.safe_load(value)
    return options


def comparisons_section(rows: list[dict], eval_prompts: int) -> str:
    """Markdown: the paired comparisons with how to read them and the evaluation's own noise."""
    se = [row["eval_se"] for row in rows if row.get("eval_se") is not None]
    noise = (f" One cell's accuracy on {eval_prompts} prompts has a binomial standard error of about "
             f"{sum(se) / len(se):.3f} (a lower bound: prompts repeat problems)." if se else "")
    return ("\n## Paired by seed: each variant against its arm's VESPO\n\n"
            "Reference minus variant over the seeds both ran (same warm start and prompts). `frontier` rows: "
            "the per-seed frontier (its own N = 1 base accuracy, the same 90 % rule) in steps of the rate grid. "
            "`detectable`: the true difference this many seeds find with 80 % power at a two-sided 5 % level; "
            "`decided`: both intervals exclude 0. A 'no' with a large `detectable` is a lack of power, not "
            f"evidence of equality.{noise}\n\n" + comparison_table(rows))


def make_plan(args) -> Plan:
    quick, sweep, frontier = args.quick, args.what == "lr-sweep", args.what == "frontier"
    variants = tuple(args.losses or (("vespo", "grpo") if quick else LOSSES))
    if args.ablations:
        variants += tuple(v for v in ABLATION_VARIANTS if v not in variants)
    if args.mismatch:
        variants += tuple(v for v in MISMATCH_VARIANTS if v not in variants)
    if args.heavy_weights:
        variants += tuple(v for v in HEAVY_VARIANTS if v not in variants)
    if args.lr:
        lrs = tuple(sorted(args.lr))
    elif sweep:
        lrs = (3e-5, 1e-4, 3e-4)
    elif frontier:
        lrs = (3e-4, 1e-3) if quick else FRONTIER_LRS
    else:
        lrs = (1e-4,)
    if args.what in ("staleness", "async") and len(lrs) != 1:
        raise SystemExit(f"study {args.what} takes one --lr (run `study lr-sweep` or `study frontier` for several)")
    if frontier and len(lrs) < 2:
        raise SystemExit("study frontier needs at least two --lr values (the smallest is the base rate)")
    if args.what == "async":
        bad = [k for k in args.max_staleness or () if k < 0]
        if bad:
            raise SystemExit(f"study async: --max-staleness {bad} must be >= 0")
        if args.models and "moe" in args.models:
            raise SystemExit("study async: dense only (the arm's rollout worker runs one rank without EP)")
    fixed_n = sweep or args.what == "async"
    full_n = (1, 8, 32, 64) if frontier else (1, 4, 16, 64)
    staleness = (1,) if fixed_n else tuple(args.staleness or ((1, 4) if quick else full_n))
    if frontier and 1 not in staleness:
        raise SystemExit("study frontier needs N = 1 in --staleness (each variant's reference accuracy)")
    out = Path(args.out)
    plan = Plan(variants=variants, staleness=staleness, seeds=args.seeds or (1 if quick else 3),
                first_seed=args.first_seed,
                models=tuple(args.models or (("dense",) if quick or args.what == "async" else tuple(MODELS))),
                task=args.task, updates=args.updates or (4 if quick else 64),
                minibatch_prompts=args.minibatch_prompts, group_size=args.group_size,
                warmup_steps=args.warmup_steps if args.warmup_steps is not None else (8 if quick else 150),
                eval_prompts=args.eval_prompts, lrs=lrs,
                runs_dir=str(Path(args.runs_dir) if args.runs_dir else out / "runs"),
                task_options=_task_options(args.task_option))
    try:
        plan.check()
    except ValueError as err:
        raise SystemExit(f"study: {err}") from None
    return plan


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = make_plan(args)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from vespo_megatron.demo import default_config_path
    from vespo_megatron.runtime.local_workers import run_local_workers
    from vespo_megatron.study.async_arm import DEFAULT_BOUNDS, run_async_arm
    from vespo_megatron.study.cells import collect_finished, grid_worker
    from vespo_megatron.study.report import write_frontier_plots, write_plots, write_table

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = {"lr-sweep": "lr_sweep", "staleness": "staleness", "frontier": "frontier", "async": "async"}[args.what]
    bounds = tuple(args.max_staleness or ((0, 2) if args.quick else DEFAULT_BOUNDS))
    knob, values = ("K", bounds) if args.what == "async" else ("N", plan.staleness)
    command = "vespo-megatron study " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    cells = len(plan.models) * plan.seeds * len(plan.variants) * len(values) * len(plan.lrs)
    print(f"study: {cells} cells ({plan.task}; {', '.join(plan.models)} x {plan.seeds} seed(s) x "
          f"{', '.join(plan.variants)} x {knob} in {list(values)} x lr in {list(plan.lrs)}), {plan.updates} "
          f"updates of {plan.minibatch_sequences} sequences each; runs in {plan.runs_dir}", flush=True)
    started = time.perf_counter()
    if args.what == "async":
        result = run_async_arm(plan, str(default_config_path()), bounds, args.timeout, report_only=args.report_only,
                               behaviour=args.behaviour)
    elif args.report_only:
        result = collect_finished(plan)
        print(f"study: --report-only, {len(result['cells'])} of {cells} cells finished", flush=True)
    else:
        result = run_local_workers(grid_worker, 1, plan, str(default_config_path()), timeout_s=args.timeout)[0]
    result.update(plan=asdict(plan), command=command, seconds=time.perf_counter() - started)
    if args.what == "frontier":
        result["frontier"] = frontier_rows(result["cells"])
    if args.what in ("frontier", "staleness"):
        result["comparisons"] = paired_comparisons(result["cells"], eval_prompts=plan.eval_prompts)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    table = write_table(result, plan, out, command, name=f"{name}.md", knob=knob, values=values)
    with table.open("a") as handle:
        if args.what == "frontier":
            handle.write("\n## Stability frontier\n\n" + frontier_table(result["frontier"]))
        if "comparisons" in result:
            handle.write(comparisons_section(result["comparisons"], plan.eval_prompts))
    if args.what in ("staleness", "async"):
        plots = write_plots(result, plan, out, knob=knob, values=values)
    else:
        plots = write_frontier_plots(result, plan, out, KEEP) if args.what == "frontier" else []
    print(table.read_text())
    print(f"study: {len(result['cells'])} cells in {result['seconds']:.0f}s; wrote {out / (name + '.json')}, {table}"
          + "".join(", " + str(p) for p in plots))
    if args.json:
        print(json.dumps(result))
    return 0
