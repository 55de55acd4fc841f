"""The study's outputs: a Markdown table (means, spread over seeds, retained accuracy, collapses) and plots."""

from __future__ import annotations

import math
from pathlib import Path

from vespo_megatron.study.plan import Plan
from vespo_megatron.study.summary import (
    COLLAPSE_DROP,
    PHI_KEYS,
    SILENCED,
    finite_mean,
    finite_std,
    window,
)


def cells_of(cells: list[dict], **fixed) -> list[dict]:
    return [c for c in cells if all(c.get(k) == v for k, v in fixed.items())]


def fmt(value, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def spread(values: list) -> str:
    """``mean ± std [min, max]`` over seeds (std only with two or more seeds)."""
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return "–"
    std = finite_std(values)
    text = fmt(finite_mean(values))
    if std is not None:
        text += f" ± {fmt(std)}"
    return text + (f" [{fmt(min(values))}, {fmt(max(values))}]" if len(values) > 1 else "")


def retained(cells: list[dict], model: str, variant: str, n: int, lr: float, knob: str = "N",
             base_value: int = 1) -> float | None:
    """Mean greedy accuracy at ``knob = n`` over the mean at ``base_value`` (the paper's "keeps X% of its
    N = 1 accuracy"; the async arm compares K with K = 0)."""
    base = finite_mean(c["eval_accuracy"] for c in cells_of(cells, model=model, variant=variant, lr=lr,
                                                            **{knob: base_value}))
    here = finite_mean(c["eval_accuracy"] for c in cells_of(cells, model=model, variant=variant, lr=lr, **{knob: n}))
    if base is None or here is None or base <= 0:
        return None
    return here / base


def write_table(result: dict, plan: Plan, out: Path, command: str, name: str = "staleness.md",
                knob: str = "N", values: tuple | None = None) -> Path:
    """The study's Markdown table; ``knob="K"`` with ``values`` the bounds tabulates the async arm."""
    cells = result["cells"]
    values = tuple(values or plan.staleness)
    base_value = values[0]
    behaviour = cells[0].get("behaviour", "sampler") if cells else "sampler"
    what = ("Staleness study" if knob == "N" else
            "Asynchronous arm (one rollout worker + one trainer, rl.max_staleness = K, worker K steps ahead, "
            f"loss.behaviour={behaviour})")
    layout = ("a rollout holds N mini-batches, so a cell runs updates/N rollouts and every cell generates the same "
              "number of tokens" if knob == "N" else
              "a rollout holds one mini-batch and is trained K updates after the weights that sampled it "
              "(K = 0: synchronous)")
    lines = [f"# {what}: task {plan.task}, {plan.updates} optimizer updates per cell, "
             f"{plan.seeds} seed(s)", "", f"Command: `{command}`", "",
             f"Every update trains on one mini-batch of {plan.minibatch_sequences} sequences "
             f"({plan.minibatch_prompts} prompts x {plan.group_size} responses, whole groups); {layout}. "
             "Entries are mean ± std [min, max] over seeds of the greedy accuracy on "
             f"{plan.eval_prompts} held-out prompts after training, then the sampled reward of the last "
             f"{window(plan.updates)} updates; `ret` = accuracy relative to the same row at {knob} = {base_value}; "
             "`!k` = k seeds "
             f"had a collapse event (windowed reward below {COLLAPSE_DROP} x max(best window, first update), "
             f"non-finite loss or grad norm, or vespo/silenced_frac > {SILENCED}).", ""]
    for model in plan.models:
        warm = [w["eval_accuracy"] for w in result.get("warm_starts", []) if w["model"] == model]
        if not warm:  # the async arm warms up inside each job: one value per seed (all its cells share it)
            warm = list({c["seed"]: c["warm_eval_accuracy"] for c in cells_of(cells, model=model)
                         if c.get("warm_eval_accuracy") is not None}.values())
        for lr in plan.lrs:
            lines += [f"## {model}, lr {lr:g} (warm-start greedy accuracy {spread(warm)})", "",
                      "| variant | aggregation | " + " | ".join(f"{knob}={n}" for n in values) + " |",
                      "|---|---|" + "---|" * len(values)]
            for variant in plan.variants:
                row, aggregation = [], "–"
                for n in values:
                    group = cells_of(cells, model=model, variant=variant, lr=lr, **{knob: n})
                    if not group:
                        row.append("–")
                        continue
                    aggregation = group[0].get("aggregation", aggregation)
                    kept = retained(cells, model, variant, n, lr, knob, base_value)
                    collapsed = sum(1 for c in group if c["collapse"])
                    text = (f"acc {spread([c['eval_accuracy'] for c in group])}; "
                            f"reward {spread([c['final_reward'] for c in group])}")
                    if kept is not None and n != base_value:
                        text += f"; ret {kept:.0%}"
                    row.append(text + (f" !{collapsed}" if collapsed else ""))
                lines.append(f"| {variant} | {aggregation} | " + " | ".join(row) + " |")
            if knob == "K":
                lags = [finite_mean(c.get("lag_mean") for c in cells_of(cells, model=model, lr=lr, K=k))
                        for k in values]
                drops = [sum(c.get("dropped_rollouts", 0) for c in cells_of(cells, model=model, lr=lr, K=k))
                         for k in values]
                lines.append("| measured policy lag (mean; rollouts dropped) | – | "
                             + " | ".join(f"{fmt(lag, 2)}; {int(d)}" for lag, d in zip(lags, drops)) + " |")
            lines += ["", f"VESPO diagnostics ({model}, lr {lr:g}, last window, mean over seeds): "
                          "phi_mean / ESS / mean abs(log W) / silenced_frac", "",
                      "| variant | " + " | ".join(f"{knob}={n}" for n in values) + " |",
                      "|---|" + "---|" * len(values)]
            for variant in (v for v in plan.variants if v.startswith("vespo")):
                row = []
                for n in values:
                    group = cells_of(cells, model=model, variant=variant, lr=lr, **{knob: n})
                    row.append(" / ".join(fmt(finite_mean(c["phi"][k] for c in group), 2) for k in PHI_KEYS))
                lines.append(f"| {variant} | " + " | ".join(row) + " |")
            lines.append("")
    path = out / name
    path.write_text("\n".join(lines))
    return path


def write_plots(result: dict, plan: Plan, out: Path, knob: str = "N", values: tuple | None = None) -> list[Path]:
    """Accuracy and reward against N (log scale), or against K for the async arm, and the reward curves
    of the largest value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from vespo_megatron.plotting import plot_runs

    paths = []
    lr = plan.lrs[0]
    values = tuple(values or plan.staleness)
    for model in plan.models:
        fig = Figure(figsize=(11, 4), dpi=80)
        FigureCanvasAgg(fig)
        panels = (("eval_accuracy", f"greedy accuracy after RL ({plan.eval_prompts} held-out prompts)"),
                  ("final_reward", f"sampled reward (last {window(plan.updates)} updates)"))
        for index, (key, ylabel) in enumerate(panels):
            ax = fig.add_subplot(1, 2, index + 1)
            for i, variant in enumerate(plan.variants):
                means, lows, highs = [], [], []
                for n in values:
                    got = [c[key] for c in cells_of(result["cells"], model=model, variant=variant, lr=lr, **{knob: n})
                           if c[key] is not None and math.isfinite(c[key])]
                    means.append(finite_mean(got) if got else math.nan)
                    lows.append(min(got, default=math.nan))
                    highs.append(max(got, default=math.nan))
                ax.plot(values, means, marker="o", color=f"C{i}", label=variant)
                ax.fill_between(values, lows, highs, color=f"C{i}", alpha=0.12)
            if knob == "N":
                ax.set_xscale("log", base=2)
            ax.set_xticks(values, [str(n) for n in values])
            ax.set_xlabel("N (mini-batch updates per rollout)" if knob == "N"
                          else "K (rl.max_staleness; the worker samples K updates ahead)")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        title = "Staleness study" if knob == "N" else "Asynchronous arm"
        fig.suptitle(f"{title}, {plan.task}, {model} (band = min..max over seeds)")
        fig.tight_layout()
        path = out / f"reward_vs_{knob}_{model}.png"
        fig.savefig(path, format="png")
        paths.append(path)
        n = max(values)
        group = cells_of(result["cells"], model=model, seed=plan.first_seed, lr=lr, **{knob: n})
        if group:
            paths.append(plot_runs([c["run_dir"] for c in group], [c["variant"] for c in group], "reward/mean",
                                   out / f"reward_curves_{model}_{knob}{n}.png"))
    return paths


def write_frontier_plots(result: dict, plan: Plan, out: Path, keep: float) -> list[Path]:
    """Per model, one panel per N: greedy accuracy against the learning rate (log scale) for every variant, mean
    over seeds with a min..max band, and each variant's hold line (``keep`` x its N = 1 accuracy at the base
    rate, dashed): the frontier is the last rate whose mean sits on or above the line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    lrs = sorted(plan.lrs)
    for model in plan.models:
        fig = Figure(figsize=(3.6 * len(plan.staleness), 3.6), dpi=80)
        FigureCanvasAgg(fig)
        for index, n in enumerate(plan.staleness):
            ax = fig.add_subplot(1, len(plan.staleness), index + 1)
            for i, variant in enumerate(plan.variants):
                stats = []
                for lr in lrs:
                    got = [c["eval_accuracy"] for c in cells_of(result["cells"], model=model, variant=variant, N=n,
                                                                lr=lr)
                           if c["eval_accuracy"] is not None and math.isfinite(c["eval_accuracy"])]
                    stats.append((finite_mean(got) if got else math.nan, min(got, default=math.nan),
                                  max(got, default=math.nan)))
                ax.plot(lrs, [s[0] for s in stats], marker="o", color=f"C{i}", label=variant)
                ax.fill_between(lrs, [s[1] for s in stats], [s[2] for s in stats], color=f"C{i}", alpha=0.12)
                reference = finite_mean(c["eval_accuracy"] for c in cells_of(result["cells"], model=model,
                                                                              variant=variant, N=1, lr=lrs[0]))
                if reference is not None:
                    ax.axhline(keep * reference, color=f"C{i}", linestyle="--", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs], rotation=45)
            ax.minorticks_off()
            ax.set_xlabel("learning rate")
            ax.set_title(f"N = {n}")
            ax.grid(True, alpha=0.3)
            if index == 0:
                ax.set_ylabel(f"greedy accuracy ({plan.eval_prompts} held-out prompts)")
        ax.legend(fontsize="small")
        fig.suptitle(f"Stability frontier, {plan.task}, {model}: mean over {plan.seeds} seed(s), band min..max,\n"
                     f"dashed = {keep:g} x the variant's N=1 accuracy at {lrs[0]:g}", fontsize="medium")
        fig.tight_layout()
        path = out / f"frontier_{model}.png"
        fig.savefig(path, format="png")
        paths.append(path)
    return paths
