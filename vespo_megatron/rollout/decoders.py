"""The rollout entry point: :func:`sample` runs the decoder ``rollout.engine`` names under the sampler's precision,
in batches of at most ``rollout.max_batch_sequences`` sequences (rollout micro-batching)."""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from typing import Callable, Optional

import torch

from vespo_megatron.rollout.common import DecodeRequest, Generated, concat_generated, lockstep_group, uniforms_table
from vespo_megatron.rollout.decode import decode
from vespo_megatron.rollout.recompute import generate
from vespo_megatron.runtime.collectives import max_over


def sample(engine, prompts: list[list[int]], request: DecodeRequest, *, record_routing: bool = False,
           policy_version: Optional[Callable[[], int]] = None) -> Generated:
    """Sample with the decoder ``request.settings.engine`` names (``kv``, or ``recompute``, which kv uses when
    cp > 1).

    ``record_routing`` and ``policy_version`` are :func:`~vespo_megatron.rollout.decode.decode`'s;
    ``record_routing`` is dropped for the recompute decoder (the trainer then records the routing of its own
    behaviour pass), which cannot take ``policy_version``. With ``rollout.max_batch_sequences`` the prompts are
    decoded in consecutive batches of at most that many (each with its own KV cache), with the same samples.
    """
    size = request.settings.max_batch_sequences
    lockstep = lockstep_group(engine)
    if size is None or (len(prompts) <= size and lockstep is None):
        return _sample_batch(engine, prompts, request, record_routing=record_routing, policy_version=policy_version)
    # Micro-batches: sequence i keeps column i of the step's uniforms table, so the samples are those of one batch.
    # Ranks whose forwards are coupled by the expert exchange run as many batches (empty ones keep it served).
    uniforms = uniforms_table(request, len(prompts))
    batches = max(int(max_over([math.ceil(len(prompts) / size)], lockstep)[0]), 1)
    parts = []
    for index in range(batches):
        lo, hi = min(index * size, len(prompts)), min((index + 1) * size, len(prompts))
        part = dataclasses.replace(request, uniforms=uniforms[:, lo:hi], generator=None)
        parts.append(_sample_batch(engine, prompts[lo:hi], part, record_routing=record_routing,
                                   policy_version=policy_version))
    return concat_generated(parts)


def _sample_batch(engine, prompts: list[list[int]], request: DecodeRequest, *, record_routing: bool,
                  policy_version: Optional[Callable[[], int]]) -> Generated:
    settings = request.settings
    with sampler_precision(engine, settings.sampler_dtype):
        if settings.engine == "kv" and engine.ctx.cp == 1:
            return decode(engine, prompts, request, record_routing=record_routing, policy_version=policy_version)
        if policy_version is not None:
            raise ValueError("rollout.partial=true needs the KV decoder (rollout.engine=kv, parallel.cp=1)")
        return generate(engine, prompts, request)


def sampler_precision(engine, dtype: str):
    """bf16 autocast around the sampling passes when ``rollout.sampler_dtype`` is 'bf16', else nothing."""
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device_type=engine.ctx.device.type, dtype=torch.bfloat16)
