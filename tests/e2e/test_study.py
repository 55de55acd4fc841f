"""``vespo-megatron study staleness --quick`` end to end, cut to a few steps: table, JSON and plots, finite numbers.

It also checks the study's premise: every cell of a (model, seed) starts from the one saved warm start, so
the first sampled reward (drawn before any RL update, with the same sampling seed) is equal across cells.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from vespo_megatron.study import main, summarise

pytestmark = pytest.mark.slow


def test_quick_study_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["staleness", "--quick", "--warmup-steps", "4", "--eval-prompts", "8", "--lr", "2e-4",
                 "--out", str(out), "--json"]) == 0
    result = json.loads((out / "staleness.json").read_text())
    cells = result["cells"]
    assert {(c["variant"], c["N"]) for c in cells} == {("vespo", 1), ("vespo", 4), ("grpo", 1), ("grpo", 4)}
    for cell in cells:
        for key in ("final_reward", "best_reward", "eval_accuracy"):
            assert math.isfinite(cell[key]), (cell["variant"], cell["N"], key, cell[key])
        assert len(cell["reward_history"]) == 4, "every cell runs the same number of optimizer updates"
        assert cell["nonfinite_steps"] == 0
    # The paper's design: the same number of generated sequences whatever N (4 updates of 16 sequences).
    by_n = {c["N"]: c for c in cells if c["variant"] == "vespo"}
    config = yaml.safe_load((Path(by_n[4]["run_dir"]) / "config.yaml").read_text())
    assert config["rollout"]["prompts_per_step"] == 8 and config["rl"]["num_minibatches"] == 4
    assert config["train"]["global_batch_size"] == 16 and config["train"]["steps"] == 1
    assert len({c["first_reward"] for c in cells}) == 1, "cells did not start from the same warm start"
    # Every update ran at the study's lr, not at the warm-up's (rl.sft_lr) that the warm start saved.
    for cell in cells:
        lrs = [json.loads(line)["lr"] for line in (Path(cell["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert lrs and all(lr == pytest.approx(2e-4) for lr in lrs), (cell["variant"], cell["N"], lrs)
    vespo = [c for c in cells if c["variant"] == "vespo"]
    assert all(math.isfinite(c["phi"]["vespo/phi_mean"]) and math.isfinite(c["phi"]["vespo/ess"]) for c in vespo)
    table = (out / "staleness.md").read_text()
    assert "| vespo |" in table and "| grpo |" in table and "N=4" in table
    for name in ("reward_vs_N_dense.png", "reward_curves_dense_N4.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '"cells"' in capsys.readouterr().out


def test_summarise_flags_each_collapse_kind():
    steady = [{"reward/mean": 0.5, "loss/value": 0.1, "grad_norm": 1.0} for _ in range(8)]
    assert summarise(steady, 8)["collapse"] == []
    dropped = [{"reward/mean": r, "loss/value": 0.1, "grad_norm": 1.0} for r in (0.6,) * 4 + (0.1,) * 4]
    assert summarise(dropped, 8)["collapse"] == ["reward_drop"]
    crashed_at_once = [{"reward/mean": r, "loss/value": 0.1, "grad_norm": 1.0} for r in (0.4, 0.1) + (0.0,) * 6]
    assert summarise(crashed_at_once, 8)["collapse"] == ["reward_drop"]
    broken = steady[:7] + [{"reward/mean": 0.5, "loss/value": float("nan"), "grad_norm": 1.0}]
    assert summarise(broken, 8)["collapse"] == ["nonfinite"]
    silenced = steady[:7] + [{"reward/mean": 0.5, "loss/value": 0.1, "grad_norm": 1.0,
                              "vespo/silenced_frac": 0.9}]
    assert summarise(silenced, 8)["collapse"] == ["silenced"]


def test_quick_async_arm_trains_with_the_lag_it_was_given(tmp_path):
    """``study async --quick``: two-rank jobs; K = 0 trains on fresh rollouts, K = 2 on rollouts up to two
    updates old (none dropped), from the same warm-up, and the report tabulates both."""
    out = tmp_path / "async"
    assert main(["async", "--quick", "--losses", "vespo", "--updates", "6", "--warmup-steps", "4",
                 "--eval-prompts", "8", "--out", str(out)]) == 0
    cells = {c["K"]: c for c in json.loads((out / "async.json").read_text())["cells"]}
    assert set(cells) == {0, 2}
    for bound, cell in cells.items():
        records = [json.loads(line) for line in (Path(cell["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        lags = [r["staleness/policy_lag"] for r in records if "staleness/policy_lag" in r]
        assert len(lags) == 6 and max(lags) <= bound and cell["dropped_rollouts"] == 0
        assert math.isfinite(cell["eval_accuracy"]) and len(cell["reward_history"]) == 6
        config = yaml.safe_load((Path(cell["run_dir"]) / "config.yaml").read_text())
        assert config["parallel"]["rollout_ranks"] == 1 and config["rl"]["max_staleness"] == bound
        assert config["loss"]["behaviour"] == "sampler"  # W spans the lag (recompute would reset it to 1)
    assert cells[0]["lag_max"] == 0 and cells[2]["lag_max"] == 2  # the worker really ran ahead
    # The lag reaches VESPO's weight: |log W| is 0 up to rounding without it, and grows with it.
    assert cells[0]["phi"]["vespo/abs_log_w_mean"] < 1e-3 < cells[2]["phi"]["vespo/abs_log_w_mean"]
    # Same warm-up in both jobs: the first rollout is sampled by the same weights with the same seed.
    assert cells[0]["first_reward"] == cells[2]["first_reward"]
    assert cells[0]["warm_eval_accuracy"] == cells[2]["warm_eval_accuracy"]
    table = (out / "async.md").read_text()
    assert "K=2" in table and "measured policy lag" in table
    for name in ("reward_vs_K_dense.png", "reward_curves_dense_K2.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _cell(variant, n, lr, accuracy, seed=0, collapse=()):
    return {"model": "dense", "variant": variant, "N": n, "lr": lr, "eval_accuracy": accuracy, "seed": seed,
            "collapse": list(collapse)}


def test_frontier_is_the_largest_rate_keeping_ninety_percent_of_the_n1_base_accuracy():
    from vespo_megatron.study.frontier import frontier, frontier_table

    cells = [_cell("vespo", 1, 3e-4, 0.60), _cell("vespo", 1, 1e-3, 0.58), _cell("vespo", 8, 3e-4, 0.55),
             _cell("vespo", 8, 1e-3, 0.10, collapse=["reward_drop"]),
             _cell("grpo", 1, 3e-4, 0.50, seed=0), _cell("grpo", 1, 3e-4, 0.70, seed=1),  # reference: mean 0.60
             _cell("grpo", 1, 1e-3, 0.53), _cell("grpo", 8, 3e-4, 0.30), _cell("grpo", 8, 1e-3, 0.20)]
    rows = {(r["variant"], r["N"]): r for r in frontier(cells)}
    assert rows[("vespo", 1)]["frontier_lr"] == 1e-3  # 0.58 >= 0.9 x 0.60
    assert rows[("vespo", 8)]["frontier_lr"] == 3e-4 and rows[("vespo", 8)]["collapses"] == 1
    assert rows[("grpo", 1)]["reference_accuracy"] == pytest.approx(0.60)
    assert rows[("grpo", 1)]["frontier_lr"] == 3e-4  # 0.53 < 0.54 at 1e-3
    assert rows[("grpo", 8)]["frontier_lr"] is None and rows[("grpo", 8)]["cells"] == 2
    table = frontier_table(list(rows.values()))
    assert "| dense | grpo | 8 | 0.300 | 0.200 | none | 0 / 2 |" in table


def test_quick_frontier_runs_every_rate_and_writes_the_frontier(tmp_path):
    """The heavy-weights arm through ``study frontier --quick``: both of its losses at every (N, rate), the
    frontier rows, the pairing of GRPO with VESPO by seed, the sampler gap recorded, and the plot."""
    out = tmp_path / "frontier"
    assert main(["frontier", "--quick", "--losses", "vespo+hot", "grpo+hot", "--warmup-steps", "4",
                 "--eval-prompts", "8", "--out", str(out)]) == 0
    result = json.loads((out / "frontier.json").read_text())
    assert {(c["variant"], c["N"], c["lr"]) for c in result["cells"]} == {
        (v, n, lr) for v in ("vespo+hot", "grpo+hot") for n in (1, 4) for lr in (3e-4, 1e-3)}
    rows = result["frontier"]
    assert [(r["variant"], r["N"]) for r in rows] == [("grpo+hot", 1), ("grpo+hot", 4), ("vespo+hot", 1),
                                                      ("vespo+hot", 4)]
    for row in rows:
        assert row["base_lr"] == 3e-4 and math.isfinite(row["reference_accuracy"])
        assert set(row["accuracy_by_lr"]) == {"0.0003", "0.001"}  # rates as JSON keys
        assert row["frontier_lr"] in (None, 3e-4, 1e-3) and row["cells"] == 2 and 0 <= row["collapses"] <= 2
        if row["N"] == 1:
            assert row["frontier_lr"] is not None  # N = 1 at the base rate holds against itself
    # The sampler draws at 1.3 while the trainer evaluates at 1: every rollout enters training with |log W| > 0.
    assert all(c["sampler_abs_log_ratio"] > 1e-3 for c in result["cells"])
    config = yaml.safe_load((Path(result["cells"][0]["run_dir"]) / "config.yaml").read_text())
    assert config["rollout"]["sampler_temperature"] == 1.3 and config["loss"]["behaviour"] == "sampler"
    comparisons = result["comparisons"]
    assert {(r["metric"], r["N"], r["lr"]) for r in comparisons} == {
        ("accuracy", 1, 3e-4), ("accuracy", 1, 1e-3), ("accuracy", 4, 3e-4), ("accuracy", 4, 1e-3),
        ("frontier_steps", 1, None), ("frontier_steps", 4, None)}
    for row in comparisons:
        assert (row["reference"], row["variant"], row["seeds"], row["n"]) == ("vespo+hot", "grpo+hot", [0], 1)
        assert row["min_detectable"] is None and not row["decided"]  # one seed decides nothing
    text = (out / "frontier.md").read_text()
    assert "## Stability frontier" in text and "| dense | 4 | frontier | vespo+hot - grpo+hot | 1 |" in text
    assert (out / "frontier_dense.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
