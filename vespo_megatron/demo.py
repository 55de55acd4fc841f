"""``vespo-megatron demo``: the CPU quick start.

Two gloo workers (tensor parallelism 2) run the real Megatron-Core stack: a short supervised warm-up
on worked solutions of the chain task (``4+7+2=`` -> ``4+7=11;11+2=13;#13``, docs/tasks.md), then VESPO
RL with two stale mini-batches per rollout, sampled with the KV-cache decoder. Greedy accuracy on held-out
prompts is measured before and after RL; metrics, TensorBoard events and PNG plots land in the run
directory; the last line is ``demo: reward <before> -> <after>``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEMO_OVERRIDES = [
    "model.max_seq_length=48",
    "task.name=chain",
    "task.options={min_operands: 3, max_operands: 3, max_operand: 9, operators: '+', seed: 11}",
    "rollout.prompts_per_step=16",
    "rollout.group_size=8",
    "rollout.max_new_tokens=40",
    "rl.num_minibatches=2",
    "train.micro_batch_size=16",
    "train.global_batch_size=64",
    "optimizer.lr=3e-4",
    "rl.sft_lr=3e-3",
    "rl.sft_warmup_steps=250",
    "rl.eval_prompts=128",
    "checkpoint.dir=null",
]


def default_config_path() -> Path:
    """configs/tiny_dense_cpu.yaml of the source checkout the package is installed from (``pip install -e .``)."""
    checkout = Path(__file__).resolve().parent.parent / "configs" / "tiny_dense_cpu.yaml"
    if not checkout.is_file():
        raise FileNotFoundError(
            f"{checkout} not found: install from a source checkout (pip install -e .) or pass --config PATH"
        )
    return checkout


def _worker(rank, world_size, config_path, overrides):
    from vespo_megatron.config import load_config
    from vespo_megatron.rl.loop import run

    runner = run(load_config(config_path, overrides))
    return {"before": runner.eval_before, "after": runner.eval_after, "history": runner.history}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vespo-megatron demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80, help="RL steps (default 80)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel workers (default 2)")
    parser.add_argument("--loss", default="vespo", help="loss from the registry (default vespo)")
    parser.add_argument("--run-dir", default="runs/demo", help="where metrics and plots go (default runs/demo)")
    parser.add_argument("--config", default=None, help="base YAML (default configs/tiny_dense_cpu.yaml)")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from vespo_megatron.plotting import plot_run
    from vespo_megatron.runtime.local_workers import run_local_workers

    overrides = DEMO_OVERRIDES + [
        f"parallel.tp={args.tp}", f"train.steps={args.steps}", f"loss.name={args.loss}",
        f"logging.run_dir={args.run_dir}",
    ] + list(args.overrides)
    config_path = args.config or str(default_config_path())
    print(f"demo: {args.tp} gloo workers, {args.steps} RL steps of loss={args.loss}; metrics in {args.run_dir}")
    results = run_local_workers(_worker, args.tp, config_path, overrides, timeout_s=1800)
    result = results[0]
    plots = plot_run(args.run_dir)
    history = result["history"]
    window = max(1, len(history) // 5)
    print(f"demo: sampled reward first {window} steps {sum(history[:window]) / window:.3f}, "
          f"last {window} steps {sum(history[-window:]) / window:.3f}")
    print(f"demo: plots {', '.join(str(p) for p in plots)}")
    print(f"demo: reward {result['before']:.3f} -> {result['after']:.3f}")
    return 0
