"""The vLLM engine's environment, and the checks ``validate`` runs before any process group exists.

The CPU engine lives in an overlay (``rollout.vllm.env_path``, installed by ``bash launch/setup_env.sh vllm``)
put first on the server's PYTHONPATH over the trainer's interpreter: it needs a newer transformers than
Megatron-Bridge, so it never shares the trainer's process. On GPU ``rollout.vllm.python`` names a venv with
vLLM's CUDA build and ``env_path`` is null.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from vespo_megatron.config.errors import ConfigError
from vespo_megatron.config.rl import VLLM_CPU_HEAD_SIZES, VllmConfig

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TORCHDYNAMO_DISABLE": "1",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
"""Set for every server: nothing is fetched from a hub, no compile warm-up, no usage report."""


def engine_python(settings: VllmConfig) -> str:
    """The interpreter that runs a local server: ``rollout.vllm.python`` or the trainer's own."""
    return settings.python or sys.executable


def engine_overlay(settings: VllmConfig) -> Optional[Path]:
    """``rollout.vllm.env_path`` as an absolute path, or None without an overlay."""
    return Path(settings.env_path).resolve() if settings.env_path else None


def server_env(settings: VllmConfig) -> dict[str, str]:
    """The environment of a local server: the trainer's, minus its distributed variables, plus the overlay
    first on PYTHONPATH, offline settings and VLLM_SERVER_DEV_MODE (the pause / reload / resume endpoints)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")}
    env.update(OFFLINE_ENV)
    env["VLLM_SERVER_DEV_MODE"] = "1"
    overlay = engine_overlay(settings)
    if overlay is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(overlay)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def check_engine_installed(settings: VllmConfig) -> None:
    """Raise a one-line ConfigError when the servers' interpreter or the vLLM package cannot be found."""
    python = engine_python(settings)
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise ConfigError(f"rollout.vllm.python={python!r} is not an executable interpreter; point it at the "
                          "engine's python or leave it null (the trainer's own)")
    overlay = engine_overlay(settings)
    if overlay is not None:
        if not (overlay / "vllm" / "__init__.py").is_file():
            raise ConfigError(f"rollout.vllm.env_path={settings.env_path!r} holds no vLLM ({overlay}/vllm missing); "
                              "run `bash launch/setup_env.sh vllm`, or set env_path=null and rollout.vllm.python "
                              "to a venv with vLLM")
        return
    venv = Path(python).resolve().parent.parent
    if not list(venv.glob("lib/python3*/site-packages/vllm/__init__.py")):
        raise ConfigError(f"rollout.vllm.python={python!r} has no vLLM in {venv}/lib/python3*/site-packages and "
                          "rollout.vllm.env_path is null; install vLLM there or run `bash launch/setup_env.sh "
                          "vllm` and set env_path=.vllm/site")


def check_reachable(url: str, key: str, timeout_s: float = 5.0) -> None:
    """Raise a one-line ConfigError unless ``url``/health answers 200 within ``timeout_s``."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s) as reply:
            status = reply.status
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise ConfigError(f"{key}={url!r} is unreachable ({reason}); start the vLLM server there "
                          "(docs/rl.md) or fix the URL") from None
    if status != 200:
        raise ConfigError(f"{key}={url!r} answered /health with HTTP {status}; the vLLM server is not ready")


def check_engine_environment(config) -> None:
    """rollout.engine=vllm: the engine is installed (servers started here) and every given URL answers.

    Probes the file system and the network, so it runs where a run's config is loaded
    (:func:`vespo_megatron.run_config.load_run_config`), before any process group exists.
    """
    if config.rollout.engine != "vllm":
        return
    settings = config.rollout.vllm
    if not settings.urls:
        check_engine_installed(settings)
    for index, url in enumerate(settings.urls):
        check_reachable(url, f"rollout.vllm.urls[{index}]")


def check_head_size(head_dim: int, settings: VllmConfig) -> None:
    """The CPU engine's attention runs only some head sizes: raise a ConfigError for any other."""
    if settings.device == "cpu" and head_dim not in VLLM_CPU_HEAD_SIZES:
        raise ConfigError(f"model head size {head_dim} (model.kv_channels, or hidden_size/num_attention_heads) is "
                          f"not one the CPU vLLM engine runs {VLLM_CPU_HEAD_SIZES}; use such a model, or "
                          "rollout.vllm.device=gpu for GPU servers")
