"""What a checkpoint load may unpickle: nothing but tensors, plain values and DCP's own metadata records.

Every file of a checkpoint that is a pickle is read here first: the rank files and Megatron's legacy
``common.pt`` with ``torch.load(weights_only=True)``, and torch.distributed.checkpoint's ``.metadata``
(which torch itself reads with a plain ``pickle.load``) with an allow-listed unpickler. A file that
would need any other object raises :class:`UnsafeCheckpointError` before any of it reaches torch.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file would need unpickling of objects outside the allowed set."""


def load_weights_only(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, else UnsafeCheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{path} holds objects a weights-only load refuses; it was not "
                                    f"written by vespo_megatron or was tampered with: {exc}") from exc


# What torch.distributed.checkpoint writes into ``.metadata`` (a pickle that torch reads with a plain
# ``pickle.load``): its metadata/planner dataclasses and enums, torch.Size, dtypes and layouts. None of
# these runs code beyond a generated __init__ or a name lookup when unpickled.
_DCP_RECORD_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        import dataclasses
        import enum

        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module in _DCP_RECORD_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"checkpoint metadata references {module}.{name}, which a "
                                    "torch.distributed.checkpoint .metadata file never holds")


def check_dcp_metadata(path: Path) -> None:
    """Unpickle a torch.distributed.checkpoint ``.metadata`` file with an allow-list; raise if it strays.

    torch reads that file with ``pickle.load``; this check runs first, so a file that names any
    other global never reaches torch.
    """
    try:
        with open(path, "rb") as handle:
            _MetadataUnpickler(handle).load()
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
        raise UnsafeCheckpointError(f"{path} is not a readable checkpoint metadata file: {exc}") from exc
