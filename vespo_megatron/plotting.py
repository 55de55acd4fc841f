"""PNG plots of a run's metrics.jsonl: one figure per metric group, smoothed line over the raw points.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so plotting works on a headless node and
does not change the process-wide backend. Usage: `vespo-megatron plot RUN_DIR [--out DIR] [--keys ...]`;
the groups and key convention are in docs/metrics.md.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vespo_megatron.metrics import RESERVED_KEYS, read_metrics

PLOTS_DIR = "plots"
SMOOTHING = 0.6
"""EMA weight of the smoothed line (0 = raw, closer to 1 = smoother)."""


@dataclass(frozen=True)
class PlotGroup:
    """One figure: the metric keys it takes, its file stem and its axis labels."""

    name: str
    title: str
    ylabel: str
    takes: Callable[[str], bool]


PLOT_GROUPS: tuple[PlotGroup, ...] = (
    PlotGroup("reward", "Reward and accuracy", "value", lambda k: k.startswith("reward/")),
    PlotGroup("loss", "Loss", "loss", lambda k: k.startswith("loss/")),
    PlotGroup("grad_norm", "Gradient norm", "L2 norm", lambda k: k == "grad_norm" or k.startswith("grad_norm/")),
    PlotGroup("phi", "VESPO phi statistics", "phi", lambda k: k.startswith("vespo/")
              and "log_w" not in k and not k.startswith("vespo/num_")),
    PlotGroup("log_w", "|log W| (sequence log importance weight)", "|log W|", lambda k: "log_w" in k),
    PlotGroup("response_length", "Response length", "tokens", lambda k: k.startswith("response/length")),
    PlotGroup("step_time", "Step time breakdown", "seconds", lambda k: k.startswith("time/")),
    PlotGroup("throughput", "Throughput", "tokens / s", lambda k: k.startswith("throughput/")),
)


def ema(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average that skips NaN/inf (the output is NaN until a finite value)."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            avg = weight * avg + (1 - weight) * v
            norm = weight * norm + (1 - weight)
        out.append(avg / norm if norm > 0 else math.nan)
    return out


def series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the records that have it as a number; NaN/inf kept for gaps."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def _has_data(records: Sequence[dict], key: str) -> bool:
    return any(math.isfinite(v) for v in series(records, key)[1])


def _metric_keys(records: Sequence[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for record in records:
        keys.update((k, None) for k in record if k not in RESERVED_KEYS)
    return sorted(keys)


def _new_figure(title: str, ylabel: str) -> tuple[Figure, object]:
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _draw(ax, steps: list[int], values: list[float], label: str, color: str) -> None:
    """Raw values as faint points, the EMA as a line in the same colour."""
    ax.plot(steps, values, linestyle="none", marker="o", markersize=2.5, alpha=0.4, color=color)
    ax.plot(steps, ema(values), linewidth=1.6, color=color, label=label)


def _save(fig: Figure, ax, path: Path) -> Path:
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _plot_keys(records: Sequence[dict], keys: list[str], title: str, ylabel: str, path: Path) -> Path:
    fig, ax = _new_figure(title, ylabel)
    for i, key in enumerate(keys):
        steps, values = series(records, key)
        _draw(ax, steps, values, key, f"C{i % 10}")
    return _save(fig, ax, path)


def _file_stem(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") or "metric"


def plot_run(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, keys: Sequence[str] | None = None
) -> list[Path]:
    """Write PNGs of run_dir/metrics.jsonl to out_dir (default run_dir/plots) and return their paths.

    Without `keys`, one figure per group of PLOT_GROUPS that has data. With `keys`, one figure per entry,
    taking the metric of that name or, for an entry ending in "/", every metric under that prefix.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / PLOTS_DIR
    records = read_metrics(run_dir)
    available = [k for k in _metric_keys(records) if _has_data(records, k)]
    figures: list[tuple[str, str, str, list[str]]] = []
    if keys is None:
        for group in PLOT_GROUPS:
            taken = [k for k in available if group.takes(k)]
            if taken:
                figures.append((group.name, group.title, group.ylabel, taken))
    else:
        for wanted in keys:
            taken = [k for k in available if k == wanted or (wanted.endswith("/") and k.startswith(wanted))]
            if not taken:
                raise ValueError(f"--keys {wanted!r}: no metric with data in {run_dir / 'metrics.jsonl'}; "
                               f"available: {', '.join(available) or 'none'}")
            figures.append((_file_stem(wanted), wanted, "value", taken))
    return [_plot_keys(records, taken, f"{title} ({run_dir.name})", ylabel, out_dir / f"{name}.png")
            for name, title, ylabel, taken in figures]


def plot_runs(
    run_dirs: Sequence[str | os.PathLike], labels: Sequence[str], key: str, out_path: str | os.PathLike
) -> Path:
    """Overlay metric `key` of several runs in one PNG at out_path (e.g. reward against staleness)."""
    if len(run_dirs) != len(labels):
        raise ValueError(f"plot_runs got {len(run_dirs)} run_dirs but {len(labels)} labels; give one label per run")
    fig, ax = _new_figure(key, key)
    for i, (run_dir, label) in enumerate(zip(run_dirs, labels)):
        steps, values = series(read_metrics(run_dir), key)
        _draw(ax, steps, values, label, f"C{i % 10}")
    return _save(fig, ax, Path(out_path))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vespo-megatron plot",
        description="Write PNG plots of a run's metrics.jsonl (one figure per metric group that has data).",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="Run directory holding metrics.jsonl.")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="Directory for the PNG files (default: RUN_DIR/plots).")
    parser.add_argument("--keys", nargs="+", metavar="KEY", default=None,
                        help="Plot these metrics instead of the default groups, one figure each; "
                             "a KEY ending in '/' (e.g. 'vespo/') takes every metric under that prefix.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`vespo-megatron plot`: print the path of each PNG written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        parser.error(f"{args.run_dir} has no metrics.jsonl; pass the run directory (logging.run_dir) of a run")
    try:
        paths = plot_run(args.run_dir, out_dir=args.out, keys=args.keys)
    except ValueError as exc:
        parser.error(str(exc))
    for path in paths:
        print(path)
    if not paths:
        print(f"no metric with data in {Path(args.run_dir) / 'metrics.jsonl'}; nothing plotted")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
