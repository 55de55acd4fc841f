"""Run metrics on the logging rank: a crash-safe JSONL file, TensorBoard, optional wandb, a progress bar.

`metrics.jsonl` is the record of a run: one JSON object per logged step, `{"step": ..., "time": ..., **metrics}`,
flushed and fsynced line by line. Non-finite floats are written as the strings `"nan"`, `"inf"` and `"-inf"`
(strict JSON has no such numbers); `read_metrics` turns them back into floats. The key convention and the plot
command are in docs/metrics.md.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, Mapping

from vespo_megatron.runtime.files import write_atomic

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run_info.json"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
RESERVED_KEYS = ("step", "time")

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def encode_value(key: str, value: Any) -> int | float | str:
    """A JSON-safe scalar: ints and bools pass through, floats (and 0-dim tensors / NumPy scalars) become
    floats, and non-finite floats become "nan" / "inf" / "-inf"."""
    if isinstance(value, (bool, int)):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metric {key!r}={value!r} is not a number; log floats only") from exc
    if math.isnan(number):
        return "nan"
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    return number


def decode_record(record: dict[str, Any]) -> dict[str, Any]:
    """Undo `encode_value`: the strings "nan" / "inf" / "-inf" become floats again."""
    return {k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()}


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (or of the run directory holding one), non-finite values as floats.

    A torn last line (a process killed mid-write) is dropped; any other line that is not a JSON object is
    an error naming ``file:line``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [decode_record(json.loads(line)) for line in _complete_lines(path)]


def _complete_lines(path: Path) -> list[str]:
    """The JSON-object lines of a JSONL file, each ending in a newline.

    Only the last line may be torn (unparseable, from a write cut short): it is dropped. An unparseable or
    non-object line anywhere else raises ValueError with ``file:line``.
    """
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
    kept = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == last:
                break
            raise ValueError(f"{path}:{number + 1} is not valid JSON ({exc.msg} at column {exc.colno}); only a torn "
                             "last line is skipped, so the file is corrupt: fix or delete that line") from None
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}:{number + 1} is {type(record).__name__}, not a JSON object; fix or delete that line")
        kept.append(line + "\n")
    return kept


class MetricsLogger:
    """Writes a run's metrics to run_dir: metrics.jsonl, tensorboard/ events, wandb, config.yaml, run_info.json.

    Construct it on every rank with `enabled=is_logging_rank`; when disabled every method does nothing and no
    file is touched, so callers need no branches. `resume=False` starts metrics.jsonl afresh; `resume=True`
    appends to it (after dropping a torn last line), and the caller then calls `truncate_after(ckpt_step)` so
    that the steps redone after the checkpoint are not logged twice.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        enabled: bool,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        config_dict: Mapping[str, Any] | None = None,
        resume: bool = False,
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        self._file: IO[str] | None = None
        self._tb = None
        self._wandb_run = None
        if not enabled:
            return
        self._wandb = _import_wandb(wandb_project) if wandb_project else None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if config_dict is not None:
            self._write_config(config_dict)
        if resume:
            write_atomic(self.metrics_path, "".join(_complete_lines(self.metrics_path)))
        self._file = open(self.metrics_path, "a" if resume else "w")
        if tensorboard:
            self._open_tensorboard(purge_step=None)
        if self._wandb is not None:
            self._wandb_run = self._init_wandb(wandb_project, config_dict, resume)

    def record_run_info(self, **fields: Any) -> None:
        """Merge ``fields`` (JSON values) into run_dir/run_info.json: facts of the run that are not per step,
        such as the decode path the rollout takes."""
        if not self.enabled:
            return
        path = self.run_dir / RUN_INFO_FILE
        info = json.loads(path.read_text()) if path.is_file() else {}
        info.update(fields)
        write_atomic(path, json.dumps(info, indent=1, sort_keys=True) + "\n")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one record for `step` to every sink; the JSONL line is on disk when this returns."""
        if not self.enabled:
            return
        clash = [k for k in RESERVED_KEYS if k in metrics]
        if clash:
            raise ValueError(f"metric keys {clash} are reserved for the record itself; rename them")
        record = {"step": int(step), "time": time.time()}
        record.update({k: encode_value(k, v) for k, v in metrics.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for key, value in metrics.items():
                if not isinstance(value, bool):
                    self._tb.add_scalar(key, float(value), global_step=int(step))
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({k: float(v) for k, v in metrics.items()}, step=int(step))

    def truncate_after(self, step: int) -> None:
        """Drop every record with step > `step` (the resumed checkpoint's step) from metrics.jsonl and from
        TensorBoard, so that the resumed run's files match an uninterrupted run's."""
        if not self.enabled:
            return
        self._file.close()
        kept = [line for line in _complete_lines(self.metrics_path) if json.loads(line)["step"] <= step]
        write_atomic(self.metrics_path, "".join(kept))
        self._file = open(self.metrics_path, "a")
        if self._tb is not None:
            self._tb.close()
            self._open_tensorboard(purge_step=step + 1)

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _write_config(self, config_dict: Mapping[str, Any]) -> None:
        import yaml

        write_atomic(self.run_dir / CONFIG_FILE, yaml.safe_dump(dict(config_dict), sort_keys=False))

    def _open_tensorboard(self, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step makes TensorBoard hide events at or after it that an earlier, killed run wrote.
        self._tb = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=purge_step)

    def _init_wandb(self, project: str, config_dict: Mapping[str, Any] | None, resume: bool):
        """One wandb run per run_dir: its id is kept in run_dir so that a resumed job continues the same run."""
        id_path = self.run_dir / WANDB_ID_FILE
        if resume and id_path.exists():
            run_id = id_path.read_text().strip()
        else:
            run_id = self._wandb.util.generate_id()
            write_atomic(id_path, run_id + "\n")
        return self._wandb.init(
            project=project,
            dir=str(self.run_dir),
            id=run_id,
            resume="allow",
            name=self.run_dir.name,
            config=dict(config_dict) if config_dict is not None else None,
        )


def _import_wandb(project: str):
    try:
        import wandb
    except ImportError as exc:
        raise ImportError(
            f"logging.wandb_project={project!r} needs the wandb package, which is not installed; "
            "pip install 'vespo-megatron[wandb]' or set logging.wandb_project to null"
        ) from exc
    return wandb


POSTFIX_KEYS = {"reward/mean": "reward", "reward/accuracy": "acc", "loss/value": "loss"}
"""Metric keys shown next to the bar, with their short labels."""


def _postfix(metrics: Mapping[str, Any]) -> dict[str, str]:
    return {label: f"{float(metrics[key]):.4g}" for key, label in POSTFIX_KEYS.items() if key in metrics}


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressBar:
    """Training progress on the logging rank: step, reward/accuracy/loss and ETA.

    On a terminal this is a tqdm bar. When the stream is not a TTY (a batch job's log file) tqdm's carriage
    returns would become one line per refresh, so a plain line is printed every `print_every` steps instead
    (default: about 20 lines over the run) and on the last step.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        enabled: bool,
        initial: int = 0,
        file: IO[str] | None = None,
        print_every: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.initial = initial
        self._file = file if file is not None else sys.stderr
        self._tqdm = None
        self._start = time.monotonic()
        self.interactive = enabled and hasattr(self._file, "isatty") and self._file.isatty()
        self.print_every = print_every or max(1, total_steps // 20)
        if self.interactive:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total_steps, initial=initial, file=self._file, unit="step",
                              dynamic_ncols=True, mininterval=0.5)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Show that `step` (1-based count of finished steps) is done, with its metrics."""
        if not self.enabled:
            return
        postfix = _postfix(metrics or {})
        if self._tqdm is not None:
            self._tqdm.update(step - self._tqdm.n)
            self._tqdm.set_postfix(postfix, refresh=False)
        elif step % self.print_every == 0 or step == self.total_steps:
            print(self._plain_line(step, postfix), file=self._file, flush=True)

    def _plain_line(self, step: int, postfix: dict[str, str]) -> str:
        elapsed = time.monotonic() - self._start
        done = step - self.initial
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        eta_text = _format_seconds(eta) if math.isfinite(eta) else "?"
        fields = [f"step {step}/{self.total_steps}", *(f"{k}={v}" for k, v in postfix.items()),
                  f"elapsed={_format_seconds(elapsed)}", f"eta={eta_text}"]
        return " ".join(fields)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
