"""Megatron-Core on machines without CUDA: one shim per upstream function that assumes a GPU.

Megatron-Core's model, schedules, DDP, optimizer and dist-checkpointing run unchanged on CPU with the
gloo backend once a handful of CUDA-only calls are redirected. Each shim is named after the
upstream function (or attribute) it replaces, is applied only when CUDA is absent (``apply_cpu_compat``
is a no-op on a GPU machine), and is idempotent. ``patches/`` holds the same fixes as source patches
for users who prefer to patch a Megatron-LM checkout; docs/parallelism.md lists both.

Shims (id, upstream target):

- P1  ``torch.cuda.current_device``: buffers are allocated on ``torch.cuda.current_device()``.
- P2  ``tensor_parallel.random.CudaRNGStatesTracker`` / ``_get_cuda_rng_state`` / ``_set_cuda_rng_state``:
      the model-parallel RNG tracker forks CUDA generator states; on CPU it forks the CPU generator.
- P3  ``transformer.utils.get_default_causal_mask``: builds the mask with ``device="cuda"``.
- P5  ``torch.cuda.Stream`` and friends: MoE layers, DDP grad sync, batched p2p and dist-ckpt create or
      wait on streams/events.
- P7  ``transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu``: only moves CUDA tensors, so CPU
      split sizes stay tensors and ``all_to_all_single`` rejects them.
- P8  ``tensor_parallel.mappings._gather_along_first_dim`` / ``_reduce_scatter_along_first_dim`` with
      uneven split sizes: gloo has no uneven all-gather/reduce-scatter.
- P10 ``torch`` tensor factories and ``Tensor.cuda``: schedules, the optimizer (grad norm, clipping,
      grad-norm groups) and dist-ckpt hard-code ``device="cuda"``.
- P11 ``torch.Tensor.type``: Megatron checks ``param.type() == 'torch.cuda.FloatTensor'``.
- P12 ``dist_checkpointing.strategies.filesystem_async.get_write_results_queue``: spawns a
      ``multiprocessing.Manager`` that re-imports ``__main__`` for every synchronous save.

The shims target megatron-core 0.19.2. Ids are stable across versions, so three are missing: P4 was
never a shim (a layer-spec choice, ``models/norms.py``); P6 went because
``moe_utils`` now binds ``te_general_gemm = None`` without Transformer Engine and falls back to
``torch.mm``; P9 went with the legacy ``GroupedMLP`` (grouped-GEMM experts are Transformer Engine
only, so ``model.moe_grouped_gemm`` must be false on CPU).

Modules, one per shim family: :mod:`.devices` (P1, P10, P11), :mod:`.rng` (P2), :mod:`.streams` (P5),
:mod:`.megatron_ops` (P3, P7, P8), :mod:`.checkpoint_queue` (P12), :mod:`.base` (what they share) and
:mod:`.bridge` (Megatron-Bridge without Transformer Engine, not a CPU shim).
"""

from __future__ import annotations

import torch

from vespo_megatron.runtime.compat.base import APPLIED, Shim
from vespo_megatron.runtime.compat.bridge import allow_bridge_without_transformer_engine
from vespo_megatron.runtime.compat.checkpoint_queue import shim_write_results_queue
from vespo_megatron.runtime.compat.devices import shim_cuda_device_factories, shim_current_device, shim_tensor_type
from vespo_megatron.runtime.compat.megatron_ops import (
    shim_get_default_causal_mask,
    shim_maybe_move_tensor_to_cpu,
    shim_uneven_split_mappings,
)
from vespo_megatron.runtime.compat.rng import shim_cuda_rng_states_tracker
from vespo_megatron.runtime.compat.streams import shim_cuda_streams

SHIMS: tuple[Shim, ...] = (
    Shim("P1", "torch.cuda.current_device", shim_current_device),
    Shim("P2", "megatron.core.tensor_parallel.random.CudaRNGStatesTracker", shim_cuda_rng_states_tracker),
    Shim("P3", "megatron.core.transformer.utils.get_default_causal_mask", shim_get_default_causal_mask),
    Shim("P5", "torch.cuda.Stream", shim_cuda_streams),
    Shim(
        "P7",
        "megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu",
        shim_maybe_move_tensor_to_cpu,
    ),
    Shim("P8", "megatron.core.tensor_parallel.mappings._gather_along_first_dim", shim_uneven_split_mappings),
    Shim("P10", "torch.zeros(..., device='cuda') and other factories", shim_cuda_device_factories),
    Shim("P11", "torch.Tensor.type", shim_tensor_type),
    Shim(
        "P12",
        "megatron.core.dist_checkpointing.strategies.filesystem_async.get_write_results_queue",
        shim_write_results_queue,
    ),
)


def cpu_compat_needed() -> bool:
    """True when CUDA is absent, i.e. Megatron-Core must run on CPU with gloo."""
    return not torch.cuda.is_available()


def apply_cpu_compat(force: bool = False) -> list[str]:
    """Apply every shim (once) when CUDA is absent; return the ids applied by this process so far."""
    if force or cpu_compat_needed():
        for shim in SHIMS:
            shim.apply()
    return sorted(APPLIED)


def applied_shims() -> list[str]:
    return sorted(APPLIED)


__all__ = [
    "SHIMS", "Shim", "allow_bridge_without_transformer_engine", "applied_shims", "apply_cpu_compat",
    "cpu_compat_needed", "shim_cuda_device_factories", "shim_cuda_rng_states_tracker", "shim_cuda_streams",
    "shim_current_device", "shim_get_default_causal_mask", "shim_maybe_move_tensor_to_cpu", "shim_tensor_type",
    "shim_uneven_split_mappings", "shim_write_results_queue",
]  # fmt: skip
