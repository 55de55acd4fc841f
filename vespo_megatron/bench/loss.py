"""``bench loss``: the chunked sequence log-prob path against materialised logits, per micro-batch.

For each (sequence length S, vocabulary V, tensor-parallel degree TP) it runs, in a fresh forked
process per path (TP gloo workers when TP > 1):

* ``chunked``: :func:`sequence_logprob_sums` (logits ``chunk_size`` tokens at a time, recomputed in
  backward, one ``[k, B]`` all-reduce);
* ``naive``: materialised logits + log_softmax + gather (TP=1), or for TP > 1 a Megatron-style
  vocab-parallel cross entropy (materialised shard logits, three all-reduces of ``[s, b]``: max,
  target logit, sum-exp, the softmax kept for backward);

and reports forward+backward wall time (min over ``--repeats`` fresh processes, the two paths
alternating), the peak resident-memory growth of a
fwd+bwd (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, minus the RSS once the inputs
exist), the collectives each path issued (recorded with comm_trace), the max relative difference of
``S_seq`` between the paths, and the analytic context-parallel traffic of both designs. Configs that
would not fit in ``--mem-limit-gib`` or exceed ``--max-logit-elements`` are skipped with the reason.
docs/sequence_parallel_loss.md explains the method and lists figures.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from vespo_megatron.loss.comm_trace import trace_collectives
from vespo_megatron.loss.sequence import sequence_logprob_sums
from vespo_megatron.runtime.local_workers import run_local_workers

GIB = 1024**3
FP32 = 4
EXTRA_ROWS = 2  # behaviour log-prob sums and token counts ride in the same all-reduce


# ------------------------------------------------------------------------------- memory probes
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process to its current RSS."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


# ----------------------------------------------------------------------------- naive baselines
class _MaterialisedVocabParallelLogprobs(torch.autograd.Function):
    """Megatron-style vocab-parallel token log-probs: full shard logits, three [s, b] all-reduces."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, tp_group):
        row_max = logits.amax(dim=-1)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
        shifted = logits - row_max[..., None]
        rel = targets - vocab_start
        in_shard = (rel >= 0) & (rel < logits.shape[-1])
        target = shifted.gather(-1, rel.clamp(0, logits.shape[-1] - 1)[..., None]).squeeze(-1) * in_shard
        dist.all_reduce(target, group=tp_group)
        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=tp_group)
        softmax = exp.div_(sum_exp[..., None])
        ctx.save_for_backward(softmax, rel.clamp(0, logits.shape[-1] - 1), in_shard)
        return target - sum_exp.log()

    @staticmethod
    def backward(ctx, grad):
        softmax, rel, in_shard = ctx.saved_tensors
        grad_logits = softmax.mul_(-grad[..., None])
        grad_logits.scatter_add_(-1, rel[..., None], (grad * in_shard)[..., None])
        return grad_logits, None, None, None


def naive_sequence_sums(hidden, weight, targets, segment_ids, num_sequences, vocab_start, tp_group):
    logits = torch.einsum("sbh,vh->sbv", hidden, weight)
    if tp_group is None:
        token_logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    else:
        token_logp = _MaterialisedVocabParallelLogprobs.apply(logits, targets, vocab_start, tp_group)
    del logits
    mask = segment_ids >= 0
    return token_logp.new_zeros(num_sequences).index_add(0, segment_ids[mask], token_logp[mask])


# ------------------------------------------------------------------------------------- workers
def _inputs(seq_len, batch, hidden_size, vocab, tp, tp_rank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = vocab // tp
    hidden = torch.randn(seq_len, batch, hidden_size, generator=gen)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * hidden_size**-0.5)[tp_rank * rows:(tp_rank + 1) * rows]
    targets = torch.randint(0, vocab, (seq_len, batch), generator=gen)
    segment_ids = torch.arange(batch).expand(seq_len, batch).contiguous()
    coef = torch.randn(batch, generator=gen)  # stands for phi * A / normaliser (detached)
    return hidden.requires_grad_(), weight.clone().requires_grad_(), targets, segment_ids, coef, rows * tp_rank


