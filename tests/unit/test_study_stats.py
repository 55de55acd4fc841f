"""The study's statistics: Student's t against printed tables, paired differences and their power, and the
pairing of variants by seed (vespo_megatron/study/stats.py, frontier.py). Pure functions, hand-made cells."""

from __future__ import annotations

import math
import random

import pytest

from vespo_megatron.study.frontier import paired_comparisons, reference_for, seed_frontiers
from vespo_megatron.study.stats import (
    binomial_se,
    bootstrap_mean_interval,
    paired_difference,
    student_t_cdf,
    student_t_quantile,
)


@pytest.mark.parametrize("df, p, table", [(1, 0.975, 12.706), (2, 0.975, 4.303), (3, 0.975, 3.182),
                                          (4, 0.975, 2.776), (9, 0.975, 2.262), (30, 0.975, 2.042),
                                          (4, 0.8, 0.941), (3, 0.8, 0.978), (1, 0.8, 1.376), (10, 0.95, 1.812)])
def test_t_quantiles_equal_the_printed_table(df, p, table):
    assert student_t_quantile(p, df) == pytest.approx(table, abs=5e-4)
    assert student_t_cdf(student_t_quantile(p, df), df) == pytest.approx(p, abs=1e-9)


def test_t_cdf_is_symmetric_and_tends_to_the_normal():
    assert student_t_cdf(0.0, 5) == 0.5
    assert student_t_cdf(-1.3, 6) == pytest.approx(1 - student_t_cdf(1.3, 6))
    normal = 0.5 * (1 + math.erf(1.5 / math.sqrt(2)))
    assert student_t_cdf(1.5, 2000) == pytest.approx(normal, abs=1e-4)
    with pytest.raises(ValueError):
        student_t_cdf(1.0, 0)


def test_paired_difference_matches_a_hand_computation():
    a, b = [0.80, 0.70, 0.90, 0.85, 0.75], [0.70, 0.72, 0.80, 0.80, 0.70]
    got = paired_difference(a, b)
    diffs = [0.10, -0.02, 0.10, 0.05, 0.05]
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
    assert got.n == 5 and got.mean == pytest.approx(mean) and got.sd == pytest.approx(sd)
    half = 2.776445 * sd / math.sqrt(5)
    assert (got.t_low, got.t_high) == (pytest.approx(mean - half, abs=1e-5), pytest.approx(mean + half, abs=1e-5))
    assert got.min_detectable == pytest.approx((2.776445 + 0.940965) * sd / math.sqrt(5), abs=1e-5)
    # The percentile bootstrap resamples the five differences: inside their range, around the mean.
    assert min(diffs) <= got.bootstrap_low < mean < got.bootstrap_high <= max(diffs)
    assert not got.decided  # the t interval still reaches below 0
    assert paired_difference(a, b) == got  # seeded: the same numbers every run


def test_power_claim_holds_by_simulation():
    """A true difference equal to the detectable one is found (t interval excludes 0) in about 80 % of designs."""
    rng = random.Random(1)
    n, sd = 6, 0.04
    detectable = paired_difference([rng.gauss(0, sd) for _ in range(n)], [0.0] * n).min_detectable
    shift = (student_t_quantile(0.975, n - 1) + student_t_quantile(0.8, n - 1)) * sd / math.sqrt(n)
    found = 0
    for _ in range(2000):
        diffs = [rng.gauss(shift, sd) for _ in range(n)]
        row = paired_difference(diffs, [0.0] * n, resamples=200)
        found += row.t_low > 0
    assert 0.72 < found / 2000 < 0.9, found / 2000
    assert detectable is not None and detectable > 0


def test_decided_needs_both_intervals_and_one_pair_decides_nothing():
    clear = paired_difference([0.9, 0.91, 0.92, 0.9, 0.93], [0.5, 0.52, 0.5, 0.51, 0.5])
    assert clear.decided and clear.bootstrap_low > 0 and clear.t_low > 0
    single = paired_difference([0.9], [0.5])
    assert single.mean == pytest.approx(0.4) and single.sd is None and not single.decided
    with pytest.raises(ValueError):
        paired_difference([0.1, 0.2], [0.1])
    low, high = bootstrap_mean_interval([1.0, 1.0, 1.0])
    assert low == high == 1.0
    assert binomial_se(0.5, 100) == pytest.approx(0.05)


def _cell(variant, n, lr, accuracy, seed):
    return {"model": "dense", "variant": variant, "N": n, "lr": lr, "eval_accuracy": accuracy, "seed": seed,
            "collapse": []}


def test_each_variant_is_paired_with_its_arms_vespo():
    assert reference_for("grpo") == "vespo" and reference_for("gspo+hot") == "vespo+hot"
    assert reference_for("grpo+bf16+tis") == "vespo+bf16+tis" and reference_for("vespo-sym") == "vespo"
    assert reference_for("vespo") is None and reference_for("vespo+hot") is None


def test_per_seed_frontiers_and_their_paired_difference():
    lrs = (3e-4, 7e-4, 1e-3)
    cells = []
    for seed in range(4):
        for lr in lrs:
            cells.append(_cell("vespo", 1, lr, 0.80, seed))
            cells.append(_cell("grpo", 1, lr, 0.80, seed))
        # VESPO at N = 8 holds through 7e-4 on every seed; GRPO only at the base rate, except seed 3.
        cells += [_cell("vespo", 8, 3e-4, 0.78, seed), _cell("vespo", 8, 7e-4, 0.75, seed),
                  _cell("vespo", 8, 1e-3, 0.30, seed)]
        cells += [_cell("grpo", 8, 3e-4, 0.76, seed), _cell("grpo", 8, 7e-4, 0.75 if seed == 3 else 0.40, seed),
                  _cell("grpo", 8, 1e-3, 0.20, seed)]
    cells.append(_cell("grpo", 8, 3e-4, 0.76, 9))  # a seed without its reference or its other rates: not counted
    frontiers = seed_frontiers(cells)
    assert frontiers[("dense", "vespo", 8)] == {0: 1, 1: 1, 2: 1, 3: 1}
    assert frontiers[("dense", "grpo", 8)] == {0: 0, 1: 0, 2: 0, 3: 1}
    assert frontiers[("dense", "grpo", 1)] == {s: 2 for s in range(4)}
    rows = {(r["metric"], r["N"], r["lr"]): r for r in paired_comparisons(cells, eval_prompts=100)}
    steps = rows[("frontier_steps", 8, None)]
    assert (steps["reference"], steps["variant"], steps["seeds"]) == ("vespo", "grpo", [0, 1, 2, 3])
    assert steps["mean"] == pytest.approx(0.75)
    at = rows[("accuracy", 8, 7e-4)]
    assert at["seeds"] == [0, 1, 2, 3] and at["mean"] == pytest.approx((0.35 * 3 + 0.0) / 4)
    assert at["eval_se"] == pytest.approx(binomial_se(0.75, 100))
