"""``vespo-megatron bench async --partial`` at a tiny size: the three runs complete on the same processes and every
figure is present (the speed-ups themselves are measured on an idle machine, docs/benchmarks.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.e2e.rl_fixtures import TINY
from vespo_megatron.cli import main as cli_main

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_dense_cpu.yaml"


def test_bench_async_with_partial_rollouts_json(capsys):
    overrides = [o for o in TINY if not o.startswith(("train.steps", "checkpoint.", "logging."))]
    code = cli_main(["bench", "async", str(CONFIG), *overrides, "--partial", "--steps", "3", "--warmup", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["procs"]) == {"colocated", "disaggregated", "partial"}
    assert "rollout.partial=true" in result["partial"]["overrides"]
    for mode in ("colocated", "disaggregated", "partial"):
        assert result[mode]["steps_timed"] == 2
        assert result[mode]["seconds_per_update"] > 0 and result[mode]["tokens_per_s"] > 0
        assert result[mode]["response_length_mean"] > 0
    for key in ("speedup", "speedup_partial"):
        assert math.isfinite(result[key]) and result[key] > 0
    assert len(result["loadavg_before"]) == 3 and result["torch_threads"] >= 1


def test_repeats_report_each_figure_s_median_and_every_repeat():
    from vespo_megatron.bench.async_rl import median_figures

    repeats = [{"seconds_per_update": 0.5, "tokens_per_s": 100.0}, {"seconds_per_update": 0.9, "tokens_per_s": 50.0},
               {"seconds_per_update": 0.6, "tokens_per_s": 80.0}]
    assert median_figures(repeats) == {"seconds_per_update": 0.6, "tokens_per_s": 80.0,
                                       "seconds_per_update_repeats": [0.5, 0.9, 0.6]}
