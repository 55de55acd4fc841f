"""Rollout micro-batching (``rollout.max_batch_sequences``): a step's prompts decoded in several batches give the
same tokens, sampler log-probs and (MoE) recorded experts as one batch, because each sequence keeps its column
of the step's uniforms table. Dense TP2+SP and MoE EP2 (DP2, the expert exchange couples the two ranks' forwards)
on gloo workers, KV and recompute decoders (MoE: KV, with the recorded experts compared too)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist.equivalence_harness import DENSE, MOE
from vespo_megatron.runtime.local_workers import run_local_workers

pytestmark = pytest.mark.slow

CONTEXT = ["model.max_seq_length=32", "rollout.max_new_tokens=10", "rollout.temperature=0.8"]
PROMPT_LENGTHS = [3, 7, 3, 11, 5, 2, 4]
STOP_IDS = list(range(1, 12))  # several stop ids: rows end at different steps


def _prompts(seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 64, (length,), generator=gen).tolist() for length in PROMPT_LENGTHS]


def _batched(rank, world, overrides, engines, record_routing, counts):
    from vespo_megatron.config import load_config
    from vespo_megatron.rollout.common import DecodeRequest
    from vespo_megatron.rollout.decoders import sample
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.engine import build_engine

    config = load_config(None, overrides)
    ctx = initialize(config)
    engine = build_engine(config, ctx, vocab_size=64)
    from vespo_megatron.rollout.decode_step import decode_path

    prompts = _prompts(3 + ctx.dp_rank)[:counts[ctx.dp_rank]]
    out = {"paths": {step: decode_path(engine, step) for step in ("lean", "megatron")}}
    for name in engines:
        runs = {}
        for size in (None, 3, 1):
            settings = dataclasses.replace(config.rollout, engine=name, max_batch_sequences=size)
            request = DecodeRequest(settings, seq_length=config.seq_length, eos_id=STOP_IDS, pad_id=0,
                                    generator=torch.Generator().manual_seed(9), vocab_size=60)
            runs[size] = sample(engine, prompts, request, record_routing=record_routing and name == "kv")
        one = runs[None]
        out[name] = {
            size: {
                "same_tokens": torch.equal(got.sequences, one.sequences),
                "same_lengths": torch.equal(got.response_lengths, one.response_lengths),
                "logprob_gap": float((got.sampler_logprobs - one.sampler_logprobs).abs().max()),
                "same_routing": (got.routing_indices is None and one.routing_indices is None)
                or torch.equal(got.routing_indices, one.routing_indices),
                "kv_bytes": (got.kv_cache_bytes, one.kv_cache_bytes),
            }
            for size, got in runs.items() if size is not None
        }
        out[name]["lengths"] = one.response_lengths.tolist()
    return out


def _check(results, engines):
    for out in results:
        for name in engines:
            for size in (3, 1):
                got = out[name][size]
                assert got["same_tokens"] and got["same_lengths"], (name, size)
                assert got["logprob_gap"] <= 1e-6, (name, size, got["logprob_gap"])
                assert got["same_routing"], (name, size)
            if name == "kv":  # the cache is allocated per batch: 1/7 and 3/7 of the rows (same positions bound or less)
                small, whole = out[name][1]["kv_bytes"]
                assert 0 < small * len(out[name]["lengths"]) <= whole
            assert len(set(out[name]["lengths"])) > 1  # rows end at different steps


def test_dense_tp2_sp_batches_sample_as_one_batch():
    layout = ["parallel.tp=2", "parallel.sequence_parallel=true"]
    results = run_local_workers(_batched, 2, DENSE + CONTEXT + layout, ("kv", "recompute"), False, [7],
                                timeout_s=400)
    _check(results, ("kv", "recompute"))
    for out in results:  # the decode path printed at start, and why
        assert out["paths"]["lean"][0] == "lean"
        assert out["paths"]["megatron"] == ("kv-modules", "rollout.kv_step=megatron")


def test_moe_ep2_dp2_batches_sample_as_one_batch():
    layout = ["parallel.ep=2", "model.moe_token_dispatcher=alltoall", "rollout.prompts_per_step=2",
              "rollout.group_size=2", "train.global_batch_size=4", "train.micro_batch_size=2"]  # fmt: skip
    # Data-parallel rank 1 holds fewer prompts, so it runs fewer batches than rank 0 (3 vs 2 of 3, 7 vs 4 of 1)
    # and serves the expert exchange of rank 0's remaining batches with empty ones.
    results = run_local_workers(_batched, 2, MOE + CONTEXT + layout, ("kv",), True, [7, 4], timeout_s=400)
    _check(results, ("kv",))
    assert [len(out["kv"]["lengths"]) for out in results] == [7, 4]
    path, why = results[0]["paths"]["lean"]
    assert path == "kv-modules" and why.startswith("no lean step: ") and "MoE" in why
