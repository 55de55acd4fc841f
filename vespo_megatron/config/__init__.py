"""Typed configuration for every part of a run, loaded from YAML with ``section.key=value`` overrides.

Each section is a ``kw_only`` dataclass whose field comments double as documentation
(``docs/configs.md`` is generated from them by ``vespo-megatron config-docs``). Checks that need only one
section live in its ``__post_init__``; checks that relate sections to each other or to the world size
live in :func:`validate`, which runs before any process group exists so a bad layout fails in
milliseconds with a message that names the fields, their values and a fix, instead of hanging a job.
"""

from vespo_megatron.config.errors import ConfigError
from vespo_megatron.config.loading import (
    config_from_dict,
    config_to_dict,
    load_config,
    load_config_data,
    merge_config_data,
    parse_overrides,
)
from vespo_megatron.config.model import ModelConfig
from vespo_megatron.config.parallel import ParallelConfig
from vespo_megatron.config.rl import LossConfig, RLConfig, RolloutConfig, TaskConfig
from vespo_megatron.config.run import Config
from vespo_megatron.config.training import CheckpointConfig, LoggingConfig, OptimizerConfig, TrainConfig
from vespo_megatron.config.validate import validate

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "LoggingConfig", "LossConfig", "ModelConfig", "OptimizerConfig",
    "ParallelConfig", "RLConfig", "RolloutConfig", "TaskConfig", "TrainConfig", "config_from_dict",
    "config_to_dict", "load_config", "load_config_data", "merge_config_data", "parse_overrides", "validate",
]  # fmt: skip
