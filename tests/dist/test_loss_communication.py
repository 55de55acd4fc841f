"""The sequence-level loss's traffic, recorded with comm_trace on gloo workers.

* over CP the VESPO loss moves O(B) bytes per micro-batch, whatever the sequence length;
* inside TP, forward + backward moves at most one all-reduce-equivalent of the [B, S/CP] fp32 tokens;
* a forward-only call (old-policy / reference log-probs) moves less than forward + backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from vespo_megatron.loss.comm_trace import trace_collectives
from vespo_megatron.loss.sequence import sequence_logprob_sums
from vespo_megatron.runtime.collectives import context_parallel_chunks
from vespo_megatron.runtime.local_workers import run_local_workers

BATCH, HIDDEN, VOCAB, EXTRA_ROWS = 4, 8, 16, 2
FP32 = 4


def records(trace):
    return [(r.op, r.group_size, r.wire_bytes) for r in trace.records]


def traffic_worker(rank, world_size, tp, cp, seq_lens):
    tp_rank, cp_rank = rank % tp, rank // tp
    tp_group = None
    for c in range(cp):
        group = dist.new_group([c * tp + t for t in range(tp)])
        if c == cp_rank and tp > 1:
            tp_group = group
    seq_group = dist.new_group(list(range(world_size)))
    out = {}
    for seq_len in seq_lens:
        gen = torch.Generator().manual_seed(seq_len)
        hidden = torch.randn(seq_len, BATCH, HIDDEN, generator=gen)
        weight = torch.randn(VOCAB, HIDDEN, generator=gen)
        targets = torch.randint(0, VOCAB, (seq_len, BATCH), generator=gen)
        rows = VOCAB // tp
        hidden = context_parallel_chunks(hidden, cp, cp_rank, 0).requires_grad_()
        weight = weight[tp_rank * rows:(tp_rank + 1) * rows].clone().requires_grad_()
        targets = context_parallel_chunks(targets, cp, cp_rank, 0)
        segment_ids = torch.arange(BATCH).expand(targets.shape).contiguous()
        kwargs = dict(vocab_start=tp_rank * rows, tp_group=tp_group, seq_group=seq_group, chunk_size=5,
                      extra_partials=torch.ones(EXTRA_ROWS, BATCH))
        with trace_collectives() as forward:
            sums, extras = sequence_logprob_sums(hidden, weight, targets, segment_ids, BATCH, **kwargs)
            loss = -(torch.rand(BATCH) * sums).sum() / extras[1].sum()
        with trace_collectives() as backward:
            loss.backward()
        with torch.no_grad(), trace_collectives() as forward_only:
            sequence_logprob_sums(hidden, weight, targets, segment_ids, BATCH, **kwargs)
        out[seq_len] = dict(forward=records(forward), backward=records(backward),
                            forward_only=records(forward_only))
    return out


def wire(recs, group_size=None):
    return sum(b for _, size, b in recs if group_size is None or size == group_size)


def all_reduce_equivalent(num_floats, ranks):
    return 2 * num_floats * FP32 * (ranks - 1) / ranks


@pytest.mark.slow
def test_cp_traffic_is_one_small_all_reduce_independent_of_sequence_length():
    cp = 2
    results = run_local_workers(traffic_worker, cp, 1, cp, (16, 64), timeout_s=60)
    for per_rank in results:
        short, long = per_rank[16], per_rank[64]
        assert short["forward"] == long["forward"]
        assert short["backward"] == long["backward"] == []  # no backward communication at all
        assert [op for op, _, _ in long["forward"]] == ["all_reduce"]
        # one all-reduce of the packed [1 + EXTRA_ROWS, B] fp32 tensor over the CP ranks
        assert wire(long["forward"]) == all_reduce_equivalent((1 + EXTRA_ROWS) * BATCH, cp)
        # versus the per-token design: all-gather [B, S] log-probs over CP
        assert wire(long["forward"]) < BATCH * 64 * FP32 * (cp - 1) / cp


@pytest.mark.slow
def test_tp_traffic_fits_one_all_reduce_equivalent_and_forward_only_moves_less():
    tp, cp, seq_len = 2, 2, 16
    results = run_local_workers(traffic_worker, tp * cp, tp, cp, (seq_len,), timeout_s=60)
    tokens_per_rank = BATCH * seq_len // cp
    budget = all_reduce_equivalent(tokens_per_rank, tp)
    megatron_cross_entropy = 3 * budget  # max, target logit and sum-exp all-reduces of [s, b]
    for per_rank in results:
        rec = per_rank[seq_len]
        tp_bytes = wire(rec["forward"], tp) + wire(rec["backward"], tp)
        assert 0 < tp_bytes <= budget < megatron_cross_entropy
        assert [op for op, _, _ in rec["backward"]] in (["all_gather_single"], ["all_gather_into_tensor"])
        seq_ops = [(op, size) for op, size, _ in rec["forward"] if size == tp * cp]
        assert seq_ops == [("all_reduce", tp * cp)]
        assert wire(rec["forward"], tp * cp) == all_reduce_equivalent((1 + EXTRA_ROWS) * BATCH, tp * cp)
        total = wire(rec["forward"]) + wire(rec["backward"])
        assert wire(rec["forward_only"]) < total
        assert rec["forward_only"] == rec["forward"]
