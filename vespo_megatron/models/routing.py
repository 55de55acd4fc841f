"""MoE routing replay and per-expert load counts, hooked into Megatron-Core's ``TopKRouter``.

Why replay: an MoE policy's log-prob depends on which experts each token visits. When the trainer's
weights drift, a token can switch experts, and that discrete change shows up in ``log pi - log mu``
as if the policy had moved; replaying the behaviour pass's expert choice in training keeps |log W| to
the change of the experts' and router's outputs (docs/routing_replay.md).

The hook: Megatron-Core's (0.16.1 and 0.19.2) ``topk_routing_with_score_function`` takes every top-k through
``router.router_replay.get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)``
when a router has a ``router_replay`` object. :class:`RoutingRecorder` plugs one :class:`_LayerRouting`
per router of this rank's model chunks into that slot (per-router state, not Megatron's process-global
``RouterReplay`` list, so several models in one process never share it). In every mode the router
still computes its logits, scores, aux loss and probabilities from the current weights; only the
choice of experts can be forced:

- ``off``: Megatron's own top-k (the hook is transparent);
- ``record``: Megatron's top-k, and the chosen expert indices ``[tokens, topk]`` of every call are
  kept in call order (= micro-batch order for every model chunk);
- ``replay``: the recorded indices of the next micro-batch are used, and the combine weights are the
  current scores gathered at those experts, so gradients flow through the router's probabilities of
  the *recorded* experts. Slots holding :func:`unrouted` (tokens the recording never routed, e.g. the
  padding of a rollout recorded by the KV-cache sampler) take the router's own top-k.

Keying: the tokens a router sees are this rank's local ``[s_local, b]`` tokens flattened
sequence-major (``s_local = seq_length / (cp * tp)`` with sequence parallelism). Recorded choices are
turned back into ``[b, layers_local, s_local, topk]`` per micro-batch and concatenated over sequences
(:meth:`RoutingRecorder.recorded_indices`), so the rollout stores them per sequence and a training
micro-batch made of any rows replays them; every rank of a TP/CP/EP/PP grid keeps only its own
tokens and its own layers.

Load counts: while :meth:`RoutingRecorder.counting_load` is active, every routed (token, expert) slot
is counted per layer; :meth:`RoutingRecorder.load_metrics` sums them over all ranks and returns the
logger's ``moe/*`` keys.
"""

from __future__ import annotations

import weakref
from collections import deque
from contextlib import contextmanager
from enum import Enum
from typing import Optional

import torch

PER_EXPERT_KEYS_MAX = 128
"""Per-expert ``moe/expert_load_L{l}_E{e}`` keys are logged only while layers x experts stays below this."""


class RoutingMode(Enum):
    OFF = "off"
    RECORD = "record"
    REPLAY = "replay"


# ----------------------------------------------------------------------------------- pure layout helpers


