"""``vespo-megatron import-hf`` and ``export-hf``: HF folders to our checkpoints and back.

Both run on one process or under torchrun/srun with any layout; the conversion itself lives in
:mod:`vespo_megatron.models.hf`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def import_hf(hf_dir, checkpoint_dir, config_path=None, overrides=()) -> Path:
    """Build the run of ``config_path`` + ``overrides`` from ``hf_dir``'s weights; save it as step 0."""
    from vespo_megatron import checkpoint
    from vespo_megatron.checkpoint.sidecar import write_checkpoint_sidecar
    from vespo_megatron.models.hf import require_hf_dir
    from vespo_megatron.rl.loop import build_trainer, checkpoint_state
    from vespo_megatron.run_config import load_run_config

    require_hf_dir(hf_dir, field="HF_DIR")
    config = load_run_config(config_path, [*overrides, f"model.hf_path={hf_dir}", f"checkpoint.dir={checkpoint_dir}"])
    trainer = build_trainer(config, hf_weights=True)
    write_checkpoint_sidecar(checkpoint_dir, config)
    return checkpoint.save_checkpoint(trainer.context.engine, checkpoint_dir, 0, checkpoint_state(trainer))


def export_hf(checkpoint_path, out_dir, overrides=(), max_shard_bytes=None):
    """Load a checkpoint (any saved layout, resharded to this launch's) and write it as an HF folder."""
    from vespo_megatron import checkpoint
    from vespo_megatron.checkpoint.sidecar import checkpoint_config, checkpoint_root_and_step, export_checkpoint
    from vespo_megatron.models.hf import DEFAULT_SHARD_BYTES
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.engine import build_engine

    root, step = checkpoint_root_and_step(checkpoint_path)
    config = checkpoint_config(root, list(overrides))
    engine = build_engine(config, initialize(config), vocab_size=config.model.vocab_size, hf_weights=False)
    checkpoint.load_checkpoint(engine, step)
    return export_checkpoint(engine, root, out_dir, max_shard_bytes or DEFAULT_SHARD_BYTES)


def import_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vespo-megatron import-hf",
        description="Convert a local Hugging Face model folder (config.json + safetensors) into a vespo_megatron "
        "checkpoint (step 0) that `vespo-megatron train` resumes from. Runs alone or under torchrun with any "
        "layout; nothing is downloaded.",
    )
    parser.add_argument("hf_dir", help="HF folder: config.json, model.safetensors (or shards + index), tokenizer")
    parser.add_argument("checkpoint_dir", help="checkpoint root to write (becomes checkpoint.dir of the run)")
    parser.add_argument("--config", default=None, help="YAML config of the run (default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. parallel.tp=2")
    args = parser.parse_args(argv)
    _offline()
    from vespo_megatron.runtime.distributed import shutdown

    path = import_hf(args.hf_dir, args.checkpoint_dir, args.config, args.overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {path} from {args.hf_dir}", flush=True)
    shutdown()
    return 0


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vespo-megatron export-hf",
        description="Write a checkpoint (saved under any layout) as a Hugging Face folder: config.json, "
        "safetensors shards and tokenizer files, streamed tensor by tensor. Runs alone or under torchrun; "
        "pass parallel.* overrides for the launch's layout.",
    )
    parser.add_argument("checkpoint", help="checkpoint root (its newest step) or one step_XXXXXXXX folder")
    parser.add_argument("out_dir", help="HF folder to write (replaced if it exists)")
    parser.add_argument("--shard-size", type=int, default=None, help="max bytes per safetensors shard (default 2 GiB)")
    parser.add_argument("overrides", nargs="*", help="parallel.key=value for this launch, e.g. parallel.tp=2")
    args = parser.parse_args(argv)
    _offline()
    from vespo_megatron.runtime.distributed import shutdown

    path = export_hf(args.checkpoint, args.out_dir, args.overrides, args.shard_size)
    if path is not None:
        print(f"wrote {path} from {args.checkpoint}", flush=True)
    shutdown()
    return 0
