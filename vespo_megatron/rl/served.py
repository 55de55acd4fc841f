"""The trainer's link to the vLLM servers (``rollout.engine: vllm``): steps issued ahead, versions, pushes.

Every trainer rank holds a :class:`ServedRollouts` and advances the prompt stream alike; global rank 0 (the
*driver*) also holds the HTTP client and, for local servers, the server processes. RL step ``i`` is issued
(its requests go out from a background thread) once the trainer has taken step ``i - L`` (``L`` =
``rl.lookahead_steps``), so the servers generate the next steps while the trainer trains; a step records the
policy version of the last push before it was issued. A push (every ``rl.sync_every`` updates, and once as
the run starts) first waits for the requests in flight, so every response of a step has one version. The
driver broadcasts each step's scored responses to every trainer rank, which takes its data-parallel rows and
lets the :class:`~vespo_megatron.rl.staleness.StalenessManager` admit or drop it. Before a checkpoint
:meth:`drain` waits for the requests in flight: the checkpoint holds the issued-but-untrained steps, and a
resumed run trains each of them once.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch
import torch.distributed as dist

from vespo_megatron.config import Config
from vespo_megatron.rl.context import RLContext
from vespo_megatron.rl.sampling import served_sample_and_score
from vespo_megatron.rl.state import LoopState
from vespo_megatron.rollout.vllm.client import VllmClient
from vespo_megatron.rollout.vllm.servers import LocalServers, start_local_servers
from vespo_megatron.rollout.vllm.sync import PushReport, push_weights
from vespo_megatron.tasks.base import Sample

ServedFields = dict
"""One served step as every rank receives it: sequences, prompt_lengths, response_lengths, sampler_logprobs,
rewards (tensors over the whole step), version, index, seconds (ints / float): what
:func:`vespo_megatron.rl.remote.to_rollout` reads, once cut to a rank's data-parallel rows."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _broadcast(obj):
    """``obj`` of global rank 0 on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ServedRollouts:
    """The servers, the steps issued to them and the version they hold; one per trainer rank."""

    def __init__(self, context: RLContext, client: Optional[VllmClient], servers: Optional[LocalServers] = None):
        self.context = context
        self.client = client
        """Global rank 0 only: the HTTP client of every server."""
        self.servers = servers
        """Global rank 0 only, when it started the servers itself (``rollout.vllm.urls`` empty)."""
        self.next_issue = 0
        """The RL step whose prompts are drawn next."""
        self.next_take = 0
        """The RL step the trainer takes next."""
        self.pushed_version: Optional[int] = None
        """Policy version the servers hold (None before the first push)."""
        self.pending: dict[int, Future] = {}
        self.ready: dict[int, ServedFields] = {}
        self.last_push: Optional[PushReport] = None
        lookahead = context.config.rl.lookahead_steps
        self._pool = ThreadPoolExecutor(max_workers=lookahead + 1, thread_name_prefix="vllm-step") \
            if client is not None else None

    @classmethod
    def open(cls, context: RLContext) -> "ServedRollouts":
        """Rank 0 starts the local servers (or takes ``rollout.vllm.urls``); every rank gets a link."""
        config = context.config
        settings = config.rollout.vllm
        client, servers, error = None, None, None
        if _rank() == 0:
            try:
                urls = list(settings.urls)
                if not urls:
                    servers = start_local_servers(settings, config.model.hf_path,
                                                  settings.max_model_len or config.seq_length + 1,
                                                  config.logging.run_dir)
                    urls = servers.urls
                client = VllmClient(urls, timeout_s=settings.request_timeout_s,
                                    model=_served_model_name(urls[0], settings.request_timeout_s))
            except Exception as failure:  # every rank must leave the broadcast below
                error = failure
        message = _broadcast(None if error is None else str(error))
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"starting the vLLM servers failed on global rank 0: {message}")
        return cls(context, client, servers)

    @property
    def config(self) -> Config:
        """The run's config."""
        return self.context.config

    # -------------------------------------------------------------------------------- issuing steps

    def issue(self, state: LoopState, steps_done: int) -> None:
        """Draw the prompts of every step up to ``next_take + L`` not yet issued, and (rank 0) send them;
        no more than the ``train.steps - steps_done`` RL steps the run still trains."""
        config = self.config
        outstanding = self.next_issue - self.next_take
        while (self.next_issue <= self.next_take + config.rl.lookahead_steps
               and steps_done + outstanding < config.train.steps):
            prompts = state.prompts.next_batch(config.rollout.prompts_per_step)
            if self._pool is not None:
                self.pending[self.next_issue] = self._pool.submit(self._generate, self.next_issue, prompts,
                                                                  self.pushed_version)
            self.next_issue += 1
            outstanding += 1

    def _generate(self, index: int, prompts: list[Sample], version: int) -> ServedFields:
        """Rank 0's background thread: one step's responses from the servers, scored."""
        started = time.perf_counter()
        context = self.context
        generated, rewards = served_sample_and_score(self.client, self.config, context.tokenizer, context.task,
                                                     prompts, index)
        return {"sequences": generated.sequences, "prompt_lengths": generated.prompt_lengths,
                "response_lengths": generated.response_lengths, "sampler_logprobs": generated.sampler_logprobs,
                "rewards": rewards, "version": int(version), "index": index,
                "seconds": time.perf_counter() - started}

    def _settle(self, index: int) -> ServedFields:
        """Rank 0: step ``index``'s fields once its requests are done."""
        if index not in self.ready:
            self.ready[index] = self.pending.pop(index).result()
        return self.ready.pop(index)

    def take(self, state: LoopState) -> ServedFields:
        """The next step's fields on every rank (issuing it first if needed); a server error raises everywhere."""
        self.issue(state, steps_done=state.step)
        if self.next_take >= self.next_issue:  # train.steps reached while the trainer still wants a step
            raise RuntimeError(f"no RL step left to take (next step {self.next_take}, train.steps="
                               f"{self.config.train.steps})")
        fields, error = None, None
        if self._pool is not None:
            try:
                fields = self._settle(self.next_take)
            except Exception as failure:
                error = failure
        fields = _broadcast(fields if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if isinstance(fields, str):
            raise RuntimeError(f"the vLLM servers failed on global rank 0: {fields}")
        self.next_take += 1
        return fields

    # ------------------------------------------------------------------------------------- weights

    def push_due(self) -> bool:
        """True when ``rl.sync_every`` updates have passed since the servers' version (always before the first)."""
        if self.pushed_version is None:
            return True
        every = self.config.rl.sync_every
        return self.context.engine.iteration // every > self.pushed_version // every

    def push(self) -> PushReport:
        """Wait for the requests in flight, then load the trainer's weights into every server; collective."""
        self.drain()
        report = push_weights(self.context.engine, self.config.model.hf_path, self.config.rollout.vllm.sync_dir,
                              self.config.rollout.vllm.sync_bucket_mb, self.client)
        self.pushed_version = report.version
        self.last_push = report
        return report

    # --------------------------------------------------------------------------- checkpoint and exit

    def drain(self) -> None:
        """Rank 0: wait for every step in flight (their fields are kept for the trainer or the checkpoint).

        A failed step keeps its future, so the error is raised on every rank when the trainer takes it.
        """
        for index in sorted(self.pending):
            future = self.pending[index]
            if future.exception() is None:
                self.ready[index] = self.pending.pop(index).result()

    def state_dict(self) -> dict:
        """Issued steps and versions; rank 0 adds the fields of every issued-but-untrained step (call
        :meth:`drain` first)."""
        return {"next_issue": self.next_issue, "next_take": self.next_take, "pushed_version": self.pushed_version,
                "ready": [self.ready[index] for index in sorted(self.ready)]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; rank 0 checks that every issued-but-untrained step came back."""
        self.next_issue = int(state["next_issue"])
        self.next_take = int(state["next_take"])
        self.pushed_version = state["pushed_version"]
        if self._pool is not None:
            self.ready = {int(fields["index"]): fields for fields in state["ready"]}
            missing = [i for i in range(self.next_take, self.next_issue) if i not in self.ready]
            if missing:
                raise ValueError(f"the checkpoint lacks the issued RL steps {missing} (saved without a drain)")

    def close(self) -> None:
        """Stop the background thread and the servers this rank started."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self.servers is not None:
            self.servers.stop()


def _served_model_name(url: str, timeout_s: float) -> str:
    """The model name a server serves (``/v1/models``): local servers serve 'policy', URL servers any."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"{url.rstrip('/')}/v1/models", timeout=min(timeout_s, 30.0)) as reply:
        models = json.loads(reply.read())["data"]
    return str(models[0]["id"])


def served_to_rows(fields: ServedFields, dp: int, dp_rank: int) -> ServedFields:
    """This data-parallel rank's contiguous rows of a served step (whole groups)."""
    from vespo_megatron.runtime.collectives import data_parallel_rows

    rows = data_parallel_rows(fields["sequences"].shape[0], dp, dp_rank)
    return {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in fields.items()}
