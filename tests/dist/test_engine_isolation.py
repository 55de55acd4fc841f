"""Engines built one after another in one process do not influence each other.

The staleness study builds a fresh MoE engine per cell in one worker process; any global state left
behind by an earlier engine (Megatron's global buffers, MoE trackers and aux-loss scale, RNG trackers,
parallel_state caches) would make the second cell differ from the first. Two identical engines, built,
trained for two updates and torn down in turn (with other engines built in between), must give
bit-identical losses, gradients and weights.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist.equivalence_harness import MOE, micro_batches
from vespo_megatron.runtime.local_workers import run_local_workers

pytestmark = pytest.mark.slow


def _one_engine(overrides):
    from vespo_megatron.config import load_config
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.batches import shard_micro_batch
    from vespo_megatron.train.engine import build_engine
    from vespo_megatron.train.sft import sft_loss_head

    config = load_config(None, overrides)
    ctx = initialize(config)
    engine = build_engine(config, ctx, vocab_size=64)
    batches = micro_batches()
    per_rank = len(batches) // ctx.dp
    mine = [shard_micro_batch(b, ctx) for b in batches[ctx.dp_rank * per_rank : (ctx.dp_rank + 1) * per_rank]]
    losses = []
    for _ in range(2):
        result = engine.train_step(mine, sft_loss_head)
        losses.append(result.metrics["sft/loss"])
    grads = {n: p.main_grad.detach().clone() for n, p in engine.chunks[0].named_parameters()}
    weights = {n: p.detach().clone() for n, p in engine.chunks[0].named_parameters()}
    engine.close()
    return {"losses": losses, "grads": grads, "weights": weights}


def _two_engines_worker(rank, world, overrides):
    smaller = overrides + ["model.num_layers=2", "model.moe_token_dispatcher=allgather"]
    _one_engine(smaller)  # a different MoE engine first (fewer layers, another dispatcher)
    first = _one_engine(overrides)
    dense = [o for o in overrides if not o.startswith(("model.num_experts", "parallel.ep"))]
    _one_engine(dense)  # a dense one in between
    return first, _one_engine(overrides)


@pytest.mark.parametrize("layout,world", [([], 1), (["parallel.ep=2"], 2)])
def test_two_moe_engines_in_one_process_give_identical_updates(layout, world):
    for first, second in run_local_workers(_two_engines_worker, world, MOE + layout):
        assert first["losses"] == second["losses"]
        for kind in ("grads", "weights"):
            for name, value in first[kind].items():
                assert torch.equal(value, second[kind][name]), f"{kind} of {name} differ between the engines"
