"""CUDA streams and events as no-ops (P5): on CPU every operation is already in order."""

from __future__ import annotations

import contextlib

import torch

from vespo_megatron.runtime.compat.base import once


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


@once("P5")
def shim_cuda_streams() -> None:
    null_stream = _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = lambda *args, **kwargs: _NullEvent()
    torch.cuda.current_stream = lambda device=None: null_stream
    torch.cuda.default_stream = lambda device=None: null_stream
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None
