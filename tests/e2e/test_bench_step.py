"""``vespo-megatron bench step`` on two tiny layouts: the JSON has every figure, positive and finite."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vespo_megatron.cli import main as cli_main

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_dense_cpu.yaml"
SMALL = ["model.max_seq_length=16", "train.global_batch_size=4", "loss.chunk_size=8"]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_synthetic_batches_split_over_data_parallel_ranks():
    from vespo_megatron.bench.step import sft_micro_batches, synthetic_rollout
    from vespo_megatron.config import load_config

    config = load_config(CONFIG, SMALL + ["train.micro_batch_size=1"])
    full = [b["tokens"] for b in sft_micro_batches(config, SimpleNamespace(dp=1, dp_rank=0, cp=1), 64, seed=3)]
    halves = [b["tokens"] for r in (0, 1)
              for b in sft_micro_batches(config, SimpleNamespace(dp=2, dp_rank=r, cp=1), 64, seed=3)]
    assert len(full) == 4 and all(t.shape == (1, 16) for t in full)
    assert all(torch.equal(a, b) for a, b in zip(full, halves))
    rollout = synthetic_rollout(config, SimpleNamespace(dp=2, dp_rank=1, cp=1), 64, seed=3)
    mask = rollout.response_token_mask()
    assert rollout.size == 2 and bool((rollout.response_lengths >= 4).all())
    assert bool((mask.sum(dim=1) == rollout.response_lengths).all())
    assert bool((rollout.sampler_logprobs * (1 - mask) == 0).all()) and bool((rollout.sampler_logprobs <= 0).all())


@pytest.mark.slow
def test_bench_step_json_two_layouts(capsys):
    argv = ["bench", "step", str(CONFIG), "--layouts", "tp1,tp2", "--loss", "sft,vespo,grpo",
            "--steps", "2", "--warmup", "1", "--json", *SMALL]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["seq_length"] == 16 and out["global_batch_size"] == 4
    rows = out["results"]
    assert [(r["layout"], r["loss"]) for r in rows] == [
        (layout, loss) for layout in ("tp1", "tp2") for loss in ("sft", "vespo", "grpo")
    ]
    for row in rows:
        assert "skipped" not in row and "error" not in row, row
        assert len(row["peak_mib_per_rank"]) == row["world"] == len(row["params_per_rank"])
        for part in ("step_seconds", "forward_backward_seconds", "optimizer_seconds", "cpu_seconds_all_ranks"):
            assert all(_positive(row[part][k]) for k in ("mean", "median", "min")), (part, row)
        assert row["forward_backward_seconds"]["min"] <= row["step_seconds"]["median"] * 10
        assert _positive(row["tokens_per_second"]) and row["tokens_per_step"] == 4 * 16
        assert all(_positive(m) for m in row["peak_mib_per_rank"]), row
        assert row["memory_method"]
        if row["loss"] == "sft":
            assert _positive(row["metrics"]["sft/loss"])
        else:
            assert _positive(row["old_logprob_seconds"])
            assert math.isfinite(row["metrics"]["loss/value"])
    # tp2 halves the attention/MLP/vocabulary weights of each rank
    tp1, tp2 = rows[0], rows[3]
    assert max(tp2["params_per_rank"]) < tp1["params_per_rank"][0]
    ratios = out["vespo_vs_grpo"]
    assert [o["layout"] for o in ratios] == ["tp1", "tp2"]
    assert all(_positive(o[k]) for o in ratios for k in ("step_ratio_median", "cpu_ratio_median", "peak_mib_ratio"))
