"""The stability frontier of ``study frontier``: per (model, variant, N), the largest learning rate that still learns.

A cell "holds" at a learning rate when its final greedy accuracy, averaged over seeds, stays at or above
``keep`` (0.9) times the same variant's N = 1 accuracy at the sweep's base rate (its smallest). The frontier
of a (model, variant, N) is the largest rate of the grid that holds; ``collapses`` counts the cells (over
rates and seeds) that met a collapse event (docs/results.md, "collapse").

Paired by seed (every variant of a seed starts from that seed's warm start and sees its prompts), each
variant is compared with its arm's VESPO: the accuracy difference per (N, rate), and the difference of
the per-seed frontiers in grid steps, each with its intervals and the smallest difference the design detects
(:mod:`vespo_megatron.study.stats`). Pure functions of the cells.
"""

from __future__ import annotations

from collections import defaultdict

from vespo_megatron.study.stats import binomial_se, paired_difference

KEEP = 0.9
"""Share of the variant's N = 1 accuracy at the base rate that a cell must keep to hold."""


def frontier(cells: list[dict], keep: float = KEEP) -> list[dict]:
    """One row per (model, variant, N): the reference accuracy, accuracy per rate, the frontier and collapses."""
    accuracy: dict[tuple, list[float]] = defaultdict(list)
    collapses: dict[tuple, int] = defaultdict(int)
    for cell in cells:
        key = (cell["model"], cell["variant"], cell["N"], cell["lr"])
        accuracy[key].append(float(cell["eval_accuracy"]))
        collapses[key[:3]] += bool(cell["collapse"])
    lrs = sorted({key[3] for key in accuracy})
    if not lrs:
        return []
    base = lrs[0]
    rows = []
    for model, variant, n in sorted({key[:3] for key in accuracy}, key=lambda k: (k[0], k[1], k[2])):
        reference_cells = accuracy.get((model, variant, 1, base))
        reference = sum(reference_cells) / len(reference_cells) if reference_cells else None
        per_lr = {lr: sum(v) / len(v) for lr in lrs if (v := accuracy.get((model, variant, n, lr)))}
        held = [lr for lr, acc in per_lr.items() if reference is not None and acc >= keep * reference]
        rows.append({"model": model, "variant": variant, "N": n, "base_lr": base, "reference_accuracy": reference,
                     "accuracy_by_lr": per_lr, "frontier_lr": max(held) if held else None,
                     "collapses": collapses[(model, variant, n)],
                     "cells": sum(len(accuracy.get((model, variant, n, lr), [])) for lr in lrs)})
    return rows


