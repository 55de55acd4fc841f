"""Megatron-Core on machines without CUDA: one shim per upstream function that assumes a GPU.

Megatron-Core's model, schedules, DDP, optimizer and dist-checkpointing run unchanged on CPU with the
gloo backend once a handful of CUDA-only calls are redirected. Each shim below is named after the
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
"""

from __future__ import annotations

import contextlib
import functools
import queue
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Shim:
    """One CPU replacement for a CUDA-only upstream function."""

    shim_id: str
    upstream: str
    apply: Callable[[], None]


_APPLIED: set[str] = set()


def _once(shim_id: str):
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper():
            if shim_id in _APPLIED:
                return
            fn()
            _APPLIED.add(shim_id)

        return wrapper

    return decorate


def _cpu_device(device):
    """Map any CUDA device spec (``"cuda"``, ``"cuda:0"``, ``torch.device('cuda')``, an int) to CPU."""
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


# ---------------------------------------------------------------------------------------------- P1


@_once("P1")
def shim_current_device() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")


# ---------------------------------------------------------------------------------------------- P2


@_once("P2")
def shim_cuda_rng_states_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    upstream = mrandom.CudaRNGStatesTracker

    class CpuRNGStatesTracker(upstream):
        """Model-parallel RNG tracker over the CPU generator (same semantics as the CUDA one)."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise RuntimeError(f"seed {seed} already exists")
            if name in self.states_:
                raise RuntimeError(f"cuda rng state {name} already exists")
            self._is_initialized = True
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.seeds_.add(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            # Upstream's fork, minus its "CPU RNG state changed" warning: here the forked generator
            # is the CPU one, so it changes on every fork by design. Nested forks keep the outer
            # state by name, as upstream does.
            if name not in self.states_:
                raise RuntimeError(f"rng state {name} is not added")
            outer_name = getattr(self, "_current_state_name", "default-rng")
            saved = torch.get_rng_state()
            if outer_name != "default-rng":
                self.states_[outer_name] = saved
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    saved = self.states_[outer_name]
                torch.set_rng_state(saved)
                self._current_state_name = outer_name

    def get_state(device=-1, clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.initialize_rng_tracker(force_reset=True)


# ---------------------------------------------------------------------------------------------- P3


@_once("P3")
def shim_get_default_causal_mask() -> None:
    from megatron.core.transformer import utils as tutils

    @functools.lru_cache(maxsize=8)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    def get_sliding_window_causal_mask(sq, skv, window_size):
        ones = torch.ones(sq, skv, dtype=torch.bool)
        upper = torch.triu(ones, diagonal=skv - sq - window_size[0])
        return ~torch.tril(upper, diagonal=skv - sq + window_size[1])

    tutils.get_default_causal_mask = get_default_causal_mask
    tutils.get_sliding_window_causal_mask = get_sliding_window_causal_mask
    try:
        from megatron.core.fusions import fused_softmax
    except ImportError:
        return
    if hasattr(fused_softmax, "get_default_causal_mask"):
        fused_softmax.get_default_causal_mask = get_default_causal_mask
    if hasattr(fused_softmax, "get_sliding_window_causal_mask"):
        fused_softmax.get_sliding_window_causal_mask = get_sliding_window_causal_mask


# ---------------------------------------------------------------------------------------------- P5


class _NullEvent:
    def record(self, stream=None):
        return None

    def synchronize(self):
        return None

    def wait(self, stream=None):
        return None

    def query(self):
        return True


class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        return None

    def wait_event(self, event):
        return None

    def record_event(self, event=None):
        return event if event is not None else _NullEvent()

    def synchronize(self):
        return None

    def query(self):
        return True


@_once("P5")
def shim_cuda_streams() -> None:
    null_stream = _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = lambda *args, **kwargs: _NullEvent()
    torch.cuda.current_stream = lambda device=None: null_stream
    torch.cuda.default_stream = lambda device=None: null_stream
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None


# ---------------------------------------------------------------------------------------------- P7


@_once("P7")
def shim_maybe_move_tensor_to_cpu() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if not torch.is_tensor(tensor):
            return tensor
        tensor = tensor.cpu()
        return tensor.numpy() if as_numpy else tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# ---------------------------------------------------------------------------------------------- P8


@_once("P8")
def shim_uneven_split_mappings() -> None:
    from megatron.core.tensor_parallel import mappings

    upstream_gather = mappings._gather_along_first_dim
    upstream_reduce_scatter = mappings._reduce_scatter_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None:
            return upstream_gather(input_, group, None, use_global_buffer)
        world = torch.distributed.get_world_size(group)
        if world == 1:
            return input_
        sizes = [int(s) for s in output_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        chunks = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(chunks, padded.contiguous(), group=group)
        return torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes)], dim=0)

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None:
            return upstream_reduce_scatter(input_, group, None, use_global_buffer)
        world = torch.distributed.get_world_size(group)
        if world == 1:
            return input_
        total = input_.clone().contiguous()
        torch.distributed.all_reduce(total, group=group)
        rank = torch.distributed.get_rank(group)
        sizes = [int(s) for s in input_split_sizes]
        start = sum(sizes[:rank])
        return total[start : start + sizes[rank]].contiguous()

    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim


# ---------------------------------------------------------------------------------------------- P10

_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint", "randperm",
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "as_tensor",
    "linspace", "eye", "empty_strided",
)  # fmt: skip


def _redirect_device(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # pinning needs a CUDA allocator
        return factory(*args, **kwargs)

    wrapper.__vespo_cpu_redirect__ = True
    return wrapper


@_once("P10")
def shim_cuda_device_factories() -> None:
    for name in _FACTORIES:
        factory = getattr(torch, name)
        if not getattr(factory, "__vespo_cpu_redirect__", False):
            setattr(torch, name, _redirect_device(factory))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    upstream_to = torch.Tensor.to

    @functools.wraps(upstream_to)
    def to(self, *args, **kwargs):
        if args and (isinstance(args[0], (str, torch.device)) or (isinstance(args[0], int) and len(args) == 1)):
            args = (_cpu_device(args[0]),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return upstream_to(self, *args, **kwargs)

    torch.Tensor.to = to


# ---------------------------------------------------------------------------------------------- P11

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


@_once("P11")
def shim_tensor_type() -> None:
    upstream_type = torch.Tensor.type

    @functools.wraps(upstream_type)
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return upstream_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_


# ---------------------------------------------------------------------------------------------- P12


@_once("P12")
def shim_write_results_queue() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    in_process_queue = queue.Queue()

    def get_write_results_queue(mp_mode: str = "spawn"):
        return in_process_queue

    filesystem_async.get_write_results_queue = get_write_results_queue


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
    return sorted(_APPLIED)


def applied_shims() -> list[str]:
    return sorted(_APPLIED)


# ------------------------------------------------------------------ Megatron-Bridge without TE


def allow_bridge_without_transformer_engine() -> bool:
    """Let ``megatron.bridge`` import on a machine without Transformer Engine; True when it did anything.

    Upstream module: ``megatron.bridge.peft.lora_layers`` (Megatron-Bridge 0.6.2) runs
    ``import transformer_engine.pytorch as te`` at import time, and the bridge's conversion package
    imports it unconditionally (``conversion/peft_bridge.py`` -> ``peft/canonical_lora.py``), so
    ``from megatron.bridge import AutoBridge`` fails without TE although HF <-> Megatron weight
    conversion never touches TE. We load that one module from its own source with a private
    ``__import__`` that answers the ``transformer_engine`` import with a stand-in whose classes
    match nothing (``isinstance`` is False) and raise if instantiated. ``sys.modules`` never gets a
    ``transformer_engine`` entry, so every other ``try: import transformer_engine`` still sees TE as
    absent. Never active when real TE is importable. patches/bridge-without-te.md explains more.
    """
    import builtins
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import sys
    import types

    target = "megatron.bridge.peft.lora_layers"
    if importlib.util.find_spec("transformer_engine") is not None:
        return False
    if target in sys.modules or any(getattr(f, "vespo_bridge_without_te", False) for f in sys.meta_path):
        return True

    class _Absent(types.ModuleType):
        """``transformer_engine`` / ``.pytorch`` / ``.pytorch.ops`` stand-in: every attribute is a class
        that no object is an instance of, and that refuses to be built."""

        def __getattr__(self, name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            if name in ("pytorch", "ops"):
                value = _Absent(f"{self.__name__}.{name}")
            else:
                def refuse(*_args, _name=f"{self.__name__}.{name}", **_kwargs):
                    raise RuntimeError(f"{_name} needs Transformer Engine, which is not installed "
                                       "(Megatron-Bridge LoRA fused paths); install transformer-engine")

                value = type(name, (), {"__new__": staticmethod(refuse)})
            setattr(self, name, value)
            return value

    stand_in = _Absent("transformer_engine")
    real_import = builtins.__import__

    def private_import(name, globals_=None, locals_=None, fromlist=(), level=0):
        if level == 0 and (name == "transformer_engine" or name.startswith("transformer_engine.")):
            return stand_in
        return real_import(name, globals_, locals_, fromlist, level)

    class _Loader(importlib.machinery.SourceFileLoader):
        def exec_module(self, module):
            namespace = dict(vars(builtins))
            namespace["__import__"] = private_import
            module.__builtins__ = namespace
            code = self.get_code(module.__name__)
            exec(code, module.__dict__)  # noqa: S102 - the upstream module's own source

    class _Finder(importlib.abc.MetaPathFinder):
        vespo_bridge_without_te = True

        def find_spec(self, fullname, path=None, target_module=None):
            if fullname != target:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target_module)
                if spec is not None and spec.origin:
                    return importlib.util.spec_from_file_location(
                        fullname, spec.origin, loader=_Loader(fullname, spec.origin))
            return None

    sys.meta_path.insert(0, _Finder())
    return True
