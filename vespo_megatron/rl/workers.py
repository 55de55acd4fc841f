"""Disaggregated RL: rollout workers generate while the trainer trains; weights flow back every few updates.

One torchrun/SLURM job; the last ``parallel.rollout_ranks`` ranks are rollout workers with the
``rollout.parallel`` layout, grouped in replicas of ``tp`` ranks; RL step ``i`` is sampled by replica
``i mod replicas``. Two message streams join the sides (``runtime.distributed.JobSplit``):

* worker -> trainer: step ``i``'s sequences, one share per trainer data-parallel rank, with the
  sampler's per-token log-probs, rewards and the policy version that sampled them;
* trainer -> workers: after each step ``j`` the trainer's rank 0 sends a header ``(j, version, sync,
  stop)``; with ``sync`` set every trainer source rank then pushes its weight shards
  (:mod:`vespo_megatron.rl.weight_sync`).

A worker reads headers only when it must: before generating step ``i`` it takes in every header up to
``i - 1 - lookahead``. Which weights sample which step is therefore fixed by the headers' order alone,
not by timing: a run is reproducible, and with ``lookahead = 0`` and a sync after every step the
worker samples exactly what the colocated loop samples (same weights, the same per-share uniforms,
every share of a step in one batched decode). The trainer checks each step's index and the version
the headers imply before training on it. A push does not wait for the worker: the worker takes it at
its next step boundary. Waits last as long as the peer is alive (:mod:`vespo_megatron.runtime.liveness`);
a dead or silent peer becomes an error naming its rank within ``rl.worker_timeout_s``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Optional

import torch
import torch.distributed as dist

from vespo_megatron.rl.batch import Rollout
from vespo_megatron.rl.weight_sync import (
    TrainerSync,
    WorkerFailure,
    WorkerSync,
    exchange_manifests,
    post,
)

PARTIAL_POLL_S = 0.02
"""Partial rollouts: a worker looks for newly sent headers at most this often (between decode steps)."""
HEADER_TAG = 42
ROLLOUT_TAG = 43
_HEADER_FIELDS = 4  # index, version, sync, stop


def lookahead(config) -> int:
    return config.rl.lookahead_steps


def sequences_per_share(config, trainer_dp: int) -> int:
    return config.rollout.prompts_per_step // trainer_dp * config.rollout.group_size


def _pack(generated, rewards, version: int, index: int) -> torch.Tensor:
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


def _rows(generated, start: int, count: int):
    """Rows ``start .. start + count`` of a decode's sequences, lengths and sampler log-probs."""
    return replace(generated, sequences=generated.sequences[start:start + count],
                   prompt_lengths=generated.prompt_lengths[start:start + count],
                   response_lengths=generated.response_lengths[start:start + count],
                   sampler_logprobs=generated.sampler_logprobs[start:start + count])


def _unpack(message: torch.Tensor, width: int, partial: bool) -> dict:
    tail = _tail_column(width, partial)
    fields = {"sequences": message[:, :width].long(), "sampler_logprobs": message[:, width : 2 * width].float(),
              "prompt_lengths": message[:, tail].long(), "response_lengths": message[:, tail + 1].long(),
              "rewards": message[:, tail + 2].float(), "version": int(message[0, tail + 3]),
              "index": int(message[0, tail + 4])}
    if partial:
        fields["token_versions"] = message[:, 2 * width : 3 * width].long()
    return fields


def replicas(config) -> int:
    return config.parallel.rollout_ranks // config.rollout.parallel.tp


def replica_leader(split, config, step: int) -> int:
    """Global rank of the worker that sends step ``step`` (tensor-parallel rank 0 of its replica)."""
    tp = config.rollout.parallel.tp
    return split.rollout_ranks[(step % replicas(config)) * tp]


# ----------------------------------------------------------------------------------------- worker


