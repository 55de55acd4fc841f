"""Process-wide state Megatron-Core keeps outside any model, cleared between engines.

Several engines can live one after another in one process (the staleness study builds one per cell,
tests build many). Megatron-Core keeps some state at module or class level that outlives a model:

* the MoE metrics tracker (``moe_logging``): per-layer aux-loss sums sized by the first model's layer
  count and holding its process groups; a later model with more layers indexes past the end;
* the aux-loss autograd scalers' ``main_loss_backward_scale`` (MoE, MTP): a tensor the schedule sets
  per micro-batch, left over from the previous model until then.

The process groups and the global memory buffer are rebuilt by ``initialize_model_parallel`` and the
RNG tracker by ``seed_everything`` (runtime/distributed.py), so they need nothing here.
"""

from __future__ import annotations

import torch


def reset_megatron_globals() -> None:
    """Drop the MoE metrics tracker and the aux-loss scalers' backward scales (safe when unused)."""
    from megatron.core.transformer.moe import moe_logging
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    moe_logging.destroy_moe_metrics_tracker()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    try:
        from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler
    except ImportError:  # an older or trimmed megatron-core without multi-token prediction
        return
    MTPLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0)  # its class default
