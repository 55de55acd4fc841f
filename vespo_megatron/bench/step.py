"""``bench step``: one training step per parallel layout: time, throughput and peak memory per rank.

For each layout (a set of ``parallel.*`` overrides and a world size) and each loss it forks the
layout's gloo workers with :func:`run_local_workers` (fresh processes for every (layout, loss) pair),
builds the engine (Megatron GPTModel + DDP + optimizer) and runs ``--warmup`` untimed then ``--steps``
timed steps on a fixed synthetic global batch of ``train.global_batch_size`` sequences of
``seq_length`` tokens, split over data-parallel ranks and context-parallel chunks as training does.

* ``sft``: the supervised cross-entropy step (Megatron's vocabulary-parallel cross entropy).
* ``vespo`` / ``grpo`` (or any loss of the registry): one RL update on a synthetic rollout (random
  prompts and responses, random advantages and sampler log-probs) through the loop's own code:
  the old-policy log-probs come from one forward-only pass (:func:`compute_old_logprobs`, timed
  separately) and each step is :func:`train_on_rollout` with one mini-batch, i.e. ``vespo_head`` on the
  ``[B]`` sequence path or ``token_loss_head`` on per-token log-probs.

Figures: per step, the slowest rank's wall time (a step is as slow as its slowest rank), and the
forward-backward / optimizer split from ``StepResult.seconds`` (each the slowest rank's); mean and
median over the timed steps; tokens per second = ``global_batch_size * seq_length`` / mean step time;
CPU seconds per step summed over ranks (``time.process_time``), which other load on a shared machine
disturbs far less than wall time.

With ``--lengths DIST`` (:mod:`vespo_megatron.bench.lengths`) the RL update runs on sequences of the drawn
lengths in three modes, one after another per layout: ``padded`` (fixed micro-batches padded to the longest
length), ``budget`` (token-budget micro-batches padded to their longest sequence) and ``packed`` (the same
budget, sequences concatenated); each row adds ``real_tokens_per_s`` (prompt + response - 1 input positions
per sequence over the mean step time), ``padding_fraction`` (the share of processed positions that are
padding), ``peak_rss_mib`` (the largest rank's peak) and ``micro_batches``.
Memory per rank: on CPU the peak resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` in the
worker after the last step) minus the worker's RSS just before the model is built (imports and process
groups excluded; weights, gradients, optimizer state, activations, communication buffers included);
on GPU ``torch.cuda.max_memory_allocated``. docs/benchmarks.md lists figures with their commands.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import time
from typing import Optional

import torch

from vespo_megatron.bench.lengths import SYNTAX, draw_lengths
from vespo_megatron.config import ConfigError, validate
from vespo_megatron.run_config import load_run_config
from vespo_megatron.runtime.local_workers import WorkerError, run_local_workers

MIB = 1024**2
RESET = [
    "parallel.tp=1", "parallel.sequence_parallel=false", "parallel.pp=1", "parallel.vpp=null", "parallel.cp=1",
    "parallel.ep=1", "parallel.etp=null", "optimizer.use_distributed_optimizer=false",
]  # fmt: skip
"""Every layout starts from one process with no parallelism; the layout's own overrides come last."""

LAYOUTS: dict[str, tuple[list[str], int]] = {
    "tp1": ([], 1),
    "tp2": (["parallel.tp=2"], 2),
    "tp2_sp": (["parallel.tp=2", "parallel.sequence_parallel=true"], 2),
    "pp2": (["parallel.pp=2"], 2),
    "pp2_vpp2": (["parallel.pp=2", "parallel.vpp=2"], 2),
    "dp2": ([], 2),
    "dp2_distopt": (["optimizer.use_distributed_optimizer=true"], 2),
    "cp2": (["parallel.cp=2"], 2),
    "ep2": (["parallel.ep=2"], 2),
    "ep2_dp2": (["parallel.ep=2"], 4),
    "tp2_cp2": (["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.cp=2"], 4),
    "ep2_tp2_sp": (["parallel.ep=2", "parallel.tp=2", "parallel.sequence_parallel=true"], 4),
}
"""Layout name -> (overrides, world size). dp is what is left: world / (tp * pp * cp)."""

