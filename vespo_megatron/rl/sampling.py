"""Sampling an RL step's responses and scoring them: the one call into the decoder for RL steps.

Colocated trainer ranks and rollout workers both sample through :func:`sample_and_score`, seeded by
:func:`rollout_generator` per (step, trainer data-parallel share), so a disaggregated run samples exactly
what a colocated one would. With ``rollout.engine=vllm`` :func:`served_sample_and_score` sends the same
token-id prompts to the vLLM servers instead (one seed per response row, :func:`served_seed`). Nothing here
needs the trainer's optimizer or loop state.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from vespo_megatron.config import Config
from vespo_megatron.rollout.common import DecodeRequest, Generated, check_prompts, draw_uniforms
from vespo_megatron.rollout.decoders import sample
from vespo_megatron.rollout.vllm.client import Completion, SamplingSettings, VllmClient
from vespo_megatron.tasks.base import Sample, Task
from vespo_megatron.tokenizer import RunTokenizer
from vespo_megatron.train.engine import Engine


def score(task: Task, tokenizer: RunTokenizer, generated: Generated, samples: list[Sample]) -> torch.Tensor:
    """Rewards of the generated responses (decoded up to the stop token)."""
    texts = []
    for row in range(generated.sequences.shape[0]):
        start = int(generated.prompt_lengths[row])
        ids = generated.sequences[row, start : start + int(generated.response_lengths[row])].tolist()
        stops = [ids.index(stop) for stop in tokenizer.stop_ids if stop in ids]
        if stops:
            ids = ids[: min(stops)]
        texts.append(tokenizer.decode(ids))
    return torch.tensor(task.rewards(texts, samples), dtype=torch.float32)


def rollout_generator(config: Config, step: int, dp_rank: int) -> torch.Generator:
    """The sampling generator of RL step ``step`` for the trainer's data-parallel rank ``dp_rank``.

    Rollout workers seed with the same function, so a disaggregated run samples what a colocated one would.
    """
    return torch.Generator().manual_seed(config.train.seed * 1_000_003 + step * 1009 + dp_rank)


def share_uniforms(config: Config, step: int, shares: int, sequences_per_share: int) -> torch.Tensor:
    """The uniforms table of ``shares`` trainer data-parallel shares of RL step ``step``, side by side.

    Each share draws from its own :func:`rollout_generator`, so decoding every share in one batch samples
    exactly what decoding them one by one (or on the colocated ranks) samples.
    """
    return torch.cat([draw_uniforms(rollout_generator(config, step, share), config.rollout.max_new_tokens,
                                    sequences_per_share) for share in range(shares)], dim=1)


def sample_and_score(engine: Engine, config: Config, tokenizer: RunTokenizer, task: Task, prompts: list[Sample],
                     generator: Optional[torch.Generator], uniforms: Optional[torch.Tensor] = None,
                     policy_version: Optional[Callable[[], int]] = None) -> tuple[Generated, torch.Tensor]:
    """``group_size`` responses per prompt with ``engine``'s current weights, and their rewards.

    ``uniforms`` (from :func:`share_uniforms`) replaces ``generator`` when several shares are decoded as one
    batch; ``policy_version`` (partial rollouts) is polled before every decode step
    (:func:`~vespo_megatron.rollout.decode.decode`).
    """
    group = config.rollout.group_size
    samples = [s for s in prompts for _ in range(group)]
    encoded = [tokenizer.encode_prompt(s.prompt) for s in samples]
    stop = tuple(tuple(tokenizer.encode(text)) for text in config.rollout.stop)
    request = DecodeRequest(
        config.rollout, seq_length=config.seq_length, eos_id=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
        generator=generator, uniforms=uniforms, vocab_size=tokenizer.vocab_size, stop_sequences=stop,
    )
    generated = sample(engine, encoded, request, record_routing=config.rollout.routing_replay,
                       policy_version=policy_version)
    return generated, score(task, tokenizer, generated, samples)


def served_seed(config: Config, step: int, row: int) -> int:
    """The vLLM sampling seed of response ``row`` of RL step ``step`` (the same whichever server serves it)."""
    return (config.train.seed * 1_000_003 + step * 1009 * 65_536 + row) % (2**31 - 1)


def completions_to_generated(prompts: list[list[int]], completions: list[Completion], seq_length: int,
                             pad_id: int, max_new_tokens: int) -> Generated:
    """Served responses in the decoders' layout: right-padded ``seq_length + 1`` rows, log-probs at their tokens."""
    prompt_lengths = check_prompts(prompts, max_new_tokens, seq_length)
    n = len(prompts)
    sequences = torch.full((n, seq_length + 1), pad_id, dtype=torch.long)
    sampler_logprobs = torch.zeros(n, seq_length + 1)
    response_lengths = torch.zeros(n, dtype=torch.long)
    for row, (prompt, done) in enumerate(zip(prompts, completions)):
        tokens = done.tokens[:max_new_tokens]
        start, end = len(prompt), len(prompt) + len(tokens)
        sequences[row, :start] = torch.tensor(prompt)
        sequences[row, start:end] = torch.tensor(tokens, dtype=torch.long)
        sampler_logprobs[row, start:end] = torch.tensor(done.logprobs[: len(tokens)])
        response_lengths[row] = len(tokens)
    return Generated(sequences=sequences, prompt_lengths=prompt_lengths, response_lengths=response_lengths,
                     sampler_logprobs=sampler_logprobs)


def served_sample_and_score(client: VllmClient, config: Config, tokenizer: RunTokenizer, task: Task,
                            prompts: list[Sample], step: int) -> tuple[Generated, torch.Tensor]:
    """``group_size`` responses per prompt from the vLLM servers (their current weights), and their rewards."""
    group, settings = config.rollout.group_size, config.rollout
    samples = [s for s in prompts for _ in range(group)]
    encoded = [tokenizer.encode_prompt(s.prompt) for s in samples]
    sampling = SamplingSettings(max_tokens=settings.max_new_tokens, temperature=settings.sampling_temperature,
                                top_p=settings.top_p, top_k=settings.top_k,
                                stop_token_ids=tuple(int(t) for t in tokenizer.stop_ids),
                                allowed_vocab=tokenizer.vocab_size if tokenizer.vocab_size < config.model.vocab_size
                                else None)
    completions = client.complete_all(encoded, sampling, [served_seed(config, step, row)
                                                          for row in range(len(encoded))])
    generated = completions_to_generated(encoded, completions, config.seq_length, tokenizer.pad_id,
                                         settings.max_new_tokens)
    return generated, score(task, tokenizer, generated, samples)
