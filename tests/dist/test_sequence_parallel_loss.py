"""Sharded (TP vocab x CP sequence) VESPO loss == the single-process unsharded loss, values and grads.

Every worker builds the same full problem from a seed, takes its shard (vocabulary rows over TP, the
load-balanced sequence split over CP), runs ``sequence_logprob_sums`` + the VESPO loss, and returns
what it computed; the parent compares with the unsharded computation:
* loss and S_seq equal on every rank;
* hidden grads summed over the TP ranks (the caller's Megatron mapping does that sum) equal the
  reference rows of the tokens the CP rank holds;
* weight-shard grads summed over the CP ranks equal the reference rows of the full weight grad.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from vespo_megatron.loss.logprobs import vocab_parallel_token_logprobs
from vespo_megatron.loss.sequence import sequence_logprob_sums
from vespo_megatron.runtime.collectives import context_parallel_chunks
from vespo_megatron.runtime.local_workers import run_local_workers

try:
    from vespo_megatron.loss.kernel import vespo_phi
except ImportError:  # the kernel lives in another module; the test only needs a detached weight

    def vespo_phi(log_w, advantages, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0):
        pos = advantages >= 0
        k = torch.where(pos, torch.full_like(log_w, k_pos), torch.full_like(log_w, k_neg))
        lam = torch.where(pos, torch.full_like(log_w, lambda_pos), torch.full_like(log_w, lambda_neg))
        log_w = log_w.detach().clamp(-20, 20)
        return torch.exp(k * log_w + lam * (1 - log_w.exp()))


@dataclass
class Problem:
    hidden: torch.Tensor  # [S, B, h]
    weight: torch.Tensor  # [V, h]
    targets: torch.Tensor  # [S, B]
    segment_ids: torch.Tensor  # [S, B]
    num_sequences: int
    advantages: torch.Tensor  # [num_sequences]
    behaviour_token_logprobs: torch.Tensor  # [S, B]


def make_problem(kind: str, seed: int, seq_len=16, batch=3, hidden_size=6, vocab=10) -> Problem:
    """``plain``: one sequence per row after a prompt; ``packed``: variable-length sequences packed in
    rows; ``middle``: response tokens only in the middle half (CP rank 0 of 2 holds none)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(seq_len, batch, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (seq_len, batch), generator=gen)
    seg = torch.full((seq_len, batch), -1, dtype=torch.long)
    if kind == "plain":
        seg[2:] = torch.arange(batch)
        num = batch
    elif kind == "packed":
        bounds = [(0, 1, 5, 0), (0, 7, 16, 1), (1, 0, 3, 2), (1, 4, 15, 3), (2, 2, 9, 4), (2, 11, 13, 5)]
        for row, start, end, sid in bounds:
            seg[start:end, row] = sid
        num = 7  # sequence 6 has no tokens anywhere
    elif kind == "middle":
        seg[seq_len // 4: 3 * seq_len // 4] = torch.arange(batch)
        num = batch
    else:
        raise ValueError(kind)
    advantages = torch.randn(num, generator=gen, dtype=torch.float64)
    behaviour = -torch.rand(seq_len, batch, generator=gen, dtype=torch.float64) * 3
    return Problem(hidden, weight, targets, seg, num, advantages, behaviour)


def vespo_loss(sums, behaviour_sums, advantages, normaliser):
    phi = vespo_phi(sums.detach() - behaviour_sums, advantages)
    return -(phi.detach() * advantages * sums).sum() / normaliser


def reference(problem: Problem):
    hidden = problem.hidden.clone().requires_grad_()
    weight = problem.weight.clone().requires_grad_()
    logits = torch.einsum("sbh,vh->sbv", hidden, weight)
    token_logp = torch.log_softmax(logits, -1).gather(-1, problem.targets[..., None]).squeeze(-1)
    mask = problem.segment_ids >= 0
    seg = problem.segment_ids[mask]
    sums = token_logp.new_zeros(problem.num_sequences).index_add(0, seg, token_logp[mask])
    behaviour = token_logp.new_zeros(problem.num_sequences).index_add(0, seg, problem.behaviour_token_logprobs[mask])
    loss = vespo_loss(sums, behaviour, problem.advantages, mask.sum())
    loss.backward()
    return dict(loss=loss.detach(), sums=sums.detach(), behaviour=behaviour, token_logp=token_logp.detach(),
                counts=torch.bincount(seg, minlength=problem.num_sequences).double(),
                hidden_grad=hidden.grad, weight_grad=weight.grad)


def make_groups(tp: int, cp: int):
    """Rank = cp_rank * tp + tp_rank. Returns (tp_rank, cp_rank, tp_group, seq_group)."""
    rank = dist.get_rank()
    tp_group = seq_group = None
    for c in range(cp):
        group = dist.new_group([c * tp + t for t in range(tp)])
        if rank // tp == c and tp > 1:
            tp_group = group
    whole = dist.new_group(list(range(tp * cp)))
    if tp * cp > 1:
        seq_group = whole
    return rank % tp, rank // tp, tp_group, seq_group


def shard(problem: Problem, tp: int, cp: int, tp_rank: int, cp_rank: int):
    rows = problem.weight.shape[0] // tp
    def split(t):
        return context_parallel_chunks(t, cp, cp_rank, 0)
    return dict(
        hidden=split(problem.hidden).clone().requires_grad_(),
        weight=problem.weight[tp_rank * rows:(tp_rank + 1) * rows].clone().requires_grad_(),
        targets=split(problem.targets), segment_ids=split(problem.segment_ids),
        behaviour=split(problem.behaviour_token_logprobs), vocab_start=tp_rank * rows,
    )


def sharded_step(problem: Problem, tp: int, cp: int, tp_rank, cp_rank, tp_group, seq_group, chunk_size):
    """One micro-batch of the VESPO loss on this rank's shard; returns what the parent checks."""
    part = shard(problem, tp, cp, tp_rank, cp_rank)
    mask = part["segment_ids"] >= 0
    seg = part["segment_ids"][mask]
    num = problem.num_sequences
    # TP ranks hold the same tokens, so only TP rank 0 contributes the token-level extras.
    own = 1.0 if tp_rank == 0 else 0.0
    extras = torch.stack([
        torch.zeros(num, dtype=torch.float64).index_add(0, seg, part["behaviour"][mask]) * own,
        torch.bincount(seg, minlength=num).double() * own,
    ])
    sums, extras_reduced = sequence_logprob_sums(
        part["hidden"], part["weight"], part["targets"], part["segment_ids"], num,
        vocab_start=part["vocab_start"], tp_group=tp_group, seq_group=seq_group, chunk_size=chunk_size,
        extra_partials=extras,
    )
    behaviour_sums, counts = extras_reduced
    loss = vespo_loss(sums, behaviour_sums, problem.advantages, counts.sum())
    loss.backward()
    with torch.no_grad():
        sums_no_grad, _ = sequence_logprob_sums(
            part["hidden"], part["weight"], part["targets"], part["segment_ids"], num,
            vocab_start=part["vocab_start"], tp_group=tp_group, seq_group=seq_group, chunk_size=chunk_size,
        )
    hidden_tok = part["hidden"].detach().clone().requires_grad_()
    weight_tok = part["weight"].detach().clone().requires_grad_()
    token_logp = vocab_parallel_token_logprobs(
        hidden_tok, weight_tok, part["targets"], vocab_start=part["vocab_start"], tp_group=tp_group,
        chunk_size=chunk_size,
    )
    # the per-token path summed per sequence must give this rank's share of S_seq and the same grads
    token_partial = torch.zeros(num, dtype=torch.float64).index_add(0, seg, token_logp[mask])
    token_sums = token_partial.detach().clone()
    if seq_group is not None:
        dist.all_reduce(token_sums, group=seq_group)
        token_sums /= tp
    phi = vespo_phi(token_sums - behaviour_sums, problem.advantages)
    (-(phi * problem.advantages * token_partial).sum() / counts.sum()).backward()
    return dict(
        tp_rank=tp_rank, cp_rank=cp_rank, loss=loss.detach(), sums=sums.detach(), sums_no_grad=sums_no_grad,
        behaviour=behaviour_sums, counts=counts, token_logp=token_logp.detach(), token_sums=token_sums,
        hidden_grad=part["hidden"].grad, weight_grad=part["weight"].grad,
        token_hidden_grad=hidden_tok.grad, token_weight_grad=weight_tok.grad,
    )


# (kind, seed, chunk_size, seq_len); seq_len 13 (CP=1 only) gives token counts not divisible by TP.
CASES = [("plain", 0, 5, 16), ("packed", 1, 4, 16), ("middle", 2, 7, 16), ("packed", 3, 1000, 16),
         ("plain", 4, 6, 13)]


def cases_for(cp):
    return [case for case in CASES if case[3] % (2 * cp) == 0 or cp == 1]


def worker(rank, world_size, tp, cp):
    tp_rank, cp_rank, tp_group, seq_group = make_groups(tp, cp)
    return [
        sharded_step(make_problem(kind, seed, seq_len), tp, cp, tp_rank, cp_rank, tp_group, seq_group, chunk)
        for kind, seed, chunk, seq_len in cases_for(cp)
    ]


def check_case(problem: Problem, ref, results, tp, cp):
    by_cp = {c: [r for r in results if r["cp_rank"] == c] for c in range(cp)}
    rows = problem.weight.shape[0] // tp
    for r in results:
        torch.testing.assert_close(r["loss"], ref["loss"])
        torch.testing.assert_close(r["sums"], ref["sums"])
        torch.testing.assert_close(r["sums_no_grad"], ref["sums"])
        torch.testing.assert_close(r["token_sums"], ref["sums"])
        torch.testing.assert_close(r["behaviour"], ref["behaviour"])
        torch.testing.assert_close(r["counts"], ref["counts"])
        torch.testing.assert_close(
            r["token_logp"], context_parallel_chunks(ref["token_logp"], cp, r["cp_rank"], 0)
        )
    for c, group in by_cp.items():
        want = context_parallel_chunks(ref["hidden_grad"], cp, c, 0)
        torch.testing.assert_close(sum(r["hidden_grad"] for r in group), want)
        torch.testing.assert_close(sum(r["token_hidden_grad"] for r in group), want)
    for t in range(tp):
        group = [r for r in results if r["tp_rank"] == t]
        want = ref["weight_grad"][t * rows:(t + 1) * rows]
        torch.testing.assert_close(sum(r["weight_grad"] for r in group), want)
        torch.testing.assert_close(sum(r["token_weight_grad"] for r in group), want)


@pytest.mark.slow
@pytest.mark.parametrize("tp, cp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "cp2", "tp2xcp2"])
def test_sharded_vespo_loss_matches_unsharded(tp, cp):
    results = run_local_workers(worker, tp * cp, tp, cp, timeout_s=60)
    for i, (kind, seed, _, seq_len) in enumerate(cases_for(cp)):
        problem = make_problem(kind, seed, seq_len)
        check_case(problem, reference(problem), [per_rank[i] for per_rank in results], tp, cp)


def test_middle_case_leaves_a_cp_rank_without_response_tokens():
    """Guards the ``middle`` case: with CP=2 the first rank must really hold no response token."""
    problem = make_problem("middle", 2)
    assert (context_parallel_chunks(problem.segment_ids, 2, 0, 0) < 0).all()
