"""``vespo-megatron <command>``: each subcommand parses its arguments and calls into the package.

Commands:
  train CONFIG [section.key=value ...]   the RL loop (run under torchrun or srun; gloo on CPU, nccl on GPU)
  demo                                   the CPU quick start: SFT warm-up, then VESPO RL with TP=2 on gloo
  check-config CONFIG --nodes N --gpus-per-node G   validate a layout, print the rank grid and memory
  bench step|loss|generate|async ...     benchmark commands that print figures (--json for one object)
  plot RUN_DIR                           PNG plots of a run's metrics
  study staleness|lr-sweep               the staleness study (variants x N, fixed mini-batch) and its lr sweep
  train-tokenizer --input ... --output ... --vocab-size N   train a sentencepiece model
  config-docs [--write]                  render docs/configs.md from the config dataclasses
  import-hf HF_DIR CHECKPOINT_DIR [--config CONFIG] [overrides]   HF folder -> checkpoint that train resumes
  export-hf CHECKPOINT_DIR OUT_DIR [overrides]   checkpoint (any layout) -> HF folder (docs/models.md)
  selftest [--device auto|cpu|cuda] [--json]   RL update, decoding, memory and resume checks of this node, one JSON

Errors in what you gave (config, layout, data files, reward functions) print as one line naming the
file or key, the value and the fix. Add --debug anywhere (or set VESPO_DEBUG=1) for the full traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vespo-megatron train",
        description="Run the RL loop on this rank. Launch one process per GPU (or CPU worker) with torchrun/srun.",
    )
    parser.add_argument("config", help="YAML config file (see configs/ and docs/configs.md)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. parallel.tp=2 loss.name=grpo")
    args = parser.parse_args(argv)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # model.hf_path is a local folder: nothing is downloaded
    from vespo_megatron.run_config import load_run_config
    from vespo_megatron.rl.loop import run
    from vespo_megatron.runtime.distributed import shutdown

    run(load_run_config(args.config, args.overrides))
    shutdown()
    return 0


def _selftest(argv: list[str]) -> int:
    from vespo_megatron.selftest import main

    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    return main(argv)


def _demo(argv: list[str]) -> int:
    from vespo_megatron.demo import main

    return main(argv)


def _check_config(argv: list[str]) -> int:
    from vespo_megatron.check_config import main

    return main(argv)


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vespo-megatron bench", description="Benchmarks that print figures.")
    parser.add_argument("what", choices=["step", "loss", "generate", "async"],
                        help="step: training step per layout; loss: loss paths; generate: rollout tokens/s; "
                             "async: colocated vs disaggregated RL")
    if argv and argv[0] in ("step", "loss", "generate", "async"):  # so that `bench <what> --help` shows its flags
        what, rest = argv[0], argv[1:]
    else:
        what, rest = parser.parse_known_args(argv)[0].what, []
    if what == "step":
        from vespo_megatron.bench.step import main
    elif what == "generate":
        from vespo_megatron.bench.generate import main
    elif what == "async":
        from vespo_megatron.bench.async_rl import main
    else:
        from vespo_megatron.bench.loss import main
    return main(rest)


def _plot(argv: list[str]) -> int:
    from vespo_megatron.plotting import main

    return main(argv)


def _study(argv: list[str]) -> int:
    from vespo_megatron.study import main

    return main(argv)


def _train_tokenizer(argv: list[str]) -> int:
    from vespo_megatron.tokenizer import main

    return main(argv)


def _config_docs(argv: list[str]) -> int:
    from vespo_megatron.config_docs import main

    return main(argv)


def _import_hf(argv: list[str]) -> int:
    from vespo_megatron.hf_commands import import_main

    return import_main(argv)


def _export_hf(argv: list[str]) -> int:
    from vespo_megatron.hf_commands import export_main

    return export_main(argv)


COMMANDS = {
    "train": _train,
    "demo": _demo,
    "check-config": _check_config,
    "bench": _bench,
    "plot": _plot,
    "study": _study,
    "train-tokenizer": _train_tokenizer,
    "config-docs": _config_docs,
    "import-hf": _import_hf,
    "export-hf": _export_hf,
    "selftest": _selftest,
}


DEBUG_ENV = "VESPO_DEBUG"


def debug_enabled(argv: list[str]) -> bool:
    """``--debug`` on the command line or ``VESPO_DEBUG=1`` in the environment: show tracebacks."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def user_error_line(err: BaseException) -> str | None:
    """The one-line message of an error in the user's input, or None for an internal error.

    Configuration, layout, data and reward errors (ConfigError, ValueError, FileNotFoundError,
    RewardError) carry a message that names the file or key, the value and the fix. A local worker's
    failure is reduced to the failing rank and its exception line.
    """
    from vespo_megatron.runtime.local_workers import WorkerError
    from vespo_megatron.tasks.base import RewardError

    if isinstance(err, WorkerError):
        lines = [line for line in str(err).splitlines() if line.strip()]
        head = lines[0].rstrip(":") if lines else "a worker failed"
        last = lines[-1].strip() if len(lines) > 1 else ""
        return f"{head}: {last}" if last else head
    if isinstance(err, (ValueError, FileNotFoundError, RewardError)):
        message = " ".join(str(err).split())  # one line
        return f"{type(err).__name__}: {message}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return int(COMMANDS[argv[0]](argv[1:]) or 0)
    except Exception as err:  # noqa: BLE001 - user errors become one line; the rest re-raise
        line = None if debug else user_error_line(err)
        if line is None:
            raise
        print(f"vespo-megatron {argv[0]}: error: {line} (rerun with --debug or {DEBUG_ENV}=1 for the traceback)",
              file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
