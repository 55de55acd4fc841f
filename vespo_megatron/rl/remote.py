"""The trainer's link to the rollout workers of a disaggregated run: steps in, headers and weights out.

The trainer takes the workers' steps in order (from the buffer of steps drained ahead, else straight from
the worker that sampled it), checks each one's index and the policy version the pushes imply, and after
every step sends a header and, when due, its weights (:mod:`vespo_megatron.rl.weight_sync`). Waits last as
long as the peer is alive (:mod:`vespo_megatron.runtime.liveness`); a dead or silent worker becomes an error
naming its rank within ``rl.worker_timeout_s``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from vespo_megatron.config import Config
from vespo_megatron.rl.batch import Rollout
from vespo_megatron.rl.behaviour import finish_rollout
from vespo_megatron.rl.messages import (
    HEADER_TAG,
    ROLLOUT_TAG,
    message_columns,
    replica_leader,
    replica_ranks,
    sequences_per_share,
    unpack_share,
)
from vespo_megatron.rl.weight_sync import TrainerSync, WorkerFailure, exchange_manifests, post
from vespo_megatron.runtime.distributed import JobSplit
from vespo_megatron.train.engine import Engine


class RemoteRollouts:
    """Trainer side: receives the workers' steps in order, sends headers, pushes weights."""

    def __init__(self, config: Config, engine: Engine, split: JobSplit):
        self.config, self.engine, self.split = config, engine, split
        self.weights = TrainerSync(engine.chunks, split, self.config.rl.sync_bucket_mb)
        manifests, _ = exchange_manifests(split, self.weights, engine.ctx.dp_rank)
        element = next(engine.chunks[0].parameters()).element_size()
        self.bytes_per_sync = float(sum(sum(math.prod(spec.shape) for spec in bucket) * element
                                        for plan in manifests.values() for bucket in plan)) * len(split.rollout_ranks)
        self.next_index = 0
        self.buffer: list[dict] = []
        self.pending_headers: list = []
        self.synced_version: Optional[int] = None
        self.pushes: list[tuple[int, int]] = []
        """``(header index, version)`` of every weight push: which weights sampled which step."""
        self.unverified_before = 0
        """Steps below this came from a checkpoint that did not record its pushes: their version is taken as is."""

    @property
    def width(self) -> int:
        return self.config.seq_length + 1

    def _header(self, index: int, sync: bool, stop: bool) -> None:
        if dist.get_rank() != self.split.trainer_ranks[0]:
            return
        header = torch.tensor([index, self.engine.iteration, int(sync), int(stop)], dtype=torch.int64)
        for dst in self.split.rollout_ranks:
            self.pending_headers.append((index, dst, post(dist.isend, header, dst, self.split.control_group,
                                                          HEADER_TAG, f"header to rollout worker rank {dst}"), header))
        if self.config.rollout.partial:  # workers in mid-generation look here for headers they can take at once
            self.split.liveness.publish("header", index)

    def step_done(self, index: int, stop: bool = False) -> dict[str, float]:
        """Step ``index`` was trained or dropped: tell the workers, and push weights when due."""
        version = self.engine.iteration
        every = self.config.rl.sync_every
        due = self.synced_version is None or version // every > self.synced_version // every
        sync = due and version != self.synced_version and not stop
        self._header(index, sync, stop)
        if not sync:
            return {"sync/seconds": 0.0, "sync/bytes": 0.0}
        self.engine.gather_params()  # every trainer rank: the pushed shards are the optimizer's latest
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
        n = sequences_per_share(self.config, self.engine.ctx.dp)
        message = torch.empty(n, message_columns(self.width, self.config.rollout.partial), dtype=torch.float64)
        source = replica_leader(self.split, self.config, index)
        what = f"receiving RL step {index} from rollout worker rank {source}"
        self.split.liveness.wait(post(dist.irecv, message, source, self.split.control_group, ROLLOUT_TAG, what),
                                 source, what)
        self._settle_headers(index)
        return self._checked(unpack_share(message, self.width, self.config.rollout.partial), index)

    def _settle_headers(self, received: int) -> None:
        """Wait for (at once: they are done) and drop the header sends that step ``received``'s arrival proves read.

        Gloo's send work reports completion only through ``wait()``. The replica that sampled step ``i`` read
        every header up to ``i - 1 - lookahead`` before generating it, so those sends to its ranks are complete.
        """
        replica = set(replica_ranks(self.split, self.config, received))
        read_through = received - 1 - self.config.rl.lookahead_steps
        keep = []
        for entry in self.pending_headers:
            index, dst, work, _ = entry
            if index <= read_through and dst in replica:
                self.split.liveness.wait(work, dst, f"header {index} to rollout worker rank {dst}")
            else:
                keep.append(entry)
        self.pending_headers = keep

    def expected_version(self, index: int) -> int:
        """The policy version step ``index`` must have been sampled with.

        A worker reads every header up to ``index - 1 - lookahead`` (and at least the start header, which
        carries the first push of a run) before it generates step ``index``, so the newest push among
        them sampled it.
        """
        if not self.pushes:
            raise WorkerFailure(f"RL step {index} arrived before any weight push")
        last_header = index - 1 - self.config.rl.lookahead_steps
        versions = [version for header, version in self.pushes if header <= last_header]
        return versions[-1] if versions else self.pushes[0][1]

    def _checked(self, fields: dict, index: int) -> dict:
        """``fields`` if it is step ``index`` sampled with the version the headers imply; else WorkerFailure."""
        source = replica_leader(self.split, self.config, index)
        if fields["index"] != index:
            raise WorkerFailure(f"rollout worker rank {source} sent RL step {fields['index']}, expected {index}")
        expected = fields["version"] if index < self.unverified_before else self.expected_version(index)
        if self.config.rollout.partial and expected <= fields["version"] <= self.engine.iteration:
            expected = fields["version"]  # its oldest token: sampled with that push or a later one
        if fields["version"] != expected:
            raise WorkerFailure(f"RL step {index} from rollout worker rank {source} was sampled with policy version "
                                f"{fields['version']}, expected {expected} (the push at or before header "
                                f"{index - 1 - self.config.rl.lookahead_steps})")
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
        extra = self.config.rl.lookahead_steps
        for index in range(self.next_index + len(self.buffer), self.next_index + extra):
            self.buffer.append(self._receive(index))
        for _, dst, work, _ in self.pending_headers:
            self.split.liveness.wait(work, dst, f"header to rollout worker rank {dst}")
        self.pending_headers = []
        self.weights.finish()

    def state_dict(self) -> dict:
        return {"next_index": self.next_index, "buffer": [dict(f) for f in self.buffer],
                "pushes": [list(p) for p in self._live_pushes()]}

    def _live_pushes(self) -> list[tuple[int, int]]:
        """The pushes a step not yet received can still have been sampled with (the newest one at or
        before the oldest header such a step needs, and every later one)."""
        oldest_needed = self.next_index - 1 - self.config.rl.lookahead_steps
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


def to_rollout(config: Config, engine: Engine, fields: dict) -> Rollout:
    """A received share as a trainable rollout (advantages, behaviour log-probs per loss.behaviour)."""
    return finish_rollout(config, engine, fields["sequences"], fields["prompt_lengths"], fields["response_lengths"],
                          fields["sampler_logprobs"], fields["rewards"], fields["version"], step_index=fields["index"],
                          token_versions=fields.get("token_versions"))
