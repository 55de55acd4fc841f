"""Greedy accuracy on held-out prompts: the number the demo and the study report before and after RL."""

from __future__ import annotations

import torch

from vespo_megatron.rl.context import RLContext
from vespo_megatron.rl.sampling import score
from vespo_megatron.rollout.common import DecodeRequest
from vespo_megatron.rollout.decoders import sample


def evaluate(context: RLContext, num_prompts: int, seed_offset: int = 10_000) -> float:
    """Greedy accuracy on ``num_prompts`` held-out prompts (same on every rank)."""
    config, tokenizer = context.config, context.tokenizer
    context.engine.gather_params()  # the decoder reads parameters outside DDP's forward hooks (lean step)
    samples = context.task.held_out(seed_offset).prompts().next_batch(num_prompts)
    encoded = [tokenizer.encode_prompt(s.prompt) for s in samples]
    micro = 1 if not config.parallel.vpp else config.parallel.pp
    while len(encoded) % micro:
        encoded.append(encoded[-1])
        samples.append(samples[-1])
    generated = sample(context.engine, encoded, DecodeRequest(
        config.rollout, seq_length=config.seq_length, eos_id=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
        generator=torch.Generator().manual_seed(0), greedy=True, vocab_size=tokenizer.vocab_size))
    rewards = score(context.task, tokenizer, generated, samples)[:num_prompts]
    return float((rewards >= 1.0).float().mean())