def frontier_table(rows: list[dict], keep: float = KEEP) -> str:
    """Markdown: one row per (model, variant, N) with the accuracy at every rate, the frontier and collapses."""
    if not rows:
        return "no finished cells\n"
    lrs = sorted({lr for row in rows for lr in row["accuracy_by_lr"]})
    head = ["model", "variant", "N", *(f"acc @ {lr:g}" for lr in lrs), f"frontier lr (>= {keep:g} x N=1 @ {lrs[0]:g})",
            "collapsed cells"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        accs = [f"{row['accuracy_by_lr'][lr]:.3f}" if lr in row["accuracy_by_lr"] else "-" for lr in lrs]
        frontier_lr = f"{row['frontier_lr']:g}" if row["frontier_lr"] is not None else "none"
        lines.append("| " + " | ".join([row["model"], row["variant"], str(row["N"]), *accs, frontier_lr,
                                        f"{row['collapses']} / {row['cells']}"]) + " |")
    return "\n".join(lines) + "\n"


def _by_seed(cells: list[dict]) -> dict[tuple, dict[int, float]]:
    """``{(model, variant, N, lr): {seed: accuracy}}`` of the cells with a finite accuracy."""
    table: dict[tuple, dict[int, float]] = defaultdict(dict)
    for cell in cells:
        accuracy = cell.get("eval_accuracy")
        if accuracy is not None and accuracy == accuracy:
            table[(cell["model"], cell["variant"], cell["N"], cell["lr"])][cell["seed"]] = float(accuracy)
    return table


def seed_frontiers(cells: list[dict], keep: float = KEEP) -> dict[tuple, dict[int, int]]:
    """``{(model, variant, N): {seed: grid index}}``: each seed's frontier against its own N = 1 base accuracy.

    The index is that of the largest rate the seed holds at (-1 when it holds at none); only seeds with every
    rate of the grid and the reference cell are counted."""
    table = _by_seed(cells)
    lrs = sorted({key[3] for key in table})
    out: dict[tuple, dict[int, int]] = defaultdict(dict)
    for model, variant, n in {key[:3] for key in table}:
        reference = table.get((model, variant, 1, lrs[0]), {})
        for seed, ref in reference.items():
            accs = [table.get((model, variant, n, lr), {}).get(seed) for lr in lrs]
            if any(a is None for a in accs):
                continue
            held = [i for i, a in enumerate(accs) if a >= keep * ref]
            out[(model, variant, n)][seed] = max(held) if held else -1
    return out


def reference_for(variant: str) -> str | None:
    """The VESPO variant a variant is compared with: the same arm's VESPO (``grpo+hot`` -> ``vespo+hot``,
    ``gspo`` -> ``vespo``), plain VESPO for its ablations (``vespo-sym`` -> ``vespo``); None for VESPO itself."""
    base, sep, rest = variant.partition("+")
    if base == "vespo":
        return None
    return "vespo" if base.startswith("vespo") else "vespo" + sep + rest


def paired_comparisons(cells: list[dict], keep: float = KEEP, eval_prompts: int | None = None) -> list[dict]:
    """Each variant against its VESPO reference (:func:`reference_for`), reference minus variant, paired by seed:
    per (model, N, lr) the final accuracy, and per (model, N) the frontier in grid steps (``lr = None``). Rows
    with one paired seed are kept (their intervals are None). ``eval_prompts`` adds the binomial standard error
    of one cell's accuracy (``eval_se``)."""
    table = _by_seed(cells)
    frontiers = seed_frontiers(cells, keep)
    present = {key[1] for key in table}
    pairs = sorted((reference_for(v), v) for v in present if reference_for(v) in present)
    rows = []
    for reference, variant in pairs:
        for model, n, lr in sorted({(k[0], k[2], k[3]) for k in table if k[1] == reference}):
            ours, theirs = table[(model, reference, n, lr)], table.get((model, variant, n, lr), {})
            seeds = sorted(set(ours) & set(theirs))
            if not seeds:
                continue
            row = {"model": model, "N": n, "lr": lr, "metric": "accuracy", "reference": reference,
                   "variant": variant, "seeds": seeds,
                   **paired_difference([ours[s] for s in seeds], [theirs[s] for s in seeds]).to_dict()}
            if eval_prompts:
                row["eval_se"] = binomial_se(sum(ours[s] for s in seeds) / len(seeds), eval_prompts)
            rows.append(row)
        for model, n in sorted({(k[0], k[2]) for k in frontiers if k[1] == reference}):
            ours, theirs = frontiers[(model, reference, n)], frontiers.get((model, variant, n), {})
            seeds = sorted(set(ours) & set(theirs))
            if seeds:
                rows.append({"model": model, "N": n, "lr": None, "metric": "frontier_steps", "reference": reference,
                             "variant": variant, "seeds": seeds,
                             **paired_difference([float(ours[s]) for s in seeds],
                                                 [float(theirs[s]) for s in seeds]).to_dict()})
    return rows


def _signed(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"


def comparison_table(rows: list[dict]) -> str:
    """Markdown of :func:`paired_comparisons`: frontier differences first, then accuracy per (N, rate)."""
    if not rows:
        return "no paired cells\n"
    head = ["model", "N", "lr", "reference - variant", "seeds", "mean difference", "95% bootstrap CI", "95% t CI",
            "detectable (80% power)", "decided"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ordered = sorted(rows, key=lambda r: (r["metric"] != "frontier_steps", r["reference"], r["variant"], r["model"],
                                          r["N"], r["lr"] or 0.0))
    for row in ordered:
        digits = 2 if row["metric"] == "frontier_steps" else 3
        unit = " steps" if row["metric"] == "frontier_steps" else ""
        boot = (f"[{_signed(row['bootstrap_low'], digits)}, {_signed(row['bootstrap_high'], digits)}]"
                if row["bootstrap_low"] is not None else "–")
        t_ci = f"[{_signed(row['t_low'], digits)}, {_signed(row['t_high'], digits)}]" if row["t_low"] is not None else "–"
        detectable = f"{row['min_detectable']:.{digits}f}{unit}" if row["min_detectable"] is not None else "–"
        lr = "frontier" if row["lr"] is None else f"{row['lr']:g}"
        lines.append("| " + " | ".join([row["model"], str(row["N"]), lr, f"{row['reference']} - {row['variant']}",
                                        str(len(row["seeds"])), _signed(row["mean"], digits) + unit, boot, t_ci,
                                        detectable, "yes" if row["decided"] else "no"]) + " |")
    return "\n".join(lines) + "\n"