def bench_worker(rank, world_size, path, seq_len, batch, hidden_size, vocab, chunk_size, repeats):
    tp_group = dist.new_group(list(range(world_size))) if world_size > 1 else None
    hidden, weight, targets, segment_ids, coef, vocab_start = _inputs(
        seq_len, batch, hidden_size, vocab, world_size, rank
    )

    def step():
        hidden.grad = weight.grad = None
        if path == "chunked":
            sums, _ = sequence_logprob_sums(
                hidden, weight, targets, segment_ids, batch, vocab_start=vocab_start, tp_group=tp_group,
                seq_group=tp_group, chunk_size=chunk_size, extra_partials=torch.ones(EXTRA_ROWS, batch),
            )
        else:
            sums = naive_sequence_sums(hidden, weight, targets, segment_ids, batch, vocab_start, tp_group)
        (-(coef * sums).sum()).backward()
        return sums.detach()

    baseline = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    with trace_collectives() as trace:
        sums = step()
    times = [time.perf_counter() - start]
    peak = peak_rss_bytes() - baseline
    for _ in range(repeats - 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return dict(
        seconds=min(times), peak_bytes=peak, sums=sums,
        grad_norms=(float(hidden.grad.norm()), float(weight.grad.norm())),
        collectives=trace.count(), wire_bytes=trace.wire_bytes(),
    )


# ------------------------------------------------------------------------------------ the grid
def naive_peak_estimate(tokens, vocab, tp) -> float:
    """Materialised path: logits, log-softmax (or softmax) and its gradient, ``[tokens, V/TP]`` fp32."""
    return 3 * tokens * (vocab // tp) * FP32


def cp_traffic(batch, seq_len, cp):
    """Per-rank wire bytes over CP per micro-batch: ours vs all-gathering ``[B, S]`` token log-probs."""
    frac = (cp - 1) / cp
    return dict(cp=cp, ours=2 * (1 + EXTRA_ROWS) * batch * FP32 * frac, baseline=batch * seq_len * FP32 * frac)


def run_config(args, seq_len, vocab, tp):
    tokens = seq_len * args.batch
    out = dict(seq_len=seq_len, vocab=vocab, tp=tp, batch=args.batch, hidden=args.hidden,
               chunk_size=args.chunk_size, cp_traffic=cp_traffic(args.batch, seq_len, args.cp))
    if tokens * vocab > args.max_logit_elements:
        out["skipped"] = (f"{tokens} tokens x V={vocab} = {tokens * vocab:.3g} logits > --max-logit-elements="
                          f"{args.max_logit_elements:.3g}: too long on this machine")
        return out
    paths = ["chunked", "naive"]
    if naive_peak_estimate(tokens, vocab, tp) * tp > args.mem_limit_gib * GIB:
        out["naive_skipped"] = (f"naive needs ~{naive_peak_estimate(tokens, vocab, tp) * tp / GIB:.1f} GiB "
                                f"over {tp} rank(s) > --mem-limit-gib={args.mem_limit_gib}")
        paths = ["chunked"]
    threads = max(1, args.threads // tp)
    runs: dict[str, list] = {path: [] for path in paths}
    for _ in range(args.repeats):  # alternate the paths so that load from elsewhere hits both alike
        for path in paths:
            runs[path].append(run_local_workers(
                bench_worker, tp, path, seq_len, args.batch, args.hidden, vocab, args.chunk_size, 1,
                timeout_s=3600, threads_per_worker=threads,
            ))
    for path, attempts in runs.items():
        first = attempts[0]
        out[path] = dict(
            seconds=min(max(r["seconds"] for r in per_rank) for per_rank in attempts),
            peak_gib_per_rank=max(r["peak_bytes"] for per_rank in attempts for r in per_rank) / GIB,
            collectives=first[0]["collectives"], wire_bytes=first[0]["wire_bytes"],
            grad_norms=first[0]["grad_norms"], sums=first[0]["sums"],
        )
    if "naive" in out:
        chunked, naive = out["chunked"], out["naive"]
        out["max_rel_diff_sums"] = float(((chunked["sums"] - naive["sums"]).abs() / naive["sums"].abs()).max())
        out["max_rel_diff_grad_norms"] = max(
            abs(a - b) / abs(b) for a, b in zip(chunked["grad_norms"], naive["grad_norms"])
        )
        out["time_ratio"] = chunked["seconds"] / naive["seconds"]
        out["memory_ratio"] = chunked["peak_gib_per_rank"] / naive["peak_gib_per_rank"]
    for path in paths:
        out[path].pop("sums")
    return out


def format_row(r) -> str:
    head = f"S={r['seq_len']:>6} V={r['vocab']:>6} TP={r['tp']}"
    if "skipped" in r:
        return f"{head}  skipped: {r['skipped']}"
    cells = []
    for path in ("chunked", "naive"):
        if path in r:
            p = r[path]
            cells.append(f"{path} {p['seconds']:7.2f}s {p['peak_gib_per_rank']:6.2f}GiB "
                         f"{p['collectives']} coll {p['wire_bytes'] / 1024:8.1f}KiB")
    if "naive_skipped" in r:
        cells.append(f"naive skipped: {r['naive_skipped']}")
    if "time_ratio" in r:
        cells.append(f"time x{r['time_ratio']:.2f} mem x{r['memory_ratio']:.3f} rel S {r['max_rel_diff_sums']:.1e} "
                     f"grad {r['max_rel_diff_grad_norms']:.1e}")
    cp = r["cp_traffic"]
    cells.append(f"CP{cp['cp']} bytes ours {cp['ours']:.0f} vs all-gather {cp['baseline']:.0f}")
    return head + "  " + " | ".join(cells)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="vespo-megatron bench loss", description=__doc__.split("\n\n")[0])
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--seq-lens", type=ints, default=[1024, 4096, 16384], help="comma-separated S values")
    parser.add_argument("--vocab-sizes", type=ints, default=[32768, 151936], help="comma-separated V values")
    parser.add_argument("--tp", type=ints, default=[1, 2], help="comma-separated tensor-parallel degrees")
    parser.add_argument("--batch", type=int, default=8, help="sequences per micro-batch (B)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size h")
    parser.add_argument("--chunk-size", type=int, default=1024, help="tokens per logits chunk")
    parser.add_argument("--repeats", type=int, default=2,
                        help="fwd+bwd runs per path, each in a fresh process, paths alternating (min time reported)")
    parser.add_argument("--cp", type=int, default=2, help="CP degree for the analytic CP traffic column")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all (split over TP ranks)")
    parser.add_argument("--mem-limit-gib", type=float, default=20.0, help="skip naive runs estimated above this")
    parser.add_argument("--max-logit-elements", type=float, default=2**30,
                        help="skip configs with more B*S*V logits than this (run time)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = []
    for vocab in args.vocab_sizes:
        for seq_len in args.seq_lens:
            for tp in args.tp:
                if vocab % tp:
                    results.append(dict(seq_len=seq_len, vocab=vocab, tp=tp, skipped=f"TP={tp} does not divide V"))
                    continue
                row = run_config(args, seq_len, vocab, tp)
                results.append(row)
                if not args.json:
                    print(format_row(row), flush=True)
    if args.json:
        print(json.dumps(dict(args=vars(args), results=results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
