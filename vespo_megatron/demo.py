"""``vespo-megatron demo``: the CPU quick start.

Two gloo workers (tensor parallelism 2) run the real Megatron-Core stack: a short supervised warm-up
on worked solutions of the chain task (``1+4+3=`` -> ``1+4=5;5+3=8;#8``, docs/tasks.md) from a teacher that
often answers with the first step's result instead of the last, then VESPO RL, rewarded on the true answer,
with two stale mini-batches per rollout, sampled with the KV-cache decoder. Greedy accuracy on held-out
prompts is measured before and after RL; metrics, TensorBoard events and PNG plots land in the run
directory; the last line is ``demo: reward <before> -> <after>``. ``--seeds N`` repeats the demo for
``train.seed`` 0..N-1 in fresh workers and summarises the improvements.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

DEMO_OVERRIDES = [
    "model.max_seq_length=48",
    "task.name=chain",
    # Three operands 0-5: sums the warm-up learns at every seed. teacher_slip_rate 0.65: the warm-up imitates a
    # teacher that answers 65 % of its worked solutions with the first step's result (`1+4=5;5+3=8;#5`), so greedy
    # decoding starts out mostly wrong (0.18-0.36 held out at seeds 0-4) while sampling still finds the right answer
    # a third of the time; the reward reads the true answer, so RL has a clear thing to fix (docs/rl.md, The demo).
    # eval_fraction 0.25: about 54 of the 216 problems are held out from RL and warm-up alike; the 256 greedy
    # evaluation prompts are drawn from them.
    "task.options={min_operands: 3, max_operands: 3, max_operand: 5, operators: '+', seed: 11, eval_fraction: 0.25, "
    "teacher_slip_rate: 0.65}",
    "rollout.prompts_per_step=16",
    "rollout.group_size=8",
    "rollout.max_new_tokens=40",
    "rl.num_minibatches=2",
    "train.micro_batch_size=16",
    "train.global_batch_size=64",
    # RL at 5e-4 decaying linearly to 0 (1e-3 collapsed in a trial with 8 prompts per step)
    "optimizer.lr=5e-4",
    "optimizer.lr_decay_style=linear",
    "rl.sft_lr=3e-3",
    "rl.sft_warmup_steps=150",
    "rl.eval_prompts=256",
    "checkpoint.dir=null",
]
DEMO_STEPS = 80
"""RL steps of the demo (``--steps``)."""


@dataclass
class DemoRun:
    """One demo run: greedy held-out accuracy before and after RL, the sampled rewards, the wall time."""

    seed: int
    before: float
    after: float
    history: list
    seconds: float
    plots: list

    @property
    def improvement(self) -> float:
        """After minus before."""
        return self.after - self.before


def default_config_path() -> Path:
    """configs/tiny_dense_cpu.yaml of the source checkout the package is installed from (``pip install -e .``)."""
    checkout = Path(__file__).resolve().parent.parent / "configs" / "tiny_dense_cpu.yaml"
    if not checkout.is_file():
        raise FileNotFoundError(
            f"{checkout} not found: install from a source checkout (pip install -e .) or pass --config PATH"
        )
    return checkout


def _worker(rank, world_size, config_path, overrides):
    from vespo_megatron.rl.loop import run
    from vespo_megatron.run_config import load_run_config

    trainer = run(load_run_config(config_path, overrides))
    return {"before": trainer.eval_before, "after": trainer.eval_after, "history": trainer.state.history}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vespo-megatron demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"RL steps (default {DEMO_STEPS})")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel workers (default 2)")
    parser.add_argument("--loss", default="vespo", help="loss from the registry (default vespo)")
    parser.add_argument("--run-dir", default="runs/demo",
                        help="where metrics and plots go (default runs/demo; with --seeds, RUN_DIR/seed_<s>)")
    parser.add_argument("--config", default=None, help="base YAML (default configs/tiny_dense_cpu.yaml)")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help="run the demo N times, for train.seed 0..N-1, one after the other in fresh workers, "
                             "then print each seed's 'seed s: reward A -> B (+D)' and the min/mean/max improvement "
                             "(default: one run with the seed of the config and overrides)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch threads per worker (torch.set_num_threads; default 1). Float reductions run "
                             "in a different order with more threads, so results differ as on another processor")
    parser.add_argument("--json", action="store_true",
                        help="end with one JSON object {seeds, before, after, improvement, min_improvement, "
                             "seconds, loadavg} instead of the 'demo: reward' line")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Errors that name the flag and the fix."""
    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds} must be >= 1 (e.g. --seeds 5 runs train.seed 0..4)")
    if args.seeds is not None and any(o.split("=", 1)[0].strip() == "train.seed" for o in args.overrides):
        raise ValueError("--seeds sets train.seed itself (0..N-1); drop the train.seed override or drop --seeds")
    if args.threads < 1:
        raise ValueError(f"--threads {args.threads} must be >= 1 (torch threads per worker)")
    if args.steps < 0:
        raise ValueError(f"--steps {args.steps} must be >= 0")


