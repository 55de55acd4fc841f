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


def test_length_distributions_parse_and_clip(tmp_path):
    from vespo_megatron.bench.lengths import draw_lengths

    drawn = draw_lengths("lognormal:median=200,sigma=1.0,min=16,max=2048", 4000, seed=1)
    assert int(drawn.min()) >= 16 and int(drawn.max()) == 2048
    assert 180 <= float(drawn.float().median()) <= 220
    assert torch.equal(drawn, draw_lengths("lognormal:median=200,sigma=1.0,min=16,max=2048", 4000, seed=1))
    uniform = draw_lengths("uniform:min=5,max=9", 100, seed=0)
    assert set(uniform.tolist()) <= set(range(5, 10))
    path = tmp_path / "lengths.jsonl"
    path.write_text('12\n{"length": 30}\n')
    assert draw_lengths(str(path), 3, seed=0).tolist() == [12, 30, 12]
    for bad in ("lognormal:max=64", "lognormal:median=5,mean=6,max=9", "gamma:k=2", "uniform:min=9,max=5"):
        with pytest.raises(ValueError, match="syntax"):
            draw_lengths(bad, 4, seed=0)


@pytest.mark.slow
def test_bench_step_lengths_json_three_modes(capsys):
    argv = ["bench", "step", str(CONFIG), "--lengths", "uniform:min=4,max=32", "--steps", "1", "--warmup", "0",
            "--json", "train.global_batch_size=8", "loss.chunk_size=8"]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = out["results"]
    assert [r["mode"] for r in rows] == ["padded", "budget", "packed"]
    for row in rows:
        assert "skipped" not in row and "error" not in row, row
        assert _positive(row["real_tokens_per_s"]) and _positive(row["peak_rss_mib"])
        assert row["real_tokens"] == rows[0]["real_tokens"] <= row["processed_tokens"]
    padded, budget, packed = rows
    assert packed["padding_fraction"] == 0.0 < budget["padding_fraction"] < padded["padding_fraction"]
    assert out["lengths"]["count"] == 8 and len(out["load_average"]) == 3
