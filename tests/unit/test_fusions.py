"""Kernel fusions of the built TransformerConfig: off on CPU, Megatron's training defaults on a (mocked) CUDA
device, each where its kernel exists (models/gpt.py: fusion_settings)."""

from __future__ import annotations

from unittest import mock

import pytest

from vespo_megatron.config import load_config
from vespo_megatron.models import gpt

FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "apply_rope_fusion",
           "gradient_accumulation_fusion", "persist_layer_norm")


def _built(overrides, cuda):
    with mock.patch("torch.cuda.is_available", return_value=cuda):
        return gpt.transformer_config(load_config(None, overrides), 64)


def test_cpu_builds_without_fusions():
    tconfig = _built([], cuda=False)
    assert {name: getattr(tconfig, name) for name in FUSIONS} == dict.fromkeys(FUSIONS, False)
    assert tconfig.use_cpu_initialization


@pytest.mark.parametrize("swiglu", [True, False])
def test_mocked_cuda_keeps_megatrons_kernel_free_fusions(swiglu):
    # No Transformer Engine or apex here: the fusions megatron-core runs with its own (jit) kernels are on.
    with mock.patch.object(gpt, "_importable", return_value=False):
        tconfig = _built([f"model.swiglu={str(swiglu).lower()}", "model.add_bias_linear=true"], cuda=True)
    assert tconfig.bias_activation_fusion and tconfig.bias_dropout_fusion and tconfig.masked_softmax_fusion
    assert not tconfig.apply_rope_fusion and not tconfig.gradient_accumulation_fusion
    assert not tconfig.persist_layer_norm and not tconfig.use_cpu_initialization


def test_gelu_without_bias_keeps_bias_activation_fusion_off():
    # Megatron refuses bias-activation fusion for plain GELU without a bias; the settings follow its rule.
    with mock.patch.object(gpt, "_importable", return_value=False):
        tconfig = _built(["model.swiglu=false", "model.add_bias_linear=false"], cuda=True)
    assert not tconfig.bias_activation_fusion and tconfig.masked_softmax_fusion


def test_with_transformer_engine_and_apex_every_fusion_is_on():
    # The TransformerConfig itself needs TE's fused RoPE kernel to accept apply_rope_fusion, so the settings
    # are checked here as the builder passes them.
    config = load_config(None, ["model.transformer_impl=transformer_engine"])
    with mock.patch.object(gpt, "_importable", return_value=True), \
            mock.patch.object(gpt, "transformer_engine_available", return_value=True):
        assert gpt.fusion_settings(config, on_gpu=True) == dict.fromkeys(FUSIONS, True)
        local = load_config(None, ["model.transformer_impl=local"])
        settings = gpt.fusion_settings(local, on_gpu=True)
    assert not settings["apply_rope_fusion"]  # the local spec's KV-cache attention rotates keys itself
    assert settings["gradient_accumulation_fusion"]  # apex's fused_weight_gradient_mlp_cuda (mocked)
