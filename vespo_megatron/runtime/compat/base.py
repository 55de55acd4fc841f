"""What every CPU shim shares: the ``Shim`` record, the once-only guard and the CUDA -> CPU device map."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Shim:
    """One CPU replacement for a CUDA-only upstream function."""

    shim_id: str
    upstream: str
    apply: Callable[[], None]


APPLIED: set[str] = set()


def once(shim_id: str):
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper():
            if shim_id in APPLIED:
                return
            fn()
            APPLIED.add(shim_id)

        return wrapper

    return decorate


def cpu_device(device):
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
