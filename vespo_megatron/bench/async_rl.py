"""``bench async``: wall time per optimizer update and tokens/s, colocated vs disaggregated, one run.

Both modes run the real RL loop (:func:`vespo_megatron.rl.loop.run`) on the same number of local
gloo processes (``--procs``), from the same config and overrides:

* colocated: the config's layout over all processes (every rank samples its share, then trains), or
  over ``--colocated-procs`` of them;
* disaggregated: ``parallel.rollout_ranks=--rollout-ranks`` of them sample continuously while the others
  train (``--split`` adds overrides for this run only, e.g. the trainer's smaller layout).

Figures come from the trainer's metrics.jsonl after ``--warmup`` untimed steps: seconds per optimizer
update = mean ``time/step`` / ``rl.num_minibatches``; tokens/s = sampled response tokens / summed step
time; the disaggregated run also reports its mean staleness and weight-sync seconds. ``--repeats N`` runs
the modes in turn N times (colocated, disaggregated, partial, colocated, ...), so that a slow spell of a
shared machine does not land on one mode only, and reports each figure's median over the repeats with
every repeat's seconds per update; the speed-ups are ratios of those medians. docs/benchmarks.md lists the
figures with their commands.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from vespo_megatron.run_config import load_run_config
from vespo_megatron.runtime.local_workers import run_local_workers


def _run(rank, world_size, config_path, overrides):
    from vespo_megatron.rl.loop import run

    run(load_run_config(config_path, overrides))


def _figures(run_dir: Path, warmup: int, num_minibatches: int) -> dict[str, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = records[warmup:]
    if not timed:
        raise ValueError(f"no timed steps in {run_dir}: raise --steps above --warmup={warmup}")
    seconds = [r["time/step"] for r in timed]
    figures = {
        "steps_timed": len(timed),
        "seconds_per_update": statistics.mean(seconds) / num_minibatches,
        "seconds_per_step_median": statistics.median(seconds),
        "tokens_per_s": sum(r["response/tokens"] for r in timed) / sum(seconds),
        "rollout_wait_s": statistics.mean(r["time/rollout"] for r in timed),
        "train_s": statistics.mean(r["time/train"] + r["time/optimizer"] for r in timed),
        "response_length_mean": statistics.mean(r["response/length_mean"] for r in timed),
    }
    if "time/sync" in timed[0]:
        figures["sync_s"] = statistics.mean(r["time/sync"] for r in timed)
        figures["staleness_mean"] = statistics.mean(r.get("staleness/mean", 0.0) for r in timed)
    return figures


def median_figures(repeats: list[dict[str, float]]) -> dict:
    """Each figure's median over the repeats of one mode, with every repeat's seconds per update."""
    figures = {key: statistics.median(r[key] for r in repeats) for key in repeats[0]}
    figures["seconds_per_update_repeats"] = [r["seconds_per_update"] for r in repeats]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vespo-megatron bench async", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config of the run")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for both modes")
    parser.add_argument("--procs", type=int, default=2, help="local processes of each run (default 2)")
    parser.add_argument("--colocated-procs", type=int, default=None,
                        help="processes of the colocated run (default: --procs, the like-for-like comparison)")
    parser.add_argument("--rollout-ranks", type=int, default=1, help="rollout workers in the disaggregated run")
    parser.add_argument("--split", action="append", default=[],
                        help="an override for the disaggregated run only (repeatable), e.g. parallel.tp=1")
    parser.add_argument("--partial", action="store_true",
                        help="also run the disaggregated mode with partial rollouts (rollout.partial=true; needs "
                             "loss.behaviour=sampler, the disaggregated default) on the same processes")
    parser.add_argument("--steps", type=int, default=8, help="RL steps per run (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (default 2)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the modes in turn this many times and report medians (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} must be >= 1")

    with tempfile.TemporaryDirectory(prefix="vespo-bench-async-") as tmp:
        common = [*args.overrides, f"train.steps={args.steps}", "checkpoint.dir=null", "logging.tensorboard=false",
                  "logging.progress_bar=false", "rl.eval_prompts=0"]
        runs = {  # each mode's own overrides, after the common ones
            "colocated": [],
            "disaggregated": [f"parallel.rollout_ranks={args.rollout_ranks}", *args.split],
        }
        procs = {"colocated": args.colocated_procs or args.procs, "disaggregated": args.procs}
        if args.partial:
            runs["partial"] = runs["disaggregated"] + ["rollout.partial=true"]
            procs["partial"] = args.procs
        result: dict = {"procs": procs, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                        "loadavg_before": list(os.getloadavg()), "torch_threads": torch.get_num_threads()}
        measured: dict[str, list[dict]] = {mode: [] for mode in runs}
        for repeat in range(args.repeats):
            for mode, own in runs.items():
                run_dir = Path(tmp) / f"{mode}_{repeat}"
                overrides = common + own + [f"logging.run_dir={run_dir}"]
                config = load_run_config(args.config, overrides)
                run_local_workers(_run, procs[mode], args.config, overrides, timeout_s=3600)
                measured[mode].append(_figures(run_dir, args.warmup, config.rl.num_minibatches))
        for mode, own in runs.items():
            result[mode] = median_figures(measured[mode])
            result[mode]["overrides"] = own
    result["loadavg_after"] = list(os.getloadavg())
    result["speedup"] = result["colocated"]["seconds_per_update"] / result["disaggregated"]["seconds_per_update"]
    if args.partial:
        result["speedup_partial"] = result["colocated"]["seconds_per_update"] / result["partial"]["seconds_per_update"]
    if args.json:
        print(json.dumps(result))
    else:
        print(f"load average {result['loadavg_before'][0]:.2f} before, {result['loadavg_after'][0]:.2f} after; "
              f"{result['torch_threads']} torch threads; medians of {args.repeats} repeat(s)")
        for mode in runs:
            f = result[mode]
            repeats = ", ".join(f"{x:.3f}" for x in f["seconds_per_update_repeats"])
            print(f"{mode:14s} {f['seconds_per_update']:.3f} s/update  {f['tokens_per_s']:.1f} tokens/s  "
                  f"(rollout wait {f['rollout_wait_s']:.3f} s, train {f['train_s']:.3f} s; repeats {repeats})")
        print(f"speedup {result['speedup']:.2f}x (colocated on {procs['colocated']}, disaggregated on "
              f"{procs['disaggregated']} processes)")
        if args.partial:
            print(f"speedup with partial rollouts {result['speedup_partial']:.2f}x")
    return 0