DENSE_DEFAULT = ["tp1", "tp2", "tp2_sp", "pp2", "dp2", "dp2_distopt", "cp2"]
MOE_DEFAULT = ["tp1", "tp2_sp", "pp2", "dp2", "dp2_distopt", "cp2", "ep2"]
"""Defaults for 2 CPU cores: every layout fits in two processes (MoE with tp>1 needs sequence parallelism)."""

RL_LOSSES = ("vespo", "grpo", "gspo", "sapo", "cispo")


# ------------------------------------------------------------------------------------ memory probe
def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not in /proc/self/status")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class MemoryProbe:
    """Peak memory of this worker from the moment :meth:`start` is called (see the module docstring)."""

    def __init__(self):
        self.on_gpu = torch.cuda.is_available()
        self.method = ("torch.cuda.max_memory_allocated" if self.on_gpu
                       else "ru_maxrss - VmRSS before the model is built")
        self.baseline = 0

    def start(self) -> None:
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.baseline = _rss_bytes()

    def peak_bytes(self) -> int:
        if self.on_gpu:
            return int(torch.cuda.max_memory_allocated())
        return _peak_rss_bytes() - self.baseline


# ------------------------------------------------------------------------------- synthetic batches
def sft_micro_batches(config, ctx, vocab_size: int, seed: int) -> list[dict]:
    """This rank's share of a fixed random global batch (every token trained on), CP-sharded."""
    from vespo_megatron.runtime.collectives import data_parallel_rows
    from vespo_megatron.train.batches import causal_lm_batch, shard_micro_batch

    train, seq = config.train, config.seq_length
    gen = torch.Generator().manual_seed(seed)
    sequences = torch.randint(0, vocab_size, (train.global_batch_size, seq + 1), generator=gen)
    mine = sequences[data_parallel_rows(train.global_batch_size, ctx.dp, ctx.dp_rank)]
    return [shard_micro_batch(causal_lm_batch(rows, torch.ones_like(rows)), ctx)
            for rows in mine.split(train.micro_batch_size)]


