"""The rollout entry point: :func:`sample` runs the decoder ``rollout.engine`` names under the sampler's precision."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional

import torch

from vespo_megatron.rollout.common import DecodeRequest, Generated
from vespo_megatron.rollout.decode import decode
from vespo_megatron.rollout.recompute import generate


def sample(engine, prompts: list[list[int]], request: DecodeRequest, *, record_routing: bool = False,
           policy_version: Optional[Callable[[], int]] = None) -> Generated:
    """Sample with the decoder ``request.settings.engine`` names (``kv``, or ``recompute``, which kv uses when
    cp > 1).

    ``record_routing`` and ``policy_version`` are :func:`~vespo_megatron.rollout.decode.decode`'s;
    ``record_routing`` is dropped for the recompute decoder (the trainer then records the routing of its own
    behaviour pass), which cannot take ``policy_version``.
    """
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
