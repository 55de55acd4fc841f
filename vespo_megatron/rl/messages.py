"""The messages between the trainer and the rollout workers of a disaggregated run, and who sends which.

* worker -> trainer: one float64 matrix per trainer data-parallel share of an RL step (:func:`pack_share`):
  sequences, the sampler's per-token log-probs, per-token policy versions (partial rollouts only), then five
  scalar columns (prompt length, response length, reward, policy version, step index);
* trainer -> workers: a header of :data:`HEADER_FIELDS` int64 ``(index, version, sync, stop)`` after every
  step; with ``sync`` set the weights follow (:mod:`vespo_megatron.rl.weight_sync`).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from vespo_megatron.config import Config
from vespo_megatron.rollout.common import Generated
from vespo_megatron.runtime.distributed import JobSplit

HEADER_TAG = 42
ROLLOUT_TAG = 43
HEADER_FIELDS = 4
"""A header is int64 ``(index, version, sync, stop)``."""


def sequences_per_share(config: Config, trainer_dp: int) -> int:
    """Sequences of one trainer data-parallel share of an RL step."""
    return config.rollout.prompts_per_step // trainer_dp * config.rollout.group_size


def pack_share(generated: Generated, rewards: torch.Tensor, version: int, index: int) -> torch.Tensor:
    """One float64 message: sequences, sampler log-probs, [per-token versions,] prompt/response lengths, rewards,
    version, index. With per-token versions (partial rollouts) the version is the share's oldest token's."""
    n = generated.sequences.shape[0]
    blocks = [generated.sequences.double(), generated.sampler_logprobs.double()]
    if generated.token_versions is not None:
        sampled = generated.token_versions[generated.token_versions >= 0]
        version = int(sampled.min()) if sampled.numel() else version
        blocks.append(generated.token_versions.double())
    tail = torch.stack([generated.prompt_lengths.double(), generated.response_lengths.double(), rewards.double(),
                        torch.full((n,), float(version), dtype=torch.float64),
                        torch.full((n,), float(index), dtype=torch.float64)], dim=1)
    return torch.cat([*blocks, tail], dim=1)


def _tail_column(width: int, partial: bool) -> int:
    """Where a message's 5 scalar columns start: after sequences, sampler log-probs and, when partial, versions."""
    return (3 if partial else 2) * width


def message_columns(width: int, partial: bool) -> int:
    """Columns of one step's message."""
    return _tail_column(width, partial) + 5


def share_rows(generated: Generated, start: int, count: int) -> Generated:
    """Rows ``start .. start + count`` of a decode's sequences, lengths and sampler log-probs."""
    return replace(generated, sequences=generated.sequences[start:start + count],
                   prompt_lengths=generated.prompt_lengths[start:start + count],
                   response_lengths=generated.response_lengths[start:start + count],
                   sampler_logprobs=generated.sampler_logprobs[start:start + count])


def unpack_share(message: torch.Tensor, width: int, partial: bool) -> dict:
    tail = _tail_column(width, partial)
    fields = {"sequences": message[:, :width].long(), "sampler_logprobs": message[:, width : 2 * width].float(),
              "prompt_lengths": message[:, tail].long(), "response_lengths": message[:, tail + 1].long(),
              "rewards": message[:, tail + 2].float(), "version": int(message[0, tail + 3]),
              "index": int(message[0, tail + 4])}
    if partial:
        fields["token_versions"] = message[:, 2 * width : 3 * width].long()
    return fields


def replicas(config: Config) -> int:
    """Rollout replicas (``rollout.parallel.tp`` ranks each); step ``i`` is sampled by replica ``i mod replicas``."""
    return config.parallel.rollout_ranks // config.rollout.parallel.tp


def replica_ranks(split: JobSplit, config: Config, step: int) -> list[int]:
    """Global ranks of the replica that samples step ``step``; the first (tensor-parallel rank 0) sends it."""
    tp = config.rollout.parallel.tp
    first = (step % replicas(config)) * tp
    return list(split.rollout_ranks[first:first + tp])


def replica_leader(split: JobSplit, config: Config, step: int) -> int:
    """Global rank of the worker that sends step ``step`` (tensor-parallel rank 0 of its replica)."""
    return replica_ranks(split, config, step)[0]
