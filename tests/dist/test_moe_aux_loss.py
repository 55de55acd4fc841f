"""The MoE load-balancing loss acts with the configured coefficient, whatever the response lengths and layout.

The router's aux-loss gradient is measured as the difference of the router weights' reduced gradients
between one update with ``model.moe_aux_loss_coeff = c`` and the same update with the aux loss off
(routing, and so the policy loss, are the same in both). The reference is written here in float64 from
the Switch-Transformer definition on the very router inputs of that update: for micro-batch ``m`` with
``T`` routed tokens, top-k ``k`` and ``E`` experts,

    L_m = E / (k T^2) * sum_i count_i * sum_x softmax(x W^T)_i

and the intended gradient is ``c * mean over the update's micro-batches (all DP ranks) of dL_m/dW``.
Two masks with very different numbers of loss tokens show the coefficient does not depend on them.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist.equivalence_harness import MOE
from vespo_megatron.runtime.local_workers import run_local_workers

pytestmark = pytest.mark.slow

COEFF = 1.0
SEQ_LEN, MICRO, MBS = 16, 4, 2


def _micro_batches(rank: int, density: float):
    from vespo_megatron.train.batches import causal_lm_batch

    gen = torch.Generator().manual_seed(100 + rank)
    batches = []
    for _ in range(MICRO):
        seqs = torch.randint(0, 64, (MBS, SEQ_LEN + 1), generator=gen)
        mask = (torch.rand(MBS, SEQ_LEN + 1, generator=gen) < density).long()
        batches.append(causal_lm_batch(seqs, mask))
    return batches


def _reference_aux_grad(inputs: list[torch.Tensor], weight: torch.Tensor, topk: int, ctx) -> torch.Tensor:
    """c * (1 / (M * dp)) * sum_m dL_m/dW in float64, from the router inputs of each micro-batch."""
    import torch.distributed as dist

    w = weight.detach().double().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    for x in inputs:
        if ctx.tp * ctx.cp > 1:  # the micro-batch's tokens are split over the TP x CP ranks
            parts = [torch.empty_like(x) for _ in range(ctx.tp * ctx.cp)]
            dist.all_gather(parts, x.contiguous(), group=ctx.tp_cp_group)
            x = torch.cat(parts)
        x = x.reshape(-1, x.shape[-1]).double()
        scores = torch.softmax(x @ w.t(), dim=-1)
        chosen = torch.zeros_like(scores).scatter(1, scores.topk(topk, dim=-1).indices, 1.0)
        tokens, experts = scores.shape
        total = total + experts / (topk * tokens * tokens) * (chosen.sum(0) * scores.sum(0)).sum()
    (grad,) = torch.autograd.grad(total, w)
    grad = grad.contiguous()
    if ctx.dp > 1:
        dist.all_reduce(grad, group=ctx.dp_group)
    return COEFF * grad / (len(inputs) * ctx.dp)


def _router_grads(engine, batches, head, routers):
    for chunk in engine.chunks:
        chunk.zero_grad_buffer()
    engine.forward_backward(batches, head)
    return [r.weight.main_grad.detach().double().clone() for r in routers]


def _aux_worker(rank, world, overrides, densities):
    from megatron.core.transformer.moe.router import TopKRouter

    from vespo_megatron.config import load_config
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.batches import shard_micro_batch
    from vespo_megatron.train.engine import build_engine
    from vespo_megatron.train.sft import sft_loss_head

    config = load_config(None, overrides)
    ctx = initialize(config)
    engine = build_engine(config, ctx, vocab_size=64)
    routers = [m for chunk in engine.chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
    captured = {id(r): [] for r in routers}
    for router in routers:
        router.register_forward_pre_hook(lambda mod, args: captured[id(mod)].append(args[0].detach().clone()))
    out = []
    for density in densities:
        batches = [shard_micro_batch(b, ctx) for b in _micro_batches(ctx.dp_rank, density)]
        for values in captured.values():
            values.clear()
        with_aux = _router_grads(engine, batches, sft_loss_head, routers)
        references = [_reference_aux_grad(captured[id(r)], r.weight, config.model.moe_router_topk, ctx)
                      for r in routers]
        config.model.moe_aux_loss_coeff = 0.0  # the same update without the aux loss
        without = _router_grads(engine, batches, sft_loss_head, routers)
        config.model.moe_aux_loss_coeff = COEFF
        loss_tokens = sum(float(b["loss_mask"].sum()) for b in batches)
        for got_with, got_without, ref in zip(with_aux, without, references):
            measured = got_with - got_without
            out.append({"density": density, "loss_tokens": loss_tokens,
                        "ratio": float((measured * ref).sum() / (ref * ref).sum()),
                        "max_err": float((measured - ref).abs().max()), "ref_max": float(ref.abs().max())})
    return out


LAYOUTS = {
    "one_process": ([], 1),
    "tp2_sp": (["parallel.tp=2", "parallel.sequence_parallel=true"], 2),
    "ep2": (["parallel.ep=2"], 2),
    "cp2": (["parallel.cp=2"], 2),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_aux_loss_gradient_has_the_configured_coefficient(name):
    layout, world = LAYOUTS[name]
    overrides = MOE + [f"model.moe_aux_loss_coeff={COEFF}"] + layout
    results = run_local_workers(_aux_worker, world, overrides, (0.9, 0.15))
    for rank_results in results:
        assert {r["density"] for r in rank_results} == {0.9, 0.15}
        for r in rank_results:
            assert r["ref_max"] > 1e-6, r
            # effective coefficient / configured coefficient (1 when right)
            assert r["ratio"] == pytest.approx(1.0, abs=1e-3), rank_results
            assert r["max_err"] <= 2e-3 * r["ref_max"], rank_results