def worker_config(config, padded_vocab_size: int):
    """The config a rollout worker builds its model from: its layout, the trainer's padded vocabulary."""
    from vespo_megatron.runtime.distributed import rollout_parallel_config

    tp = config.rollout.parallel.tp
    if padded_vocab_size % tp:
        raise ValueError(f"the trainer's padded vocabulary of {padded_vocab_size} rows is not divisible by "
                         f"rollout.parallel.tp={tp}; use a rollout tp that divides it")
    return replace(config, parallel=rollout_parallel_config(config),
                   model=replace(config.model, make_vocab_size_divisible_by=padded_vocab_size // tp))


class RolloutWorker:
    """One rollout rank: follows the trainer's headers, syncs weights, samples and sends its steps."""

    def __init__(self, config, ctx, split, tokenizer, task, trainer_dp: int, start_step: int = 0):
        from vespo_megatron.models.gpt import build_model
        from vespo_megatron.train.engine import Engine

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
        self.lookahead = lookahead(config)
        self.fast_forward(start_step)
        self.version = -1
        self.stop_seen = False
        self.last_poll = 0.0
        manifests, self.trainer_shares = exchange_manifests(split, None)
        self.sync = WorkerSync(built.chunks, ctx, split, config.model.num_experts, config.model.swiglu, manifests)

    def fast_forward(self, step: int) -> None:
        """Start at RL step ``step`` (a resumed run): skip earlier prompts, expect the header of ``step - 1 - L``."""
        for _ in range(self.step, step):
            self.prompts.next_batch(self.config.rollout.prompts_per_step)
        self.step = step
        self.last_header = step - 2 - self.lookahead

    def _next_header(self) -> tuple[int, int, bool, bool]:
        header = torch.zeros(_HEADER_FIELDS, dtype=torch.int64)
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
        from vespo_megatron.rl.step import sample_and_score, share_uniforms

        batch = self.prompts.next_batch(self.config.rollout.prompts_per_step)
        if step % replicas(self.config) != self.ctx.dp_rank:
            return []
        per_share = sequences_per_share(self.config, self.trainer_dp)
        generated, rewards = sample_and_score(
            self.engine, self.config, self.tokenizer, self.task, batch, generator=None,
            uniforms=share_uniforms(self.config, step, self.trainer_dp, per_share),
            policy_version=self.poll_pushes if self.config.rollout.partial else None)
        return [_pack(_rows(generated, share * per_share, per_share), rewards[share * per_share:(share + 1) * per_share],
                      self.version, step) for share in range(self.trainer_dp)]

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


# ---------------------------------------------------------------------------------------- trainer


class RemoteRollouts:
    """Trainer side: receives the workers' steps in order, sends headers, pushes weights."""

    def __init__(self, runner, split):
        self.runner, self.split, self.config = runner, split, runner.config
        engine = runner.engine
        self.weights = TrainerSync(engine.chunks, engine.ctx, split, self.config.model.num_experts,
                                   self.config.model.swiglu, self.config.rl.sync_bucket_mb)
        manifests, _ = exchange_manifests(split, self.weights, engine.ctx.dp_rank)
        element = next(engine.chunks[0].parameters()).element_size()
        self.bytes_per_sync = float(sum(sum(_numel(spec.shape) for spec in bucket) * element
                                        for plan in manifests.values() for bucket in plan)) * len(split.rollout_ranks)
        self.next_index = 0
        self.buffer: list[dict] = []
        self.pending_headers: list = []
        self.synced_version: Optional[int] = None
        self.pushes: list[tuple[int, int]] = []
        self.unverified_before = 0
        """Steps below this came from a checkpoint that did not record its pushes: their version is taken as is."""
        """``(header index, version)`` of every weight push: which weights sampled which step."""

    @property
    def width(self) -> int:
        return self.config.seq_length + 1

    def _header(self, index: int, sync: bool, stop: bool) -> None:
        if dist.get_rank() != self.split.trainer_ranks[0]:
            return
        header = torch.tensor([index, self.runner.engine.iteration, int(sync), int(stop)], dtype=torch.int64)
        self.pending_headers = [h for h in self.pending_headers if not h[1].is_completed()]
        for dst in self.split.rollout_ranks:
            self.pending_headers.append((dst, post(dist.isend, header, dst, self.split.control_group, HEADER_TAG,
                                                   f"header to rollout worker rank {dst}"), header))
        if self.config.rollout.partial:  # workers in mid-generation look here for headers they can take at once
            self.split.liveness.publish("header", index)

    def step_done(self, index: int, stop: bool = False) -> dict[str, float]:
        """Step ``index`` was trained or dropped: tell the workers, and push weights when due."""
        version = self.runner.engine.iteration
        due = self.synced_version is None or version // self.config.rl.sync_every > self.synced_version // self.config.rl.sync_every
        sync = due and version != self.synced_version and not stop
        self._header(index, sync, stop)
        if not sync:
            return {"sync/seconds": 0.0, "sync/bytes": 0.0}
        self.runner.engine.gather_params()  # every trainer rank: the pushed shards are the optimizer's latest
        metrics = self.weights.push()
        metrics["sync/bytes"] = self.bytes_per_sync
        self.synced_version = version
        self.pushes.append((index, version))
        return metrics

    def start(self) -> dict[str, float]:
        """Give the workers the current weights (the header of step ``next_index - 1``)."""
        self.synced_version = None
        return self.step_done(self.next_index - 1)

    def _receive(self, index: int) -> dict:
        ctx = self.runner.engine.ctx
        n = sequences_per_share(self.config, ctx.dp)
        message = torch.empty(n, message_columns(self.width, self.config.rollout.partial), dtype=torch.float64)
        source = replica_leader(self.split, self.config, index)
        what = f"receiving RL step {index} from rollout worker rank {source}"
        self.split.liveness.wait(post(dist.irecv, message, source, self.split.control_group, ROLLOUT_TAG, what),
                                 source, what)
        return self._checked(_unpack(message, self.width, self.config.rollout.partial), index)

    def expected_version(self, index: int) -> int:
        """The policy version step ``index`` must have been sampled with.

        A worker reads every header up to ``index - 1 - lookahead`` (and at least the start header, which
        carries the first push of a run) before it generates step ``index``, so the newest push among
        them sampled it.
        """
        if not self.pushes:
            raise WorkerFailure(f"RL step {index} arrived before any weight push")
        last_header = index - 1 - lookahead(self.config)
        versions = [version for header, version in self.pushes if header <= last_header]
        return versions[-1] if versions else self.pushes[0][1]

    def _checked(self, fields: dict, index: int) -> dict:
        """``fields`` if it is step ``index`` sampled with the version the headers imply; else WorkerFailure."""
        source = replica_leader(self.split, self.config, index)
        if fields["index"] != index:
            raise WorkerFailure(f"rollout worker rank {source} sent RL step {fields['index']}, expected {index}")
        expected = fields["version"] if index < self.unverified_before else self.expected_version(index)
        if self.config.rollout.partial and expected <= fields["version"] <= self.runner.engine.iteration:
            expected = fields["version"]  # its oldest token: sampled with that push or a later one
        if fields["version"] != expected:
            raise WorkerFailure(f"RL step {index} from rollout worker rank {source} was sampled with policy version "
                                f"{fields['version']}, expected {expected} (the push at or before header "
                                f"{index - 1 - lookahead(self.config)})")
        return fields

    def next_fields(self) -> dict:
        """The next step's sequences (from the buffer of sampled-ahead steps, else from its worker), checked."""
        index = self.next_index
        fields = self._checked(self.buffer.pop(0), index) if self.buffer else self._receive(index)
        self.next_index += 1
        return fields

    def drain(self) -> None:
        """Receive the steps the workers sampled ahead (they are sent whatever happens) onto the buffer.

        The buffer always holds consecutive steps from ``next_index``; a drain appends the ones not yet
        received, so a checkpoint taken at any step holds every sampled-ahead step exactly once.
        """
        extra = lookahead(self.config)
        for index in range(self.next_index + len(self.buffer), self.next_index + extra):
            self.buffer.append(self._receive(index))
        for dst, work, _ in self.pending_headers:
            self.split.liveness.wait(work, dst, f"header to rollout worker rank {dst}")
        self.pending_headers = []
        self.weights.finish()

    def state_dict(self) -> dict:
        return {"next_index": self.next_index, "buffer": [dict(f) for f in self.buffer],
                "pushes": [list(p) for p in self._live_pushes()]}

    def _live_pushes(self) -> list[tuple[int, int]]:
        """The pushes a step not yet received can still have been sampled with (the newest one at or
        before the oldest header such a step needs, and every later one)."""
        oldest_needed = self.next_index - 1 - lookahead(self.config)
        keep_from = max([i for i, (header, _) in enumerate(self.pushes) if header <= oldest_needed], default=0)
        return self.pushes[keep_from:]

    def load_state_dict(self, state: dict) -> None:
        self.next_index = int(state["next_index"])
        self.buffer = list(state["buffer"])
        self.pushes = [(int(h), int(v)) for h, v in state.get("pushes", [])]
        if "pushes" not in state:
            self.unverified_before = self.next_index + len(self.buffer)
        for offset, fields in enumerate(self.buffer):
            if fields["index"] != self.next_index + offset:
                raise ValueError(f"checkpointed rollout buffer holds RL step {fields['index']} at position {offset}, "
                                 f"expected {self.next_index + offset}: the checkpoint is corrupt")


def _numel(shape) -> int:
    total = 1
    for size in shape:
        total *= int(size)
    return total


def to_rollout(runner, fields: dict) -> Rollout:
    """A received share as a trainable rollout (advantages, behaviour log-probs per loss.behaviour)."""
    from vespo_megatron.rl.step import finish_rollout

    return finish_rollout(runner, fields["sequences"], fields["prompt_lengths"], fields["response_lengths"],
                          fields["sampler_logprobs"], fields["rewards"], fields["version"], step_index=fields["index"],
                          token_versions=fields.get("token_versions"))
