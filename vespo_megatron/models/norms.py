"""A norm that works with sequence parallelism without Apex or Transformer Engine.

Megatron's ``WrappedTorchNorm`` refuses sequence parallelism and ``FusedLayerNorm`` needs Apex. With
sequence parallelism each TP rank normalises a different slice of tokens with the same weights, so the
weight gradients are partial sums that must be all-reduced over TP. Marking the parameters
``sequence_parallel`` makes Megatron's ``finalize_model_grads`` do that reduction.
"""

from __future__ import annotations

import torch


class SequenceParallelNorm:
    """Factory with Megatron's norm-module signature; returns ``torch.nn.RMSNorm`` or ``LayerNorm``.

    It is a class (not a function) because Megatron's ``build_module`` instantiates classes but returns
    plain functions uncalled.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