def synthetic_rollout(config, ctx, vocab_size: int, seed: int, lengths: Optional[torch.Tensor] = None):
    """This DP rank's share of a random rollout: prompts of seq/4 tokens, responses of seq/4..3seq/4.

    With ``lengths`` ([global_batch_size] whole-sequence lengths, ``--lengths``) each sequence has a prompt
    of ``min(16, length // 2)`` tokens and the rest as its response.
    """
    from vespo_megatron.rl.batch import Rollout
    from vespo_megatron.runtime.collectives import data_parallel_rows

    n, seq = config.train.global_batch_size, config.seq_length
    gen = torch.Generator().manual_seed(seed)
    prompt = max(seq // 4, 1)
    sequences = torch.randint(0, vocab_size, (n, seq + 1), generator=gen)
    response = torch.randint(max(seq // 4, 1), seq - prompt + 1, (n,), generator=gen)
    prompt_lengths = torch.full((n,), prompt)
    if lengths is not None:
        prompt_lengths = (lengths // 2).clamp(max=16)
        response = lengths - prompt_lengths
    sampler = -2.0 * torch.rand(n, seq + 1, generator=gen)
    advantages = torch.randn(n, generator=gen)
    rows = data_parallel_rows(n, ctx.dp, ctx.dp_rank)
    rollout = Rollout(sequences=sequences, prompt_lengths=prompt_lengths, response_lengths=response,
                      sampler_logprobs=sampler, rewards=(advantages > 0).float(), advantages=advantages)
    rollout = rollout.select(rows)
    rollout.sampler_logprobs = rollout.sampler_logprobs * rollout.response_token_mask()
    return rollout


# ------------------------------------------------------------------------------------------ worker
def _loss_overrides(loss: str) -> list[str]:
    return [] if loss == "sft" else [f"loss.name={loss}", "rl.num_minibatches=1"]


def step_worker(rank, world, config_path, overrides, loss, warmup, steps, vocab_size, seed, lengths=None):
    import torch.distributed as dist

    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.engine import build_engine

    config = load_run_config(config_path, overrides + _loss_overrides(loss))
    ctx = initialize(config)
    probe = MemoryProbe()
    probe.start()
    engine = build_engine(config, ctx, vocab_size=vocab_size)
    old_logprob_seconds, positions = None, None
    if loss == "sft":
        from vespo_megatron.train.sft import sft_loss_head

        micro = sft_micro_batches(config, ctx, vocab_size, seed)

        def one_step(index):
            return [engine.train_step(micro, sft_loss_head)]
    else:
        from vespo_megatron.rl.batch import config_micro_batches, input_positions
        from vespo_megatron.rl.behaviour import compute_old_logprobs
        from vespo_megatron.rl.step import train_on_rollout

        rollout = synthetic_rollout(config, ctx, vocab_size, seed, lengths)
        shapes = [b["tokens"].numel() for b in config_micro_batches(config, rollout, torch.arange(rollout.size), ctx)]
        positions = dict(real=int(input_positions(rollout).sum()), processed=sum(shapes) * ctx.cp,
                         micro_batches=len(shapes))
        dist.barrier()
        started = time.perf_counter()
        compute_old_logprobs(config, engine, rollout)
        old_logprob_seconds = time.perf_counter() - started

        def one_step(index):
            return train_on_rollout(config, engine, rollout, index)

    timings = []
    last = None
    for index in range(warmup + steps):
        dist.barrier()
        started, cpu_started = time.perf_counter(), time.process_time()
        results = one_step(index)
        total, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        last = results[-1]
        if index >= warmup:
            timings.append(dict(
                total=total,
                cpu=cpu,
                forward_backward=sum(r.seconds["forward_backward"] for r in results),
                optimizer=sum(r.seconds["optimizer"] for r in results),
            ))
    metrics = {k: v for k, v in last.metrics.items() if math.isfinite(v)}
    return dict(positions=positions,
                primary=ctx.tp_rank == 0 and ctx.cp_rank == 0 and ctx.pp_rank == 0,
        rank=rank, timings=timings, peak_bytes=probe.peak_bytes(), memory_method=probe.method,
        old_logprob_seconds=old_logprob_seconds, params_local=engine.num_parameters_local,
        grad_norm=last.grad_norm, metrics=metrics, ctx=dict(tp=ctx.tp, pp=ctx.pp, cp=ctx.cp, ep=ctx.ep, dp=ctx.dp),
    )


# -------------------------------------------------------------------------------------- reduction
def _stats(values: list[float]) -> dict[str, float]:
    return dict(mean=statistics.fmean(values), median=statistics.median(values), min=min(values))


def summarise(per_rank: list[dict], tokens_per_step: int) -> dict:
    """Slowest rank per step, then mean/median over steps; memory per rank."""
    steps = len(per_rank[0]["timings"])
    figures = {}
    for part in ("total", "forward_backward", "optimizer"):
        figures[part] = _stats([max(r["timings"][i][part] for r in per_rank) for i in range(steps)])
    out = dict(
        step_seconds=figures["total"],
        forward_backward_seconds=figures["forward_backward"],
        optimizer_seconds=figures["optimizer"],
        tokens_per_step=tokens_per_step,
        tokens_per_second=tokens_per_step / figures["total"]["mean"],
        peak_mib_per_rank=[r["peak_bytes"] / MIB for r in per_rank],
        memory_method=per_rank[0]["memory_method"],
        params_per_rank=[r["params_local"] for r in per_rank],
        grid=per_rank[0]["ctx"],
        metrics=next((r["metrics"] for r in per_rank if r["metrics"]), {}),
    )
    # CPU seconds of all ranks together: far less sensitive than wall time to other load on the machine.
    out["cpu_seconds_all_ranks"] = _stats([sum(r["timings"][i]["cpu"] for r in per_rank) for i in range(steps)])
    if per_rank[0]["old_logprob_seconds"] is not None:
        out["old_logprob_seconds"] = max(r["old_logprob_seconds"] for r in per_rank)
    return out


def run_layout(args, name: str, loss: str, mode: Optional[str] = None, lengths: Optional[torch.Tensor] = None) -> dict:
    """One (layout, loss) row; with ``mode`` (``--lengths``) one of :data:`LENGTH_MODES` on ``lengths``."""
    layout_overrides, world = LAYOUTS[name]
    overrides = RESET + list(args.overrides) + layout_overrides + (mode_overrides(args, mode, lengths) if mode else [])
    row = dict(layout=name, loss=loss, world=world, overrides=layout_overrides)
    if mode:
        row["mode"] = mode
    config = load_run_config(args.config, overrides + _loss_overrides(loss))
    try:
        validate(config, world)
    except ConfigError as error:
        row["skipped"] = str(error)
        return row
    vocab_size = config.model.vocab_size or _tokenizer_vocab(config)
    threads = max(1, args.threads // world)
    try:
        per_rank = run_local_workers(
            step_worker, world, args.config, overrides, loss, args.warmup, args.steps, vocab_size, args.seed, lengths,
            timeout_s=args.timeout, threads_per_worker=threads,
        )
    except WorkerError as error:  # one broken layout must not lose the figures of the others
        row["error"] = str(error).strip().splitlines()[-1]
        return row
    row.update(threads_per_rank=threads, **summarise(per_rank, config.train.global_batch_size * config.seq_length))
    if mode:
        row.update(length_figures(per_rank, row))
    return row


# ----------------------------------------------------------------------------- --lengths: the three modes
LENGTH_MODES = ("padded", "budget", "packed")
"""``padded``: train.micro_batch_size sequences per micro-batch, each padded to the longest length drawn
(rounded up to a multiple of 8);
``budget``: train.max_tokens_per_microbatch bins, each padded to its longest sequence; ``packed``: the same
budget, sequences concatenated without padding."""


def mode_overrides(args, mode: str, lengths: torch.Tensor) -> list[str]:
    """Config overrides of one ``--lengths`` mode: the sequence length the draws need, and the batching."""
    longest = -(-int(lengths.max()) // 8) * 8  # a sequence length every layout's split divides (tp, 2*cp)
    common = [f"model.max_seq_length={longest}", f"train.seq_length={longest}", "rl.num_minibatches=1"]
    if mode == "padded":
        return common
    budget = args.max_tokens or load_run_config(args.config, list(args.overrides)).train.micro_batch_size * longest
    return common + [f"train.max_tokens_per_microbatch={budget}", f"train.pack_sequences={str(mode == 'packed').lower()}"]


def length_figures(per_rank: list[dict], row: dict) -> dict:
    """Real (non-padding) tokens per second of the update, the padding share, peak memory, micro-batches."""
    replicas = [r["positions"] for r in per_rank if r["primary"]]  # one rank per data-parallel replica
    real = sum(p["real"] for p in replicas)
    processed = sum(p["processed"] for p in replicas)
    return dict(real_tokens=real, processed_tokens=processed, padding_fraction=1 - real / max(processed, 1),
                real_tokens_per_s=real / row["step_seconds"]["mean"], peak_rss_mib=max(row["peak_mib_per_rank"]),
                micro_batches=replicas[0]["micro_batches"])


def _tokenizer_vocab(config) -> int:
    from vespo_megatron.tokenizer import load_tokenizer

    return load_tokenizer(config.task.tokenizer).vocab_size


def overheads(rows: list[dict], loss: str, baseline: str) -> list[dict]:
    """Per layout: ``loss`` step time over ``baseline`` step time (both from this run)."""
    by_key = {(r["layout"], r["loss"]): r for r in rows if "skipped" not in r and "error" not in r}
    out = []
    for (layout, name), row in by_key.items():
        other = by_key.get((layout, baseline))
        if name != loss or other is None:
            continue
        out.append(dict(
            layout=layout, loss=loss, baseline=baseline,
            step_ratio_mean=row["step_seconds"]["mean"] / other["step_seconds"]["mean"],
            step_ratio_median=row["step_seconds"]["median"] / other["step_seconds"]["median"],
            forward_backward_ratio_median=(row["forward_backward_seconds"]["median"]
                                           / other["forward_backward_seconds"]["median"]),
            cpu_ratio_median=(row["cpu_seconds_all_ranks"]["median"] / other["cpu_seconds_all_ranks"]["median"]),
            peak_mib_ratio=max(row["peak_mib_per_rank"]) / max(other["peak_mib_per_rank"]),
        ))
    return out


# ---------------------------------------------------------------------------------------- output
def format_row(r: dict) -> str:
    head = f"{r['layout']:<12} {r['loss']:<6} w={r['world']}"
    if "skipped" in r or "error" in r:
        return f"{head}  {'skipped' if 'skipped' in r else 'failed'}: {r.get('skipped') or r['error']}"
    s, fb, opt = r["step_seconds"], r["forward_backward_seconds"], r["optimizer_seconds"]
    mem = "/".join(f"{m:.0f}" for m in r["peak_mib_per_rank"])
    extra = f"  old-logp {r['old_logprob_seconds'] * 1e3:6.1f}ms" if "old_logprob_seconds" in r else ""
    return (f"{head}  step {s['mean'] * 1e3:7.1f}/{s['median'] * 1e3:7.1f}ms  fwd-bwd {fb['median'] * 1e3:7.1f}ms  "
            f"opt {opt['median'] * 1e3:6.1f}ms  cpu {r['cpu_seconds_all_ranks']['median'] * 1e3:7.1f}ms  "
            f"{r['tokens_per_second']:8.0f} tok/s  peak {mem} MiB{extra}")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="vespo-megatron bench step", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config (e.g. configs/tiny_dense_cpu.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every layout")
    parser.add_argument("--layouts", type=lambda t: [x for x in t.split(",") if x], default=None,
                        help=f"comma-separated layouts from {sorted(LAYOUTS)}; default: {','.join(DENSE_DEFAULT)} "
                             f"(dense) or {','.join(MOE_DEFAULT)} (MoE)")
    parser.add_argument("--loss", type=lambda t: [x for x in t.split(",") if x], default=["sft"],
                        help=f"comma-separated: sft and/or RL losses {RL_LOSSES} (e.g. vespo,grpo)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all (split over the ranks)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic batch")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a layout's workers are killed")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--lengths", default=None, metavar="DIST",
                        help="compare one RL update padded vs token-budget vs packed on global_batch_size sequences "
                             f"whose lengths come from DIST: {SYNTAX}. E.g. lognormal:median=200,max=2048. Figures: "
                             "real (non-padding) tokens/s, padding_fraction, peak_rss_mib per mode; default layout "
                             "tp1, default loss vespo")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="T",
                        help="with --lengths: train.max_tokens_per_microbatch of the budget and packed modes "
                             "(default micro_batch_size x the longest length: the padded micro-batch's positions)")
    args = parser.parse_intermixed_args(argv)
    unknown = [name for name in args.layouts or [] if name not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layouts {unknown}; choose from {sorted(LAYOUTS)}")
    bad = [name for name in args.loss if name != "sft" and name not in RL_LOSSES]
    if bad:
        parser.error(f"unknown losses {bad}; choose from sft, {', '.join(RL_LOSSES)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.lengths is not None:
        if args.loss == ["sft"]:
            args.loss = ["vespo"]
        if "sft" in args.loss:
            parser.error("--lengths compares RL updates; drop sft from --loss")
        args.layouts = args.layouts or ["tp1"]
    if args.max_tokens is not None and args.max_tokens < 1:
        parser.error("--max-tokens must be >= 1")
    return args


def _import_before_fork() -> None:
    """Import Megatron in the parent once so that every forked worker starts warm (seconds per layout)."""
    import megatron.core.parallel_state  # noqa: F401

    import vespo_megatron.rl.step  # noqa: F401
    import vespo_megatron.train.engine  # noqa: F401


def main(argv=None) -> int:
    args = parse_args(argv)
    _import_before_fork()
    base = load_run_config(args.config, RESET + list(args.overrides))
    if args.layouts is None:
        args.layouts = MOE_DEFAULT if base.model.is_moe else DENSE_DEFAULT
    if args.lengths is not None:
        return length_main(args, base)
    rows = []
    for name in args.layouts:
        for loss in args.loss:  # losses adjacent in time per layout, so machine load hits them alike
            row = run_layout(args, name, loss)
            rows.append(row)
            if not args.json:
                print(format_row(row), flush=True)
    result = dict(
        args=vars(args), seq_length=base.seq_length, global_batch_size=base.train.global_batch_size,
        micro_batch_size=base.train.micro_batch_size, device="cuda" if torch.cuda.is_available() else "cpu",
        results=rows,
    )
    if "vespo" in args.loss and "grpo" in args.loss:
        result["vespo_vs_grpo"] = overheads(rows, "vespo", "grpo")
        if not args.json:
            for o in result["vespo_vs_grpo"]:
                print(f"{o['layout']:<12} vespo/grpo step time x{o['step_ratio_median']:.3f} (median) "
                      f"x{o['step_ratio_mean']:.3f} (mean), fwd-bwd x{o['forward_backward_ratio_median']:.3f}, "
                      f"cpu x{o['cpu_ratio_median']:.3f}, "
                      f"peak memory x{o['peak_mib_ratio']:.3f}")
    if args.json:
        print(json.dumps(result))
    return 0


def length_main(args, base) -> int:
    """``--lengths``: each layout and loss in the three :data:`LENGTH_MODES`, adjacent in time, same lengths."""
    lengths = draw_lengths(args.lengths, base.train.global_batch_size, args.seed)
    rows = []
    for name in args.layouts:
        for loss in args.loss:
            for mode in LENGTH_MODES:
                row = run_layout(args, name, loss, mode, lengths)
                rows.append(row)
                if not args.json:
                    print(format_length_row(row), flush=True)
    result = dict(args=vars(args), lengths=dict(count=len(lengths), min=int(lengths.min()), max=int(lengths.max()),
                                                median=float(lengths.float().median()), total=int(lengths.sum())),
                  load_average=list(os.getloadavg()), device="cuda" if torch.cuda.is_available() else "cpu",
                  results=rows)
    print(json.dumps(result) if args.json else f"lengths {result['lengths']}, load average {result['load_average']}")
    return 0


def format_length_row(r: dict) -> str:
    """One table line of a ``--lengths`` row (or why it was skipped or failed)."""
    head = f"{r['layout']:<8} {r['loss']:<6} {r['mode']:<7}"
    if "skipped" in r or "error" in r:
        return f"{head}  {'skipped' if 'skipped' in r else 'failed'}: {r.get('skipped') or r['error']}"
    return (f"{head}  {r['real_tokens_per_s']:8.0f} real tok/s  padding {r['padding_fraction']:6.1%}  "
            f"{r['micro_batches']:3d} micro-batches  step {r['step_seconds']['median']:7.2f}s  "
            f"peak {r['peak_rss_mib']:7.0f} MiB")


if __name__ == "__main__":
    raise SystemExit(main())
