"""Weight sync from trainer ranks to a rollout worker with another layout (disaggregated mode).

A 3-rank job: 2 trainer ranks (TP2, PP2 with and without tied embeddings, or MoE with EP2) and 1 rollout
worker (TP1, PP1, EP1). The trainers
take one optimizer step and push their weights shard to shard. Each trainer's local shard must be,
bit for bit, Megatron's tensor-parallel shard of the worker's full tensor (cut with the parameter's own
partition_dim and partition_stride, the rule Megatron's checkpoint resharding uses), with layers and experts
renamed from local to global index (a tied output layer on the last stage is the worker's embedding).
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


def _shard_of(full: torch.Tensor, is_tp: bool, dim: int, stride: int, tp: int, tp_rank: int) -> torch.Tensor:
    """Megatron's tensor-parallel shard of a full tensor (as its checkpoint resharding defines it)."""
    if not is_tp:
        return full
    parts = [part.chunk(tp, dim=dim)[tp_rank] for part in full.chunk(stride, dim=dim)]
    return torch.cat(parts, dim=dim)


def _global_expert_name(name: str, ep_rank: int, per_rank: int) -> str:
    """``...local_experts.{j}...`` on expert-parallel rank ``ep_rank`` as the unsplit model names it."""
    marker = "local_experts."
    if marker not in name:
        return name
    head, tail = name.split(marker)
    index, rest = tail.split(".", 1)
    return f"{head}{marker}{ep_rank * per_rank + int(index)}.{rest}"


def _global_layer_name(name: str, model) -> str:
    """``decoder.layers.{i}...`` of a pipeline stage as the unsplit model names it (``layer_number - 1``)."""
    marker = "decoder.layers."
    if not name.startswith(marker):
        return name
    index, rest = name[len(marker):].split(".", 1)
    return f"{marker}{model.decoder.layers[int(index)].layer_number - 1}.{rest}"


def _sync(rank, world, overrides):
    from vespo_megatron.models.gpt import unwrap
    from vespo_megatron.rl.weight_sync import TrainerSync, exchange_manifests
    from vespo_megatron.rl.worker import RolloutWorker
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
    sync = TrainerSync(engine.chunks, split, 0.01)
    exchange_manifests(split, sync, ctx.dp_rank)
    pushed = sync.push()  # posted, not waited for: the worker takes it when it reaches a step boundary
    sync.finish()
    per_rank_experts = (config.model.num_experts or 1) // ctx.ep
    model = unwrap(engine.chunks[0])
    tied = {"output_layer.weight": "embedding.word_embeddings.weight"} if config.model.tie_embeddings else {}
    shards = {tied.get(name) or _global_expert_name(_global_layer_name(name, model), ctx.ep_rank, per_rank_experts):
              (p.detach().clone(), bool(getattr(p, "tensor_model_parallel", False)), getattr(p, "partition_dim", -1),
               getattr(p, "partition_stride", 1), ctx.etp_rank if not getattr(p, "allreduce", True) else ctx.tp_rank,
               ctx.etp if not getattr(p, "allreduce", True) else ctx.tp)
              for name, p in model.named_parameters()}
    return {"pushed": pushed, "shards": shards}


@pytest.mark.parametrize("layout, base", [
    (["parallel.tp=2"], DENSE),
    (["parallel.pp=2"], DENSE),
    (["parallel.pp=2", "model.tie_embeddings=true"], DENSE),
    (["parallel.ep=2", "parallel.etp=1"], MOE),
], ids=["tp2_to_tp1", "pp2_to_pp1", "pp2_tied_to_pp1", "moe_ep2_to_ep1"])
def test_worker_weights_equal_the_trainers_after_sync(layout, base):
    *trainers, worker = run_local_workers(_sync, 3, base + layout, timeout_s=600)
    full = worker["params"]
    covered = set()
    for trainer in trainers:
        for name, (shard, is_tp, dim, stride, tp_rank, tp) in trainer["shards"].items():
            assert name in full, name
            assert torch.equal(_shard_of(full[name], is_tp, dim, stride, tp, tp_rank), shard), name
            covered.add(name)
    assert covered == set(full)  # every worker parameter is some trainer's
    assert worker["buckets"] > 2  # 0.01 MiB buckets: the model travels in several pieces
    assert worker["bytes"] >= sum(v.numel() * v.element_size() for v in full.values())
    assert all(t["pushed"]["sync/seconds"] >= 0 for t in trainers)
