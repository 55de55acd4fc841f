"""The lean one-token decode step against the full Megatron model's step (rollout.kv_step lean vs megatron).

Both decoders share the prefill and the cache; only the steps differ. Every parameter is perturbed first
(biases and norm weights start at 0 and 1, where a missing bias or norm would go unnoticed). Each launch
checks greedy and sampled decoding of ragged prompts: the same tokens and sampler log-probs within 1e-5.
The one-process variant saves its perturbed weights; the TP2+SP launch loads them (resharded), and its lean
decode must reproduce the one-process samples. Models the lean step does not cover (MoE, pipeline stages)
must say why and still decode.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import pytest
import torch

from tests.dist.equivalence_harness import DENSE, MOE
from vespo_megatron.runtime.local_workers import run_local_workers

pytestmark = pytest.mark.slow

CONTEXT = ["model.max_seq_length=32", "rollout.max_new_tokens=14", "rollout.temperature=0.8",
           "rollout.top_p=0.95"]  # fmt: skip
VARIANT = ["model.add_bias_linear=true", "model.qk_layernorm=true", "model.normalization=LayerNorm",
           "model.swiglu=false", "model.position_embedding=learned_absolute", "model.tie_embeddings=true"]  # fmt: skip
PROMPT_LENGTHS = [3, 9, 2, 6]


def _perturb(engine) -> None:
    """Deterministic noise on every parameter, the same on every rank for a given name and shape."""
    from vespo_megatron.models.gpt import unwrap

    with torch.no_grad():
        for chunk in engine.chunks:
            for name, param in unwrap(chunk).named_parameters():
                gen = torch.Generator().manual_seed(zlib.crc32(f"{name}{tuple(param.shape)}".encode()))
                param.add_(0.2 * torch.randn(param.shape, generator=gen).to(param.dtype))


def _decode_both(rank, world, overrides, weights=None, role="reference"):
    """Lean and full-model decodes; ``weights`` with role 'reference' saves the perturbed weights there,
    with role 'sharded' loads them instead of perturbing."""
    from tests.dist.equivalence_harness import _load, _save
    from vespo_megatron.config import load_config
    from vespo_megatron.rollout.common import DecodeRequest
    from vespo_megatron.rollout.decode import decode
    from vespo_megatron.rollout.decode_step import lean_step_blocker
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.engine import build_engine

    config = load_config(None, overrides)
    engine = build_engine(config, initialize(config), vocab_size=64)
    if role == "sharded":
        _load(engine, weights)
    else:
        _perturb(engine)
        if weights is not None:
            _save(engine, weights)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 64, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    out = {"blocker": lean_step_blocker(engine)}
    for greedy in (True, False):
        runs = {}
        for step in ("lean", "megatron"):
            settings = dataclasses.replace(config.rollout, kv_step=step)
            runs[step] = decode(engine, prompts, DecodeRequest(
                settings, seq_length=config.seq_length, eos_id=1, pad_id=0,
                generator=torch.Generator().manual_seed(11), greedy=greedy, vocab_size=60))
        lean, full = runs["lean"], runs["megatron"]
        out["greedy" if greedy else "sampled"] = {
            "same_tokens": torch.equal(lean.sequences, full.sequences),
            "same_lengths": torch.equal(lean.response_lengths, full.response_lengths),
            "logprob_gap": float((lean.sampler_logprobs - full.sampler_logprobs).abs().max()),
            "lengths": lean.response_lengths.tolist(),
            "sequences": lean.sequences,
            "logprobs": lean.sampler_logprobs,
        }
    return out


def _check_lean_equals_full(out):
    assert out["blocker"] is None
    for name in ("greedy", "sampled"):
        assert out[name]["same_tokens"], name
        assert out[name]["same_lengths"], name
        assert out[name]["logprob_gap"] <= 1e-5, name
    # The responses ran many steps (the lean path did the work), not just the prefill.
    assert max(out["greedy"]["lengths"] + out["sampled"]["lengths"]) > 4


def test_lean_step_equals_the_full_model_step_dense():
    _check_lean_equals_full(run_local_workers(_decode_both, 1, DENSE + CONTEXT, timeout_s=300)[0])


def test_lean_step_equals_the_full_model_step_variant_unsharded_and_tp2_sp(tmp_path):
    weights = os.path.join(str(tmp_path), "weights")
    reference = run_local_workers(_decode_both, 1, DENSE + CONTEXT + VARIANT, weights, timeout_s=300)[0]
    _check_lean_equals_full(reference)
    sharded = run_local_workers(_decode_both, 2, DENSE + CONTEXT + VARIANT
                                + ["parallel.tp=2", "parallel.sequence_parallel=true"], weights, "sharded",
                                timeout_s=300)
    for out in sharded:
        _check_lean_equals_full(out)
        # Same weights, same seed: the TP2+SP lean decode draws the one-process samples.
        for name in ("greedy", "sampled"):
            assert torch.equal(out[name]["sequences"], reference[name]["sequences"]), name
            assert float((out[name]["logprobs"] - reference[name]["logprobs"]).abs().max()) <= 1e-5, name


@pytest.mark.parametrize("world,overrides,reason", [
    (1, MOE + CONTEXT, "MoE"),
    (2, DENSE + CONTEXT + ["parallel.pp=2"], "pipeline parallelism"),
], ids=["moe", "pp2"])
def test_uncovered_models_say_why_and_decode_with_the_full_model(world, overrides, reason):
    for out in run_local_workers(_decode_both, world, overrides, timeout_s=300):
        assert reason in out["blocker"]
        assert out["greedy"]["same_tokens"] and out["sampled"]["same_tokens"]
