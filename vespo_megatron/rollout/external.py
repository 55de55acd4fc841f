"""Rollouts produced by an inference engine (vLLM, SGLang, ...) and read from JSONL.

One line per response, in groups of ``rollout.group_size`` consecutive lines sharing a prompt::

    {"prompt_tokens": [...], "response_tokens": [...], "sampler_logprobs": [...], "reward": 1.0}

``sampler_logprobs`` holds the engine's log-prob of each response token (same length as
``response_tokens``). The trainer recomputes the old-policy log-probs with its own weights; the gap
between the two is what ``loss.correction`` (TIS/MIS) corrects. The reader keeps its position so a resumed
run continues with the next unread line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from vespo_megatron.tasks.jsonl import parse_jsonl_record

REQUIRED_KEYS = ("prompt_tokens", "response_tokens", "sampler_logprobs", "reward")


@dataclass
class ExternalBatch:
    sequences: torch.Tensor
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor
    sampler_logprobs: torch.Tensor
    rewards: torch.Tensor


def _parse_line(raw: str, where: str, vocab_size: int) -> dict:
    record = parse_jsonl_record(raw, where, REQUIRED_KEYS)
    prompt, response, logprobs = record["prompt_tokens"], record["response_tokens"], record["sampler_logprobs"]
    for key in ("prompt_tokens", "response_tokens", "sampler_logprobs"):
        if not isinstance(record[key], list):
            raise ValueError(f"{where}: {key} must be a JSON list, got {type(record[key]).__name__}")
    if not prompt or not response:
        raise ValueError(f"{where}: prompt_tokens and response_tokens must be non-empty")
    if len(logprobs) != len(response):
        raise ValueError(f"{where}: sampler_logprobs has {len(logprobs)} values for {len(response)} response tokens")
    for key in ("prompt_tokens", "response_tokens"):
        bad = [t for t in record[key] if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{where}: {key} holds {bad[0]!r}; token ids must be integers in [0, {vocab_size}) "
                             "(true/false are not token ids)")
    bad = [v for v in logprobs
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > 0]
    if bad:
        raise ValueError(f"{where}: sampler_logprobs holds {bad[0]!r}; log-probs must be finite numbers <= 0 "
                         "(true/false are not log-probs)")
    reward = record["reward"]
    if not isinstance(reward, (int, float)) or isinstance(reward, bool) or not math.isfinite(reward):
        raise ValueError(f"{where}: reward must be a finite number, got {reward!r}")
    return record


class ExternalRollouts:
    """Sequential reader of external rollouts; cycles through the file, resumable by ``state_dict``."""

    def __init__(self, path: str | Path, *, group_size: int, seq_length: int, pad_id: int, vocab_size: int):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"rollout.jsonl_path={self.path} does not exist")
        lines = [(n, line) for n, line in enumerate(self.path.read_text().splitlines(), start=1) if line.strip()]
        if not lines:
            raise ValueError(f"{self.path}: no rollouts in the file")
        self.records = [_parse_line(line, f"{self.path}:{n}", vocab_size) for n, line in lines]
        if len(self.records) % group_size:
            raise ValueError(
                f"{self.path}: {len(self.records)} lines are not whole groups of rollout.group_size={group_size}"
            )
        for start in range(0, len(self.records), group_size):
            first = self.records[start]["prompt_tokens"]
            for offset in range(1, group_size):
                if self.records[start + offset]["prompt_tokens"] != first:
                    raise ValueError(
                        f"{self.path}:{lines[start + offset][0]}: prompt_tokens differ from line {lines[start][0]}, "
                        f"which starts its group; each group is rollout.group_size={group_size} consecutive lines "
                        "answering one prompt (reorder the file or fix rollout.group_size)")
        for (n, _), record in zip(lines, self.records):
            total = len(record["prompt_tokens"]) + len(record["response_tokens"])
            if total > seq_length + 1:
                raise ValueError(f"{self.path}:{n}: prompt + response is {total} tokens, more than the context of "
                                 f"{seq_length + 1}; raise model.max_seq_length or drop the line")
        self.group_size, self.seq_length, self.pad_id = group_size, seq_length, pad_id
        self.position = 0

    def next_groups(self, num_groups: int) -> ExternalBatch:
        """The next ``num_groups`` groups (wrapping around at the end of the file)."""
        count = num_groups * self.group_size
        picked = [self.records[(self.position + i) % len(self.records)] for i in range(count)]
        self.position = (self.position + count) % len(self.records)
        sequences = torch.full((count, self.seq_length + 1), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros(count, self.seq_length + 1)
        prompt_lengths, response_lengths = [], []
        for row, record in enumerate(picked):
            prompt, response = record["prompt_tokens"], record["response_tokens"]
            sequences[row, : len(prompt)] = torch.tensor(prompt)
            sequences[row, len(prompt) : len(prompt) + len(response)] = torch.tensor(response)
            logprobs[row, len(prompt) : len(prompt) + len(response)] = torch.tensor(record["sampler_logprobs"])
            prompt_lengths.append(len(prompt))
            response_lengths.append(len(response))
        return ExternalBatch(
            sequences=sequences,
            prompt_lengths=torch.tensor(prompt_lengths),
            response_lengths=torch.tensor(response_lengths),
            sampler_logprobs=logprobs,
            rewards=torch.tensor([float(r["reward"]) for r in picked]),
        )

    def state_dict(self) -> dict:
        return {"position": self.position, "num_records": len(self.records)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_records"] != len(self.records):
            raise ValueError(f"{self.path} has {len(self.records)} rollouts but the checkpoint was taken with "
                             f"{state['num_records']}; the file changed since the checkpoint")
        self.position = int(state["position"])
