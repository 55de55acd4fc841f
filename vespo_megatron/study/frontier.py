"""The stability frontier of ``study frontier``: per (model, variant, N), the largest learning rate that still learns.

A cell "holds" at a learning rate when its final greedy accuracy, averaged over seeds, stays at or above
``keep`` (0.9) times the same variant's N = 1 accuracy at the sweep's base rate (its smallest). The frontier
of a (model, variant, N) is the largest rate of the grid that holds; ``collapses`` counts the cells (over
rates and seeds) that met a collapse event (docs/results.md, "collapse"). Pure functions of the cells.
"""

from __future__ import annotations

from collections import defaultdict

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
