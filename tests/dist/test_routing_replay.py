"""MoE routing replay through the real Megatron-Core stack (gloo workers), and per-expert load metrics.

One scenario per layout: record the behaviour pass's experts (compute_old_logprobs), then
(c) with unchanged weights a replayed update gives the same loss and gradients as a free one;
(a) after perturbing every router, the replayed training pass routes each token to its recorded experts;
(b) the free training pass after the perturbation does not (so (a) can fail).
The experts a router chose are read from its forward output (``routing_map``), independently of the hook.
The training mini-batch is a permutation of the rollout, so micro-batch composition differs from the
behaviour pass and replay has to follow the per-sequence keying.
"""

import pytest
import torch

import vespo_megatron.rl.step  # noqa: F401 - imported once here, inherited by forked workers
from tests.dist.equivalence_harness import MOE
from vespo_megatron.runtime.local_workers import run_local_workers

pytestmark = pytest.mark.slow

RL = [
    "rollout.routing_replay=true", "rollout.prompts_per_step=2", "rollout.group_size=2",
    "rl.num_minibatches=1", "rl.shuffle_groups=true", "train.global_batch_size=4", "train.micro_batch_size=2",
]  # fmt: skip
SEQ_LEN = 16


def _rollout(seed: int):
    from vespo_megatron.rl.batch import Rollout

    gen = torch.Generator().manual_seed(seed)
    n = 2 * 2
    sequences = torch.randint(0, 64, (n, SEQ_LEN + 1), generator=gen)
    prompts = torch.full((n,), 4)
    responses = torch.randint(3, SEQ_LEN + 1 - 4, (n,), generator=gen)
    return Rollout(sequences=sequences, prompt_lengths=prompts, response_lengths=responses,
                   sampler_logprobs=-torch.rand(n, SEQ_LEN + 1, generator=gen), rewards=torch.rand(n, generator=gen),
                   advantages=torch.randn(n, generator=gen))


class _RouterMaps:
    """Forward hooks that keep every router call's ``routing_map`` [tokens, experts], per router."""

    def __init__(self, routers):
        self.maps = {id(r): [] for r in routers}
        self.handles = [r.register_forward_hook(self._hook) for r in routers]

    def _hook(self, module, args, output):
        self.maps[id(module)].append(output[1].detach().clone())

    def reset(self):
        for calls in self.maps.values():
            calls.clear()


def _without_routing(rollout):
    from dataclasses import replace

    return replace(rollout, routing_indices=None)


def _snapshot(engine):
    return [p.detach().clone() for chunk in engine.chunks for p in chunk.parameters()]


def _restore(engine, saved):
    for param, data in zip([p for chunk in engine.chunks for p in chunk.parameters()], saved):
        param.data.copy_(data)


def _grads(engine):
    return torch.cat([p.main_grad.reshape(-1).clone() for chunk in engine.chunks for p in chunk.parameters()])


def _expected_maps(recorded, rows, micro_batch_size, layer, num_experts):
    """The routing maps a replayed router must produce, per training micro-batch, from the recorded rollout."""
    from vespo_megatron.models.routing import sequences_to_tokens

    maps = []
    for chunk in rows.split(micro_batch_size):
        tokens = sequences_to_tokens(recorded[chunk][:, layer].long())
        maps.append(torch.zeros(tokens.shape[0], num_experts, dtype=torch.bool).scatter_(1, tokens, True))
    return maps


