"""The Megatron-Bridge import shim for machines without Transformer Engine (runtime/compat/bridge.py)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from vespo_megatron.runtime import compat


def test_bridge_imports_without_te_and_te_stays_absent():
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed: the shim is never active")
    from vespo_megatron.models.hf import auto_bridge_class

    assert auto_bridge_class().__name__ == "AutoBridge"
    lora_layers = sys.modules["megatron.bridge.peft.lora_layers"]
    assert "transformer_engine" not in sys.modules  # guarded imports elsewhere still see no TE
    assert not isinstance(object(), lora_layers.te.Linear)
    with pytest.raises(RuntimeError, match="needs Transformer Engine"):
        lora_layers.te.ops.Sequential()


def test_shim_does_nothing_when_te_is_installed(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "transformer_engine":
            return importlib.util.spec_from_loader("transformer_engine", loader=None)
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    finders = list(sys.meta_path)
    assert compat.allow_bridge_without_transformer_engine() is False
    assert sys.meta_path == finders
