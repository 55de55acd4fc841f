"""Device shims: where buffers go (P1), tensor factories and ``.cuda()`` / ``.to()`` (P10), CUDA type names (P11)."""

from __future__ import annotations

import functools

import torch

from vespo_megatron.runtime.compat.base import cpu_device, once


# ---------------------------------------------------------------------------------------------- P1


@once("P1")
def shim_current_device() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")


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
            kwargs["device"] = cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # pinning needs a CUDA allocator
        return factory(*args, **kwargs)

    wrapper.__vespo_cpu_redirect__ = True
    return wrapper


@once("P10")
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
            args = (cpu_device(args[0]),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = cpu_device(kwargs["device"])
        return upstream_to(self, *args, **kwargs)

    torch.Tensor.to = to


# ---------------------------------------------------------------------------------------------- P11

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


@once("P11")
def shim_tensor_type() -> None:
    upstream_type = torch.Tensor.type

    @functools.wraps(upstream_type)
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return upstream_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
