"""Checkpoints: atomic saves and resharding loads of a training engine, and the HF sidecar of a root.

- :mod:`.store`: ``ROOT/step_X`` saves (collective, atomic), loads resharded to any layout, the
  ``latest`` pointer, pruning to ``keep_last``.
- :mod:`.safe_load`: what a load may unpickle (weights-only loads, the allow-listed ``.metadata`` check).
- :mod:`.optimizer_fixes`: DistributedOptimizer state into torch's Adam (no TE/apex).
- :mod:`.rng`: this rank's RNG states as plain values.
- :mod:`.sidecar`: ``ROOT/hf_config`` + ``ROOT/run_config.yaml``, so ``export-hf`` rebuilds the run's model.

The preemption flag the loop polls before saving is :mod:`vespo_megatron.runtime.preemption`.
docs/checkpoints.md gives the layout, the resume semantics and the reasons.
"""

from vespo_megatron.checkpoint.safe_load import UnsafeCheckpointError, check_dcp_metadata, load_weights_only
from vespo_megatron.checkpoint.store import (
    DIST_DIR,
    DISTOPT_SHARDING_TYPE,
    FORMAT_VERSION,
    LATEST_FILE,
    RANKS_DIR,
    STATE_FILE,
    LoadedCheckpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "DIST_DIR", "DISTOPT_SHARDING_TYPE", "FORMAT_VERSION", "LATEST_FILE", "LoadedCheckpoint", "RANKS_DIR",
    "STATE_FILE", "UnsafeCheckpointError", "check_dcp_metadata", "latest_checkpoint", "load_checkpoint",
    "load_weights_only", "save_checkpoint",
]  # fmt: skip
