"""The config of a run as every entry point loads it: YAML + overrides, then the model from ``model.hf_path``.

:func:`vespo_megatron.config.load_config` is pure (YAML, dotted overrides, typed sections, the checks
that need no model files). A run that names a Hugging Face folder needs one more step before anything
uses the model section: its shapes come from that folder's config.json through Megatron-Bridge
(:func:`vespo_megatron.models.hf.resolve_hf_model`), and a shape the user wrote must agree with it.
``load_run_config`` does both, so ``validate(config, world)`` (check-config, ``runtime.distributed.initialize``)
sees the resolved model before any process group exists.
"""

from __future__ import annotations

from pathlib import Path

from vespo_megatron.config import Config, config_from_dict, load_config_data
from vespo_megatron.models.hf import resolve_hf_model
from vespo_megatron.rollout.vllm.environment import check_engine_environment


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """``load_config(path, overrides)`` with the ``model`` section resolved from ``model.hf_path`` when set, and
    the rollout engine's environment checked (``rollout.engine=vllm``: the engine installed, its URLs answering)."""
    data = load_config_data(path, overrides)
    config = resolve_hf_model(config_from_dict(data), given_keys=data.get("model") or {})
    check_engine_environment(config)
    return config
