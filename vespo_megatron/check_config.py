"""``vespo-megatron check-config CONFIG --nodes N --gpus-per-node G``: check a layout before launching it.

Validates the config for ``N * G`` ranks without creating a process group (no Megatron import), then
prints the rank grid Megatron will build, the parameters each rank holds, the per-GPU memory estimate
of every pipeline stage in training and in the rollout (KV cache of one decode batch, logits, prefill; which
phase peaks) and the loss's communication per optimizer update. Exit status: 0 when the
layout is valid and the estimate fits ``--gpu-memory-gb``, 2 on an invalid config (the ConfigError
message is printed), 3 when the estimate exceeds the GPU memory (one line with the numbers and the fix: for
the rollout, the ``rollout.max_batch_sequences`` that fits). ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

from vespo_megatron import estimates
from vespo_megatron.config import Config, ConfigError, validate
from vespo_megatron.layout import build_layout, render_layout
from vespo_megatron.run_config import load_run_config

EXIT_INVALID = 2
EXIT_OUT_OF_MEMORY = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vespo-megatron check-config",
        description="Validate a config for a cluster shape and estimate per-GPU memory (no GPUs needed).",
    )
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. parallel.tp=4")
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (ranks) per node")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    parser.add_argument(
        "--overhead-gb", type=float, default=2.0, help="flat allowance for CUDA context and NCCL buffers (GiB)"
    )
    parser.add_argument(
        "--vocab-size", type=int, default=None, help="tokenizer vocabulary when model.vocab_size is null "
        "(default: the shipped tiny tokenizer's)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def config_vocab_size(config: Config, given: int | None = None) -> int:
    """``model.vocab_size``, else ``given``, else the shipped tokenizer's vocabulary."""
    if config.model.vocab_size is not None:
        return config.model.vocab_size
    if given is not None:
        return given
    from vespo_megatron.tokenizer import Tokenizer, default_tokenizer_path

    return Tokenizer(default_tokenizer_path()).vocab_size


def check(config: Config, nodes: int, gpus_per_node: int, *, gpu_memory_gb: float = 80.0,
          overhead_gb: float = 2.0, vocab_size: int | None = None) -> dict:
    """Validate and estimate; returns the report as plain data. Raises ConfigError on an invalid layout."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes={nodes} and --gpus-per-node={gpus_per_node} must both be >= 1")
    world = nodes * gpus_per_node
    validate(config, world)
    vocab = config_vocab_size(config, vocab_size)
    layout = build_layout(config.parallel, config.parallel.trainer_world(world))  # the trainer ranks' grid
    stages = estimates.estimate_memory(config, world, vocab, overhead_gb=overhead_gb)
    peak = estimates.peak_memory(stages)
    comm = estimates.loss_communication(config, world)
    budget = gpu_memory_gb * estimates.GIB
    training_fits = max(s.training for s in stages) <= budget
    return {
        "ok": peak.total <= budget,
        "peak_phase": peak.peak_phase,
        "rollout_batch_sequences": peak.rollout_batch,
        "fitting_rollout_batch_sequences": (
            estimates.fitting_rollout_batch(stages, config, world, vocab, budget)
            if peak.rollout_batch and training_fits else None),
        "world_size": world,
        "rollout_ranks": config.parallel.rollout_ranks,
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "gpu_memory_gb": gpu_memory_gb,
        "vocab_size": vocab,
        "padded_vocab_size": config.model.padded_vocab_size(vocab, config.parallel.tp),
        "layout": layout.to_dict(),
        "groups_crossing_nodes": layout.groups_crossing_nodes(gpus_per_node),
        "parameters": {
            "total": estimates.total_parameters(config, vocab),
            "active_per_token": estimates.active_parameters(config, vocab),
            "per_rank": [
                {"pp_rank": s.pp_rank, "dense": s.dense, "expert": s.expert, "total": s.total}
                for s in estimates.parameters_per_rank(config, vocab)
            ],
        },
        "micro_batches_per_update": estimates.num_micro_batches(config, world),
        "memory_gib": [{"pp_rank": s.pp_rank, **s.to_gib()} for s in stages],
        "peak_memory_gib": peak.to_gib()["total"],
        "loss_communication": comm.to_dict(),
    }


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def render(report: dict, config: Config) -> str:
    """The text form of :func:`check`'s report."""
    world = report["world_size"]
    params = report["parameters"]
    lines = [
        (f"layout: {report['nodes']} node(s) x {report['gpus_per_node']} GPU(s) = {world} ranks"
         + (f" ({report['rollout_ranks']} rollout workers: the last ranks; the trainer grid below)"
            if report["rollout_ranks"] else "")),
        render_layout(build_layout(config.parallel, config.parallel.trainer_world(world)), report["gpus_per_node"]),
        "",
        f"parameters: {params['total']:,} total, {params['active_per_token']:,} active per token "
        f"(vocabulary {report['vocab_size']} padded to {report['padded_vocab_size']})",
    ]
    for s in params["per_rank"]:
        lines.append(f"  pp rank {s['pp_rank']}: {s['total']:,} per GPU ({s['dense']:,} dense + {s['expert']:,} expert)")
    batch = report["rollout_batch_sequences"]
    lines += ["", f"memory per GPU (GiB; {report['micro_batches_per_update']} micro-batches per update; rollout "
              + (f"decode batch {batch} sequences):" if batch else "not on these ranks):")]
    lines.append("  stage   weights   grads  optimizer  overhead | activations training | kv cache  logits+prefill"
                 " rollout |  peak")
    for m in report["memory_gib"]:
        lines.append(
            f"  pp {m['pp_rank']:<4} {m['weights']:>8.2f} {m['grads']:>7.2f} {m['optimizer']:>10.2f} {m['overhead']:>9.2f}"
            f" | {m['activations']:>11.2f} {m['training']:>8.2f} | {m['kv_cache']:>8.2f} {m['rollout_transient']:>15.2f}"
            f" {m['rollout']:>7.2f} | {m['total']:>5.2f} {m['peak_phase']}"
        )
    fits = "fits" if report["ok"] else "DOES NOT FIT"
    lines.append(f"  peak {report['peak_memory_gib']:.2f} GiB ({report['peak_phase']}) {fits} in "
                 f"{report['gpu_memory_gb']:g} GiB")
    comm = report["loss_communication"]
    lines.append("")
    if comm["group_size"] == 1:
        lines.append("loss communication: none (tp*cp = 1: every rank holds whole sequences)")
    else:
        ratio = comm["gather_bytes_per_micro_batch"] / comm["sums_bytes_per_micro_batch"]
        lines.append(
            f"loss communication over tp*cp = {comm['group_size']} ranks: [2, B] sums "
            f"{_fmt_bytes(comm['sums_bytes_per_micro_batch'])}/micro-batch, "
            f"{_fmt_bytes(comm['sums_bytes_per_update'])}/update; a [B, S] all-gather would move "
            f"{_fmt_bytes(comm['gather_bytes_per_update'])}/update ({ratio:.0f}x)"
        )
    return "\n".join(lines)


