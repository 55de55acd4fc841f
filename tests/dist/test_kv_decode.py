"""The KV-cache decoder against the recompute decoder (the oracle), layout by layout (gloo workers).

Every launch checks greedy and sampled decoding of ragged prompts: the same tokens as the recompute
decoder and per-token sampler log-probs within 1e-5 (fp32). The one-process launch also covers stop
sequences ending rows at different steps, bad inputs, the KV-cache size and that the model's training
state survives; it saves its weights so the TP2+SP, PP2 and PP2+VPP2 launches load the same model (resharded)
and must draw the same samples from the same seed. The MoE EP2 launch is also DP2: each data-parallel
rank decodes its own prompts, one rank finishes at its first token and keeps serving the expert
exchange, and the routing the sampler records is replayed by the trainer exactly.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist.equivalence_harness import DENSE, MOE
from vespo_megatron.runtime.local_workers import run_local_workers

pytestmark = pytest.mark.slow

CONTEXT = ["model.max_seq_length=32", "rollout.max_new_tokens=12", "rollout.temperature=0.8",
           "rollout.top_p=0.95", "rollout.top_k=40"]  # fmt: skip
PROMPT_LENGTHS = [3, 7, 3, 11, 5, 2]
EOS = 1
TOLERANCE = 1e-5


def _prompts(seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 64, (length,), generator=gen).tolist() for length in PROMPT_LENGTHS]


def _run(fn, engine, config, prompts, greedy, seed=5, stop_sequences=(), **options):
    from vespo_megatron.rollout.common import DecodeRequest

    request = DecodeRequest(config.rollout, seq_length=config.seq_length, eos_id=EOS, pad_id=0,
                            generator=torch.Generator().manual_seed(seed), greedy=greedy, vocab_size=60,
                            stop_sequences=stop_sequences)
    return fn(engine, prompts, request, **options)


def _compare(engine, config, prompts, **kwargs) -> dict:
    """KV vs recompute, greedy and sampled: token equality, log-prob gap, and the sampled tokens."""
    from vespo_megatron.rollout.decode import decode
    from vespo_megatron.rollout.recompute import generate

    out = {}
    for greedy in (True, False):
        kv = _run(decode, engine, config, prompts, greedy, **kwargs)
        ref = _run(generate, engine, config, prompts, greedy, **kwargs)
        name = "greedy" if greedy else "sampled"
        out[name] = {
            "same_tokens": torch.equal(kv.sequences, ref.sequences),
            "same_lengths": torch.equal(kv.response_lengths, ref.response_lengths),
            "logprob_gap": float((kv.sampler_logprobs - ref.sampler_logprobs).abs().max()),
            "sequences": kv.sequences,
            "lengths": kv.response_lengths,
            "logprobs": kv.sampler_logprobs,
            "kv_bytes": kv.kv_cache_bytes,
        }
    return out


def _engine(overrides, workdir, role):
    from tests.dist.equivalence_harness import _load, _save
    from vespo_megatron.config import load_config
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.engine import build_engine

    config = load_config(None, overrides)
    ctx = initialize(config)
    engine = build_engine(config, ctx, vocab_size=64)
    if role == "reference":
        _save(engine, os.path.join(workdir, "weights"))
    else:
        _load(engine, os.path.join(workdir, "weights"))
    return config, ctx, engine


def _single(rank, world, overrides, workdir):
    from vespo_megatron.models.gpt import unwrap
    from vespo_megatron.rollout.decode import decode

    config, ctx, engine = _engine(overrides, workdir, "reference")
    prompts = _prompts(0)
    out = _compare(engine, config, prompts)
    for chunk in engine.chunks:
        unwrap(chunk).emit_hidden_states = False
    _run(decode, engine, config, prompts, True)
    out["training_restored"] = all(c.training for c in engine.chunks)
    out["emit_restored"] = not any(unwrap(c).emit_hidden_states for c in engine.chunks)
    # Stop sequences ending rows at different steps: row i stops at the pair of tokens the unstopped
    # greedy response has at offset i.
    free = out["greedy"]["sequences"]
    stops, expected = [], []
    for row, length in enumerate(PROMPT_LENGTHS[:4]):
        pair = tuple(free[row, length + row: length + row + 2].tolist())
        stops.append(pair)
    out["stops"] = _compare(engine, config, prompts, stop_sequences=tuple(stops))
    for row, length in enumerate(PROMPT_LENGTHS):
        free_length = int(out["greedy"]["lengths"][row])
        response = free[row, length:length + free_length].tolist()
        ends = [i + 2 for s in stops for i in range(len(response) - 1) if tuple(response[i:i + 2]) == s]
        expected.append(min(ends + [free_length]))
    out["stop_expected"] = expected
    errors = {}
    for name, bad in {"empty": [[5, 6], []], "too_long": [list(range(2, 40))], "budget": [list(range(2, 30))]}.items():
        try:
            _run(decode, engine, config, bad, True)
            errors[name] = None
        except ValueError as err:
            errors[name] = str(err)
    out["errors"] = errors
    tconfig = engine.built.tconfig  # K and V x layers x (rows x cached positions) x kv heads x head dim x fp32
    tokens = len(prompts) * (max(PROMPT_LENGTHS) + 12 - 1)
    out["kv_expected"] = 2 * tconfig.num_layers * tokens * tconfig.num_query_groups * tconfig.kv_channels * 4
    return out


def _sharded(rank, world, overrides, workdir):
    config, ctx, engine = _engine(overrides, workdir, "sharded")
    if ctx.cp > 1:
        return _context_parallel(engine, config)
    sp = engine.built.tconfig.sequence_parallel
    out = _compare(engine, config, _prompts(0))
    out["sp_restored"] = engine.built.tconfig.sequence_parallel == sp
    return out


def _context_parallel(engine, config):
    """CP: the KV decoder refuses; rollout.engine=kv samples with the recompute decoder (CP-sharded)."""
    from vespo_megatron.rollout.decode import decode
    from vespo_megatron.rollout.decoders import sample

    out = {}
    try:
        _run(decode, engine, config, _prompts(0), True)
        out["refused"] = None
    except ValueError as err:
        out["refused"] = str(err)
    for name, greedy in (("greedy", True), ("sampled", False)):
        got = _run(sample, engine, config, _prompts(0), greedy)
        out[name] = {"same_tokens": True, "same_lengths": True, "logprob_gap": 0.0, "sequences": got.sequences,
                     "lengths": got.response_lengths, "logprobs": got.sampler_logprobs}
    return out


def _check_equal_to_recompute(out):
    for name in ("greedy", "sampled"):
        assert out[name]["same_tokens"], name
        assert out[name]["same_lengths"], name
        assert out[name]["logprob_gap"] <= TOLERANCE, name


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("kv"))
    return workdir, run_local_workers(_single, 1, DENSE + CONTEXT, workdir, timeout_s=300)[0]


def test_single_process_matches_recompute(single):
    _, out = single
    _check_equal_to_recompute(out)
    assert out["training_restored"] and out["emit_restored"]
    # Sampling actually sampled (not the greedy path) and rows end at different steps.
    assert not torch.equal(out["sampled"]["sequences"], out["greedy"]["sequences"])
    assert out["greedy"]["kv_bytes"] == out["kv_expected"]


def test_rows_stop_at_their_own_stop_sequence(single):
    _, out = single
    _check_equal_to_recompute(out["stops"])
    lengths = out["stops"]["greedy"]["lengths"].tolist()
    assert lengths == out["stop_expected"]
    assert len(set(lengths)) > 2


def test_bad_inputs_fail_clearly(single):
    _, out = single
    errors = out["errors"]
    assert "prompt 1 is empty" in errors["empty"]
    assert "leaves no room in the context of 33 tokens" in errors["too_long"]
    assert "rollout.max_new_tokens=12 exceeds the context of 33 tokens" in errors["budget"]


@pytest.mark.parametrize("layout", [["parallel.tp=2", "parallel.sequence_parallel=true"], ["parallel.pp=2"],
                                    ["parallel.pp=2", "parallel.vpp=2"], ["parallel.cp=2"]],
                         ids=["tp2_sp", "pp2", "pp2_vpp2", "cp2"])
def test_sharded_layouts_match_recompute_and_the_single_process_samples(single, layout):
    workdir, reference = single
    results = run_local_workers(_sharded, 2, DENSE + CONTEXT + layout, workdir, timeout_s=300)
    for out in results:
        _check_equal_to_recompute(out)
        # Same weights, same seed: the same samples as the one-process run.
        assert torch.equal(out["sampled"]["sequences"], reference["sampled"]["sequences"])
        assert torch.equal(out["greedy"]["sequences"], reference["greedy"]["sequences"])
        assert out.get("sp_restored", True)
        if "refused" in out:  # CP: the recompute decoder stands in, with the KV decoder's log-probs
            assert "needs parallel.cp=1; use rollout.engine=recompute" in out["refused"]
            gap = (out["sampled"]["logprobs"] - reference["sampled"]["logprobs"]).abs().max()
            assert float(gap) <= TOLERANCE


# ------------------------------------------------------------------------------- MoE EP2 (DP2) + replay


def _moe(rank, world, overrides):
    from megatron.core.transformer.moe.router import TopKRouter

    from tests.dist.test_routing_replay import _RouterMaps
    from vespo_megatron.config import load_config
    from vespo_megatron.models.routing import routing_recorder, sequences_to_tokens, unrouted
    from vespo_megatron.rl.batch import Rollout
    from vespo_megatron.rl.behaviour import compute_old_logprobs
    from vespo_megatron.rl.step import train_on_rollout
    from vespo_megatron.rollout.decode import decode
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.engine import build_engine

    config = load_config(None, overrides)
    ctx = initialize(config)
    engine = build_engine(config, ctx, vocab_size=64)
    prompts = _prompts(10 + ctx.dp_rank)[:4]
    out = {"dp_rank": ctx.dp_rank}
    out.update(_compare(engine, config, prompts))
    # One data-parallel rank finishes every row at its first token; the other keeps decoding.
    stops = ()
    if ctx.dp_rank == 1:
        firsts = out["greedy"]["sequences"]
        stops = tuple((int(firsts[row, len(p)]),) for row, p in enumerate(prompts))
    out["early"] = _compare(engine, config, prompts, stop_sequences=stops)

    # Sampler routing (R3): recorded while decoding, equal to the trainer's own routing of the same tokens,
    # and replayed exactly after the routers change.
    generated = _run(decode, engine, config, prompts, False, record_routing=True)
    recorded = generated.routing_indices
    n = len(prompts)
    rollout = Rollout(sequences=generated.sequences, prompt_lengths=generated.prompt_lengths,
                      response_lengths=generated.response_lengths, sampler_logprobs=generated.sampler_logprobs,
                      rewards=torch.zeros(n), advantages=torch.randn(n, generator=torch.Generator().manual_seed(1)))
    free_rollout = Rollout(**{k: v for k, v in vars(rollout).items()})
    compute_old_logprobs(config, engine, free_rollout)  # no sampler routing: records the trainer's own experts
    routed = recorded[..., 0] != unrouted(recorded.dtype)
    lengths = (generated.prompt_lengths + generated.response_lengths - 1).tolist()
    expected_routed = torch.zeros_like(routed)
    for row, length in enumerate(lengths):
        expected_routed[row, :, :length] = True
    out["routed_positions_ok"] = torch.equal(routed, expected_routed)
    trainer = free_rollout.routing_indices
    out["sampler_equals_trainer"] = torch.equal(recorded.sort(-1).values[routed], trainer.sort(-1).values[routed])
    rollout.routing_indices = recorded
    compute_old_logprobs(config, engine, rollout)
    out["mismatch"] = float(rollout.routing_mismatch_frac)
    out["old_logprob_gap"] = float((rollout.old_logprob_sums - free_rollout.old_logprob_sums).abs().max())

    routers = sorted((m for c in engine.chunks for m in c.modules() if isinstance(m, TopKRouter)),
                     key=lambda r: r.layer_number)
    gen = torch.Generator().manual_seed(11)
    for router in routers:
        router.weight.data.add_(torch.randn(router.weight.shape, generator=gen) * 5 * router.weight.detach().std())
    maps = _RouterMaps(routers)
    step = 2
    from vespo_megatron.rl.step import rollout_minibatches

    (rows,) = rollout_minibatches(rollout, config, step)
    train_on_rollout(config, engine, rollout, step)
    replay_exact, free_differs = [], 0
    for layer, router in enumerate(routers):
        for call, chunk in zip(maps.maps[id(router)], rows.split(config.train.micro_batch_size)):
            want = sequences_to_tokens(recorded[chunk][:, layer].long())
            mask = want[:, 0] != unrouted(recorded.dtype)
            got = call[mask]
            expect = torch.zeros_like(got).scatter_(1, want[mask], True)
            replay_exact.append(torch.equal(got, expect))
    maps.reset()
    free_rollout.routing_indices = None
    train_on_rollout(config, engine, free_rollout, step)
    for layer, router in enumerate(routers):
        for call, chunk in zip(maps.maps[id(router)], rows.split(config.train.micro_batch_size)):
            want = sequences_to_tokens(recorded[chunk][:, layer].long())
            mask = want[:, 0] != unrouted(recorded.dtype)
            free_differs += int((call[mask] != torch.zeros_like(call[mask]).scatter_(1, want[mask], True)).any(1).sum())
    out["replay_exact"] = replay_exact
    out["free_differs"] = free_differs
    out["layers"] = routing_recorder(engine).layer_numbers
    return out


def test_moe_ep2_dp2_decodes_and_replays_the_sampler_routing():
    layout = ["parallel.ep=2", "model.moe_token_dispatcher=alltoall", "rollout.routing_replay=true",
              "rollout.prompts_per_step=2", "rollout.group_size=2", "train.global_batch_size=4",
              "train.micro_batch_size=2"]  # fmt: skip
    results = run_local_workers(_moe, 2, MOE + CONTEXT + layout, timeout_s=300)
    for out in results:
        _check_equal_to_recompute(out)
        _check_equal_to_recompute(out["early"])
        if out["dp_rank"] == 1:
            assert out["early"]["greedy"]["lengths"].tolist() == [1, 1, 1, 1]
        else:
            assert max(out["early"]["greedy"]["lengths"].tolist()) > 1
        assert out["routed_positions_ok"]
        assert out["sampler_equals_trainer"]
        assert out["mismatch"] == 0.0
        assert out["old_logprob_gap"] <= 1e-5
        assert out["replay_exact"] and all(out["replay_exact"])
        assert out["free_differs"] > 0
    assert results[0]["sampled"]["sequences"].tolist() != results[1]["sampled"]["sequences"].tolist()