def _scenario(rank, world, overrides):
    from megatron.core.transformer.moe.router import TopKRouter

    from vespo_megatron.config import load_config
    from vespo_megatron.models.routing import routing_load_metrics, routing_recorder
    from vespo_megatron.rl.behaviour import compute_old_logprobs
    from vespo_megatron.rl.step import rollout_minibatches, train_on_rollout
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.engine import build_engine

    config = load_config(None, overrides)
    ctx = initialize(config)
    engine = build_engine(config, ctx, vocab_size=64)
    routers = [m for chunk in engine.chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
    layer_numbers = routing_recorder(engine).layer_numbers
    maps = _RouterMaps(routers)
    rollout = _rollout(seed=100 + ctx.dp_rank)
    compute_old_logprobs(config, engine, rollout)
    recorded = rollout.routing_indices
    out = {"recorded_shape": tuple(recorded.shape), "layers": layer_numbers, "dtype": str(recorded.dtype)}
    # The recorder reproduces what the routers output in the behaviour pass (rows in order).
    rows_in_order = torch.arange(rollout.size)
    out["record_matches_router"] = all(
        torch.equal(got, want)
        for layer, router in enumerate(routers)
        for got, want in zip(maps.maps[id(router)],
                             _expected_maps(recorded, rows_in_order, config.train.micro_batch_size, layer,
                                            config.model.num_experts)))
    maps.reset()

    step = 3
    (rows,) = rollout_minibatches(rollout, config, step)
    out["permuted"] = not torch.equal(rows, rows_in_order)
    initial = _snapshot(engine)

    # (c) unchanged weights: replay == free routing.
    replayed = train_on_rollout(config, engine, rollout, step)[0]
    replayed_grads = _grads(engine)
    out["metrics_replay"] = routing_load_metrics(engine)
    _restore(engine, initial)
    free = train_on_rollout(config, engine, _without_routing(rollout), step)[0]
    free_grads = _grads(engine)
    out["metrics_free"] = routing_load_metrics(engine)
    out["loss"] = (replayed.metrics["loss/value"], free.metrics["loss/value"])
    out["grad_diff"] = float((replayed_grads - free_grads).abs().max())
    out["grad_scale"] = float(free_grads.abs().max())
    _restore(engine, initial)
    maps.reset()

    # (a) perturb every router (the same way on every rank), replay: experts equal the recorded ones.
    gen = torch.Generator().manual_seed(11)
    for router in sorted(routers, key=lambda r: r.layer_number):
        noise = torch.randn(router.weight.shape, generator=gen) * 5 * router.weight.detach().std()
        router.weight.data.add_(noise)
    perturbed = _snapshot(engine)
    train_on_rollout(config, engine, rollout, step)
    out["metrics_perturbed_replay"] = routing_load_metrics(engine)
    replay_equal = []
    for layer, router in enumerate(routers):
        expected = _expected_maps(recorded, rows, config.train.micro_batch_size, layer, config.model.num_experts)
        got = maps.maps[id(router)]
        assert len(got) == len(expected)
        replay_equal.append(all(torch.equal(g, e) for g, e in zip(got, expected)))
    maps.reset()

    # (b) the same pass without replay routes differently.
    _restore(engine, perturbed)
    train_on_rollout(config, engine, _without_routing(rollout), step)
    routing_load_metrics(engine)
    changed_tokens = 0
    for layer, router in enumerate(routers):
        expected = _expected_maps(recorded, rows, config.train.micro_batch_size, layer, config.model.num_experts)
        for g, e in zip(maps.maps[id(router)], expected):
            changed_tokens += int((g != e).any(dim=1).sum())
    out["replay_equal"] = replay_equal
    out["free_changed_tokens"] = changed_tokens
    return out


LAYOUTS = {
    "single": [],
    "ep2": ["parallel.ep=2", "model.moe_token_dispatcher=alltoall"],
    "pp2": ["parallel.pp=2"],
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_routing_replay(name):
    layout = LAYOUTS[name]
    world = 1 if not layout else 2
    results = run_local_workers(_scenario, world, MOE + RL + layout, timeout_s=120)
    for out in results:
        layers_local = len(out["layers"])
        assert out["recorded_shape"] == (4, layers_local, SEQ_LEN, 2)
        assert out["dtype"] == "torch.uint8"
        assert out["record_matches_router"]
        assert out["permuted"]
        # (c) same weights: replay changes nothing.
        assert out["loss"][0] == pytest.approx(out["loss"][1], rel=1e-6, abs=1e-7)
        assert out["grad_scale"] > 1e-6
        assert out["grad_diff"] <= 1e-6 * max(out["grad_scale"], 1.0)
        assert out["metrics_replay"]["moe/replay_changed_frac"] == 0.0
        # (a) perturbed routers, replay: every token visits its recorded experts.
        assert all(out["replay_equal"])
        assert out["metrics_perturbed_replay"]["moe/replay_changed_frac"] > 0.0
        # (b) without replay the perturbed routers choose differently.
        assert out["free_changed_tokens"] > 0
        # Load metrics with and without replay: every layer, fractions summing to one.
        for metrics in (out["metrics_replay"], out["metrics_free"]):
            assert metrics["moe/load_max_over_mean"] >= 1.0
            for layer in range(1, 5):
                fractions = [metrics[f"moe/expert_load_L{layer}_E{e}"] for e in range(4)]
                assert sum(fractions) == pytest.approx(1.0)
            assert "moe/replay_changed_frac" not in out["metrics_free"]
    stages = 2 if name == "pp2" else 1
    assert sorted(layer for out in results for layer in out["layers"]) == sorted([1, 2, 3, 4] * (world // stages))
