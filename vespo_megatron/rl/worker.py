"""A rollout rank of a disaggregated run: follows the trainer's headers, takes its weights, samples and sends.

A worker reads headers only when it must: before generating step ``i`` it takes in every header up to
``i - 1 - lookahead``. Which weights sample which step is therefore fixed by the headers' order alone, not
by timing: a run is reproducible, and with ``lookahead = 0`` and a sync after every step the worker samples
exactly what the colocated loop samples (same weights, the same per-share uniforms, every share of a step
in one batched decode). A push does not wait for the worker: the worker takes it at its next step boundary,
or between two decode steps with partial rollouts (``rollout.partial``). Waits last as long as the peer is
alive (:mod:`vespo_megatron.runtime.liveness`).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.distributed as dist

from vespo_megatron.config import Config
from vespo_megatron.models.gpt import build_model
from vespo_megatron.rl.messages import (
    HEADER_FIELDS,
    HEADER_TAG,
    ROLLOUT_TAG,
    pack_share,
    replicas,
    sequences_per_share,
    share_rows,
)
from vespo_megatron.rl.sampling import sample_and_score, share_uniforms
from vespo_megatron.rl.weight_sync import WorkerSync, exchange_manifests, post
from vespo_megatron.runtime.distributed import JobSplit, ParallelContext, rollout_parallel_config
from vespo_megatron.tasks.base import Task
from vespo_megatron.tokenizer import RunTokenizer
from vespo_megatron.train.engine import Engine

PARTIAL_POLL_S = 0.02
"""Partial rollouts: a worker looks for newly sent headers at most this often (between decode steps)."""


def worker_config(config: Config, padded_vocab_size: int) -> Config:
    """The config a rollout worker builds its model from: its layout, the trainer's padded vocabulary."""
    tp = config.rollout.parallel.tp
    if padded_vocab_size % tp:
        raise ValueError(f"the trainer's padded vocabulary of {padded_vocab_size} rows is not divisible by "
                         f"rollout.parallel.tp={tp}; use a rollout tp that divides it")
    return replace(config, parallel=rollout_parallel_config(config),
                   model=replace(config.model, make_vocab_size_divisible_by=padded_vocab_size // tp))


class RolloutWorker:
    """One rollout rank: follows the trainer's headers, syncs weights, samples and sends its steps."""

    def __init__(self, config: Config, ctx: ParallelContext, split: JobSplit, tokenizer: RunTokenizer, task: Task,
                 trainer_dp: int, start_step: int = 0):
        trainer_vocab = config.model.padded_vocab_size(config.model.vocab_size or tokenizer.vocab_size,
                                                       config.parallel.tp)
        self.config = config
        self.local_config = worker_config(config, trainer_vocab)
        built = build_model(self.local_config, tokenizer.vocab_size)
        for chunk in built.chunks:
            chunk.eval()
        self.engine = Engine(config=self.local_config, ctx=ctx, built=built, chunks=built.chunks,
                             optimizer=None, scheduler=None)
        self.ctx, self.split, self.tokenizer, self.task = ctx, split, tokenizer, task
        self.trainer_dp = trainer_dp
        self.prompts = task.prompts()
        self.step = 0
        self.lookahead = config.rl.lookahead_steps
        self.fast_forward(start_step)
        self.version = -1
        self.stop_seen = False
        self.last_poll = 0.0
        manifests, self.trainer_shares = exchange_manifests(split, None)
        self.sync = WorkerSync(built.chunks, split, manifests)

    def fast_forward(self, step: int) -> None:
        """Start at RL step ``step`` (a resumed run): skip earlier prompts, expect the header of ``step - 1 - L``."""
        for _ in range(self.step, step):
            self.prompts.next_batch(self.config.rollout.prompts_per_step)
        self.step = step
        self.last_header = step - 2 - self.lookahead

    def _next_header(self) -> tuple[int, int, bool, bool]:
        header = torch.zeros(HEADER_FIELDS, dtype=torch.int64)
        source = self.split.trainer_ranks[0]
        what = f"rollout worker rank {dist.get_rank()} waiting for trainer rank {source}"
        self.split.liveness.wait(post(dist.irecv, header, source, self.split.control_group, HEADER_TAG, what),
                                 source, what)
        index, version, sync, stop = (int(v) for v in header.tolist())
        if sync:
            self.last_pushed_version = version
            self.sync.receive()
            self.version = version
        self.last_header = index
        return index, version, bool(sync), bool(stop)

    def _generate(self, step: int) -> list[torch.Tensor]:
        """Step ``step``'s messages, one per trainer data-parallel share, from one batched decode."""
        batch = self.prompts.next_batch(self.config.rollout.prompts_per_step)
        if step % replicas(self.config) != self.ctx.dp_rank:
            return []
        per_share = sequences_per_share(self.config, self.trainer_dp)
        generated, rewards = sample_and_score(
            self.engine, self.config, self.tokenizer, self.task, batch, generator=None,
            uniforms=share_uniforms(self.config, step, self.trainer_dp, per_share),
            policy_version=self.poll_pushes if self.config.rollout.partial else None)
        return [pack_share(share_rows(generated, share * per_share, per_share),
                           rewards[share * per_share:(share + 1) * per_share], self.version, step)
                for share in range(self.trainer_dp)]

    def poll_pushes(self) -> int:
        """Partial rollouts, between two decode steps: take in every header the trainer has already sent (and
        the weights pushed with them) without waiting for any; returns the version the next tokens use."""
        now = time.monotonic()
        if self.stop_seen or now - self.last_poll < PARTIAL_POLL_S:
            return self.version
        self.last_poll = now
        announced = self.split.liveness.progress("header", default=self.last_header)
        while self.last_header < announced and not self.stop_seen:
            self.stop_seen = self._next_header()[3]
        return self.version

    def _send(self, step: int, messages: list[torch.Tensor]) -> list:
        if self.ctx.tp_rank != 0 or not messages:
            return []
        return [(step, dst, post(dist.isend, messages[share], dst, self.split.control_group, ROLLOUT_TAG,
                                 f"rollout to trainer rank {dst}"), messages)
                for dst, share in zip(self.split.trainer_ranks, self.trainer_shares)]

    def _settle(self, pending: list, through_step: int) -> list:
        """Wait for (at once: they are done) and drop the sends of steps up to ``through_step``; the rest stay.

        Gloo's send work reports completion only through ``wait()``, so without this every message would be
        kept for the whole run. The trainer sends header ``j`` only after it has received step ``j``, so
        every send of a step at or below the last header read has completed.
        """
        for _, dst, work, _ in (p for p in pending if p[0] <= through_step):
            self.split.liveness.wait(work, dst, f"rollout to trainer rank {dst}")
        return [p for p in pending if p[0] > through_step]

    def run(self) -> int:
        """Generate until the trainer says stop; returns the number of steps this worker stepped through."""
        pending: list = []
        while True:
            need = max(self.step - 1 - self.lookahead, -1)
            while self.last_header < need and not self.stop_seen:
                self.stop_seen = self._next_header()[3]
            # After the stop header the trainer takes the steps up to its index + lookahead, no more (a
            # partial rollout may have read it early, while those steps were still to generate).
            if self.stop_seen and self.step - 1 - self.lookahead >= self.last_header:
                self._settle(pending, self.step)  # every step sent so far
                return self.step
            pending = self._settle(pending, self.last_header)
            pending += self._send(self.step, self._generate(self.step))
            self.step += 1
