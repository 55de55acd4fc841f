"""``rollout.sampler_dtype=bf16``: the sampler runs in bf16 while the trainer stays fp32 (the mismatch arm).

One process: the same greedy decode in fp32 and under the bf16 sampler, against the fp32 log-probs of the
sampled tokens. bf16 sampling must leave the tokens mostly unchanged but move the recorded sampler
log-probs off the fp32 ones by a bf16-sized amount, and the model must stay fp32 afterwards.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist.equivalence_harness import DENSE
from vespo_megatron.runtime.local_workers import run_local_workers

pytestmark = pytest.mark.slow


def _decode_both(rank, world):
    from vespo_megatron.config import load_config
    from vespo_megatron.rollout.common import DecodeRequest
    from vespo_megatron.rollout.decoders import sample
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.engine import build_engine

    config = load_config(None, DENSE + ["model.max_seq_length=32", "rollout.max_new_tokens=12"])
    engine = build_engine(config, initialize(config), vocab_size=64)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 64, (n,), generator=gen).tolist() for n in (3, 6, 4, 9)]
    out = {}
    for dtype in ("fp32", "bf16"):
        settings = dataclasses.replace(config.rollout, sampler_dtype=dtype)
        generated = sample(engine, prompts, DecodeRequest(settings, seq_length=config.seq_length, eos_id=1, pad_id=0,
                                                          generator=torch.Generator().manual_seed(0), greedy=True,
                                                          vocab_size=60))
        out[dtype] = {"sequences": generated.sequences, "logprobs": generated.sampler_logprobs,
                      "mask": generated.sampler_logprobs != 0}
    out["param_dtypes"] = {p.dtype for p in engine.chunks[0].parameters()}
    return out


def test_bf16_sampler_moves_logprobs_not_the_model():
    out = run_local_workers(_decode_both, 1)[0]
    fp32, bf16 = out["fp32"], out["bf16"]
    assert out["param_dtypes"] == {torch.float32}
    agree = (fp32["sequences"] == bf16["sequences"]).float().mean().item()
    assert agree > 0.9, agree
    both = fp32["mask"] & bf16["mask"] & (fp32["sequences"] == bf16["sequences"])
    gap = (fp32["logprobs"] - bf16["logprobs"])[both].abs()
    assert gap.max().item() > 1e-4, "bf16 sampling left the log-probs exactly fp32"
    assert gap.max().item() < 0.2, gap.max().item()
