"""Weight sync from trainer ranks to a rollout worker with another layout (disaggregated mode).

A 3-rank job: 2 trainer ranks (TP2, or MoE with EP2) and 1 rollout worker (TP1, EP1). The trainers
take one optimizer step, push their weights shard to shard, and save a Megatron dist checkpoint. The
reference is independent of the sync code: a one-process TP1/EP1 model loads that checkpoint through
Megatron's own resharding. The worker's parameters must equal it bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist.equivalence_harness import DENSE, MOE, micro_batches
from vespo_megatron.runtime.local_workers import run_local_workers

pytestmark = pytest.mark.slow


def _config(overrides):
    from vespo_megatron.config import load_config

    return load_config(None, overrides)


def _sync_then_save(rank, world, overrides, root):
    from vespo_megatron.checkpoint import save_checkpoint
    from vespo_megatron.models.gpt import unwrap
    from vespo_megatron.rl.weight_sync import TrainerSync, exchange_manifests
    from vespo_megatron.rl.workers import RolloutWorker
    from vespo_megatron.runtime.distributed import initialize_disaggregated
    from vespo_megatron.tasks import build_task
    from vespo_megatron.tokenizer import load_tokenizer
    from vespo_megatron.train.engine import build_engine
    from vespo_megatron.train.sft import sft_loss_head

    config = _config(overrides + ["parallel.rollout_ranks=1", "rl.worker_timeout_s=60", "rl.sync_bucket_mb=0.01"])
    ctx, split = initialize_disaggregated(config)
    if split.role == "rollout":
        worker = RolloutWorker(config, ctx, split, load_tokenizer(None), build_task("arithmetic"), trainer_dp=1)
        received = worker.sync.receive()
        params = {name: p.detach().clone() for name, p in unwrap(worker.engine.chunks[0]).named_parameters()}
        return {"params": params, "bytes": received, "buckets": sum(len(b) for b in worker.sync.manifests.values())}
    engine = build_engine(config, ctx, vocab_size=64)
    batches = micro_batches(seed=5)
    per_rank = len(batches) // ctx.dp
    assert not engine.train_step(batches[ctx.dp_rank * per_rank : (ctx.dp_rank + 1) * per_rank], sft_loss_head).skipped
    sync = TrainerSync(engine.chunks, ctx, split, config.model.num_experts, config.model.swiglu, 0.01)
    exchange_manifests(split, sync, ctx.dp_rank)
    pushed = sync.push()
    save_checkpoint(engine, root, engine.iteration, {})
    return {"pushed": pushed}


def _reference(rank, world, overrides, root):
    from vespo_megatron.checkpoint import latest_checkpoint, load_checkpoint
    from vespo_megatron.models.gpt import unwrap
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.engine import build_engine

    config = _config(overrides)
    engine = build_engine(config, initialize(config), vocab_size=64)
    load_checkpoint(engine, latest_checkpoint(root))
    return {name: p.detach().clone() for name, p in unwrap(engine.chunks[0]).named_parameters()}


@pytest.mark.parametrize("layout, base", [
    (["parallel.tp=2"], DENSE),
    (["parallel.ep=2", "parallel.etp=1"], MOE),
], ids=["tp2_to_tp1", "moe_ep2_to_ep1"])
def test_worker_weights_equal_the_trainers_after_sync(tmp_path, layout, base):
    results = run_local_workers(_sync_then_save, 3, base + layout, str(tmp_path), timeout_s=600)
    worker = results[2]
    reference = run_local_workers(_reference, 1, base, str(tmp_path), timeout_s=600)[0]
    assert worker["params"].keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(worker["params"][name], value), name
    assert worker["buckets"] > 2  # 0.01 MiB buckets: the model travels in several pieces
    total = sum(v.numel() * v.element_size() for v in reference.values())
    assert worker["bytes"] >= total  # every parameter arrives (experts of both EP ranks, both TP shards)
    for trainer in results[:2]:
        assert trainer["pushed"]["sync/seconds"] >= 0
