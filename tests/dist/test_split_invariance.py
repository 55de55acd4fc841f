"""The same RL update split into 1, 2 or 5 packed micro-batches gives the same loss and gradient for every
aggregation whose definition does not depend on the split; micro-token-mean does depend on it.

One process, one engine: for each aggregation and token budget the update's gradients (DDP's reduced
``main_grad``) are taken without an optimizer step. Packed rows restart RoPE positions per sequence: the
query handed to core attention for a packed sequence equals the one of that sequence run alone.
"""

import dataclasses

import pytest
import torch

from tests.dist.equivalence_harness import DENSE, synthetic_rollout
from vespo_megatron.config import load_config
from vespo_megatron.runtime.local_workers import run_local_workers

pytestmark = pytest.mark.slow

BUDGETS = {64: 1, 32: 2, 15: 5}
"""Token budget -> micro-batches of the harness rollout's 64 packed positions (lengths 12, 11, 10, 8, 7, 6, 5, 5)."""
INVARIANT = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
OVERRIDES = DENSE + ["loss.name=vespo", "loss.chunk_size=4", "rollout.prompts_per_step=4", "rollout.group_size=2",
                     "train.pack_sequences=true", "train.max_tokens_per_microbatch=64"]  # fmt: skip


def _grads_worker(rank, world):
    from vespo_megatron.rl.batch import config_micro_batches
    from vespo_megatron.rl.behaviour import per_row
    from vespo_megatron.rl.heads import old_logprob_sums_head, vespo_head
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.engine import build_engine

    config = load_config(None, OVERRIDES)
    ctx = initialize(config)
    engine = build_engine(config, ctx, vocab_size=64)
    rollout = synthetic_rollout()
    micro = config_micro_batches(config, rollout, torch.arange(rollout.size), ctx)
    current = per_row(micro, engine.forward_only(micro, old_logprob_sums_head(ctx, 1.0, 4)), "seq/logprob_sum",
                      rollout.size)
    rollout.old_logprob_sums = current + 0.3 * torch.randn(rollout.size, generator=torch.Generator().manual_seed(2))
    tokens = rollout.response_lengths.sum().float()
    results = {}
    for mode in ("micro-token-mean",) + INVARIANT:
        for budget in BUDGETS:
            run = dataclasses.replace(config, loss=dataclasses.replace(config.loss, aggregation=mode),
                                      train=dataclasses.replace(config.train, max_tokens_per_microbatch=budget))
            micro = config_micro_batches(run, rollout, torch.arange(rollout.size), ctx)
            head = vespo_head(ctx, run, tokens, torch.tensor(float(rollout.size)), len(micro))
            for chunk in engine.chunks:
                chunk.zero_grad_buffer()
            loss = engine.reduce_reported(engine.forward_backward(micro, head, True))["loss/value"]
            grads = torch.cat([p.main_grad.flatten().clone() for p in engine.chunks[0].parameters()])
            results[(mode, budget)] = dict(loss=loss, grads=grads, micro_batches=len(micro))
    return results


@pytest.fixture(scope="module")
def updates():
    return run_local_workers(_grads_worker, 1)[0]


def test_budgets_give_the_intended_micro_batch_counts(updates):
    assert {budget: updates[("token-mean", budget)]["micro_batches"] for budget in BUDGETS} == BUDGETS


@pytest.mark.parametrize("mode", INVARIANT)
def test_split_invariant_modes_give_one_gradient(updates, mode):
    one = updates[(mode, 64)]
    assert one["grads"].abs().max() > 1e-3, "gradients vanished"
    for budget in (32, 15):
        other = updates[(mode, budget)]
        assert other["loss"] == pytest.approx(one["loss"], rel=0, abs=1e-6)
        assert (other["grads"] - one["grads"]).abs().max().item() <= 1e-6, f"{mode} changes with T={budget}"


def test_micro_token_mean_depends_on_the_split(updates):
    """Each micro-batch's token mean weighs 1/N_micro: a token in a short micro-batch weighs more."""
    one, five = updates[("micro-token-mean", 64)], updates[("micro-token-mean", 15)]
    assert one["grads"].allclose(updates[("token-mean", 64)]["grads"], atol=1e-7)  # one micro-batch: token mean
    assert (five["grads"] - one["grads"]).abs().max() > 0.05 * one["grads"].abs().max()