def demo_overrides(args: argparse.Namespace, run_dir: str, seed: int | None) -> list[str]:
    """The demo's settings, then the flags, then the user's overrides (which win), then ``--seeds``'s seed."""
    overrides = DEMO_OVERRIDES + [
        f"parallel.tp={args.tp}", f"train.steps={args.steps}", f"loss.name={args.loss}",
        f"logging.run_dir={run_dir}",
    ] + list(args.overrides)
    return overrides + ([f"train.seed={seed}"] if seed is not None else [])


def run_once(args: argparse.Namespace, config_path: str, run_dir: str, seed: int | None) -> DemoRun:
    """One demo in fresh workers: warm-up, RL, evaluation before and after, plots of the run."""
    from vespo_megatron.config import load_config
    from vespo_megatron.plotting import plot_run
    from vespo_megatron.runtime.local_workers import run_local_workers

    overrides = demo_overrides(args, run_dir, seed)
    started = time.perf_counter()
    result = run_local_workers(_worker, args.tp, config_path, overrides, timeout_s=1800,
                               threads_per_worker=args.threads)[0]
    seconds = time.perf_counter() - started
    plots = plot_run(run_dir)
    return DemoRun(seed=load_config(config_path, overrides).train.seed, before=result["before"],
                   after=result["after"], history=result["history"], seconds=seconds, plots=plots)


def print_run(run: DemoRun) -> None:
    """The sampled reward of the first and last fifth of the steps, and the plots."""
    history = run.history
    if history:
        window = max(1, len(history) // 5)
        print(f"demo: sampled reward first {window} steps {sum(history[:window]) / window:.3f}, "
              f"last {window} steps {sum(history[-window:]) / window:.3f}")
    print(f"demo: plots {', '.join(str(p) for p in run.plots)}")


def summary(runs: list[DemoRun]) -> dict:
    """The JSON summary of ``--json``."""
    improvement = [round(r.improvement, 4) for r in runs]
    return {"seeds": [r.seed for r in runs], "before": [round(r.before, 4) for r in runs],
            "after": [round(r.after, 4) for r in runs], "improvement": improvement,
            "min_improvement": min(improvement), "mean_improvement": round(statistics.fmean(improvement), 4),
            "max_improvement": max(improvement), "seconds": [round(r.seconds, 1) for r in runs],
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def summary_line(runs: list[DemoRun]) -> str:
    """``demo: N seeds, improvement min/mean/max ... (spread ...)``."""
    gains = [r.improvement for r in runs]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"demo: {len(runs)} seeds, improvement min {min(gains):+.3f} mean {statistics.fmean(gains):+.3f} "
            f"max {max(gains):+.3f} (spread {max(gains) - min(gains):.3f}); "
            f"{statistics.fmean(r.seconds for r in runs):.0f} s per seed; load average {load}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    config_path = args.config or str(default_config_path())
    seeds = list(range(args.seeds)) if args.seeds is not None else [None]
    print(f"demo: {args.tp} gloo workers x {args.threads} threads, {args.steps} RL steps of loss={args.loss}; "
          f"metrics in {args.run_dir}" + (f"/seed_<s> for seeds 0..{args.seeds - 1}" if args.seeds else ""),
          flush=True)
    runs = []
    for seed in seeds:
        run_dir = args.run_dir if seed is None else str(Path(args.run_dir) / f"seed_{seed}")
        run = run_once(args, config_path, run_dir, seed)
        runs.append(run)
        print_run(run)
        if seed is not None:
            print(f"seed {run.seed}: reward {run.before:.3f} -> {run.after:.3f} ({run.improvement:+.3f}) "
                  f"in {run.seconds:.0f} s", flush=True)
    if args.seeds is not None:
        print(summary_line(runs))
    if args.json:
        print(json.dumps(summary(runs)))
    elif args.seeds is None:
        print(f"demo: reward {runs[0].before:.3f} -> {runs[0].after:.3f}")
    return 0