def out_of_memory_message(report: dict) -> str:
    """One line: the estimated peak, its phase, and the keys that fix it (the rollout batch that fits, if any)."""
    peak, limit = report["peak_memory_gib"], report["gpu_memory_gb"]
    head = f"the estimated peak {peak:.2f} GiB per GPU ({report['peak_phase']}) exceeds --gpu-memory-gb={limit:g}"
    training_fix = ("raise tp/pp/cp/ep, use the distributed optimizer, lower train.micro_batch_size or "
                    "model.max_seq_length, or use more nodes")
    if report["peak_phase"] == "training":
        return f"{head}; {training_fix}"
    worst = max(report["memory_gib"], key=lambda m: m["total"])
    numbers = (f"KV cache {worst['kv_cache']:.2f} GiB for {report['rollout_batch_sequences']} sequences + logits and "
               f"prefill {worst['rollout_transient']:.2f} GiB on top of {worst['rollout'] - worst['kv_cache'] - worst['rollout_transient']:.2f} GiB resident")
    fitting = report["fitting_rollout_batch_sequences"]
    if fitting is None:
        training = max(m["training"] for m in report["memory_gib"])
        return (f"{head}: {numbers}; training alone needs {training:.2f} GiB: {training_fix}, then set "
                "rollout.max_batch_sequences to what check-config proposes")
    if fitting:
        return f"{head}: {numbers}; set rollout.max_batch_sequences={fitting} (the largest decode batch that fits)"
    return (f"{head}: {numbers}, and not even one sequence fits; lower rollout.max_new_tokens or model.max_seq_length, "
            "raise parallel.tp/pp, or use more nodes")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        config = load_run_config(args.config, args.overrides)
        report = check(
            config,
            args.nodes,
            args.gpus_per_node,
            gpu_memory_gb=args.gpu_memory_gb,
            overhead_gb=args.overhead_gb,
            vocab_size=args.vocab_size,
        )
    except (ConfigError, FileNotFoundError) as err:
        if args.json:
            print(json.dumps({"ok": False, "error": str(err)}))
        else:
            print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        print(json.dumps(report))
    else:
        print(render(report, config))
    if not report["ok"]:
        if not args.json:
            print(f"error: {out_of_memory_message(report)}", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    return 0


if __name__ == "__main__":
    sys.exit(main())
