"""Keep start-up output to what a user can act on.

Megatron-Core announces, on every process start, each optional accelerator package it did not find and
a few deprecations of its own defaults. On a machine without a GPU none of them is news (the fallbacks
are the intended CPU path, docs/parallelism.md) and, printed once per rank, they bury the progress
lines. ``silence_fallback_notices`` filters exactly those messages; every other warning still shows.
``VESPO_SHOW_FALLBACK_NOTICES=1`` turns the filter off.
"""

from __future__ import annotations

import logging
import os
import warnings

FALLBACK_WARNINGS = (
    # Optional NVIDIA packages: the torch fallbacks are what runs without TE/apex (CPU, or a bare GPU box).
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed\. Falling back to Torch Norm",
    # Megatron-Core 0.19 defaults cuda_graph_modules to "full" and then warns that "full" is deprecated
    # (our own configs pass an empty list; configs built by Megatron-Bridge keep the default).
    r"full scope is deprecated",
    # Imported with megatron.core.models; we do not use MIMO models.
    r"MimoModelConfig is experimental",
)
FALLBACK_LOG_MESSAGES = (
    # Megatron-Core 0.19 steers new code to HybridModel; GPTModel remains the model Megatron-Bridge builds.
    "GPTModel IS DEPRECATED",
    # torch's CUDA build on a machine without a GPU.
    "No CUDA runtime is found",
    # The rerun state machine (result validation by re-running steps) is off unless a run enables it;
    # Megatron announces that default on first use.
    "Implicit initialization of Rerun State Machine",
    "RerunStateMachine initialized in mode RerunMode.DISABLED",
)


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(fragment in text for fragment in self.fragments)


def silence_fallback_notices() -> None:
    """Install warning and logging filters for Megatron's start-up fallback notices (idempotent)."""
    if os.environ.get("VESPO_SHOW_FALLBACK_NOTICES") == "1":
        return
    for pattern in FALLBACK_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    log_filter = _DropMessages(FALLBACK_LOG_MESSAGES)
    for name in ("megatron.core.models.gpt.gpt_model", "torch.utils.cpp_extension", "megatron.core.rerun_state_machine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(log_filter)


def default_cuda_device_max_connections() -> None:
    """Megatron's TP communication overlap wants one CUDA work queue; it warns when the variable is unset.

    Set before CUDA initialises (it has no effect afterwards, and none at all on CPU); a user's own value
    is kept.
    """
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
