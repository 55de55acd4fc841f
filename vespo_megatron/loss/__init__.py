"""The VESPO loss library: the phi kernel, VESPO and baseline policy losses, aggregation, metrics.

Formulas and properties: docs/loss.md. Everything exported here is pure tensor math; the
distributed log-prob and per-sequence all-reduce path lives in its own modules of this package.
"""

from vespo_megatron.loss.aggregate import (
    AGGREGATION_MODES,
    REFERENCE_AGGREGATION,
    aggregate_sequence_loss,
    aggregate_token_loss,
    reference_aggregation,
)
from vespo_megatron.loss.kernel import (
    LOG_RATIO_CLAMP,
    LOG_W_CLAMP,
    clamp_log_w,
    phi_peak,
    sequence_log_ratio,
    train_inference_log_correction,
    train_inference_token_log_correction,
    vespo_log_w,
    vespo_phi,
)
from vespo_megatron.loss.policy import (
    POLICY_LOSSES,
    CispoParams,
    CorrectionParams,
    GrpoParams,
    GspoParams,
    PolicyLoss,
    PolicyLossInputs,
    PolicyLossOutput,
    PolicyLossParams,
    SapoParams,
    SequenceLossOutput,
    VespoParams,
    get_policy_loss,
    vespo_sequence_loss,
)

__all__ = [
    "AGGREGATION_MODES",
    "REFERENCE_AGGREGATION",
    "LOG_RATIO_CLAMP",
    "LOG_W_CLAMP",
    "POLICY_LOSSES",
    "CispoParams",
    "CorrectionParams",
    "GrpoParams",
    "GspoParams",
    "PolicyLoss",
    "PolicyLossInputs",
    "PolicyLossOutput",
    "PolicyLossParams",
    "SapoParams",
    "SequenceLossOutput",
    "VespoParams",
    "aggregate_sequence_loss",
    "aggregate_token_loss",
    "reference_aggregation",
    "clamp_log_w",
    "get_policy_loss",
    "phi_peak",
    "sequence_log_ratio",
    "train_inference_log_correction",
    "train_inference_token_log_correction",
    "vespo_log_w",
    "vespo_phi",
    "vespo_sequence_loss",
]
