"""A checkpoint root's Hugging Face sidecar: what ``export-hf`` needs to turn a checkpoint back into an HF folder.

A run with ``model.hf_path`` writes ``ROOT/hf_config/`` (the HF folder's config, generation config and
tokenizer files, no weights) and ``ROOT/run_config.yaml`` (the run's config) next to its ``step_X``
folders; ``export-hf`` rebuilds the same model from them and streams the loaded weights out through
:func:`vespo_megatron.models.hf.export_hf`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from vespo_megatron.checkpoint.store import STATE_FILE, latest_checkpoint
from vespo_megatron.config import config_from_dict, config_to_dict
from vespo_megatron.config.loading import merge_config_data, parse_overrides
from vespo_megatron.models.hf import DEFAULT_SHARD_BYTES, copy_hf_metadata, export_hf, require_hf_dir, resolve_hf_model

HF_SIDECAR = "hf_config"
"""Folder in a checkpoint root holding the HF config and tokenizer files of the run (export needs them)."""
RUN_CONFIG = "run_config.yaml"
"""The run's config in a checkpoint root, so export-hf rebuilds the same model."""


def write_checkpoint_sidecar(root, config) -> None:
    """Rank 0 writes ``ROOT/hf_config/`` (HF metadata of ``model.hf_path``) and ``ROOT/run_config.yaml``."""
    import torch.distributed as dist
    import yaml

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    root = Path(root)
    sidecar = root / HF_SIDECAR
    source = require_hf_dir(config.model.hf_path)
    if not (sidecar.exists() and sidecar.resolve() == source.resolve()):
        copy_hf_metadata(source, sidecar)
    (root / RUN_CONFIG).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def checkpoint_root_and_step(path) -> tuple[Path, Path]:
    """``(root, step_dir)`` for a checkpoint root (its newest step) or one ``step_X`` folder."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        root, step = path.parent, path
    else:
        root, step = path, latest_checkpoint(path)
        if step is None:
            raise FileNotFoundError(f"{path} holds no complete checkpoint (no step_*/{STATE_FILE})")
    for needed in (root / RUN_CONFIG, root / HF_SIDECAR / "config.json"):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} does not exist; export-hf needs a checkpoint written by a run with "
                                    "model.hf_path set (train or import-hf)")
    return root, step


def checkpoint_config(root, overrides: list[str]):
    """The run config saved in ``root`` with ``model.hf_path`` at its sidecar, the layout reset to one
    process, then ``overrides`` (e.g. ``parallel.tp=2`` when export-hf runs on several ranks)."""
    import yaml

    data = yaml.safe_load((Path(root) / RUN_CONFIG).read_text())
    data["model"]["hf_path"] = str(Path(root) / HF_SIDECAR)
    data["parallel"] = {}
    data = merge_config_data(data, parse_overrides(overrides))
    return resolve_hf_model(config_from_dict(data), given_keys=data["model"])


def export_checkpoint(engine, root, out_dir, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Optional[Path]:
    """Export the engine's current weights as an HF folder using the metadata saved in checkpoint ``root``."""
    engine.gather_params()  # collective over data-parallel ranks: every rank calls export_checkpoint
    return export_hf(engine.chunks, Path(root) / HF_SIDECAR, out_dir, max_shard_bytes)