def tokens_to_sequences(indices: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[s * b, k]`` router-order choices (sequence-major, Megatron's ``[s, b]`` flattened) -> ``[b, s, k]``."""
    tokens, topk = indices.shape
    if tokens % batch_size:
        raise ValueError(f"{tokens} routed tokens are not a multiple of the micro-batch size {batch_size}")
    return indices.view(tokens // batch_size, batch_size, topk).transpose(0, 1)


def sequences_to_tokens(indices: torch.Tensor) -> torch.Tensor:
    """``[b, s, k]`` per-sequence choices -> ``[s * b, k]`` in the order the router sees its tokens."""
    return indices.transpose(0, 1).reshape(-1, indices.shape[-1])


def index_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer dtype that holds an expert index and :func:`unrouted` (the rollout field's dtype)."""
    return torch.uint8 if num_experts < 256 else torch.int16


def unrouted(dtype: torch.dtype) -> int:
    """The fill value of a recorded slot the sampler never routed (e.g. padding): replay routes it freely."""
    return torch.iinfo(dtype).max


def load_summary(counts: torch.Tensor, layer_numbers: list[int], per_expert: bool) -> dict[str, float]:
    """Logger keys from ``[layers, experts]`` routed-slot counts (``layer_numbers`` are 1-based)."""
    out: dict[str, float] = {}
    ratios = []
    for row, layer in zip(counts.double(), layer_numbers):
        total = float(row.sum())
        if total <= 0:
            continue
        ratio = float(row.max()) / (total / row.numel())
        ratios.append(ratio)
        out[f"moe/load_max_over_mean_L{layer}"] = ratio
        if per_expert:
            for expert, count in enumerate(row.tolist()):
                out[f"moe/expert_load_L{layer}_E{expert}"] = count / total
    if ratios:
        out["moe/load_max_over_mean"] = max(ratios)
    return out


# ------------------------------------------------------------------------------------------ the hooks


class _LayerRouting:
    """One router's replay slot; Megatron calls :meth:`get_replay_topk` for every top-k it takes."""

    def __init__(self, recorder: "RoutingRecorder", layer_number: int):
        self.recorder = recorder
        self.layer_number = layer_number
        self.recorded: list[torch.Tensor] = []
        self.targets: deque = deque()
        self.load: Optional[torch.Tensor] = None
        self.changed = torch.zeros(2, dtype=torch.float64)
        """[tokens whose free top-k set differs from the replayed one, tokens replayed] while counting."""
        self.mismatch = torch.zeros(2, dtype=torch.float64)
        """The same pair while the recorder is ``measuring_mismatch`` (sampler vs trainer routing)."""

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        mode = self.recorder.mode
        if mode is RoutingMode.REPLAY:
            values, indices = self._replayed(scores, topk, num_groups, group_topk, default_compute_topk)
        else:
            values, indices = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
            if mode is RoutingMode.RECORD:
                self.recorded.append(indices.detach().to("cpu", self.recorder.dtype))
        if self.recorder.counting:
            counts = torch.bincount(indices.detach().reshape(-1).cpu(), minlength=scores.shape[1]).double()
            self.load = counts if self.load is None else self.load + counts
        return values, indices

    def _replayed(self, scores, topk, num_groups, group_topk, default_compute_topk):
        if not self.targets:
            raise RuntimeError(f"routing replay: layer {self.layer_number} was called more often than micro-batches "
                               "were recorded (replay needs one forward per micro-batch, in micro-batch order)")
        target = self.targets.popleft()
        if tuple(target.shape) != (scores.shape[0], topk):
            raise RuntimeError(f"routing replay: layer {self.layer_number} routes {scores.shape[0]} tokens x "
                               f"top-{topk} but the recorded micro-batch has {tuple(target.shape)}; the rollout "
                               "was recorded with another layout or sequence length")
        with torch.no_grad():
            _, free = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        routed = target[:, 0] != unrouted(target.dtype)  # slots the recording never routed go free
        indices = torch.where(routed.unsqueeze(1).to(scores.device), target.to(device=scores.device,
                              dtype=torch.long), free)
        if self.recorder.counting or self.recorder.measuring:
            moved = (free.sort(dim=1).values != indices.sort(dim=1).values).any(dim=1) & routed.to(scores.device)
            pair = torch.tensor([float(moved.sum()), float(routed.sum())], dtype=torch.float64)
            if self.recorder.counting:
                self.changed += pair
            if self.recorder.measuring:
                self.mismatch += pair
        return scores.gather(1, indices), indices


class RoutingRecorder:
    """Record / replay / count the expert choices of every ``TopKRouter`` in this rank's model chunks."""

    def __init__(self, chunks: list, num_layers: int, num_experts: int):
        from megatron.core.transformer.moe.router import TopKRouter
        from megatron.core.transformer.moe.router_replay import RouterReplay

        self.num_layers = num_layers
        self.num_experts = num_experts
        self.dtype = index_dtype(num_experts)
        self.mode = RoutingMode.OFF
        self.counting = False
        self.measuring = False
        self.layers: list[_LayerRouting] = []
        for chunk in chunks:  # chunk-major, then layer order: the order of the recorded layers dimension
            for module in chunk.modules():
                if not isinstance(module, TopKRouter):
                    continue
                cfg = module.config
                if cfg.moe_router_fusion or module.routing_type == "sinkhorn":
                    raise ValueError("routing replay and load metrics need Megatron's unfused top-k routing; "
                                     "set moe_router_fusion=False and a load-balancing type other than sinkhorn")
                if isinstance(module.router_replay, RouterReplay):
                    raise ValueError("the model was built with Megatron's moe_enable_routing_replay; "
                                     "use rollout.routing_replay instead and leave that flag off")
                slot = _LayerRouting(self, int(module.layer_number))
                module.router_replay = slot
                self.layers.append(slot)

    @property
    def layer_numbers(self) -> list[int]:
        """1-based global layer number of each local router, in the recorded layers order."""
        return [slot.layer_number for slot in self.layers]

    # ------------------------------------------------------------------------------- record / replay

    @contextmanager
    def recording(self):
        """Record every router call's expert choice (the behaviour pass)."""
        for slot in self.layers:
            slot.recorded = []
        self.mode = RoutingMode.RECORD
        try:
            yield self
        finally:
            self.mode = RoutingMode.OFF

    def take_recorded(self) -> list[list[torch.Tensor]]:
        """Per local router, the ``[tokens, topk]`` choices recorded since the last call (and forget them)."""
        taken = [slot.recorded for slot in self.layers]
        for slot in self.layers:
            slot.recorded = []
        return taken

    def recorded_indices(self, micro_batches: list[dict]) -> Optional[torch.Tensor]:
        """``[n, layers_local, s_local, topk]`` choices of the recorded micro-batches (None: no local router)."""
        if not self.layers:
            return None
        sizes = [int(batch["tokens"].shape[0]) for batch in micro_batches]
        per_layer = []
        for slot in self.layers:
            if len(slot.recorded) != len(sizes):
                raise RuntimeError(f"routing record: layer {slot.layer_number} ran {len(slot.recorded)} times "
                                   f"for {len(sizes)} micro-batches")
            per_layer.append(torch.cat([tokens_to_sequences(ind, b) for ind, b in zip(slot.recorded, sizes)]))
            slot.recorded = []
        return torch.stack(per_layer, dim=1).contiguous()

    @contextmanager
    def replaying(self, per_micro_batch: list[torch.Tensor]):
        """Force the experts of each micro-batch (``[b, layers_local, s_local, topk]`` each, in schedule order)."""
        for layer, slot in enumerate(self.layers):
            slot.targets = deque(sequences_to_tokens(mb[:, layer]) for mb in per_micro_batch)
        self.mode = RoutingMode.REPLAY
        try:
            yield self
            left = {slot.layer_number: len(slot.targets) for slot in self.layers if slot.targets}
            if left:
                raise RuntimeError(f"routing replay: micro-batches left unused per layer {left}")
        finally:
            self.mode = RoutingMode.OFF
            for slot in self.layers:
                slot.targets = deque()

    @contextmanager
    def training_pass(self, micro_batches: list[dict]):
        """Count load during a training step; replay when the micro-batches carry ``routing_indices``."""
        recorded = [batch.get("routing_indices") for batch in micro_batches]
        replay = any(r is not None for r in recorded)
        if replay and any(r is None for r in recorded):
            raise ValueError("routing replay: some micro-batches carry routing_indices and some do not")
        with self.counting_load():
            if replay and self.layers:
                with self.replaying(recorded):
                    yield self
            else:
                yield self

    # ------------------------------------------------------------------------------------ load metrics

    @contextmanager
    def counting_load(self):
        self.counting = True
        try:
            yield self
        finally:
            self.counting = False

    @contextmanager
    def measuring_mismatch(self):
        """Count, per replayed slot, whether the router's own top-k differs from the recorded experts."""
        self.measuring = True
        try:
            yield self
        finally:
            self.measuring = False

    def mismatch_fraction(self, group=None) -> Optional[float]:
        """Share of recorded (token, layer) slots whose free choice differed, summed over ``group`` (collective).

        Reset after reading; None when nothing was replayed.
        """
        import torch.distributed as dist

        from vespo_megatron.runtime.distributed import collective_device

        pair = torch.zeros(2, dtype=torch.float64)
        for slot in self.layers:
            pair += slot.mismatch
            slot.mismatch = torch.zeros(2, dtype=torch.float64)
        if dist.is_initialized():
            pair = pair.to(collective_device(group))
            dist.all_reduce(pair, group=group)
            pair = pair.cpu()
        return float(pair[0] / pair[1]) if pair[1] > 0 else None

    def load_metrics(self, group=None) -> dict[str, float]:
        """Routed slots per expert per layer since the last call, summed over ``group`` (collective).

        ``group`` must hold every rank that routes tokens of any layer (the default: all ranks); each
        layer's counts are then summed over the TP x CP x DP (x EP) ranks of its pipeline stage. The
        counts are reset.
        """
        import torch.distributed as dist

        from vespo_megatron.runtime.distributed import collective_device

        counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
        changed = torch.zeros(2, dtype=torch.float64)
        for slot in self.layers:
            if slot.load is not None:
                counts[slot.layer_number - 1] += slot.load
            changed += slot.changed
            slot.load, slot.changed = None, torch.zeros(2, dtype=torch.float64)
        flat = torch.cat([counts.reshape(-1), changed])
        if dist.is_initialized():
            flat = flat.to(collective_device(group))
            dist.all_reduce(flat, group=group)
            flat = flat.cpu()
        counts, changed = flat[:-2].view(self.num_layers, self.num_experts), flat[-2:]
        per_expert = self.num_layers * self.num_experts <= PER_EXPERT_KEYS_MAX
        out = load_summary(counts, list(range(1, self.num_layers + 1)), per_expert)
        if changed[1] > 0:
            out["moe/replay_changed_frac"] = float(changed[0] / changed[1])
        return out


# --------------------------------------------------------------------------------- per-engine access

_RECORDERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def routing_recorder(engine) -> Optional[RoutingRecorder]:
    """The recorder attached to ``engine``'s chunks (made on first use); None for a dense model."""
    model = engine.config.model
    if not model.is_moe:
        return None
    key = engine.chunks[0]
    recorder = _RECORDERS.get(key)
    if recorder is None:
        recorder = RoutingRecorder(engine.chunks, num_layers=model.num_layers, num_experts=model.num_experts)
        _RECORDERS[key] = recorder
    return recorder


def routing_load_metrics(engine) -> dict[str, float]:
    """The ``moe/*`` metrics of the training passes since the last call (collective; {} for dense models)."""
    recorder = routing_recorder(engine)
    return {} if recorder is None else recorder.load_metrics()
